"""The CUDA kernel (custom_ops/core/flash_attention_cuda.cu) through its C entry point.

Without nvcc the build tests skip; without a GPU the `cuda` tests skip (tests/conftest.py). Native
calls run in a subprocess, so a crash fails a test instead of killing the run. The correctness run
on a GPU goes through benchmarks/cuda_harness.py, the torch side of the GPU check, which it tests
at CI size.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from flash_export.runtime import library_path
from flash_export.runtime.native import NativeLibrary

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "custom_ops" / "core"
CUDA_SOURCE = CORE / "flash_attention_cuda.cu"

# Warnings from the host compiler, nvcc's front end and ptxas (spills included) are errors.
STRICT_FLAGS = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror",
                "-Werror", "all-warnings", "-Xptxas", "-warn-spills",
                "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def _build_module() -> Any:
    """custom_ops/build.py, loaded by path as setup.py loads it."""
    path = ROOT / "custom_ops" / "build.py"
    spec = importlib.util.spec_from_file_location("_fe_native_build", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_isolated(script: str, *args: str, timeout: float = 300,
                 benchmarks: bool = False) -> Any:
    """Run `script` in a fresh interpreter; returns its last stdout line parsed as JSON.
    `benchmarks` puts benchmarks/ on its PYTHONPATH (for cuda_harness)."""
    path = [str(ROOT), *([str(ROOT / "benchmarks")] if benchmarks else []),
            os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def find_nvcc() -> str:
    found = _build_module().find_nvcc()
    if found is None:
        pytest.skip("nvcc not found on PATH or in /usr/local/cuda/bin")
    return str(found)


def test_compiles_warning_free_for_sm80_and_sm90(tmp_path: Path) -> None:
    cmd = [find_nvcc(), *STRICT_FLAGS, f"-I{CORE}", "-c", str(CUDA_SOURCE), "-o",
           str(tmp_path / "flash_attention_cuda.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stdout}{proc.stderr}"
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def cuda_library(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A library with the CUDA kernel: FLASH_EXPORT_LIBRARY's when it has one, else built here
    (warnings as errors, sm_80 and sm_90)."""
    if Path(library_path()).is_file() and NativeLibrary(library_path()).has_cuda:
        return library_path()
    find_nvcc()
    out = tmp_path_factory.mktemp("cuda")
    return str(_build_module().build_library(out, cuda="on", werror=True))


def test_exports_the_c_entry_points(cuda_library: str) -> None:
    lib = NativeLibrary(cuda_library)  # checks every entry point and the params size
    assert lib.has_cuda


STATUS_SCRIPT = """
import json, sys
from flash_export.runtime.native import AttentionParams, NativeLibrary

lib = NativeLibrary(sys.argv[1])
def status(**fields):
    p = AttentionParams(batch=1, heads=1, head_dim=64, seq_q=4, seq_k=4, chunk_size=64,
                        scale=1.0, dtype=1)
    for name, value in fields.items():
        setattr(p, name, value)
    return lib.forward_cuda(p, 0)
print(json.dumps({
    "null_params": lib.forward_cuda(None, 0),
    "head_dim_0": status(head_dim=0),
    "negative_seq": status(seq_k=-1),
    "chunk_0": status(chunk_size=0),
    "bad_dtype": status(dtype=7),
    "empty_query": status(seq_q=0),
    "null_out": status(seq_q=4),
}))
"""


def test_statuses_before_any_device_work(cuda_library: str) -> None:
    # Validation answers before the device is touched, so this holds with or without a GPU.
    statuses = run_isolated(STATUS_SCRIPT, cuda_library)
    assert statuses == {"null_params": 1, "head_dim_0": 1, "negative_seq": 1, "chunk_0": 1,
                        "bad_dtype": 2, "empty_query": 0, "null_out": 1}


NO_GPU_SCRIPT = """
import json, sys
from flash_export.runtime.native import AttentionParams, NativeLibrary

lib = NativeLibrary(sys.argv[1])
p = AttentionParams(batch=1, heads=1, head_dim=64, seq_q=4, seq_k=4, chunk_size=64, scale=1.0,
                    dtype=1, q=16, k=16, v=16, out=16)
print(json.dumps(lib.forward_cuda(p, 0)))
"""


def test_without_a_gpu_reports_a_device_error(cuda_library: str,
                                              cuda_unusable: Optional[str]) -> None:
    if cuda_unusable is None:
        pytest.skip("a GPU is present; this checks the no-GPU answer")
    assert run_isolated(NO_GPU_SCRIPT, cuda_library) == 3


# --------------------------------------------------------------------------------------------
# On a GPU: correctness against the float64 reference, all cases in one subprocess.
# --------------------------------------------------------------------------------------------

CASES: List[Dict[str, Any]] = [
    dict(dtype=dtype, head_dim=d, seq_q=lq, seq_k=lk, causal=causal, mask=mask)
    for dtype in ("float16", "bfloat16", "float32")
    for d in (32, 64, 128)
    for lq, lk in ((1, 1), (63, 65), (129, 7), (7, 129))
    for causal in (False, True)
    for mask in ((False, True) if (lq, lk) == (63, 65) else (False,))
]


def case_id(c: Dict[str, Any]) -> str:
    return (f"{c['dtype']}-d{c['head_dim']}-{c['seq_q']}x{c['seq_k']}"
            f"{'-causal' if c['causal'] else ''}{'-mask' if c['mask'] else ''}")


CORRECTNESS_SCRIPT = """
import json, sys
import torch
import cuda_harness as h
from flash_export.runtime.native import NativeLibrary

lib = NativeLibrary(sys.argv[1])
torch.manual_seed(0)
results = {}
for c in json.loads(sys.argv[2]):
    dtype = getattr(torch, c["dtype"])
    b, heads = 2, 3
    e = heads * c["head_dim"]
    q, k, v = (torch.randn(b, n, e, device="cuda").to(dtype)
               for n in (c["seq_q"], c["seq_k"], c["seq_k"]))
    mask = None
    if c["mask"]:
        mask = torch.rand(b, 1, c["seq_q"], c["seq_k"], device="cuda") > 0.5
        mask[:, :, ::5] = False  # rows that see no key must come out as zeros
    out = h.native_attention(lib, q, k, v, heads, mask=mask, causal=c["causal"])
    torch.cuda.synchronize()
    ref = h.reference_attention(q, k, v, heads, mask=mask, causal=c["causal"])
    base = h.reference_attention(q, k, v, heads, mask=mask, causal=c["causal"],
                                 compute_dtype=dtype)
    verdict, baseline_error = h.compare_to_reference(out, ref, base)
    results[c["id"]] = dict(verdict.to_dict(), baseline_max_abs=baseline_error)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def gpu_results(cuda_library: str) -> Dict[str, Dict[str, Any]]:
    cases = [dict(c, id=case_id(c)) for c in CASES]
    return run_isolated(CORRECTNESS_SCRIPT, cuda_library, json.dumps(cases), benchmarks=True)


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_float64_reference(gpu_results: Dict[str, Dict[str, Any]],
                                   case: Dict[str, Any]) -> None:
    r = gpu_results[case_id(case)]
    assert r["passed"], (f"max abs error {r['max_abs']:.3g} > bound {r['bound']:.3g} "
                         f"(baseline {r['baseline_max_abs']:.3g}, nonfinite {r['nonfinite']})")

"""The CUDA kernel (custom_ops/core/flash_attention_cuda.cu) through its C entry point.

Without nvcc the build tests skip; without a GPU the `cuda` tests skip. Native calls run in a
subprocess, so a crash fails a test instead of killing the run.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "custom_ops" / "core"
CUDA_SOURCE = CORE / "flash_attention_cuda.cu"
BENCHMARKS = ROOT / "benchmarks"

sys.path.insert(0, str(BENCHMARKS))
import cuda_harness  # noqa: E402  (benchmarks/ is not a package)

# Warnings from the host compiler, nvcc's front end and ptxas (spills included) are errors.
STRICT_FLAGS = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror",
                "-Werror", "all-warnings", "-Xptxas", "-warn-spills",
                "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def find_nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def run_isolated(script: str, *args: str, timeout: float = 300) -> Any:
    """Run `script` in a fresh interpreter (benchmarks/ importable); returns its last stdout line
    parsed as JSON."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCHMARKS),
                                                        os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cuda_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kernel alone as a shared library, built with warnings as errors for sm_80 and sm_90."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH or in /usr/local/cuda/bin")
    out = tmp_path_factory.mktemp("cuda") / "libflash_export_cuda.so"
    cmd = [nvcc, *STRICT_FLAGS, "-shared", "-cudart", "static", f"-I{CORE}", str(CUDA_SOURCE),
           "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stdout}{proc.stderr}"
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr
    return out


def test_compiles_warning_free_for_sm80_and_sm90(cuda_library: Path) -> None:
    assert cuda_library.stat().st_size > 0


def test_exports_the_c_entry_points(cuda_library: Path) -> None:
    lib = cuda_harness.NativeLibrary(cuda_library)
    assert lib.has_cuda
    assert lib.params_size() == ctypes.sizeof(cuda_harness.AttentionParams)


LAYOUT_PROGRAM = """
#include <cstddef>
#include <cstdio>
#include "flash_attention.h"
using flash_export::AttentionParams;
#define F(name) std::printf("\\"%s\\": %zu, ", #name, offsetof(AttentionParams, name));
int main() {
  std::printf("{");
  FIELDS
  std::printf("\\"sizeof\\": %zu}\\n", sizeof(flash_export::AttentionParams));
}
"""


def test_ctypes_mirror_matches_the_header(tmp_path: Path) -> None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to read the header's layout")
    names = [name for name, _ in cuda_harness.AttentionParams._fields_]
    source = tmp_path / "layout.cc"
    source.write_text(LAYOUT_PROGRAM.replace("FIELDS", " ".join(f"F({n})" for n in names)))
    exe = tmp_path / "layout"
    subprocess.run([cxx, "-std=c++17", f"-I{CORE}", str(source), "-o", str(exe)], check=True)
    layout = json.loads(subprocess.run([str(exe)], capture_output=True, text=True,
                                       check=True).stdout)
    mirror = {name: getattr(cuda_harness.AttentionParams, name).offset for name in names}
    assert {n: layout[n] for n in names} == mirror
    assert layout["sizeof"] == ctypes.sizeof(cuda_harness.AttentionParams)


STATUS_SCRIPT = """
import json, sys
import cuda_harness as h

lib = h.NativeLibrary(sys.argv[1])
def status(**fields):
    p = h.AttentionParams(batch=1, heads=1, head_dim=64, seq_q=4, seq_k=4, chunk_size=64,
                          scale=1.0, dtype=1)
    for name, value in fields.items():
        setattr(p, name, value)
    return lib.forward_cuda(p, 0)
print(json.dumps({
    "null_params": int(lib._cuda(None, None)),
    "head_dim_0": status(head_dim=0),
    "negative_seq": status(seq_k=-1),
    "chunk_0": status(chunk_size=0),
    "bad_dtype": status(dtype=7),
    "empty_query": status(seq_q=0),
    "null_out": status(seq_q=4),
}))
"""


def test_statuses_before_any_device_work(cuda_library: Path) -> None:
    # Validation answers before the device is touched, so this holds with or without a GPU.
    statuses = run_isolated(STATUS_SCRIPT, str(cuda_library))
    assert statuses == {"null_params": 1, "head_dim_0": 1, "negative_seq": 1, "chunk_0": 1,
                        "bad_dtype": 2, "empty_query": 0, "null_out": 1}


NO_GPU_SCRIPT = """
import json, sys
import cuda_harness as h

lib = h.NativeLibrary(sys.argv[1])
p = h.AttentionParams(batch=1, heads=1, head_dim=64, seq_q=4, seq_k=4, chunk_size=64, scale=1.0,
                      dtype=1, q=16, k=16, v=16, out=16)
print(json.dumps(lib.forward_cuda(p, 0)))
"""


def test_without_a_gpu_reports_a_device_error(cuda_library: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present; this checks the no-GPU answer")
    assert run_isolated(NO_GPU_SCRIPT, str(cuda_library)) == 3


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

lib = h.NativeLibrary(sys.argv[1])
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
    results[c["id"]] = h.judge(out, ref, base).__dict__
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def gpu_results(request: pytest.FixtureRequest) -> Dict[str, Dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU available")
    override = os.environ.get("FLASH_EXPORT_LIBRARY")
    if override and cuda_harness.NativeLibrary(Path(override)).has_cuda:
        library = Path(override)
    else:
        library = request.getfixturevalue("cuda_library")
    cases = [dict(c, id=case_id(c)) for c in CASES]
    return run_isolated(CORRECTNESS_SCRIPT, str(library), json.dumps(cases))


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_float64_reference(gpu_results: Dict[str, Dict[str, Any]],
                                   case: Dict[str, Any]) -> None:
    r = gpu_results[case_id(case)]
    assert r["passed"], (f"max abs error {r['max_abs']:.3g} > bound {r['bound']:.3g} "
                         f"(baseline {r['baseline_max_abs']:.3g}, nonfinite {r['nonfinite']})")

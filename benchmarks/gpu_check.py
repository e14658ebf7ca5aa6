"""The one prepared check of the CUDA attention kernel on a lent GPU; writes one JSON report.

Phases, each in its own subprocess so a crash or a poisoned CUDA context loses only that phase:
  correctness   float16/bfloat16/float32 against a float64 reference (flash_export.core.tolerance's
                rule: max abs error <= max(the dtype's floor, 2 x PyTorch's same-dtype error), no
                NaN/Inf where the reference is finite; rows that see no key exactly zero, repeated
                runs bit-identical)
  benchmark     B=4, H=16, D=64/128, N=1024/4096/16384, float16, causal or not; CUDA events,
                median of repeats, TFLOP/s beside torch SDPA's flash backend in the same process
  sanitizer     compute-sanitizer memcheck and racecheck on small shapes; the checked process
                imports no torch (device memory through libcudart via ctypes), so only this
                library's kernels run under the tool
plus the environment (device, versions, onnxruntime's providers) and the params layout.

    python benchmarks/gpu_check.py --lib BUILD/libflash_export.so --out OUT/gpu_report.json
    python benchmarks/gpu_check.py --dry-run --lib CPU_BUILD/libflash_export.so   # no GPU needed

flash_export must be importable: installed, or the repository root on PYTHONPATH (gpu_check.sh
sets it).

--dry-run runs every phase on the CPU through the library's CPU entry point (smaller shapes, no
compute-sanitizer, perf_counter timing) so all of this Python can be rehearsed without a GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from flash_export.runtime import LIBRARY_ENV
from flash_export.runtime.native import AttentionParams, NativeLibrary, Strided, attention_params

MMA_HEAD_DIMS = (64, 128)
DTYPE_NAMES = ("float16", "bfloat16", "float32")


# --------------------------------------------------------------------------------------------
# Small utilities.
# --------------------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def finite_or_none(x: float) -> Optional[float]:
    """JSON has no inf/nan: map them to None."""
    return x if math.isfinite(x) else None


def run_child(args: List[str], timeout_s: float) -> Dict[str, Any]:
    """Run a subprocess with a timeout; returns rc, seconds and the output's tail."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = None
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (
            exc.stdout or "")
        out += f"\n[timed out after {timeout_s:.0f} s]"
    return {"rc": rc, "seconds": round(time.perf_counter() - start, 2), "output": out,
            "timed_out": rc is None}


def phase_command(args: argparse.Namespace, phase: str, json_path: Path) -> List[str]:
    """Command line that runs one phase of this script in a child process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--lib", str(args.lib),
           "--phase-json", str(json_path)]
    if args.dry_run:
        cmd.append("--dry-run")
    return cmd


# --------------------------------------------------------------------------------------------
# Correctness (child process, torch).
# --------------------------------------------------------------------------------------------


def correctness_cases(dry_run: bool) -> List[Dict[str, Any]]:
    """The case list: the brief's lengths and head dims, then paths and edge cases."""
    lengths = [(1, 1), (63, 63), (65, 65), (1000, 1000), (4096, 4096), (65, 1000), (1000, 65),
               (1, 4096)]
    masked = {(63, 63), (65, 1000), (1000, 65), (1000, 1000)}
    if dry_run:  # the CPU reference and the serial CPU kernel are slow on long sequences
        lengths = [(1, 1), (63, 63), (65, 65), (65, 130), (130, 65)]
        masked = {(63, 63), (65, 130), (130, 65)}
    cases: List[Dict[str, Any]] = []
    for dtype in DTYPE_NAMES:
        for head_dim in MMA_HEAD_DIMS:
            for seq_q, seq_k in lengths:
                big = seq_q * seq_k >= 1_000_000
                for causal in (False, True):
                    for mask in ("none", "random") if (seq_q, seq_k) in masked else ("none",):
                        cases.append(dict(dtype=dtype, batch=1 if big else 2, heads=2 if big else 3,
                                          head_dim=head_dim, seq_q=seq_q, seq_k=seq_k,
                                          causal=causal, mask=mask, layout="separate"))
    for dtype in DTYPE_NAMES:
        # The simple kernel's head dims, strided and misaligned layouts, key padding, edge sizes.
        for head_dim in (16, 32, 96, 256):
            cases.append(dict(dtype=dtype, batch=2, heads=3, head_dim=head_dim, seq_q=65,
                              seq_k=129, causal=True, mask="random", layout="separate"))
        for layout in ("packed_qkv", "misaligned"):
            for head_dim in MMA_HEAD_DIMS:
                cases.append(dict(dtype=dtype, batch=2, heads=3, head_dim=head_dim, seq_q=129,
                                  seq_k=200, causal=True, mask="none", layout=layout))
        cases.append(dict(dtype=dtype, batch=2, heads=2, head_dim=64, seq_q=200, seq_k=300,
                          causal=False, mask="key_padding", layout="separate"))
        for seq_q, seq_k in ((7, 0), (0, 7), (300, 7)):
            cases.append(dict(dtype=dtype, batch=2, heads=2, head_dim=128, seq_q=seq_q,
                              seq_k=seq_k, causal=True, mask="none", layout="separate"))
    return cases


def expected_path(case: Dict[str, Any]) -> str:
    """Which CUDA kernel the launcher should pick for this case (mirrors mma_path_applies)."""
    if case["seq_k"] == 0:
        return "zero"
    fast = (case["dtype"] != "float32" and case["head_dim"] in MMA_HEAD_DIMS
            and case["layout"] != "misaligned")
    return "mma" if fast else "simple"


def make_inputs(case: Dict[str, Any], device: Any) -> Tuple[Any, Any, Any, Any]:
    """q (B, Lq, H*D), k/v (B, Lk, H*D) and an optional bool mask for one case."""
    import torch

    dtype = getattr(torch, case["dtype"])
    b, h, d, lq, lk = (case[n] for n in ("batch", "heads", "head_dim", "seq_q", "seq_k"))
    e = h * d
    if case["layout"] == "packed_qkv":  # q, k, v as column slices of one (B, L, 3E) tensor
        seq = max(lq, lk)
        qkv = torch.randn(b, seq, 3 * e, device=device).to(dtype)
        q, k, v = qkv[:, :lq, :e], qkv[:, :lk, e:2 * e], qkv[:, :lk, 2 * e:]
    elif case["layout"] == "misaligned":  # 2-byte offset: forces the simple kernel
        flat = torch.randn(b * (lq + 2 * lk) * e + 1, device=device).to(dtype)[1:]
        q = flat[: b * lq * e].view(b, lq, e)
        k = flat[b * lq * e: b * (lq + lk) * e].view(b, lk, e)
        v = flat[b * (lq + lk) * e:].view(b, lk, e)
    else:
        q, k, v = (torch.randn(b, n, e, device=device).to(dtype) for n in (lq, lk, lk))
    mask = None
    if case["mask"] == "random":
        mask = torch.rand(b, 1, lq, lk, device=device) > 0.4  # (B, 1, Lq, Lk), broadcast over H
        mask[:, :, 1::7] = False  # some rows see no key at all: they must come out as zeros
    elif case["mask"] == "key_padding":
        mask = torch.ones(b, 1, 1, lk, dtype=torch.bool, device=device)  # (B, 1, 1, Lk)
        mask[0, ..., lk // 2:] = False
    return q, k, v, mask


def run_case(lib: NativeLibrary, case: Dict[str, Any], device: Any) -> Dict[str, Any]:
    """Run one case twice, judge it against the float64 reference; returns the result record."""
    import cuda_harness as harness  # imports torch (the sanitizer target must not)
    import torch

    q, k, v, mask = make_inputs(case, device)
    heads, causal = case["heads"], case["causal"]
    result: Dict[str, Any] = {"case": case, "expected_path": expected_path(case)}
    out = harness.native_attention(lib, q, k, v, heads, mask=mask, causal=causal)
    again = harness.native_attention(lib, q, k, v, heads, mask=mask, causal=causal)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ref = harness.reference_attention(q, k, v, heads, mask=mask, causal=causal)
    base = harness.reference_attention(q, k, v, heads, mask=mask, causal=causal,
                                       compute_dtype=q.dtype)
    verdict, baseline_error = harness.compare_to_reference(out, ref, base)
    visible = harness.visible_keys(case["seq_q"], case["seq_k"], causal=causal, mask=mask,
                                   device=device)
    dead = ~torch.broadcast_to(visible, (case["batch"], 1, case["seq_q"], case["seq_k"])).any(-1)
    dead_rows = dead[:, 0]  # (B, Lq): rows that see no key, identical over heads
    zero_ok = bool((out[dead_rows] == 0).all()) if out.numel() else True
    result.update(max_abs=finite_or_none(verdict.max_abs),
                  baseline_max_abs=finite_or_none(baseline_error), bound=verdict.bound,
                  nonfinite=verdict.nonfinite, dead_rows=int(dead_rows.sum()),
                  dead_rows_zero=zero_ok, repeat_identical=bool(torch.equal(out, again)),
                  passed=verdict.passed and zero_ok and bool(torch.equal(out, again)))
    return result


def phase_correctness(args: argparse.Namespace) -> Dict[str, Any]:
    """Child: every correctness case, results flushed to --phase-json after each case."""
    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    lib = NativeLibrary(str(args.lib))
    torch.manual_seed(0)
    records: List[Dict[str, Any]] = []
    state: Dict[str, Any] = {"device": str(device), "cases": records, "running": None}
    for case in correctness_cases(args.dry_run):
        state["running"] = case
        write_json(args.phase_json, state)
        try:
            records.append(run_case(lib, case, device))
        except Exception as exc:  # one failing case must not hide the others
            records.append({"case": case, "passed": False, "error": repr(exc)})
    state["running"] = None
    write_json(args.phase_json, state)
    return state


# --------------------------------------------------------------------------------------------
# Benchmark (child process, torch).
# --------------------------------------------------------------------------------------------


def time_median_ms(fn: Callable[[], Any], device: Any, repeats: int) -> float:
    """Median milliseconds of `fn` over `repeats` timed calls after warm-up."""
    import torch

    for _ in range(2):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_one(lib: NativeLibrary, device: Any, backend: Any, batch: int, heads: int,
              head_dim: int, n: int, causal: bool, repeats: int) -> Dict[str, Any]:
    """Time our kernel and torch SDPA on the same float16 (B, N, H*D) tensors."""
    import cuda_harness as harness  # imports torch (the sanitizer target must not)
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    q, k, v = (torch.randn(batch, n, heads * head_dim, device=device, dtype=torch.float16)
               for _ in range(3))  # (B, N, H*D)
    qh, kh, vh = (harness.split_heads(x, heads) for x in (q, k, v))  # (B, H, N, D) views
    call = harness.prepare_call(lib, q, k, v, heads, causal=causal)
    flops = 4.0 * batch * heads * n * n * head_dim / (2.0 if causal else 1.0)

    def ours() -> None:
        harness.run_prepared(lib, call, device)

    def theirs() -> Any:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)

    ours_ms = time_median_ms(ours, device, repeats)
    torch_ms = time_median_ms(theirs, device, repeats)
    # Lq == Lk, so SDPA's top-left causal equals ours: the two outputs must agree.
    diff = call.out.float() - theirs().transpose(1, 2).reshape_as(q).float()
    return {"ours_ms": ours_ms, "torch_ms": torch_ms, "ours_tflops": flops / ours_ms * 1e-9,
            "torch_tflops": flops / torch_ms * 1e-9, "speed_ratio": torch_ms / ours_ms,
            "max_abs_diff_vs_torch": float(diff.abs().max()), "repeats": repeats}


def phase_benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    """Child: our kernel beside torch SDPA (flash backend on CUDA) on the same tensors."""
    import torch
    from torch.nn.attention import SDPBackend

    device = torch.device("cpu" if args.dry_run else "cuda")
    lib = NativeLibrary(str(args.lib))
    batch, heads = (1, 2) if args.dry_run else (4, 16)
    lengths = (64, 256) if args.dry_run else (1024, 4096, 16384)
    backend = SDPBackend.MATH if args.dry_run else SDPBackend.FLASH_ATTENTION
    rows: List[Dict[str, Any]] = []
    state: Dict[str, Any] = {"device": str(device), "batch": batch, "heads": heads,
                             "dtype": "float16", "torch_backend": backend.name, "rows": rows}
    torch.manual_seed(0)
    for head_dim in MMA_HEAD_DIMS:
        for n in lengths:
            for causal in (False, True):
                row: Dict[str, Any] = {"head_dim": head_dim, "seq": n, "causal": causal}
                rows.append(row)
                try:
                    row.update(bench_one(lib, device, backend, batch, heads, head_dim, n, causal,
                                         repeats=3 if args.dry_run else (20 if n <= 4096 else 10)))
                except Exception as exc:
                    row["error"] = repr(exc)
                write_json(args.phase_json, state)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    write_json(args.phase_json, state)
    return state


# --------------------------------------------------------------------------------------------
# Sanitizer target (child process, no torch: numpy + libcudart through ctypes).
# --------------------------------------------------------------------------------------------

SANITIZE_CASES = [
    # dtype, B, H, D, Lq, Lk, causal, mask: small shapes that still hit tile tails, masking,
    # causal skipping, both pipeline stages and both kernels.
    ("float16", 1, 2, 64, 130, 200, True, True),
    ("bfloat16", 1, 2, 128, 65, 129, False, False),
    ("float16", 1, 1, 128, 200, 65, True, False),
    ("float32", 1, 2, 32, 33, 70, True, True),
    ("float16", 1, 2, 96, 17, 40, False, True),
    ("float16", 1, 2, 64, 9, 0, False, False),
]


class DeviceMemory:
    """cudaMalloc/cudaMemcpy through the dynamic libcudart (or host memory in --dry-run)."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.keep: List[Any] = []
        self.cudart: Any = None
        if not dry_run:
            self.cudart = ctypes.CDLL(find_cudart())
            self.cudart.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
            self.cudart.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                               ctypes.c_int]
            self.cudart.cudaFree.argtypes = [ctypes.c_void_p]

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what} failed with cudaError {rc}")

    def upload(self, array: Any) -> int:
        """Device copy of a numpy array (its host buffer in --dry-run); returns the address."""
        if self.dry_run:
            self.keep.append(array)
            return int(array.ctypes.data)
        ptr = ctypes.c_void_p()
        self.check(self.cudart.cudaMalloc(ctypes.byref(ptr), max(array.nbytes, 16)), "cudaMalloc")
        self.keep.append(ptr)
        if array.nbytes:
            self.check(self.cudart.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, 1), "H2D")
        return int(ptr.value or 0)

    def download(self, address: int, array: Any) -> None:
        """Copy device memory back into a numpy array (no-op in --dry-run)."""
        if not self.dry_run and array.nbytes:
            self.check(self.cudart.cudaMemcpy(array.ctypes.data, address, array.nbytes, 2), "D2H")

    def synchronize(self) -> None:
        if not self.dry_run:
            self.check(self.cudart.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def free(self) -> None:
        if not self.dry_run:
            for ptr in self.keep:
                self.cudart.cudaFree(ptr)
        self.keep.clear()


def find_cudart() -> str:
    """Path of a dynamic libcudart: the toolkit's, or the pip wheel torch depends on."""
    patterns = ["/usr/local/cuda/lib64/libcudart.so*",
                "/usr/local/cuda/targets/*/lib/libcudart.so*"]
    for base in sys.path:
        patterns.append(os.path.join(base, "nvidia", "*", "lib", "libcudart.so*"))
        patterns.append(os.path.join(base, "nvidia", "cu*", "lib", "libcudart.so*"))
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError("no dynamic libcudart found (toolkit or nvidia-cuda-runtime wheel)")


def to_bits(x: Any, dtype: str) -> Any:
    """float32 numpy array -> storage of `dtype` (bfloat16 as its upper 16 bits)."""
    import numpy as np

    if dtype == "float32":
        return x.astype(np.float32)
    if dtype == "float16":
        return x.astype(np.float16)
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def from_bits(x: Any, dtype: str) -> Any:
    """Storage of `dtype` -> float32 numpy array (inverse of to_bits)."""
    import numpy as np

    if dtype == "bfloat16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)


def phase_sanitize_target(args: argparse.Namespace) -> Dict[str, Any]:
    """Child under compute-sanitizer: small launches of every kernel, raw pointers, no torch."""
    import numpy as np

    lib = NativeLibrary(str(args.lib))
    mem = DeviceMemory(args.dry_run)
    rng = np.random.default_rng(0)
    results = []
    for dtype, b, h, d, lq, lk, causal, use_mask in SANITIZE_CASES:
        e = h * d
        q, k, v = (to_bits(rng.standard_normal((b, n, e)), dtype) for n in (lq, lk, lk))
        out = np.zeros_like(q)
        mask = None
        if use_mask:  # bool (Lq, Lk): the library broadcasts it over B and H
            allowed = rng.random((lq, lk)) > 0.3
            mask = Strided.of(allowed, mem.upload(allowed))
        p = attention_params(lib, *(Strided.of(x, mem.upload(x), dtype) for x in (q, k, v, out)),
                             h, mask=mask, causal=causal, device="cpu" if args.dry_run else "cuda")
        status = lib.forward_cpu(p) if args.dry_run else lib.forward_cuda(p, 0)
        mem.synchronize()
        mem.download(p.out, out)
        finite = bool(np.isfinite(from_bits(out, dtype)).all())
        results.append({"case": [dtype, b, h, d, lq, lk, causal, use_mask], "status": status,
                        "finite": finite})
        mem.free()
    state = {"cases": results, "ok": all(r["status"] == 0 and r["finite"] for r in results)}
    write_json(args.phase_json, state)
    print(json.dumps(state))
    return state


def parse_sanitizer(output: str) -> Dict[str, Optional[int]]:
    """Error and hazard counts from compute-sanitizer's summary lines (None if absent)."""
    errors = re.findall(r"ERROR SUMMARY:\s*(\d+)\s+error", output)
    hazards = re.findall(r"RACECHECK SUMMARY:\s*(\d+)\s+hazard", output)
    return {"errors": int(errors[-1]) if errors else None,
            "hazards": int(hazards[-1]) if hazards else None}


def run_sanitizers(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """memcheck and racecheck over the sanitize target, each with its own timeout."""
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    results: Dict[str, Any] = {}
    for name in ("memcheck", "racecheck"):
        target = phase_command(args, "sanitize-target", work / f"sanitize_{name}.json")
        if args.dry_run:  # rehearse the child and the parsing; there is no GPU to sanitize
            cmd = target
        else:
            cmd = [tool, "--tool", name, *target]
        run = run_child(cmd, args.sanitizer_timeout)
        counts = parse_sanitizer(run["output"])
        child = work / f"sanitize_{name}.json"
        results[name] = {"command": " ".join(cmd), "rc": run["rc"], "seconds": run["seconds"],
                         "timed_out": run["timed_out"], **counts,
                         "target": json.loads(child.read_text()) if child.exists() else None,
                         "output_tail": run["output"][-3000:]}
    return results


# --------------------------------------------------------------------------------------------
# Orchestration.
# --------------------------------------------------------------------------------------------


def environment(args: argparse.Namespace) -> Dict[str, Any]:
    """Device, versions, the params layout check and onnxruntime's execution providers."""
    import torch

    env: Dict[str, Any] = {"dry_run": args.dry_run, "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "python": sys.version.split()[0],
                           "library": str(args.lib)}
    if not args.dry_run:
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env["device"] = "cpu (dry run)"
    nvcc = shutil.which("nvcc")
    if nvcc:
        env["nvcc"] = run_child([nvcc, "--version"], 30)["output"].strip().splitlines()[-1]
    lib = NativeLibrary(str(args.lib))  # raises unless the params layout matches the mirror
    env["layout"] = {"params_size": ctypes.sizeof(AttentionParams), "match": True,
                     "has_cuda_entry": lib.has_cuda}
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        env["onnxruntime"] = {"version": ort.__version__, "providers": providers,
                              "cuda_ep": "CUDAExecutionProvider" in providers}
        env["onnxruntime"]["session_providers"] = ort_session_providers(ort)
    except Exception as exc:
        env["onnxruntime"] = {"error": repr(exc)}
    return env


def ort_session_providers(ort: Any) -> Any:
    """Providers a real session gets when asked for CUDA first (listing is not using)."""
    try:
        from onnx import TensorProto, helper

        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        return session.get_providers()
    except Exception as exc:
        return repr(exc)


def summarize(report: Dict[str, Any]) -> List[str]:
    """A few lines for stdout (the device tool returns only the output's tail)."""
    lines = [f"device: {report['environment'].get('device')}  layout match: "
             f"{report['environment'].get('layout', {}).get('match')}"]
    cases = (report.get("correctness") or {}).get("cases", [])
    failed = [c for c in cases if not c.get("passed")]
    lines.append(f"correctness: {len(cases) - len(failed)}/{len(cases)} passed")
    for c in failed[:8]:
        lines.append(f"  FAIL {c['case']} err={c.get('max_abs')} bound={c.get('bound')} "
                     f"{c.get('error', '')}")
    for name, s in (report.get("sanitizer") or {}).items():
        if isinstance(s, dict):
            lines.append(f"{name}: errors={s.get('errors')} hazards={s.get('hazards')} "
                         f"rc={s.get('rc')} {s.get('seconds')}s timed_out={s.get('timed_out')}")
    for r in (report.get("benchmark") or {}).get("rows", []):
        if "ours_tflops" in r:
            lines.append(f"bench D={r['head_dim']:3d} N={r['seq']:5d} causal={r['causal']!s:5} "
                         f"ours {r['ours_tflops']:7.1f} TFLOP/s  torch {r['torch_tflops']:7.1f}  "
                         f"ratio {r['ours_tflops'] / r['torch_tflops']:.2f}")
        else:
            lines.append(f"bench {r}")
    lines.extend(f"phase error: {e}" for e in report["errors"])
    return lines


def orchestrate(args: argparse.Namespace) -> int:
    """Run every phase in a child process and write the report after each one."""
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    report: Dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "errors": [],
                              "phase_seconds": {}}
    try:
        report["environment"] = environment(args)
    except Exception as exc:
        report["environment"] = {}
        report["errors"].append(f"environment: {exc!r}")
    if args.build_log and Path(args.build_log).exists():
        report["build_log_tail"] = Path(args.build_log).read_text(errors="replace")[-4000:]
    write_json(args.out, report)

    phases = [("correctness", args.correctness_timeout), ("benchmark", args.bench_timeout)]
    for phase, timeout_s in phases:
        if phase in args.skip:
            continue
        child_json = work / f"{phase}.json"
        child_json.unlink(missing_ok=True)
        run = run_child(phase_command(args, phase, child_json), timeout_s)
        report["phase_seconds"][phase] = run["seconds"]
        report[phase] = json.loads(child_json.read_text()) if child_json.exists() else None
        if run["rc"] != 0:
            report["errors"].append(f"{phase}: rc={run['rc']} {run['output'][-2000:]}")
        write_json(args.out, report)
    if "sanitizer" not in args.skip:
        start = time.perf_counter()
        try:
            report["sanitizer"] = run_sanitizers(args, work)
        except Exception as exc:
            report["errors"].append(f"sanitizer: {exc!r}")
        report["phase_seconds"]["sanitizer"] = round(time.perf_counter() - start, 2)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    lines = summarize(report)
    report["summary"] = lines
    write_json(args.out, report)
    print("\n".join(lines))
    print(f"report: {args.out}")
    return 0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line arguments (children get --phase and --phase-json)."""
    default_out = Path(os.environ.get("OUT", ".")) / "gpu_report.json"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", type=Path, default=os.environ.get(LIBRARY_ENV),
                        help=f"libflash_export.so to test (default: ${LIBRARY_ENV})")
    parser.add_argument("--out", type=Path, default=default_out,
                        help="report path (default: $OUT/gpu_report.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help="rehearse on the CPU through the CPU entry point (default: off)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["correctness", "benchmark", "sanitizer"],
                        help="phases to leave out (default: none)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/flash_export_gpu_check"),
                        help="scratch folder for the phases' files (default: "
                             "/tmp/flash_export_gpu_check)")
    parser.add_argument("--build-log", type=Path, default=None,
                        help="build log whose tail goes into the report (default: none)")
    parser.add_argument("--correctness-timeout", type=float, default=120.0,
                        help="seconds for the correctness phase (default: 120)")
    parser.add_argument("--bench-timeout", type=float, default=120.0,
                        help="seconds for the benchmark phase (default: 120)")
    parser.add_argument("--sanitizer-timeout", type=float, default=75.0,
                        help="seconds for each compute-sanitizer tool (default: 75)")
    parser.add_argument("--phase", default="all",
                        choices=["all", "correctness", "benchmark", "sanitize-target"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--phase-json", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lib is None:
        parser.error(f"--lib or ${LIBRARY_ENV} is required")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: the orchestrator, or one phase when run as a child."""
    args = parse_args(argv)
    args.lib = args.lib.resolve()
    if args.phase == "all":
        return orchestrate(args)
    phase_fn = {"correctness": phase_correctness, "benchmark": phase_benchmark,
                "sanitize-target": phase_sanitize_target}[args.phase]
    phase_fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Our custom op against onnxruntime's and PyTorch's attention, interleaved, in one process.

Times, on the same inputs: the `custom` target (com.flash_export::FlashAttention), the `contrib`
target (com.microsoft::MultiHeadAttention), the `attention23` target (ONNX Attention, opset 23),
the `standard` target (ONNX Loop) and torch SDPA. The graphs are attention only: the model's four
projections are skipped by a wrapper that calls the layer's `attend` (`bench.attention_only`),
so no MatMul of the projections dilutes the ratios (if a target cannot export that, the whole
module is timed instead and the table says so). Timing, runners and memory measurement are
flash_export.bench's.

    python benchmarks/compare_attention.py            # N = 512, 1024, 4096, 8192 (long on a laptop)
    python benchmarks/compare_attention.py --quick    # N = 128, 256 (CI)

Reported: median latency, ratio to the custom op (median over repeats of per-repeat medians; > 1
means slower than custom), attention GFLOP/s (4*B*H*Lq*Lk*D, dense), the custom op's float16 time
against its float32 time (both timed in the same loop), the 1-vs-2-thread scaling of the custom
op, and the peak RSS growth of one forward (fresh subprocess) for custom and standard. Each
iteration runs the backends in a freshly shuffled order; lengths below 2048 get proportionally
more iterations (`--iters` x 2048 / N), so every cell rests on a similar amount of time.
"""

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from flash_export.bench import (
    Job,
    attention_flops,
    attention_only,
    environment,
    make_runner,
    measure_memory,
    time_interleaved,
)
from flash_export.errors import summary
from flash_export.spec import ModelSpec

EMBED, HEADS, BATCH = 512, 8, 1
ONNX_TARGETS = ("custom", "contrib", "attention23", "standard")


def export_attention_only(spec: ModelSpec, target: str, dtype: str,
                          out_dir: Path) -> Tuple[Optional[str], str]:
    """Export an attention-only graph; (path, note) or (None, error)."""
    from flash_export.onnx_export import export_onnx

    out = out_dir / f"{target}_{int(spec.causal)}_{dtype}.onnx"
    try:
        export_onnx(attention_only(spec.build()), out, target=target, dtype=dtype, spec=spec)
        return str(out), "attention only"
    except Exception as exc:  # fall back to the whole module, projections included
        note = f"whole module (attention-only export failed: {summary(exc)})"
    try:
        export_onnx(spec.build(), out, target=target, dtype=dtype, spec=spec)
        return str(out), note
    except Exception as exc:  # this target cannot export here at all
        return None, f"export failed: {summary(exc)}"


def iters_for(n: int, iters: int) -> int:
    """Timed iterations per repeat at length n: short runs get more, for a similar total time."""
    return iters * max(1, 2048 // max(n, 1))


def ratio_cell(mine: List[float], base: List[float]) -> float:
    """Median over repeats of mine/base per-repeat medians."""
    return float(np.median([m / b for m, b in zip(mine, base)]))


def compare(sizes: List[int], causal: bool, dtype: str, args: argparse.Namespace,
            tmp: Path) -> None:
    spec = ModelSpec(embed=EMBED, heads=HEADS, chunk=args.chunk, causal=causal)
    files: Dict[str, Tuple[Optional[str], str]] = {
        t: export_attention_only(spec, t, dtype, tmp) for t in ONNX_TARGETS}
    print(f"\n## causal={causal} dtype={dtype}")
    for t, (_, note) in files.items():
        if note != "attention only":
            print(f"   note: {t}: {note}")
    names = list(ONNX_TARGETS) + ["sdpa"]
    print(f"{'N':>6}  " + "  ".join(f"{n:>24}" for n in names))
    for n in sizes:
        runners = {}
        errors: Dict[str, str] = {}
        for name in names:
            job = Job(backend=name, device="cpu", batch=BATCH, seq_q=n, seq_k=n, embed=EMBED,
                      threads=args.threads, dtype=dtype, file=files.get(name, (None, ""))[0],
                      spec_json=spec.to_json(), attention_only=True)
            if name in files and files[name][0] is None:
                errors[name] = files[name][1]
                continue
            try:
                runners[name] = make_runner(job)
            except Exception as exc:  # a backend that cannot run here is one cell
                errors[name] = summary(exc)
        samples, run_errors = time_interleaved(runners, warmup=1,
                                               iters=iters_for(n, args.iters),
                                               repeats=args.repeats)
        errors.update(run_errors)
        flops = attention_flops(BATCH, n, n, EMBED, HEADS, projections=False)
        medians = {k: [float(np.median(r)) for r in reps if r] for k, reps in samples.items()
                   if k not in errors}
        base = medians.get("custom")
        cells = []
        for name in names:
            if name in errors or not medians.get(name):
                cells.append(f"{'n/a':>24}")
                continue
            med = float(np.median(medians[name]))
            ratio = ratio_cell(medians[name], base) if base else float("nan")
            cells.append(f"{med * 1e3:9.2f}ms x{ratio:5.2f} {flops / med / 1e9:6.1f}GF")
        print(f"{n:>6}  " + "  ".join(cells), flush=True)
        for name, err in errors.items():
            print(f"        {name}: {err}")


def half_vs_single(sizes: List[int], args: argparse.Namespace, tmp: Path) -> None:
    """The custom op on float16 against float32 inputs, both timed in one interleaved loop."""
    print("\n## custom op float16 vs float32, timed side by side (attention only)")
    print(f"{'N':>6}  {'causal':>6}  {'float32':>10}  {'float16':>10}  float16 time / float32 time")
    for causal in (False, True):
        spec = ModelSpec(embed=EMBED, heads=HEADS, chunk=args.chunk, causal=causal)
        files = {dt: export_attention_only(spec, "custom", dt, tmp)
                 for dt in ("float32", "float16")}
        if any(path is None for path, _ in files.values()):
            print(f"   causal={causal}: " + "; ".join(note for _, note in files.values()))
            continue
        for n in sizes:
            runners = {dt: make_runner(Job(backend="custom", device="cpu", batch=BATCH, seq_q=n,
                                           seq_k=n, embed=EMBED, threads=args.threads, dtype=dt,
                                           file=path))
                       for dt, (path, _) in files.items()}
            samples, errors = time_interleaved(runners, warmup=1, iters=iters_for(n, args.iters),
                                               repeats=args.repeats)
            if errors:
                print(f"{n:>6}  {causal!s:>6}  "
                      + "; ".join(f"{k}: {e}" for k, e in errors.items()))
                continue
            med = {k: [float(np.median(r)) for r in v] for k, v in samples.items()}
            print(f"{n:>6}  {causal!s:>6}  {np.median(med['float32']) * 1e3:8.2f}ms  "
                  f"{np.median(med['float16']) * 1e3:8.2f}ms  "
                  f"x{ratio_cell(med['float16'], med['float32']):.2f}", flush=True)


def thread_scaling(n: int, args: argparse.Namespace, tmp: Path) -> None:
    spec = ModelSpec(embed=EMBED, heads=HEADS, chunk=args.chunk)
    path, note = export_attention_only(spec, "custom", "float32", tmp)
    print(f"\n## custom op thread scaling, N={n}, float32 ({note})")
    if path is None:
        return
    runners = {f"{t} thread(s)": make_runner(Job(backend="custom", device="cpu", batch=BATCH,
                                                 seq_q=n, seq_k=n, embed=EMBED, threads=t,
                                                 dtype="float32", file=path))
               for t in (1, 2)}
    samples, errors = time_interleaved(runners, warmup=1, iters=args.iters, repeats=args.repeats)
    med = {k: float(np.median([np.median(r) for r in v if r])) for k, v in samples.items()
           if k not in errors}
    for k, v in med.items():
        print(f"   {k}: {v * 1e3:.2f} ms")
    if len(med) == 2:
        print(f"   speed-up 2 vs 1 thread: x{med['1 thread(s)'] / med['2 thread(s)']:.2f}")
    for k, e in errors.items():
        print(f"   {k}: {e}")


def peak_memory(n: int, args: argparse.Namespace, tmp: Path) -> None:
    spec = ModelSpec(embed=EMBED, heads=HEADS, chunk=args.chunk)
    print(f"\n## peak RSS growth of one forward, N={n}, float32, fresh subprocess each")
    for target in ("custom", "standard"):
        path, note = export_attention_only(spec, target, "float32", tmp)
        if path is None:
            print(f"   {target}: {note}")
            continue
        mem = measure_memory(Job(backend=target, device="cpu", batch=BATCH, seq_q=n, seq_k=n,
                                 embed=EMBED, threads=args.threads, dtype="float32", file=path))
        shown = (f"{mem['peak_rss_mb']:.1f} MB" if "peak_rss_mb" in mem else mem["error"])
        print(f"   {target:<9} {shown} ({note})")
    print(f"   for scale: one float32 (H, N, N) score matrix is {HEADS * n * n * 4 / 2**20:.0f} MB")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small N for CI (default: off)")
    parser.add_argument("--threads", type=int, default=1, help="threads per backend (default 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per repeat "
                                                                 "(default 5, quick 3)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 3, quick 2)")
    parser.add_argument("--chunk", type=int, default=64, help="chunk size (default 64)")
    parser.add_argument("--dtypes", default="float32,float16",
                        help="comma-separated (default float32,float16)")
    args = parser.parse_args(argv)
    args.iters = args.iters or (3 if args.quick else 5)
    args.repeats = args.repeats or (2 if args.quick else 3)
    sizes = [128, 256] if args.quick else [512, 1024, 4096, 8192]
    env = environment(args.threads)
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"# compare_attention  {now}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"# {platform.platform()}, {env['cpu_count']} CPUs; torch {env['torch']}, onnxruntime "
          f"{env['onnxruntime']}, flash-export {env['flash_export']}")
    print(f"# E={EMBED} H={HEADS} D={EMBED // HEADS} B={BATCH} chunk={args.chunk}, "
          f"threads {args.threads} (ORT spinning off); warmup 1, {args.iters} iters x "
          f"{args.repeats} repeats (N < 2048: iters x 2048/N), interleaved in an order shuffled "
          f"per iteration; cell = median, ratio to custom (>1 slower), attention GFLOP/s "
          f"(4*B*H*N*N*D, causal not halved)")
    with tempfile.TemporaryDirectory(prefix="compare_attention_") as tmp:
        for dtype in [d for d in args.dtypes.split(",") if d]:
            for causal in (False, True):
                compare(sizes, causal, dtype, args, Path(tmp))
        if {"float32", "float16"} <= set(args.dtypes.split(",")):
            half_vs_single(sizes, args, Path(tmp))
        thread_scaling(256 if args.quick else 4096, args, Path(tmp))
        peak_memory(2048 if args.quick else 16384, args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())

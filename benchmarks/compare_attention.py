"""Our custom op against onnxruntime's and PyTorch's attention, interleaved, in one process.

Times, on the same inputs: the `custom` target (com.flash_export::FlashAttention), the `contrib`
target (com.microsoft::MultiHeadAttention), the `attention23` target (ONNX Attention, opset 23),
the `standard` target (ONNX Loop) and torch SDPA. The graphs are attention only: the model's four
projections are skipped by a wrapper that calls the layer's `attend` (`runners.attention_only`),
so no MatMul of the projections dilutes the ratios (if a target cannot export that, the whole
module is timed instead and the table says so). Timing, runners and memory measurement are
flash_export.bench's.

    python benchmarks/compare_attention.py            # N = 512, 1024, 4096, 8192 (long on a laptop)
    python benchmarks/compare_attention.py --quick    # N = 128, 256 (a smoke run)

Reported: median latency, ratio to the custom op (median over all iterations of the time divided
by custom's in the same iteration; > 1 means slower than custom), attention GFLOP/s
(4*B*H*Lq*Lk*D, dense); then, each pair timed in its own interleaved loop, the custom op's
speed-up from float32 to float16, from non-causal to causal and from 1 thread to 2; and the peak
RSS growth of one forward (fresh subprocess) for custom and standard. Each iteration runs the
backends in a freshly shuffled order; lengths below 2048 get proportionally more iterations
(`--iters` x 2048 / N), so every cell rests on a similar amount of time.
"""

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from flash_export.errors import summary
from flash_export.runners import Job, attention_only, make_runner
from flash_export.spec import ModelSpec
from flash_export.timing import attention_flops, environment, measure_memory, time_interleaved

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


def paired_ratio(mine: List[List[float]], base: List[List[float]]) -> float:
    """Median over every iteration of mine/base, the two timed in the same iteration.

    samples[repeat][iteration] as time_interleaved returns them: each iteration runs every backend
    once, close together in time, so the pair sees the same machine; a drift between iterations
    cancels out of the ratio.
    """
    ratios = [m / b for rm, rb in zip(mine, base) for m, b in zip(rm, rb)]
    return float(np.median(ratios)) if ratios else float("nan")


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
        base = samples.get("custom") if "custom" in medians else None
        cells = []
        for name in names:
            if name in errors or not medians.get(name):
                cells.append(f"{'n/a':>24}")
                continue
            med = float(np.median(medians[name]))
            ratio = paired_ratio(samples[name], base) if base else float("nan")
            cells.append(f"{med * 1e3:9.2f}ms x{ratio:5.2f} {flops / med / 1e9:6.1f}GF")
        print(f"{n:>6}  " + "  ".join(cells), flush=True)
        for name, err in errors.items():
            print(f"        {name}: {err}")


Variant = Tuple[str, bool, str, int]  # (label, causal, dtype, threads) of the custom op


def custom_side_by_side(title: str, a: Variant, b: Variant, sizes: List[int],
                        args: argparse.Namespace, tmp: Path) -> None:
    """Two variants of the custom op timed in one interleaved loop: times, then b's speed-up."""
    print(f"\n## custom op: {title}, timed side by side (attention only)")
    print(f"{'N':>6}  {a[0]:>12}  {b[0]:>12}  speed-up of {b[0]}: {a[0]} time / {b[0]} time "
          f"(median of paired iterations)")
    files = {}
    for label, causal, dtype, _ in (a, b):
        spec = ModelSpec(embed=EMBED, heads=HEADS, chunk=args.chunk, causal=causal)
        files[label] = export_attention_only(spec, "custom", dtype, tmp)
    if any(path is None for path, _ in files.values()):
        print("   " + "; ".join(note for _, note in files.values()))
        return
    for n in sizes:
        runners = {label: make_runner(Job(backend="custom", device="cpu", batch=BATCH, seq_q=n,
                                          seq_k=n, embed=EMBED, threads=threads, dtype=dtype,
                                          file=files[label][0]))
                   for label, _, dtype, threads in (a, b)}
        samples, errors = time_interleaved(runners, warmup=1, iters=iters_for(n, args.iters),
                                           repeats=args.repeats)
        if errors:
            print(f"{n:>6}  " + "; ".join(f"{k}: {e}" for k, e in errors.items()))
            continue
        med = {k: float(np.median([np.median(r) for r in v])) for k, v in samples.items()}
        print(f"{n:>6}  {med[a[0]] * 1e3:10.2f}ms  {med[b[0]] * 1e3:10.2f}ms  "
              f"x{paired_ratio(samples[a[0]], samples[b[0]]):.2f}", flush=True)


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
          f"per iteration; cell = median, ratio to custom in the same iteration (median; >1 "
          f"slower), attention GFLOP/s "
          f"(4*B*H*N*N*D, causal not halved)")
    with tempfile.TemporaryDirectory(prefix="compare_attention_") as tmp:
        for dtype in [d for d in args.dtypes.split(",") if d]:
            for causal in (False, True):
                compare(sizes, causal, dtype, args, Path(tmp))
        t = args.threads
        if {"float32", "float16"} <= set(args.dtypes.split(",")):
            for causal in (False, True):
                custom_side_by_side(f"float16 vs float32, causal={causal}",
                                    ("float32", causal, "float32", t),
                                    ("float16", causal, "float16", t), sizes, args, Path(tmp))
        custom_side_by_side("causal vs non-causal, float32", ("non-causal", False, "float32", t),
                            ("causal", True, "float32", t), sizes, args, Path(tmp))
        custom_side_by_side("2 threads vs 1, float32", ("1 thread", False, "float32", 1),
                            ("2 threads", False, "float32", 2), [256 if args.quick else 4096],
                            args, Path(tmp))
        peak_memory(2048 if args.quick else 16384, args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Our custom op against the fastest stock attention over head dims, lengths and batches, one run.

For every cell (D, N, B, causal) of the matrix (H = 8, Lq = Lk = N), the attention alone (the
model's projections skipped: `runners.attention_only`) runs as: the `custom` target
(com.flash_export::FlashAttention), the `contrib` target (com.microsoft::MultiHeadAttention), the
`attention23` target (ONNX Attention, opset 23) and PyTorch SDPA. Then decode shapes (Lq = 1),
and, each in its own interleaved loop, 2 threads against 1 and the peak RSS of one long forward.

    python benchmarks/compare_attention.py --threads 2            # the whole matrix (long)
    python benchmarks/compare_attention.py --threads 2 --quick    # a reduced matrix (a minute)
    python benchmarks/compare_attention.py --dims 64 --lengths 256 --batches 8 --no-extras
    python benchmarks/compare_attention.py --baseline-library OLD/libflash_export.so  # A/B

Timing (`flash_export.bench.timing.time_blocks`): a sample is one untimed call, then a block of
back-to-back calls of one backend (about --target-ms long), per-call time = block time / calls;
each repetition runs the backends' blocks in a freshly shuffled order. A single call timed right
after a PyTorch call pays for PyTorch's still-spinning OpenMP threads; blocks do not.

Reported per cell: custom's median time and GFLOP/s (4*B*H*N*N*D, causal not halved); each
anchor's time divided by custom's in the same repetition (median over repetitions; > 1: custom is
faster); `best` = the fastest anchor's time / custom's, per repetition, then the median: the
figure the summary grid shows. At D = 64 custom float16 runs in the same loop (f16/f32: its time
divided by float32's; <= 1: float16 no slower), and in the D = 64, N = 256, B = 8 cells a float32
matmul does too (custom's GFLOP/s over the matmul's, `of sgemm`). With --baseline-library, the
custom op built from another library (an older build) runs in the same loop too: `base/new` is
its time over custom's (> 1: this build is faster), and a second summary grid gives its own
fastest-anchor figure, measured beside this build's.
"""

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from flash_export.bench.memory import measure_memory
from flash_export.bench.runners import Job, attention_only, make_runner
from flash_export.bench.timing import attention_flops, environment, time_blocks
from flash_export.core.errors import summary
from flash_export.nn.spec import ModelSpec

HEADS = 8
ANCHORS = ("sdpa", "contrib", "attention23")
ONNX_TARGETS = ("custom", "contrib", "attention23")
SGEMM = 1024  # the matmul timed beside custom: (SGEMM, SGEMM) @ (SGEMM, SGEMM), float32
# The stock onnxruntime operators materialise the (B, H, Lq, Lk) scores: cells past this many
# bytes of them are not run (n/a), on a machine whose memory is shared.
MAX_SCORE_BYTES = 2 << 30


def export_attention_only(spec: ModelSpec, target: str, dtype: str,
                          out_dir: Path) -> Tuple[Optional[str], str]:
    """Export an attention-only graph; (path, note) or (None, error)."""
    from flash_export.export.onnx import export_onnx

    out = out_dir / f"{target}_e{spec.embed}_{int(spec.causal)}_{dtype}.onnx"
    try:
        export_onnx(attention_only(spec.build()), out, target=target, dtype=dtype, spec=spec)
        return str(out), "attention only"
    except Exception as exc:  # this target cannot export here: its cells are n/a
        return None, f"export failed: {summary(exc)}"


def paired_ratios(mine: List[float], base: List[float]) -> List[float]:
    """mine[i] / base[i] for the repetitions both have (time_blocks ran them in the same one)."""
    return [m / b for m, b in zip(mine, base)]


def best_anchor_ratios(samples: Dict[str, List[float]], anchors: Tuple[str, ...],
                       custom: str = "custom") -> List[float]:
    """Per repetition, the fastest anchor's time over custom's (> 1: custom is faster)."""
    present = [a for a in anchors if samples.get(a)]
    reps = min([len(samples.get(custom, []))] + [len(samples[a]) for a in present])
    if not present:
        return []
    return [min(samples[a][i] for a in present) / samples[custom][i] for i in range(reps)]


def median(values: List[float]) -> float:
    """Median, NaN when empty."""
    return float(np.median(values)) if values else float("nan")


def sgemm_runner(threads: int) -> Callable[[], None]:
    """A float32 matmul of SGEMM^3 on `threads` threads: the machine's dense rate, same run."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(SGEMM, SGEMM), torch.randn(SGEMM, SGEMM)

    def run() -> None:
        torch.mm(a, b)

    return run


class Matrix:
    """Exports (cached per head dim, causal and dtype) and runs the cells; collects the grid."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.files: Dict[Tuple[str, int, bool, str], Tuple[Optional[str], str]] = {}
        self.grid: Dict[Tuple[int, int, int, bool], float] = {}  # (D, N, B, causal) -> best
        self.f16: Dict[Tuple[int, int, int, bool], float] = {}
        self.base_grid: Dict[Tuple[int, int, int, bool], float] = {}  # the baseline's best

    def spec(self, dim: int, causal: bool) -> ModelSpec:
        return ModelSpec(embed=HEADS * dim, heads=HEADS, chunk=self.args.chunk, causal=causal)

    def file(self, target: str, dim: int, causal: bool, dtype: str) -> Tuple[Optional[str], str]:
        key = (target, dim, causal, dtype)
        if key not in self.files:
            self.files[key] = export_attention_only(self.spec(dim, causal), target, dtype,
                                                    self.tmp)
        return self.files[key]

    def runners(self, dim: int, seq_q: int, seq_k: int, batch: int, causal: bool,
                extra: Tuple[str, ...]) -> Tuple[Dict[str, Callable[[], None]], Dict[str, str]]:
        runners: Dict[str, Callable[[], None]] = {}
        errors: Dict[str, str] = {}
        scores = batch * HEADS * seq_q * seq_k * 4
        spec = self.spec(dim, causal)
        names = ("custom",) + ANCHORS + extra
        for name in names:
            backend, dtype = ("custom", "float16") if name == "custom_f16" else (name, "float32")
            if name == "base":
                backend = "custom"
            if name == "sgemm":
                runners[name] = sgemm_runner(self.args.threads)
                continue
            if backend in ("contrib", "attention23") and scores > MAX_SCORE_BYTES:
                errors[name] = f"skipped: its scores take {scores / 2**30:.0f} GiB"
                continue
            path: Optional[str] = None
            if backend in ONNX_TARGETS:
                path, note = self.file(backend, dim, causal, dtype)
                if path is None:
                    errors[name] = note
                    continue
            job = Job(backend=backend, device="cpu", batch=batch, seq_q=seq_q, seq_k=seq_k,
                      embed=HEADS * dim, threads=self.args.threads, dtype=dtype, file=path,
                      spec_json=spec.to_json(), attention_only=True)
            try:
                runners[name] = (baseline_runner(job, self.args.baseline_library)
                                 if name == "base" else make_runner(job))
            except Exception as exc:  # a backend that cannot run here is one cell
                errors[name] = summary(exc)
        return runners, errors

    def cell(self, dim: int, seq_q: int, seq_k: int, batch: int, causal: bool) -> None:
        extra: Tuple[str, ...] = ()
        if dim == 64 and not self.args.no_f16:
            extra += ("custom_f16",)
        if (dim, seq_q, seq_k, batch) == (64, 256, 256, 8):
            extra += ("sgemm",)
        if self.args.baseline_library:
            extra += ("base",)
        runners, errors = self.runners(dim, seq_q, seq_k, batch, causal, extra)
        samples, run_errors = time_blocks(runners, repeats=self.args.repeats,
                                          target_s=self.args.target_ms / 1e3)
        errors.update(run_errors)
        flops = attention_flops(batch, seq_q, seq_k, HEADS * dim, HEADS, projections=False)
        custom = samples.get("custom", [])
        cells = [f"{dim:>4} {seq_q:>5} {seq_k:>5} {batch:>3}"]
        if not custom:
            print("  ".join(cells) + f"  custom: {errors.get('custom', 'no samples')}")
            return
        t = median(custom)
        cells.append(f"{t * 1e3:10.3f}ms {flops / t / 1e9:6.1f}GF")
        for a in ANCHORS:
            r = median(paired_ratios(samples.get(a, []), custom))
            cells.append(f"{a} x{r:5.2f}" if samples.get(a) else f"{a}   n/a")
        best = median(best_anchor_ratios(samples, ANCHORS))
        self.grid[(dim, seq_q, batch, causal)] = best
        cells.append(f"best x{best:5.2f}")
        if samples.get("base"):
            cells.append(f"base/new x{median(paired_ratios(samples['base'], custom)):5.2f}")
            self.base_grid[(dim, seq_q, batch, causal)] = median(
                best_anchor_ratios(samples, ANCHORS, custom="base"))
        if samples.get("custom_f16"):
            r16 = median(paired_ratios(samples["custom_f16"], custom))
            self.f16[(dim, seq_q, batch, causal)] = r16
            cells.append(f"f16/f32 {r16:4.2f}")
        if samples.get("sgemm"):
            rate = [2.0 * SGEMM**3 / s for s in samples["sgemm"]]
            mine = [flops / c for c in custom]
            cells.append(f"of sgemm {median(paired_ratios(mine, rate)):4.2f} "
                         f"({median(rate) / 1e9:.0f}GF)")
        print("  ".join(cells), flush=True)
        for name, err in errors.items():
            print(f"      {name}: {err}")


def baseline_runner(job: Job, library: str) -> Callable[[], None]:
    """make_runner(job) with the custom op from `library`: its session registers that file."""
    from flash_export.runtime import LIBRARY_ENV

    saved = os.environ.get(LIBRARY_ENV)
    os.environ[LIBRARY_ENV] = library
    try:
        return make_runner(job)
    finally:
        if saved is None:
            del os.environ[LIBRARY_ENV]
        else:
            os.environ[LIBRARY_ENV] = saved


def print_grid(matrix: Matrix, dims: List[int], lengths: List[int], batches: List[int]) -> None:
    """The summary: fastest anchor's time / custom's per cell (> 1: custom is faster)."""
    grids = [("custom", matrix.grid)]
    if matrix.base_grid:
        grids.append(("baseline library (same run)", matrix.base_grid))
    for label, grid in grids:
        for causal in (False, True):
            print(f"\n## best anchor / {label}, causal={causal} (columns N/B)")
            cols = [(n, b) for n in lengths for b in batches]
            print(f"{'D':>4}  " + "  ".join(f"{f'{n}/{b}':>9}" for n, b in cols))
            for d in dims:
                vals = [grid.get((d, n, b, causal), float("nan")) for n, b in cols]
                print(f"{d:>4}  " + "  ".join(f"{v:9.2f}" for v in vals))


def threads_side_by_side(n: int, args: argparse.Namespace, matrix: Matrix) -> None:
    """Custom at 1 and at `args.threads` threads, D = 64, in one interleaved loop."""
    path, note = matrix.file("custom", 64, False, "float32")
    if path is None:
        print(f"   {note}")
        return
    runners = {t: make_runner(Job(backend="custom", device="cpu", batch=1, seq_q=n, seq_k=n,
                                  embed=HEADS * 64, threads=t, dtype="float32", file=path))
               for t in sorted({1, args.threads})}
    samples, _ = time_blocks({str(k): v for k, v in runners.items()}, repeats=args.repeats,
                             target_s=args.target_ms / 1e3)
    one, many = samples["1"], samples[str(args.threads)]
    print(f"\n## custom, D=64 N={n} B=1 non-causal: 1 thread {median(one) * 1e3:.1f} ms, "
          f"{args.threads} threads {median(many) * 1e3:.1f} ms, speed-up "
          f"x{median(paired_ratios(one, many)):.2f}")


def peak_memory(n: int, args: argparse.Namespace, matrix: Matrix) -> None:
    """Peak RSS growth of one custom forward at N = n (fresh subprocess) against its output."""
    path, note = matrix.file("custom", 64, False, "float32")
    if path is None:
        print(f"   {note}")
        return
    mem = measure_memory(Job(backend="custom", device="cpu", batch=1, seq_q=n, seq_k=n,
                             embed=HEADS * 64, threads=args.threads, dtype="float32", file=path))
    output_mb = n * HEADS * 64 * 4 / 2**20
    shown = (f"{mem['peak_rss_mb']:.1f} MB = {mem['peak_rss_mb'] / output_mb:.2f} x the output "
             f"({output_mb:.0f} MB)" if "peak_rss_mb" in mem else mem["error"])
    print(f"\n## peak RSS growth of one custom forward, D=64 N={n} B=1 float32: {shown}")


def ints(text: str) -> List[int]:
    """'16,64' -> [16, 64]."""
    return [int(x) for x in text.split(",") if x]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="reduced matrix: D 16,64; N 128; B 1,8; decode Lk 1024; "
                             "no extras (default: off)")
    parser.add_argument("--dims", default="16,32,64,128", help="head dims (default 16,32,64,128)")
    parser.add_argument("--lengths", default="128,256,512,1024,4096",
                        help="N = Lq = Lk (default 128,256,512,1024,4096)")
    parser.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    parser.add_argument("--decode", default="1024,8192",
                        help="decode Lk at Lq=1, B=8, D=64; empty for none (default 1024,8192)")
    parser.add_argument("--causal", default="0,1", help="0 and/or 1 (default 0,1)")
    parser.add_argument("--threads", type=int, default=2, help="threads per backend (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="repetitions (default 7)")
    parser.add_argument("--target-ms", type=float, default=30.0,
                        help="length of one timed block of calls (default 30)")
    parser.add_argument("--chunk", type=int, default=64, help="chunk size (default 64)")
    parser.add_argument("--baseline-library", default=None,
                        help="another libflash_export.so whose custom op runs in the same loop "
                             "(default: none)")
    parser.add_argument("--no-f16", action="store_true",
                        help="skip custom float16 at D = 64 (default: off)")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip 1-vs-2 threads at N=4096 and peak RSS at N=16384 "
                             "(default: off)")
    args = parser.parse_args(argv)
    if args.quick:
        args.dims, args.lengths, args.batches, args.decode = "16,64", "128", "1,8", "1024"
        args.no_extras = True
        args.repeats = min(args.repeats, 5)
    dims, lengths, batches = ints(args.dims), ints(args.lengths), ints(args.batches)
    env = environment(args.threads)
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"# compare_attention  {now}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"# {platform.platform()}, {env['cpu_count']} CPUs; torch {env['torch']}, onnxruntime "
          f"{env['onnxruntime']}, flash-export {env['flash_export']}")
    print(f"# H={HEADS}, Lq=Lk=N, attention only, float32, threads {args.threads}; sample = one "
          f"untimed call + a block of ~{args.target_ms:g} ms of calls, {args.repeats} repetitions "
          f"in shuffled orders; ratios = anchor time / custom time per repetition, median")
    with tempfile.TemporaryDirectory(prefix="compare_attention_") as tmp:
        matrix = Matrix(args, Path(tmp))
        for causal in [bool(int(c)) for c in args.causal.split(",") if c]:
            print(f"\n## causal={causal}\n{'D':>4} {'Lq':>5} {'Lk':>5} {'B':>3}  "
                  f"{'custom':>10}")
            for d in dims:
                for n in lengths:
                    for b in batches:
                        matrix.cell(d, n, n, b, causal)
        decode = ints(args.decode)
        if decode:
            print(f"\n## decode: Lq=1, B=8, D=64\n{'D':>4} {'Lq':>5} {'Lk':>5} {'B':>3}")
            for lk in decode:
                matrix.cell(64, 1, lk, 8, False)
        print_grid(matrix, dims, lengths, batches)
        if not args.no_extras:
            threads_side_by_side(4096, args, matrix)
            peak_memory(16384, args, matrix)
    return 0


if __name__ == "__main__":
    sys.exit(main())

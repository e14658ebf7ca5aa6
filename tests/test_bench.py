"""flash-export bench: interleaved timing, complete JSON/CSV reports, chunk sweep, the plot."""

import csv
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flash_export.bench.benchmark import CSV_FIELDS, BenchConfig, benchmark
from flash_export.bench.runners import cuda_available
from flash_export.bench.timing import attention_flops, time_blocks, time_interleaved
from flash_export.cli.main import main
from flash_export.runtime import library_path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--embed", "32", "--heads", "4", "--chunk", "8"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

try:
    import flash_export.export.onnx  # noqa: F401
    HAVE_ONNX_EXPORT = True
except ImportError:
    HAVE_ONNX_EXPORT = False

try:
    import matplotlib  # noqa: F401
    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


def test_attention_flops_formula():
    # 4*B*H*Lq*Lk*D + 4*B*E^2*(Lq+Lk); with Lq = Lk = L the projections are 8*B*L*E^2.
    assert attention_flops(2, 16, 16, 32, 4) == 4 * 2 * 4 * 16 * 16 * 8 + 8 * 2 * 16 * 32 ** 2
    assert attention_flops(1, 3, 5, 8, 2, projections=False) == 4 * 2 * 3 * 5 * 4


class _FakeClock:
    """perf_counter for flash_export.bench.timing: each call of a runner advances it by the runner's
    cost, plus a penalty when another runner ran just before (the other runtime's threads still
    spinning), so a sample that includes a first call shows it."""

    PENALTY = 2.0 ** -4  # seconds; all times here are powers of 2: the sums are exact

    def __init__(self, monkeypatch):
        import flash_export.bench.timing as timing

        self.t, self.calls = 0.0, []
        monkeypatch.setattr(timing.time, "perf_counter", lambda: self.t)

    def runner(self, name, cost):
        def run():
            if self.calls and self.calls[-1] != name:
                self.t += self.PENALTY
            self.calls.append(name)
            self.t += cost
        return run


def _runs(calls, sizes, start):
    """Split calls[start:] into the runs of one name, checking each is 1 untimed + a block."""
    runs, i = [], start
    while i < len(calls):
        name = calls[i]
        size = 1 + sizes[name]
        assert calls[i:i + size] == [name] * size, (i, calls[i:i + size])
        runs.append(name)
        i += size
    return runs


def test_time_interleaved_samples_are_block_means_after_an_untimed_call_in_shuffled_orders(
        monkeypatch):
    clock = _FakeClock(monkeypatch)

    def broken():
        raise RuntimeError("cannot run\nsecond line")

    names = ["a", "b", "c"]
    costs = {"a": 2.0 ** -10, "b": 2.0 ** -8, "c": 2.0 ** -9}
    timed = time_interleaved({**{n: clock.runner(n, costs[n]) for n in names}, "x": broken},
                             warmup=1, iters=12, repeats=2, target_s=2.0 ** -7, seed=3)
    assert timed.errors == {"x": "RuntimeError: cannot run second line"}  # one line, whole
    assert timed.samples["x"] == [] and "x" not in timed.blocks
    # auto-sized from the faster of two calls (the first pays the penalty) to ~8 ms
    assert timed.blocks == {"a": 8, "b": 2, "c": 4}
    # each sample is the block's mean: the untimed call before it took the penalty
    for n in names:
        assert [len(rep) for rep in timed.samples[n]] == [12, 12]
        assert [t for rep in timed.samples[n] for t in rep] == pytest.approx([costs[n]] * 24)
    calls = clock.calls
    assert calls[:3 + 6] == names + ["a", "a", "b", "b", "c", "c"]  # warm-up, calibration
    end = 9 + 12 * (3 + 8 + 2 + 4)  # 12 iterations: per runner 1 untimed call + its block
    first = _runs(calls[:end], timed.blocks, 9)
    assert calls[end:end + 3] == names  # repetition 2: warm-up only, blocks keep their size
    iterations = [tuple(r[i:i + 3]) for r in (first, _runs(calls, timed.blocks, end + 3))
                  for i in range(0, len(r), 3)]
    assert len(iterations) == 24 and all(sorted(o) == names for o in iterations)
    # every runner's block follows every other one's at some point: no fixed predecessor
    follows = {(o[i], o[i + 1]) for o in iterations for i in range(2)}
    assert follows == {(x, y) for x in names for y in names if x != y}

    clock.calls.clear()  # seeded: a rerun repeats the orders; a fixed block size is used as is
    again = time_interleaved({n: clock.runner(n, costs[n]) for n in names}, warmup=0, iters=12,
                             repeats=2, block=3, seed=3)
    assert again.blocks == dict.fromkeys(names, 3)
    assert [tuple(r[i:i + 3]) for r in [_runs(clock.calls, again.blocks, 0)]
            for i in range(0, len(r), 3)] == iterations
    assert [t for n in names for rep in again.samples[n] for t in rep] == pytest.approx(
        [costs[n] for n in names for _ in range(24)])


def _compare_attention():
    """The benchmark script as a module, loaded by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("compare_attention",
                                                  BENCHMARKS / "compare_attention.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_blocks_times_blocks_after_an_untimed_call_in_shuffled_orders():
    calls = []
    clock = {"t": 0.0}

    def runner(name, cost):
        def run():
            calls.append(name)
            clock["t"] += cost
        return run

    def broken():
        raise RuntimeError("cannot run")

    import flash_export.bench.timing as timing

    real = timing.time.perf_counter
    timing.time.perf_counter = lambda: clock["t"]  # a fake clock: each call advances it
    try:
        samples, errors = time_blocks({"a": runner("a", 0.001), "b": runner("b", 0.004),
                                       "x": broken}, repeats=20, target_s=0.01, seed=1)
    finally:
        timing.time.perf_counter = real
    assert errors["x"] == "RuntimeError: cannot run" and samples["x"] == []
    # per-call seconds, from blocks of 10 (a) and 2 (b) calls sized to ~10 ms
    assert samples["a"] == pytest.approx([0.001] * 20) and samples["b"] == pytest.approx(
        [0.004] * 20)
    runs, i = [], 2 * 2  # the two calibration calls of a and b come first
    while i < len(calls):  # each sample: one untimed call + the block, all of one runner
        name = calls[i]
        size = 1 + (10 if name == "a" else 2)
        assert calls[i:i + size] == [name] * size
        runs.append(name)
        i += size
    pairs = [tuple(runs[j:j + 2]) for j in range(0, len(runs), 2)]
    assert all(sorted(p) == ["a", "b"] for p in pairs)  # each runner once per repetition
    assert {("a", "b"), ("b", "a")} <= set(pairs)  # in shuffled orders


def test_compare_attention_ratios_pair_samples_of_the_same_repetition():
    ca = _compare_attention()
    # a slow spell in repetition 2 hits both: paired ratios 1, 1, 1 (medians alone would say 10)
    assert ca.paired_ratios([1.0, 10.0, 10.0], [1.0, 10.0, 10.0]) == [1.0, 1.0, 1.0]
    # best anchor per repetition: the fastest of the anchors, over custom's time
    samples = {"custom": [1.0, 2.0], "sdpa": [2.0, 3.0], "contrib": [1.5, 5.0]}
    assert ca.best_anchor_ratios(samples, ("sdpa", "contrib", "attention23")) == [1.5, 1.5]


@pytest.mark.skipif(not (HAVE_ONNX_EXPORT and Path(library_path()).is_file()),
                    reason="needs the ONNX exporter and the native library")
def test_compare_attention_prints_the_matrix_with_ratios(capsys):
    """The script's reduced form: one head dim, one length, one batch, decode, float16, the sgemm
    anchor (D = 64, N = 256, B = 8 is the cell that carries it) and a baseline library (here the
    same build) timed in the same loop."""
    ca = _compare_attention()
    assert ca.main(["--dims", "64", "--lengths", "256", "--batches", "8", "--decode", "64",
                    "--causal", "0", "--repeats", "2", "--target-ms", "1", "--threads", "1",
                    "--no-extras", "--baseline-library", str(library_path())]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()
            if line.startswith("  64 ") and "custom" not in line and len(line.split()) > 4]
    assert [r[1:4] for r in rows] == [["256", "256", "8"], ["1", "64", "8"]]
    for r in rows:
        cells = " ".join(r)
        for anchor in ("sdpa", "contrib", "attention23", "best", "f16/f32", "base/new"):
            assert anchor in cells, cells
        best = re.search(r"best x\s*([0-9.]+)", cells)
        assert best is not None and float(best.group(1)) > 0, cells
    assert "of sgemm" in " ".join(rows[0]) and "of sgemm" not in " ".join(rows[1])
    assert "## best anchor / custom, causal=False (columns N/B)" in out
    assert "## best anchor / baseline library (same run), causal=False (columns N/B)" in out
    grid = out.split("## best anchor / custom, causal=False")[1].splitlines()
    assert grid[2].split()[0] == "64" and float(grid[2].split()[1]) > 0


def _backends():
    names = ["eager", "sdpa", "torchscript"]
    if Path(library_path()).is_file():  # the native operator's kernel
        names.append("native")
    if HAVE_ONNX_EXPORT:
        names.append("standard")
        if Path(library_path()).is_file():
            names.append("custom")
    return names


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib (flash-export[plot]) not installed")
def test_cli_writes_complete_json_csv_and_png(tmp_path):
    backends = _backends()
    out_json, out_csv, out_png = tmp_path / "b.json", tmp_path / "b.csv", tmp_path / "b.png"
    result = CliRunner().invoke(main, [
        "bench", *TINY, "--seq", "8,24", "--iters", "3", "--warmup", "1",
        "--backends", ",".join(backends), "--json", str(out_json), "--csv", str(out_csv),
        "--plot", str(out_png)])
    assert result.exit_code == 0, result.output
    data = json.loads(out_json.read_text())
    assert data["config"]["iters"] == 3 and data["config"]["threads"] == 1
    assert "4*B*H*Lq*Lk*D" in data["flops_formula"] and "shuffled" in data["method"]
    assert {"date", "torch", "onnxruntime", "threads"} <= set(data["environment"])
    rows = data["rows"]
    assert sorted((r["backend"], r["seq_q"]) for r in rows) == sorted(
        (b, s) for b in backends for s in (8, 24))
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None, r
        for key in ("p50_ms", "p90_ms", "p99_ms", "tokens_per_s", "gflops_per_s", "peak_rss_mb"):
            assert r[key] is not None and r[key] >= 0, (key, r)
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["samples"] == 3
        assert 1 <= r["block"] <= 64, r  # auto-sized: a tiny model's block has many calls
    assert "block time / block size; block: auto-sized" in data["method"]
    with open(out_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == CSV_FIELDS and len(table) == len(rows)
    assert all(row["p50_ms"] and row["peak_rss_mb"] for row in table)
    png = out_png.read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 1000
    for name in backends:
        assert name in result.output


def test_chunk_sweep_runs_chunk_free_backends_once():
    from flash_export.nn.spec import ModelSpec

    report = benchmark(spec=ModelSpec(embed=16, heads=2, chunk=8),
                       config=BenchConfig(seqs=(12,), chunks=(4, 16), backends=("eager", "sdpa"),
                                          warmup=0, iters=2, memory=False))
    got = sorted((r.backend, r.chunk) for r in report.rows)
    assert got == [("eager", 4), ("eager", 16), ("sdpa", None)]
    assert all(r.status == "ok" and r.peak_rss_mb is None for r in report.rows)
    assert "not measured" in report.method


@pytest.mark.skipif(not HAVE_ONNX_EXPORT, reason="needs the export extra (onnxscript)")
def test_batch_sweep_times_every_length_at_every_batch():
    from flash_export.nn.spec import ModelSpec

    report = benchmark(spec=ModelSpec(embed=16, heads=2, chunk=8),
                       config=BenchConfig(seqs=(5, 12), batches=(1, 3),
                                          backends=("custom", "eager"), warmup=0, iters=2,
                                          memory=False))
    shapes = sorted((r.backend, r.batch, r.seq_q) for r in report.rows)
    assert shapes == sorted((b, n, s) for b in ("custom", "eager") for n in (1, 3)
                            for s in (5, 12))
    assert all(r.status == "ok" for r in report.rows), [r.error for r in report.rows]
    flops = {(r.backend, r.batch, r.seq_q): r.flops for r in report.rows}
    for backend in ("custom", "eager"):  # the batch reaches the model: 3x the attention work
        assert flops[backend, 3, 12] == pytest.approx(3 * flops[backend, 1, 12])
    lines = CliRunner().invoke(main, ["bench", *TINY, "--seq", "6", "--batch", "1,2", "--iters",
                                      "1", "--warmup", "0", "--no-memory", "--backends",
                                      "eager"])
    assert lines.exit_code == 0, lines.output
    rows = [line.split() for line in lines.output.splitlines() if line.startswith("eager ")]
    assert [(r[2], r[3]) for r in rows] == [("1", "6"), ("2", "6")]


def test_cli_block_option_sets_the_calls_per_timed_sample(tmp_path):
    out = tmp_path / "b.json"
    result = CliRunner().invoke(main, ["bench", *TINY, "--seq", "6", "--iters", "2", "--warmup",
                                       "0", "--block", "5", "--no-memory", "--backends",
                                       "eager,sdpa", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["config"]["block"] == 5 and "block: 5 call(s)" in data["method"]
    # the sizes the timing used, per row: 2 samples of 5 calls each
    assert [(r["backend"], r["block"], r["samples"]) for r in data["rows"]] == [
        ("eager", 5, 2), ("sdpa", 5, 2)]
    assert [line.split()[-2] for line in result.output.splitlines()
            if line.startswith(("eager ", "sdpa "))] == ["5", "5"]  # the table's block column


@pytest.mark.skipif(cuda_available(), reason="checks the no-GPU path")
def test_cuda_backend_is_skipped_cleanly_without_gpu():
    result = CliRunner().invoke(main, ["bench", *TINY, "--seq", "8", "--iters", "1",
                                       "--warmup", "0", "--no-memory",
                                       "--backends", "eager,eager:cuda"])
    assert result.exit_code == 0, result.output
    assert "skipped: no CUDA device" in result.output


@pytest.mark.parametrize("args", [
    ["--backends", "eager,tpu"], ["--seq", "0"], ["--iters", "0"], ["--block", "0"],
    ["--block", "many"],
], ids=["unknown-backend", "zero-seq", "zero-iters", "zero-block", "word-block"])
def test_bad_usage_exits_2(args):
    result = CliRunner().invoke(main, ["bench", *TINY, *args])
    assert result.exit_code == 2, result.output


def test_plot_without_matplotlib_is_one_line_error(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from flash_export.cli.main import run\n"
            f"sys.argv = ['flash-export', 'bench', '--seq', '8',\n"
            f"            '--plot', r'{tmp_path / 'x.png'}']\n"
            "run()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # the plot extra's own requirement: installable wherever this flash-export came from
    assert proc.stderr.strip() == "error: --plot needs matplotlib: pip install 'matplotlib>=3.7'"
    assert not (tmp_path / "x.png").exists()

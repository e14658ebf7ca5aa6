"""What `bench` measures and gives: its configuration, one row per backend and shape, the report.

`benchmark` (FlashAttention models) and `hf` (checkpoint exports) fill them; `files` writes
them as JSON, CSV and PNG; the CLI renders them.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from flash_export.bench.timing import FLOPS_FORMULA

CSV_FIELDS = ("backend", "device", "chunk", "batch", "seq_q", "seq_k", "status", "p50_ms",
              "p90_ms", "p99_ms", "mean_ms", "tokens_per_s", "gflops_per_s", "peak_rss_mb",
              "peak_cuda_mb", "samples", "block", "error")


@dataclass(frozen=True)
class BenchConfig:
    """What to measure; every field has the CLI's default."""

    seqs: Tuple[int, ...] = (128, 512, 1024)
    chunks: Optional[Tuple[int, ...]] = None  # None: the spec's chunk
    batches: Tuple[int, ...] = (1,)  # a row set per batch size (services batch short inputs)
    backends: Optional[Tuple[str, ...]] = None  # None: every backend this machine can run
    warmup: int = 3
    iters: int = 20  # timed samples per repetition, each one block
    repeats: int = 1
    block: Optional[int] = None  # calls per timed block; None: sized per backend (~20 ms)
    threads: int = 1
    dtype: str = "float32"
    memory: bool = True
    max_memory: Optional[int] = None  # bytes a run may plan to use; None: spec.memory_limit()


@dataclass
class BenchRow:
    """One (backend, chunk, shape): latency percentiles, rates and peak memory."""

    backend: str
    device: str
    chunk: Optional[int]
    batch: int
    seq_q: int
    seq_k: int
    status: str = "ok"  # "ok", "error" or "skipped"
    error: Optional[str] = None
    p50_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    p99_ms: Optional[float] = None
    mean_ms: Optional[float] = None
    tokens_per_s: Optional[float] = None
    gflops_per_s: Optional[float] = None
    flops: Optional[float] = None
    peak_rss_mb: Optional[float] = None
    peak_cuda_mb: Optional[float] = None
    samples: int = 0  # timed blocks; the percentiles are over their per-call means
    block: Optional[int] = None  # calls per timed block
    repeat_medians_ms: List[float] = field(default_factory=list)


@dataclass
class BenchReport:
    """The configuration, the environment and one row per (backend, chunk, shape)."""

    config: BenchConfig
    spec: Dict[str, Any]
    artifact: Optional[str]
    environment: Dict[str, Any]
    rows: List[BenchRow] = field(default_factory=list)
    flops_formula: str = FLOPS_FORMULA
    method: str = ""

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready view."""
        return {"config": dataclasses.asdict(self.config), "spec": self.spec,
                "artifact": self.artifact, "environment": self.environment,
                "flops_formula": self.flops_formula, "method": self.method,
                "rows": [dataclasses.asdict(r) for r in self.rows]}

    def csv_rows(self) -> List[Dict[str, Any]]:
        """Rows restricted to CSV_FIELDS."""
        return [{k: getattr(r, k) for k in CSV_FIELDS} for r in self.rows]


def fill_stats(row: BenchRow, per_repeat: List[List[float]], flops: float) -> None:
    """Fill `row`'s percentiles, rates and sample count from per-repetition per-call seconds."""
    all_s = np.array([t for rep in per_repeat for t in rep], dtype=np.float64)
    if all_s.size == 0:
        row.status, row.error = "error", "no timed iterations"
        return
    p50, p90, p99 = (float(x) for x in np.percentile(all_s, [50, 90, 99]))
    row.p50_ms, row.p90_ms, row.p99_ms = p50 * 1e3, p90 * 1e3, p99 * 1e3
    row.mean_ms = float(all_s.mean()) * 1e3
    row.samples = int(all_s.size)
    row.tokens_per_s = row.batch * row.seq_q / p50
    row.flops = flops
    row.gflops_per_s = flops / p50 / 1e9
    row.repeat_medians_ms = [float(np.median(rep)) * 1e3 for rep in per_repeat if rep]

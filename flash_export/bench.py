"""Latency, throughput and memory of every way to run a FlashAttention model, side by side.

Backends (``--backends``): ``custom``, ``standard``, ``contrib``, ``attention23`` (onnxruntime, the
ONNX targets exported on the fly into a temp dir unless an artifact is given), ``torchscript``,
``eager`` (our module) and ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention`` with the
same projections). A ``:cuda`` suffix runs one on the GPU (CUDA provider / CUDA tensors).

Timing is interleaved: every iteration runs each backend once, in an order shuffled per iteration
(seeded, so a rerun repeats it), so machine noise hits all alike and no backend always runs right
after the same other one. Peak memory of one forward is measured in a fresh subprocess per
(backend, shape): host RSS growth around one forward after the session/model is built (Linux: the
peak is reset through /proc/self/clear_refs; elsewhere getrusage maxrss), and on CUDA torch's peak
allocation. `benchmark` returns plain dataclasses; the CLI renders them.
"""

import dataclasses
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from flash_export.artifact import TORCHSCRIPT_SUFFIXES as TORCHSCRIPT_EXTS
from flash_export.contract import EXPORT_DTYPES, feed_dtype
from flash_export.errors import FlashExportError, summary
from flash_export.runtime import ort_session

ONNX_BACKENDS = ("custom", "standard", "contrib", "attention23")
TORCH_BACKENDS = ("torchscript", "eager", "sdpa")
ALL_BACKENDS = ONNX_BACKENDS + TORCH_BACKENDS
CHUNK_FREE = frozenset({"contrib", "attention23", "sdpa"})  # results do not depend on chunk
FLOPS_FORMULA = ("per FlashAttention layer: attention 4*B*H*Lq*Lk*D (QK^T and PV, dense: causal "
                 "not halved) + projections 4*B*E^2*(Lq+Lk) (= 8*B*L*E^2 when Lq = Lk = L); "
                 "other layers of a custom model are not counted")
CSV_FIELDS = ("backend", "device", "chunk", "batch", "seq_q", "seq_k", "status", "p50_ms",
              "p90_ms", "p99_ms", "mean_ms", "tokens_per_s", "gflops_per_s", "peak_rss_mb",
              "peak_cuda_mb", "samples", "error")

ProgressFn = Callable[[int, int, str], None]
Runner = Callable[[], None]
PathLike = Union[str, Path]


@dataclass(frozen=True)
class BenchConfig:
    """What to measure; every field has the CLI's default."""

    seqs: Tuple[int, ...] = (128, 512, 1024)
    chunks: Optional[Tuple[int, ...]] = None  # None: the spec's chunk
    batch: int = 1
    backends: Optional[Tuple[str, ...]] = None  # None: every backend this machine can run
    warmup: int = 3
    iters: int = 20
    repeats: int = 1
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
    samples: int = 0
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


def attention_flops(batch: int, seq_q: int, seq_k: int, embed: int, heads: int,
                    projections: bool = True) -> float:
    """FLOPs of one FlashAttention layer (see FLOPS_FORMULA); attention only if not projections."""
    head_dim = embed // heads
    flops = 4.0 * batch * heads * seq_q * seq_k * head_dim
    if projections:
        flops += 4.0 * batch * embed * embed * (seq_q + seq_k)
    return flops


def environment(threads: int) -> Dict[str, Any]:
    """Versions, host and date, for the report header."""
    from importlib import metadata

    def version(name: str) -> str:
        for dist in (name, f"{name}-gpu"):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return "not installed"

    from flash_export._version import __version__

    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": platform.node(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "flash_export": __version__, "torch": version("torch"),
            "onnxruntime": version("onnxruntime"), "threads": threads}


# --------------------------------------------------------------------------- timing machinery


def time_interleaved(runners: Dict[str, Runner], *, warmup: int, iters: int, repeats: int = 1,
                     on_step: Optional[Callable[[], None]] = None, seed: int = 0,
                     ) -> Tuple[Dict[str, List[List[float]]], Dict[str, str]]:
    """Time each runner `iters` times per repeat, each iteration in its own shuffled order.

    A fixed order would put every backend always right after the same one, whose leftovers
    (another runtime's threads still spinning, caches it filled) it would then always inherit.

    Returns:
        (samples, errors): samples[name][repeat] is a list of seconds; a runner that raises is
        dropped and its first error recorded in errors[name].
    """
    live = dict(runners)
    errors: Dict[str, str] = {}
    samples: Dict[str, List[List[float]]] = {n: [] for n in runners}
    order_rng = random.Random(seed)

    def call(name: str) -> Optional[float]:
        try:
            start = time.perf_counter()
            live[name]()
            return time.perf_counter() - start
        except Exception as exc:  # a backend that cannot run this shape fails alone
            errors[name] = summary(exc)
            del live[name]
            return None

    for _ in range(repeats):
        for _ in range(warmup):
            for name in list(live):
                call(name)
        for name in live:
            samples[name].append([])
        for _ in range(iters):
            order = list(live)
            order_rng.shuffle(order)
            for name in order:
                t = call(name)
                if t is not None:
                    samples[name][-1].append(t)
            if on_step:
                on_step()
    return samples, errors


def _make_inputs(batch: int, seq_q: int, seq_k: int, embed: int,
                 seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((batch, seq_k, embed), dtype=np.float32)  # (B, Lk, E)
    k = rng.standard_normal((batch, seq_k, embed), dtype=np.float32)  # (B, Lk, E)
    q = rng.standard_normal((batch, seq_q, embed), dtype=np.float32)  # (B, Lq, E)
    return v, k, q


@dataclass(frozen=True)
class Job:
    """Everything a runner needs; JSON-serialisable so a fresh subprocess can rebuild it."""

    backend: str  # a name from ALL_BACKENDS
    device: str  # "cpu" or "cuda"
    batch: int
    seq_q: int
    seq_k: int
    embed: int
    threads: int
    dtype: str
    file: Optional[str] = None  # the .onnx / .pt file for onnxruntime / torchscript backends
    spec_json: Optional[str] = None  # the ModelSpec for eager / sdpa
    attention_only: bool = False  # eager/sdpa: skip the projections (benchmarks/ script)
    trust: bool = False  # load a .pt file of unknown origin
    expect_sha256: Optional[str] = None  # the .pt's hash as the user knows it


def make_runner(job: Job) -> Runner:
    """Build the session/model of `job` and return a closure running one forward on fixed inputs.

    Raises:
        FlashExportError (or the backend's own error) when it cannot be built.
    """
    v, k, q = _make_inputs(job.batch, job.seq_q, job.seq_k, job.embed)
    if job.backend in ONNX_BACKENDS:
        return _ort_runner(job, v, k, q)
    return _torch_runner(job, v, k, q)


def _ort_runner(job: Job, v: np.ndarray, k: np.ndarray, q: np.ndarray) -> Runner:
    if job.file is None:
        raise FlashExportError(f"{job.backend}: no ONNX file")
    session = ort_session(job.file, provider=job.device, threads=job.threads)
    elem = np.dtype(feed_dtype(session.get_inputs()[0].type))
    feed = {"values": v.astype(elem), "keys": k.astype(elem), "queries": q.astype(elem)}
    names = {i.name for i in session.get_inputs()}
    if "values" not in names:  # attention-only graphs take q, k, v
        feed = {"query": feed["queries"], "key": feed["keys"], "value": feed["values"]}
    if "mask" in names:  # an all-True mask: the cost of the masked path, the result of none
        feed["mask"] = np.ones((job.batch, 1, job.seq_q, job.seq_k), dtype=np.bool_)
    output = session.get_outputs()[0].name
    if job.device != "cuda":
        def run_cpu() -> None:
            session.run([output], feed)

        return run_cpu
    import onnxruntime as ort

    binding = session.io_binding()
    for name, array in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
    binding.bind_output(output, "cuda")

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


def _torch_runner(job: Job, v: np.ndarray, k: np.ndarray, q: np.ndarray) -> Runner:
    import torch

    torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    if job.dtype not in EXPORT_DTYPES:
        raise FlashExportError(f"unsupported dtype {job.dtype!r}; choose {EXPORT_DTYPES}")
    dtype = getattr(torch, job.dtype)
    tv, tk, tq = (torch.from_numpy(a).to(device=device, dtype=dtype) for a in (v, k, q))
    module: Any
    if job.backend == "torchscript":
        from flash_export.export import load_torchscript

        if job.file is None:
            raise FlashExportError("torchscript: no .pt file")
        module, _ = load_torchscript(job.file, trust=job.trust, expect_sha256=job.expect_sha256)
        module = module.to(device=device, dtype=dtype)
    elif job.backend in ("eager", "sdpa"):
        from flash_export.attention import replace_attention
        from flash_export.spec import ModelSpec

        if job.spec_json is None:
            raise FlashExportError(f"{job.backend}: no model spec")
        module = ModelSpec.from_json(job.spec_json).build()
        if job.backend == "sdpa":
            module = replace_attention(module, SdpaAttention)
        if job.attention_only:
            module = attention_only(module)
        module = module.to(device=device, dtype=dtype).eval()
    else:
        raise FlashExportError(f"unknown backend {job.backend!r}; choose from {ALL_BACKENDS}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run() -> None:
        with torch.inference_mode():
            module(tv, tk, tq)
        sync()

    return run


def attention_only(model: Any) -> Any:
    """Wrap a FlashAttention so that forward(values, keys, queries, mask) skips the projections.

    The wrapper calls the layer's `attend` on the raw inputs, so an export adapter swapped in by
    `replace_attention` still applies: the exported graph is the attention alone (what the
    benchmarks/ comparison times).

    Raises:
        FlashExportError: `model` is not a plain FlashAttention.
    """
    from torch import nn

    from flash_export.attention import FlashAttention

    if not isinstance(model, FlashAttention):
        raise FlashExportError(f"attention_only needs a FlashAttention, got {type(model).__name__}")

    class AttentionOnly(nn.Module):
        def __init__(self, attention: FlashAttention) -> None:
            super().__init__()
            self.attention = attention

        def forward(self, values: Any, keys: Any, queries: Any, mask: Any = None) -> Any:
            allowed = self.attention.check_inputs(values, keys, queries, mask)
            return self.attention.attend(queries, keys, values, allowed)  # (B, Lq, E)

    return AttentionOnly(model).eval()


def _sdpa_class() -> type:
    import torch
    import torch.nn.functional as F

    from flash_export.attention import FlashAttention, _causal_allowed

    class _Sdpa(FlashAttention):
        """FlashAttention whose attention is torch's scaled_dot_product_attention."""

        def attend(self, q: Any, k: Any, v: Any, allowed: Any) -> Any:
            qh, kh, vh = self.split_heads(q), self.split_heads(k), self.split_heads(v)
            lq, lk = qh.size(2), kh.size(2)
            mask = allowed
            if self.causal and (lq != lk or mask is not None):
                causal = _causal_allowed(0, lq, 0, lk, lq, lk, q.device)  # (Lq, Lk)
                mask = causal if mask is None else mask & causal
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale,
                                               is_causal=self.causal and mask is None)
            return self.merge_heads(torch.nan_to_num(o))  # (B, Lq, E)

    return _Sdpa


class _LazySdpa:
    """Resolves to the SDPA FlashAttention subclass on first use (keeps torch import lazy)."""

    _cls: Optional[type] = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _LazySdpa._cls is None:
            _LazySdpa._cls = _sdpa_class()
        return _LazySdpa._cls(*args, **kwargs)


SdpaAttention: Any = _LazySdpa()


# --------------------------------------------------------------------------- memory


def _rss_kb(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_memory_of_one_forward(job: Job) -> Dict[str, Any]:
    """In this (fresh) process: build, then measure host RSS growth around one forward."""
    import resource

    cuda = job.device == "cuda"
    run = make_runner(job)
    torch_cuda = cuda and job.backend in TORCH_BACKENDS
    if torch_cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    method = "VmHWM after reset (/proc/self/clear_refs) - VmRSS before"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kb("VmRSS")
    except OSError:
        before = None
    if before is None:
        method = "getrusage maxrss delta"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    if method.startswith("VmHWM"):
        after = _rss_kb("VmHWM") or 0
    else:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: Dict[str, Any] = {"peak_rss_mb": max(after - before, 0) / 1024.0, "method": method}
    if torch_cuda:
        import torch

        out["peak_cuda_mb"] = (torch.cuda.max_memory_allocated() - cuda_before) / 2**20
    return out


def measure_memory(job: Job, timeout: float = 600.0) -> Dict[str, Any]:
    """Peak memory of one forward of `job`, measured in a fresh subprocess.

    Returns:
        {"peak_rss_mb": float, "method": str, ["peak_cuda_mb": float]} or {"error": str}.
    """
    cmd = [sys.executable, "-m", "flash_export.bench", "--memory-worker",
           json.dumps(dataclasses.asdict(job))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"memory worker timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"error": f"memory worker failed ({proc.returncode}): {tail}"[:300]}
    result: Dict[str, Any] = json.loads(lines[-1])
    return result


# --------------------------------------------------------------------------- benchmark


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (checked only when asked, never at import)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _parse_backend(name: str) -> Tuple[str, str]:
    base, _, device = name.partition(":")
    if base not in ALL_BACKENDS or device not in ("", "cpu", "cuda"):
        raise FlashExportError(f"unknown backend {name!r}; choose from "
                               f"{', '.join(ALL_BACKENDS)} (optionally with :cuda)")
    return base, device or "cpu"


@dataclass
class _Plan:
    backend: str
    device: str
    chunk: Optional[int]
    file: Optional[str] = None
    spec_json: Optional[str] = None
    error: Optional[str] = None
    status: str = "ok"

    @property
    def label(self) -> str:
        suffix = "" if self.device == "cpu" else f":{self.device}"
        return f"{self.backend}{suffix}" + ("" if self.chunk is None else f"@{self.chunk}")


def benchmark(artifact: Optional[PathLike] = None, *, spec: Optional[Any] = None,
              config: Optional[BenchConfig] = None, trust: bool = False,
              expect_sha256: Optional[str] = None,
              progress: Optional[ProgressFn] = None) -> BenchReport:
    """Time and measure the backends of `config` on one model, interleaved, per sequence length.

    Args:
        artifact: an optional `.onnx` or `.pt` file: it is timed as its own backend (its target,
            or torchscript) instead of an on-the-fly export; default backends then are it, eager
            and sdpa. Its metadata is data: checked against its graph, and a model file or
            weights it names are used only with `trust`.
        spec: the ModelSpec of the model; default: the artifact's, else ModelSpec().
        config: what to measure (BenchConfig defaults when None).
        trust: load a `.pt` artifact of unknown origin, and use the model file and weights the
            artifact records.
        expect_sha256: the artifact's SHA-256 as you know it; a different file is refused.
        progress: called as progress(done, total, label).

    Returns:
        A BenchReport with one row per (backend, chunk, sequence length); backends that cannot
        run here are rows with status "skipped" or "error", never exceptions.

    Raises:
        ArtifactError: an unreadable, malformed or untrusted artifact.
        FlashExportError: bad configuration (unknown backend), or a run that would need more
            than `config.max_memory`.
    """
    from flash_export.spec import ModelSpec, check_memory

    config = config or BenchConfig()
    report_progress = progress or (lambda done, total, label: None)
    art_backend: Optional[str] = None
    art_chunk: Optional[int] = None
    dtype = config.dtype
    if artifact is not None:
        spec, art_backend, dtype, art_chunk = _read_artifact(Path(artifact), spec, trust,
                                                             expect_sha256)
    spec = spec or ModelSpec()
    chunks = tuple(config.chunks) if config.chunks else (spec.chunk,)
    if config.backends:
        wanted = [_parse_backend(b) for b in config.backends]
    elif art_backend is not None:
        wanted = [(art_backend, "cpu"), ("eager", "cpu"), ("sdpa", "cpu")]
    else:
        wanted = [(b, "cpu") for b in ALL_BACKENDS]
        if cuda_available():
            wanted += [(b, "cuda") for b in ALL_BACKENDS]

    report = BenchReport(config=dataclasses.replace(config, chunks=chunks), spec=json.loads(
        spec.to_json()), artifact=str(artifact) if artifact else None,
        environment=environment(config.threads))
    report.method = (
        f"warmup {config.warmup}, then {config.iters} timed iterations x {config.repeats} "
        f"repetition(s) per (backend, shape), backends interleaved (order shuffled every "
        f"iteration); percentiles over all timed iterations; torch.set_num_threads = ORT "
        f"intra_op_num_threads = {config.threads} (ORT thread spinning off); peak memory: "
        + ("host RSS growth of one forward after the build, fresh subprocess per (backend, "
           "shape)" if config.memory else "not measured"))
    params = spec.parameter_count()
    if params is not None:  # known without building: refuse before the first allocation
        check_memory(_bench_bytes(spec, params, config, len(wanted)), config.max_memory,
                     "this benchmark")
    from flash_export.attention import FlashAttention

    built = spec.build()
    n_layers = max(1, sum(isinstance(m, FlashAttention) for m in built.modules()))
    if params is None:
        check_memory(_bench_bytes(spec, sum(p.numel() for p in built.parameters()), config,
                                  len(wanted)), config.max_memory, "this benchmark")
    del built

    with tempfile.TemporaryDirectory(prefix="flash_export_bench_") as tmp:
        plans = _plan(wanted, chunks, spec, dtype, Path(tmp), artifact, art_backend, art_chunk,
                      report_progress)
        total = len(config.seqs) * (config.repeats * config.iters + (
            len(plans) if config.memory else 0))
        done = 0
        for seq in config.seqs:
            runners: Dict[str, Runner] = {}
            rows: Dict[str, BenchRow] = {}
            for p in plans:
                row = BenchRow(p.backend, p.device, p.chunk, config.batch, seq, seq,
                               status=p.status, error=p.error)
                rows[p.label] = row
                report.rows.append(row)
                if p.status != "ok":
                    continue
                try:
                    job = _job(p, config, spec, seq, dtype, trust, expect_sha256)
                    runners[p.label] = make_runner(job)
                except Exception as exc:  # a backend that cannot be built here is one row
                    row.status, row.error = "error", summary(exc)

            def step(seq: int = seq) -> None:
                nonlocal done
                done += 1
                report_progress(done, total, f"timing L={seq}")

            samples, errors = time_interleaved(runners, warmup=config.warmup,
                                               iters=config.iters, repeats=config.repeats,
                                               on_step=step)
            runners.clear()
            flops = n_layers * attention_flops(config.batch, seq, seq, spec.embed, spec.heads)
            for label, row in rows.items():
                if label in errors:
                    row.status, row.error = "error", errors[label]
                if row.status == "ok" and label in samples:
                    _fill_stats(row, samples[label], flops)
            if config.memory:
                for p in plans:
                    row = rows[p.label]
                    done += 1
                    report_progress(done, total, f"memory {p.label} L={seq}")
                    if row.status != "ok":
                        continue
                    mem = measure_memory(_job(p, config, spec, seq, dtype, trust, expect_sha256))
                    row.peak_rss_mb = mem.get("peak_rss_mb")
                    row.peak_cuda_mb = mem.get("peak_cuda_mb")
                    if "error" in mem:
                        row.error = f"memory: {mem['error']}"
    return report


def _read_artifact(path: Path, spec: Optional[Any], trust: bool,
                   expect_sha256: Optional[str]) -> Tuple[Any, str, str, int]:
    """(spec, backend, dtype, recorded chunk) of an artifact to bench, read and checked as data.

    Raises:
        ArtifactError: unreadable, malformed, contradicting its graph, or untrusted.
    """
    from flash_export.artifact import artifact_kind, provenance, read_metadata, require_provenance
    from flash_export.spec import check_graph_matches_spec, recorded, resolve_spec

    kind = artifact_kind(path)
    meta = read_metadata(path)
    rec = recorded(meta, path, kind)
    if kind == "onnx":
        provenance(path, expect_sha256=expect_sha256, trust=trust)  # refuses a wrong hash
    else:  # a .pt is a program: refuse it here, before any runner or subprocess loads it
        require_provenance(path, expect_sha256=expect_sha256, trust=trust)
    spec = spec if spec is not None else resolve_spec(rec.spec, {}, trust=trust, source=path)
    if kind == "onnx":
        from flash_export.safety import check_onnx_file

        check_graph_matches_spec(spec, check_onnx_file(path), path)
    return spec, rec.target or "torchscript", rec.dtype, rec.spec.chunk


def _bench_bytes(spec: Any, params: int, config: BenchConfig, backends: int) -> int:
    """What a benchmark allocates at most, in bytes.

    A float32 model per backend and a few more, and the (B, H, L, L) float32 scores that stock
    attention (sdpa, contrib, attention23) holds.
    """
    longest = max(config.seqs, default=0)
    scores = config.batch * spec.heads * longest * longest
    return 4 * params * (backends + 4) + 12 * scores + 64 * config.batch * longest * spec.embed \
        + (64 << 20)


def _job(p: _Plan, config: BenchConfig, spec: Any, seq: int, dtype: str, trust: bool,
         expect_sha256: Optional[str] = None) -> Job:
    return Job(backend=p.backend, device=p.device, batch=config.batch, seq_q=seq, seq_k=seq,
               embed=spec.embed, threads=config.threads, dtype=dtype, file=p.file,
               spec_json=p.spec_json, trust=trust,
               expect_sha256=expect_sha256 if p.file and p.file.endswith(TORCHSCRIPT_EXTS)
               else None)


def _fill_stats(row: BenchRow, per_repeat: List[List[float]], flops: float) -> None:
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


def _plan(wanted: List[Tuple[str, str]], chunks: Tuple[int, ...], spec: Any, dtype: str,
          tmp: Path, artifact: Optional[PathLike], art_backend: Optional[str],
          art_chunk: Optional[int], progress: ProgressFn) -> List[_Plan]:
    """Export what is needed and decide one plan per (backend, device, chunk)."""
    plans: List[_Plan] = []
    has_cuda: Optional[bool] = None
    exported: Dict[Tuple[str, int], Tuple[Optional[str], Optional[str]]] = {}
    for base, device in wanted:
        if device == "cuda":
            has_cuda = cuda_available() if has_cuda is None else has_cuda
        if base == art_backend and artifact is not None:
            plans.append(_Plan(base, device, art_chunk, file=str(artifact)))
            continue
        for chunk in (chunks[:1] if base in CHUNK_FREE else chunks):
            s = dataclasses.replace(spec, chunk=chunk)
            plan = _Plan(base, device, None if base in CHUNK_FREE else chunk,
                         spec_json=s.to_json())
            plans.append(plan)
            if device == "cuda" and not has_cuda:
                plan.status, plan.error = "skipped", "no CUDA device"
                continue
            if base in ("eager", "sdpa"):
                continue
            key = (base, chunk)
            if key not in exported:
                progress(0, 0, f"exporting {base} chunk {chunk}")
                exported[key] = _export(base, s, dtype, tmp)
            plan.file, plan.error = exported[key]
            if plan.error:
                plan.status = "error"
    return plans


def _export(base: str, spec: Any, dtype: str, tmp: Path) -> Tuple[Optional[str], Optional[str]]:
    try:
        model = spec.build()
        if base == "torchscript":
            from flash_export.export import export_torchscript

            out = tmp / f"torchscript_c{spec.chunk}.pt"
            export_torchscript(model, out, spec=spec)
        else:
            from flash_export.onnx_export import export_onnx

            out = tmp / f"{base}_c{spec.chunk}_{dtype}.onnx"
            export_onnx(model, out, target=base, dtype=dtype, spec=spec)
        return str(out), None
    except Exception as exc:  # one target failing to export is one row, not the whole run
        return None, f"export failed: {summary(exc)}"


# --------------------------------------------------------------------------- rendering helpers


def write_csv(report: BenchReport, path: PathLike) -> None:
    """Write the rows as CSV (columns CSV_FIELDS)."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
        writer.writeheader()
        for row in report.csv_rows():
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def require_matplotlib() -> None:
    """Raise a one-line FlashExportError when the optional plot extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise FlashExportError("--plot needs matplotlib: pip install 'flash-export[plot]'") \
            from exc


def plot_report(report: BenchReport, path: PathLike) -> None:
    """Save a PNG: p50 latency and peak memory against sequence length, one line per backend."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: Dict[str, List[BenchRow]] = {}
    for r in report.rows:
        label = r.backend + ("" if r.device == "cpu" else f":{r.device}") + (
            "" if r.chunk is None else f" chunk {r.chunk}")
        series.setdefault(label, []).append(r)
    for label, rows in series.items():
        ok = [r for r in rows if r.p50_ms is not None]
        if ok:
            ax_t.plot([r.seq_q for r in ok], [r.p50_ms for r in ok], marker="o", label=label)
        mem = [r for r in rows if r.peak_rss_mb is not None]
        if mem:
            ax_m.plot([r.seq_q for r in mem], [r.peak_rss_mb for r in mem], marker="o",
                      label=label)
    ax_t.set(xlabel="sequence length L (Lq = Lk)", ylabel="p50 latency (ms)", xscale="log",
             yscale="log", title=f"latency, batch {report.config.batch}, "
                                 f"{report.config.threads} thread(s)")
    ax_m.set(xlabel="sequence length L (Lq = Lk)", ylabel="peak RSS growth of one forward (MB)",
             xscale="log", title="memory")
    ax_t.legend(fontsize=7)
    ax_t.grid(True, which="both", alpha=0.3)
    ax_m.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"flash-export bench, E={report.spec.get('embed')} H={report.spec.get('heads')}"
                 f" {report.config.dtype}, {report.environment.get('date')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _worker_main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] != "--memory-worker":
        print("usage: python -m flash_export.bench --memory-worker JOB_JSON", file=sys.stderr)
        return 2
    job = Job(**json.loads(argv[1]))
    print(json.dumps(_peak_memory_of_one_forward(job)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))

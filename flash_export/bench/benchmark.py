"""Latency, throughput and memory of every way to run a FlashAttention model, side by side.

Backends (``--backends``): ``custom``, ``standard``, ``contrib``, ``attention23`` (onnxruntime, the
ONNX targets exported on the fly into a temp dir unless an artifact is given), ``torchscript``,
``eager`` (our module), ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention`` with the
same projections) and the native operator `flash_export::attention` three ways: ``native`` (our
module with attention="native"), ``torchscript-native`` and ``pt2`` (an AOTInductor package). A
``:cuda`` suffix runs one on the GPU (CUDA provider / CUDA tensors).

`benchmark` plans one runner per (backend, chunk) (`runners`), times them per shape in blocks of
back-to-back calls after an untimed one, the backends' blocks interleaved in shuffled orders
(`timing.time_interleaved`), and measures each one's peak memory in a fresh
subprocess; it returns plain dataclasses, which the CLI renders.
"""

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from flash_export.artifacts.kinds import kind_of
from flash_export.bench.memory import measure_memory
from flash_export.bench.report import CSV_FIELDS, BenchConfig, BenchReport, BenchRow, fill_stats
from flash_export.bench.runners import (
    ALL_BACKENDS,
    ONNX_BACKENDS,
    TORCH_BACKENDS,
    Job,
    Plan,
    bench_feed,
    cuda_available,
    make_runner,
    parse_backend,
    plan_backends,
)
from flash_export.bench.timing import (
    BLOCK_TARGET_S,
    MAX_BLOCK,
    Runner,
    attention_flops,
    environment,
    time_interleaved,
)
from flash_export.core.errors import ArtifactError, summary
from flash_export.core.io_spec import IOSpec
from flash_export.nn.model_io import attention_calls, resolve_io

__all__ = ["ALL_BACKENDS", "ONNX_BACKENDS", "TORCH_BACKENDS", "BenchConfig", "BenchReport",
           "BenchRow", "CSV_FIELDS", "benchmark", "cuda_available", "time_interleaved",
           "attention_flops"]

ProgressFn = Callable[[int, int, str], None]
PathLike = Union[str, Path]


# long: a public entry point whose docstring is half of it; the body is 37 lines
def benchmark(artifact: Optional[PathLike] = None, *, spec: Optional[Any] = None,
              config: Optional[BenchConfig] = None, trust: bool = False,
              expect_sha256: Optional[str] = None,
              progress: Optional[ProgressFn] = None) -> BenchReport:
    """Time and measure the backends of `config` on one model, interleaved, per batch and length.

    Args:
        artifact: an optional `.onnx`, `.pt` or `.pt2` file: it is timed as its own backend
            (its target, torchscript, torchscript-native or pt2) instead of an on-the-fly export;
            default backends then are it, eager and sdpa. Its metadata is data: checked against
            its graph, and a model file or weights it names are used only with `trust`.
        spec: the ModelSpec of the model; default: the artifact's, else ModelSpec().
        config: what to measure (BenchConfig defaults when None).
        trust: load a `.pt` artifact of unknown origin, and use the model file and weights the
            artifact records.
        expect_sha256: the artifact's SHA-256 as you know it; a different file is refused.
        progress: called as progress(done, total, label).

    Returns:
        A BenchReport with one row per (backend, chunk, batch, sequence length); backends that
        cannot run here are rows with status "skipped" or "error", never exceptions.

    Raises:
        ArtifactError: an unreadable, malformed or untrusted artifact.
        FlashExportError: bad configuration (unknown backend), or a run that would need more
            than `config.max_memory`.
    """
    from flash_export.nn.spec import ModelSpec

    config = config or BenchConfig()
    art: Optional[Tuple[str, int]] = None  # the artifact's backend and recorded chunk
    dtype = config.dtype
    checkpoint = _checkpoint_export(artifact, trust, expect_sha256)
    if checkpoint is not None:  # a transformers checkpoint's: timed against it in PyTorch
        from flash_export.bench.hf import benchmark_checkpoint_export

        return benchmark_checkpoint_export(Path(str(artifact)), *checkpoint, config,
                                           progress or (lambda d, t, label: None), trust,
                                           expect_sha256)
    if artifact is not None:
        spec, backend, dtype, chunk = _read_artifact(Path(artifact), spec, trust, expect_sha256)
        art = (backend, chunk)
    spec = spec or ModelSpec()
    chunks = tuple(config.chunks) if config.chunks else (spec.chunk,)
    wanted = _wanted_backends(config, art[0] if art else None)
    report = BenchReport(config=dataclasses.replace(config, chunks=chunks),
                         spec=json.loads(spec.to_json()),
                         artifact=str(artifact) if artifact else None,
                         environment=environment(config.threads), method=_method(config))
    model = _built_within_memory(spec, config, len(wanted))
    run = _Run(config, spec, dtype, trust, expect_sha256, progress or (lambda d, t, label: None),
               model)
    # A model whose only dynamic size is the batch (a ViT) has one shape: one row set.
    seqs = config.seqs if set(run.io.dynamic) - {"batch"} else config.seqs[:1]
    with tempfile.TemporaryDirectory(prefix="flash_export_bench_") as tmp:
        plans = plan_backends(wanted, chunks, spec, dtype, Path(tmp), artifact, art, run.progress)
        shapes = [(b, seq) for b in config.batches for seq in seqs]
        run.total = len(shapes) * (config.repeats * config.iters
                                   + (len(plans) if config.memory else 0))
        for batch, seq in shapes:
            report.rows.extend(run.one_shape(plans, batch, seq))
    return report


def _wanted_backends(config: BenchConfig, art_backend: Optional[str]) -> List[Tuple[str, str]]:
    """(backend, device) pairs: the configured ones, else the artifact's trio, else all."""
    if config.backends:
        return [parse_backend(b) for b in config.backends]
    if art_backend is not None:
        return [(art_backend, "cpu"), ("eager", "cpu"), ("sdpa", "cpu")]
    wanted = [(b, "cpu") for b in ALL_BACKENDS]
    if cuda_available():
        wanted += [(b, "cuda") for b in ALL_BACKENDS]
    return wanted


def _method(config: BenchConfig) -> str:
    block = (f"{config.block} call(s)" if config.block else
             f"auto-sized per backend and shape from the faster of two calls to last about "
             f"{BLOCK_TARGET_S * 1e3:.0f} ms (1-{MAX_BLOCK} calls; each row's block says how many)")
    return (f"per (backend, shape) and repetition: {config.warmup} untimed warm-up call(s), then "
            f"{config.iters} timed samples, x {config.repeats} repetition(s); a sample is one "
            f"untimed call, then a block of back-to-back calls of the same backend, timed "
            f"together: block time / block size; block: {block}; every iteration runs the "
            f"blocks of all backends in its own shuffled order; p50/p90/p99 and mean are over "
            f"these block means; torch.set_num_threads = ORT "
            f"intra_op_num_threads = {config.threads} (ORT thread spinning off); peak memory: "
            + ("host RSS growth of one forward after the build, fresh subprocess per (backend, "
               "shape)" if config.memory else "not measured"))


def _built_within_memory(spec: Any, config: BenchConfig, backends: int) -> Any:
    """The model of `spec`, built after refusing a run that would not fit.

    A plain or zoo spec's size is known before anything is built; a user factory's only after.
    """
    from flash_export.nn.spec import check_memory

    params = spec.parameter_count()
    if params is not None:
        check_memory(_bench_bytes(spec, params, config, backends), config.max_memory,
                     "this benchmark")
    built = spec.build()
    if params is None:
        check_memory(_bench_bytes(spec, sum(p.numel() for p in built.parameters()), config,
                                  backends), config.max_memory, "this benchmark")
    return built


@dataclass
class _Run:
    """One benchmark's settings and progress, and how it measures one sequence length."""

    config: BenchConfig
    spec: Any
    dtype: str
    trust: bool
    expect_sha256: Optional[str]
    progress: ProgressFn
    model: Any  # the eager model: what the attention costs at each shape is measured on it
    total: int = 0
    done: int = 0

    @property
    def io(self) -> IOSpec:
        """The model's own IOSpec (its shapes decide what one row's length means)."""
        return resolve_io(self.model)

    def attention_work(self, batch: int, seq: int) -> Tuple[int, int, float]:
        """(Lq, Lk) of the first attention call and the FLOPs of all of them, at (batch, seq)."""
        import torch

        io = self.io
        inputs = {n: torch.from_numpy(a) for n, a in bench_feed(io, batch, seq, seq).items()
                  if io.input(n).role != "attention"}
        calls = attention_calls(self.model, {**inputs, **io.constants})
        flops = sum(attention_flops(b, lq, lk, e, h) for b, lq, lk, e, h in calls)
        return (calls[0][1], calls[0][2], flops) if calls else (seq, seq, 0.0)

    def job(self, p: "Plan", batch: int, seq: int) -> Job:
        c = self.config
        is_pt = p.file is not None and kind_of(p.file).loader is not None  # a program
        return Job(backend=p.backend, device=p.device, batch=batch, seq_q=seq, seq_k=seq,
                   embed=self.spec.embed, threads=c.threads, dtype=self.dtype, file=p.file,
                   spec_json=p.spec_json, trust=self.trust,
                   expect_sha256=self.expect_sha256 if is_pt else None)

    def step(self, label: str) -> None:
        self.done += 1
        self.progress(self.done, self.total, label)

    def one_shape(self, plans: List["Plan"], batch: int, seq: int) -> List[BenchRow]:
        """Time every plan at (batch, length seq) in interleaved blocks, then measure memory.

        A row's seq_q/seq_k are the first attention call's lengths (a ViT's token count, say).
        """
        c = self.config
        lq, lk, flops = self.attention_work(batch, seq)
        rows: Dict[str, BenchRow] = {}
        runners: Dict[str, Runner] = {}
        for p in plans:
            row = rows[p.label] = BenchRow(p.backend, p.device, p.chunk, batch, lq, lk,
                                           status=p.status, error=p.error)
            if p.status == "ok":
                try:
                    runners[p.label] = make_runner(self.job(p, batch, seq))
                except Exception as exc:  # a backend that cannot be built here is one row
                    row.status, row.error = "error", summary(exc)
        timed = time_interleaved(runners, warmup=c.warmup, iters=c.iters, repeats=c.repeats,
                                 block=c.block,
                                 on_step=lambda: self.step(f"timing B={batch} L={seq}"))
        runners.clear()
        for label, row in rows.items():
            if label in timed.errors:
                row.status, row.error = "error", timed.errors[label]
            if row.status == "ok" and label in timed.samples:
                row.block = timed.blocks.get(label)
                fill_stats(row, timed.samples[label], flops)
        for p in plans if c.memory else []:
            row = rows[p.label]
            self.step(f"memory {p.label} B={batch} L={seq}")
            if row.status == "ok":
                mem = measure_memory(self.job(p, batch, seq))
                row.peak_rss_mb = mem.get("peak_rss_mb")
                row.peak_cuda_mb = mem.get("peak_cuda_mb")
                if "error" in mem:
                    row.error = f"memory: {mem['error']}"
        return list(rows.values())


def _checkpoint_export(artifact: Optional[PathLike], trust: bool, expect_sha256: Optional[str]
                       ) -> Optional[Tuple[str, Dict[str, str]]]:
    """(kind, metadata) of an artifact exported from a transformers checkpoint, else None.

    Read as data; an ONNX graph's IOSpec is checked against the graph and its provenance
    against `expect_sha256` before anything runs.
    """
    from flash_export.artifacts.metadata import read_metadata
    from flash_export.check.hf_validate import is_checkpoint_export

    if artifact is None or not is_checkpoint_export(read_metadata(artifact)):
        return None
    kind, _, meta = _read_checked(Path(artifact), trust, expect_sha256)
    return kind, meta


def _read_artifact(path: Path, spec: Optional[Any], trust: bool,
                   expect_sha256: Optional[str]) -> Tuple[Any, str, str, int]:
    """(spec, backend, dtype, recorded chunk) of an artifact to bench, read and checked as data.

    Raises:
        ArtifactError: unreadable, malformed, contradicting its graph, or untrusted.
    """
    from flash_export.nn.recorded import check_graph_matches_spec, recorded
    from flash_export.nn.spec import resolve_spec

    kind, proto, meta = _read_checked(path, trust, expect_sha256)
    rec = recorded(meta, path, kind)
    if spec is None:
        if rec.spec is None:
            raise ArtifactError(f"{path} records no model spec (it was exported from a model "
                                "object): name the model with --model FILE.py:FACTORY")
        spec = resolve_spec(rec.spec, {}, trust=trust, source=path)
    if proto is not None:
        check_graph_matches_spec(spec, proto, path)
    backend = kind_of(path).handler("bench_backend")(meta)
    return spec, backend, rec.dtype, rec.chunk


def _read_checked(path: Path, trust: bool, expect_sha256: Optional[str]
                  ) -> Tuple[str, Any, Dict[str, str]]:
    """(kind, ONNX graph or None, metadata) of an artifact, read as data and its origin checked.

    Raises:
        ArtifactError: unreadable, malformed, an IOSpec contradicting its graph, or untrusted.
    """
    from flash_export.artifacts.kinds import artifact_kind
    from flash_export.artifacts.metadata import read_metadata
    from flash_export.artifacts.recorded_io import recorded_io
    from flash_export.artifacts.safety import open_onnx
    from flash_export.artifacts.trust import provenance, require_provenance
    from flash_export.check.structural import graph_inputs

    kind = artifact_kind(path)
    proto = None
    if kind_of(path).loader is None:  # a graph, read as data
        with open_onnx(path) as opened:
            proto = opened.model
            provenance(path, expect_sha256=expect_sha256, trust=trust,
                       digest=opened.sha256)  # refuses a wrong hash
        meta = {p.key: p.value for p in proto.metadata_props}
        # The runners feed the graph what its io_spec says: an edited one (a static 8000
        # where the batch is symbolic) must fail here, before the memory estimate.
        recorded_io(meta, path, graph_inputs(proto))
    else:  # a .pt(2) is a program: refuse it here, before any runner or subprocess loads it
        meta = read_metadata(path)
        require_provenance(path, expect_sha256=expect_sha256, trust=trust)
    return kind, proto, meta


def _bench_bytes(spec: Any, params: int, config: BenchConfig, backends: int) -> int:
    """What a benchmark allocates at most, in bytes.

    A float32 model per backend and a few more, and the (B, H, L, L) float32 scores that stock
    attention (sdpa, contrib, attention23) holds.
    """
    longest = max(config.seqs, default=0)
    batch = max(config.batches, default=1)
    scores = batch * spec.heads * longest * longest
    return 4 * params * (backends + 4) + 12 * scores + 64 * batch * longest * spec.embed \
        + (64 << 20)

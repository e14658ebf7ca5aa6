"""How each backend runs one forward, built once in this process.

A `Job` names a backend (an onnxruntime target, TorchScript, our eager module or PyTorch SDPA, and
the native operator's three: `native` (eager), `torchscript-native` and `pt2` (AOTInductor)),
its device, shape, dtype and threads; `make_runner` builds its session or model once and returns a
closure running one forward on fixed inputs (`bench.memory` runs one in a fresh process).
"""

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from flash_export.artifacts.kinds import bench_backends
from flash_export.bench.timing import Runner
from flash_export.core.contract import EXPORT_DTYPES, TARGETS, feed_dtype
from flash_export.core.errors import FlashExportError, summary
from flash_export.core.feeds import make_feed
from flash_export.core.io_spec import IOSpec
from flash_export.runtime.sessions import ort_session, session_inputs

ONNX_BACKENDS = TARGETS
TORCH_BACKENDS = ("torchscript", "eager", "sdpa", "native", "torchscript-native", "pt2")
ALL_BACKENDS = ONNX_BACKENDS + TORCH_BACKENDS
CHUNK_FREE = frozenset({"contrib", "attention23", "sdpa"})  # results do not depend on chunk
# Called as progress(done, total, label).
ProgressFn = Callable[[int, int, str], None]
PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Job:
    """Everything a runner needs; JSON-serialisable so a fresh subprocess can rebuild it."""

    backend: str  # a name from ALL_BACKENDS
    device: str  # "cpu" or "cuda"
    batch: int
    seq_q: int
    seq_k: int
    embed: int  # the model's embedding size (reported; the inputs follow the model's IOSpec)
    threads: int
    dtype: str
    file: Optional[str] = None  # the .onnx / .pt / .pt2 file of a backend that runs a file
    spec_json: Optional[str] = None  # the ModelSpec for eager / sdpa
    attention_only: bool = False  # eager/sdpa: skip the projections (benchmarks/ script)
    trust: bool = False  # load a .pt file of unknown origin
    expect_sha256: Optional[str] = None  # the .pt's (.pt2's) hash as the user knows it


def all_backends() -> Tuple[str, ...]:
    """The built-in backends, then any a registered artifact kind adds (`bench_backends`)."""
    return ALL_BACKENDS + tuple(b for b in bench_backends() if b not in ALL_BACKENDS)


def make_runner(job: Job) -> Runner:
    """Build the session/model of `job` and return a closure running one forward on fixed inputs.

    Inputs follow the model's IOSpec at the job's sizes (q_len/seq = seq_q, k_len = seq_k),
    attention masks all True (the cost of the masked path, the result of none) and padding masks
    without padding.

    Raises:
        FlashExportError (or the backend's own error) when it cannot be built.
    """
    if job.backend in ONNX_BACKENDS:
        return _ort_runner(job)
    return _torch_runner(job)


def bench_feed(io: IOSpec, batch: int, seq_q: int, seq_k: int) -> Dict[str, np.ndarray]:
    """A benchmark's inputs: the IOSpec's, at the batch and lengths given.

    q_len and seq are seq_q, k_len is seq_k, other sizes seq_q; attention masks are all True and
    padding masks pad nothing.
    """
    named = {"batch": batch, "q_len": seq_q, "k_len": seq_k}
    sizes = io.clamp({**{n: seq_q for n in io.dynamic}, **named})
    feed = make_feed(io, sizes, seed=0, padded=False)
    for t in io.inputs:
        if t.role == "attention":
            feed[t.name] = np.ones_like(feed[t.name])
    return feed


def _ort_runner(job: Job) -> Runner:
    from flash_export.artifacts.recorded_io import recorded_io

    if job.file is None:
        raise FlashExportError(f"{job.backend}: no ONNX file")
    session = ort_session(job.file, provider=job.device, threads=job.threads)
    graph = {i.name: i for i in session.get_inputs()}
    io = recorded_io(session.get_modelmeta().custom_metadata_map, job.file,
                     session_inputs(session))
    feed = {n: a.astype(feed_dtype(graph[n].type)) if a.dtype.kind == "f" else a
            for n, a in bench_feed(io, job.batch, job.seq_q, job.seq_k).items()}
    outputs = [o.name for o in session.get_outputs()]
    if job.device != "cuda":
        def run_cpu() -> None:
            session.run(outputs, feed)

        return run_cpu
    import onnxruntime as ort

    binding = session.io_binding()
    for name, array in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
    for output in outputs:
        binding.bind_output(output, "cuda")

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


# long: one branch per torch backend, read side by side
def _torch_runner(job: Job) -> Runner:
    import torch

    torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    if job.dtype not in EXPORT_DTYPES:
        raise FlashExportError(f"unsupported dtype {job.dtype!r}; choose {EXPORT_DTYPES}")
    dtype = getattr(torch, job.dtype)
    module: Any
    every_input = False  # whether the module takes the attention mask too
    if job.backend in ("eager", "sdpa", "native"):
        from flash_export.nn.model_io import resolve_io
        from flash_export.nn.spec import ModelSpec
        from flash_export.nn.swap import replace_attention

        if job.spec_json is None:
            raise FlashExportError(f"{job.backend}: no model spec")
        module = ModelSpec.from_json(job.spec_json).build()
        if job.backend == "sdpa":
            module = replace_attention(module, SdpaAttention)
        elif job.backend == "native":
            from flash_export.nn.swap import with_attention

            module = with_attention(module, "native")
        if job.attention_only:
            module = attention_only(module)
        io = resolve_io(module)
        module = module.to(device=device, dtype=dtype).eval()
    elif job.backend in all_backends():
        module, io, every_input = _program(job, device, dtype)
    else:
        raise FlashExportError(f"unknown backend {job.backend!r}; choose from {all_backends()}")
    feed = bench_feed(io, job.batch, job.seq_q, job.seq_k)
    inputs = {n: torch.from_numpy(a).to(device=device, dtype=dtype if a.dtype.kind == "f"
                                        else None)
              for n, a in feed.items()
              # A package takes every input it was exported with (the mask all True here);
              # modules take no mask, the cost of the unmasked path.
              if io.input(n).role != "attention" or every_input}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run() -> None:
        with torch.inference_mode():
            module(**inputs, **io.constants)
        sync()

    return run


def _program(job: Job, device: Any, dtype: Any) -> Tuple[Any, IOSpec, bool]:
    """(module, IOSpec, takes every input) of a job that runs a file, loaded by its kind."""
    from flash_export.artifacts.kinds import kind_of
    from flash_export.artifacts.recorded_io import recorded_io

    if job.file is None:
        raise FlashExportError(f"{job.backend}: no file to run")
    kind = kind_of(job.file)
    if kind.run_dtype is not None and (job.device != "cpu" or job.dtype != kind.run_dtype):
        raise FlashExportError(f"{job.backend}: a package runs where and as it was compiled: "
                               f"cpu, {kind.run_dtype}")
    module, meta, _ = kind.handler("loader")(job.file, trust=job.trust,
                                             expect_sha256=job.expect_sha256)
    if kind.run_dtype is None:
        module = module.to(device=device, dtype=dtype)
    return module, recorded_io(meta, job.file), kind.feeds_every_input


def attention_only(model: Any) -> Any:
    """Wrap a FlashAttention so that forward(values, keys, queries, mask) skips the projections.

    The wrapper calls the layer's `attend` on the raw inputs, so an export adapter swapped in by
    `replace_attention` still applies: the exported graph is the attention alone (what the
    benchmarks/ comparison times).

    Raises:
        FlashExportError: `model` is not a plain FlashAttention.
    """
    from torch import nn

    from flash_export.nn.attention import FlashAttention

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

    from flash_export.nn.attention import FlashAttention, _causal_allowed

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


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (checked only when asked, never at import)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


# --------------------------------------------------------------------------- plans


def parse_backend(name: str) -> Tuple[str, str]:
    """"custom:cuda" -> ("custom", "cuda"); the device defaults to cpu.

    Raises:
        FlashExportError: an unknown backend or device.
    """
    base, _, device = name.partition(":")
    if base not in all_backends() or device not in ("", "cpu", "cuda"):
        raise FlashExportError(f"unknown backend {name!r}; choose from "
                               f"{', '.join(all_backends())} (optionally with :cuda)")
    return base, device or "cpu"


@dataclass
class Plan:
    """One (backend, device, chunk) of a benchmark and the file it runs, or why it cannot."""

    backend: str
    device: str
    chunk: Optional[int]
    file: Optional[str] = None
    spec_json: Optional[str] = None
    error: Optional[str] = None
    status: str = "ok"

    @property
    def label(self) -> str:
        """custom, custom:cuda, custom@64 ..."""
        suffix = "" if self.device == "cpu" else f":{self.device}"
        return f"{self.backend}{suffix}" + ("" if self.chunk is None else f"@{self.chunk}")


def plan_backends(wanted: List[Tuple[str, str]], chunks: Tuple[int, ...], spec: Any,
                  dtype: str, tmp: Path, artifact: Optional[PathLike],
                  art: Optional[Tuple[str, int]], progress: ProgressFn) -> List[Plan]:
    """Export what is needed and decide one plan per (backend, device, chunk).

    `art` is the artifact's (backend, recorded chunk): that backend runs the artifact itself.
    """
    plans: List[Plan] = []
    has_cuda: Optional[bool] = None
    exported: Dict[Tuple[str, int], Tuple[Optional[str], Optional[str]]] = {}
    for base, device in wanted:
        if device == "cuda":
            has_cuda = cuda_available() if has_cuda is None else has_cuda
        if art is not None and base == art[0] and artifact is not None:
            plans.append(Plan(base, device, art[1], file=str(artifact)))
            continue
        for chunk in (chunks[:1] if base in CHUNK_FREE else chunks):
            s = dataclasses.replace(spec, chunk=chunk)
            plan = Plan(base, device, None if base in CHUNK_FREE else chunk,
                        spec_json=s.to_json())
            plans.append(plan)
            if device == "cuda" and not has_cuda:
                plan.status, plan.error = "skipped", "no CUDA device"
                continue
            if base in ("eager", "sdpa", "native"):
                continue
            key = (base, chunk)
            if key not in exported:
                progress(0, 0, f"exporting {base} chunk {chunk}")
                exported[key] = _export_backend(base, s, dtype, tmp)
            plan.file, plan.error = exported[key]
            if plan.error:
                plan.status = "error"
    return plans


def _export_backend(base: str, spec: Any, dtype: str,
                    tmp: Path) -> Tuple[Optional[str], Optional[str]]:
    try:
        model = spec.build()
        if base in ("torchscript", "torchscript-native"):
            from flash_export.export.torchscript import export_torchscript

            out = tmp / f"{base}_c{spec.chunk}.pt"
            export_torchscript(model, out, spec=spec,
                               attention="native" if base == "torchscript-native" else "chunk")
        elif base == "pt2":
            from flash_export.export.pt2 import export_pt2

            out = tmp / f"pt2_c{spec.chunk}.pt2"
            export_pt2(model, out, spec=spec)
        else:
            from flash_export.export.onnx import export_onnx

            out = tmp / f"{base}_c{spec.chunk}_{dtype}.onnx"
            export_onnx(model, out, target=base, dtype=dtype, spec=spec)
        return str(out), None
    except Exception as exc:  # one target failing to export is one row, not the whole run
        return None, f"export failed: {summary(exc)}"

"""Parity of exported artifacts against a float64 PyTorch reference rebuilt from the model spec.

The reference is never built from the artifact's own weights: it is the model described by the
`ModelSpec` recorded in the artifact (or the one the caller passes), run with plain attention in
float64 (`attention_swap.reference_forward`). Every backend is judged by the one tolerance rule in
`tolerance.compare`: its max abs error may be at most max(floor, 2 x the error of PyTorch's own
plain computation in the artifact's dtype).
"""

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from flash_export.artifacts.kinds import kind_of
from flash_export.artifacts.metadata import read_metadata
from flash_export.artifacts.recorded_io import recorded_io
from flash_export.artifacts.safety import all_nodes, open_onnx
from flash_export.artifacts.trust import Provenance, provenance
from flash_export.check.hf_validate import is_checkpoint_export, validate_checkpoint_export
from flash_export.check.parity import (
    Backend,
    ProgressFn,
    default_seqs,
    one_line,
    onnx_backend,
    openvino_backend,
    run_cases,
    sweep,
    torch_backend,
)
from flash_export.check.report import Case, ValidationReport
from flash_export.check.structural import (
    Check,
    custom_node_checks,
    dynamic_dim_checks,
    flash_modules,
    graph_inputs,
    manifest_checks,
    metadata_checks,
    onnx_dtype,
)
from flash_export.core.contract import DOMAIN, EXPORT_DTYPES, TARGETS
from flash_export.core.errors import ArtifactError, FlashExportError, ModelError
from flash_export.core.io_spec import IOSpec
from flash_export.core.tolerance import RULE
from flash_export.nn.conversion import no_flash_attention
from flash_export.nn.recorded import Recorded, check_graph_matches_spec, recorded
from flash_export.nn.spec import ModelSpec, check_memory, resolve_spec

DEFAULT_BATCHES = (1, 3)
RUNTIMES = ("onnxruntime", "openvino")
PathLike = Union[str, Path]

# --------------------------------------------------------------------------- validate


# long: a public entry point whose docstring is half of it; the body is 46 lines
def validate(artifact: PathLike, *, spec: Optional[ModelSpec] = None,
             seq: Optional[Sequence[int]] = None, batch: Sequence[int] = DEFAULT_BATCHES,
             dtype: Optional[str] = None, atol: Optional[float] = None,
             rtol: Optional[float] = None, provider: str = "cpu", all_targets: bool = False,
             trust: bool = False, expect_sha256: Optional[str] = None,
             max_memory: Optional[int] = None, model: Optional[nn.Module] = None,
             checkpoint: Optional[PathLike] = None, runtime: str = "onnxruntime",
             progress: Optional[ProgressFn] = None) -> ValidationReport:
    """Check an exported artifact against the float64 reference of the model it came from.

    The artifact is data: its metadata is parsed and checked against the graph before anything
    is built, a model file or checkpoint it names is used only with `trust` (or when the caller
    passes `spec`), and a `.pt` is loaded only from the user's trust store, `expect_sha256` or
    `trust` (see `flash_export.artifacts`).

    Args:
        artifact: a `.onnx` (any target), `.pt` (TorchScript, chunk or native attention) or
            `.pt2` (AOTInductor package) file written by flash-export.
        spec: the model to compare against; default: the ModelSpec recorded in the artifact.
        seq: sequence lengths; with the attention contract each L runs as (Lq=L, Lk=L) and
            (Lq=L, Lk=the next length), otherwise every dynamic size but the batch is L (moved
            into its declared bounds). Default: 1, chunk-1, chunk, chunk+1, 3*chunk+5, 1024.
        batch: batch sizes (default 1 and 3).
        dtype: "float32" or "float16"; default: the artifact's own.
        atol: with `rtol`, replaces the 2x-baseline rule by |a - r| <= atol + rtol * |r|.
        rtol: see `atol` (either alone counts the other as 0).
        provider: onnxruntime execution provider, "cpu" or "cuda".
        all_targets: also export and compare every other ONNX target (into a temp dir).
        trust: load a `.pt` or `.pt2` of unknown origin, and use the model file and weights the
            artifact records.
        expect_sha256: the artifact's SHA-256 as you know it; a different file is refused.
        max_memory: bytes the run may plan to use (default `spec.memory_limit()`); checked
            before the model and the inputs are allocated.
        model: the model to compare against, as an object (for artifacts exported from a model
            that no spec describes); it overrides `spec`.
        checkpoint: for a graph exported from a transformers checkpoint folder
            (`flash_export.hf.export_hf_onnx`): the folder, whose config and weights must be
            the exported ones; default: the folder recorded at export. The reference is then
            transformers' eager attention in float64 (`check.hf_validate`).
        runtime: what runs an ONNX artifact: "onnxruntime" (with `provider`), or "openvino"
            (CPU, float32; the standard target only: the others use operators OpenVINO lacks).
        progress: called as progress(done, total, label) while it runs.

    Returns:
        The report; `report.passed` is the verdict (`raise_for_failures()` turns it into a
        ValidationError). Backends that fail to load or run are failures in the report.

    Raises:
        ArtifactError: the artifact is missing, unreadable, of unknown origin (a `.pt` without
            `trust`), malformed, or its metadata contradicts its graph; or its spec names a model
            file or weights without `trust`.
        ModelError: the spec cannot be built.
        FlashExportError: the run would need more than `max_memory`, or a bad option.
        RuntimeLibraryError: provider "cuda" without a usable CUDA provider.
    """
    path = Path(artifact)
    if provider not in ("cpu", "cuda"):
        raise FlashExportError(f"provider must be 'cpu' or 'cuda', got {provider!r}")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise FlashExportError(f"unsupported dtype {dtype!r}; choose one of {EXPORT_DTYPES}")
    if runtime not in RUNTIMES:
        raise FlashExportError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    art = _Loaded.read(path, trust=trust, expect_sha256=expect_sha256)
    if runtime == "openvino" and (art.proto is None or art.recorded.target != "standard"):
        what = f"a {art.kind}" if art.proto is None else f"an ONNX {art.recorded.target} target"
        raise FlashExportError(f"{path} is {what} artifact; OpenVINO runs ONNX graphs of the "
                               "standard target only (export with --target standard)")
    if is_checkpoint_export(art.meta):
        if spec is not None or model is not None or all_targets or (dtype or "float32") != \
                "float32":
            raise FlashExportError(f"{path} was exported from a transformers checkpoint: it is "
                                   "validated against that checkpoint (checkpoint=, --hf), in "
                                   "float32, without a model spec or other targets")
        return validate_checkpoint_export(
            path, art.proto, art.meta, art.io, art.origin,
            checkpoint=Path(checkpoint) if checkpoint is not None else None, seq=seq,
            batch=batch, atol=atol, rtol=rtol, provider=provider, max_memory=max_memory,
            progress=progress, program=art.program)
    if checkpoint is not None:
        raise FlashExportError(f"{path} was not exported from a transformers checkpoint: "
                               "checkpoint= (--hf) does not apply")
    spec_source = "caller" if spec is not None or model is not None else "artifact"
    if spec is None and model is None:
        if art.recorded.spec is None:
            raise ArtifactError(f"{path} records no model spec (it was exported from a model "
                                "object): name the model with --model FILE.py:FACTORY (and "
                                "--weights), or pass model= to validate()")
        spec = resolve_spec(art.recorded.spec, {}, trust=trust, source=path)
    chunk = spec.chunk if spec is not None else art.recorded.chunk
    seqs = list(seq) if seq else default_seqs(chunk)
    cases = sweep(seqs, batch, [False, True] if art.takes_mask else [False], art.io)
    if spec is not None:
        art.check_spec(spec)
        check_memory(_validate_bytes(spec.parameter_count() or 0, spec.heads, spec.embed,
                                     cases), max_memory, f"validating {path.name}")
    run_dtype = art.run_dtype(dtype)
    if model is None:
        assert spec is not None
        model = spec.build()
    layers = flash_modules(model)
    if not layers:
        raise ModelError(no_flash_attention(model))
    check_memory(_validate_bytes(sum(p.numel() for p in model.parameters()), layers[0].heads,
                                 layers[0].embed_size, cases), max_memory,
                 f"validating {path.name}")
    report = ValidationReport(
        artifact=str(path), kind=art.kind, target=art.recorded.target, dtype=run_dtype,
        provider="openvino CPU" if runtime == "openvino" else provider, spec=spec,
        spec_source=spec_source, provenance=art.origin,
        rule="atol/rtol" if atol is not None or rtol is not None else RULE,
        checks=art.structural_checks(spec, model))
    backends = art.backends(model, run_dtype, provider, runtime)
    with tempfile.TemporaryDirectory(prefix="flash_export_validate_") as tmp:
        for other in (t for t in TARGETS if all_targets and t != art.recorded.target):
            (progress or (lambda d, t, label: None))(0, 0, f"exporting {other}")
            backends.append(_export_backend(model, spec, art.io, other, Path(tmp), run_dtype,
                                            provider=provider))
        results = run_cases(model, art.io, backends, cases, dtype=run_dtype, atol=atol,
                            rtol=rtol, progress=progress)
    report.backends = list(results.values())
    return report


@dataclass
class _Loaded:
    """An artifact as `validate` reads it: its graph or program, metadata and provenance."""

    path: Path
    kind: str
    meta: Dict[str, str]
    recorded: Recorded
    origin: Provenance
    io: IOSpec
    proto: Any = None  # the ONNX ModelProto (external data unread)
    program: Any = None  # what the kind's loader gave: a TorchScript module, a .pt2 package...

    @classmethod
    def read(cls, path: Path, *, trust: bool, expect_sha256: Optional[str]) -> "_Loaded":
        """Read and check `path` as data; a `.pt` is loaded only with provenance."""
        entry = kind_of(path)
        kind = entry.name
        if not path.is_file():
            raise ArtifactError(f"artifact not found: {path}")
        if entry.loader is None:  # a graph: data, run by onnxruntime
            with open_onnx(path) as opened:  # before onnxruntime opens anything it names
                proto = opened.model
                origin = provenance(path, expect_sha256=expect_sha256, trust=trust,
                                    digest=opened.sha256)  # the bytes just checked
            meta = {p.key: p.value for p in proto.metadata_props}
            io = recorded_io(meta, path, graph_inputs(proto))
            return cls(path, kind, meta, recorded(meta, path, kind), origin, io, proto=proto)
        recorded(read_metadata(path), path, kind)  # a malformed spec fails before any load
        program, meta, origin = entry.handler("loader")(path, trust=trust,
                                                        expect_sha256=expect_sha256)
        io = recorded_io(meta, path)
        return cls(path, kind, meta, recorded(meta, path, kind), origin, io, program=program)

    def check_spec(self, spec: ModelSpec) -> None:
        """Refuse a spec the file does not back (`check_graph_matches_spec`), before building."""
        if self.proto is not None:
            check_graph_matches_spec(spec, self.proto, self.path, nodes=False)
            return
        if not callable(getattr(self.program, "parameters", None)):  # compiled weights: no count
            return
        wanted = spec.parameter_count()
        held = sum(p.numel() for p in self.program.parameters())
        if wanted is not None and held < wanted:
            raise ArtifactError(f"{self.path}: the spec (embed {spec.embed}) needs {wanted:,} "
                                f"parameters, the TorchScript module holds {held:,}")

    def run_dtype(self, asked: Optional[str]) -> str:
        """The dtype to run in: `asked`, else the artifact's; a graph or package only in its own."""
        only = kind_of(self.path).run_dtype
        if only is not None:
            if asked not in (None, only):
                raise ArtifactError(f"{self.path} is a {only} package and runs only in {only}; "
                                    f"drop --dtype {asked}")
            return only
        if self.proto is None:
            params = list(self.program.parameters())
            own = str(params[0].dtype).replace("torch.", "") if params else "float32"
            return asked or (own if own in EXPORT_DTYPES else "float32")
        own = onnx_dtype(self.proto, self.meta)
        if asked is not None and asked != own:
            raise ArtifactError(f"{self.path} is a {own} graph and runs only in {own}; drop "
                                f"--dtype {asked} or export with it")
        return own

    @property
    def takes_mask(self) -> bool:
        """Whether the model takes a mask (attention or padding), so cases mask or not."""
        return any(t.role != "data" for t in self.io.inputs)

    def structural_checks(self, spec: Optional[ModelSpec], model: nn.Module) -> List[Check]:
        """Metadata, manifest and custom-node attributes against the spec and its model."""
        checks = metadata_checks(self.meta, model) + manifest_checks(self.path)
        if self.proto is not None:
            checks += dynamic_dim_checks(self.proto, self.io)
        if self.proto is not None and (self.recorded.target == "custom"
                                       or any(n.domain == DOMAIN for n in all_nodes(self.proto))):
            checks += custom_node_checks(self.proto, flash_modules(model))
        return checks

    def backends(self, model: nn.Module, dtype: str, provider: str,
                 runtime: str = "onnxruntime") -> List[Backend]:
        """Eager (rebuilt from the spec) and the artifact itself, in `dtype`."""
        tdtype = getattr(torch, dtype)
        eager = torch_backend("eager", copy.deepcopy(model).to(tdtype),
                              "(in memory, rebuilt from the spec)", self.io)
        if self.program is not None:
            run = kind_of(self.path).handler("validate_backend")
            return [eager, run(self.program, str(self.path), self.io, self.meta, dtype)]
        if runtime == "openvino":
            return [eager, openvino_backend(f"openvino:{self.recorded.target}", self.path,
                                            self.io)]
        return [eager, onnx_backend(f"onnx:{self.recorded.target}", self.path, provider,
                                    self.io)]


def _validate_bytes(params: int, heads: int, embed: int, cases: Sequence[Case]) -> int:
    """What a validate run allocates at most, in bytes.

    The model lives in float32, in the run dtype and in float64 for the reference (about 24
    bytes per parameter with copies); the plain float64 reference holds a few (B, H, Lq, Lk)
    score tensors, the same-dtype baseline a few more.
    """
    scores = max((c.batch * heads * c.seq_q * c.seq_k for c in cases), default=0)
    rows = max((c.batch * (c.seq_q + 2 * c.seq_k) for c in cases), default=0)
    return 24 * params + 48 * scores + 64 * rows * embed + (64 << 20)


def _export_backend(model: nn.Module, spec: Optional[ModelSpec], io: IOSpec, target: str,
                    tmp: Path, dtype: str, *, provider: str) -> Backend:
    name = f"onnx:{target}"
    out = tmp / f"{target}.onnx"
    try:
        from flash_export.export.onnx import export_onnx

        export_onnx(model, out, target=target, dtype=dtype, spec=spec, io=io)
    except Exception as exc:  # export failures of one target must not stop the others
        return Backend(name, f"(export to {target} failed)", None,
                       load_error=f"export failed: {one_line(exc)}")
    backend = onnx_backend(name, out, provider, io)
    backend.source = f"(exported on the fly: {target}, {dtype})"
    return backend

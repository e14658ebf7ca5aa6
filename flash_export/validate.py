"""Parity of exported artifacts against a float64 PyTorch reference rebuilt from the model spec.

The reference is never built from the artifact's own weights: it is the model described by the
`ModelSpec` recorded in the artifact (or the one the caller passes), run with plain attention in
float64 (`attention.reference_forward`). Every backend is judged by the one tolerance rule in
`tolerance.compare`: its max abs error may be at most max(floor, 2 x the error of PyTorch's own
plain computation in the artifact's dtype).
"""

import copy
import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from flash_export.artifact import (
    Provenance,
    artifact_kind,
    manifest_path,
    provenance,
    read_manifest,
    read_metadata,
    verify_manifest,
)
from flash_export.attention import FlashAttention
from flash_export.contract import DOMAIN, INT, ONNX_ELEM, OP_NAME, TARGETS
from flash_export.errors import ArtifactError, FlashExportError
from flash_export.parity import (
    Backend,
    BackendResult,
    Case,
    ProgressFn,
    default_seqs,
    one_line,
    onnx_backend,
    run_cases,
    sweep,
    torch_backend,
)
from flash_export.safety import all_nodes
from flash_export.spec import (
    ModelSpec,
    check_graph_matches_spec,
    check_memory,
    recorded,
    resolve_spec,
)

DEFAULT_BATCHES = (1, 3)
PathLike = Union[str, Path]

@dataclass(frozen=True)
class Check:
    """One structural check: a property of the artifact against what the spec implies."""

    name: str
    expected: str
    got: str
    passed: bool


@dataclass
class ValidationReport:
    """Everything `validate` found; `passed` is the verdict."""

    artifact: str
    kind: str  # "onnx" or "torchscript"
    target: Optional[str]
    dtype: str
    provider: str
    spec: ModelSpec
    spec_source: str  # "artifact" or "caller"
    provenance: Provenance
    rule: str
    checks: List[Check] = field(default_factory=list)
    backends: List[BackendResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every structural check and every backend passed."""
        return all(c.passed for c in self.checks) and all(b.passed for b in self.backends)

    def failure_lines(self) -> List[str]:
        """One line per failed check, backend load or case, naming the backend and shape."""
        lines = [f"check {c.name}: expected {c.expected}, got {c.got}"
                 for c in self.checks if not c.passed]
        for b in self.backends:
            if b.load_error:
                lines.append(f"{b.name}: failed to load: {b.load_error}")
            for r in b.failures:
                if r.error:
                    lines.append(f"{b.name} {r.case.label}: {r.error}")
                elif r.comparison is not None:
                    c = r.comparison
                    lines.append(f"{b.name} {r.case.label}: max abs {c.max_abs:.3g} > bound "
                                 f"{c.bound:.3g} at {list(c.worst_index)} "
                                 f"(nonfinite {c.nonfinite})")
        return lines

    def raise_for_failures(self) -> None:
        """Raise ValidationError with the first failures when the report did not pass."""
        from flash_export.errors import ValidationError

        if not self.passed:
            lines = self.failure_lines()
            more = f" (+{len(lines) - 3} more)" if len(lines) > 3 else ""
            raise ValidationError("; ".join(lines[:3]) + more)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready view of the whole report."""
        return {
            "artifact": self.artifact, "kind": self.kind, "target": self.target,
            "dtype": self.dtype, "provider": self.provider, "passed": self.passed,
            "spec": dataclasses.asdict(self.spec), "spec_source": self.spec_source,
            "provenance": dataclasses.asdict(self.provenance),
            "rule": self.rule,
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "backends": [b.to_dict() for b in self.backends],
        }


# --------------------------------------------------------------------------- artifact reading


def _load_onnx(path: Path) -> Any:
    """The graph of `path` (external data unread) after the `safety` checks.

    Runs before any onnxruntime session is built, so a hostile external-data reference is
    rejected before anything opens the file it names.
    """
    from flash_export.safety import check_onnx_file

    return check_onnx_file(path)


# --------------------------------------------------------------------------- structural checks


def _flash_modules(model: nn.Module) -> List[FlashAttention]:
    return [m for m in model.modules() if isinstance(m, FlashAttention)]


def metadata_checks(meta: Dict[str, str], spec: ModelSpec) -> List[Check]:
    """The attention config recorded in the metadata against the spec."""
    expected = {"embed": str(spec.embed), "heads": str(spec.heads),
                "chunk_size": str(spec.chunk), "causal": str(int(spec.causal))}
    return [Check(f"metadata.{key}", want, meta.get(key, "(missing)"),
                  meta.get(key) == want) for key, want in expected.items()]


def custom_node_checks(model_proto: Any, modules: List[FlashAttention]) -> List[Check]:
    """Each com.flash_export::FlashAttention node's attributes against the module it came from.

    Nodes and FlashAttention modules are paired in order (the exporter emits them in forward
    order), so a wrong `chunk_size` fails even though results barely depend on it.
    """
    from onnx import helper

    nodes = [n for n in all_nodes(model_proto) if n.domain == DOMAIN and n.op_type == OP_NAME]
    checks = [Check("graph.FlashAttention_nodes", str(len(modules)), str(len(nodes)),
                    len(nodes) == len(modules))]
    for i, (node, fa) in enumerate(zip(nodes, modules)):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        want: Dict[str, Any] = {"num_heads": fa.heads, "chunk_size": fa.chunk_size,
                                "causal": int(fa.causal), "scale": fa.scale}
        for key, value in want.items():
            got = attrs.get(key)
            if key == "scale":
                ok = got is not None and math.isclose(float(got), value, rel_tol=1e-6)
                shown = "(missing)" if got is None else f"{float(got):.7g}"
                checks.append(Check(f"node[{i}].{key}", f"{value:.7g}", shown, ok))
            else:  # strictly an INT: a FLOAT 1.0 is not the op's causal=1
                kind = next(a.type for a in node.attribute if a.name == key) if got is not None \
                    else None
                ok = kind == helper.AttributeProto.INT and got == int(value)
                shown = "(missing)" if got is None else (
                    str(got) if kind == helper.AttributeProto.INT else f"{got!r} (not an {INT})")
                checks.append(Check(f"node[{i}].{key}", str(int(value)), shown, ok))
    return checks


def _onnx_dtype(model_proto: Any, meta: Dict[str, str]) -> str:
    for inp in model_proto.graph.input:
        if inp.name == "queries":
            return ONNX_ELEM.get(inp.type.tensor_type.elem_type, "float32")
    return meta.get("dtype", "float32")


# --------------------------------------------------------------------------- validate


def validate(artifact: PathLike, *, spec: Optional[ModelSpec] = None,
             seq: Optional[Sequence[int]] = None, batch: Sequence[int] = DEFAULT_BATCHES,
             dtype: Optional[str] = None, atol: Optional[float] = None,
             rtol: Optional[float] = None, provider: str = "cpu", all_targets: bool = False,
             trust: bool = False, expect_sha256: Optional[str] = None,
             max_memory: Optional[int] = None,
             progress: Optional[ProgressFn] = None) -> ValidationReport:
    """Check an exported artifact against the float64 reference of the model it came from.

    The artifact is data: its metadata is parsed and checked against the graph before anything
    is built, a model file or checkpoint it names is used only with `trust` (or when the caller
    passes `spec`), and a `.pt` is loaded only from the user's trust store, `expect_sha256` or
    `trust` (see `flash_export.artifact`).

    Args:
        artifact: a `.onnx` (any target) or `.pt` (TorchScript) file written by flash-export.
        spec: the model to compare against; default: the ModelSpec recorded in the artifact.
        seq: sequence lengths; each L runs as (Lq=L, Lk=L) and (Lq=L, Lk=the next length).
            Default: 1, chunk-1, chunk, chunk+1, 3*chunk+5, 1024.
        batch: batch sizes (default 1 and 3).
        dtype: "float32" or "float16"; default: the artifact's own.
        atol: with `rtol`, replaces the 2x-baseline rule by |a - r| <= atol + rtol * |r|.
        rtol: see `atol` (either alone counts the other as 0).
        provider: onnxruntime execution provider, "cpu" or "cuda".
        all_targets: also export and compare every other ONNX target (into a temp dir).
        trust: load a `.pt` of unknown origin, and use the model file and weights the artifact
            records.
        expect_sha256: the artifact's SHA-256 as you know it; a different file is refused.
        max_memory: bytes the run may plan to use (default `spec.memory_limit()`); checked
            before the model and the inputs are allocated.
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
    kind = artifact_kind(path)
    if provider not in ("cpu", "cuda"):
        raise FlashExportError(f"provider must be 'cpu' or 'cuda', got {provider!r}")
    if dtype is not None and dtype not in ("float32", "float16"):
        raise FlashExportError(f"unsupported dtype {dtype!r}; choose float32 or float16")
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    report_progress = progress or (lambda done, total, label: None)

    proto = scripted = None
    if kind == "onnx":
        proto = _load_onnx(path)
        meta = {p.key: p.value for p in proto.metadata_props}
        origin = provenance(path, expect_sha256=expect_sha256, trust=trust)
    else:
        from flash_export.export import load_torchscript_checked

        recorded(read_metadata(path), path, kind)  # a malformed spec fails before any load
        scripted, meta, origin = load_torchscript_checked(path, trust=trust,
                                                          expect_sha256=expect_sha256)
    rec = recorded(meta, path, kind)
    spec_source = "caller" if spec is not None else "artifact"
    if spec is None:
        spec = resolve_spec(rec.spec, {}, trust=trust, source=path)
    seqs = list(seq) if seq else default_seqs(spec.chunk)
    cases = sweep(seqs, batch, [False])
    if proto is not None:
        check_graph_matches_spec(spec, proto, path, nodes=False)
    elif scripted is not None:
        _check_script_matches_spec(spec, scripted, path)
    check_memory(_validate_bytes(spec, spec.parameter_count() or 0, cases), max_memory,
                 f"validating {path.name}")

    artifact_dtype = _onnx_dtype(proto, meta) if proto is not None else _script_dtype(scripted)
    run_dtype = dtype or artifact_dtype
    tdtype = getattr(torch, run_dtype)
    if proto is not None and dtype is not None and dtype != artifact_dtype:
        raise ArtifactError(f"{path} is a {artifact_dtype} graph and runs only in "
                            f"{artifact_dtype}; drop --dtype {dtype} or export with it")

    model = spec.build()
    if spec.parameter_count() is None:  # a model factory's size is known only now
        params = sum(p.numel() for p in model.parameters())
        check_memory(_validate_bytes(spec, params, cases), max_memory,
                     f"validating {path.name}")
    modules = _flash_modules(model)
    report = ValidationReport(
        artifact=str(path), kind=kind, target=rec.target, dtype=run_dtype, provider=provider,
        spec=spec, spec_source=spec_source, provenance=origin,
        rule=("atol/rtol" if atol is not None or rtol is not None else
              "max abs error <= max(floor, 2 x PyTorch's own plain same-dtype error) vs float64"))
    report.checks.extend(metadata_checks(meta, spec))
    report.checks.extend(manifest_checks(path))
    if proto is not None and (rec.target == "custom"
                              or any(n.domain == DOMAIN for n in all_nodes(proto))):
        report.checks.extend(custom_node_checks(proto, modules))

    backends: List[Backend] = [
        torch_backend("eager", copy.deepcopy(model).to(tdtype),
                      "(in memory, rebuilt from the spec)")]
    if scripted is not None:
        backends.append(torch_backend("torchscript", scripted.eval().to(tdtype), str(path)))
        mask_modes: List[bool] = [False, True]
    else:
        backends.append(onnx_backend(f"onnx:{rec.target}", path, provider))
        graph_inputs = {i.name for i in proto.graph.input} if proto is not None else set()
        mask_modes = [False, True] if "mask" in graph_inputs else [False]

    with tempfile.TemporaryDirectory(prefix="flash_export_validate_") as tmp:
        if all_targets:
            for other in (t for t in TARGETS if t != rec.target):
                report_progress(0, 0, f"exporting {other}")
                backends.append(_export_backend(model, spec, other, Path(tmp), run_dtype,
                                                mask=(kind == "onnx" and True in mask_modes),
                                                provider=provider))
        results = run_cases(model, backends, sweep(seqs, batch, mask_modes), embed=spec.embed,
                            dtype=run_dtype, atol=atol, rtol=rtol, progress=report_progress)
    report.backends = list(results.values())
    return report


def _script_dtype(scripted: Any) -> str:
    params = list(scripted.parameters())
    name = str(params[0].dtype).replace("torch.", "") if params else "float32"
    return name if name in ("float32", "float16") else "float32"


def _check_script_matches_spec(spec: ModelSpec, scripted: Any, path: Path) -> None:
    """The .pt counterpart of `check_graph_matches_spec`: its parameters bound the spec."""
    wanted = spec.parameter_count()
    held = sum(p.numel() for p in scripted.parameters())
    if wanted is not None and held < wanted:
        raise ArtifactError(f"{path}: the spec (embed {spec.embed}) needs {wanted:,} parameters, "
                            f"the TorchScript module holds {held:,}")


def _validate_bytes(spec: ModelSpec, params: int, cases: Sequence[Case]) -> int:
    """What a validate run allocates at most, in bytes, from the spec alone.

    The model lives in float32, in the run dtype and, per case, in float64 for the reference
    (about 24 bytes per parameter with copies); the plain float64 reference holds a few
    (B, H, Lq, Lk) score tensors, the same-dtype baseline a few more.
    """
    scores = max((c.batch * spec.heads * c.seq_q * c.seq_k for c in cases), default=0)
    rows = max((c.batch * (c.seq_q + 2 * c.seq_k) for c in cases), default=0)
    return 24 * params + 48 * scores + 64 * rows * spec.embed + (64 << 20)


def manifest_checks(path: Path) -> List[Check]:
    """The manifest beside `path`, when there is one: the file and its data must match it."""
    if not read_manifest(path):
        return []
    try:
        verify_manifest(path)
    except ArtifactError:
        return [Check("manifest", f"{manifest_path(path).name} lists this file", "it differs",
                      False)]
    return [Check("manifest", f"{manifest_path(path).name} lists this file", "it does", True)]


def _export_backend(model: nn.Module, spec: ModelSpec, target: str, tmp: Path, dtype: str, *,
                    mask: bool, provider: str) -> Backend:
    name = f"onnx:{target}"
    out = tmp / f"{target}.onnx"
    try:
        from flash_export.onnx_export import export_onnx

        export_onnx(model, out, target=target, dtype=dtype, spec=spec, mask=mask)
    except Exception as exc:  # export failures of one target must not stop the others
        return Backend(name, f"(export to {target} failed)", None, None,
                       load_error=f"export failed: {one_line(exc)}")
    backend = onnx_backend(name, out, provider)
    backend.source = f"(exported on the fly: {target}, {dtype})"
    return backend


def report_json(report: ValidationReport) -> str:
    """The full report as indented JSON."""
    return json.dumps(report.to_dict(), indent=2)

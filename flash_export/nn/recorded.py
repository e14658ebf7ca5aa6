"""What an artifact records about its model, read as untrusted data and checked against the file.

The model spec (how to rebuild the reference), the IOSpec (inputs and outputs), the export
precision and target: each parsed with every value checked, cross-checked between keys, and (for
the spec) bounded by what the graph itself holds before anything is built from it. Imports no
torch.
"""

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional

from flash_export.artifacts.recorded_io import numel
from flash_export.core.contract import DOMAIN, EXPORT_DTYPES, ONNX_FLOATS, OP_NAME, TARGETS
from flash_export.core.errors import ArtifactError
from flash_export.nn.spec import ModelSpec


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What an artifact's metadata says about its model, parsed and cross-checked.

    Attributes:
        spec: the recorded ModelSpec; None for an export of a model object no spec describes.
        chunk: the (first) FlashAttention layer's chunk size.
        dtype: the export precision, one of `contract.EXPORT_DTYPES`.
        target: the ONNX target (None for TorchScript).
    """

    spec: Optional[ModelSpec]
    chunk: int
    dtype: str
    target: Optional[str]


def recorded(meta: Mapping[str, str], path: "os.PathLike[str] | str", kind: str) -> Recorded:
    """Parse an artifact's metadata; every value is checked, none is trusted to be well formed.

    Raises:
        ArtifactError: a malformed spec, an unknown dtype or target, a missing or bad
            chunk_size, or attention keys (embed, heads, chunk_size, causal) that contradict
            the recorded spec.
    """
    spec = spec_from_metadata(meta, path) if "model_spec" in meta else None
    if spec is not None and spec.model is None:  # a plain FlashAttention: the keys are the spec
        expected = {"embed": str(spec.embed), "heads": str(spec.heads),
                    "chunk_size": str(spec.chunk), "causal": str(int(spec.causal))}
        for key, want in expected.items():
            if key in meta and meta[key] != want:
                raise ArtifactError(f"{path}: metadata {key} is {meta[key][:40]!r} but its "
                                    f"model_spec says {want}: the metadata was edited")
    text = meta.get("chunk_size", "")
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 2**31:
        raise ArtifactError(f"{path}: metadata chunk_size {text[:40]!r} is not a positive int")
    dtype = meta.get("dtype", "float32")
    if dtype not in EXPORT_DTYPES:
        raise ArtifactError(f"{path}: metadata dtype {dtype[:40]!r} is not one of "
                            f"{', '.join(EXPORT_DTYPES)}")
    target = None
    if kind == "onnx":
        target = meta.get("target", "custom")
        if target not in TARGETS:
            raise ArtifactError(f"{path}: metadata target {target[:40]!r} is not one of "
                                f"{', '.join(TARGETS)}")
    return Recorded(spec, int(text), dtype, target)


def base_spec(rec: Recorded, meta: Mapping[str, str],
              path: "os.PathLike[str] | str") -> ModelSpec:
    """What explicit model options apply to: the recorded spec, or the attention keys.

    An export of a model object records no spec; the caller completes one with --model.

    Raises:
        ArtifactError: the attention keys are malformed.
    """
    if rec.spec is not None:
        return rec.spec
    try:
        return ModelSpec(embed=int(meta.get("embed", "")), heads=int(meta.get("heads", "")),
                         chunk=rec.chunk, causal=meta.get("causal") == "1")
    except ValueError as exc:
        raise ArtifactError(f"{path}: bad attention metadata: {exc}") from exc


def check_graph_matches_spec(spec: ModelSpec, model_proto: Any, path: "os.PathLike[str] | str",
                             *, nodes: bool = True) -> None:
    """Check a spec against what an ONNX graph holds, before anything is built from the spec.

    The graph's own facts (the embed of its `queries` input, the size of its float weights and,
    with `nodes`, its FlashAttention nodes' attributes) bound what the spec may claim, so edited
    metadata cannot make `validate` or `bench` build a model, allocate memory or label results
    that the file does not back. (`validate` reports node attributes as structural checks.)

    Raises:
        ArtifactError: naming the recorded value and what the graph holds.
    """
    from flash_export.artifacts.safety import all_nodes

    graph = model_proto.graph
    for inp in graph.input:
        if inp.name == "queries":
            dims = inp.type.tensor_type.shape.dim
            if len(dims) == 3 and dims[2].HasField("dim_value") and \
                    dims[2].dim_value != spec.embed:
                raise ArtifactError(f"{path}: the spec says embed {spec.embed}, the graph's "
                                    f"queries input has embed {dims[2].dim_value}")
    if nodes and spec.model is None:
        for node in (n for n in all_nodes(model_proto) if n.domain == DOMAIN
                     and n.op_type == OP_NAME):
            attrs = {a.name: a for a in node.attribute}
            for key, want in (("num_heads", spec.heads), ("chunk_size", spec.chunk),
                              ("causal", int(spec.causal))):
                if key in attrs and attrs[key].i != want:
                    raise ArtifactError(f"{path}: the spec says {key} {want}, the graph's "
                                        f"{OP_NAME} node has {attrs[key].i}")
    wanted = spec.parameter_count()
    # The exporter merges equal initializers (a model's fresh LayerNorms are all ones, say), so
    # each counts once per node that reads it.
    uses: Dict[str, int] = {}
    for node in all_nodes(model_proto):
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    held = sum(numel(t.dims) * max(1, uses.get(t.name, 0)) for t in graph.initializer
               if t.data_type in ONNX_FLOATS)
    if wanted is not None and held < wanted:
        raise ArtifactError(f"{path}: the spec (embed {spec.embed}) needs {wanted:,} parameters, "
                            f"the graph holds {held:,} float weights")


def spec_from_metadata(meta: Mapping[str, str], path: "os.PathLike[str] | str") -> ModelSpec:
    """The ModelSpec recorded in an artifact's metadata.

    Raises:
        ArtifactError: no spec, or one that is malformed or out of range.
    """
    text = meta.get("model_spec")
    if not text:
        raise ArtifactError(f"{path} records no model_spec: pass the model options explicitly")
    try:
        return ModelSpec.from_json(text)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: bad model_spec metadata: {exc}") from exc

"""Structural checks: what an artifact's graph and metadata say against the model it should hold.

Each check is a property (a node attribute, a metadata key, a dynamic dim, the manifest) with the
value the model implies and the one the file has; `validate` reports them beside the numbers.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

from torch import nn

from flash_export.artifacts.manifest import manifest_path, read_manifest, verify_manifest
from flash_export.artifacts.safety import all_nodes
from flash_export.core.contract import DOMAIN, INT, ONNX_ELEM, ONNX_FLOATS, OP_NAME
from flash_export.core.errors import ArtifactError
from flash_export.core.io_graph import GraphInput
from flash_export.core.io_spec import IOSpec
from flash_export.nn.attention import FlashAttention


@dataclass(frozen=True)
class Check:
    """One structural check: a property of the artifact against what the spec implies."""

    name: str
    expected: str
    got: str
    passed: bool


def flash_modules(model: nn.Module) -> List[FlashAttention]:
    """The FlashAttention layers of `model`, in order."""
    return [m for m in model.modules() if isinstance(m, FlashAttention)]


def metadata_checks(meta: Dict[str, str], model: nn.Module) -> List[Check]:
    """The attention config recorded in the metadata against the rebuilt model's first layer."""
    layer = flash_modules(model)[0]
    expected = {"embed": str(layer.embed_size), "heads": str(layer.heads),
                "chunk_size": str(layer.chunk_size), "causal": str(int(layer.causal))}
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


def graph_inputs(model_proto: Any) -> List[GraphInput]:
    """(name, dtype name, dims) of a graph's inputs (see `io_graph.io_from_graph`)."""
    out: List[GraphInput] = []
    for value in model_proto.graph.input:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tensor.shape.dim]
        out.append((value.name, ONNX_ELEM.get(tensor.elem_type), dims))
    return out


def onnx_dtype(model_proto: Any, meta: Dict[str, str]) -> str:
    """The precision of a graph: its first floating-point input's (else the metadata's)."""
    for inp in model_proto.graph.input:
        if inp.type.tensor_type.elem_type in ONNX_FLOATS:
            return ONNX_ELEM[inp.type.tensor_type.elem_type]
    return meta.get("dtype", "float32")


def dynamic_dim_checks(model_proto: Any, io: IOSpec) -> List[Check]:
    """Each dim the IOSpec declares dynamic must be dynamic in the graph (not specialised)."""
    graph = {i.name: i for i in model_proto.graph.input}
    checks = []
    for t in io.inputs:
        dims = graph[t.name].type.tensor_type.shape.dim if t.name in graph else []
        for axis, (want, got) in enumerate(zip(t.dims, dims)):
            if isinstance(want, str) and not io.is_static(want):
                ok = not got.HasField("dim_value")
                checks.append(Check(f"graph.{t.name}.dim{axis}", f"{want} (dynamic)",
                                    f"{want} (dynamic)" if ok else str(got.dim_value), ok))
    return checks


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

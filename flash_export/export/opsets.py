"""Which ONNX opsets and IR versions an export uses.

What the installed onnxruntime loads and what torch's exporter converts to, probed once per
process.
"""

import functools
from typing import Optional, Tuple

import onnx

from flash_export.core.errors import ExportError


@functools.cache
def runtime_limits() -> Tuple[int, int]:
    """The highest (default-domain opset, IR version) the installed onnxruntime loads.

    Probed with a one-node model, so it follows whichever onnxruntime is installed.
    """
    import onnxruntime as ort

    def loads(opset: int, ir_version: int) -> bool:
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])],
                                       "probe", [x], [y])
        model = onnx.helper.make_model(graph, ir_version=ir_version,
                                       opset_imports=[onnx.helper.make_opsetid("", opset)])
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime reports an unsupported version as a generic failure
            return False
        return True

    ir = next((i for i in range(onnx.IR_VERSION, 3, -1) if loads(13, i)), 7)
    opset = next((o for o in range(onnx.defs.onnx_opset_version(), 12, -1) if loads(o, ir)), 17)
    return opset, ir


def exporter_max_opset() -> int:
    """The highest opset torch's exporter reliably converts its opset-18 graph to.

    torch.onnx delegates to onnxscript's version converter, which steps every op up to its own
    maximum; past it, it falls back to onnx's C converter, which lacks adapters for ops such as
    Gelu and then silently keeps opset 18.
    """
    try:
        from onnxscript.version_converter._version_converter import SUPPORTED_MAX_ONNX_OPSET
    except ImportError:  # a newer onnxscript moved it: trust torch's own constant
        from torch.onnx._constants import ONNX_MAX_OPSET as SUPPORTED_MAX_ONNX_OPSET
    return int(SUPPORTED_MAX_ONNX_OPSET)


def default_opset(target: str) -> int:
    """The opset `export_onnx` uses for `target` when none is given."""
    return max(_min_opset(target), min(runtime_limits()[0], exporter_max_opset()))


def ir_version_for(opset: int, proto_ir: int) -> int:
    """The IR version of the onnx release that introduced `opset`, capped at the runtime's."""
    needed = proto_ir
    for _release, ir, ai_opset, *_ in onnx.helper.VERSION_TABLE:
        if ai_opset >= opset:
            needed = max(needed, ir)
            break
    return min(needed, runtime_limits()[1])


def choose_opset(target: str, opset: Optional[int]) -> int:
    """`opset`, or the default for `target`, after checking every party can honour it.

    Raises:
        ExportError: the target needs more, or onnxruntime or the exporter cannot go that high.
    """
    low = _min_opset(target)
    high = min(runtime_limits()[0], exporter_max_opset())
    if opset is None:
        return default_opset(target)
    if not low <= opset <= high:
        raise ExportError(f"opset {opset} is not usable for target {target!r}: the target needs "
                          f">= {low}, the installed onnxruntime loads <= {runtime_limits()[0]} "
                          f"and the exporter converts to <= {exporter_max_opset()}")
    return opset


def _min_opset(target: str) -> int:
    from flash_export.export.onnx_targets import TARGETS

    return TARGETS[target].min_opset

"""ONNX export of a swapped transformers model: `flash_export::attention` as our custom node.

A swapped model calls the op `flash_export::attention` (`flash_export.hf.attention`), which
`torch.onnx.export(dynamo=True)` keeps as one call per layer; `translations()` turns each call
into one ``com.flash_export::FlashAttention`` node (the contract of `flash_export.core.contract`):
the default overload with or without its mask input, the v2 overload (grouped heads read
head-major, what swapped layers call) as a version-2 node, through the custom target's own node
functions in `flash_export.export.onnx_targets`. FlashAttention models reach that node through
their own opaque op (`OnnxAttention`); this table is for the registered op, which transformers
models (and `.pt2` packages) call.

A prototype (issue 27, phase A): `export_swapped` writes a swapped model's forward to a file
onnxruntime runs through `flash_export.runtime.create_session`, without the flash-export
metadata (IOSpec, hashes, task) that `validate`, `bench` and `serve` read.
"""

import logging
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import onnx
import torch
from onnxscript import BOOL
from onnxscript.function_libs.torch_lib.tensor_typing import TFloat
from torch import nn

from flash_export.core.errors import ExportError, summary
from flash_export.export.onnx_targets import (
    _custom_node,
    _custom_node_masked,
    flash_attention_v2_node,
)
from flash_export.export.opsets import choose_opset, ir_version_for


def flash_attention_node(query: TFloat, key: TFloat, value: TFloat, mask: Optional[BOOL] = None,
                         num_heads: int = 1, chunk_size: int = 64, causal: bool = False,
                         scale: float = 1.0) -> TFloat:
    """`flash_export::attention` (B, Lq, E), (B, Lk, E) x2[, mask] -> one FlashAttention node.

    A traced function (the exporter runs it on its symbolic values): the optional mask picks
    the node with or without its fourth input; `causal` becomes the node's INT attribute.
    """
    if mask is None:
        return _custom_node(query, key, value, num_heads=num_heads, chunk_size=chunk_size,
                            causal=int(causal), scale=scale)
    return _custom_node_masked(query, key, value, mask, num_heads=num_heads,
                               chunk_size=chunk_size, causal=int(causal), scale=scale)


def translations() -> Dict[Any, Any]:
    """The exporter's custom translation table for the registered op (registering it first)."""
    from flash_export.nn.torch_op import register

    register()
    return {torch.ops.flash_export.attention.default: flash_attention_node,
            torch.ops.flash_export.attention.v2: flash_attention_v2_node}


def export_swapped(model: nn.Module, path: Union[str, Path], *, kwargs: Mapping[str, Any],
                dynamic_shapes: Mapping[str, Any], output_names: Sequence[str],
                opset: Optional[int] = None) -> Path:
    """Export a swapped model's forward(**kwargs) to `path` with our node for its attention.

    Args:
        model: a model switched by `flash_export.hf.swap_attention`, in eval mode.
        path: the `.onnx` file to write.
        kwargs: example inputs by forward argument name (a padded `attention_mask`: with an
            all-ones sample the exporter may fold the mask away).
        dynamic_shapes: per input, {axis: name} of the dims that stay dynamic.
        output_names: names of the graph outputs, in the order forward returns them.
        opset: default-domain opset; default the highest onnxruntime and the exporter share.

    Returns:
        `path`.

    Raises:
        ExportError: the exporter fails (its root cause in one line).
    """
    opset = choose_opset("custom", opset)
    dims = {name: {axis: torch.export.Dim.DYNAMIC for axis in axes}
            for name, axes in dynamic_shapes.items()}
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            program = torch.onnx.export(
                model, (), kwargs=dict(kwargs), dynamo=True, input_names=list(kwargs),
                output_names=list(output_names), dynamic_shapes=dims,
                custom_translation_table=translations(), opset_version=opset, verbose=False)
    except Exception as exc:  # the exporter raises many types; report the root cause
        cause: BaseException = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise ExportError(f"torch.onnx.export failed: {summary(cause)}") from exc
    finally:
        quiet.setLevel(level)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    proto.ir_version = ir_version_for(opset, proto.ir_version)
    onnx.save_model(proto, str(path))
    return Path(path)

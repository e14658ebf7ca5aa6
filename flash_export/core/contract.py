"""The custom op's contract on the Python side, written once. Imports neither torch nor onnx.

Node: ``com.flash_export::FlashAttention``, version 1. Inputs ``query (B, Lq, E)``,
``key (B, Lk, E)``, ``value (B, Lk, E)`` (float32 or float16, all alike) and an optional bool
``mask`` broadcastable to ``(B, num_heads, Lq, Lk)``, True = attend. Output ``(B, Lq, E)`` in
query's dtype. Attributes (`NODE_ATTRIBUTES`): ``num_heads`` INT >= 1 dividing E (required),
``chunk_size`` INT >= 1 (default 64), ``causal`` INT 0 or 1 (default 0, bottom-right aligned:
query i sees key j iff j <= i + Lk - Lq), ``scale`` FLOAT, finite and not 0 (default
1/sqrt(E/num_heads); it multiplies the logits). Masking decides visibility, values decide numbers:
a row that sees no key gives zeros; a row that sees keys whose logits are all -inf gives NaN. The
native adapter (custom_ops/ort) states the same facts in C++.
"""

from typing import Dict, Tuple

DOMAIN = "com.flash_export"
DOMAIN_VERSION = 1
OP_NAME = "FlashAttention"

# AttributeProto type names, as onnx.AttributeProto.AttributeType spells them.
INT, FLOAT = "INT", "FLOAT"
# name -> (type, required)
NODE_ATTRIBUTES: Dict[str, Tuple[str, bool]] = {
    "num_heads": (INT, True),
    "chunk_size": (INT, False),
    "causal": (INT, False),
    "scale": (FLOAT, False),
}

TARGETS = ("custom", "standard", "contrib", "attention23")
# Precisions an artifact may be exported in (graph inputs and weights). Our dtype names are
# torch's and numpy's own (`getattr(torch, name)`, `numpy.dtype(name)`; numpy has no bfloat16).
EXPORT_DTYPES = ("float32", "float16")
# ONNX TensorProto element type -> dtype name, for the types a model's inputs and weights use.
ONNX_ELEM = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16", 7: "int64",
             6: "int32", 9: "bool"}
ONNX_FLOATS = frozenset({1, 10, 11, 16})
# onnxruntime's NodeArg.type string -> dtype name.
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
             "tensor(double)": "float64", "tensor(bfloat16)": "bfloat16",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def feed_dtype(ort_type: str) -> str:
    """The numpy dtype name to feed a graph input of onnxruntime type `ort_type`.

    float32 for types numpy lacks (bfloat16) or this table does not know.
    """
    name = ORT_TYPES.get(ort_type, "float32")
    return name if name != "bfloat16" else "float32"


# The same kernel as a PyTorch operator (flash_export/nn/torch_op.py in Python, the libtorch shim in
# custom_ops/torch for C++): inputs, attributes and semantics as the node's above, its schema in
# torch_op.SCHEMA. Artifacts that call it (TorchScript with attention="native", `.pt2` packages)
# record metadata "attention": "native" and what their loader needs ("requires").
TORCH_OP = "flash_export::attention"
TORCH_SHIM = "libflash_export_torch.so"
NATIVE_REQUIRES = (f"{TORCH_OP}: in C++ load {TORCH_SHIM} (custom_ops/torch) before the model; "
                   "in Python import flash_export.torch_op")

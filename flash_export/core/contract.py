"""The custom op's contract on the Python side, written once. Imports neither torch nor onnx.

Node: ``com.flash_export::FlashAttention``. Version 1: inputs ``query (B, Lq, E)``,
``key (B, Lk, E)``, ``value (B, Lk, E)`` (float32 or float16, all alike) and an optional bool
``mask`` broadcastable to ``(B, num_heads, Lq, Lk)``, True = attend. Output ``(B, Lq, E)`` in
query's dtype. Attributes (`NODE_ATTRIBUTES`): ``num_heads`` INT >= 1 dividing E (required),
``chunk_size`` INT >= 1 (default 64), ``causal`` INT 0 or 1 (default 0, bottom-right aligned:
query i sees key j iff j <= i + Lk - Lq), ``scale`` FLOAT, finite and not 0 (default
1/sqrt(E/num_heads); it multiplies the logits). Masking decides visibility, values decide numbers:
a row that sees no key gives zeros; a row that sees keys whose logits are all -inf gives NaN.

Version 2 (`DOMAIN_VERSION`, contract v2) is version 1 plus optional attributes and inputs whose
defaults keep version 1's meaning, so every version-1 node means the same under it (the library
serves both; a model importing the domain at version 1 may not use them, which
`flash_export.safety` checks):

- ``kv_num_heads`` INT >= 1 dividing num_heads (default num_heads): grouped-query attention, query
  head h reads key/value head ``h // (num_heads // kv_num_heads)``; key and value carry
  ``kv_num_heads * D`` channels.
- Head-major inputs: each of query, key and value may be rank 4, ``(B, heads, L, D)``, instead of
  ``(B, L, heads * D)`` (its rank says which). ``output_layout`` INT 0 (default,
  ``(B, Lq, num_heads * Dv)``) or 1 (``(B, num_heads, Lq, Dv)``).
- Input 4 ``seqlens_k``, optional int32 ``(B,)``: sequence b's keys are ``[0, seqlens_k[b]]``
  (onnxruntime ``GroupQueryAttention``'s convention; -1 is an empty sequence); keys past them are
  never read; its queries are the last Lq positions of those keys (bottom-right alignment per
  sequence: left-padded prompts and ragged decode batches).
- ``window_size`` INT >= 0 (default 0: none): a query at position p sees key j only if
  ``|p - j| < window_size`` (with causal: its last window_size keys, itself included, as
  transformers' ``sliding_window``); key blocks outside every row's window are skipped.
- Input 5 ``bias``, optional, query's type, broadcastable to ``(B, num_heads, Lq, Lk)``: added to
  the logits (after the scale and the softcap).
- ``softcap`` FLOAT >= 0 (default 0: none): logits become ``softcap * tanh(logits / softcap)``.
- bfloat16 query, key, value (and bias) besides float32 and float16.

The native adapter (custom_ops/ort/flash_attention_op.h) and the C header
(custom_ops/core/flash_export.h) state the same facts in C++.
"""

from typing import Dict, Tuple

DOMAIN = "com.flash_export"
DOMAIN_VERSION = 2  # the newest; nodes of version 1 load and run unchanged
OP_NAME = "FlashAttention"

# AttributeProto type names, as onnx.AttributeProto.AttributeType spells them.
INT, FLOAT = "INT", "FLOAT"
# name -> (type, required)
NODE_ATTRIBUTES: Dict[str, Tuple[str, bool]] = {
    "num_heads": (INT, True),
    "chunk_size": (INT, False),
    "causal": (INT, False),
    "scale": (FLOAT, False),
    "kv_num_heads": (INT, False),
    "window_size": (INT, False),
    "softcap": (FLOAT, False),
    "output_layout": (INT, False),
}
# The node's inputs by position; those past `mask` came with version 2.
NODE_INPUTS = ("query", "key", "value", "mask", "seqlens_k", "bias")
# What a node may use only when its model imports the domain at version 2 or later.
V2_ATTRIBUTES = frozenset({"kv_num_heads", "window_size", "softcap", "output_layout"})
V2_INPUTS = frozenset({"seqlens_k", "bias"})

TARGETS = ("custom", "standard", "contrib", "attention23")
# Precisions an artifact may be exported in (graph inputs and weights). Our dtype names are
# torch's and numpy's own (`getattr(torch, name)`, `numpy.dtype(name)`; numpy has no bfloat16).
EXPORT_DTYPES = ("float32", "float16")
# What a transformers checkpoint folder exports for (`flash_export.hf.export.TASKS`), as optimum
# names its tasks.
HF_TASKS = ("feature-extraction", "text-generation", "text-generation-with-past",
            "image-classification")
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

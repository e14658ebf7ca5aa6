"""How the attention inside a FlashAttention model becomes ONNX, one translation per target.

Every target shares the same PyTorch side: an adapter subclass of FlashAttention whose `attend`
calls one opaque torch custom op on the projected (B, L, E) tensors, so torch.export keeps the
attention as a single call. The ONNX side differs only in the translation of that call:

- ``custom``: one ``com.flash_export::FlashAttention`` node run by our native library. A model
  that calls the registered op's contract-v2 overload (``flash_export::attention.v2``: grouped
  heads, head-major layouts, seqlens_k, window, bias, softcap) exports it as one node with those
  attributes and inputs (`flash_attention_v2_node`); the other targets refuse such a call by name.
- ``standard``: standard ONNX ops, the key-chunk online softmax as an ONNX ``Loop`` with a dynamic
  trip count, so it is correct at any sequence length and keeps O(Lq x D) state per iteration.
- ``contrib``: onnxruntime's ``com.microsoft::MultiHeadAttention`` with an additive attention bias,
  and ``attention23``: the ONNX ``Attention`` operator (opset >= 23) with a boolean mask. Both are
  written by rewriting the custom node after export, inside a guard that gives them our
  semantics for empty sequences, rows that see no key and queries or keys holding a NaN or an
  infinity.

The node's contract (inputs, attributes, semantics) is `flash_export.core.contract`; the target
names are `contract.TARGETS`, and `TARGETS` below holds one implementation per name.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import onnx
import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import BOOL, opset18
from onnxscript.function_libs.torch_lib.tensor_typing import TFloat
from onnxscript.values import Op, Opset
from torch import Tensor

from flash_export.core import contract
from flash_export.core.contract import DOMAIN, DOMAIN_VERSION, OP_NAME
from flash_export.core.errors import ExportError, FlashExportError
from flash_export.export.onnx_guard import rewrite_as_attention23, rewrite_as_contrib
from flash_export.nn.attention import FlashAttention, flash_attention_core

# Module-level opsets: onnxscript resolves them by name when it parses the functions below. Typed
# Any because onnxscript functions are ONNX programs, not Python that mypy can check.
op: Any = opset18
fe: Any = Opset(DOMAIN, DOMAIN_VERSION)


# --- The torch side: two opaque ops (with and without a mask) on (B, L, E) tensors -------------

def _eager(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], num_heads: int,
           chunk_size: int, causal: int, scale: float) -> Tensor:
    b, lq, e = q.shape

    def split(x: Tensor) -> Tensor:  # (B, L, E) -> (B, H, L, D)
        return x.reshape(x.size(0), x.size(1), num_heads, e // num_heads).transpose(1, 2)

    o = flash_attention_core(split(q), split(k), split(v), mask, bool(causal), scale, chunk_size)
    return o.transpose(1, 2).reshape(b, lq, e)  # (B, Lq, E)


@torch.library.custom_op("flash_export::onnx_attention", mutates_args=())
def onnx_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, chunk_size: int,
                   causal: int, scale: float) -> Tensor:
    """Attention on projected tensors: (B, Lq, E), (B, Lk, E) x2 -> (B, Lq, E)."""
    return _eager(q, k, v, None, num_heads, chunk_size, causal, scale)


@onnx_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, num_heads: int, chunk_size: int, causal: int,
      scale: float) -> Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("flash_export::onnx_attention_masked", mutates_args=())
def onnx_attention_masked(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, num_heads: int,
                          chunk_size: int, causal: int, scale: float) -> Tensor:
    """Like `onnx_attention` with a bool `mask` broadcastable to (B, 1, Lq, Lk)."""
    return _eager(q, k, v, mask, num_heads, chunk_size, causal, scale)


@onnx_attention_masked.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, num_heads: int, chunk_size: int,
      causal: int, scale: float) -> Tensor:
    return torch.empty_like(q)


class OnnxAttention(FlashAttention):
    """FlashAttention whose attention is one custom-op call, for the ``custom`` target.

    The mask reaching the node is expanded to exactly (B, 1, Lq, Lk), the node contract.
    """

    def attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor]) -> Tensor:
        """(B, Lq, E), (B, Lk, E) x2 -> (B, Lq, E) through the opaque export op."""
        causal = int(self.causal)
        if allowed is None:
            return onnx_attention(q, k, v, self.heads, self.chunk_size, causal, self.scale)
        if allowed.size(1) != 1:
            raise ExportError(f"ONNX export supports masks of shape (B, 1, Lq, Lk); got a per-head "
                              f"mask of shape {list(allowed.shape)}")
        mask = allowed.expand(q.size(0), 1, q.size(1), k.size(1))  # (B, 1, Lq, Lk)
        return onnx_attention_masked(q, k, v, mask, self.heads, self.chunk_size, causal,
                                     self.scale)


class MaskedOnnxAttention(OnnxAttention):
    """OnnxAttention that always passes a mask, so one translation covers every call.

    Without a mask it passes an all-True (1, 1, 1, Lk) one: O(Lk) memory, not O(Lq x Lk).
    """

    def attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor]) -> Tensor:
        """(B, Lq, E), (B, Lk, E) x2 -> (B, Lq, E) through the masked export op."""
        if allowed is None:
            allowed = torch.ones(1, 1, 1, k.size(1), dtype=torch.bool, device=q.device)
        elif allowed.size(1) != 1:
            raise ExportError(f"ONNX export supports masks of shape (B, 1, Lq, Lk); got a per-head "
                              f"mask of shape {list(allowed.shape)}")
        return onnx_attention_masked(q, k, v, allowed, self.heads, self.chunk_size,
                                     int(self.causal), self.scale)


# --- custom: one com.flash_export::FlashAttention node ------------------------------------------

@onnxscript.script(fe)
def _custom_node(q: TFloat, k: TFloat, v: TFloat, num_heads: int, chunk_size: int, causal: int,
                 scale: float) -> TFloat:
    return fe.FlashAttention(q, k, v, num_heads=num_heads, chunk_size=chunk_size, causal=causal,
                             scale=scale)


@onnxscript.script(fe)
def _custom_node_masked(q: TFloat, k: TFloat, v: TFloat, mask: BOOL, num_heads: int,
                        chunk_size: int, causal: int, scale: float) -> TFloat:
    return fe.FlashAttention(q, k, v, mask, num_heads=num_heads, chunk_size=chunk_size,
                             causal=causal, scale=scale)


def _node_schema() -> OpSchema:
    """The node's schema (`flash_export.core.contract`), as onnxscript needs to build such a node.

    Kept local to this module, never registered in onnx's global table.
    """
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    types = {"mask": "B", "seqlens_k": "I"}
    inputs = [param(name, types.get(name, "T"), param_option=optional if i >= 3 else
                    OpSchema.FormalParameterOption.Single)
              for i, name in enumerate(contract.NODE_INPUTS)]
    kinds = {contract.INT: OpSchema.AttrType.INT, contract.FLOAT: OpSchema.AttrType.FLOAT}
    attributes = [OpSchema.Attribute(name, kinds[kind], "", required=required)
                  for name, (kind, required) in contract.NODE_ATTRIBUTES.items()]
    return OpSchema(OP_NAME, DOMAIN, DOMAIN_VERSION, inputs=inputs,
                    outputs=[param("out", "T")],
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)",
                                             "tensor(bfloat16)"], ""),
                                      ("B", ["tensor(bool)"], ""), ("I", ["tensor(int32)"], "")],
                    attributes=attributes)


_node_v2: Any = Op(fe, OP_NAME, _node_schema())


def flash_attention_v2_node(query: TFloat, key: TFloat, value: TFloat, mask: Optional[BOOL] = None,
                            seqlens_k: Any = None, bias: Optional[TFloat] = None, *,
                            num_heads: int, kv_num_heads: int = 0, chunk_size: int = 64,
                            causal: bool = False, scale: Optional[float] = None,
                            window_size: int = 0, softcap: float = 0.0,
                            output_layout: int = 0) -> TFloat:
    """`flash_export::attention.v2` -> one FlashAttention node of version 2.

    A traced function (the exporter runs it on its symbolic values): absent inputs stay empty,
    and an attribute at its default is left out, so a call using no v2 feature gives a node
    version 1 reads alike.
    """
    attrs: Dict[str, Any] = {"num_heads": num_heads, "chunk_size": chunk_size,
                             "causal": int(causal)}
    if scale is not None:
        attrs["scale"] = float(scale)
    if kv_num_heads and kv_num_heads != num_heads:
        attrs["kv_num_heads"] = kv_num_heads
    if window_size:
        attrs["window_size"] = window_size
    if softcap:
        attrs["softcap"] = float(softcap)
    if output_layout:
        attrs["output_layout"] = output_layout
    return _node_v2(query, key, value, mask, seqlens_k, bias, **attrs)


def _refuse_v2_call(target: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ExportError(f"target {target!r} cannot express {contract.TORCH_OP}.v2 (op contract "
                          "v2: grouped heads, head-major layouts, seqlens_k, window, bias, "
                          "softcap); export with target 'custom'")
    return refuse


# --- standard: the online softmax as an ONNX Loop over key chunks -------------------------------

# long: one onnxscript graph (an ONNX Loop body cannot call Python helpers)
@onnxscript.script()
def _loop_attention(q: TFloat, k: TFloat, v: TFloat, mask: BOOL, num_heads: int,
                    chunk_size: int, causal: int, scale: float) -> TFloat:
    # Reshape target (0, 0, H, D): 0 copies B and L from the input. D is spelled out rather than
    # -1, which onnxruntime cannot infer for an empty sequence.
    embed = op.Shape(q, start=2, end=3)  # (1,) = [E]
    num_heads_1d = op.Reshape(op.Constant(value_int=num_heads), op.Constant(value_ints=[1]))
    heads = op.Concat(op.Constant(value_ints=[0, 0]), num_heads_1d, op.Div(embed, num_heads_1d),
                      axis=0)
    # Half inputs accumulate in float32 (to=1), as flash_attention_core does.
    qh = op.Cast(op.Transpose(op.Reshape(q, heads), perm=[0, 2, 1, 3]), to=1)  # (B, H, Lq, D)
    kt = op.Cast(op.Transpose(op.Reshape(k, heads), perm=[0, 2, 3, 1]), to=1)  # (B, H, D, Lk)
    vh = op.Cast(op.Transpose(op.Reshape(v, heads), perm=[0, 2, 1, 3]), to=1)  # (B, H, Lk, D)
    qs = op.Mul(qh, op.CastLike(scale, qh))
    zero = op.Constant(value_float=0.0)
    neg_inf = op.Constant(value_float=float("-inf"))
    one_i = op.Constant(value_int=1)
    chunk = op.Constant(value_int=chunk_size)
    axis_k = op.Constant(value_ints=[3])
    axis_v = op.Constant(value_ints=[2])
    as_1d = op.Constant(value_ints=[1])
    lq = op.Squeeze(op.Shape(q, start=1, end=2))
    lk = op.Squeeze(op.Shape(k, start=1, end=2))
    offset = op.Sub(lk, lq)  # bottom-right alignment: j <= i + (Lk - Lq)
    rows = op.Unsqueeze(op.Range(op.Constant(value_int=0), lq, one_i), as_1d)  # (Lq, 1)
    not_causal = op.Not(op.Cast(op.Constant(value_int=causal), to=9))  # 9: BOOL
    row_shape = op.Concat(op.Shape(qs, start=0, end=3), as_1d, axis=0)  # (B, H, Lq, 1)
    m = op.Expand(neg_inf, row_shape)  # running max
    l_sum = op.Expand(zero, row_shape)  # running sum of exp
    acc = op.Mul(qs, zero)  # (B, H, Lq, D) unnormalised output
    # No iteration at all when Lq == 0: onnxruntime's reductions mis-shape (B, H, 0, C) tensors.
    n_chunks = op.Mul(op.Div(op.Sub(op.Add(lk, chunk), one_i), chunk), op.Min(lq, one_i))
    for i in range(n_chunks):
        start = op.Mul(i, chunk)
        end = op.Min(op.Add(start, chunk), lk)
        starts = op.Reshape(start, as_1d)
        ends = op.Reshape(end, as_1d)
        s = op.MatMul(qs, op.Slice(kt, starts, ends, axis_k))  # (B, H, Lq, C)
        cols = op.Unsqueeze(op.Range(start, end, one_i), op.Constant(value_ints=[0]))  # (1, C)
        in_causal = op.Or(not_causal, op.LessOrEqual(cols, op.Add(rows, offset)))  # (Lq, C)
        visible = op.And(op.Slice(mask, starts, ends, axis_k), in_causal)
        s = op.Where(visible, s, neg_inf)
        m_new = op.Max(m, op.ReduceMax(s, op.Constant(value_ints=[-1]), keepdims=1))
        # A row that saw only blocked keys keeps m = -inf: shift by 0 so exp gives 0, not NaN.
        shift = op.Where(op.IsInf(m_new, detect_positive=0), zero, m_new)
        p = op.Exp(op.Sub(s, shift))  # (B, H, Lq, C)
        alpha = op.Exp(op.Sub(m, shift))  # (B, H, Lq, 1) rescales what came before
        l_sum = op.Add(op.Mul(l_sum, alpha), op.ReduceSum(p, op.Constant(value_ints=[-1]),
                                                          keepdims=1))
        acc = op.Add(op.Mul(acc, alpha), op.MatMul(p, op.Slice(vh, starts, ends, axis_v)))
        m = m_new
    # Rows that saw no key are zeros. l_sum == 0 also when the visible logits were all -inf, whose
    # softmax is NaN: only if some row's sum is 0 is the visibility of every key worked out (once,
    # O(Lq x Lk), so the loop carries row state only); such a row that saw a key gives 0/0, NaN.
    # A NaN in l_sum stays NaN. (With Lk = 0 no row saw a key, and reductions over 0 keys
    # mis-shape in onnxruntime: the sums say it all.)
    unseen = op.Equal(l_sum, zero)  # (B, H, Lq, 1)
    zero_sums = op.ReduceSum(op.Cast(unseen, to=1), keepdims=0)
    if op.And(op.Greater(zero_sums, zero), op.Greater(lk, op.Constant(value_int=0))):
        cols = op.Unsqueeze(op.Range(op.Constant(value_int=0), lk, one_i),
                            op.Constant(value_ints=[0]))  # (1, Lk)
        in_causal = op.Or(not_causal, op.LessOrEqual(cols, op.Add(rows, offset)))  # (Lq, Lk)
        visible_keys = op.ReduceSum(op.Cast(op.And(mask, in_causal), to=1),
                                    op.Constant(value_ints=[-1]), keepdims=1)
        blank = op.Equal(visible_keys, zero)  # (B|1, 1, Lq, 1)
    else:
        blank = unseen  # no row has a zero sum
    out = op.Where(blank, zero, op.Div(acc, op.Where(blank, op.Constant(value_float=1.0), l_sum)))
    merged = op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]),
                        op.Concat(op.Constant(value_ints=[0, 0]), embed, axis=0))
    return op.CastLike(merged, q)  # (B, Lq, E)


@dataclass(frozen=True)
class Target:
    """One way to express the attention in ONNX.

    Attributes:
        name: the `target=` value of export_onnx.
        adapter: the FlashAttention subclass swapped into the model before export.
        translations: torch custom op -> ONNX translation function.
        min_opset: the lowest default-domain opset the target can use.
        needs_library: whether onnxruntime needs our native library to run it.
        description: one line for docs and errors.
        rewrite: applied to the exported model at its final opset, when the target needs it.
    """

    name: str
    adapter: type
    translations: Dict[object, Callable[..., object]]
    min_opset: int
    needs_library: bool
    description: str
    rewrite: Optional[Callable[[onnx.ModelProto], None]] = None


_ops: Tuple[object, object] = (torch.ops.flash_export.onnx_attention.default,
                               torch.ops.flash_export.onnx_attention_masked.default)


def _v2_op() -> object:
    """The registered op's v2 overload, or a name no call matches.

    Without the native library no model can call the op, and the targets export without it.
    """
    from flash_export.nn.torch_op import register

    try:
        register()
    except FlashExportError:
        return f"{contract.TORCH_OP}.v2 (not registered: no native library)"
    return torch.ops.flash_export.attention.v2


_v2 = _v2_op()
_IMPLEMENTATIONS: Dict[str, Target] = {
    "custom": Target("custom", OnnxAttention,
                     {_ops[0]: _custom_node, _ops[1]: _custom_node_masked,
                      _v2: flash_attention_v2_node}, 18, True,
                     f"one {DOMAIN}::{OP_NAME} node run by the native library"),
    "standard": Target("standard", MaskedOnnxAttention,
                       {_ops[1]: _loop_attention, _v2: _refuse_v2_call("standard")}, 18, False,
                       "standard ONNX ops with a Loop over key chunks"),
    "contrib": Target("contrib", MaskedOnnxAttention,
                      {_ops[1]: _custom_node_masked, _v2: _refuse_v2_call("contrib")}, 18, False,
                      "onnxruntime's com.microsoft::MultiHeadAttention", rewrite_as_contrib),
    "attention23": Target("attention23", MaskedOnnxAttention,
                          {_ops[1]: _custom_node_masked, _v2: _refuse_v2_call("attention23")}, 23,
                          False, "the ONNX Attention operator (opset >= 23)",
                          rewrite_as_attention23),
}
# One implementation per name in the contract, in its order; a name without one fails at import.
TARGETS: Dict[str, Target] = {name: _IMPLEMENTATIONS[name] for name in contract.TARGETS}

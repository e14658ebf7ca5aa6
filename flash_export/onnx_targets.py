"""How the attention inside a FlashAttention model becomes ONNX, one translation per target.

Every target shares the same PyTorch side: an adapter subclass of FlashAttention whose `attend`
calls one opaque torch custom op on the projected (B, L, E) tensors, so torch.export keeps the
attention as a single call. The ONNX side differs only in the translation of that call:

- ``custom``: one ``com.flash_export::FlashAttention`` node (version 1) run by our native library.
- ``standard``: standard ONNX ops, the key-chunk online softmax as an ONNX ``Loop`` with a dynamic
  trip count, so it is correct at any sequence length and keeps O(Lq x D) state per iteration.
- ``contrib``: onnxruntime's ``com.microsoft::MultiHeadAttention`` with an additive attention bias,
  and ``attention23``: the ONNX ``Attention`` operator (opset >= 23) with a boolean mask. Both are
  written by rewriting the custom node after export, inside a guard that gives them our
  semantics for empty sequences, rows that see no key and queries or keys holding a NaN or an
  infinity.

The node's contract (inputs, attributes, semantics) is `flash_export.contract`; the target names
are `contract.TARGETS`, and `TARGETS` below holds one implementation per name.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import onnx
import onnxscript
import torch
from onnxscript import BOOL, opset18
from onnxscript.function_libs.torch_lib.tensor_typing import TFloat
from onnxscript.values import Opset
from torch import Tensor

from flash_export import contract
from flash_export.attention import FlashAttention, flash_attention_core
from flash_export.contract import DOMAIN, DOMAIN_VERSION, OP_NAME
from flash_export.errors import ExportError

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


# --- standard: the online softmax as an ONNX Loop over key chunks -------------------------------

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


# --- contrib and attention23: a stock attention operator inside a guard ------------------------
#
# Both targets export the custom node and then rewrite it (at the graph's final opset, which the
# exporter cannot step an opset-23 node through) into stock onnxruntime operators. The stock
# operators differ from our semantics in three places, which one guard around them fixes:
# - an empty sequence (B, Lq or Lk = 0): they fail, we give zeros of shape (B, Lq, E);
# - a query row that sees no key: they average the values, we give zeros;
# - a NaN or an infinity in the query or the key: their masks work by adding a bias to (or
#   replacing) the logits of masked keys, so a NaN or +inf logit still reached the rows masked
#   from it, and a row whose visible logits were all -inf took a masked key's value where we give
#   NaN. Inputs holding one run an exact matmul-softmax-matmul instead (_exact_inner: O(Lq x Lk)
#   per head). Only such inputs pay for that: an If on "any NaN or infinity in the query or the
#   key" keeps the usual path at one Sub + ReduceSum over each.

_FLOAT, _INT64, _BOOL = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.BOOL
# The most negative float16: finite in both export dtypes and far below any logit (-inf would
# turn a fully masked row into NaN inside MultiHeadAttention).
_MASKED_BIAS = -65504.0


class _Nodes:
    """Builds a list of ONNX nodes (one graph or subgraph) with names unique across a rewrite."""

    def __init__(self, prefix: str, counter: List[int]) -> None:
        self.prefix, self.counter = prefix, counter
        self.nodes: List[onnx.NodeProto] = []

    def child(self) -> "_Nodes":
        """A builder for a subgraph, sharing this one's name counter."""
        return _Nodes(self.prefix, self.counter)

    def add(self, op_type: str, inputs: Sequence[str], domain: str = "", **attrs: Any) -> str:
        self.counter[0] += 1
        name = f"{self.prefix}_{op_type.lower()}_{self.counter[0]}"
        self.nodes.append(onnx.helper.make_node(op_type, list(inputs), [name], name=name,
                                                domain=domain, **attrs))
        return name

    def const(self, value: Any, dtype: int, dims: Optional[Sequence[int]] = None) -> str:
        values = value if isinstance(value, list) else [value]
        dims = [len(values)] if dims is None and isinstance(value, list) else (dims or [])
        return self.add("Constant", [], value=onnx.helper.make_tensor("v", dtype, dims, values))

    def like(self, value: float, other: str) -> str:
        """A float scalar constant in the dtype of `other`."""
        return self.add("CastLike", [self.const(value, _FLOAT), other])

    def if_(self, cond: str, then: "_Nodes", then_out: str, orelse: "_Nodes", else_out: str,
            elem_type: int) -> str:
        """If(cond) over two subgraphs that each produce one tensor of `elem_type`."""
        def graph(body: "_Nodes", out: str, name: str) -> onnx.GraphProto:
            return onnx.helper.make_graph(
                body.nodes, name, [], [onnx.helper.make_tensor_value_info(out, elem_type, None)])

        self.counter[0] += 1
        tag = f"{self.prefix}_if_{self.counter[0]}"
        return self.add("If", [cond], then_branch=graph(then, then_out, f"{tag}_then"),
                        else_branch=graph(orelse, else_out, f"{tag}_else"))


# inner(nodes, q, k, v, visible, attrs) -> (B, Lq, E): the stock operator on non-empty inputs,
# `visible` bool (B|1, 1, Lq, Lk) with the causal mask already applied.
Inner = Callable[[_Nodes, str, str, str, str, Dict[str, Any]], str]


def _contrib_inner(g: _Nodes, q: str, k: str, v: str, visible: str, attrs: Dict[str, Any]) -> str:
    """com.microsoft::MultiHeadAttention with an additive bias (it takes no boolean mask)."""
    bias = g.add("Where", [visible, g.like(0.0, q), g.like(_MASKED_BIAS, q)])
    return g.add("MultiHeadAttention", [q, k, v, "", "", bias], domain="com.microsoft",
                 num_heads=int(attrs["num_heads"]), scale=float(attrs["scale"]))


def _attention23_inner(g: _Nodes, q: str, k: str, v: str, visible: str,
                       attrs: Dict[str, Any]) -> str:
    """ONNX Attention (opset 23) with the boolean mask, computed in float32.

    onnxruntime's CPU Attention has a float16 kernel that is 2-3x slower than its float32 one. At
    the top level of a graph onnxruntime casts around it by itself, inside an If branch it does not:
    the casts are explicit here (no-ops for float32 inputs) so both places run the same kernel.
    """
    heads = int(attrs["num_heads"])
    q32, k32, v32 = (g.add("Cast", [x], to=_FLOAT) for x in (q, k, v))
    out = g.add("Attention", [q32, k32, v32, visible], q_num_heads=heads, kv_num_heads=heads,
                scale=float(attrs["scale"]))
    return g.add("CastLike", [out, q])


def _exact_inner(g: _Nodes, q: str, k: str, v: str, visible: str, seen: str,
                 attrs: Dict[str, Any]) -> str:
    """Matmul-softmax-matmul in float32 with our semantics, for inputs holding NaN or infinity.

    Softmax over the visible logits only: NaN where those are all -inf (or one is +inf or NaN),
    whatever the masked keys hold. `seen` (B|1, 1, Lq, 1) bool: whether the row sees a key.
    """
    per_head = g.const([0, 0, int(attrs["num_heads"]), -1], _INT64)

    def heads(x: str, perm: List[int]) -> str:  # (B, L, E) -> float32, per head, permuted
        return g.add("Transpose", [g.add("Cast", [g.add("Reshape", [x, per_head])], to=_FLOAT)],
                     perm=perm)

    logits = g.add("Mul", [g.add("MatMul", [heads(q, [0, 2, 1, 3]), heads(k, [0, 2, 3, 1])]),
                           g.const(float(attrs["scale"]), _FLOAT)])  # (B, H, Lq, Lk)
    logits = g.add("Where", [visible, logits, g.const(float("-inf"), _FLOAT)])
    zero = g.const(0.0, _FLOAT)
    # A row that sees no key would be NaN here too; it gets a finite softmax (zeroed by the guard).
    probs = g.add("Softmax", [g.add("Where", [seen, logits, zero])], axis=-1)
    probs = g.add("Where", [visible, probs, zero])  # (B, H, Lq, Lk)
    out = g.add("MatMul", [probs, heads(v, [0, 2, 1, 3])])  # (B, H, Lq, D)
    merged = g.add("Reshape", [g.add("Transpose", [out], perm=[0, 2, 1, 3]),
                               g.const([0, 0, -1], _INT64)])  # (B, Lq, E)
    return g.add("CastLike", [merged, q])


def _visibility(g: _Nodes, mask: str, lq: str, lk: str, causal: bool) -> str:
    """The mask (broadcastable to (B, 1, Lq, Lk)) and the causal rule, as (B|1, 1, Lq, Lk)."""
    visible = mask
    if causal:
        zero, one = g.const(0, _INT64), g.const(1, _INT64)
        rows = g.add("Unsqueeze", [g.add("Range", [zero, g.add("Squeeze", [lq]), one]),
                                   g.const([1], _INT64)])  # (Lq, 1)
        cols = g.add("Range", [zero, g.add("Squeeze", [lk]), one])  # (Lk,)
        # Bottom-right aligned: query i sees key j iff j <= i + Lk - Lq.
        in_causal = g.add("LessOrEqual", [cols, g.add("Add", [rows, g.add("Sub", [lk, lq])])])
        visible = g.add("And", [mask, in_causal])
    # Both operators want the mask's last two dims to be exactly (Lq, Lk).
    full = g.add("Concat", [g.const([1, 1], _INT64), lq, lk], axis=0)
    return g.add("Expand", [visible, full])


def _guarded_nodes(node: onnx.NodeProto, prefix: str, inner: Inner,
                   elem_type: int) -> List[onnx.NodeProto]:
    """The nodes that replace one FlashAttention `node`: `inner` inside the guard above."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    q, k, v, mask = node.input
    g = _Nodes(prefix, [0])

    lq = g.add("Shape", [q], start=1, end=2)  # (1,)
    lk = g.add("Shape", [k], start=1, end=2)  # (1,)
    sizes = g.add("Concat", [g.add("Shape", [q], start=0, end=2), lk], axis=0)  # [B, Lq, Lk]
    empty = g.add("Equal", [g.add("ReduceProd", [sizes], keepdims=0), g.const(0, _INT64)])

    then = g.child()  # empty: zeros (B, Lq, E)
    zeros = then.add("Expand", [then.like(0.0, q), then.add("Shape", [q])])

    body = g.child()  # not empty
    visible = _visibility(body, mask, lq, lk, bool(attrs.get("causal", 0)))  # (B|1, 1, Lq, Lk)
    # (B|1, 1, Lq, 1): whether each row sees any key.
    seen = body.add("Greater", [body.add("ReduceMax", [body.add("Cast", [visible], to=_FLOAT),
                                                       body.const([-1], _INT64)], keepdims=1),
                                body.const(0.0, _FLOAT)])
    # x - x is NaN exactly where x is a NaN or an infinity, and a sum holding one is NaN.
    finite_sums = [body.add("ReduceSum", [body.add("Sub", [x, x])], keepdims=0) for x in (q, k)]
    not_finite = body.add("IsNaN", [body.add("Add", finite_sums)])
    # Each subgraph casts what it reads for itself: onnxruntime warns when an optimisation would
    # rename a value that a subgraph reads from outside.
    exact = body.child()
    exact_out = _exact_inner(exact, q, k, v, visible, seen, attrs)
    plain = body.child()
    plain_out = inner(plain, q, k, v, visible, attrs)
    attended = body.if_(not_finite, exact, exact_out, plain, plain_out, elem_type)

    # A row that sees no key: zeros, where the stock operators average the values.
    seen_rows = body.add("Squeeze", [seen, body.const([1], _INT64)])  # (B|1, Lq, 1)
    result = body.add("Where", [seen_rows, attended, body.like(0.0, q)])

    out = g.if_(empty, then, zeros, body, result, elem_type)
    g.nodes.append(onnx.helper.make_node("Identity", [out], list(node.output),
                                         name=f"{prefix}_out"))
    return g.nodes


def _float_type(graph: onnx.GraphProto) -> int:
    """The element type of the model's float inputs (all of them share the export dtype)."""
    for value in graph.input:
        elem = value.type.tensor_type.elem_type
        if elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                    onnx.TensorProto.DOUBLE):
            return elem
    raise ExportError("the exported graph has no floating-point input")


def _guard_rewrite(inner: Inner, opsets: Dict[str, int]) -> Callable[[onnx.ModelProto], None]:
    """A rewrite that replaces every custom node with `inner` in the guard; adds `opsets`."""
    def rewrite(model: onnx.ModelProto) -> None:
        graph = model.graph
        elem_type = _float_type(graph)
        nodes = list(graph.node)
        del graph.node[:]
        for index, node in enumerate(nodes):
            if node.domain != DOMAIN or node.op_type != OP_NAME:
                graph.node.append(node)
                continue
            graph.node.extend(_guarded_nodes(node, f"fa{index}", inner, elem_type))
        kept = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
        have = {o.domain for o in kept}
        model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items()
                                  if d not in have)

    return rewrite


rewrite_as_contrib = _guard_rewrite(_contrib_inner, {"com.microsoft": 1})
rewrite_as_attention23 = _guard_rewrite(_attention23_inner, {})


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

_IMPLEMENTATIONS: Dict[str, Target] = {
    "custom": Target("custom", OnnxAttention,
                     {_ops[0]: _custom_node, _ops[1]: _custom_node_masked}, 18, True,
                     f"one {DOMAIN}::{OP_NAME} node run by the native library"),
    "standard": Target("standard", MaskedOnnxAttention, {_ops[1]: _loop_attention}, 18, False,
                       "standard ONNX ops with a Loop over key chunks"),
    "contrib": Target("contrib", MaskedOnnxAttention, {_ops[1]: _custom_node_masked}, 18, False,
                      "onnxruntime's com.microsoft::MultiHeadAttention", rewrite_as_contrib),
    "attention23": Target("attention23", MaskedOnnxAttention, {_ops[1]: _custom_node_masked}, 23,
                          False, "the ONNX Attention operator (opset >= 23)",
                          rewrite_as_attention23),
}
# One implementation per name in the contract, in its order; a name without one fails at import.
TARGETS: Dict[str, Target] = {name: _IMPLEMENTATIONS[name] for name in contract.TARGETS}

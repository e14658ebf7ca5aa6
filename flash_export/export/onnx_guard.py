"""contrib and attention23: a stock onnxruntime attention operator inside a guard.

The exporter writes the custom node; `rewrite_as_contrib` / `rewrite_as_attention23` replace each
one, at the graph's final opset, with onnxruntime's ``com.microsoft::MultiHeadAttention`` or the
ONNX ``Attention`` operator wrapped in the guard below, which gives them flash-export's
semantics (`flash_export.core.contract`).
"""

from typing import Any, Callable, Dict, List, Optional, Sequence

import onnx

from flash_export.core.contract import DOMAIN, NODE_INPUTS, OP_NAME, V2_ATTRIBUTES, V2_INPUTS
from flash_export.core.errors import ExportError

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


def _refuse_v2(node: onnx.NodeProto) -> None:
    """Refuse a node that uses version 2's attributes or inputs, by their names.

    The guards express version 1 of the node only: grouped heads, a head-major output,
    seqlens_k, a window, a bias or a softcap are never dropped by a rewrite.

    Raises:
        ExportError: the node uses one of them.
    """
    used = [a.name for a in node.attribute if a.name in V2_ATTRIBUTES]
    used += [n for n, i in zip(NODE_INPUTS, node.input) if i and n in V2_INPUTS]
    if used:
        raise ExportError(f"{OP_NAME} node {node.name!r} uses {', '.join(used)} (op contract "
                          "v2), which this target does not express; export with target 'custom'")


def _guard_rewrite(inner: Inner, opsets: Dict[str, int]) -> Callable[[onnx.ModelProto], None]:
    """A rewrite that replaces every custom node with `inner` in the guard; adds `opsets`."""
    def rewrite(model: onnx.ModelProto) -> None:
        graph = model.graph
        elem_type = _float_type(graph)
        nodes = list(graph.node)
        for node in nodes:  # before any change: a refused model is left as it was
            if node.domain == DOMAIN and node.op_type == OP_NAME:
                _refuse_v2(node)
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

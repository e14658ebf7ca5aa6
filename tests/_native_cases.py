"""Helpers for the native-library tests: one-node models, the float64 reference on numpy arrays
and its check.

The library itself is reached through flash_export.runtime.native, the one ctypes binding. torch is
imported only when a reference is computed, so that workers which never compute one (the fuzzer's
leak and thread modes) run without it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
from onnx import NodeProto, ValueInfoProto, helper

from flash_export.core.contract import DOMAIN, DOMAIN_VERSION, OP_NAME


def flash_node(inputs: list[str], output: str = "out", **attrs: Any) -> NodeProto:
    """One com.flash_export::FlashAttention node."""
    return helper.make_node(OP_NAME, inputs, [output], domain=DOMAIN, **attrs)


def model_bytes(nodes: list[NodeProto], inputs: list[ValueInfoProto],
                outputs: list[ValueInfoProto]) -> bytes:
    """A serialized model of `nodes`: default-domain opset 18, the op's domain at its version."""
    graph = helper.make_graph(nodes, "flash", inputs, outputs)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
    return helper.make_model(graph, ir_version=10, opset_imports=opsets).SerializeToString()


def reference_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int, *,
                        mask: np.ndarray | None = None, causal: bool = False,
                        scale: float | None = None, dtype: Any = None) -> np.ndarray:
    """flash_export.nn.attention.reference_attention_core on (B, L, E) arrays.

    Computed in `dtype` (a torch dtype, default float64), returned as float64 (B, Lq, E): rows that
    see no key are zeros, rows whose visible logits are all -inf are NaN. `mask` is bool,
    broadcastable to (B, H, Lq, Lk).
    """
    import torch

    from flash_export.nn.attention import reference_attention_core

    dtype = torch.float64 if dtype is None else dtype
    batch, seq_q, embed = q.shape
    head_dim = embed // num_heads

    def split(x: np.ndarray) -> torch.Tensor:  # (B, L, E) -> (B, H, L, D)
        t = torch.from_numpy(np.asarray(x)).to(dtype)
        return t.reshape(x.shape[0], x.shape[1], num_heads, head_dim).transpose(1, 2)

    allowed = None if mask is None else torch.from_numpy(np.asarray(mask, dtype=np.bool_))
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = reference_attention_core(split(q), split(k), split(v), allowed, causal, scale)
    return out.transpose(1, 2).reshape(batch, seq_q, embed).to(torch.float64).numpy()


def check_output(actual: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                 num_heads: int, **kwargs: Any) -> None:
    """Assert that `actual`, the core's output for q, k, v, is (B, Lq, E) in q's dtype and meets
    the tolerance rule (tests/helpers.py): the baseline is PyTorch's own computation in q's dtype.
    `kwargs` are reference_attention's mask, causal and scale."""
    import torch
    from helpers import assert_matches_reference

    assert actual.dtype == q.dtype and actual.shape == q.shape
    reference = reference_attention(q, k, v, num_heads, **kwargs)
    same = reference_attention(q, k, v, num_heads, dtype=getattr(torch, q.dtype.name), **kwargs)
    assert_matches_reference(*(torch.from_numpy(x) for x in (actual, reference, same)))


def heads_first(x: np.ndarray, heads: int) -> Any:
    """A (B, L, heads*D) or (B, heads, L, D) array as a (B, heads, L, D) float64 torch tensor."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float64)
    if t.dim() == 4:
        return t
    # (B, L, heads*D) -> (B, heads, L, D)
    return t.reshape(t.size(0), t.size(1), heads, t.size(2) // heads).transpose(1, 2)


def reference_v2(q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int, *,
                 kv_num_heads: int | None = None, mask: np.ndarray | None = None,
                 causal: bool = False, scale: float | None = None,
                 seqlens_k: np.ndarray | None = None, bias: np.ndarray | None = None,
                 window_size: int = 0, softcap: float = 0.0, output_layout: int = 0,
                 dtype: Any = None) -> np.ndarray:
    """The op's contract v2 written out plainly (flash_export.h): the float64 reference.

    Every key/value head repeated for its G query heads (as transformers' `repeat_kv` does), the
    visibility of each (query, key) built explicitly (L_b from seqlens_k, the causal rule and the
    window at each sequence's bottom-right positions, the mask), logits scaled, capped, biased,
    softmax over the visible keys, rows that see none zero. Keys past L_b are never read (their
    values are zeroed before the product, so NaN padding in a cache cannot leak). Computed in
    `dtype` (a torch dtype, default float64), returned as float64 in `output_layout`.
    """
    import torch

    dtype = torch.float64 if dtype is None else dtype
    kv_heads = kv_num_heads or num_heads
    group = num_heads // kv_heads
    qh = heads_first(q, num_heads)  # (B, H, Lq, D)
    kh = heads_first(k, kv_heads).repeat_interleave(group, dim=1)  # (B, H, Lk, D)
    vh = heads_first(v, kv_heads).repeat_interleave(group, dim=1)  # (B, H, Lk, Dv)
    batch, _, seq_q, head_dim = qh.shape
    seq_k = kh.size(2)
    lengths = (torch.full((batch,), seq_k) if seqlens_k is None
               else torch.from_numpy(np.asarray(seqlens_k, np.int64)) + 1)  # (B,)
    keys = torch.arange(seq_k).view(1, 1, seq_k)  # (1, 1, Lk)
    pos = (torch.arange(seq_q).view(1, seq_q, 1) + (lengths - seq_q).view(batch, 1, 1))
    visible = (keys < lengths.view(batch, 1, 1)).expand(batch, seq_q, seq_k)  # (B, Lq, Lk)
    if causal:
        visible = visible & (keys <= pos)
    if window_size > 0:
        visible = visible & ((pos - keys).abs() < window_size)
    visible = visible.unsqueeze(1)  # (B, 1, Lq, Lk)
    if mask is not None:
        visible = visible & torch.from_numpy(np.asarray(mask, dtype=np.bool_))
    real = (keys < lengths.view(batch, 1, 1)).view(batch, 1, seq_k, 1)  # keys read at all
    vh = torch.where(real, vh, torch.zeros_like(vh))
    kh = torch.where(real, kh, torch.zeros_like(kh))
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    qh, kh, vh = qh.to(dtype), kh.to(dtype), vh.to(dtype)
    # contiguous operands: a strided float16 matmul on the CPU is 100x slower
    kt = kh.transpose(-2, -1).contiguous()  # (B, H, D, Lk)
    s = torch.matmul(qh.contiguous(), kt) * scale  # (B, H, Lq, Lk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + torch.from_numpy(np.asarray(bias)).to(dtype)
    visible = visible.expand(s.shape)
    s = s.masked_fill(~visible, -math.inf)
    any_visible = visible.any(dim=-1, keepdim=True)
    p = torch.softmax(torch.where(any_visible, s, torch.zeros_like(s)), dim=-1)
    p = torch.where(visible, p, torch.zeros_like(p))
    out = torch.matmul(p.contiguous(), vh.contiguous()).to(torch.float64)  # (B, H, Lq, Dv)
    if output_layout == 0:
        out = out.transpose(1, 2).reshape(batch, seq_q, num_heads * vh.size(3))
    return out.numpy()


def check_output_v2(actual: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                    num_heads: int, **kwargs: Any) -> None:
    """check_output for the op's contract v2: `actual` against reference_v2 under the tolerance
    rule, the baseline being reference_v2 in q's dtype. `kwargs` are reference_v2's."""
    import torch
    from helpers import assert_matches_reference

    reference = reference_v2(q, k, v, num_heads, **kwargs)
    assert actual.dtype == q.dtype and actual.shape == reference.shape, (actual.shape,
                                                                          reference.shape)
    same = reference_v2(q, k, v, num_heads, dtype=getattr(torch, q.dtype.name), **kwargs)
    assert_matches_reference(*(torch.from_numpy(np.asarray(x)) for x in (actual, reference,
                                                                          same)))


# id -> the call: B, H, H_kv, Lq, Lk, D (and Dv), layouts (q, k, v head-major; output_layout) and
# the v2 options. Odd sizes on purpose; chunk 16 puts chunk boundaries inside every window.
V2_CASES: dict[str, dict[str, Any]] = {
    **{f"gqa-G{g}-decode": dict(b=2, h=g * hk, hk=hk, lq=1, lk=67, causal=True)
       for g, hk in ((1, 3), (2, 3), (4, 2), (8, 1), (32, 1))},
    **{f"gqa-G{g}-prefill": dict(b=1, h=g * hk, hk=hk, lq=7, lk=33, causal=True)
       for g, hk in ((1, 2), (2, 3), (4, 2), (8, 1), (32, 1))},
    "head-major-in": dict(b=2, h=4, hk=2, lq=5, lk=37, hm=(True, True, True)),
    "head-major-in-out": dict(b=2, h=4, hk=2, lq=5, lk=37, hm=(True, True, True), layout=1),
    "mixed-layouts-out": dict(b=1, h=6, hk=3, lq=9, lk=20, hm=(False, True, False), layout=1),
    "value-dim-differs": dict(b=2, h=4, hk=2, lq=3, lk=21, dv=24, hm=(False, True, True)),
    "causal-lq<lk": dict(b=2, h=4, hk=1, lq=7, lk=65, causal=True),
    "seqlens-decode-ragged": dict(b=3, h=4, hk=2, lq=1, lk=40, causal=True,
                                  seqlens=(39, 12, 0)),
    "seqlens-prefill-ragged": dict(b=4, h=4, hk=2, lq=5, lk=40, causal=True,
                                   seqlens=(39, 20, 3, -1)),
    "seqlens-left-padded": dict(b=3, h=4, hk=2, lq=1, lk=33, causal=True, seqlens=(32, 32, 20),
                                left_pad=(0, 9, 17)),
    "seqlens-no-causal": dict(b=2, h=2, hk=1, lq=3, lk=30, seqlens=(29, 7)),
    "window-causal": dict(b=2, h=4, hk=2, lq=9, lk=70, causal=True, window=20),
    "window-full": dict(b=1, h=2, hk=2, lq=70, lk=70, window=33),
    "window-decode-seqlens": dict(b=2, h=8, hk=2, lq=1, lk=129, causal=True, window=33,
                                  seqlens=(128, 50)),
    "window-1": dict(b=1, h=2, hk=1, lq=17, lk=17, causal=True, window=1),
    "softcap": dict(b=2, h=4, hk=2, lq=5, lk=37, softcap=2.0),
    "everything": dict(b=2, h=8, hk=2, lq=3, lk=70, causal=True, seqlens=(60, 20), window=9,
                       bias=(1, 8, 3, 70), softcap=5.0, hm=(True, True, False), layout=1),
}
# Every shape a bias may have against (B, H, Lq, Lk) = (2, 4, 5, 37): each of the 16 rank-4
# broadcasts, and the lower ranks (right-aligned).
_BIAS_TARGET = (2, 4, 5, 37)
BIAS_SHAPES = [tuple(n if keep else 1 for n, keep in zip(_BIAS_TARGET, keeps))
               for keeps in itertools.product((False, True), repeat=4)]
BIAS_SHAPES += [(), (37,), (5, 1), (5, 37), (4, 1, 37), (4, 5, 37)]
V2_CASES.update({f"bias-{'x'.join(map(str, s)) or 'scalar'}":
                 dict(b=2, h=4, hk=2, lq=5, lk=37, causal=True, bias=s) for s in BIAS_SHAPES})
V2_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def v2_call(case: dict[str, Any], dtype: Any, seed: int = 0) -> dict[str, Any]:
    """The case's inputs (numpy) and options, as `reference_v2` and the binding take them.

    Keys past a sequence's length are NaN (never read); a left-padded sequence's leading keys are
    hidden by a key-padding mask (B, 1, 1, Lk).
    """
    rng = np.random.default_rng(seed)
    b, h, hk, lq, lk = (case[n] for n in ("b", "h", "hk", "lq", "lk"))
    d = 16
    dv = case.get("dv", d)

    def tensor(heads: int, length: int, dim: int, head_major: bool) -> np.ndarray:
        x = rng.standard_normal((b, length, heads, dim)).astype(dtype)  # (B, L, heads, D)
        if head_major:  # (B, heads, L, D)
            return np.ascontiguousarray(x.transpose(0, 2, 1, 3))
        return x.reshape(b, length, heads * dim)  # (B, L, heads*D)

    hm = case.get("hm", (False, False, False))
    q, k, v = (tensor(h, lq, d, hm[0]), tensor(hk, lk, d, hm[1]), tensor(hk, lk, dv, hm[2]))
    options: dict[str, Any] = dict(kv_num_heads=hk, causal=case.get("causal", False),
                                   window_size=case.get("window", 0),
                                   softcap=case.get("softcap", 0.0),
                                   output_layout=case.get("layout", 0))
    if "seqlens" in case:
        seqlens = np.asarray(case["seqlens"], np.int32)  # (B,)
        for i, n in enumerate(seqlens):
            for x, head_major in ((k, hm[1]), (v, hm[2])):
                if head_major:
                    x[i, :, n + 1:] = np.nan
                else:
                    x[i, n + 1:] = np.nan
        options["seqlens_k"] = seqlens
    if "left_pad" in case:
        mask = np.ones((b, 1, 1, lk), bool)  # (B, 1, 1, Lk)
        for i, pad in enumerate(case["left_pad"]):
            mask[i, ..., :pad] = False
        options["mask"] = mask
    if "bias" in case:
        options["bias"] = np.asarray(rng.standard_normal(case["bias"]) * 2).astype(dtype)
    return dict(q=q, k=k, v=v, num_heads=h, options=options)

"""Helpers for the native-library tests: one-node models, the float64 reference on numpy arrays
and its check.

The library itself is reached through flash_export.runtime.native, the one ctypes binding. torch is
imported only when a reference is computed, so that workers which never compute one (the fuzzer's
leak and thread modes) run without it.
"""

from __future__ import annotations

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

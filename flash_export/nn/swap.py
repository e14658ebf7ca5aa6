"""Whole models: copies whose FlashAttention layers compute another way.

`replace_attention` swaps each layer's class (the float64 reference, say), `with_attention` picks
the chunk loop or the native operator, and `reference_forward` runs a model with plain attention
in float64: the reference `validate`, the export check and the tests compare against.
"""

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from flash_export.nn.attention import ATTENTION_KINDS, FlashAttention, ReferenceAttention


def replace_attention(model: nn.Module, cls: type, **kwargs: object) -> nn.Module:
    """Return a copy of `model` whose FlashAttention modules are instances of `cls`.

    `cls` is a FlashAttention subclass that overrides `attend`; each replacement has the same
    configuration and weights. `kwargs` go to `cls.__init__`.
    """

    def convert(fa: FlashAttention) -> FlashAttention:
        new = cls(fa.embed_size, fa.heads, fa.chunk_size, causal=fa.causal, bias=fa.has_bias,
                  **kwargs)
        new.load_state_dict(fa.state_dict())
        new.to(device=fa.q_proj.weight.device, dtype=fa.q_proj.weight.dtype)
        return new.train(fa.training)

    if isinstance(model, FlashAttention):
        return convert(model)
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for attr, sub in list(parent.named_children()):
            if isinstance(sub, FlashAttention):
                setattr(parent, attr, convert(sub))
    return model


def with_attention(model: nn.Module, attention: str) -> nn.Module:
    """A copy of `model` whose FlashAttention layers compute with `attention`.

    Args:
        model: a FlashAttention or a module built from FlashAttention layers.
        attention: "chunk" (the PyTorch chunk loop) or "native" (the registered operator).

    Raises:
        ValueError: an unknown `attention`.
    """
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    if attention == "native":
        from flash_export.nn.torch_op import register

        register()
    model = copy.deepcopy(model)
    for layer in model.modules():
        if isinstance(layer, FlashAttention):
            layer.native = attention == "native"  # type: ignore[misc]  # before scripting
    return model


def reference_forward(model: nn.Module, values: Tensor, keys: Tensor, queries: Tensor,
                      mask: Optional[Tensor] = None,
                      dtype: torch.dtype = torch.float64) -> Tensor:
    """Run `model` with every FlashAttention replaced by plain attention, in `dtype`.

    Args:
        model: a FlashAttention or a module built from FlashAttention layers.
        values: (B, Lk, E), cast to `dtype` like the other inputs.
        keys: (B, Lk, E).
        queries: (B, Lq, E).
        mask: optional, any dtype, broadcastable to (B, H, Lq, Lk).
        dtype: the precision of the reference, float64 by default.

    Returns:
        (B, Lq, E) in `dtype`.
    """
    ref = replace_attention(model, ReferenceAttention).to(dtype).eval()
    with torch.no_grad():
        return ref(values.to(dtype), keys.to(dtype), queries.to(dtype), mask)

"""The attention and mask functions transformers calls in a swapped model, registered together.

transformers dispatches attention through two registries keyed by one name: every attention
layer calls `AttentionInterface[name](module, query, key, value, attention_mask, ...)`, and the
model builds `attention_mask` once per forward through `AttentionMaskInterface[name](...)`.
Registering only the first drops padding silently (an unregistered mask name gets no mask), so
`register()` registers both, and the name holds no "flash" (transformers reads any name
containing it as a FlashAttention-2/3 request).

How a mask reaches the kernel (`flash_export::attention` takes a bool mask broadcastable to
(B, H, Lq, Lk) plus a bottom-right `causal` flag; `flash_export.core.contract`). What our mask
function returns, and what the attention function makes of it:

- ``None``: no mask; causal as the layer says (`is_causal` argument, else `module.is_causal`),
  the rule of transformers' own SDPA path when its mask function skips a plain pattern. Our
  mask function returns it for a causal pattern without padding whose last query and last key
  are aligned.
- a 2D bool ``(B, Lk)``: key padding (True = a real token) of that aligned causal pattern; the
  kernel gets it as ``(B, 1, 1, Lk)`` with ``causal=True``. Only our mask function makes 2D masks.
- a 4D bool ``(B|1, 1|H, Lq|1, Lk)``: the whole pattern, ``causal=False``. Key padding of a
  bidirectional pattern comes as ``(B, 1, 1, Lk)``; every other pattern (sliding windows,
  chunked, packed or image-token overlays, a cache whose keys do not end with the queries) is
  materialised by transformers' `sdpa_mask`; a 4D mask the caller passed in comes as is.
- a 4D float mask (a caller's own): additive, so only its values say whether it is a mask
  (0 or below `finfo.min / 2`) or carries a bias (BEiT, Swin). Read in eager mode; refused
  while tracing, where values cannot be read.

Rows that see no key give zeros (the kernel's contract); eager gives the mean of the values
there. Only padded query rows are such rows, and their outputs are never read.
"""

import threading
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)
from transformers.utils.import_utils import is_tracing

from flash_export.core.errors import ConversionError

# The name both functions are registered under (`config._attn_implementation`). Never "flash"
# in it: transformers would take it for FlashAttention-2/3 and fail to build the model.
IMPLEMENTATION = "fe_native"
# Keys per online-softmax step of the kernel (the op's and the ONNX node's `chunk_size`).
CHUNK_SIZE = 64
# Element types the kernel computes in (flash_export.nn.torch_op).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register the op and both functions under `IMPLEMENTATION`, once per process.

    Raises:
        RuntimeLibraryError: the native library cannot be loaded.
    """
    global _registered
    from flash_export.nn.torch_op import register as register_op

    with _lock:
        if _registered:
            return
        register_op()
        AttentionInterface.register(IMPLEMENTATION, attention_forward)
        AttentionMaskInterface.register(IMPLEMENTATION, attention_mask)
        _registered = True


# What the kernel cannot compute exactly, in the words both checks (`refused_call` here, the
# model's configuration in `flash_export.hf.swap`) use.
SOFTCAP = "attention logit softcapping"
SINKS = "attention sinks (a learned logit per head that takes softmax mass)"
POSITION_BIAS = ("an additive position bias (T5-style relative attention; the kernel takes no "
                 "bias before op contract v2, issue 26)")
VALUE_HEAD = "a value head size that differs from the query's (Dv != Dqk)"


def refused_call(query: Tensor, value: Tensor, dropout: float, kwargs: dict) -> Optional[str]:
    """The feature of this call our kernel cannot compute exactly, in words, or None.

    Checked at every call, whatever `swap_attention` saw: models pass these as arguments.
    """
    if kwargs.get("softcap") is not None:
        return f"{SOFTCAP} (softcap={kwargs['softcap']})"
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return SINKS
    if kwargs.get("position_bias") is not None:
        return POSITION_BIAS
    if value.shape[-1] != query.shape[-1]:
        return f"{VALUE_HEAD}: Dv = {value.shape[-1]}, Dqk = {query.shape[-1]}"
    if dropout:
        return (f"attention dropout (p = {dropout}: the model is in training mode; the kernel "
                "is for inference, call model.eval())")
    if kwargs.get("output_attentions"):
        return ("attention weights (output_attentions=True): the kernel never forms them; use "
                "attn_implementation='eager' for them")
    if query.dtype not in DTYPES:
        return f"{query.dtype} (the kernel computes in float32, float16 or bfloat16)"
    return None


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      **kwargs: Any) -> Tuple[Tensor, None]:
    """The attention function transformers' layers call, computed by `flash_export::attention`.

    Args:
        module: the calling attention layer (its `is_causal` and head counts).
        query: (B, H, Lq, D) float32, float16 or bfloat16.
        key: (B, Hkv, Lk, D), Hkv dividing H; same dtype.
        value: (B, Hkv, Lk, D); same dtype.
        attention_mask: None, or a mask in one of the forms the module docstring lists.
        dropout: attention dropout probability; anything but 0 is refused.
        scaling: multiplies the logits; default 1/sqrt(D).
        is_causal: the layer's causality when it passes it (else `module.is_causal`).
        **kwargs: the rest of what the layer passes; features the kernel cannot compute
            (softcap, sinks, position_bias, output_attentions) are refused.

    Returns:
        ((B, Lq, H, D) in query's dtype, None): no attention weights.

    Raises:
        ConversionError: a feature the kernel cannot compute exactly, named.
    """
    refused = refused_call(query, value, dropout, kwargs)
    if refused is not None:
        raise ConversionError(f"{type(module).__name__}: flash_export cannot compute {refused}")
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads:
        raise ConversionError(f"{type(module).__name__}: {heads} query heads do not share "
                              f"{kv_heads} key/value heads evenly")
    mask, causal = kernel_mask(module, attention_mask, is_causal)
    scale = head_dim ** -0.5 if scaling is None else float(scaling)
    # Op contract v2: query (B, H, Lq, D), key and value (B, Hkv, Lk, D) read in place through
    # their strides, grouped heads sharing each key/value head (no repeat, no copy).
    out = torch.ops.flash_export.attention.v2(query, key, value, mask, num_heads=heads,
                                              kv_num_heads=kv_heads, chunk_size=CHUNK_SIZE,
                                              causal=causal, scale=scale)  # (B, Lq, H * D)
    return out.view(batch, q_len, heads, head_dim), None


def kernel_mask(module: torch.nn.Module, attention_mask: Optional[Tensor],
                is_causal: Optional[bool]) -> Tuple[Optional[Tensor], bool]:
    """(bool mask broadcastable to (B, H, Lq, Lk) or None, causal) for the op.

    Raises:
        ConversionError: a mask in none of the forms the module docstring lists, or a float
            mask carrying a bias (or one that cannot be read: while tracing).
    """
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        return None, bool(causal)
    if attention_mask.dim() == 2 and attention_mask.dtype == torch.bool:
        return attention_mask[:, None, None, :], True  # (B, 1, 1, Lk) key padding, causal
    if attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
        return attention_mask, False
    if attention_mask.dim() == 4 and attention_mask.is_floating_point():
        return float_mask_as_bool(attention_mask), False
    raise ConversionError(f"an attention mask of shape {list(attention_mask.shape)} and dtype "
                          f"{attention_mask.dtype} reached the attention function; expected "
                          "None, the 2D bool key padding flash_export's mask function makes, "
                          "or a 4D bool or float mask")


def float_mask_as_bool(mask: Tensor) -> Tensor:
    """An additive float mask as a bool one (True = attend), when it is only a mask.

    Its values must be 0 (attend) or at most `finfo.min / 2` (blocked: -inf, finfo.min, sums
    of them); any other value is a bias, which the kernel cannot add.

    Raises:
        ConversionError: the mask carries a bias, or is being traced (its values unknown).
    """
    if is_tracing(mask) or torch.compiler.is_exporting():
        raise ConversionError("a float attention mask cannot be exported: only its values tell "
                              "a mask from a bias (BEiT, Swin), and they are unknown while "
                              "tracing; pass a 2D attention_mask or a bool 4D mask")
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool((blocked | (mask == 0)).all()):
        raise ConversionError("an additive attention bias (a float mask holding values other "
                              "than 0 and -inf): the kernel takes no bias before op contract "
                              "v2, issue 26")
    return ~blocked


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0,
                   kv_offset: int = 0, mask_function: Callable = causal_mask_function,
                   attention_mask: Optional[Tensor] = None, allow_is_causal_skip: bool = True,
                   allow_is_bidirectional_skip: bool = False, **kwargs: Any) -> Optional[Tensor]:
    """The mask function transformers calls once per forward: what `attention_forward` reads.

    Args:
        batch_size: B.
        q_length: Lq, the queries of this forward.
        kv_length: Lk, the keys the layers see (cache included).
        q_offset: position of the first query (a tensor for a static cache).
        kv_offset: position of the first key.
        mask_function: the pattern, as a function of (batch, head, q_idx, kv_idx).
        attention_mask: optional (B, >= kv_offset + Lk) bool, True = a real token.
        allow_is_causal_skip: whether the caller lets a causal pattern go unmaterialised.
        allow_is_bidirectional_skip: the same for a bidirectional pattern.
        **kwargs: passed on to `sdpa_mask` when the pattern is materialised.

    Returns:
        None, (B, Lk) bool key padding of an aligned causal pattern, or a 4D bool mask
        (B, 1, 1 or Lq, Lk): the forms the module docstring lists.
    """
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)  # (B, >= Lk) or None
    if padding is not None:
        padding = padding[:, kv_offset:kv_offset + kv_length]  # (B, Lk)
    # A plain comparison: under torch.export the sizes are symbolic, and guard_or_false would
    # call them unequal and materialise every mask.
    aligned = not isinstance(q_offset, Tensor) and q_offset + q_length == kv_offset + kv_length
    if mask_function is causal_mask_function and allow_is_causal_skip and aligned:
        return padding  # None or (B, Lk)
    if mask_function is bidirectional_mask_function and allow_is_bidirectional_skip:
        return None if padding is None else padding[:, None, None, :]  # (B, 1, 1, Lk)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, allow_is_causal_skip=False,
                     allow_is_bidirectional_skip=False, **kwargs)  # (B, 1, Lq, Lk)

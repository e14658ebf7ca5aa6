"""A transformers model's float64 reference: eager attention, computed in float64 throughout.

transformers' own eager attention is not a float64 reference: many models (Llama, Mistral,
Qwen2, Phi3, Gemma3...) take the softmax in float32 whatever the input dtype, so a float64 copy
computes its probabilities in float32, and the padded query rows of a left-padded batch (every
key blocked by `finfo(float64).min`, -inf once in float32) become NaN, which the next layer's
values carry into every row. `reference_model` registers the eager computation with the eager
masks under its own name, softmax in the input dtype, and switches a float64 copy to it: the
reference flash_export's float32 results are held to (`flash_export.core.tolerance`).
"""

import copy
import threading
from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

# The registered name (transformers' `config._attn_implementation`).
REFERENCE = "fe_reference"

_lock = threading.Lock()
_registered = False


def register_reference() -> None:
    """Register the reference attention and the eager mask function under `REFERENCE`, once."""
    global _registered
    with _lock:
        if not _registered:
            AttentionInterface.register(REFERENCE, reference_attention_forward)
            AttentionMaskInterface.register(REFERENCE, eager_mask)
            _registered = True


def reference_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                attention_mask: Optional[Tensor], dropout: float = 0.0,
                                scaling: Optional[float] = None,
                                **kwargs: Any) -> Tuple[Tensor, Tensor]:
    """Eager attention (repeat K/V, matmul, additive mask, softmax, matmul) in query's dtype.

    Args:
        module: the calling attention layer.
        query: (B, H, Lq, D).
        key: (B, Hkv, Lk, D), Hkv dividing H.
        value: (B, Hkv, Lk, Dv).
        attention_mask: None, an additive float mask or a bool mask (True = attend),
            broadcastable to (B, H, Lq, Lk).
        dropout: unused: the reference is for inference.
        scaling: multiplies the logits; default 1/sqrt(D).
        **kwargs: what else the layer passes; unused.

    Returns:
        (output (B, Lq, H, Dv), weights (B, H, Lq, Lk)).
    """
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # (B, H, Lk, D)
    value = value.repeat_interleave(groups, dim=1)  # (B, H, Lk, Dv)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = torch.matmul(query, key.transpose(2, 3)) * scale  # (B, H, Lq, Lk)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attention_mask, torch.finfo(logits.dtype).min)
    elif attention_mask is not None:
        logits = logits + attention_mask
    weights = logits.softmax(dim=-1)  # (B, H, Lq, Lk), in query's dtype
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def reference_model(model: PreTrainedModel) -> PreTrainedModel:
    """A float64 copy of `model` computing eager attention in float64 (`model` is untouched)."""
    register_reference()
    reference = copy.deepcopy(model).double().eval()  # the copy has its own config
    reference.set_attn_implementation(REFERENCE)
    return reference

"""The `text-generation-with-past` graph: one graph for prefill and decode, the KV cache as tensors.

Inputs and outputs as optimum names them: ``input_ids`` and ``position_ids`` (batch, seq), an
``attention_mask`` (batch, total) over the past and the new tokens (total = past + seq), and
per layer ``past_key_values.N.key`` / ``.value`` (batch, kv_heads, past, head_dim) in; ``logits``
(batch, seq, vocab) and ``present.N.key`` / ``.value`` (batch, kv_heads, past + seq, head_dim)
out. Prefill feeds a past of length 0; each decode step feeds the last step's presents. Grouped
heads stay grouped (the cache holds kv_heads, not heads).
"""

import inspect
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

from flash_export.core.errors import ModelError
from flash_export.core.feeds import make_feed
from flash_export.core.io_spec import IOSpec, TensorSpec
from flash_export.runtime.generation import TOKEN_INPUTS, positions

# The example the exporter traces with: two rows, the second left-padded, a past of 7.
_EXAMPLE = {"batch": 2, "seq": 5, "past": 7}
_EXAMPLE_PADDED = 3


def cache_geometry(model: PreTrainedModel) -> Tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's cache, read off one forward of one token."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ModelError(f"{type(model).__name__} takes no position_ids: a left-padded batch "
                         "would decode at the wrong positions")
    with torch.no_grad():
        cache = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True,
                      return_dict=True).past_key_values
    if not isinstance(cache, DynamicCache) or not cache.layers:
        raise ModelError(f"{type(model).__name__} returns a {type(cache).__name__} cache, not "
                         "a DynamicCache of key and value tensors")
    keys = getattr(cache.layers[0], "keys", None)  # (1, kv_heads, 1, head_dim)
    if not isinstance(keys, Tensor):
        raise ModelError(f"{type(model).__name__}'s cache holds no key tensors (a linear "
                         "attention or recurrent state): nothing to pass between steps")
    return len(cache.layers), int(keys.shape[1]), int(keys.shape[3])


def past_names(layers: int) -> Tuple[List[str], List[str]]:
    """(past input names, present output names), key before value, layer by layer."""
    pairs = [(n, kind) for n in range(layers) for kind in ("key", "value")]
    return ([f"past_key_values.{n}.{kind}" for n, kind in pairs],
            [f"present.{n}.{kind}" for n, kind in pairs])


def with_past_io(model: PreTrainedModel, output: str) -> IOSpec:
    """The graph's IOSpec: token inputs, the mask over past + new tokens, the cache in and out."""
    text = model.config.get_text_config()
    longest = getattr(text, "max_position_embeddings", None)
    layers, kv_heads, head_dim = cache_geometry(model)
    pasts, presents = past_names(layers)
    inputs = [TensorSpec("input_ids", "int64", ("batch", "seq"), low=0, high=text.vocab_size),
              TensorSpec("attention_mask", "int64", ("batch", "total"), low=0, high=2,
                         role="padding"),
              TensorSpec("position_ids", "int64", ("batch", "seq"), low=0, high=longest or 2**31),
              *[TensorSpec(name, "float32", ("batch", kv_heads, "past", head_dim))
                for name in pasts]]
    return IOSpec(tuple(inputs), outputs=(output, *presents),
                  sizes={"batch": (1, None), "seq": (1, longest), "total": (1, longest),
                         "past": (0, longest)}, batch="batch")


class WithPast(nn.Module):
    """A causal LM as the with-past graph computes it (see the module docstring)."""

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                past_key_values: List[Tensor]) -> Tuple[Tensor, ...]:
        """Logits and the presents, key and value per layer.

        Args:
            input_ids: (B, S) int64, the new tokens.
            attention_mask: (B, P + S) int64, 1 = a real token, over the past and new tokens.
            position_ids: (B, S) int64.
            past_key_values: per layer key then value, each (B, Hkv, P, D); P may be 0.

        Returns:
            (logits (B, S, V), then per layer key and value (B, Hkv, P + S, D)).
        """
        cache = DynamicCache()  # full layers: a sliding window is the mask's, not the cache's
        for layer in range(len(past_key_values) // 2):
            cache.update(past_key_values[2 * layer], past_key_values[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True,
                         return_dict=True)
        presents: List[Tensor] = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out[self.output], *presents)


def with_past_example(io: IOSpec) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(the exporter's example inputs, its dynamic shapes), the cache as one list argument."""
    sizes = {**_EXAMPLE, "total": _EXAMPLE["past"] + _EXAMPLE["seq"]}
    feed = {k: torch.from_numpy(v) for k, v in make_feed(io, sizes, seed=0, padded=False).items()}
    mask = feed["attention_mask"]
    mask[1, :_EXAMPLE_PADDED] = 0  # an all-ones mask may be folded away
    feed["position_ids"] = torch.from_numpy(positions(mask.numpy())[:, -_EXAMPLE["seq"]:])
    pasts = [t.name for t in io.inputs if t.name.startswith("past_key_values.")]
    example: Dict[str, Any] = {name: feed[name] for name in TOKEN_INPUTS}
    example["past_key_values"] = [feed[name] for name in pasts]
    dims = {name: torch.export.Dim(name, min=0 if name == "past" else 1)
            for name in ("batch", "seq", "total", "past")}
    dynamic = {"input_ids": {0: dims["batch"], 1: dims["seq"]},
               "attention_mask": {0: dims["batch"], 1: dims["total"]},
               "position_ids": {0: dims["batch"], 1: dims["seq"]},
               "past_key_values": [{0: dims["batch"], 2: dims["past"]} for _ in pasts]}
    return example, dynamic

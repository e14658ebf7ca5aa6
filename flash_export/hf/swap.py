"""`swap_attention`: switch a transformers model to our kernel, or refuse by name.

A model is switched only when every attention it computes goes through transformers'
`AttentionInterface` (a model with attention code of its own, as Bloom, would keep computing
its own way while its masks changed form) and it uses nothing the kernel cannot compute exactly:
logit softcapping (Gemma 2), attention sinks (gpt-oss), a value head size other than the
query's (DeepSeek's multi-head latent attention), a position bias (T5). The same features are
checked again at every call (`flash_export.hf.attention.refused_call`), for models that pass
them without a configuration entry saying so.
"""

import copy
import importlib.metadata
import inspect
import re
from typing import Dict, Iterator, List, Optional, Tuple

from packaging.specifiers import SpecifierSet
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from flash_export.core.errors import ConversionError
from flash_export.hf.attention import (
    IMPLEMENTATION,
    POSITION_BIAS,
    SINKS,
    SOFTCAP,
    VALUE_HEAD,
    register,
)

# The transformers releases this package is tested with (setup.py's `hf` extra pins the same).
# The mask function relies on transformers' mask-function arguments and pattern functions, which
# change between minor releases.
TESTED_TRANSFORMERS = ">=5.23,<5.24"


def swap_attention(model: nn.Module) -> nn.Module:
    """Make `model` compute attention with flash_export's kernel; returns `model` itself.

    The kernel runs as `flash_export::attention`, so the swapped model also exports to ONNX
    (one FlashAttention node per layer) and `.pt2`. Inference only: dropout and gradients are
    refused at the call. `model` gets a configuration of its own first: other models built from
    the same configuration object keep their attention. Switch back with
    `model.set_attn_implementation("eager")` (or "sdpa").

    Args:
        model: a transformers `PreTrainedModel` (any task head).

    Returns:
        `model`, switched in place.

    Raises:
        ConversionError: a transformers release outside `TESTED_TRANSFORMERS`, a model that
            computes attention outside transformers' AttentionInterface, or a feature the kernel
            cannot compute exactly; the message names it. `model` is left as it was.
        RuntimeLibraryError: the native library cannot be loaded.
    """
    version = transformers_version()
    if version not in SpecifierSet(TESTED_TRANSFORMERS, prereleases=True):
        raise ConversionError(f"flash_export.hf is tested with transformers{TESTED_TRANSFORMERS},"
                              f" found {version}: pip install 'flash-export[hf]' installs a "
                              "tested release")
    refused = refusal(model)
    if refused is not None:
        raise ConversionError(f"{type(model).__name__}: flash_export cannot compute {refused}")
    assert isinstance(model, PreTrainedModel)  # refusal() said so
    register()
    originals = _own_configs(model)
    model.set_attn_implementation(IMPLEMENTATION)
    left = [f"{name or type(model).__name__} ({sub.config._attn_implementation})"
            for name, sub in model.named_modules()
            if isinstance(sub, PreTrainedModel) and sub.config._attn_implementation
            != IMPLEMENTATION]
    if left:
        for module, attr, config in originals:  # back as it was
            module.__dict__[attr] = config
        raise ConversionError(f"{type(model).__name__}: transformers kept {', '.join(left)} on "
                              "its own attention; flash_export switches whole models only")
    return model


def transformers_version() -> str:
    """The installed transformers release (its distribution's version)."""
    return importlib.metadata.version("transformers")


def refusal(model: nn.Module) -> Optional[str]:
    """Why `swap_attention` refuses `model`, in words, or None when it can switch it."""
    if not isinstance(model, PreTrainedModel):
        return (f"attention in a {type(model).__name__}: not a transformers PreTrainedModel "
                "(for nn.MultiheadAttention models use flash_export.convert)")
    for name, sub in model.named_modules():
        if isinstance(sub, PreTrainedModel) and not (sub._supports_attention_backend
                                                     or sub._can_set_attn_implementation()):
            return (f"attention in {type(sub).__name__}: its modeling code computes attention "
                    "itself, not through transformers' AttentionInterface")
        if _computes_own_attention(type(sub)):
            return (f"attention in {type(sub).__name__} ({name}): its forward computes attention "
                    "itself, not through transformers' AttentionInterface")
        if isinstance(getattr(sub, "sinks", None), Tensor):
            return f"{SINKS} in {name}"
        # T5's bucketed bias (an embedding), BEiT's and Swin's tables (added to the mask).
        if getattr(sub, "has_relative_attention_bias", False) or isinstance(
                getattr(sub, "relative_attention_bias", None), nn.Module) or isinstance(
                getattr(sub, "relative_position_bias_table", None), Tensor):
            return f"{POSITION_BIAS} in {name}"
    for config in _configs(model):
        softcap = getattr(config, "attn_logit_softcapping", None)
        if softcap is not None:
            return f"{SOFTCAP} (attn_logit_softcapping={softcap})"
        v_dim, qk_dim = getattr(config, "v_head_dim", None), getattr(config, "qk_head_dim", None)
        if v_dim is not None and qk_dim is not None and v_dim != qk_dim:
            return f"{VALUE_HEAD}: v_head_dim {v_dim}, qk_head_dim {qk_dim}"
    return None


def _computes_own_attention(cls: type) -> bool:
    """Whether an attention class's forward computes a softmax or SDPA itself.

    transformers' own check (`_can_set_attn_implementation`) reads a whole modeling file; this
    one reads each attention class a model holds, wherever it was defined.
    """
    if cls not in _OWN_ATTENTION:
        forward = vars(cls).get("forward") if "Attention" in cls.__name__ else None
        try:
            source = "" if forward is None else inspect.getsource(forward)
        except (OSError, TypeError):  # no source: nothing to tell from it
            source = ""
        computes = re.search(r"softmax\(|scaled_dot_product_attention\(", source) is not None
        _OWN_ATTENTION[cls] = computes and "get_interface(" not in source
    return _OWN_ATTENTION[cls]


_OWN_ATTENTION: Dict[type, bool] = {}


def _configs(model: nn.Module) -> Iterator[PretrainedConfig]:
    """Every configuration object `model`'s modules hold, and their sub-configurations."""
    seen: Dict[int, PretrainedConfig] = {}
    todo = [v for m in model.modules() for v in vars(m).values()
            if isinstance(v, PretrainedConfig)]
    while todo:
        config = todo.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        todo.extend(sub for key in getattr(config, "sub_configs", {})
                    if isinstance(sub := getattr(config, key, None), PretrainedConfig))
    return iter(seen.values())


def _own_configs(model: nn.Module) -> List[Tuple[nn.Module, str, PretrainedConfig]]:
    """Give `model` copies of the configuration objects its modules hold; return the originals.

    transformers records the attention implementation in the configuration, and models built
    from one configuration object share it (`Model._from_config(cfg, attn_implementation=...)`
    writes into `cfg`): switching one would switch them all. One deep copy with one memo keeps
    the sharing inside `model` (a task head and its base model hold the same object, a
    composite model holds its sub-configurations).
    """
    memo: dict = {}
    originals = []
    for module in model.modules():  # the root first: its config copies the sub-configs
        for attr, value in list(vars(module).items()):
            if isinstance(value, PretrainedConfig):
                originals.append((module, attr, value))
                module.__dict__[attr] = copy.deepcopy(value, memo)
    return originals

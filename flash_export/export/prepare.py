"""What every exporter shares: the model's layers, spec, IOSpec and metadata, prepared once."""

import contextlib
import dataclasses
import inspect
import os
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from flash_export._version import __version__
from flash_export.core.contract import NATIVE_REQUIRES
from flash_export.core.errors import ExportError, summary
from flash_export.core.io_spec import IOSpec, with_float_dtype
from flash_export.nn.attention import ATTENTION_KINDS, FlashAttention
from flash_export.nn.conversion import no_flash_attention
from flash_export.nn.model_io import example_inputs, output_names, resolve_io
from flash_export.nn.spec import ModelSpec
from flash_export.nn.swap import with_attention

# torch.jit.script_method: warned from inside AOTInductor's compile (pt2_export).
_JIT_DEPRECATED = r"`torch\.jit\.(script|script_method|save|load)` is deprecated"


PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def quiet_jit_deprecation() -> Iterator[None]:
    """Silence exactly torch's DeprecationWarnings for torch.jit.script/script_method/save/load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATED, category=DeprecationWarning)
        yield


def flash_layers(model: nn.Module) -> List[FlashAttention]:
    """The FlashAttention layers of `model` in forward-definition order.

    Raises:
        ExportError: `model` is not an nn.Module or holds no FlashAttention layer.
    """
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, FlashAttention)]
    if not layers:
        raise ExportError(no_flash_attention(model))
    return layers


def spec_of(model: nn.Module, spec: Optional[ModelSpec] = None) -> Optional[ModelSpec]:
    """The spec recorded for `model`: `spec` when given, else read off a plain FlashAttention.

    None for any other model: its artifact then records no spec, and `validate` needs the model
    named again (`--model`, or `model=`) to rebuild its reference.
    """
    if spec is not None:
        return spec
    if isinstance(model, FlashAttention):
        return ModelSpec(embed=model.embed_size, heads=model.heads, chunk=model.chunk_size,
                         causal=model.causal)
    return None


def artifact_metadata(spec: Optional[ModelSpec], layer: FlashAttention, io: IOSpec,
                      **extra: str) -> Dict[str, str]:
    """String metadata every artifact carries: versions, attention config, spec and IOSpec.

    embed, heads, chunk_size and causal describe the model's first FlashAttention layer (for a
    plain FlashAttention, the spec; a zoo model may fix some, a language model is causal).
    """
    meta = {
        "flash_export_version": __version__,
        "torch_version": torch.__version__,
        "embed": str(layer.embed_size),
        "heads": str(layer.heads),
        "chunk_size": str(layer.chunk_size),
        "causal": str(int(layer.causal)),
        "io_spec": io.to_json(),
    }
    if spec is not None:  # paths absolute, with hashes: `validate` works from any folder
        meta["model_spec"] = spec.pinned().to_json()
    meta.update(extra)
    return meta


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What an exporter needs besides the model: its IOSpec, example inputs and metadata."""

    io: IOSpec
    example: Dict[str, Tensor]
    meta: Dict[str, str]


def prepare(model: nn.Module, runnable: Any, *, spec: Optional[ModelSpec], io: Optional[IOSpec],
            args: Optional[Sequence[Any]], kwargs: Optional[Mapping[str, Any]], mask: bool,
            dtype: str, **extra: str) -> Prepared:
    """Resolve `model`'s inputs and outputs, make example inputs in `dtype`, write metadata.

    `runnable` is what the exporter exports (a copy of `model` in eval mode and `dtype`, or its
    script): it runs once on the examples to name the outputs.

    Raises:
        ExportError: no FlashAttention in the model, inputs that cannot be resolved, examples
            that do not fit the forward, or outputs that differ from the declared ones.
    """
    layers = flash_layers(model)
    resolved = with_float_dtype(resolve_io(model, io=io, args=args, kwargs=kwargs, mask=mask),
                                dtype)
    if args is not None or kwargs is not None:
        bound = inspect.signature(model.forward).bind(*(args or ()), **(kwargs or {}))
        # Clones: one tensor passed as several inputs would be merged by the exporter.
        example = {n: t.detach().clone().to(getattr(torch, dtype)) if t.is_floating_point()
                   else t.detach().clone() for n, t in bound.arguments.items()
                   if isinstance(t, Tensor)}
    else:
        example = example_inputs(resolved)
    try:
        with torch.no_grad():
            structure = runnable(**example, **resolved.constants)
    except Exception as exc:  # the user's forward may fail in any way on the examples
        raise ExportError(f"{type(model).__name__} fails on its example inputs "
                          f"({', '.join(example)}): {summary(exc)}") from exc
    names = output_names(structure)
    if resolved.outputs == ("output",) and names != ("output",):
        resolved = dataclasses.replace(resolved, outputs=names)
    elif len(resolved.outputs) != len(names):
        raise ExportError(f"the model returns {len(names)} outputs, its IOSpec names "
                          f"{list(resolved.outputs)}")
    meta = artifact_metadata(spec_of(model, spec), layers[0], resolved, dtype=dtype, **extra)
    return Prepared(resolved, example, meta)


def attention_as(model: nn.Module, attention: str) -> nn.Module:
    """`model` with every FlashAttention layer computing with `attention` (a copy if it changes).

    Raises:
        ExportError: an unknown `attention`, or no FlashAttention layer in `model`.
    """
    if attention not in ATTENTION_KINDS:
        raise ExportError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    if all(layer.attention == attention for layer in flash_layers(model)):
        return model
    return with_attention(model, attention)


def native_metadata() -> Dict[str, str]:
    """The metadata of an artifact that calls the registered operator: what its loader needs."""
    return {"attention": "native", "requires": NATIVE_REQUIRES}

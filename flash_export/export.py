"""Export a FlashAttention model to deployable artifacts, one function per artifact kind."""

import contextlib
import dataclasses
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from flash_export._version import __version__
from flash_export.artifact import (
    METADATA_FILE,
    atomic_write,
    require_kind,
    sha256_file,
    torchscript_metadata,
)
from flash_export.attention import ATTENTION_KINDS, FlashAttention
from flash_export.attention_swap import with_attention
from flash_export.contract import NATIVE_REQUIRES
from flash_export.conversion import no_flash_attention
from flash_export.errors import ArtifactError, ExportError, first_line, summary
from flash_export.io_spec import IOSpec, with_float_dtype
from flash_export.model_io import example_inputs, output_names, resolve_io
from flash_export.spec import ModelSpec
from flash_export.trust import Provenance, require_provenance

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


def export_torchscript(model: nn.Module, path: PathLike, *,
                       spec: Optional[ModelSpec] = None, io: Optional[IOSpec] = None,
                       args: Optional[Sequence[Any]] = None,
                       kwargs: Optional[Mapping[str, Any]] = None,
                       attention: str = "chunk") -> Path:
    """Script `model` (never trace it) and save it as a TorchScript archive.

    The archive runs in C++ via `torch::jit::load` and carries `flash_export.json` metadata
    (flash-export version, embed, heads, chunk size, causal, model spec, IOSpec).

    Args:
        model: any module built with FlashAttention layers, whatever its forward's signature.
        path: the `.pt` file to write (atomically).
        spec: how to rebuild `model`; read off `model` when it is a plain FlashAttention.
        io: the model's inputs and outputs (see `flash_export.model_io.resolve_io` for the
            default: the model's io_spec(), the examples, or the attention contract).
        args: example positional inputs, as `torch.export` takes them.
        kwargs: example keyword inputs.
        attention: "chunk" (default): the attention is the PyTorch chunk loop and any libtorch
            loads the archive; "native": it calls the registered operator
            `flash_export::attention` (our kernel core), and a C++ process must load the libtorch
            shim (custom_ops/torch) first; the metadata records that ("attention", "requires").

    Returns:
        The written path.

    Raises:
        ExportError: `path` does not end in .pt (.pth, .ts), an unknown `attention`, the model
            holds no FlashAttention, cannot be scripted, or the file cannot be written.
    """
    require_kind(path, "torchscript")
    runnable = attention_as(model, attention)
    extra = native_metadata() if attention == "native" else {}
    try:
        with quiet_jit_deprecation():
            scripted = torch.jit.script(runnable.eval())
    except Exception as exc:  # TorchScript reports unsupported Python in many exception types
        raise ExportError(f"torch.jit.script failed: {first_line(exc)}") from exc
    meta = prepare(model, scripted, spec=spec, io=io, args=args, kwargs=kwargs, mask=True,
                   dtype="float32", artifact="torchscript", **extra).meta

    def write(tmp: Path) -> None:
        with quiet_jit_deprecation():
            torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: json.dumps(meta)})

    try:
        return atomic_write(path, write)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc}") from exc


def load_torchscript(path: PathLike, *, trust: bool = False, expect_sha256: Optional[str] = None,
                     ) -> "tuple[torch.jit.ScriptModule, Dict[str, str]]":
    """Load a TorchScript archive written by `export_torchscript`, with its metadata.

    A `.pt` file is a program: it is loaded only when its SHA-256 is in the user's trust store
    (every export on this machine is recorded there), equals `expect_sha256`, or `trust` is set.
    The manifest beside it is not evidence: whoever ships a file can ship its manifest.

    Raises:
        ArtifactError: the file is missing, of unknown origin (without `trust`), not the
            expected file, unreadable, or has no flash-export metadata.
    """
    module, meta, _ = load_torchscript_checked(path, trust=trust, expect_sha256=expect_sha256)
    return module, meta


def load_torchscript_checked(path: PathLike, *, trust: bool = False,
                             expect_sha256: Optional[str] = None,
                             ) -> "tuple[torch.jit.ScriptModule, Dict[str, str], Provenance]":
    """`load_torchscript`, also returning where trust in the file came from."""
    if not Path(path).is_file():
        raise ArtifactError(f"artifact not found: {path}")
    # One open file for the hash, the metadata and the load: the bytes judged are the bytes run,
    # even if someone swaps the file at `path` in between.
    with open(path, "rb") as f:
        digest = sha256_file(f)
        origin = require_provenance(path, expect_sha256=expect_sha256, trust=trust,
                                    digest=digest)
        f.seek(0)
        meta = torchscript_metadata(f, path)
        f.seek(0)
        if meta.get("attention") == "native":  # it calls flash_export::attention
            from flash_export.torch_op import register

            register()
        try:
            with quiet_jit_deprecation():
                module = torch.jit.load(f, map_location="cpu")
        except (RuntimeError, ValueError, OSError) as exc:
            raise ArtifactError(f"cannot load TorchScript file {path}: "
                                f"{first_line(exc)}") from exc
    return module, meta, origin

"""Export a FlashAttention model to deployable artifacts, one function per artifact kind."""

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

import torch
from torch import nn

from flash_export._version import __version__
from flash_export.artifact import METADATA_FILE, atomic_write, sha256_file, torchscript_metadata
from flash_export.attention import FlashAttention
from flash_export.errors import ArtifactError, ExportError, first_line
from flash_export.spec import ModelSpec
from flash_export.trust import Provenance, require_provenance

_JIT_DEPRECATED = r"`torch\.jit\.(script|save|load)` is deprecated"

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def quiet_jit_deprecation() -> Iterator[None]:
    """Silence exactly torch's DeprecationWarnings for torch.jit.script/save/load."""
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
        raise ExportError(f"{type(model).__name__} contains no FlashAttention layer")
    return layers


def spec_of(model: nn.Module, spec: Optional[ModelSpec] = None) -> ModelSpec:
    """The spec recorded for `model`: `spec` when given, else read off a FlashAttention."""
    if spec is not None:
        return spec
    if isinstance(model, FlashAttention):
        return ModelSpec(embed=model.embed_size, heads=model.heads, chunk=model.chunk_size,
                         causal=model.causal)
    raise ExportError(f"{type(model).__name__} is not a FlashAttention: pass spec= so the "
                      "artifact records how to rebuild it")


def artifact_metadata(spec: ModelSpec, **extra: str) -> Dict[str, str]:
    """String metadata every artifact carries: versions, attention config and the model spec."""
    meta = {
        "flash_export_version": __version__,
        "torch_version": torch.__version__,
        "embed": str(spec.embed),
        "heads": str(spec.heads),
        "chunk_size": str(spec.chunk),
        "causal": str(int(spec.causal)),
        "model_spec": spec.to_json(),
    }
    meta.update(extra)
    return meta


def export_torchscript(model: nn.Module, path: PathLike, *,
                       spec: Optional[ModelSpec] = None) -> Path:
    """Script `model` (never trace it) and save it as a TorchScript archive.

    The archive runs in C++ via `torch::jit::load` and carries `flash_export.json` metadata
    (flash-export version, embed, heads, chunk size, causal, model spec).

    Args:
        model: a FlashAttention or a module built from FlashAttention layers.
        path: the `.pt` file to write (atomically).
        spec: how to rebuild `model`; read off `model` when it is a plain FlashAttention.

    Returns:
        The written path.

    Raises:
        ExportError: the model holds no FlashAttention, cannot be scripted, or the file cannot
            be written.
    """
    flash_layers(model)
    meta = artifact_metadata(spec_of(model, spec), artifact="torchscript")
    try:
        with quiet_jit_deprecation():
            scripted = torch.jit.script(model.eval())
    except Exception as exc:  # TorchScript reports unsupported Python in many exception types
        raise ExportError(f"torch.jit.script failed: {first_line(exc)}") from exc

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
        try:
            with quiet_jit_deprecation():
                module = torch.jit.load(f, map_location="cpu")
        except (RuntimeError, ValueError, OSError) as exc:
            raise ArtifactError(f"cannot load TorchScript file {path}: "
                                f"{first_line(exc)}") from exc
    return module, meta, origin

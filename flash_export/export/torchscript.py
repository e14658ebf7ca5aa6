"""Export a FlashAttention model to deployable artifacts, one function per artifact kind."""

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from flash_export.artifacts.files import sha256_file
from flash_export.artifacts.kinds import require_kind
from flash_export.artifacts.manifest import atomic_write
from flash_export.artifacts.metadata import METADATA_FILE, torchscript_metadata
from flash_export.artifacts.trust import Provenance, require_provenance
from flash_export.core.errors import ArtifactError, ExportError, first_line
from flash_export.core.io_spec import IOSpec
from flash_export.export.prepare import (
    PathLike,
    attention_as,
    native_metadata,
    prepare,
    quiet_jit_deprecation,
)
from flash_export.nn.spec import ModelSpec


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
        io: the model's inputs and outputs (see `flash_export.nn.model_io.resolve_io` for the
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
            from flash_export.nn.torch_op import register

            register()
        try:
            with quiet_jit_deprecation():
                module = torch.jit.load(f, map_location="cpu")
        except (RuntimeError, ValueError, OSError) as exc:
            raise ArtifactError(f"cannot load TorchScript file {path}: "
                                f"{first_line(exc)}") from exc
    return module, meta, origin

"""Export a FlashAttention model to deployable artifacts, one function per artifact kind."""

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Union

import torch
from torch import nn

from flash_export import manifest
from flash_export._version import __version__
from flash_export.attention import FlashAttention
from flash_export.errors import ArtifactError, ExportError, first_line
from flash_export.spec import ModelSpec

METADATA_FILE = "flash_export.json"  # the extra file inside a TorchScript archive
_JIT_DEPRECATED = r"`torch\.jit\.(script|save|load)` is deprecated"

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def quiet_jit_deprecation() -> Iterator[None]:
    """Silence exactly torch's DeprecationWarnings for torch.jit.script/save/load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATED, category=DeprecationWarning)
        yield


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


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Write through `write(tmp)` in a staging folder beside `path`, then rename into place.

    `tmp` has the final file name; what `write` produced is renamed next to `path`, `path` last.
    Files `write` puts beside `tmp` (such as ONNX external data) move along with it. A failed or
    interrupted write leaves nothing at `path` and never clobbers a good file there.

    The artifact's SHA-256 manifest (`manifest.py`) changes in two steps around the rename: first
    it accepts the old and the new file, then only the new one. So a process killed at any moment
    leaves either the previous artifact with a manifest that accepts it, or the new one.
    """
    target = Path(path)
    if target.is_dir():
        raise ExportError(f"{target} is a directory, expected a file path")
    if not target.parent.is_dir():
        raise ExportError(f"output folder does not exist: {target.parent}")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tmp = staging / target.name
        write(tmp)
        if not tmp.is_file():
            raise ExportError(f"nothing was written for {target}")
        written = sorted(staging.iterdir(), key=lambda p: p == tmp)  # the main file last
        for item in written:
            with open(item, "rb") as f:
                os.fsync(f.fileno())
        new_hash = manifest.sha256_file(tmp)
        old_hash = manifest.current_valid_hash(target)
        manifest.write_manifest(target, [h for h in (old_hash, new_hash) if h])
        for item in written:
            os.replace(item, target.parent / item.name)
        manifest.write_manifest(target, [new_hash])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


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
        ExportError: the model cannot be scripted or the file cannot be written.
    """
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


def load_torchscript(path: PathLike, *,
                     trust: bool = False) -> "tuple[torch.jit.ScriptModule, Dict[str, str]]":
    """Load a TorchScript archive written by `export_torchscript`, with its metadata.

    A `.pt` file is a program: unless `trust` is set, its SHA-256 must be listed in the manifest
    that `export_torchscript` wrote beside it.

    Raises:
        ArtifactError: the file is missing, unlisted in its manifest (without `trust`),
            unreadable, or has no flash-export metadata.
    """
    if trust:
        if not Path(path).is_file():
            raise ArtifactError(f"artifact not found: {path}")
    else:
        manifest.verify_artifact(path)
    extra = {METADATA_FILE: ""}
    try:
        with quiet_jit_deprecation():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ArtifactError(f"cannot load TorchScript file {path}: {first_line(exc)}") from exc
    if not extra[METADATA_FILE]:
        raise ArtifactError(f"{path} carries no {METADATA_FILE}: not written by flash-export")
    try:
        meta = json.loads(extra[METADATA_FILE])
    except ValueError as exc:
        raise ArtifactError(f"{path}: unreadable {METADATA_FILE}: {exc}") from exc
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: {METADATA_FILE} is not a JSON object")
    return module, meta

"""An artifact's flash-export metadata, read as data: nothing is executed or unpickled."""

import json
import zipfile
from pathlib import Path
from typing import BinaryIO, Dict

from flash_export.artifacts.files import PathLike
from flash_export.artifacts.kinds import PT2_SUFFIX, kind_of
from flash_export.core.errors import ArtifactError, summary

METADATA_FILE = "flash_export.json"  # the extra file inside a TorchScript archive


# An archive's metadata entry larger than this is not ours (ours is a few hundred bytes).
_MAX_METADATA_BYTES = 1 << 20


def read_metadata(artifact: PathLike) -> Dict[str, str]:
    """The flash-export metadata of an artifact, read as data (nothing is executed or unpickled).

    Returns:
        The ONNX `metadata_props`, or the `flash_export.json` of a TorchScript archive or a
        `.pt2` package, as strings.

    Raises:
        ArtifactError: missing, unreadable, or not a flash-export artifact.
    """
    path = Path(artifact)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    metadata: Dict[str, str] = kind_of(path).handler("metadata")(path)
    return metadata


def onnx_metadata(path: Path) -> Dict[str, str]:
    """An ONNX graph's `metadata_props`, read after the `safety` checks."""
    from flash_export.artifacts.safety import check_onnx_file

    return {p.key: p.value for p in check_onnx_file(path).metadata_props}


def archive_metadata(path: Path) -> Dict[str, str]:
    """The `flash_export.json` of a TorchScript archive or a `.pt2` package at `path`."""
    with open(path, "rb") as f:
        return torchscript_metadata(f, path)


def torchscript_metadata(file: BinaryIO, path: PathLike) -> Dict[str, str]:
    """The `flash_export.json` entry of the archive open as `file` (named `path`).

    A TorchScript archive and a `.pt2` package alike: both are zip files with an `extra/` folder.

    Raises:
        ArtifactError: not a zip archive, or no single small flash-export metadata entry.
    """
    try:
        with zipfile.ZipFile(file) as archive:
            entries = [i for i in archive.infolist()
                       if i.filename.endswith(f"/extra/{METADATA_FILE}")]
            if not entries:
                raise ArtifactError(f"{path} carries no {METADATA_FILE}: not written by "
                                    "flash-export")
            if len(entries) > 1 or entries[0].file_size > _MAX_METADATA_BYTES:
                raise ArtifactError(f"{path}: {len(entries)} {METADATA_FILE} entries of "
                                    f"{entries[0].file_size} bytes: not written by flash-export")
            text = archive.read(entries[0]).decode("utf-8")
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, RuntimeError) as exc:
        what = "a .pt2 package" if str(path).lower().endswith(PT2_SUFFIX) else \
            "a TorchScript archive"
        raise ArtifactError(f"{path} is not {what}: {summary(exc)}") from exc
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise ArtifactError(f"{path}: unreadable {METADATA_FILE}: {exc}") from exc
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ArtifactError(f"{path}: {METADATA_FILE} is not a JSON object of strings")
    return meta

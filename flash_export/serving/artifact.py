"""Which artifact a serving engine runs (ONNX graphs only), and the name it serves it under."""

import os
from pathlib import Path
from typing import Optional, Union

from flash_export.core.errors import ArtifactError


def require_onnx_graph(artifact: Union[str, "os.PathLike[str]"], command: str) -> None:
    """Refuse, with what to do instead, a TorchScript archive or a .pt2 package.

    `serve` and `triton` run ONNX graphs; the other artifact kinds are zip archives, which
    onnx would report as a corrupt protobuf.

    Raises:
        ArtifactError: the file's suffix or first bytes say it is not an ONNX graph.
    """
    from flash_export.artifacts.kinds import TORCHSCRIPT_SUFFIXES

    path = Path(artifact)
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from None
    if suffix in TORCHSCRIPT_SUFFIXES or suffix == ".pt2" or zipped:
        what = ("a TorchScript archive" if suffix in TORCHSCRIPT_SUFFIXES else
                "an AOTInductor package (.pt2)" if suffix == ".pt2" else
                "a zip archive (TorchScript or .pt2?)")
        raise ArtifactError(f"{path} is {what}, not an ONNX graph: `flash-export {command}` "
                            f"runs .onnx files. Export one from the same model with "
                            f"`flash-export onnx` (or flash_export.export_onnx) and "
                            f"{command} that; a .pt runs in libtorch or PyTorch")


def model_name(artifact: Union[str, "os.PathLike[str]"], name: Optional[str] = None) -> str:
    """The model's name in URLs and repositories: `name`, or the artifact's file stem.

    Raises:
        ValueError: a name that is not 1-64 characters of letters, digits, '_', '-' and '.'.
    """
    chosen = name if name is not None else Path(artifact).stem
    if not chosen or len(chosen) > 64 or chosen.startswith(".") or not all(
            c.isascii() and (c.isalnum() or c in "_-.") for c in chosen):
        raise ValueError(f"model name {chosen[:80]!r}: use 1-64 letters, digits, '_', '-' or '.'")
    return chosen

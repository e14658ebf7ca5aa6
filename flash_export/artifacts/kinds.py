"""Artifact kinds, told apart by file suffix."""

from pathlib import Path

from flash_export.artifacts.files import PathLike
from flash_export.core.errors import ArtifactError, ExportError

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")


PT2_SUFFIX = ".pt2"  # an AOTInductor package (torch._inductor.aoti_compile_and_package)


# What each kind is written as, for error messages.
_KIND_FILES = {"onnx": ("an ONNX model", ".onnx"),
               "torchscript": ("a TorchScript archive", " or ".join(TORCHSCRIPT_SUFFIXES)),
               "pt2": ("an AOTInductor package", PT2_SUFFIX)}


def artifact_kind(path: PathLike) -> str:
    """'onnx', 'torchscript' or 'pt2' from the file suffix.

    Raises:
        ArtifactError: any other suffix.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    if suffix == PT2_SUFFIX:
        return "pt2"
    raise ArtifactError(f"{path}: expected a .onnx, .pt or .pt2 artifact, got suffix {suffix!r}")


def require_kind(path: PathLike, kind: str) -> None:
    """Refuse to write a `kind` ("onnx", "torchscript", "pt2") artifact under another suffix.

    Readers tell an artifact's kind from its suffix, so an ONNX file named `.pt` would be
    read as TorchScript.

    Raises:
        ExportError: the suffix is not one of `kind`'s.
    """
    try:
        found = artifact_kind(path)
    except ArtifactError:
        found = ""
    if found != kind:
        what, wanted = _KIND_FILES[kind]
        raise ExportError(f"{path}: {what} must be written to a file ending in {wanted}")

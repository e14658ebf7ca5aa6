"""Artifact kinds and their registry: one entry per kind, naming where each operation lives.

A kind is told by its file suffix. Its entry (`ArtifactKind`) names the code that reads its
metadata, exports it, loads it, validates it and benchmarks it; everything that reads an artifact
dispatches through `kind_of(path)`, so a new kind is one module (its exporter and loader) plus one
`register_kind` call. The torch-side handlers are named as "module:function" and imported on
first use: this torch-free layer says where they are without importing them.
"""

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from flash_export.artifacts.files import PathLike
from flash_export.core.contract import TARGETS
from flash_export.core.errors import ArtifactError, ExportError

# A callable, or the "module:function" path of one, imported when first used.
Handler = Union[str, Callable[..., Any], None]


@dataclasses.dataclass(frozen=True)
class ArtifactKind:
    """One kind of artifact, and where each of its operations lives.

    Attributes:
        name: the kind's name ("onnx", "torchscript", "pt2").
        description: how messages name a file of the kind ("an ONNX model").
        suffixes: its file suffixes, lower case; the first is the one messages suggest.
        metadata: (path) -> Dict[str, str]: the file's flash-export metadata, read as data.
        exporter: (model, path, **options) -> Path: writes a file of the kind.
        loader: (path, *, trust, expect_sha256) -> (program, metadata, Provenance): loads a file
            that is a program, after checking its provenance. None: the kind is data (an ONNX
            graph, run by onnxruntime).
        validate_backend: (program, source, io, metadata, dtype) -> check.parity.Backend: how
            `validate` runs a loaded program.
        bench_backend: (metadata) -> the `flash-export bench` backend that runs the file.
        bench_backends: every backend name `bench_backend` may give.
        run_dtype: the one dtype a file of the kind runs in (a compiled package), or None.
        feeds_every_input: a loaded program takes every input it was exported with, masks
            included (a compiled package is called positionally).
    """

    name: str
    description: str
    suffixes: Tuple[str, ...]
    metadata: Handler
    exporter: Handler
    loader: Handler = None
    validate_backend: Handler = None
    bench_backend: Handler = None
    bench_backends: Tuple[str, ...] = ()
    run_dtype: Optional[str] = None
    feeds_every_input: bool = False

    def handler(self, role: str) -> Callable[..., Any]:
        """The callable for `role` ("metadata", "loader", ...), imported if named by path.

        Raises:
            ArtifactError: the kind has no such operation.
        """
        value = getattr(self, role)
        if value is None:
            raise ArtifactError(f"{self.description} has no {role.replace('_', ' ')}")
        if isinstance(value, str):
            module, _, name = value.partition(":")
            value = getattr(importlib.import_module(module), name)
        return value


KINDS: Dict[str, ArtifactKind] = {}


def register_kind(kind: ArtifactKind) -> ArtifactKind:
    """Add `kind` to the registry (replacing one of the same name); returns it.

    Raises:
        ValueError: a suffix another kind already claims, or one not lower case with a dot.
    """
    for suffix in kind.suffixes:
        if not suffix.startswith(".") or suffix != suffix.lower():
            raise ValueError(f"kind {kind.name}: suffix {suffix!r} must be lower case, '.x'")
        owner = next((k.name for k in KINDS.values() if suffix in k.suffixes), kind.name)
        if owner != kind.name:
            raise ValueError(f"kind {kind.name}: suffix {suffix} is already {owner}'s")
    KINDS[kind.name] = kind
    return kind


def kind_of(path: PathLike) -> ArtifactKind:
    """The registered kind of `path`, from its suffix.

    Raises:
        ArtifactError: no kind has that suffix.
    """
    suffix = Path(path).suffix.lower()
    for kind in KINDS.values():
        if suffix in kind.suffixes:
            return kind
    firsts = [k.suffixes[0] for k in KINDS.values()]
    listed = ", ".join(firsts[:-1]) + f" or {firsts[-1]}" if len(firsts) > 1 else firsts[0]
    raise ArtifactError(f"{path}: expected a {listed} artifact, got suffix {suffix!r}")


def artifact_kind(path: PathLike) -> str:
    """The name of `path`'s kind ('onnx', 'torchscript', 'pt2', ...) from its suffix.

    Raises:
        ArtifactError: no kind has that suffix.
    """
    return kind_of(path).name


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
        entry = KINDS[kind]
        raise ExportError(f"{path}: {entry.description} must be written to a file ending in "
                          f"{' or '.join(entry.suffixes)}")


def bench_backends() -> Tuple[str, ...]:
    """Every bench backend a registered kind's files run as, in registration order."""
    return tuple(b for k in KINDS.values() for b in k.bench_backends)


def _onnx_bench_backend(meta: Mapping[str, str]) -> str:
    return meta.get("target", "custom")


def _torchscript_bench_backend(meta: Mapping[str, str]) -> str:
    return "torchscript-native" if meta.get("attention") == "native" else "torchscript"


ONNX = register_kind(ArtifactKind(
    "onnx", "an ONNX model", (".onnx",),
    metadata="flash_export.artifacts.metadata:onnx_metadata",
    exporter="flash_export.export.onnx:export_onnx",
    bench_backend=_onnx_bench_backend, bench_backends=TARGETS))
TORCHSCRIPT = register_kind(ArtifactKind(
    "torchscript", "a TorchScript archive", (".pt", ".pth", ".ts"),
    metadata="flash_export.artifacts.metadata:archive_metadata",
    exporter="flash_export.export.torchscript:export_torchscript",
    loader="flash_export.export.torchscript:load_torchscript_checked",
    validate_backend="flash_export.check.parity:torchscript_backend",
    bench_backend=_torchscript_bench_backend,
    bench_backends=("torchscript", "torchscript-native")))
PT2 = register_kind(ArtifactKind(
    "pt2", "an AOTInductor package", (".pt2",),
    metadata="flash_export.artifacts.metadata:archive_metadata",
    exporter="flash_export.export.pt2:export_pt2",
    loader="flash_export.export.pt2:load_pt2",
    validate_backend="flash_export.check.parity:pt2_package_backend",
    bench_backend=lambda meta: "pt2", bench_backends=("pt2",),
    run_dtype="float32", feeds_every_input=True))
TORCHSCRIPT_SUFFIXES = TORCHSCRIPT.suffixes
PT2_SUFFIX = PT2.suffixes[0]  # an AOTInductor package (torch._inductor.aoti_compile_and_package)

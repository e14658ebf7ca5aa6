"""Checks on untrusted ONNX files, run before onnxruntime opens anything they point to.

An ONNX file may keep tensors in external data files named by a relative `location`. onnxruntime
reads those files itself, so a hostile `.onnx` could make it read `/etc/passwd`, follow a symlink
out of the model folder, read a hardlinked copy of a file the user never meant to share, or seek
past the end of a file. `check_onnx_file` parses only the graph (never external data) and rejects
every such reference; it checks data files against the SHA-256 the exporter pinned in the graph
(`external_data.EXTERNAL_DATA_KEY`), so a graph never runs beside data it was not exported with.
`open_onnx` does all of it on files it opens once (the data files through the model folder's
descriptor, following no link) and keeps open, so that onnxruntime is given the very bytes that were
checked (`runtime.create_session`), never a name another process could swap in between. It also
rejects a `com.flash_export::FlashAttention` node with an unknown or wrong-typed attribute:
onnxruntime lets a custom node carry any attribute, and its custom-op ABI gives our library no way
to list them. Imports no torch.
"""

import dataclasses
import hashlib
import os
import stat
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple, Union

import onnx

from flash_export.artifacts.external_data import DataFile, open_external_data, stamp
from flash_export.core.contract import (
    DOMAIN,
    NODE_ATTRIBUTES,
    NODE_INPUTS,
    OP_NAME,
    V2_ATTRIBUTES,
    V2_INPUTS,
)
from flash_export.core.errors import ArtifactError, summary

PathLike = Union[str, "os.PathLike[str]"]


def load_graph(path: PathLike) -> Any:
    """The ModelProto of `path`, parsed without reading any external data.

    Raises:
        ArtifactError: the file is missing, not a regular file, or not an ONNX model.
    """
    file = Path(path)
    if not file.is_file():
        raise ArtifactError(f"ONNX file not found: {file}")
    return _parse(file.read_bytes(), file)


def _parse(raw: bytes, file: Path) -> Any:
    try:
        return onnx.load_model_from_string(raw)
    except Exception as exc:  # protobuf decode errors have several types
        raise ArtifactError(f"{file} is not an ONNX model: {summary(exc)}") from exc


def all_nodes(model: Any) -> Iterator[Any]:
    """Every node of a ModelProto (graph, subgraphs, local functions) or of a GraphProto.

    Subgraphs are the If branches and Loop/Scan bodies, depth first.
    """
    def walk(nodes: Any) -> Iterator[Any]:
        for node in nodes:
            yield node
            for attr in node.attribute:
                if attr.HasField("g"):
                    yield from walk(attr.g.node)
                for sub in attr.graphs:
                    yield from walk(sub.node)
    if not hasattr(model, "graph"):  # a GraphProto (a ModelProto's graph or a subgraph)
        yield from walk(model.node)
        return
    yield from walk(model.graph.node)
    for function in model.functions:
        yield from walk(function.node)


def check_custom_nodes(model: Any, model_file: PathLike) -> int:
    """Check the attribute names and types of every com.flash_export::FlashAttention node.

    A model that imports the domain at version 1 may use none of version 2's attributes and
    inputs (`flash_export.core.contract`): the library serves every version with one kernel, so
    only this check holds a version-1 model to version 1's meaning.

    Returns:
        How many such nodes the model has.

    Raises:
        ArtifactError: an unknown, repeated or wrong-typed attribute, a missing required one, more
            inputs than the op has, or a version-2 attribute or input in a version-1 model.
    """
    versions = [o.version for o in model.opset_import if o.domain == DOMAIN]
    version = versions[0] if versions else None
    count = 0
    for node in all_nodes(model):
        if node.domain != DOMAIN or node.op_type != OP_NAME:
            continue
        count += 1
        what = f"{model_file}: {OP_NAME} node {node.name or count - 1!r}"
        seen = set()
        for attr in node.attribute:
            if attr.name in seen:
                raise ArtifactError(f"{what} repeats attribute {attr.name!r}")
            seen.add(attr.name)
            if attr.name not in NODE_ATTRIBUTES:
                raise ArtifactError(f"{what} has unknown attribute {attr.name!r}; expected only "
                                    f"{', '.join(sorted(NODE_ATTRIBUTES))}")
            expected = NODE_ATTRIBUTES[attr.name][0]
            got = onnx.AttributeProto.AttributeType.Name(attr.type)
            if got != expected:
                raise ArtifactError(f"{what}: attribute {attr.name} is {got} "
                                    f"({_attribute_text(attr)}), expected {expected}")
        missing = [n for n, (_, required) in NODE_ATTRIBUTES.items() if required and n not in seen]
        if missing:
            raise ArtifactError(f"{what} lacks required attribute {missing[0]!r}")
        if len(node.input) > len(NODE_INPUTS):
            raise ArtifactError(f"{what} has {len(node.input)} inputs, expected at most "
                                f"{len(NODE_INPUTS)} ({', '.join(NODE_INPUTS)})")
        if version == 1:
            used = [n for n in NODE_ATTRIBUTES if n in seen and n in V2_ATTRIBUTES]
            used += [n for n, i in zip(NODE_INPUTS, node.input) if i and n in V2_INPUTS]
            if used:
                raise ArtifactError(f"{what} uses {used[0]!r}, which came with version 2 of "
                                    f"{DOMAIN}; the model imports version 1")
    return count


def _attribute_text(attr: Any) -> str:
    try:
        value = onnx.helper.get_attribute_value(attr)
    except Exception:  # an attribute of an odd kind: its type name says enough
        return "?"
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return repr(value)[:40]


@dataclasses.dataclass
class OpenedOnnx:
    """An ONNX file and its external data, each opened once, checked, and held open.

    Use it as a context manager (`with open_onnx(path) as opened:`): closing unmaps the data.

    Attributes:
        path: the file as named.
        model: its ModelProto (external tensors not loaded).
        raw: the bytes `model` was parsed from.
        sha256: their SHA-256.
        data: the data files by the location the graph names them with.
        external_tensors: how many tensors read from those files (each checked).
    """

    path: Path
    model: Any
    raw: bytes
    sha256: str
    data: Dict[str, DataFile]
    external_tensors: int = 0

    def external_files(self) -> Tuple[List[str], List[Any], List[int]]:
        """(names, buffers, sizes): the checked bytes of every data file, by the graph's names.

        What `SessionOptions.add_external_initializers_from_files_in_memory` takes.
        """
        names = list(self.data)
        return names, [self.data[n].view for n in names], [len(self.data[n].view)
                                                            for n in names]

    def check_unchanged(self) -> None:
        """Refuse when a data file was written to (or replaced in place) since it was opened.

        Raises:
            ArtifactError: a data file's size or mtime moved.
        """
        for data in self.data.values():
            if stamp(os.fstat(data.fd)) != data.stamp:
                raise ArtifactError(f"{self.path}: external data file {data.location!r} was "
                                    "written to while it was loaded: load it again")

    def close(self) -> None:
        """Unmap and close every data file."""
        for data in self.data.values():
            data.close()

    def __enter__(self) -> "OpenedOnnx":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_onnx(path: PathLike) -> OpenedOnnx:
    """Open `path` and its data files once, and run every check above on what was opened.

    The graph is read into memory from one descriptor; its data files are opened below the
    model's folder through that folder's descriptor, one path component at a time with no link
    followed, and mapped read-only. The pinned SHA-256 and the size checks read the mappings,
    and the same mappings are what `runtime.create_session` hands onnxruntime.

    Returns:
        The opened file; close it (or use it as a context manager) when done.

    Raises:
        ArtifactError: missing, not a regular file, not ONNX, an unsafe or mismatched
            external-data reference, or a malformed com.flash_export node.
    """
    file = Path(path)
    folder = file.parent if str(file.parent) else Path(".")
    try:
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ArtifactError(f"ONNX file not found: {file}") from exc
    try:
        raw = _read_regular(file, folder_fd)
        model = _parse(raw, file)
        files, count = open_external_data(model, file, folder_fd)
    finally:
        os.close(folder_fd)
    opened = OpenedOnnx(file, model, raw, hashlib.sha256(raw).hexdigest(), files, count)
    try:
        check_custom_nodes(model, file)
    except BaseException:
        opened.close()
        raise
    return opened


def _read_regular(file: Path, folder_fd: int) -> bytes:
    """The bytes of `file` (a name in the folder `folder_fd`), read from one descriptor."""
    try:
        fd = os.open(file.name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder_fd)
    except OSError as exc:
        raise ArtifactError(f"ONNX file not found: {file}") from exc
    try:  # checked before open(), which refuses a folder with its own error
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ArtifactError(f"ONNX file not found: {file} (not a regular file)")
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def check_onnx_file(path: PathLike) -> Any:
    """Parse `path` without external data and run every check above (see module doc).

    Returns:
        The ModelProto (external tensors not loaded).

    Raises:
        ArtifactError: not an ONNX file, an unsafe or mismatched external-data reference, or a
            malformed com.flash_export node.
    """
    with open_onnx(path) as checked:
        return checked.model

"""Checks on untrusted ONNX files, run before onnxruntime opens anything they point to.

An ONNX file may keep tensors in external data files named by a relative `location`. onnxruntime
reads those files itself, so a hostile `.onnx` could make it read `/etc/passwd`, follow a symlink
out of the model folder, read a hardlinked copy of a file the user never meant to share, or seek
past the end of a file. `check_onnx_file` parses only the graph (never external data) and rejects
every such reference; it checks data files against the SHA-256 the exporter pinned in the graph
(`EXTERNAL_DATA_KEY`), so a graph never runs beside data it was not exported with. `open_onnx`
does all of it on files it opens once (the data files through the model folder's descriptor,
following no link) and keeps open, so that onnxruntime is given the very bytes that were checked
(`runtime.create_session`), never a name another process could swap in between. It also rejects
a `com.flash_export::FlashAttention` node with an unknown or wrong-typed attribute: onnxruntime
lets a custom node carry any attribute, and its custom-op ABI gives our library no way to list
them. Imports no torch.
"""

import dataclasses
import errno
import hashlib
import json
import mmap
import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, Iterator, List, Tuple, Union

import onnx

from flash_export.core.contract import DOMAIN, NODE_ATTRIBUTES, OP_NAME
from flash_export.core.errors import ArtifactError, summary

# metadata_props key: JSON {data file name: SHA-256}, written by the exporter.
EXTERNAL_DATA_KEY = "external_data_sha256"

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


def _graph_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of `graph`, its nodes' attributes and its subgraphs (Loop/If/Scan)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[Any]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for sub in attr.graphs:
            yield from _graph_tensors(sub)


def model_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto a ModelProto holds: graph, subgraphs and local functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _external_fields(tensor: Any, model_file: Path) -> Dict[str, str]:
    fields: Dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in fields:
            raise ArtifactError(f"{model_file}: tensor {tensor.name!r} repeats external_data key "
                                f"{entry.key!r}")
        fields[entry.key] = entry.value
    return fields


def _int_field(fields: Dict[str, str], key: str, tensor: Any, model_file: Path) -> int:
    text = fields.get(key, "0" if key == "offset" else "")
    try:
        value = int(text)
    except ValueError:
        raise ArtifactError(f"{model_file}: tensor {tensor.name!r} has external data {key} "
                            f"{text[:40]!r}, not an integer") from None
    if value < 0:
        raise ArtifactError(f"{model_file}: tensor {tensor.name!r} has a negative external "
                            f"data {key} ({value})")
    return value


def _location_parts(location: str, what: str) -> List[str]:
    """The path components of an external-data `location`, or ArtifactError.

    Rejects empty, absolute (on Windows also drive-relative) and `..` locations.
    """
    if not location or "\x00" in location:
        raise ArtifactError(f"{what}: empty or NUL-containing external data location")
    windows = PureWindowsPath(location)
    absolute = PurePosixPath(location).is_absolute() or (
        os.name == "nt" and (windows.is_absolute() or bool(windows.drive)
                             or location.startswith("\\")))
    if absolute:
        raise ArtifactError(f"{what}: external data location {location!r} is an absolute path; "
                            "it must be a file beside the model")
    # ".." separated by either slash is refused everywhere; the walk below splits on "/" only,
    # so a POSIX file name with a backslash in it stays one name.
    if ".." in location.replace("\\", "/").split("/"):
        raise ArtifactError(f"{what}: external data location {location!r} contains '..': it "
                            "must stay inside the model's folder")
    parts = [p for p in location.split("/") if p not in ("", ".")]
    if not parts:
        raise ArtifactError(f"{what}: external data location {location!r} names no file")
    return parts


def _through_link(location: str, name: str, what: str) -> ArtifactError:
    return ArtifactError(f"{what}: external data location {location!r} goes through a symlink "
                         f"({name}); flash-export follows no links")


def _check_data_file(info: os.stat_result, location: str, what: str) -> None:
    """Refuse a data file that is not a regular file or has a second name (a hard link)."""
    if not stat.S_ISREG(info.st_mode):
        raise ArtifactError(f"{what}: external data location {location!r} is not a regular file")
    if info.st_nlink > 1:
        raise ArtifactError(f"{what}: external data file {location!r} has {info.st_nlink} hard "
                            "links; a hard link may expose a file from elsewhere, copy it instead")


def check_external_location(location: str, folder: Path, what: str) -> Path:
    """Resolve one external-data `location` against `folder` or raise ArtifactError.

    Rejects empty, absolute (on Windows also drive-relative) and `..` locations, a symlink at any
    component below `folder`, a target outside `folder` after resolving, a non-regular file and a
    file with more than one hard link (a second name for a file that may live anywhere). A check
    by name: what is then opened by that name may differ; `open_onnx` opens what it checks.

    Returns:
        The data file's path.
    """
    parts = _location_parts(location, what)
    current = folder
    for part in parts:
        current = current / part
        try:
            info = os.lstat(current)
        except OSError as exc:
            raise ArtifactError(f"{what}: external data file {location!r} is missing or "
                                f"unreadable ({exc.strerror})") from exc
        if stat.S_ISLNK(info.st_mode):
            raise _through_link(location, current.name, what)
    try:
        inside = current.resolve(strict=True).is_relative_to(folder.resolve(strict=True))
    except OSError as exc:
        raise ArtifactError(f"{what}: cannot resolve external data file {location!r}") from exc
    if not inside:
        raise ArtifactError(f"{what}: external data file {location!r} resolves outside the "
                            f"model's folder {folder}")
    _check_data_file(info, location, what)
    return current


@dataclasses.dataclass
class DataFile:
    """One external data file, opened once and mapped read-only; every check reads `view`.

    Attributes:
        location: the name the graph gives it.
        view: its bytes (a read-only shared mapping; b"" for an empty file).
        stamp: (device, inode, size, mtime) when it was opened: a write into the file
            afterwards changes it (`OpenedOnnx.check_unchanged`). Not the ctime, which a rename
            of the file (a harmless swap of the name) changes too.
    """

    location: str
    fd: int
    view: Any
    stamp: Tuple[int, ...]

    def close(self) -> None:
        """Unmap and close (idempotent)."""
        if isinstance(self.view, mmap.mmap):
            self.view.close()
        self.view = b""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _stamp(info: os.stat_result) -> Tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _open_data_file(location: str, folder_fd: int, what: str) -> DataFile:
    """Open `location` below the folder `folder_fd`, one component at a time, following no link.

    The checks and the bytes both come from the descriptor opened here: no name is looked up
    twice, so a file renamed over the name after the check is never the one read.
    """
    parts = _location_parts(location, what)
    current = folder_fd
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (
                os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                fd = os.open(part, flags, dir_fd=current)
            except OSError as exc:
                if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and _is_link(
                        part, current)):
                    raise _through_link(location, part, what) from exc
                raise ArtifactError(f"{what}: external data file {location!r} is missing or "
                                    f"unreadable ({exc.strerror})") from exc
            if current != folder_fd:
                os.close(current)
            current = fd
        info = os.fstat(current)
        _check_data_file(info, location, what)
        view: Any = b"" if info.st_size == 0 else mmap.mmap(current, info.st_size,
                                                            prot=mmap.PROT_READ)
    except BaseException:
        if current != folder_fd:
            os.close(current)
        raise
    return DataFile(location, current, view, _stamp(info))


def _is_link(name: str, folder_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=folder_fd).st_mode)
    except OSError:
        return False


def _open_external_data(model: Any, file: Path,
                        folder_fd: int) -> Tuple[Dict[str, DataFile], int]:
    """Open, map and check every data file `model` references; ({location: file}, tensors)."""
    pinned = _pinned_data_hashes(model, file)
    files: Dict[str, DataFile] = {}
    count = 0
    try:
        for tensor in model_tensors(model):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                if tensor.external_data:
                    raise ArtifactError(f"{file}: tensor {tensor.name!r} lists external_data "
                                        "but is not marked EXTERNAL")
                continue
            count += 1
            what = f"{file}: tensor {tensor.name!r}"
            fields = _external_fields(tensor, file)
            location = fields.get("location", "")
            if location not in files:
                files[location] = data = _open_data_file(location, folder_fd, what)
                if location in pinned and hashlib.sha256(data.view).hexdigest() != \
                        pinned[location]:
                    raise ArtifactError(f"{what}: external data file {location!r} is not the "
                                        "one this graph was exported with (its SHA-256 differs)")
            size = len(files[location].view)
            offset = _int_field(fields, "offset", tensor, file)
            if "length" in fields:
                end = offset + _int_field(fields, "length", tensor, file)
            else:
                end = size
            if offset > size or end > size:
                raise ArtifactError(f"{what} reads bytes {offset}..{end} of {location!r}, which "
                                    f"has only {size}")
    except BaseException:
        for data in files.values():
            data.close()
        raise
    return files, count


def _pinned_data_hashes(model: Any, file: Path) -> Dict[str, str]:
    text = next((p.value for p in model.metadata_props if p.key == EXTERNAL_DATA_KEY), None)
    if text is None:
        return {}
    try:
        pinned = json.loads(text)
    except ValueError:
        pinned = None
    if not isinstance(pinned, dict) or not all(isinstance(v, str) for v in pinned.values()):
        raise ArtifactError(f"{file}: metadata {EXTERNAL_DATA_KEY} is not a JSON object of "
                            "SHA-256 strings")
    return pinned


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

    Returns:
        How many such nodes the model has.

    Raises:
        ArtifactError: an unknown, repeated or wrong-typed attribute, or a missing required one.
    """
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
    """

    path: Path
    model: Any
    raw: bytes
    sha256: str
    data: Dict[str, DataFile]

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
            if _stamp(os.fstat(data.fd)) != data.stamp:
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
        files, _ = _open_external_data(model, file, folder_fd)
    finally:
        os.close(folder_fd)
    opened = OpenedOnnx(file, model, raw, hashlib.sha256(raw).hexdigest(), files)
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
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ArtifactError(f"ONNX file not found: {file} (not a regular file)")
        return f.read()


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

"""An ONNX model's external data files, opened safely and checked against the hashes it pins.

Every `location` a tensor names must stay inside the model's folder, through no link, to a
regular file of one link, within its size; `open_external_data` opens each once through the
folder's descriptor and checks it against the SHA-256 the exporter pinned (`EXTERNAL_DATA_KEY`).
The policy is `safety`'s (which calls these); imports no torch.
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

from flash_export.core.errors import ArtifactError

PathLike = Union[str, "os.PathLike[str]"]
# metadata_props key: JSON {data file name: SHA-256}, written by the exporter.
EXTERNAL_DATA_KEY = "external_data_sha256"


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


def stamp(info: os.stat_result) -> Tuple[int, ...]:
    """What changes when a file is replaced or rewritten: device, inode, size, mtime."""
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
    return DataFile(location, current, view, stamp(info))


def _is_link(name: str, folder_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=folder_fd).st_mode)
    except OSError:
        return False


def open_external_data(model: Any, file: Path,
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

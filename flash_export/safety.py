"""Checks on untrusted ONNX files, run before onnxruntime opens anything they point to.

An ONNX file may keep tensors in external data files named by a relative `location`. onnxruntime
reads those files itself, so a hostile `.onnx` could make it read `/etc/passwd`, follow a symlink
out of the model folder, read a hardlinked copy of a file the user never meant to share, or seek
past the end of a file. `check_onnx_file` parses only the graph (never external data) and rejects
every such reference; it checks data files against the SHA-256 the exporter pinned in the graph
(`EXTERNAL_DATA_KEY`), so a graph never runs beside data it was not exported with. It also rejects
a `com.flash_export::FlashAttention` node with an unknown or wrong-typed attribute: onnxruntime
lets a custom node carry any attribute, and its custom-op ABI gives our library no way to list
them. Imports no torch.
"""

import json
import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, Iterator, Union

import onnx

from flash_export.artifact import sha256_file
from flash_export.contract import (
    DOMAIN,
    NODE_ATTRIBUTES,
    NODE_INPUTS,
    OP_NAME,
    V2_ATTRIBUTES,
    V2_INPUTS,
)
from flash_export.errors import ArtifactError, summary

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
    try:
        return onnx.load(str(file), load_external_data=False)
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


def check_external_location(location: str, folder: Path, what: str) -> Path:
    """Resolve one external-data `location` against `folder` or raise ArtifactError.

    Rejects empty, absolute (on Windows also drive-relative) and `..` locations, a symlink at any
    component below `folder`, a target outside `folder` after resolving, a non-regular file and a
    file with more than one hard link (a second name for a file that may live anywhere).

    Returns:
        The data file's path.
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
    current = folder
    for part in parts:
        current = current / part
        try:
            info = os.lstat(current)
        except OSError as exc:
            raise ArtifactError(f"{what}: external data file {location!r} is missing or "
                                f"unreadable ({exc.strerror})") from exc
        if stat.S_ISLNK(info.st_mode):
            raise ArtifactError(f"{what}: external data location {location!r} goes through a "
                                f"symlink ({current.name}); flash-export follows no links")
    try:
        inside = current.resolve(strict=True).is_relative_to(folder.resolve(strict=True))
    except OSError as exc:
        raise ArtifactError(f"{what}: cannot resolve external data file {location!r}") from exc
    if not inside:
        raise ArtifactError(f"{what}: external data file {location!r} resolves outside the "
                            f"model's folder {folder}")
    if not stat.S_ISREG(info.st_mode):
        raise ArtifactError(f"{what}: external data location {location!r} is not a regular file")
    if info.st_nlink > 1:
        raise ArtifactError(f"{what}: external data file {location!r} has {info.st_nlink} hard "
                            "links; a hard link may expose a file from elsewhere, copy it instead")
    return current


def check_external_data(model: Any, model_file: PathLike) -> int:
    """Check every external-data reference of `model` (loaded from `model_file`).

    Returns:
        How many tensors live in external data.

    Raises:
        ArtifactError: a reference that escapes the model's folder, goes through a link, names a
            non-regular or hard-linked file, or reads past the end of its file.
    """
    file = Path(model_file)
    folder = file.parent if str(file.parent) else Path(".")
    pinned = _pinned_data_hashes(model, file)
    checked: Dict[str, int] = {}
    count = 0
    for tensor in model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            if tensor.external_data:
                raise ArtifactError(f"{file}: tensor {tensor.name!r} lists external_data but is "
                                    "not marked EXTERNAL")
            continue
        count += 1
        what = f"{file}: tensor {tensor.name!r}"
        fields = _external_fields(tensor, file)
        location = fields.get("location", "")
        if location not in checked:
            data = check_external_location(location, folder, what)
            checked[location] = os.stat(data).st_size
            if location in pinned and sha256_file(data) != pinned[location]:
                raise ArtifactError(f"{what}: external data file {location!r} is not the one this "
                                    "graph was exported with (its SHA-256 differs)")
        size = checked[location]
        offset = _int_field(fields, "offset", tensor, file)
        if "length" in fields:
            end = offset + _int_field(fields, "length", tensor, file)
        else:
            end = size
        if offset > size or end > size:
            raise ArtifactError(f"{what} reads bytes {offset}..{end} of {location!r}, which has "
                                f"only {size}")
    return count


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

    A model that imports the domain at version 1 may use none of version 2's attributes and
    inputs (`flash_export.contract`): the library serves every version with one kernel, so only
    this check holds a version-1 model to version 1's meaning.

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


def check_onnx_file(path: PathLike) -> Any:
    """Parse `path` without external data and run every check above (see module doc).

    Returns:
        The ModelProto (external tensors not loaded).

    Raises:
        ArtifactError: not an ONNX file, an unsafe or mismatched external-data reference, or a
            malformed com.flash_export node.
    """
    model = load_graph(path)
    check_external_data(model, path)
    check_custom_nodes(model, path)
    return model

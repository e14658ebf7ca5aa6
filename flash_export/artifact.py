"""Artifact files: kind, metadata and the spec it records, integrity (manifest), atomic writes.

Imports no torch: an artifact is data, and reading what it says must never run what it contains.
Where confidence in its origin comes from is `trust.py`'s concern.

- **Metadata** is read without loading the artifact as a program: an ONNX graph is parsed after
  the `safety` checks, a TorchScript archive is opened as the zip file it is and only its
  `flash_export.json` entry is read.
- **Manifest** (`<file>.manifest.json`, written beside every export): the SHA-256 of the file and
  of every data file exported with it. It detects corruption and mixed sets; it proves nothing
  about origin, since whoever ships a file can ship a matching manifest.
- **Recorded spec**: parsed, cross-checked between keys, and checked against the graph it
  describes (`check_graph_matches_spec`) before anything is built from it.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from flash_export.contract import DOMAIN, EXPORT_DTYPES, ONNX_FLOATS, OP_NAME, TARGETS
from flash_export.errors import ArtifactError, ExportError, summary
from flash_export.io_spec import GraphInput, IOSpec, attention_io, io_from_graph
from flash_export.spec import ModelSpec

PathLike = Union[str, "os.PathLike[str]"]
MANIFEST_SUFFIX = ".manifest.json"
METADATA_FILE = "flash_export.json"  # the extra file inside a TorchScript archive
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")
# An archive's metadata entry larger than this is not ours (ours is a few hundred bytes).
_MAX_METADATA_BYTES = 1 << 20


def artifact_kind(path: PathLike) -> str:
    """'onnx' or 'torchscript' from the file suffix.

    Raises:
        ArtifactError: any other suffix.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    raise ArtifactError(f"{path}: expected a .onnx or .pt artifact, got suffix {suffix!r}")


def sha256_file(path: Union[PathLike, BinaryIO]) -> str:
    """Hex SHA-256 of a file's bytes (a path, or an open binary file read from where it is)."""
    digest = hashlib.sha256()
    if isinstance(path, (str, os.PathLike)):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        for block in iter(lambda: path.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- metadata


def read_metadata(artifact: PathLike) -> Dict[str, str]:
    """The flash-export metadata of an artifact, read as data (nothing is executed or unpickled).

    Returns:
        The ONNX `metadata_props`, or the TorchScript archive's `flash_export.json`, as strings.

    Raises:
        ArtifactError: missing, unreadable, or not a flash-export artifact.
    """
    path = Path(artifact)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    if artifact_kind(path) == "onnx":
        from flash_export.safety import check_onnx_file

        return {p.key: p.value for p in check_onnx_file(path).metadata_props}
    with open(path, "rb") as f:
        return torchscript_metadata(f, path)


def torchscript_metadata(file: BinaryIO, path: PathLike) -> Dict[str, str]:
    """The `flash_export.json` entry of the TorchScript archive open as `file` (named `path`).

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
        raise ArtifactError(f"{path} is not a TorchScript archive: {summary(exc)}") from exc
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise ArtifactError(f"{path}: unreadable {METADATA_FILE}: {exc}") from exc
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ArtifactError(f"{path}: {METADATA_FILE} is not a JSON object of strings")
    return meta


# --------------------------------------------------------------------------- what it records


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What an artifact's metadata says about its model, parsed and cross-checked.

    Attributes:
        spec: the recorded ModelSpec; None for an export of a model object no spec describes.
        chunk: the (first) FlashAttention layer's chunk size.
        dtype: the export precision, one of `contract.EXPORT_DTYPES`.
        target: the ONNX target (None for TorchScript).
    """

    spec: Optional[ModelSpec]
    chunk: int
    dtype: str
    target: Optional[str]


def recorded(meta: Mapping[str, str], path: "os.PathLike[str] | str", kind: str) -> Recorded:
    """Parse an artifact's metadata; every value is checked, none is trusted to be well formed.

    Raises:
        ArtifactError: a malformed spec, an unknown dtype or target, a missing or bad
            chunk_size, or attention keys (embed, heads, chunk_size, causal) that contradict
            the recorded spec.
    """
    spec = spec_from_metadata(meta, path) if "model_spec" in meta else None
    if spec is not None and spec.model is None:  # a plain FlashAttention: the keys are the spec
        expected = {"embed": str(spec.embed), "heads": str(spec.heads),
                    "chunk_size": str(spec.chunk), "causal": str(int(spec.causal))}
        for key, want in expected.items():
            if key in meta and meta[key] != want:
                raise ArtifactError(f"{path}: metadata {key} is {meta[key][:40]!r} but its "
                                    f"model_spec says {want}: the metadata was edited")
    text = meta.get("chunk_size", "")
    if not text.isdigit() or not 1 <= int(text) <= 2**31:
        raise ArtifactError(f"{path}: metadata chunk_size {text[:40]!r} is not a positive int")
    dtype = meta.get("dtype", "float32")
    if dtype not in EXPORT_DTYPES:
        raise ArtifactError(f"{path}: metadata dtype {dtype[:40]!r} is not one of "
                            f"{', '.join(EXPORT_DTYPES)}")
    target = None
    if kind == "onnx":
        target = meta.get("target", "custom")
        if target not in TARGETS:
            raise ArtifactError(f"{path}: metadata target {target[:40]!r} is not one of "
                                f"{', '.join(TARGETS)}")
    return Recorded(spec, int(text), dtype, target)


def base_spec(rec: Recorded, meta: Mapping[str, str],
              path: "os.PathLike[str] | str") -> ModelSpec:
    """What explicit model options apply to: the recorded spec, or the attention keys.

    An export of a model object records no spec; the caller completes one with --model.

    Raises:
        ArtifactError: the attention keys are malformed.
    """
    if rec.spec is not None:
        return rec.spec
    try:
        return ModelSpec(embed=int(meta.get("embed", "")), heads=int(meta.get("heads", "")),
                         chunk=rec.chunk, causal=meta.get("causal") == "1")
    except ValueError as exc:
        raise ArtifactError(f"{path}: bad attention metadata: {exc}") from exc


def check_graph_matches_spec(spec: ModelSpec, model_proto: Any, path: "os.PathLike[str] | str",
                             *, nodes: bool = True) -> None:
    """Check a spec against what an ONNX graph holds, before anything is built from the spec.

    The graph's own facts (the embed of its `queries` input, the size of its float weights and,
    with `nodes`, its FlashAttention nodes' attributes) bound what the spec may claim, so edited
    metadata cannot make `validate` or `bench` build a model, allocate memory or label results
    that the file does not back. (`validate` reports node attributes as structural checks.)

    Raises:
        ArtifactError: naming the recorded value and what the graph holds.
    """
    from flash_export.safety import all_nodes

    graph = model_proto.graph
    for inp in graph.input:
        if inp.name == "queries":
            dims = inp.type.tensor_type.shape.dim
            if len(dims) == 3 and dims[2].HasField("dim_value") and \
                    dims[2].dim_value != spec.embed:
                raise ArtifactError(f"{path}: the spec says embed {spec.embed}, the graph's "
                                    f"queries input has embed {dims[2].dim_value}")
    if nodes and spec.model is None:
        for node in (n for n in all_nodes(model_proto) if n.domain == DOMAIN
                     and n.op_type == OP_NAME):
            attrs = {a.name: a for a in node.attribute}
            for key, want in (("num_heads", spec.heads), ("chunk_size", spec.chunk),
                              ("causal", int(spec.causal))):
                if key in attrs and attrs[key].i != want:
                    raise ArtifactError(f"{path}: the spec says {key} {want}, the graph's "
                                        f"{OP_NAME} node has {attrs[key].i}")
    wanted = spec.parameter_count()
    # The exporter merges equal initializers (a model's fresh LayerNorms are all ones, say), so
    # each counts once per node that reads it.
    uses: Dict[str, int] = {}
    for node in all_nodes(model_proto):
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    held = sum(_numel(t.dims) * max(1, uses.get(t.name, 0)) for t in graph.initializer
               if t.data_type in ONNX_FLOATS)
    if wanted is not None and held < wanted:
        raise ArtifactError(f"{path}: the spec (embed {spec.embed}) needs {wanted:,} parameters, "
                            f"the graph holds {held:,} float weights")


def _numel(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def recorded_io(meta: Mapping[str, str], path: "os.PathLike[str] | str",
                graph_inputs: Optional[Sequence[GraphInput]] = None) -> IOSpec:
    """The IOSpec an artifact records.

    A graph from before IOSpecs (or from elsewhere) is described by its own inputs
    (`graph_inputs`: name, dtype, dims); a TorchScript archive from before IOSpecs follows the
    attention contract.

    Raises:
        ArtifactError: a malformed IOSpec, or graph inputs it cannot describe.
    """
    text = meta.get("io_spec")
    if text is None:
        try:
            if graph_inputs is not None:
                return io_from_graph(graph_inputs)
            return attention_io(int(meta.get("embed", "0")), mask=True)
        except ValueError as exc:
            raise ArtifactError(f"{path}: records no io_spec, and its inputs do not make one: "
                                f"{exc}") from exc
    try:
        return IOSpec.from_json(text)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: bad io_spec metadata: {exc}") from exc


def spec_from_metadata(meta: Mapping[str, str], path: "os.PathLike[str] | str") -> ModelSpec:
    """The ModelSpec recorded in an artifact's metadata.

    Raises:
        ArtifactError: no spec, or one that is malformed or out of range.
    """
    text = meta.get("model_spec")
    if not text:
        raise ArtifactError(f"{path} records no model_spec: pass the model options explicitly")
    try:
        return ModelSpec.from_json(text)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: bad model_spec metadata: {exc}") from exc


# --------------------------------------------------------------------------- manifest


def manifest_path(artifact: PathLike) -> Path:
    """Where the manifest of `artifact` lives: `<artifact>.manifest.json`."""
    p = Path(artifact)
    return p.with_name(p.name + MANIFEST_SUFFIX)


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One accepted version of an artifact: its SHA-256 and those of its data files."""

    sha256: str
    data: Dict[str, str] = dataclasses.field(default_factory=dict)  # file name -> SHA-256

    def matches(self, artifact: Path) -> bool:
        """Whether `artifact` and every data file beside it have these hashes."""
        if not artifact.is_file() or sha256_file(artifact) != self.sha256:
            return False
        return all((artifact.parent / name).is_file()
                   and sha256_file(artifact.parent / name) == digest
                   for name, digest in self.data.items())


def read_manifest(artifact: PathLike) -> List[ManifestEntry]:
    """The versions the manifest of `artifact` accepts (empty when there is none or it is bad)."""
    try:
        data = json.loads(manifest_path(artifact).read_text())
    except (OSError, ValueError):
        return []
    entries = data.get("entries") if isinstance(data, dict) else None
    out: List[ManifestEntry] = []
    for e in entries if isinstance(entries, list) else []:
        files = e.get("data", {}) if isinstance(e, dict) else None
        if (isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(files, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
                and all(Path(k).name == k for k in files)):
            out.append(ManifestEntry(e["sha256"], dict(files)))
    return out


def write_manifest(artifact: PathLike, entries: Iterable[ManifestEntry]) -> None:
    """Atomically (re)write the manifest of `artifact` to accept exactly `entries`."""
    target = manifest_path(artifact)
    body = json.dumps({"file": Path(artifact).name,
                       "entries": [{"sha256": e.sha256, "data": e.data} for e in _unique(entries)]},
                      indent=1)
    write_atomically(target, body + "\n")


def _unique(entries: Iterable[ManifestEntry]) -> List[ManifestEntry]:
    out: List[ManifestEntry] = []
    for e in entries:
        if e not in out:
            out.append(e)
    return out


def current_entry(artifact: PathLike) -> Optional[ManifestEntry]:
    """The manifest entry that `artifact` and its data files match now, if any."""
    path = Path(artifact)
    return next((e for e in read_manifest(path) if e.matches(path)), None)


def verify_manifest(artifact: PathLike) -> ManifestEntry:
    """Check that `artifact` (and its data files) match its manifest: integrity, not origin.

    Raises:
        ArtifactError: the file or its manifest is missing, or no entry matches.
    """
    path = Path(artifact)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    entries = read_manifest(path)
    if not entries:
        raise ArtifactError(f"{path} has no readable manifest ({manifest_path(path).name})")
    entry = current_entry(path)
    if entry is None:
        raise ArtifactError(f"{path} or its data files do not match its manifest "
                            f"(sha256 {sha256_file(path)[:16]}...): changed after export")
    return entry


# --------------------------------------------------------------------------- atomic write


def write_atomically(target: Path, text: str) -> None:
    """Write `text` to `target` through a temporary file and a rename (never half a file)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def atomic_write(path: PathLike, write: Callable[[Path], None], *,
                 stale: Iterable[Path] = ()) -> Path:
    """Write through `write(tmp)` in a staging folder beside `path`, then rename into place.

    `tmp` has the final file name; files `write` puts beside it (such as ONNX external data) move
    along, `path` last. Data files must have names of their own per export (a graph names its
    data file), so the previous graph keeps its previous data until the new graph replaces it;
    then the files in `stale` (the previous graph's data) that the new set does not reuse are
    deleted. A failed or interrupted write leaves nothing at `path` and never clobbers a good file.

    The manifest changes in two steps around the renames: first it accepts the old and the new
    set, then only the new one. So a process killed at any moment leaves either the previous
    artifact set or the new one, each matching the manifest. The new file's SHA-256 goes into the
    user's trust store before it appears under its name.

    Raises:
        ExportError: `path` is a folder, its folder does not exist, or nothing was written.
        OSError: the files cannot be written.
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
        new = ManifestEntry(sha256_file(tmp), {p.name: sha256_file(p) for p in written
                                               if p != tmp})
        old = current_entry(target)
        write_manifest(target, [e for e in (old, new) if e is not None])
        _record_export(new.sha256, target)
        for item in written:
            os.replace(item, target.parent / item.name)
        write_manifest(target, [new])
        for old_file in stale:
            if old_file.name not in new.data and old_file.name != target.name:
                old_file.unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _record_export(digest: str, target: Path) -> None:
    from flash_export.trust import record_trusted, trust_store

    try:
        record_trusted(digest, target)
    except OSError as exc:
        import warnings

        warnings.warn(f"could not record {target.name} in the trust store {trust_store()} "
                      f"({exc.strerror}); loading it later will need --expect-sha256 {digest} "
                      "or --trust", stacklevel=3)

"""Artifact files: kind, metadata, integrity (manifest), provenance (trust store), atomic writes.

Imports no torch: an artifact is data, and reading what it says must never run what it contains.

- **Metadata** is read without loading the artifact as a program: an ONNX graph is parsed after
  the `safety` checks, a TorchScript archive is opened as the zip file it is and only its
  `flash_export.json` entry is read.
- **Manifest** (`<file>.manifest.json`, written beside every export): the SHA-256 of the file and
  of every data file exported with it. It detects corruption and mixed sets; it proves nothing
  about origin, since whoever ships a file can ship a matching manifest.
- **Trust store**: every export is recorded, by SHA-256, in a folder of the user's own
  (`$FLASH_EXPORT_TRUST_STORE`, else `$XDG_DATA_HOME/flash-export/trusted`, else
  `~/.local/share/flash-export/trusted`). Provenance comes from there, from a hash the user
  states (`expect_sha256`), or from the user's explicit `trust`; never from the artifact itself.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterable, List, Optional, Union

from flash_export._version import __version__
from flash_export.errors import ArtifactError, ExportError, summary

PathLike = Union[str, "os.PathLike[str]"]
MANIFEST_SUFFIX = ".manifest.json"
TRUST_STORE_ENV = "FLASH_EXPORT_TRUST_STORE"
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
    _write_atomically(target, body + "\n")


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


# --------------------------------------------------------------------------- trust store


def trust_store() -> Path:
    """The folder of the user's trust store (it need not exist yet)."""
    override = os.environ.get(TRUST_STORE_ENV)
    if override:
        return Path(override)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return Path(base) / "flash-export" / "trusted"


def _is_hex_digest(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def record_trusted(digest: str, path: PathLike) -> None:
    """Record `digest` (the SHA-256 of a file this user exported as `path`) in the trust store.

    Raises:
        OSError: the store cannot be written.
    """
    if not _is_hex_digest(digest):
        raise ValueError(f"not a hex SHA-256: {digest!r}")
    store = trust_store()
    store.mkdir(parents=True, exist_ok=True, mode=0o700)
    entry = store / f"{digest}.json"
    if not entry.exists():
        _write_atomically(entry, json.dumps({
            "sha256": digest, "path": str(Path(path).resolve()),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "flash_export_version": __version__}) + "\n")


def is_trusted(digest: str) -> bool:
    """Whether the trust store records `digest`."""
    return _is_hex_digest(digest) and (trust_store() / f"{digest}.json").is_file()


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where confidence in an artifact's origin comes from.

    `source` is "trust store" (exported by this user here, unchanged since), "expected sha256"
    (the hash the user stated), "--trust" (the user vouched for it) or "unverified".
    """

    sha256: str
    source: str

    @property
    def verified(self) -> bool:
        """True unless the origin is unknown."""
        return self.source != "unverified"


def provenance(artifact: PathLike, *, expect_sha256: Optional[str] = None, trust: bool = False,
               digest: Optional[str] = None) -> Provenance:
    """Establish where `artifact` comes from; the artifact itself never counts as evidence.

    `digest` is the file's SHA-256 when the caller already hashed the bytes it will use.

    Raises:
        ArtifactError: the file is missing, or `expect_sha256` is given and differs from the
            file's hash (or is not a SHA-256).
    """
    path = Path(artifact)
    if digest is None:
        if not path.is_file():
            raise ArtifactError(f"artifact not found: {path}")
        digest = sha256_file(path)
    if expect_sha256 is not None:
        wanted = expect_sha256.strip().lower()
        if not _is_hex_digest(wanted):
            raise ArtifactError(f"--expect-sha256 must be 64 hex digits, got {expect_sha256!r}")
        if wanted != digest:
            raise ArtifactError(f"{path} has sha256 {digest}, expected {wanted}: it is not the "
                                "file you expect")
        return Provenance(digest, "expected sha256")
    if is_trusted(digest):
        return Provenance(digest, "trust store")
    return Provenance(digest, "--trust" if trust else "unverified")


def require_provenance(artifact: PathLike, *, expect_sha256: Optional[str] = None,
                       trust: bool = False, digest: Optional[str] = None,
                       why: str = "a .pt file is a program") -> Provenance:
    """`provenance`, refusing an artifact of unknown origin unless `trust`.

    Raises:
        ArtifactError: unknown origin without `trust`, or a hash that differs from
            `expect_sha256`; one line saying what to pass.
    """
    found = provenance(artifact, expect_sha256=expect_sha256, trust=trust, digest=digest)
    if not found.verified:
        raise ArtifactError(
            f"{artifact} (sha256 {found.sha256[:16]}...) was not exported by you here (it is not "
            f"in your trust store {trust_store()}) and {why}: pass --expect-sha256 with the hash "
            "its publisher gave you, or --trust to load it anyway")
    return found


# --------------------------------------------------------------------------- atomic write


def _write_atomically(target: Path, text: str) -> None:
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
    try:
        record_trusted(digest, target)
    except OSError as exc:
        import warnings

        warnings.warn(f"could not record {target.name} in the trust store {trust_store()} "
                      f"({exc.strerror}); loading it later will need --expect-sha256 {digest} "
                      "or --trust", stacklevel=3)

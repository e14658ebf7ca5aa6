"""Artifact files: kind, metadata and the spec it records, integrity (manifest), atomic writes.

Imports no torch: an artifact is data, and reading what it says must never run what it contains.
Where confidence in its origin comes from is `trust.py`'s concern.

- **Metadata** is read without loading the artifact as a program: an ONNX graph is parsed after
  the `safety` checks, a TorchScript archive or a `.pt2` package (AOTInductor) is opened as the
  zip file it is and only its `extra/flash_export.json` entry is read.
- **Manifest** (`<file>.manifest.json`, written beside every export): the SHA-256 of the file and
  of every data file exported with it. It detects corruption and mixed sets; it proves nothing
  about origin, since whoever ships a file can ship a matching manifest.
- What the metadata says about the model (spec, IOSpec) is `recorded.py`'s concern.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

from flash_export.artifacts.files import PathLike, sha256_file, write_atomically
from flash_export.core.errors import ArtifactError, ExportError

MANIFEST_SUFFIX = ".manifest.json"


# --------------------------------------------------------------------------- metadata


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
    from flash_export.artifacts.trust import record_trusted, trust_store

    try:
        record_trusted(digest, target)
    except OSError as exc:
        import warnings

        warnings.warn(f"could not record {target.name} in the trust store {trust_store()} "
                      f"({exc.strerror}); loading it later will need --expect-sha256 {digest} "
                      "or --trust", stacklevel=3)

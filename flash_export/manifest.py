"""SHA-256 manifests written beside every artifact, so the CLI loads only files it exported.

A TorchScript `.pt` is a program: loading one runs its code. `flash-export` therefore refuses to
load a file whose SHA-256 is not listed in `<file>.manifest.json` unless the user says `--trust`.
Imports no torch.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, List, Optional, Union

from flash_export.errors import ArtifactError

PathLike = Union[str, "os.PathLike[str]"]
SUFFIX = ".manifest.json"


def manifest_path(artifact: PathLike) -> Path:
    """Where the manifest of `artifact` lives: `<artifact>.manifest.json`."""
    p = Path(artifact)
    return p.with_name(p.name + SUFFIX)


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def listed_hashes(artifact: PathLike) -> List[str]:
    """The SHA-256 values the manifest of `artifact` accepts (empty when there is none)."""
    try:
        data = json.loads(manifest_path(artifact).read_text())
    except (OSError, ValueError):
        return []
    hashes = data.get("sha256") if isinstance(data, dict) else None
    if not isinstance(hashes, list):
        return []
    return [h for h in hashes if isinstance(h, str)]


def write_manifest(artifact: PathLike, hashes: Iterable[str]) -> None:
    """Atomically (re)write the manifest of `artifact` to accept exactly `hashes`."""
    target = manifest_path(artifact)
    body = json.dumps({"file": Path(artifact).name, "sha256": list(dict.fromkeys(hashes))},
                      indent=1)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(body + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def current_valid_hash(artifact: PathLike) -> Optional[str]:
    """SHA-256 of `artifact` when it exists and its manifest lists it, else None."""
    path = Path(artifact)
    if not path.is_file():
        return None
    digest = sha256_file(path)
    return digest if digest in listed_hashes(path) else None


def verify_artifact(artifact: PathLike) -> str:
    """Return the SHA-256 of `artifact` after checking its manifest lists it.

    Raises:
        ArtifactError: the file or its manifest is missing, or the hash is not listed.
    """
    path = Path(artifact)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    listed = listed_hashes(path)
    if not listed:
        raise ArtifactError(f"{path} has no readable manifest ({manifest_path(path).name}); "
                            "it was not exported here. Pass --trust to load it anyway "
                            "(a .pt file is a program)")
    digest = sha256_file(path)
    if digest not in listed:
        raise ArtifactError(f"{path} does not match its manifest (sha256 {digest[:16]}...): it "
                            "changed after export. Pass --trust to load it anyway")
    return digest

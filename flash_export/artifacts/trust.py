"""Provenance: where confidence in an artifact's origin comes from. Imports no torch.

Never from the artifact itself (a manifest shipped beside a file proves nothing about who made
it). Every export is recorded, by SHA-256, in a trust store of the user's own
(`$FLASH_EXPORT_TRUST_STORE`, else `$XDG_DATA_HOME/flash-export/trusted`, else
`~/.local/share/flash-export/trusted`), one small file per hash so concurrent exports never
contend. Besides the store, the user may state the hash they expect (`expect_sha256`) or vouch
for a file (`trust`).

The store is always an absolute path: a relative one would be looked up in whatever folder the
command runs in, so a downloaded folder could ship a store vouching for its own files. A relative
`XDG_DATA_HOME` is ignored, as the XDG Base Directory spec says; a relative
`FLASH_EXPORT_TRUST_STORE` (flash-export's own, explicit setting) is refused with an error rather
than silently replaced by another store.
"""

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Optional, Union

from flash_export._version import __version__
from flash_export.core.errors import ArtifactError, FlashExportError

PathLike = Union[str, "os.PathLike[str]"]
TRUST_STORE_ENV = "FLASH_EXPORT_TRUST_STORE"


def trust_store() -> Path:
    """The folder of the user's trust store (it need not exist yet), an absolute path.

    Raises:
        FlashExportError: `FLASH_EXPORT_TRUST_STORE` is a relative path, or there is no absolute
            home folder to put the default store in.
    """
    override = os.environ.get(TRUST_STORE_ENV)
    if override:
        store = Path(os.path.expanduser(override))
        if not store.is_absolute():
            raise FlashExportError(f"{TRUST_STORE_ENV} must be an absolute path, got "
                                   f"{override!r}: a relative store would depend on the folder "
                                   "you run in")
        return store
    xdg = os.environ.get("XDG_DATA_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "flash-export" / "trusted"
    base = Path(os.path.expanduser("~")) / ".local" / "share"  # relative XDG paths are ignored
    if not base.is_absolute():
        raise FlashExportError(f"no absolute home folder for the trust store (HOME is "
                               f"{os.environ.get('HOME', '')!r}): set {TRUST_STORE_ENV} to an "
                               "absolute path")
    return base / "flash-export" / "trusted"


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
        from flash_export.artifacts.files import write_atomically

        write_atomically(entry, json.dumps({
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
        from flash_export.artifacts.files import sha256_file

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

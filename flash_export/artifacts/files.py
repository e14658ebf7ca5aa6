"""Artifact bytes on disk: their SHA-256 and writes that never leave half a file."""

import errno
import hashlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Union

PathLike = Union[str, "os.PathLike[str]"]
_BLOCK = 1 << 20  # sha256_file reads a MiB at a time


def sha256_file(path: Union[PathLike, BinaryIO]) -> str:
    """Hex SHA-256 of a file's bytes (a path, or an open binary file read from where it is)."""
    if isinstance(path, (str, os.PathLike)):
        with open(path, "rb") as f:
            return sha256_file(f)
    digest = hashlib.sha256()
    for block in iter(lambda: path.read(_BLOCK), b""):
        digest.update(block)
    return digest.hexdigest()


def write_atomically(target: Path, text: str) -> None:
    """Write `text` to `target` through a temporary file and a rename (never half a file).

    The temporary file gets an unpredictable name beside `target` and is created with O_EXCL,
    which follows no link: whatever another user planted at a name (a symlink to a file of
    yours, say) makes the create fail, it is never written through. Its mode is 0666 less the
    umask, as any file `open` creates.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:  # taken (by chance or by someone else): draw another name
            continue
    else:
        raise FileExistsError(errno.EEXIST, "no free temporary name", str(target.parent))
    try:
        with open(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

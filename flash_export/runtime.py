"""Find the native kernel library and build onnxruntime sessions. Imports no torch."""

from __future__ import annotations

import os
from pathlib import Path

LIBRARY_ENV = "FLASH_EXPORT_LIBRARY"
_LIBRARY_NAME = "libflash_export.so"


def library_path() -> Path:
    """Return the path of the native kernel library (`FLASH_EXPORT_LIBRARY` overrides it)."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent / "_native" / _LIBRARY_NAME

"""Where the native kernel library is: the one path every loader uses."""

import os
from pathlib import Path

LIBRARY_ENV = "FLASH_EXPORT_LIBRARY"
_LIBRARY_NAME = "libflash_export.so"


_BUILD_HINT = (f"build it with `python custom_ops/build.py --out DIR` and set {LIBRARY_ENV}="
               f"DIR/{_LIBRARY_NAME}, or reinstall flash-export (pip builds it into the package)")


def library_path() -> str:
    """The path of the native kernel library (`FLASH_EXPORT_LIBRARY` overrides it), as a str.

    A str, so it goes straight into `SessionOptions.register_custom_ops_library`.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return override
    return str(Path(__file__).resolve().parents[1] / "_native" / _LIBRARY_NAME)

"""Where this copy of flash-export was installed from, and the pip line that reinstalls it.

Hints (the doctor's, a missing optional extra's) must work from where the user stands: a clone
installed with `pip install -e`, a wheel file, or a package index. pip records the first two in
the distribution's `direct_url.json` (PEP 610); without it the package came from an index.
"""

import json
import re
import shlex
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import List, Optional
from urllib.parse import unquote, urlparse

DISTRIBUTION = "flash-export"
# What the `export` extra brings, as imported; a light install (running graphs) has neither.
EXPORT_MODULES = ("torch", "onnxscript")
# PyTorch's index of CPU builds: from PyPI alone, pip takes a multi-GB CUDA torch.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass(frozen=True)
class InstallSource:
    """How the running flash-export was installed.

    Attributes:
        kind: "editable" (a clone, `pip install -e`), "directory" (a clone, `pip install DIR`),
            "wheel" (a wheel or sdist file), "index" (a package index) or "unknown" (not
            installed as a distribution: run from a source tree on sys.path).
        location: the clone's folder or the file's path; None for "index" and "unknown".
    """

    kind: str
    location: Optional[str] = None

    def requirement(self, extra: Optional[str] = None) -> str:
        """What to give pip to install this same flash-export (with `extra`)."""
        suffix = f"[{extra}]" if extra else ""
        if self.kind == "editable":
            return f"-e {shlex.quote(f'{self.location}{suffix}')}"
        if self.kind in ("directory", "wheel"):
            return shlex.quote(f"{self.location}{suffix}")
        return shlex.quote(f"{DISTRIBUTION}{suffix}")


def _installed() -> Optional[metadata.Distribution]:
    # pip writes INSTALLER into what it installs; a source tree's stray *.egg-info has none.
    found = [d for d in metadata.distributions(name=DISTRIBUTION) if d.read_text("INSTALLER")]
    return found[0] if found else None


def install_source() -> InstallSource:
    """Read the installed distribution's record of where it came from."""
    dist = _installed()
    if dist is None:
        return InstallSource("unknown")
    text = dist.read_text("direct_url.json")
    if not text:
        return InstallSource("index")
    try:
        record = json.loads(text)
        url = urlparse(record["url"])
    except (ValueError, KeyError, TypeError):
        return InstallSource("unknown")
    if url.scheme != "file":  # a VCS or archive URL: pip takes it back as given
        return InstallSource("wheel", record["url"])
    location = unquote(url.path)
    if "dir_info" in record:
        editable = bool(record["dir_info"].get("editable"))
        return InstallSource("editable" if editable else "directory", location)
    return InstallSource("wheel", location)


def extra_requirements(extra: str) -> List[str]:
    """The requirements optional `extra` adds, as the installed metadata lists them."""
    dist = _installed()
    requires = (dist.requires or []) if dist is not None else []
    marker = re.compile(r"""extra\s*==\s*["']""" + re.escape(extra) + """["']""")
    return [r.split(";")[0].strip() for r in requires if ";" in r and marker.search(r)]


def pip_install_line(extra: str) -> str:
    """The command that adds optional `extra` to this install.

    It names the extra's own packages, which works from any install (a clone, a wheel, an index)
    without reinstalling flash-export.
    """
    packages = extra_requirements(extra)
    if packages:
        return "pip install " + " ".join(shlex.quote(p) for p in packages)
    return f"pip install {install_source().requirement(extra)}"


def reinstall_line() -> str:
    """The command that reinstalls flash-export, rebuilding or restoring its native library."""
    source = install_source()
    if source.kind == "editable":
        return f"pip install --no-deps {source.requirement()} (rebuilds the library in the clone)"
    if source.kind == "unknown":
        return ("from the source tree: python custom_ops/build.py --out DIR, then "
                "FLASH_EXPORT_LIBRARY=DIR/libflash_export.so")
    return f"pip install --force-reinstall --no-deps {source.requirement()}"


def export_extra_hint() -> str:
    """How to add the exporters (the `export` extra) to this install, with the CPU torch."""
    return f"{pip_install_line('export')} --extra-index-url {TORCH_CPU_INDEX}"


def module_command(module: str, *args: str) -> List[str]:
    """`python -m module args` for a subprocess that must import this same flash-export.

    `-m` puts the current folder first on sys.path, so run from a source clone it would import
    the clone's tree (its native library unbuilt) instead of the installed copy. `-P` (Python >=
    3.11) leaves it out; on 3.10 the child drops that entry itself before importing anything.
    """
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", module, *args]
    run = ("import runpy, sys; del sys.path[0]; "
           f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", run, *args]

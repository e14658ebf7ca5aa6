"""Check a built flash-export wheel: its tag, its files, its Python and dependency metadata.

    python .ci/check_wheel.py WHEEL SOURCE_ROOT PLATFORM

SOURCE_ROOT is the checkout the wheel was built from: every .py under its flash_export/ (the zoo
in flash_export/models/ too) must be in the wheel. PLATFORM is the platform tag the wheel must
carry (manylinux_2_34_x86_64). Prints one line per check; exits 1 when any fails. Needs
`packaging` (auditwheel brings it).
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import parse_wheel_filename

# The export side: the light install (no extra) must pull none of these.
_EXPORT_ONLY = {"torch", "onnxscript"}
# Two distributions of the module onnxruntime: no requirement may choose one (the user installs
# one; an extra naming one would be laid over the other).
_RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}


def check(wheel: Path, source: Path, platform: str) -> list[tuple[str, bool, str]]:
    """The checks as (name, passed, detail)."""
    results = []
    _, _, _, tags = parse_wheel_filename(wheel.name)
    names = sorted(str(t) for t in tags)
    results.append(("tag", names == [f"py3-none-{platform}"],
                    f"{', '.join(names)} (want py3-none-{platform})"))
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
        dist_info = next(n.split("/")[0] for n in files if n.endswith(".dist-info/METADATA"))
        wheel_meta = Parser().parsestr(archive.read(f"{dist_info}/WHEEL").decode())
        meta = Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
    recorded = sorted(wheel_meta.get_all("Tag") or [])
    results.append(("WHEEL file", recorded == names and wheel_meta["Root-Is-Purelib"] == "false",
                    f"Tag {', '.join(recorded)}, Root-Is-Purelib {wheel_meta['Root-Is-Purelib']}"))

    modules = {p.relative_to(source).as_posix() for p in (source / "flash_export").rglob("*.py")}
    zoo = sorted(m for m in modules if m.startswith("flash_export/models/"))
    wanted = modules | {"flash_attention.py", "flash_export/py.typed",
                        "flash_export/_native/libflash_export.so"}
    missing = sorted(wanted - files)
    results.append(("files", not missing, f"missing {', '.join(missing)}" if missing else
                    f"all {len(modules)} modules (the zoo's {len(zoo)}), py.typed, the library"))

    requires_python = SpecifierSet(meta["Requires-Python"] or "")
    results.append(("Requires-Python",
                    "3.10" in requires_python and "3.9" not in requires_python,
                    f"{meta['Requires-Python']} (torch 2.13 needs 3.10, so 3.10 in, 3.9 out)"))

    every = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    base = [r for r in every if r.marker is None or "extra" not in str(r.marker)]
    heavy = sorted(r.name for r in base if r.name.lower() in _EXPORT_ONLY)
    results.append(("light install", not heavy,
                    f"needs {', '.join(heavy)} without an extra" if heavy
                    else f"needs only {', '.join(sorted(r.name for r in base))}"))
    runtimes = sorted(str(r) for r in every if r.name.lower() in _RUNTIMES)
    results.append(("no onnxruntime required", not runtimes,
                    f"requires {'; '.join(runtimes)}" if runtimes
                    else "neither onnxruntime nor onnxruntime-gpu, in no extra"))
    return results


def main(argv: list[str]) -> int:
    """Command-line entry point."""
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    results = check(Path(argv[0]), Path(argv[1]), argv[2])
    for name, passed, detail in results:
        print(f"[{'ok' if passed else 'FAIL'}] {name}: {detail}")
    return 0 if all(passed for _, passed, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

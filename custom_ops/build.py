"""Build libflash_export.so: kernel core, onnxruntime adapter and, with nvcc, the CUDA kernel.

Standalone (standard library only) so setup.py can load it by path at install time:

    python custom_ops/build.py --out DIR [--cuda auto|on|off] [--sanitize] [--werror]

Every ``core/*.cc`` and ``ort/*.cc`` is compiled with g++ (``$CXX`` overrides it); files named
``*_avx2.cc`` / ``*_avx512.cc`` / ``*_amx.cc`` get their ISA flags only, so the library still
loads and runs on a CPU without them (the kernel picks its path at run time); a compiler that
does not know the AMX flags builds the library without the AMX path. With CUDA, every
``core/*.cu`` is compiled with nvcc and the CUDA runtime is linked statically, so the library
loads where no CUDA is installed. ``--describe`` prints which compilers a build would use and
builds nothing (the Makefile prints it before pip's quiet install).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LIBRARY_NAME = "libflash_export.so"

_ROOT = Path(__file__).resolve().parent
_X86 = platform.machine().lower() in ("x86_64", "amd64")
_ISA_FLAGS = {
    "_amx.cc": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma",
                "-mf16c", "-mamx-tile", "-mamx-bf16"],
    "_avx512.cc": ["-mavx512f", "-mavx2", "-mfma", "-mf16c"],
    "_avx2.cc": ["-mavx2", "-mfma", "-mf16c"],
}
_SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
# A sanitized build compiles at -O1, as the sanitizers' documentation advises: every access is
# still checked, and the kernel's templates compile faster (the AVX2 kernel file: 22 s against
# 54 s at -O3, one measurement on a busy 2-core machine); the code differs only in what the
# optimizer does with it.
_SANITIZE_OPT = "-O1"


def _compiler_accepts(cxx: str, flags: list[str]) -> bool:
    """Whether `cxx` compiles an empty translation unit with `flags`."""
    with tempfile.TemporaryDirectory(prefix="flash_export_probe_") as tmp:
        source = Path(tmp) / "probe.cc"
        source.write_text("int main() { return 0; }\n")
        result = subprocess.run([cxx, *flags, "-c", str(source), "-o", str(Path(tmp) / "p.o")],
                                capture_output=True)
    return result.returncode == 0


class BuildError(RuntimeError):
    """A compiler or linker failed, or a required tool is missing."""


def find_nvcc() -> Path | None:
    """Return nvcc from PATH or /usr/local/cuda/bin, or None."""
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    default = Path("/usr/local/cuda/bin/nvcc")
    return default if default.is_file() else None


def _cuda_lib_dir(nvcc: Path) -> Path:
    # nvcc may be a wrapper script (as /usr/local/bin/nvcc is on these machines), so also look
    # where CUDA toolkits usually live.
    homes = [nvcc.resolve().parent.parent]
    if os.environ.get("CUDA_HOME"):
        homes.insert(0, Path(os.environ["CUDA_HOME"]))
    homes += sorted(Path("/usr/local").glob("cuda*"), reverse=True)
    for home in homes:
        for candidate in (home / "lib64", home / "targets" / "x86_64-linux" / "lib",
                          home / "lib"):
            if (candidate / "libcudart_static.a").is_file():
                return candidate
    raise BuildError(f"libcudart_static.a not found under {', '.join(map(str, homes))}")


def _sources() -> tuple[list[Path], list[Path]]:
    """The C++ and the CUDA sources of the library."""
    cc_sources = sorted((_ROOT / "core").glob("*.cc")) + sorted((_ROOT / "ort").glob("*.cc"))
    return cc_sources, sorted((_ROOT / "core").glob("*.cu"))


def _cuda_compiler(cuda: str, cu_sources: list[Path]) -> Path | None:
    """nvcc when the build compiles CUDA, else None; raises when ``cuda="on"`` cannot be met."""
    if cuda not in ("auto", "on", "off"):
        raise BuildError(f"cuda must be 'auto', 'on' or 'off', got {cuda!r}")
    nvcc = find_nvcc() if cuda != "off" else None
    if cuda == "on" and nvcc is None:
        raise BuildError("--cuda on: nvcc not found on PATH or in /usr/local/cuda/bin")
    if cuda == "on" and not cu_sources:
        raise BuildError(f"--cuda on: no .cu sources in {_ROOT / 'core'}")
    return nvcc if cu_sources else None


def describe_build(cuda: str = "auto",
                   cuda_archs: tuple[str, ...] | list[str] = ("80", "90")) -> str:
    """The library and the compilers ``build_library`` would use, with file counts, in one line."""
    cc_sources, cu_sources = _sources()
    nvcc = _cuda_compiler(cuda, cu_sources)
    line = f"{LIBRARY_NAME} with {os.environ.get('CXX', 'g++')} ({len(cc_sources)} files)"
    if nvcc is not None:
        archs = ", ".join(f"sm_{a}" for a in cuda_archs)
        line += f" and {nvcc} ({len(cu_sources)} file{'s' * (len(cu_sources) > 1)}: {archs})"
    return line


def _run(cmd: list[str], verbose: bool) -> None:
    if verbose:
        print(" ".join(cmd), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if verbose and (result.stdout or result.stderr):
        print(result.stdout + result.stderr, end="", flush=True)
    if result.returncode != 0:
        raise BuildError(f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr}")


def build_library(
    out_dir: Path,
    *,
    cuda: str = "auto",
    cuda_archs: tuple[str, ...] | list[str] = ("80", "90"),
    sanitize: bool = False,
    werror: bool = False,
    verbose: bool = False,
) -> Path:
    """Compile and link libflash_export.so into ``out_dir``.

    Args:
        out_dir: Folder that receives the library (created if missing).
        cuda: "auto" builds the CUDA kernel when nvcc and a ``core/*.cu`` exist, "on" requires
            them, "off" skips CUDA.
        cuda_archs: SM versions to generate code for (e.g. "80", "90").
        sanitize: Build with AddressSanitizer and UBSan.
        werror: Treat compiler warnings as errors.
        verbose: Print every command and its output.

    Returns:
        Path of the linked library.

    Raises:
        BuildError: A tool is missing or a compile or link step failed.
    """
    out_dir = Path(out_dir)
    cc_sources, cu_sources = _sources()
    nvcc = _cuda_compiler(cuda, cu_sources)
    if verbose:
        print(f"building {describe_build(cuda, cuda_archs)}", file=sys.stderr, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")
    amx_sources = [s for s in cc_sources if s.name.endswith("_amx.cc")]
    skip_amx = bool(amx_sources) and not (_X86 and _compiler_accepts(cxx, _ISA_FLAGS["_amx.cc"]))
    if skip_amx:
        cc_sources = [s for s in cc_sources if s not in amx_sources]
    with_cuda = nvcc is not None
    if not with_cuda:
        cu_sources = []
    archs = [str(a) for a in cuda_archs]

    defines: list[str] = []
    if skip_amx:
        defines.append("-DFLASH_EXPORT_NO_AMX")
    if with_cuda:
        defines += ["-DFLASH_EXPORT_WITH_CUDA", f'-DFLASH_EXPORT_CUDA_ARCHS="{",".join(archs)}"']
    if sanitize:
        defines.append('-DFLASH_EXPORT_SANITIZER="address,undefined"')
    includes = [f"-I{_ROOT / 'core'}", f"-I{_ROOT / 'ort'}"]
    cxx_flags = ["-std=c++17", _SANITIZE_OPT if sanitize else "-O3", "-fPIC", "-Wall", "-Wextra",
                 "-fvisibility=hidden", "-fvisibility-inlines-hidden", *includes, *defines]
    if werror:
        cxx_flags.append("-Werror")
    if sanitize:
        cxx_flags += _SANITIZE_FLAGS

    with tempfile.TemporaryDirectory(prefix="flash_export_build_") as tmp:
        tmp_dir = Path(tmp)
        jobs: list[list[str]] = []
        objects: list[Path] = []
        for index, source in enumerate(cc_sources + cu_sources):
            obj = tmp_dir / f"{index:02d}_{source.stem}.o"
            objects.append(obj)
            if source.suffix == ".cu":
                assert nvcc is not None
                cmd = [str(nvcc), "-std=c++17", "-O3", *includes, *defines,
                       "-Xcompiler", "-fPIC,-fvisibility=hidden,-Wall,-Wextra"]
                for arch in archs:
                    cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
                # PTX of the newest arch too, so newer GPUs can JIT it instead of failing with
                # "no kernel image".
                newest = max(archs, key=int)
                cmd += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
                if werror:
                    cmd += ["-Werror", "all-warnings", "-Xcompiler", "-Werror"]
                if sanitize:
                    cmd += ["-Xcompiler", "-fno-omit-frame-pointer", "-g"]
                cmd += ["-c", str(source), "-o", str(obj)]
            else:
                isa = next((f for s, f in _ISA_FLAGS.items() if source.name.endswith(s)), [])
                cmd = [cxx, *cxx_flags, *(isa if _X86 else []), "-c", str(source), "-o", str(obj)]
            jobs.append(cmd)
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            for future in [pool.submit(_run, cmd, verbose) for cmd in jobs]:
                future.result()

        linked = tmp_dir / LIBRARY_NAME
        link = [cxx, "-shared", "-o", str(linked), *map(str, objects)]
        if sanitize:
            link += _SANITIZE_FLAGS
        else:
            link.append("-Wl,--no-undefined")
        if with_cuda:
            assert nvcc is not None
            # Keep the static CUDA runtime's symbols private: exported, they could shadow the
            # libcudart of torch or onnxruntime in the same process.
            link += [f"-L{_cuda_lib_dir(nvcc)}", "-lcudart_static", "-ldl", "-lpthread", "-lrt",
                     "-Wl,--exclude-libs,ALL"]
        else:
            link.append("-lpthread")
        _run(link, verbose)
        # Replace rather than overwrite: a process that has the old library mapped keeps it intact.
        target = out_dir / LIBRARY_NAME
        staged = out_dir / f".{LIBRARY_NAME}.tmp"
        shutil.copy2(linked, staged)
        os.replace(staged, target)
    return target


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="Build libflash_export.so.")
    parser.add_argument("--out", type=Path, help="output folder (required unless --describe)")
    parser.add_argument("--cuda", choices=("auto", "on", "off"), default="auto",
                        help="build the CUDA kernel (default: auto, when nvcc is found)")
    parser.add_argument("--cuda-archs", default="80,90", help="SM versions (default: 80,90)")
    parser.add_argument("--sanitize", action="store_true", help="ASan + UBSan (default: off)")
    parser.add_argument("--werror", action="store_true", help="warnings are errors (default: off)")
    parser.add_argument("--verbose", action="store_true", help="print commands (default: off)")
    parser.add_argument("--describe", action="store_true",
                        help="print the compilers a build would use, build nothing (default: off)")
    args = parser.parse_args(argv)
    if args.out is None and not args.describe:
        parser.error("--out is required")
    archs = tuple(args.cuda_archs.split(","))
    try:
        if args.describe:
            print(describe_build(args.cuda, archs))
            return 0
        path = build_library(args.out, cuda=args.cuda, cuda_archs=archs,
                             sanitize=args.sanitize, werror=args.werror, verbose=args.verbose)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The library's two ABIs, checked at compile time and against the built library.

custom_ops/core/flash_export.h, its own C ABI: valid C and C++, declares exactly the symbols the
library exports, and flash_export/runtime/native_abi.py's ctypes mirror has its params layout
field for field.

custom_ops/ort/ort_abi.h, its subset of onnxruntime's, against the official onnxruntime_c_api.h
(compile-time static_asserts). The onnxruntime wheels ship no headers, so the official header
comes from Debian trixie's libonnxruntime-dev, fetched into a scratch folder (cached under /tmp)
without touching the system's apt configuration. Where it cannot be fetched (no network, no apt)
the test skips and says why.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from flash_export.runtime import library_path
from flash_export.runtime.native import NativeLibrary
from flash_export.runtime.native_abi import (
    CPU_ISAS,
    AttentionOptions,
    AttentionParams,
    TensorDescriptor,
)

REPO = Path(__file__).resolve().parents[1]
C_HEADER = REPO / "custom_ops" / "core" / "flash_export.h"
CACHE = Path(tempfile.gettempdir()) / "flash_export_ort_headers"
HEADER_DIR = CACHE / "root" / "usr" / "include" / "onnxruntime"


def _fetch_official_headers() -> tuple[Path | None, str]:
    """Return (include dir, "") or (None, reason it could not be fetched)."""
    if (HEADER_DIR / "onnxruntime_c_api.h").is_file():
        return HEADER_DIR, ""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return None, "apt-get/dpkg-deb not available to fetch libonnxruntime-dev"
    apt = CACHE / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "etc"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    (apt / "etc" / "sources.list").write_text("deb http://deb.debian.org/debian trixie main\n")
    options = [
        "-o", f"Dir::Etc::SourceList={apt / 'etc' / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/nonexistent",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", f"Dir::Cache={apt / 'cache'}",
        "-o", f"Dir::State::status={apt / 'status'}",
    ]
    try:
        update = subprocess.run(["apt-get", *options, "update"], capture_output=True, text=True,
                                timeout=180, check=False)
        if update.returncode != 0:
            return None, f"apt-get update (Debian trixie) failed: {update.stderr.strip()[-300:]}"
        download = subprocess.run(["apt-get", *options, "download", "libonnxruntime-dev"],
                                  capture_output=True, text=True, cwd=apt, timeout=180,
                                  check=False)
        if download.returncode != 0:
            return None, f"apt-get download libonnxruntime-dev failed: {download.stderr[-300:]}"
    except subprocess.TimeoutExpired:
        return None, "fetching libonnxruntime-dev timed out (no network?)"
    debs = sorted(apt.glob("libonnxruntime-dev_*.deb"))
    if not debs:
        return None, "libonnxruntime-dev .deb not found after download"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(CACHE / "root")], check=True)
    return HEADER_DIR, ""


def test_ort_abi_matches_official_header() -> None:
    include, reason = _fetch_official_headers()
    if include is None:
        pytest.skip(f"official onnxruntime header unavailable: {reason}")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
           "-DFLASH_EXPORT_OFFICIAL_ORT_HEADER", f"-I{include}", f"-I{REPO / 'custom_ops' / 'ort'}",
           str(REPO / "custom_ops" / "ort" / "abi_check.cc")]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def _compiler(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


@pytest.mark.parametrize("language, std", [("c", "-std=c99"), ("c++", "-std=c++17")],
                         ids=["C99", "C++17"])
def test_c_header_compiles_alone(language: str, std: str, tmp_path: Path) -> None:
    source = tmp_path / f"use.{'c' if language == 'c' else 'cc'}"
    source.write_text('#include "flash_export.h"\nFlashExportAttentionParams params;\n')
    compiler = _compiler("gcc" if language == "c" else "g++")
    result = subprocess.run([compiler, std, "-Wall", "-Wextra", "-Werror", "-pedantic",
                             f"-I{C_HEADER.parent}", "-fsyntax-only", str(source)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


LAYOUT_PROGRAM = """
#include <stddef.h>
#include <stdio.h>
#include "flash_export.h"
#define F(name) printf("\\"%s\\": %zu, ", #name, offsetof(STRUCT, name));
int main(void) {
  printf("{");
  FIELDS
  printf("\\"sizeof\\": %zu}\\n", sizeof(STRUCT));
  return 0;
}
"""
MIRRORS = {"FlashExportAttentionParams": AttentionParams, "FlashExportTensor": TensorDescriptor,
           "FlashExportAttentionOptions": AttentionOptions}


@pytest.mark.parametrize("struct", list(MIRRORS))
def test_ctypes_mirror_matches_the_c_header(struct: str, tmp_path: Path) -> None:
    mirror = MIRRORS[struct]
    names = [name for name, _ in mirror._fields_]
    source = tmp_path / "layout.c"
    source.write_text(LAYOUT_PROGRAM.replace("STRUCT", struct)
                      .replace("FIELDS", " ".join(f"F({n})" for n in names)))
    exe = tmp_path / "layout"
    subprocess.run([_compiler("gcc"), "-std=c99", f"-I{C_HEADER.parent}", str(source), "-o",
                    str(exe)], check=True)
    layout = json.loads(subprocess.run([str(exe)], capture_output=True, text=True,
                                       check=True).stdout)
    assert {n: layout[n] for n in names} == {n: getattr(mirror, n).offset for n in names}
    assert layout["sizeof"] == ctypes.sizeof(mirror)


# A C99 caller of the params filler: one call it fills, then refusals, one into a short buffer.
FILLER_PROGRAM = r"""
#include <stdio.h>
#include "flash_export.h"
static int64_t q_sizes[3] = {2, 5, 32}, kv_sizes[3] = {2, 7, 32}, m_sizes[2] = {5, 7};
static float q[2 * 5 * 32], k[2 * 7 * 32], v[2 * 7 * 32];
static _Bool m[5 * 7];
static FlashExportTensor tensor(void* data, int32_t rank, int64_t* sizes, int32_t dtype) {
  FlashExportTensor t = {0};
  t.data = data; t.rank = rank; t.sizes = sizes; t.dtype = dtype;
  t.device = FLASH_EXPORT_DEVICE_CPU;
  return t;
}
int main(void) {
  FlashExportTensor tq = tensor(q, 3, q_sizes, FLASH_EXPORT_FLOAT32);
  FlashExportTensor tk = tensor(k, 3, kv_sizes, FLASH_EXPORT_FLOAT32);
  FlashExportTensor tv = tensor(v, 3, kv_sizes, FLASH_EXPORT_FLOAT32);
  FlashExportTensor tm = tensor(m, 2, m_sizes, FLASH_EXPORT_BOOL);
  FlashExportAttentionOptions o = {0};
  o.num_heads = 4; o.chunk_size = 16; o.causal = 1; o.device = FLASH_EXPORT_DEVICE_CPU;
  FlashExportAttentionParams p;
  char error[FLASH_EXPORT_ERROR_SIZE], little[16];
  int32_t ok = flash_export_attention_params(&tq, &tk, &tv, &tm, NULL, &o, &p, error, 512);
  printf("%d %lld %lld %lld %lld %lld %lld %lld %lld %lld %g %d %d\n", ok, (long long)p.batch,
         (long long)p.heads, (long long)p.head_dim, (long long)p.seq_k,
         (long long)p.k_batch_stride, (long long)p.o_row_stride, (long long)p.mask_batch_stride,
         (long long)p.mask_q_stride, (long long)p.mask_k_stride, p.scale, p.causal,
         p.q == q && p.mask == (const uint8_t*)m && p.out == NULL);
  tv.dtype = FLASH_EXPORT_FLOAT16;
  int32_t refused = flash_export_attention_params(&tq, &tk, &tv, NULL, NULL, &o, &p, error, 512);
  printf("%d %s|%d\n", refused, error, p.q == NULL && p.batch == 0);
  flash_export_attention_params(&tq, &tk, &tv, NULL, NULL, &o, &p, little, sizeof(little));
  printf("%s|\n", little);
  return 0;
}
"""


def test_a_c_program_fills_params_through_the_one_filler(tmp_path: Path) -> None:
    if not Path(library_path()).is_file():
        pytest.skip(f"native library not built at {library_path()}")
    source = tmp_path / "fill.c"
    source.write_text(FILLER_PROGRAM)
    exe = tmp_path / "fill"
    lib = Path(library_path())
    subprocess.run([_compiler("gcc"), "-std=c99", "-Wall", "-Wextra", "-Werror",
                    f"-I{C_HEADER.parent}", str(source), str(lib), f"-Wl,-rpath,{lib.parent}",
                    "-o", str(exe)], check=True)
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True,
                           timeout=60).stdout.splitlines()
    # B, H, D, Lk, key batch stride, out row stride, mask (Lq, Lk) broadcast over B and H
    assert lines[0] == "0 2 4 8 7 224 32 0 7 1 0.353553 1 1"
    assert lines[1] == ("1 value has element type float16, expected float32 (query's element "
                        "type)|1")
    assert lines[2] == "value has eleme|"


def test_python_isa_table_is_the_libraries() -> None:
    """CPU_ISAS names the kernel's paths the library takes, in its order (the library lists them
    lowest first when it refuses a FLASH_EXPORT_CPU_ISA that names none)."""
    if not Path(library_path()).is_file():
        pytest.skip(f"native library not built at {library_path()}")
    code = ("from flash_export.runtime import library_path\n"
            "from flash_export.runtime.native import NativeLibrary\n"
            "NativeLibrary(library_path())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "FLASH_EXPORT_CPU_ISA": "bogus"})
    found = re.search(r"names no CPU kernel path: use (.*), or unset it", result.stderr)
    assert result.returncode != 0 and found, result.stderr
    assert re.split(r", | or ", found.group(1)) == list(reversed(CPU_ISAS))


def test_c_header_declares_every_exported_symbol() -> None:
    """What the library exports is the header's entry points plus onnxruntime's RegisterCustomOps;
    the CUDA forward only in a build with nvcc."""
    if not Path(library_path()).is_file():
        pytest.skip(f"native library not built at {library_path()}")
    nm = subprocess.run([_compiler("nm"), "-D", "--defined-only", library_path()],
                        capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in nm.splitlines() if line.split()[1:2] == ["T"]}
    declared = set(re.findall(r"FLASH_EXPORT_API [^;(]*\b(flash_export_\w+)\(",
                              C_HEADER.read_text()))
    if not NativeLibrary(library_path()).has_cuda:
        declared.discard("flash_export_attention_forward_cuda")
    assert exported == declared | {"RegisterCustomOps"}

"""custom_ops/ort/ort_abi.h against the official onnxruntime_c_api.h (compile-time static_asserts).

The onnxruntime wheels ship no headers, so the official header comes from Debian trixie's
libonnxruntime-dev, fetched into a scratch folder (cached under /tmp) without touching the system's
apt configuration. Where it cannot be fetched (no network, no apt) the test skips and says why.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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

"""The CPU kernel's memory must not grow with the key length beyond one head's packed keys/values.

Each measurement runs one forward through the core's C entry point (serial, so the calling thread
owns the kernel's per-thread scratch) in a fresh process, measured as flash_export.bench does it:
/proc/self/clear_refs, then VmHWM - VmRSS around the call. With chunk_size >= Lk the key block
used to be Lk keys long, so the per-thread logits scratch (keys x 96 floats) grew with Lk and was
kept by the thread after the call: +384 MB at Lk = 2^20 against +72 MB with chunk_size 64.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flash_export.runtime import library_path

HERE = Path(__file__).resolve().parent
SEQ_K = 1 << 20  # keys: one head of head dim 2, so the inputs stay at 8 MiB each
SEQ_Q = 96  # one query block of the vector paths
MIB = 1024.0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _worker(library: str, chunk_size: int) -> None:
    """One forward at SEQ_K keys; prints peak and residual RSS growth (MiB) as JSON."""
    import numpy as np

    from flash_export.runtime.native import NativeLibrary, attention

    lib = NativeLibrary(library)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, SEQ_Q, 2)).astype(np.float32)
    k = rng.standard_normal((1, SEQ_K, 2)).astype(np.float32)
    v = rng.standard_normal((1, SEQ_K, 2)).astype(np.float32)
    attention(lib, q[:, :1], k[:, :1], v[:, :1], 1)  # library set up, output buffers touched
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    out = attention(lib, q, k, v, 1, chunk_size=chunk_size)
    peak = _status_kib("VmHWM")
    after = _status_kib("VmRSS")
    assert np.isfinite(out).all()
    print(json.dumps({"peak_mib": (peak - before) / MIB, "residual_mib": (after - before) / MIB}))


def _measure(chunk_size: int) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, str(library_path()), str(chunk_size)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    assert proc.returncode == 0, f"memory worker failed ({proc.returncode}): {proc.stderr[-800:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_scratch_does_not_grow_with_key_length() -> None:
    if not Path(library_path()).is_file():
        pytest.skip(f"native library not built at {library_path()}")
    blocked = _measure(64)
    whole = _measure(SEQ_K)  # chunk_size >= Lk: one block of every key, before the cap
    detail = f"chunk 64: {blocked}, chunk {SEQ_K}: {whole}"
    # The packed keys and values of the head (inherent) dominate both; 4 MiB of slack for noise.
    assert whole["peak_mib"] <= 1.5 * blocked["peak_mib"] + 4.0, detail
    # After the call only small per-thread buffers may stay resident.
    assert whole["residual_mib"] <= 8.0 and blocked["residual_mib"] <= 8.0, detail


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))

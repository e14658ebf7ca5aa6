"""The CPU kernel against the float64 reference, case by case, in a worker process per path.

A `KernelCase` is one call of the native CPU forward: its shape, dtype, masking, the thread count
the plan is made for, and which heads hold non-finite values (`poison_heads`): the outputs of the
other heads must meet the tolerance rule (flash_export/core/tolerance.py) as if those values were
not there. The worker (_kernel_worker.py) also fills a guard past the end of q, k and v with the
poison, so a read past the end of a buffer shows as NaN in a clean head, and reports a write past
the end of the output.

`KernelWorker(isa)` runs cases on one vector path (FLASH_EXPORT_CPU_ISA) in one process, many
cases per process; `case_failure` says what is wrong with one case's answer, or None.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from flash_export.core.tolerance import compare, max_abs_error
from flash_export.runtime import library_path

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "float16", "bfloat16")
POISONS = ("nan", "inf", "-inf")
# The largest query count the rows regime takes (cpu::kRowsMaxQueries,
# custom_ops/core/flash_attention_cpu_internal.h).
ROWS_MAX_QUERIES = 8


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One forward call. `regime` is the one the call is meant to reach on an FMA path (None:
    whichever the plan picks); `poison_heads` hold `poison` in q, k and v."""

    batch: int
    seq_q: int
    seq_k: int
    heads: int
    head_dim: int
    dtype: str
    causal: bool = False
    masked: bool = False
    chunk: int = 64
    threads: int = 1
    poison_heads: tuple[int, ...] = ()
    poison: str = "nan"
    scale: Optional[float] = None
    seed: int = 0
    regime: Optional[str] = None
    min_groups: int = 0  # shared regime: packing groups the plan must make at least

    def __str__(self) -> str:
        flags = "".join((" causal" if self.causal else "", " mask" if self.masked else ""))
        return (f"{self.dtype} B={self.batch} Lq={self.seq_q} Lk={self.seq_k} H={self.heads} "
                f"D={self.head_dim} chunk={self.chunk} threads={self.threads}{flags} "
                f"poison {self.poison} in heads {list(self.poison_heads)}"
                + ("" if self.scale is None else f" scale={self.scale}"))


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even (finite inputs)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def case_inputs(case: KernelCase) -> dict[str, Any]:
    """Clean q, k, v (B, L, E) in the case's dtype (bfloat16 as bits) and the mask, if any."""
    rng = np.random.default_rng(case.seed)
    embed = case.heads * case.head_dim
    q, k, v = (rng.standard_normal((case.batch, n, embed)).astype(np.float32)
               for n in (case.seq_q, case.seq_k, case.seq_k))
    if case.dtype == "bfloat16":
        q, k, v = (to_bfloat16_bits(x) for x in (q, k, v))
    else:
        q, k, v = (x.astype(case.dtype) for x in (q, k, v))
    mask = None
    if case.masked:  # (B, 1, Lq, Lk), True = may attend; the first row of batch 0 sees no key
        mask = rng.random((case.batch, 1, case.seq_q, case.seq_k)) > 0.3
        mask[0, 0, 0, :] = False
    return {"q": q, "k": k, "v": v, "mask": mask}


def _as_float(x: np.ndarray, dtype: str) -> np.ndarray:
    return from_bfloat16_bits(x) if dtype == "bfloat16" else x.astype(np.float32)


def _read_frame(stream: Any) -> Any:
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


class WorkerDied(RuntimeError):
    """The worker process ended while running a case (a crash in the kernel)."""


class KernelWorker:
    """A _kernel_worker.py process on one vector path. `isa` is the path it got (a CPU that
    cannot run the forced one gets another: see `runs`)."""

    def __init__(self, isa: str, library: Optional[str] = None) -> None:
        self.forced = isa
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
               "FLASH_EXPORT_LIBRARY": library or library_path(), "FLASH_EXPORT_CPU_ISA": isa}
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "_kernel_worker.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        hello = self._answer()
        self.isa = hello["isa"]

    @property
    def runs(self) -> bool:
        """Whether the kernel took the forced path on this CPU."""
        return self.isa == self.forced

    def _answer(self) -> Any:
        answer = _read_frame(self.process.stdout)
        if answer is None:
            code = self.process.wait(timeout=30)
            stderr = self.process.stderr.read().decode(errors="replace")[-2000:]
            raise WorkerDied(f"the kernel worker ({self.forced}) exited with {code}: {stderr}")
        return answer

    def run(self, case: KernelCase) -> dict[str, Any]:
        """The worker's answer for `case`: out, plan, wrote_past_end (or error)."""
        request = {**case_inputs(case), "dtype": case.dtype, "heads": case.heads,
                   "causal": case.causal, "scale": case.scale, "chunk": case.chunk,
                   "threads": case.threads,
                   "poison_heads": list(case.poison_heads), "poison": case.poison,
                   "guard": 64}
        data = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.process.stdin.write(struct.pack("<Q", len(data)) + data)
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # reported by _answer with the exit code
        try:
            return self._answer()
        except WorkerDied as exc:
            raise WorkerDied(f"{case}: {exc}") from None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()


def expected_regime(case: KernelCase, isa: str) -> Optional[str]:
    """The regime the plan must report: rows iff Lq <= 8 on the FMA paths (the AMX path has no
    rows regime), else the one the case was built for."""
    if isa == "amx":
        return None
    if case.seq_q <= ROWS_MAX_QUERIES:
        return "rows"
    return case.regime


@functools.lru_cache(maxsize=4096)
def references(case: KernelCase) -> tuple[np.ndarray, np.ndarray]:
    """(float64 reference, PyTorch's own computation in the case's dtype), (B, Lq, E) float64,
    of the case's clean inputs; computed once per case, whichever path runs it."""
    import torch
    from _native_cases import reference_attention

    inputs = case_inputs(case)
    q, k, v = (_as_float(inputs[n], case.dtype) for n in ("q", "k", "v"))
    kwargs = {"mask": inputs["mask"], "causal": case.causal, "scale": case.scale}
    # One thread: these products are small, and pytest's workers share the cores (two threads
    # made float16 products 3x slower on CI's two cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = reference_attention(q, k, v, case.heads, **kwargs)
        same = reference_attention(q, k, v, case.heads, dtype=getattr(torch, case.dtype),
                                   **kwargs)
    finally:
        torch.set_num_threads(threads)
    return reference, same


def case_failure(case: KernelCase, answer: dict[str, Any]) -> Optional[str]:
    """What is wrong with a worker's answer to `case`, or None.

    The clean heads' outputs must meet the tolerance rule against the float64 reference, the
    baseline being PyTorch's own computation in the case's dtype; the plan must report the
    expected regime; nothing may be written past the output.
    """
    if "error" in answer:
        return f"{case}: {answer['error']}"
    problems = []
    plan = answer["plan"]
    want = expected_regime(case, plan.get("isa", "?"))
    if want is not None and plan.get("regime") != want:
        problems.append(f"regime {plan.get('regime')}, expected {want} ({plan})")
    elif want == "shared" and plan.get("groups", 0) < case.min_groups:
        problems.append(f"{plan.get('groups')} packing groups, expected {case.min_groups} or more")
    if answer["wrote_past_end"]:
        problems.append("wrote past the end of the output")
    reference, same = references(case)
    clean = [h for h in range(case.heads) if h not in case.poison_heads]
    columns = np.concatenate([np.arange(h * case.head_dim, (h + 1) * case.head_dim)
                              for h in clean]) if clean else np.zeros(0, dtype=np.int64)
    actual = _as_float(answer["out"], case.dtype).astype(np.float64)[..., columns]
    reference, same = reference[..., columns], same[..., columns]
    verdict = compare(actual, reference, baseline_error=max_abs_error(same, reference),
                      dtype=case.dtype)
    if not verdict.passed:
        problems.append(f"wrong output: max abs error {verdict.max_abs:.3g} > bound "
                        f"{verdict.bound:.3g} ({verdict.nonfinite} non-finite) at "
                        f"{verdict.worst_index} of the clean heads")
    if not problems:
        return None
    return f"[{plan.get('isa')} {plan.get('regime')}] {case}: " + "; ".join(problems)

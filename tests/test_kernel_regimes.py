"""The CPU kernel on every regime x dtype x vector path x head dim x query count around every
regime and block boundary, with non-finite values in the neighbouring heads, against the float64
reference; and the same check on calls Hypothesis draws.

Each path (FLASH_EXPORT_CPU_ISA) runs in one worker process (_kernel_worker.py) that takes every
case: the path is chosen once per process, and a crash fails the test instead of killing the run.
A clean head's output must meet the tolerance rule whatever its neighbours hold (NaN or an
infinity in their queries, keys and values, and past the end of the buffers): a kernel that reads
padding lanes from the next head, or past the last key row, turns it into NaN. The plan must
report the regime each case is built for (rows iff Lq <= 8 on the FMA paths), so a threshold that
sends 9-16 query rows to the rows regime fails here as well as in the numbers.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from _kernel_cases import DTYPES, POISONS, KernelCase, KernelWorker, case_failure
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flash_export.runtime import library_path
from flash_export.runtime.native_abi import CPU_ISAS as ISAS

# Query rows around every boundary: the rows regime (<= 8), twice it (16, where a threshold off by
# a factor of two would still send calls to it), the causal block (48 rows) and one past each.
SEQ_Q = [1, 8, 9, 16, 17, 47, 48, 49]
# 16 and 64: whole vectors on every path (64 is also a specialised dim); 40 and 72: whole on AVX2
# (8 floats), padded on AVX-512 (16); 20: padded on both. The portable path's vector is 1 float.
HEAD_DIMS = [16, 20, 40, 64, 72]
# (batch, heads, threads) that reach each regime past Lq = 8: "heads" with B*H >= 2 x threads
# and small heads, "shared" with fewer heads than that.
LAYOUTS = {"heads": (2, 3, 2), "shared": (1, 3, 2)}
# Which heads hold non-finite values: the middle one (head 0's padding lanes would read it, and
# head 2 of the last row reads the guard past the buffer), or both around head 1.
POISON_HEADS = [(1,), (0, 2)]


def matrix_cases() -> list[KernelCase]:
    """Every (Lq, D, dtype, regime) of the matrix; masking, causality, key length, chunk size,
    poison pattern and value vary from case to case (seeded by the case's index)."""
    cases = []
    grid = itertools.product(SEQ_Q, HEAD_DIMS, DTYPES, LAYOUTS.items())
    for index, (seq_q, head_dim, dtype, (regime, (batch, heads, threads))) in enumerate(grid):
        rng = np.random.default_rng(index)
        cases.append(KernelCase(
            batch=batch, seq_q=seq_q, seq_k=int(rng.choice([seq_q, 37, 130, 300])),
            heads=heads, head_dim=head_dim, dtype=dtype, causal=bool(rng.integers(2)),
            masked=bool(rng.integers(2)), chunk=int(rng.choice([7, 16, 64])), threads=threads,
            poison_heads=POISON_HEADS[index % 2], poison=POISONS[index % 3], seed=index,
            regime=regime))
    # Several packing groups in the shared regime: a head's packed keys and values past 1 MiB
    # (Lk = 5500), three heads to a buffer that holds two, so the second group must attend with
    # its own heads.
    for index, (seq_q, head_dim, dtype) in enumerate(itertools.product(
            [17, 49], [64, 72], ["float32", "bfloat16"]), start=len(cases)):
        cases.append(KernelCase(
            batch=1, seq_q=seq_q, seq_k=5500, heads=3, head_dim=head_dim, dtype=dtype,
            causal=index % 2 == 0, masked=index % 3 == 0, chunk=256, threads=2,
            poison_heads=POISON_HEADS[index % 2], poison=POISONS[index % 3], seed=index,
            regime="shared", min_groups=2))
    return cases


MATRIX = matrix_cases()


@pytest.fixture(scope="module", autouse=True)
def _library() -> None:
    if not Path(library_path()).is_file():
        pytest.skip(f"native library not built at {library_path()}")


def _run_all(worker: KernelWorker, cases: list[KernelCase]) -> list[str]:
    failures = []
    for case in cases:
        failure = case_failure(case, worker.run(case))
        if failure is not None:
            failures.append(failure)
    return failures


@pytest.mark.parametrize("isa", ISAS)
def test_every_regime_dtype_and_head_dim_matches_reference_beside_nonfinite_heads(
        isa: str) -> None:
    worker = KernelWorker(isa)
    try:
        if not worker.runs:
            pytest.skip(f"this CPU cannot run the {isa} path (the kernel took {worker.isa})")
        failures = _run_all(worker, MATRIX)
    finally:
        worker.close()
    wrong = sum("wrong output" in f for f in failures)
    assert not failures, (f"{len(failures)} of {len(MATRIX)} cases on {isa}, {wrong} with a wrong "
                          "output:\n" + "\n".join(failures[:25]))


@pytest.fixture(scope="module")
def workers():
    """A worker per path this CPU runs, for the drawn calls."""
    started = {isa: KernelWorker(isa) for isa in ISAS}
    running = {isa: w for isa, w in started.items() if w.runs}
    for w in started.values():
        if not w.runs:
            w.close()
    yield running
    for w in running.values():
        w.close()


# Head dims near vector boundaries and the specialised ones, with the odd sizes between.
_HEAD_DIMS = st.one_of(st.sampled_from([1, 7, 8, 15, 16, 17, 20, 31, 32, 33, 40, 59, 64, 72,
                                        96, 128]), st.integers(1, 160))
_SEQ_Q = st.one_of(st.sampled_from(SEQ_Q + [7, 15, 95, 96, 97]), st.integers(1, 130))


@st.composite
def kernel_cases(draw: st.DrawFn) -> KernelCase:
    """Any call the kernel takes, with a random poison pattern that leaves a head clean."""
    heads = draw(st.integers(1, 4))
    poisoned = draw(st.sets(st.integers(0, heads - 1), max_size=heads - 1))
    return KernelCase(
        batch=draw(st.integers(1, 3)), seq_q=draw(_SEQ_Q), seq_k=draw(st.integers(0, 300)),
        heads=heads, head_dim=draw(_HEAD_DIMS), dtype=draw(st.sampled_from(DTYPES)),
        causal=draw(st.booleans()), masked=draw(st.booleans()),
        chunk=draw(st.one_of(st.integers(1, 80), st.sampled_from([256, 512, 1024]))),
        threads=draw(st.integers(1, 3)), poison_heads=tuple(sorted(poisoned)),
        poison=draw(st.sampled_from(POISONS)),
        # 0 is not a scale the contract admits (the filler refuses it); 1e-3 nearly averages
        scale=draw(st.one_of(st.none(), st.sampled_from([1e-3, -0.5, 0.05, 2.0]))),
        seed=draw(st.integers(0, 2**16)))


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=kernel_cases(), isa=st.sampled_from(ISAS))
@example(case=KernelCase(1, 1, 5, 2, 20, "float16", poison_heads=(1,), poison="inf"),
         isa="avx512").via("float16 decode (rows regime) at a padded head dim")
@example(case=KernelCase(1, 12, 40, 2, 40, "bfloat16", threads=1),
         isa="portable").via("9-16 query rows: the regime must match the plan")
def test_drawn_calls_match_reference_on_every_path(workers, case: KernelCase, isa: str) -> None:
    # A path this CPU cannot run is replaced by the next one down.
    isa = next((i for i in ISAS[ISAS.index(isa):] if i in workers), None)
    if isa is None:
        pytest.skip("no kernel path runs here")
    failure = case_failure(case, workers[isa].run(case))
    assert failure is None, failure

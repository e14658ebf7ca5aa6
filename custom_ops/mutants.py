"""Scripted mutants of the CPU kernel: each a realistic one-line bug the kernel tests must catch.

    python custom_ops/mutants.py [--only NAME ...] [--list] [--no-baseline] [--tests PATH ...]

For each mutant: copy custom_ops/ to a temporary folder, replace one snippet of one source (the
snippet must occur exactly once: a snippet that no longer matches, or matches twice, is reported
as stale and fails the run, so the list cannot rot silently when the kernel changes), build the
library there without CUDA, and run the targeted tests against it (FLASH_EXPORT_LIBRARY). A
mutant is killed when the tests fail. The sources in the work tree are never touched, so nothing
is left to revert, even after an interrupt. First the unmutated copy is built and the same tests
must pass on it (else "killed" would mean nothing).

Exit status 0 when every mutant is killed; 1 when one survived or is stale. `make mutate` runs it
after mutmut; it is not part of CI (one build per mutant, about a minute each on two cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
TESTS = ["tests/test_kernel_regimes.py"]


@dataclass(frozen=True)
class Mutant:
    """`old` (exactly once in `source`, a path under custom_ops/) becomes `new`."""

    name: str
    source: str
    old: str
    new: str
    why: str


_CPU = "core/flash_attention_cpu.cc"
_KERNEL = "core/flash_attention_cpu_kernel.h"
_COMMON = "core/flash_attention_cpu_kernel_common.h"

MUTANTS = [
    Mutant("rows-half-padded", _KERNEL,
           "p.dtype == DType::kFloat16 && dim == d_pad;",
           "p.dtype == DType::kFloat16;",
           "issue 28 gap 1: float16 rows read in place at a padded head dim (the padding lanes "
           "multiply the next head's keys; the last head reads past the key buffer)"),
    Mutant("regime-threshold-x2", _CPU,
           "if (k.run_rows != nullptr && p.seq_q <= cpu::kRowsMaxQueries) return",
           "if (k.run_rows != nullptr && p.seq_q <= 2 * cpu::kRowsMaxQueries) return",
           "issue 28 gap 2: 9-16 query rows sent to the rows regime on a plan built for tiles"),
    Mutant("plan-drops-tail-block", _CPU,
           "plan.q_blocks = (p.seq_q + plan.bq - 1) / plan.bq;",
           "plan.q_blocks = p.seq_q / plan.bq;",
           "the per-call plan forgets the last, partial query block"),
    Mutant("rows-key-scratch-unpadded", _CPU,
           "plan.off_kb = region.take(bc * d_pad);",
           "plan.off_kb = region.take(bc * dim);",
           "the rows regime's key block sized without the head-dim padding: it overlaps the "
           "value block"),
    Mutant("group-ignores-first-head", _CPU,
           "  const int64_t bh = job.first_bh + local;\n"
           "  const float* head = job.packed",
           "  const int64_t bh = local;\n"
           "  const float* head = job.packed",
           "shared regime: every packing group after the first attends as the first group's "
           "heads"),
    Mutant("causal-skips-one-vector-too-many", _KERNEL,
           "int64_t c = p.causal ? min64(nvec, max64(0, jj - seen) / W) : 0;",
           "int64_t c = p.causal ? min64(nvec, max64(0, jj - seen + W) / W) : 0;",
           "causal tile skipping leaves out a vector of query columns that sees the keys"),
    Mutant("causal-last-key-invisible", _COMMON,
           "return max64(0, min64(p.seq_k, i0 + nq + p.seq_k - p.seq_q));",
           "return max64(0, min64(p.seq_k, i0 + nq - 1 + p.seq_k - p.seq_q));",
           "causal blocks stop one key before the last key their last row sees"),
    Mutant("causal-diagonal-top-left", _COMMON,
           "  const int64_t diag = p.seq_k - p.seq_q;  // query i sees key j iff j <= i + diag "
           "(causal)\n  // Causal: key j is hidden",
           "  const int64_t diag = 0;  // query i sees key j iff j <= i + diag (causal)\n"
           "  // Causal: key j is hidden",
           "the causal mask aligned top-left instead of bottom-right when Lq != Lk"),
    Mutant("softmax-unseen-row-nan", _COMMON,
           "const typename V::Reg m_use = V::zero_where_equal(mx, neg_inf);",
           "const typename V::Reg m_use = mx;",
           "a row that has seen no key yet subtracts -inf: exp2(-inf + inf) is NaN"),
    Mutant("output-tail-dropped", _COMMON,
           "for (; i < n; ++i) d[i] = src[i] / divisor;",
           "for (; i + 1 < n; ++i) d[i] = src[i] / divisor;",
           "float32 output rows lose their last element past the whole vectors (head-dim tail)"),
]


def stale(mutant: Mutant, root: Path = ROOT) -> str | None:
    """Why `mutant` no longer applies to the sources under `root`, or None."""
    path = root / mutant.source
    if not path.is_file():
        return f"{mutant.source} does not exist"
    count = path.read_text().count(mutant.old)
    if count != 1:
        return f"its snippet occurs {count} times in {mutant.source} (must be exactly once)"
    return None


def _build(ops: Path, out: Path) -> str | None:
    """Build the library of the custom_ops copy `ops` into `out`; the error text, or None."""
    result = subprocess.run([sys.executable, str(ops / "build.py"), "--out", str(out),
                             "--cuda", "off"], capture_output=True, text=True)
    return None if result.returncode == 0 else (result.stderr or result.stdout)[-3000:]


def _tests_pass(library: Path, tests: list[str]) -> tuple[bool, str]:
    env = {**os.environ, "FLASH_EXPORT_LIBRARY": str(library), "HYPOTHESIS_PROFILE": "ci"}
    env.pop("FLASH_EXPORT_CPU_ISA", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             *tests], cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return result.returncode == 0, (lines[-1] if lines else result.stderr[-300:])


def run_mutant(mutant: Mutant | None, tests: list[str]) -> tuple[str, str]:
    """(verdict, detail) of one mutant (None: the unmutated copy)."""
    with tempfile.TemporaryDirectory(prefix="flash_export_mutant_") as tmp:
        ops = Path(tmp) / "custom_ops"
        shutil.copytree(ROOT, ops, ignore=shutil.ignore_patterns("__pycache__"))
        if mutant is not None:
            path = ops / mutant.source
            path.write_text(path.read_text().replace(mutant.old, mutant.new))
        error = _build(ops, Path(tmp) / "lib")
        if error is not None:
            return "build failed", error
        passed, summary = _tests_pass(Path(tmp) / "lib" / "libflash_export.so", tests)
        if mutant is None:
            return ("passes" if passed else "FAILS"), summary
        return ("SURVIVED" if passed else "killed"), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the kernel's scripted mutants.")
    parser.add_argument("--only", nargs="+", default=None, help="mutant names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the unmutated build's run (default: run it first)")
    parser.add_argument("--tests", nargs="+", default=TESTS,
                        help=f"the targeted tests (default: {' '.join(TESTS)})")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only is None or m.name in args.only]
    unknown = sorted(set(args.only or ()) - {m.name for m in MUTANTS})
    if unknown:
        parser.error(f"no mutants named {unknown}")
    problems = [(m, stale(m)) for m in chosen]
    for m, why in problems:
        if args.list:
            print(f"{m.name:36} {m.source}: {m.why}" + (f" [STALE: {why}]" if why else ""))
        elif why:
            print(f"STALE {m.name}: {why}")
    if args.list:
        return 0
    if any(why for _, why in problems):
        return 1
    if not args.no_baseline:
        verdict, detail = run_mutant(None, args.tests)
        print(f"unmutated: {verdict} ({detail})", flush=True)
        if verdict != "passes":
            return 1
    survived = 0
    for m in chosen:
        start = time.monotonic()
        verdict, detail = run_mutant(m, args.tests)
        survived += verdict != "killed"
        print(f"{m.name:36} {verdict:10} {time.monotonic() - start:5.0f} s  {detail}",
              flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} kernel mutants killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())

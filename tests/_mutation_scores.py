"""The mutmut score per module, from the results `mutmut run` left in mutants/ (`make mutate`).

    python tests/_mutation_scores.py [--min PERCENT] [--survivors]

Score = (killed + timeout) / (every mutant but those skipped), mutmut's own definition; a mutant
no test reaches ("no tests") counts against the score. `--survivors` lists every surviving
mutant with the lines it changed (what `mutmut show NAME` prints, for all of them at once).
Exit status 1 when a module scores below `--min` (default 90) or a mutant was left unchecked.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import sys
from collections import Counter
from pathlib import Path

MUTANTS = Path("mutants")
# mutmut's exit codes (mutmut/stats.py): 1 and 3 killed, 0 survived, None not checked; the
# timeouts (SIGXCPU, and 36/255 from its own timer) count as killed, as mutmut counts them.
KILLED = {1, 3, 24, -24, 36, 152, 255, -9, -11, 37}
SKIPPED = {34}


def _diffs(mutated: Path) -> dict[str, str]:
    """Mutant name -> the lines it changes, read from mutmut's copy of one module (each mutant
    is a function `x_NAME__mutmut_N` beside the original `x_NAME__mutmut_orig`)."""
    text = mutated.read_text()
    lines = text.splitlines()
    functions = {node.name: "\n".join(lines[node.lineno - 1:node.end_lineno or node.lineno])
                 for node in ast.walk(ast.parse(text))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    module = ".".join(mutated.relative_to(MUTANTS).with_suffix("").parts)
    out = {}
    for name, source in functions.items():
        stem, _, number = name.rpartition("__mutmut_")
        if not stem or not number.isdigit():
            continue
        original = functions.get(f"{stem}__mutmut_orig", "").replace(f"{stem}__mutmut_orig",
                                                                     name)
        changed = [line for line in difflib.unified_diff(original.splitlines(),
                                                         source.splitlines(), lineterm="", n=0)
                   if line[:1] in "+-" and line[:3] not in ("+++", "---")]
        out[f"{module}.{name}"] = "\n".join(f"        {line.strip()[:110]}" for line in changed)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min", type=float, default=90.0, help="least score per module (90)")
    parser.add_argument("--survivors", action="store_true", help="list the survivors")
    args = parser.parse_args(argv)
    metas = sorted(MUTANTS.rglob("*.py.meta"))
    if not metas:
        print(f"no mutmut results under {MUTANTS}/: run `mutmut run` first", file=sys.stderr)
        return 1
    low = unchecked = 0
    print(f"{'module':32} {'mutants':>8} {'killed':>7} {'survived':>9} {'no tests':>9} "
          f"{'score':>7}")
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        tally = Counter("killed" if c in KILLED else "skipped" if c in SKIPPED else
                        "survived" if c == 0 else "unchecked" if c is None else
                        "no tests" if c in (5, 33) else "other" for c in codes.values())
        tested = len(codes) - tally["skipped"]
        score = 100.0 * tally["killed"] / tested if tested else 100.0
        module = str(meta.relative_to(MUTANTS))[:-len(".meta")]
        print(f"{module:32} {len(codes):8} {tally['killed']:7} {tally['survived']:9} "
              f"{tally['no tests']:9} {score:6.1f}%")
        low += score < args.min
        unchecked += tally["unchecked"] + tally["other"]
        if args.survivors:
            diffs = _diffs(meta.with_suffix(""))
            for name, code in sorted(codes.items()):
                if code not in KILLED and code not in SKIPPED and code is not None:
                    print(f"    {name}  (exit {code})")
                    print(diffs.get(name, "        (no diff found)"))
    if unchecked:
        print(f"{unchecked} mutants unchecked or of an unknown outcome: is the run complete?")
    return 1 if low or unchecked else 0


if __name__ == "__main__":
    sys.exit(main())

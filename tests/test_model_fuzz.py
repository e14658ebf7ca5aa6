"""Byte-mutated ONNX exports of every target through create_session (+ a run) and validate.

Each batch runs in a subprocess (this file run as a script) with a timeout, so a segfault or a
hang fails the test instead of killing pytest. Every mutant must end as one of:
  - rejected with a typed FlashExportError whose message is one line;
  - loaded, and its run either worked or raised an onnxruntime error (a clean Python exception).
Anything else (an untyped exception at load, a multi-line message, a crash, a hang) is a failure
and names the mutant (target, seed, index) so it can be replayed with `--replay`.

Replay one mutant: python tests/test_model_fuzz.py replay SEED_FILE SEED INDEX
"""

import collections
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from flash_export.core.contract import TARGETS  # every target the contract names

SEED = 20261127
MUTANTS_PER_TARGET = 1000
VALIDATED_PER_TARGET = 200
STRATEGIES = ("bitflip", "overwrite", "truncate", "duplicate")
BATCH_TIMEOUT_S = 240.0
MEMORY_LIMIT = 6 * 1024**3  # address space of a worker: a mutated shape fails as bad_alloc

_ELEM = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
         "tensor(double)": np.float64, "tensor(bool)": np.bool_, "tensor(int64)": np.int64,
         "tensor(int32)": np.int32}


def mutate(data: bytes, seed: int, index: int) -> Tuple[str, bytes]:
    """Mutant `index` of `data`: the strategy cycles with the index; positions come from a seeded
    generator, so (seed, index) replays it exactly."""
    rng = np.random.default_rng([seed, index])
    strategy = STRATEGIES[index % len(STRATEGIES)]
    buf = bytearray(data)
    if strategy == "bitflip":
        for _ in range(int(rng.integers(1, 9))):
            pos = int(rng.integers(len(buf)))
            buf[pos] ^= 1 << int(rng.integers(8))
    elif strategy == "overwrite":
        interesting = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0x08, 0x12, 0x1A)
        for _ in range(int(rng.integers(1, 17))):
            pos = int(rng.integers(len(buf)))
            buf[pos] = (interesting[int(rng.integers(len(interesting)))]
                        if rng.random() < 0.5 else int(rng.integers(256)))
    elif strategy == "truncate":
        buf = buf[:int(rng.integers(len(buf)))]
    else:
        start = int(rng.integers(len(buf)))
        chunk = buf[start:start + int(rng.integers(1, 257))]
        at = int(rng.integers(len(buf) + 1))
        buf[at:at] = chunk * int(rng.integers(1, 4))
    return strategy, bytes(buf)


def _feeds(session: Any) -> Dict[str, np.ndarray]:
    """Small inputs for whatever inputs the (possibly mutated) graph declares."""
    sizes = {"batch": 1, "values": 5, "keys": 5, "queries": 3}
    feeds = {}
    for inp in session.get_inputs():
        dtype = _ELEM.get(inp.type)
        if dtype is None:
            raise TypeError(f"input {inp.name} has type {inp.type}")
        shape = []
        for axis, dim in enumerate(inp.shape):
            if isinstance(dim, int) and 0 <= dim <= 64:
                shape.append(dim)
            elif inp.name == "mask":
                shape.append((1, 1, 3, 5)[axis] if axis < 4 else 1)
            else:
                shape.append(1 if axis == 0 else sizes.get(inp.name, 4) if axis == 1 else 32)
        rng = np.random.default_rng(0)
        feeds[inp.name] = (rng.random(shape) > 0.2 if dtype is np.bool_
                           else rng.standard_normal(shape).astype(dtype))
    return feeds


def _one_line(exc: BaseException) -> bool:
    text = str(exc)
    return bool(text.strip()) and "\n" not in text


def _session_outcome(path: Path) -> str:
    from flash_export.core.errors import FlashExportError
    from flash_export.runtime import create_session

    try:
        session = create_session(path, intra_op_num_threads=1, inter_op_num_threads=1)
    except FlashExportError as exc:
        if not _one_line(exc):
            return f"BAD multi-line {type(exc).__name__}: {str(exc)[:300]!r}"
        return f"rejected {type(exc).__name__}: {_category(str(exc))}"
    except Exception as exc:  # the failure this fuzzer hunts: an untyped error at load
        return f"BAD untyped {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    try:
        session.run(None, _feeds(session))
    except Exception as exc:  # onnxruntime's own run errors are clean: a Python exception
        return f"loaded, run error {type(exc).__name__}"
    return "loaded, ran"


def _category(message: str) -> str:
    for key in ("INVALID_PROTOBUF", "INVALID_GRAPH", "NOT_IMPLEMENTED", "INVALID_ARGUMENT",
                "RUNTIME_EXCEPTION", "NO_SUCHFILE", "external data", "FAIL", "not an ONNX",
                "UnicodeDecodeError", "UTF-8"):
        if key in message:
            return key
    return "other"


def _validate_outcome(path: Path) -> str:
    from flash_export.check.validate import validate
    from flash_export.core.errors import FlashExportError

    try:
        report = validate(path, seq=[1], batch=[1])
    except FlashExportError as exc:
        if not _one_line(exc):
            return f"BAD multi-line {type(exc).__name__}: {str(exc)[:300]!r}"
        return f"rejected {type(exc).__name__}"
    except Exception as exc:  # validate must never leak an untyped error
        return f"BAD untyped {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    for backend in report.backends:
        errors = [backend.load_error] + [c.error for c in backend.cases]
        if any(e is not None and "\n" in e for e in errors):
            return f"BAD multi-line backend error in {backend.name}"
    if any(b.load_error for b in report.backends):
        return "report: backend failed to load"
    return "report: " + ("passed" if report.passed else "failed")


def worker(mode: str, seed_file: str, seed: int, start: int, count: int, out: str) -> None:
    """Run mutants [start, start+count) of `seed_file`; one JSON line per mutant into `out`."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    data = Path(seed_file).read_bytes()
    outcome_of: Callable[[Path], str] = _session_outcome if mode == "session" else \
        _validate_outcome
    with tempfile.TemporaryDirectory(prefix="flash_export_fuzz_") as tmp, \
            open(out, "a", buffering=1) as log:
        path = Path(tmp) / "mutant.onnx"
        for index in range(start, start + count):
            strategy, mutant = mutate(data, seed, index)
            path.write_bytes(mutant)
            log.write(json.dumps({"index": index, "strategy": strategy, "start": True}) + "\n")
            outcome = outcome_of(path)
            log.write(json.dumps({"index": index, "strategy": strategy,
                                  "outcome": outcome}) + "\n")


def run_batch(mode: str, seed_file: Path, start: int, count: int,
              timeout: float = BATCH_TIMEOUT_S) -> Dict[str, Any]:
    """Run one batch in a subprocess; returns outcomes, the mutant in flight at a crash/hang."""
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as log:
        log_path = Path(log.name)
    cmd = [sys.executable, __file__, "worker", mode, str(seed_file), str(SEED), str(start),
           str(count), str(log_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    began = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        rc, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stderr = None, (exc.stderr or b"").decode(errors="replace") if isinstance(
            exc.stderr, bytes) else (exc.stderr or "")
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    log_path.unlink()
    done = {r["index"]: r for r in lines if "outcome" in r}
    in_flight = [r for r in lines if r.get("start") and r["index"] not in done]
    return {"rc": rc, "stderr": stderr[-2000:], "outcomes": list(done.values()),
            "in_flight": in_flight[0] if in_flight else None,
            "seconds": time.monotonic() - began}


def summarize(outcomes: List[Dict[str, Any]]) -> Dict[str, int]:
    """Counts per outcome with the detail after ':' dropped for loads/runs."""
    return dict(collections.Counter(r["outcome"] for r in outcomes))


def replay(seed_file: str, seed: int, index: int) -> None:
    """Write mutant `index` next to `seed_file` and print its session outcome."""
    strategy, mutant = mutate(Path(seed_file).read_bytes(), seed, index)
    out = Path(seed_file).with_name(f"mutant-{seed}-{index}.onnx")
    out.write_bytes(mutant)
    print(strategy, out, _session_outcome(out))


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]),
               sys.argv[7])
    elif sys.argv[1] == "replay":
        replay(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    sys.exit(0)


# --------------------------------------------------------------------------- tests

import pytest  # noqa: E402

_FAILURE_HINT = "replay with: python tests/test_model_fuzz.py replay {file} {seed} {index}"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """The seed corpus: one small export per target (embed 32, heads 4, chunk 8, with mask)."""
    import torch

    from flash_export.export.onnx import export_onnx
    from flash_export.nn.attention import FlashAttention
    from flash_export.runtime import library_path

    folder = tmp_path_factory.mktemp("fuzz_seeds")
    torch.manual_seed(0)
    model = FlashAttention(32, 4, 8).eval()
    out = {}
    for target in TARGETS:
        if target == "custom" and not Path(library_path()).is_file():
            continue
        out[target] = export_onnx(model, folder / f"{target}.onnx", target=target, mask=True)
    return out


def _check_batch(result: Dict[str, Any], target: str, seed_file: Path, expected: int) -> None:
    hint = ""
    if result["in_flight"] is not None:
        hint = _FAILURE_HINT.format(file=seed_file, seed=SEED, index=result["in_flight"]["index"])
    assert result["rc"] is not None, f"{target}: worker hung (timeout); in flight: {hint}"
    assert result["rc"] == 0, (f"{target}: worker died with rc {result['rc']} (negative: a "
                               f"signal); {hint}\n{result['stderr']}")
    bad = [r for r in result["outcomes"] if r["outcome"].startswith("BAD")]
    assert not bad, f"{target}: {len(bad)} unclean outcomes, first {bad[:3]}"
    assert len(result["outcomes"]) == expected, result["stderr"]


def _fuzzed(seeds: Dict[str, Path], target: str, mode: str, count: int) -> Dict[str, Any]:
    """`count` mutants of `target`'s seed file through `mode`, checked for unclean outcomes."""
    if target not in seeds:
        pytest.skip(f"{target}: native library not built")
    result = run_batch(mode, seeds[target], 0, count)
    _check_batch(result, target, seeds[target], count)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS, ids=TARGETS)
def test_mutants_create_session_and_run(seeds: Dict[str, Path], target: str) -> None:
    result = _fuzzed(seeds, target, "session", MUTANTS_PER_TARGET)
    counts = summarize(result["outcomes"])
    print(f"\n{target}: {MUTANTS_PER_TARGET} mutants in {result['seconds']:.1f}s: "
          f"{json.dumps(counts, sort_keys=True)}")
    assert any(k.startswith("rejected") for k in counts), "no mutant was rejected: broken fuzzer"
    assert any(k.startswith("loaded") for k in counts), "no mutant loaded: broken fuzzer"


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS, ids=TARGETS)
def test_mutants_validate(seeds: Dict[str, Path], target: str) -> None:
    result = _fuzzed(seeds, target, "validate", VALIDATED_PER_TARGET)
    print(f"\n{target}: validate on {VALIDATED_PER_TARGET} mutants in {result['seconds']:.1f}s: "
          f"{json.dumps(summarize(result['outcomes']), sort_keys=True)}")


def test_mutation_is_replayable() -> None:
    data = bytes(range(256)) * 4
    for index in range(8):
        assert mutate(data, SEED, index) == mutate(data, SEED, index)
    assert {mutate(data, SEED, i)[0] for i in range(4)} == set(STRATEGIES)

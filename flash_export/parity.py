"""Parity runs: backends on input cases against the float64 reference, under the tolerance rule.

The one case runner behind `flash-export validate`, the check `flash-export onnx` runs after
writing a file, and the tests. A backend is anything that maps (values, keys, queries, mask) to an
output: a PyTorch module or an ONNX file in onnxruntime. Every output is judged by
`tolerance.compare` against `attention.reference_forward` in float64, the baseline being PyTorch's
own plain attention in the output's dtype.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from flash_export.attention import reference_forward
from flash_export.contract import feed_dtype
from flash_export.errors import summary
from flash_export.runtime import ort_session
from flash_export.tolerance import Comparison, compare, max_abs_error

# Called as progress(done, total, label) while cases run.
ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Case:
    """One input configuration of the sweep."""

    batch: int
    seq_q: int
    seq_k: int
    mask: bool

    @property
    def label(self) -> str:
        """Short human-readable form, e.g. `B=3 Lq=7 Lk=9 mask`."""
        return (f"B={self.batch} Lq={self.seq_q} Lk={self.seq_k}"
                + (" mask" if self.mask else ""))


@dataclass
class CaseResult:
    """The errors of one backend on one case, or the error that stopped it."""

    case: Case
    comparison: Optional[Comparison] = None
    error: Optional[str] = None

    @property
    def passed(self) -> bool:
        """True when it ran and met the tolerance."""
        return self.error is None and self.comparison is not None and self.comparison.passed

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready view."""
        return {**dataclasses.asdict(self.case), "passed": self.passed, "error": self.error,
                **(self.comparison.to_dict() if self.comparison else {})}


@dataclass
class BackendResult:
    """One compared implementation (eager, torchscript, onnx:<target>) and its cases."""

    name: str
    source: str  # the file it ran from, or "(in memory)"
    load_error: Optional[str] = None
    cases: List[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when it loaded and every case passed."""
        return self.load_error is None and all(c.passed for c in self.cases)

    @property
    def failures(self) -> List[CaseResult]:
        """The cases that failed."""
        return [c for c in self.cases if not c.passed]

    def worst(self) -> Optional[CaseResult]:
        """The case with the largest max abs error relative to its bound (errors first)."""
        def key(c: CaseResult) -> float:
            if c.comparison is None:
                return math.inf
            return c.comparison.max_abs / max(c.comparison.bound, 1e-30)
        return max(self.cases, key=key, default=None)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready view."""
        return {"name": self.name, "source": self.source, "passed": self.passed,
                "load_error": self.load_error, "cases": [c.to_dict() for c in self.cases]}



# --------------------------------------------------------------------------- cases


def default_seqs(chunk: int) -> List[int]:
    """1, chunk-1, chunk, chunk+1, 3*chunk+5, 1024: chunk tails on both sides, no 0/duplicates."""
    return _unique_positive([1, chunk - 1, chunk, chunk + 1, 3 * chunk + 5, 1024])


def _unique_positive(values: Sequence[int]) -> List[int]:
    out: List[int] = []
    for v in values:
        if v > 0 and v not in out:
            out.append(v)
    return out


def sweep(seqs: Sequence[int], batches: Sequence[int], masks: Sequence[bool]) -> List[Case]:
    """Cases: for each length L, (Lq=L, Lk=L) and (Lq=L, Lk=the next length in the list)."""
    seqs = _unique_positive(seqs)
    pairs: List[Tuple[int, int]] = []
    for i, lq in enumerate(seqs):
        pairs.append((lq, lq))
        lk = seqs[(i + 1) % len(seqs)]
        if lk != lq:
            pairs.append((lq, lk))
    return [Case(b, lq, lk, m) for b in _unique_positive(batches) for lq, lk in pairs
            for m in masks]


def make_inputs(case: Case, embed: int, dtype: torch.dtype,
                seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                    Optional[torch.Tensor]]:
    """Random (values, keys, queries, mask) for one case.

    The mask is bool (B, 1, Lq, Lk) with ~25% of positions blocked and the whole first query row
    of batch 0 blocked: a row that sees no key, which every backend must give as zeros.
    """
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(case.batch, case.seq_k, embed, generator=g).to(dtype)  # (B, Lk, E)
    keys = torch.randn(case.batch, case.seq_k, embed, generator=g).to(dtype)  # (B, Lk, E)
    queries = torch.randn(case.batch, case.seq_q, embed, generator=g).to(dtype)  # (B, Lq, E)
    mask = None
    if case.mask:
        mask = torch.rand(case.batch, 1, case.seq_q, case.seq_k, generator=g) > 0.25
        mask[0, 0, 0, :] = False
    return values, keys, queries, mask


# --------------------------------------------------------------------------- backends

RunFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], np.ndarray]


@dataclass
class Backend:
    """One implementation to compare: `run(v, k, q, mask)` gives its float64 output."""

    name: str
    source: str
    run: Optional[RunFn]
    mask_input: Optional[bool]  # None: both; True: needs a mask; False: takes none
    load_error: Optional[str] = None


class _RunError(Exception):
    """A backend failed on one case; the message is already one readable line."""


def one_line(exc: BaseException) -> str:
    """One line for a backend's failure (`errors.summary`, or a _RunError's own line)."""
    return str(exc) if isinstance(exc, _RunError) else summary(exc)


def torch_backend(name: str, module: nn.Module, source: str) -> Backend:
    """A PyTorch module (eager or TorchScript) already in the dtype it runs in."""
    def run(v: torch.Tensor, k: torch.Tensor, q: torch.Tensor,
            mask: Optional[torch.Tensor]) -> np.ndarray:
        with torch.no_grad():
            out = module(v, k, q, mask) if mask is not None else module(v, k, q)
        return out.double().numpy()

    return Backend(name, source, run, None)


def onnx_backend(name: str, path: Path, provider: str, session: Any = None) -> Backend:
    """An ONNX file in onnxruntime (`runtime.ort_session`, or the `session` given).

    A file that fails to load gives a backend with a `load_error` instead of an exception.
    """
    if session is None:
        try:
            session = ort_session(path, provider=provider)
        except Exception as exc:  # onnxruntime raises its own exception types at load
            return Backend(name, str(path), None, None, load_error=one_line(exc))
    inputs = {i.name: i for i in session.get_inputs()}
    needed = ["values", "keys", "queries"]
    missing = [n for n in needed if n not in inputs]
    if missing:
        return Backend(name, str(path), None, None,
                       load_error=f"graph inputs are {sorted(inputs)}, missing {missing}")
    fixed = {n: i.shape for n, i in inputs.items()
             if any(isinstance(d, int) for d in i.shape[:2])}
    note = f" (the graph fixes input dims {fixed})" if fixed else ""
    output_name = session.get_outputs()[0].name
    takes_mask = "mask" in inputs
    elem = np.dtype(feed_dtype(inputs["queries"].type))

    def run(v: torch.Tensor, k: torch.Tensor, q: torch.Tensor,
            mask: Optional[torch.Tensor]) -> np.ndarray:
        feed = {"values": v.numpy().astype(elem), "keys": k.numpy().astype(elem),
                "queries": q.numpy().astype(elem)}
        if mask is not None:
            feed["mask"] = mask.numpy()
        elif takes_mask:  # an all-True mask must equal no mask
            feed["mask"] = np.ones((q.size(0), 1, q.size(1), k.size(1)), dtype=np.bool_)
        try:
            out = session.run([output_name], feed)[0]
        except Exception as exc:  # onnxruntime's Fail/InvalidArgument/RuntimeException
            raise _RunError(one_line(exc) + note) from exc
        return np.asarray(out, dtype=np.float64)

    return Backend(name, str(path), run, None if takes_mask else False)


def case_seed(index: int) -> int:
    """Input seed of case `index` (distinct from the parameter seed's stream)."""
    return 1_000_003 * (index + 1)



def run_cases(model: nn.Module, backends: Sequence[Backend], cases: Sequence[Case], *,
              embed: int, dtype: str, atol: Optional[float] = None, rtol: Optional[float] = None,
              progress: Optional[ProgressFn] = None) -> Dict[str, BackendResult]:
    """Run every backend on every case against the float64 reference of `model`.

    The baseline of the tolerance rule is PyTorch's own plain attention in `dtype` (the same
    for every caller: `validate`, `flash-export onnx`'s check and the tests).

    Returns:
        One BackendResult per backend, by name, its cases in order.
    """
    report = progress or (lambda done, total, label: None)
    results = {b.name: BackendResult(b.name, b.source, b.load_error) for b in backends}
    for done, case in enumerate(cases):
        report(done, len(cases), case.label)
        _run_case(case, case_seed(done), model, embed, dtype, backends, results, atol, rtol)
    report(len(cases), len(cases), "done")
    return results


def _run_case(case: Case, seed: int, model: nn.Module, embed: int, dtype_name: str,
              backends: Sequence[Backend], results: Dict[str, BackendResult],
              atol: Optional[float], rtol: Optional[float]) -> None:
    tdtype = getattr(torch, dtype_name)
    v, k, q, mask = make_inputs(case, embed, tdtype, seed)
    ref64 = reference_forward(model, v, k, q, mask, dtype=torch.float64)  # (B, Lq, E)
    baseline = reference_forward(model, v, k, q, mask, dtype=tdtype)  # same dtype, plain
    base_err = max_abs_error(baseline.double().numpy(), ref64.numpy())
    ref = ref64.numpy()
    for b in backends:
        if b.run is None or (b.mask_input is not None and b.mask_input != case.mask):
            continue
        result = CaseResult(case)
        try:
            out = b.run(v, k, q, mask)
            if out.shape != ref.shape:
                result.error = f"output shape {list(out.shape)}, expected {list(ref.shape)}"
            else:
                result.comparison = compare(out, ref, baseline_error=base_err, dtype=dtype_name,
                                            atol=atol, rtol=rtol)
        except Exception as exc:  # a backend that cannot run a shape fails that case
            result.error = one_line(exc)
        results[b.name].cases.append(result)

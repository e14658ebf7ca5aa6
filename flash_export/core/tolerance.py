"""The one tolerance rule, shared by the tests and `flash-export validate`.

An output passes when its max absolute error against a float64 reference is at most
max(floor, 2 x the error of PyTorch's own same-dtype computation), and it has no NaN/Inf where the
reference is finite (the rule of flash-attention's and PyTorch's attention tests). The floor is a
backstop where the baseline error happens to be ~0: 1e-5 (float32), 1e-3 (float16), 8e-3
(bfloat16) for outputs of magnitude up to 1, scaled by the output's largest magnitude beyond
that (a model's logits of magnitude 100 have float32 rounding steps of 7.6e-6 each).
"""

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

# The rule in one line, as reports print it.
RULE = "max abs error <= max(floor, 2 x PyTorch's own plain same-dtype error) vs float64"
FLOORS: Dict[str, float] = {
    "float64": 1e-5,
    "float32": 1e-5,
    "float16": 1e-3,
    "bfloat16": 8e-3,
}


def tolerance_bound(baseline_error: float, dtype: str, scale: float = 1.0) -> float:
    """Largest max-abs error allowed for an output of `dtype` whose baseline erred by that much.

    `scale` is the reference's largest finite magnitude: the floor grows with it past 1.
    """
    return max(FLOORS.get(dtype, 1e-5) * max(1.0, scale), 2.0 * baseline_error)


@dataclass(frozen=True)
class Comparison:
    """Errors of one output against its float64 reference, and the verdict."""

    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    p99_rel: float
    worst_index: Tuple[int, ...]
    nonfinite: int  # NaN/Inf in the output where the reference is finite
    bound: float  # the max_abs allowed (or the atol in use)
    passed: bool
    rule: str  # "2x-baseline" or "atol/rtol"
    # The worst element's error as a fraction of what the rule allows it (passes when <= 1;
    # infinite for a NaN, or for any error where nothing is allowed).
    used: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready view."""
        d = asdict(self)
        d["worst_index"] = list(self.worst_index)
        return d


def max_abs_error(actual: Any, reference: Any) -> float:
    """Max absolute difference of two arrays (NaN counts as infinite), 0 when empty."""
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.size == 0:
        return 0.0
    diff = np.abs(a - r)
    diff = np.where(np.isnan(a) & np.isnan(r), 0.0, diff)  # NaN where the reference has NaN: ok
    return float(np.inf) if np.isnan(diff).any() else float(diff.max())


def compare(actual: Any, reference: Any, *, baseline_error: float, dtype: str,
            atol: Optional[float] = None, rtol: Optional[float] = None) -> Comparison:
    """Compare `actual` with a float64 `reference` of the same shape.

    Args:
        actual: the output under test (array-like; torch tensors go through numpy()).
        reference: the float64 reference output, same shape.
        baseline_error: max abs error of PyTorch's own `dtype` computation against `reference`.
        dtype: the dtype the output was computed in ("float32", "float16", ...).
        atol: when `atol` or `rtol` is given, the rule becomes |a - r| <= atol + rtol * |r|
            element-wise instead of the baseline rule.
        rtol: see `atol`.
    """
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape:
        raise ValueError(f"output shape {a.shape} differs from reference shape {r.shape}")
    nonfinite = int(np.count_nonzero(~np.isfinite(a) & np.isfinite(r)))
    if a.size == 0:
        stats = (0.0,) * 6
        worst: Tuple[int, ...] = ()
    else:
        with np.errstate(invalid="ignore"):  # inf - inf, and percentiles over infinities
            diff = np.abs(a - r)
            diff = np.where(np.isnan(diff) & np.isnan(r) & np.isnan(a), 0.0, diff)
            diff = np.where(np.isnan(diff), np.inf, diff)
            rel = diff / np.maximum(np.abs(r), 1e-6)
            worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
            stats = (float(diff.max()), float(diff.mean()), float(np.percentile(diff, 99)),
                     float(rel.max()), float(rel.mean()), float(np.percentile(rel, 99)))
    if atol is not None or rtol is not None:
        at = 0.0 if atol is None else atol
        rt = 0.0 if rtol is None else rtol
        with np.errstate(invalid="ignore"):  # inf - inf is NaN, which fails the rule
            ok = a.size == 0 or bool(np.all(np.abs(a - r) <= at + rt * np.abs(r)))
        bound, rule = at, "atol/rtol"
        used = _fraction(diff, at + rt * np.abs(r)) if a.size else 0.0
    else:
        # A non-finite baseline would make any error pass: fall back to the floor.
        baseline = baseline_error if np.isfinite(baseline_error) else 0.0
        finite = np.abs(r[np.isfinite(r)])
        bound = tolerance_bound(baseline, dtype, float(finite.max()) if finite.size else 1.0)
        ok = stats[0] <= bound
        rule = "2x-baseline"
        used = _fraction(np.array(stats[0]), np.array(bound))
    return Comparison(*stats, worst_index=worst, nonfinite=nonfinite, bound=bound,
                      passed=bool(ok and nonfinite == 0), rule=rule, used=used)


def _fraction(error: Any, allowed: Any) -> float:
    """max(error / allowed), with 0/0 = 0 and x/0 = inf for x > 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(error == 0, 0.0, error / allowed)
    return float(np.max(np.where(np.isnan(ratio), np.inf, ratio)))

"""The one tolerance rule (flash_export.core.tolerance) for any arrays: the bound is max(floor x
max(1, the reference's largest finite magnitude), 2 x baseline); an output passes exactly when
its max error is within it and it holds no NaN or infinity where the reference is finite; every
statistic is what its name says; the atol/rtol rule judges each element."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flash_export.core.tolerance import FLOORS, compare, max_abs_error, tolerance_bound

DTYPES = st.sampled_from(sorted(FLOORS) + ["int8"])
FINITE = st.floats(-1e3, 1e3, allow_nan=False, width=64)
SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5)


@st.composite
def pairs(draw: st.DrawFn, finite: bool = True):
    """(actual, reference) float64 arrays of one shape; actual = reference + small errors."""
    shape = draw(SHAPES)
    reference = draw(hnp.arrays(np.float64, shape, elements=FINITE))
    error = draw(hnp.arrays(np.float64, shape, elements=st.floats(-1e-2, 1e-2, width=64)))
    return reference + error * draw(st.sampled_from([0.0, 1e-6, 1e-3, 1.0])), reference


@given(baseline=st.floats(0, 1, allow_nan=False), dtype=DTYPES,
       scale=st.floats(0, 1e4, allow_nan=False))
def test_the_bound_is_the_scaled_floor_or_twice_the_baseline(baseline, dtype, scale):
    floor = FLOORS.get(dtype, 1e-5)
    bound = tolerance_bound(baseline, dtype, scale)
    assert bound == max(floor * max(1.0, scale), 2.0 * baseline)
    assert tolerance_bound(baseline, dtype) == max(floor, 2.0 * baseline)
    assert tolerance_bound(baseline * 2 + 1e-3, dtype, scale) >= bound
    assert tolerance_bound(baseline, dtype, scale * 2 + 1) >= bound


def test_the_floors_are_the_documented_ones():
    assert FLOORS == {"float64": 1e-5, "float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}
    assert tolerance_bound(0.0, "int8") == 1e-5  # an unknown dtype gets float32's floor


@given(pair=pairs(), baseline=st.sampled_from([0.0, 1e-7, 1e-4, 1e-2]), dtype=DTYPES)
def test_finite_outputs_pass_exactly_when_the_max_error_is_within_the_bound(pair, baseline,
                                                                           dtype):
    actual, reference = pair
    c = compare(actual, reference, baseline_error=baseline, dtype=dtype)
    diff = np.abs(actual - reference)
    assert c.max_abs == diff.max() == max_abs_error(actual, reference)
    assert c.mean_abs == pytest.approx(diff.mean())
    assert c.mean_abs <= c.p99_abs <= c.max_abs or math.isclose(c.p99_abs, c.max_abs)
    rel = diff / np.maximum(np.abs(reference), 1e-6)
    assert c.max_rel == rel.max() and c.mean_rel == pytest.approx(rel.mean())
    assert c.p99_rel <= c.max_rel
    assert c.bound == tolerance_bound(baseline, dtype, float(np.abs(reference).max()))
    assert c.passed == (c.max_abs <= c.bound) and c.nonfinite == 0
    assert c.rule == "2x-baseline"
    assert diff[c.worst_index] == c.max_abs and len(c.worst_index) == actual.ndim
    assert c.used == (0.0 if c.max_abs == 0 else c.max_abs / c.bound)
    assert (c.used <= 1.0) == c.passed


@given(pair=pairs(), where=st.data(), bad=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_a_nan_or_infinity_where_the_reference_is_finite_fails_whatever_the_bound(pair, where,
                                                                                 bad):
    actual, reference = pair
    count = where.draw(st.integers(1, actual.size))
    flat = actual.reshape(-1).copy()
    flat[:count] = bad
    c = compare(flat.reshape(actual.shape), reference, baseline_error=1e9, dtype="float32")
    assert c.nonfinite == count and not c.passed
    assert c.max_abs == math.inf and c.used == math.inf


@given(pair=pairs(), data=st.data())
def test_nan_where_the_reference_has_nan_counts_as_agreement(pair, data):
    actual, reference = pair
    mask = data.draw(hnp.arrays(np.bool_, actual.shape))
    actual, reference = np.where(mask, np.nan, actual), np.where(mask, np.nan, reference)
    c = compare(actual, reference, baseline_error=0.0, dtype="float64")
    finite = ~mask
    expected = float(np.abs(actual - reference)[finite].max()) if finite.any() else 0.0
    assert c.max_abs == expected == max_abs_error(actual, reference)
    assert c.nonfinite == 0
    scale = float(np.abs(reference[finite]).max()) if finite.any() else 1.0
    assert c.bound == tolerance_bound(0.0, "float64", scale)


@given(pair=pairs())
def test_an_infinite_or_nan_baseline_falls_back_to_the_floor(pair):
    actual, reference = pair
    for baseline in (math.inf, math.nan):
        c = compare(actual, reference, baseline_error=baseline, dtype="float16")
        assert c.bound == tolerance_bound(0.0, "float16", float(np.abs(reference).max()))


@given(pair=pairs(), atol=st.sampled_from([None, 0.0, 1e-4, 1e-2]),
       rtol=st.sampled_from([None, 0.0, 1e-3, 0.1]))
@example(pair=(np.array([1.0, 2.0]), np.array([1.0, 2.0])), atol=0.0, rtol=None)
def test_the_atol_rtol_rule_judges_every_element(pair, atol, rtol):
    if atol is None and rtol is None:
        atol = 0.0
    actual, reference = pair
    c = compare(actual, reference, baseline_error=123.0, dtype="float32", atol=atol, rtol=rtol)
    allowed = (atol or 0.0) + (rtol or 0.0) * np.abs(reference)
    diff = np.abs(actual - reference)
    assert c.rule == "atol/rtol" and c.bound == (atol or 0.0)
    assert c.passed == bool(np.all(diff <= allowed))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / allowed)
    assert c.used == float(np.max(ratio))


def test_shapes_must_match():
    with pytest.raises(ValueError, match=r"output shape \(2,\) differs from reference shape"):
        compare(np.zeros(2), np.zeros(3), baseline_error=0.0, dtype="float32")


@pytest.mark.parametrize("rule", [{}, {"atol": 1e-3}], ids=["baseline", "atol"])
def test_empty_outputs_pass_with_zero_errors(rule):
    c = compare(np.zeros((0, 3)), np.zeros((0, 3)), baseline_error=0.0, dtype="float32", **rule)
    assert c.passed and c.max_abs == c.mean_abs == c.p99_abs == c.max_rel == 0.0
    assert c.worst_index == () and c.nonfinite == 0 and c.used == 0.0
    assert max_abs_error(np.zeros(0), np.zeros(0)) == 0.0


@given(pair=pairs())
def test_max_abs_error_is_symmetric_and_zero_only_for_equal_arrays(pair):
    actual, reference = pair
    assert max_abs_error(actual, reference) == max_abs_error(reference, actual)
    assert (max_abs_error(actual, reference) == 0.0) == bool(np.array_equal(actual, reference))
    if actual.size:
        one_nan = actual.copy()
        one_nan.reshape(-1)[0] = np.nan
        assert max_abs_error(one_nan, reference) == math.inf


@given(pair=pairs())
def test_a_comparison_is_json_ready(pair):
    c = compare(*pair, baseline_error=0.0, dtype="float32")
    d = json.loads(json.dumps(c.to_dict()))
    assert d["worst_index"] == list(c.worst_index) and d["passed"] == c.passed
    assert set(d) == {"max_abs", "mean_abs", "p99_abs", "max_rel", "mean_rel", "p99_rel",
                      "worst_index", "nonfinite", "bound", "passed", "rule", "used"}


def test_the_reference_scale_is_its_largest_finite_magnitude():
    reference = np.array([np.nan, 50.0, -200.0, np.nan])
    actual = reference.copy()
    actual[1] += 1e-3
    c = compare(actual, reference, baseline_error=0.0, dtype="float32")
    assert c.bound == pytest.approx(200 * 1e-5) and c.passed and c.max_abs == pytest.approx(1e-3)
    assert c.worst_index == (1,)


def test_the_fraction_used_is_inf_for_any_error_where_nothing_is_allowed_and_warns_nothing():
    """x/0 = inf and 0/0 = 0 element-wise, on purpose: no numpy RuntimeWarning; an infinite
    output where the reference is infinite too (inf/inf) counts as infinite."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = compare([0.0, 1.0], [0.0, 1.0], baseline_error=0.0, dtype="float32", atol=0.0)
        assert exact.passed and exact.used == 0.0
        off = compare([1.0, 0.0], [0.0, 0.0], baseline_error=0.0, dtype="float32", atol=0.0)
        assert not off.passed and off.used == math.inf
        both = compare([math.inf], [math.inf], baseline_error=0.0, dtype="float32", rtol=0.5)
        assert not both.passed and both.used == math.inf


@pytest.mark.parametrize("error, passed", [(1.0, True), (1.5, False)], ids=["at", "past"])
def test_the_verdict_reads_the_worst_element_up_to_its_bound_and_p99_leaves_out_the_top_1pc(
        error, passed):
    """One element of 200 off by `error`; the baseline erred by 0.5, so 1.0 is allowed."""
    reference = np.zeros(200)
    actual = reference.copy()
    actual[7] = error
    c = compare(actual, reference, baseline_error=0.5, dtype="float32")
    assert c.bound == 1.0 and c.max_abs == error and c.passed == passed
    assert c.mean_abs == error / 200 and c.p99_abs == 0.0 and c.p99_rel == 0.0

"""The shared tolerance rule (flash_export/core/tolerance.py), used by the tests and `validate`."""

import numpy as np
import pytest

from flash_export.core.tolerance import compare, max_abs_error, tolerance_bound
from flash_export.nn.spec import ModelSpec


def test_bound_is_twice_the_baseline_with_a_per_dtype_floor():
    assert tolerance_bound(1e-4, "float32") == pytest.approx(2e-4)
    assert tolerance_bound(0.0, "float32") == 1e-5
    assert tolerance_bound(0.0, "float16") == 1e-3


def test_nan_where_the_reference_has_nan_is_agreement_not_an_infinite_error():
    ref = np.array([1.0, np.nan, 3.0])
    assert max_abs_error(np.array([1.0, np.nan, 3.0]), ref) == 0.0
    assert max_abs_error(np.array([1.0, 2.0, 3.0]), ref) == np.inf


def test_a_non_finite_baseline_cannot_make_everything_pass():
    ref = np.array([1.0, np.nan, 3.0])
    bad = ref + 100.0
    c = compare(bad, ref, baseline_error=np.inf, dtype="float32")
    assert not c.passed and c.bound == pytest.approx(3e-5)  # the floor, scaled by |ref| = 3


def test_the_floor_scales_with_the_output_magnitude_past_one():
    """A model's logits of magnitude ~100 have rounding steps of 7.6e-6 each (float32)."""
    small, large = np.array([0.5, -0.25]), np.array([100.0, -40.0])
    assert compare(small, small, baseline_error=0.0, dtype="float32").bound == 1e-5
    c = compare(large + 5e-4, large, baseline_error=0.0, dtype="float32")
    assert c.bound == pytest.approx(1e-3) and c.passed
    assert not compare(large + 2e-3, large, baseline_error=0.0, dtype="float32").passed


def test_nonfinite_output_where_reference_is_finite_fails_even_within_bound():
    c = compare(np.array([1.0, np.inf]), np.array([1.0, 2.0]), baseline_error=1e9,
                dtype="float32")
    assert c.nonfinite == 1 and not c.passed


@pytest.mark.parametrize("text,message", [
    ("[]", "JSON object"),
    ('{"embed": "abc"}', "embed must be an integer"),
    ('{"causal": 1}', "causal must be true or false"),
    ('{"model": 5}', "model must be a string"),
], ids=["list", "embed-str", "causal-int", "model-int"])
def test_tampered_model_spec_metadata_is_a_value_error(text, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec.from_json(text)


def test_atol_rtol_rule_judges_every_element():
    """One element off fails the whole tensor, however many others are exact."""
    ref = np.array([1.0, 2.0, 3.0, 100.0])
    assert compare(ref + 1e-4, ref, baseline_error=0.0, dtype="float32", atol=1e-3).passed
    one_off = ref.copy()
    one_off[2] += 0.5
    c = compare(one_off, ref, baseline_error=0.0, dtype="float32", atol=1e-3, rtol=1e-3)
    assert not c.passed and c.rule == "atol/rtol" and c.worst_index == (2,)
    # rtol scales with |reference|: 0.05 off at 100 passes rtol=1e-3, at 3 it does not.
    big = ref.copy()
    big[3] += 0.05
    assert compare(big, ref, baseline_error=0.0, dtype="float32", atol=0.0, rtol=1e-3).passed
    small = ref.copy()
    small[2] += 0.05
    assert not compare(small, ref, baseline_error=0.0, dtype="float32", rtol=1e-3).passed

"""Shared test helpers: the tolerance rule (the same code `validate` uses) and small builders."""

from typing import Optional

import torch

from flash_export.core.tolerance import Comparison, compare, max_abs_error
from flash_export.nn.attention import reference_attention_core

DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
               torch.bfloat16: "bfloat16"}


def check_against_reference(actual: torch.Tensor, reference64: torch.Tensor,
                            baseline: torch.Tensor) -> Comparison:
    """Apply the STYLE.md rule: `actual` vs float64 `reference64`, with `baseline` being PyTorch's
    own computation in the dtype of `actual`."""
    dtype = DTYPE_NAMES[actual.dtype]
    base_err = max_abs_error(baseline.double().cpu(), reference64.cpu())
    return compare(actual.double().cpu(), reference64.cpu(), baseline_error=base_err, dtype=dtype)


def assert_matches_reference(actual: torch.Tensor, reference64: torch.Tensor,
                             baseline: torch.Tensor) -> None:
    """Assert the STYLE.md tolerance rule, with the numbers in the failure message."""
    c = check_against_reference(actual, reference64, baseline)
    assert c.passed, (f"max abs error {c.max_abs:.3g} > bound {c.bound:.3g} "
                      f"(nonfinite {c.nonfinite}, worst at {c.worst_index})")


def core_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   allowed: Optional[torch.Tensor], causal: bool, scale: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """Plain attention on (B, H, L, D) tensors computed in `dtype`."""
    return reference_attention_core(q.to(dtype), k.to(dtype), v.to(dtype), allowed, causal, scale)

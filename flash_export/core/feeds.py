"""Feeds: named arrays made for an IOSpec, and a request's arrays checked against one."""

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from flash_export.core.io_spec import Dim, IOSpec


def make_feed(io: IOSpec, sizes: Mapping[str, int], seed: int, *,
              padded: bool = True) -> Dict[str, np.ndarray]:
    """Valid inputs for every input of `io` at `sizes` (numpy, in each input's dtype).

    Args:
        io: the model's IOSpec.
        sizes: a size for every dynamic name (see `IOSpec.clamp`).
        seed: seed of the values.
        padded: padding masks hold padded positions (False: every token is real).
    """
    rng = np.random.default_rng(seed)
    feed = {}
    for t in io.inputs:
        shape = io.shape(t, sizes)
        if t.role in ("padding", "key_padding"):
            batch, seq = shape
            lengths = rng.integers(1, seq + 1, size=batch) if padded and seq > 0 else \
                np.full(batch, seq)
            real = np.arange(seq)[None, :] < lengths[:, None]  # (batch, seq)
            feed[t.name] = (real if t.role == "padding" else ~real).astype(t.dtype)
        elif t.role == "causal":  # PyTorch's convention: True / -inf where a query may not look
            above = np.triu(np.ones(shape, dtype=np.bool_), k=1)
            feed[t.name] = above if t.dtype == "bool" else \
                np.where(above, -np.inf, 0.0).astype(t.dtype)
        elif t.role == "attention":
            allowed = rng.random(shape) > 0.25
            if allowed.size and len(shape) >= 2:  # (batch, ..., q, k); a (q, k) mask is one entry
                entries = shape[0] if len(shape) > 2 else 1
                allowed.reshape(entries, -1, *shape[-2:])[0, :, 0, :] = False
            feed[t.name] = allowed
        elif t.dtype in ("int64", "int32"):
            assert t.low is not None and t.high is not None
            feed[t.name] = rng.integers(t.low, t.high, size=shape).astype(t.dtype)
        elif t.dtype == "bool":
            feed[t.name] = rng.random(shape) > 0.5
        else:
            feed[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feed


def check_feed(io: IOSpec, feed: Mapping[str, Any]) -> Dict[str, int]:
    """Check a request against `io`: names, dtypes, ranks, static and shared dims, bounds, values.

    Returns:
        The size of every dynamic name in the request.

    Raises:
        ValueError: one line naming the input, what it expected and what came.
    """
    names = [t.name for t in io.inputs]
    unknown = sorted(set(feed) - set(names))
    missing = [n for n in names if n not in feed]
    if unknown or missing:
        raise ValueError(f"inputs are {names}; missing {missing}, unknown {unknown}")
    sizes: Dict[str, int] = {}
    for t in io.inputs:
        value = np.asarray(feed[t.name])
        if value.dtype.name != t.dtype:
            raise ValueError(f"input {t.name}: dtype {value.dtype.name}, expected {t.dtype}")
        if value.ndim != len(t.dims):
            raise ValueError(f"input {t.name}: rank {value.ndim}, expected {len(t.dims)} "
                             f"{_dims_text(t.dims)}")
        for axis, (want, got) in enumerate(zip(t.dims, value.shape)):
            error = dim_error(t.name, axis, want, got, io.sizes, sizes)
            if error:
                raise ValueError(error)
        if t.low is not None and t.high is not None and value.size and (
                value.min() < t.low or value.max() >= t.high):
            raise ValueError(f"input {t.name}: values must be in [{t.low}, {t.high}), got "
                             f"{value.min()}..{value.max()}")
    return sizes


def dim_error(name: str, axis: int, want: Dim, got: int,
              bounds: Mapping[str, Tuple[int, Optional[int]]], sizes: Dict[str, int]
              ) -> Optional[str]:
    """The one rule for a request's dim: why `got` cannot be dim `axis` of input `name`.

    A static dim must match; a named one must be within its (min, max) `bounds` (max None:
    unbounded) and equal every other input's dim of that name, which `sizes` collects.

    Returns:
        One line naming the input, what it expected and what came; None when it fits.
    """
    if isinstance(want, int):
        return None if got == want else f"input {name}: dim {axis} is {got}, expected {want}"
    low, high = bounds[want]
    if got < low or (high is not None and got > high):
        return (f"input {name}: dim {axis} ({want}) is {got}, expected "
                f"{low}..{'' if high is None else high}")
    if sizes.setdefault(want, got) != got:
        return (f"input {name}: dim {axis} ({want}) is {got}, but another input has {want} = "
                f"{sizes[want]}")
    return None


def _dims_text(dims: Sequence[Dim]) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"

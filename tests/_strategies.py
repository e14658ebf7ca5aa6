"""Hypothesis strategies for the property tests: IOSpecs, feeds, digests.

Sizes stay small (dims of at most a few elements) so every example runs in microseconds.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from hypothesis import strategies as st

from flash_export.core.io_spec import IOSpec, TensorSpec

_FIRST = "abcxyzABZ_"
NAMES = st.builds(lambda a, b: a + b, st.sampled_from(_FIRST),
                  st.text(alphabet=_FIRST + "09", max_size=6))
HEX = "0123456789abcdef"
DIGESTS = st.text(alphabet=HEX, min_size=64, max_size=64)
DATA_DTYPES = ("float32", "float16", "float64", "int64", "int32", "bool")


@st.composite
def size_bounds(draw: st.DrawFn, positive: bool = False) -> Tuple[int, Optional[int]]:
    """(min, max) of a dynamic size: small, max None (unbounded) now and then; min >= 1 when
    `positive`."""
    low = draw(st.integers(1 if positive else 0, 3))
    high = draw(st.one_of(st.none(), st.integers(low, low + 3)))
    return low, high


@st.composite
def io_specs(draw: st.DrawFn, max_inputs: int = 4, shared: bool = False,
             integer: bool = False, static: bool = False) -> IOSpec:
    """A valid IOSpec of data inputs: any dtype, static and dynamic dims, size names shared
    between inputs (and within one), integer inputs with a range of valid values.

    `shared`: some size name is used twice; `integer`: the first input is an integer one with
    no empty dim; `static`: the first input has a static dim.
    """
    size_names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    count = draw(st.integers(1, max_inputs))
    names = draw(st.lists(NAMES, min_size=count + 1, max_size=count + 2, unique=True))
    inputs = []
    for index, name in enumerate(names[:count]):
        dtype = draw(st.sampled_from(("int64", "int32") if integer and index == 0
                                     else DATA_DTYPES))
        dims = list(draw(st.lists(st.one_of(st.sampled_from(size_names), st.integers(0, 3)),
                                  max_size=3)))
        if integer and index == 0:
            dims = [d if isinstance(d, str) else max(d, 1) for d in dims]
        if static and index == 0:
            dims.append(draw(st.integers(1, 3)))
        if shared and index in (0, count - 1):  # twice in one input when it is the only one
            dims[:0] = [size_names[0]] * (2 if count == 1 else 1)
        low = high = None
        if dtype in ("int64", "int32"):
            low = draw(st.integers(-5, 5))
            high = draw(st.integers(low + 1, low + 6))
        inputs.append(TensorSpec(name, dtype, tuple(dims), low, high))
    used = {d for t in inputs for d in t.dims if isinstance(d, str)}
    sizes = {n: draw(size_bounds(positive=integer)) for n in size_names
             if n in used or draw(st.booleans())}
    constants = draw(st.dictionaries(
        st.sampled_from(["is_causal", "scale", "mode", "flag"]),
        st.one_of(st.none(), st.booleans(), st.integers(-9, 9), st.floats(-2, 2),
                  st.text(max_size=5)), max_size=2))
    return IOSpec(tuple(inputs), tuple(names[count:]), sizes, constants)


@st.composite
def sizes_within(draw: st.DrawFn, io: IOSpec) -> Dict[str, int]:
    """A size for every dynamic name of `io`, within its bounds."""
    out = {}
    for name in io.dynamic:
        low, high = io.sizes[name]
        out[name] = draw(st.integers(low, low + 3 if high is None else high))
    return out


def shared_positions(io: IOSpec) -> List[Tuple[str, int, str]]:
    """(input, axis, size name) of every dynamic axis whose size name is used more than once."""
    positions = [(t.name, axis, d) for t in io.inputs for axis, d in enumerate(t.dims)
                 if isinstance(d, str)]
    counts: Dict[str, int] = {}
    for _, _, d in positions:
        counts[d] = counts.get(d, 0) + 1
    return [p for p in positions if counts[p[2]] > 1]

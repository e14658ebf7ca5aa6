"""flash_export.core.io_spec's promises, for any spec: what make_feed generates check_feed accepts
with the sizes it was made at; check_feed refuses every input that breaks one (a name, a dtype, a
rank, a static dim, a size shared by two inputs, a size or a value past a bound, each at and beyond
the boundary); to_json and from_json are inverses, and from_json refuses anything else with a
ValueError or TypeError (what recorded.py turns into ArtifactError)."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from _strategies import io_specs, shared_positions, sizes_within
from hypothesis import assume, example, given
from hypothesis import strategies as st

from flash_export.core.feeds import check_feed, make_feed
from flash_export.core.io_graph import graph_output_dims, io_from_graph, with_graph_outputs
from flash_export.core.io_spec import IOSpec, TensorSpec, attention_io, with_float_dtype


def _array(t: TensorSpec, shape) -> np.ndarray:
    """A valid value of input `t` at `shape` (its lowest valid integer, else zeros)."""
    return np.full(shape, t.low if t.low is not None else 0, dtype=t.dtype)


# ------------------------------------------------------------------ the attention contract


@pytest.fixture
def attention_feed():
    io = attention_io(8, mask=True)
    return io, make_feed(io, {"batch": 2, "q_len": 3, "k_len": 5}, seed=0)


@pytest.mark.parametrize("name, shape, size", [
    ("values", (2, 4, 8), "k_len"),
    ("keys", (2, 6, 8), "k_len"),
    ("queries", (1, 3, 8), "batch"),
    ("mask", (2, 1, 4, 5), "q_len"),
    ("mask", (2, 1, 3, 6), "k_len"),
], ids=["values-shorter", "keys-longer", "queries-other-batch", "mask-other-q-len",
        "mask-other-k-len"])
def test_check_feed_refuses_a_size_two_inputs_share_but_disagree_on(attention_feed, name, shape,
                                                                    size):
    io, feed = attention_feed
    assert check_feed(io, feed) == {"batch": 2, "k_len": 5, "q_len": 3}
    feed[name] = _array(io.input(name), shape)
    with pytest.raises(ValueError, match=rf"\({size}\) is \d+, but another input has {size} = "):
        check_feed(io, feed)


def test_check_feed_refuses_a_size_repeated_within_one_input():
    io = IOSpec((TensorSpec("causal", "bool", ("seq", "seq"), role="causal"),),
                sizes={"seq": (1, 8)})
    assert check_feed(io, {"causal": np.zeros((3, 3), bool)}) == {"seq": 3}
    with pytest.raises(ValueError, match=r"input causal: dim 1 \(seq\) is 4, but another input "
                                         r"has seq = 3"):
        check_feed(io, {"causal": np.zeros((3, 4), bool)})


@pytest.mark.parametrize("size, ok", [(1, False), (2, True), (3, True), (5, True), (6, False)],
                         ids=["below-min", "min", "between", "max", "above-max"])
def test_check_feed_takes_every_size_within_its_bounds_and_none_past(size, ok):
    io = IOSpec((TensorSpec("x", "float32", ("n", 2)),), sizes={"n": (2, 5)})
    feed = {"x": np.zeros((size, 2), np.float32)}
    if ok:
        assert check_feed(io, feed) == {"n": size}
    else:
        with pytest.raises(ValueError, match=rf"input x: dim 0 \(n\) is {size}, expected 2..5"):
            check_feed(io, feed)


@pytest.mark.parametrize("value, ok", [(-1, False), (0, True), (9, True), (10, False)],
                         ids=["below-low", "low", "last-valid", "high"])
def test_check_feed_takes_integer_values_in_low_to_high_exclusive(value, ok):
    io = IOSpec((TensorSpec("ids", "int64", ("batch", 3), low=0, high=10),),
                sizes={"batch": (1, None)})
    feed = {"ids": np.array([[0, 5, value]], np.int64)}
    if ok:
        assert check_feed(io, feed) == {"batch": 1}
    else:
        with pytest.raises(ValueError, match=r"input ids: values must be in \[0, 10\)"):
            check_feed(io, feed)


def test_check_feed_with_no_upper_bound_takes_any_size():
    io = IOSpec((TensorSpec("x", "float32", ("n",)),), sizes={"n": (0, None)})
    assert check_feed(io, {"x": np.zeros(1000, np.float32)}) == {"n": 1000}
    assert check_feed(io, {"x": np.zeros(0, np.float32)}) == {"n": 0}


def test_a_size_below_a_min_with_no_max_is_refused_naming_an_open_range():
    io = IOSpec((TensorSpec("x", "float32", ("n",)),), sizes={"n": (2, None)})
    with pytest.raises(ValueError, match=r"^input x: dim 0 \(n\) is 1, expected 2\.\.$"):
        check_feed(io, {"x": np.zeros(1, np.float32)})


# ------------------------------------------------------------------ properties


@given(io=io_specs())
def test_to_json_and_from_json_are_inverses(io):
    text = io.to_json()
    again = IOSpec.from_json(text)
    assert again == io
    assert again.to_json() == text
    assert json.loads(text)["inputs"][0]["name"] == io.inputs[0].name


@given(data=st.data(), io=io_specs(), seed=st.integers(0, 2**32 - 1))
def test_check_feed_accepts_what_make_feed_makes_at_any_sizes_within_bounds(data, io, seed):
    sizes = data.draw(sizes_within(io))
    feed = make_feed(io, sizes, seed)
    assert list(feed) == [t.name for t in io.inputs]
    for t in io.inputs:
        assert feed[t.name].dtype.name == t.dtype
        assert feed[t.name].shape == io.shape(t, sizes)
    assert check_feed(io, feed) == sizes


@given(data=st.data(), io=io_specs(shared=True))
def test_check_feed_refuses_any_shared_size_that_disagrees(data, io):
    shared = shared_positions(io)
    sizes = data.draw(sizes_within(io))
    name, axis, size_name = data.draw(st.sampled_from(shared))
    low, high = io.sizes[size_name]
    others = [s for s in range(low, (low + 4 if high is None else high) + 1)
              if s != sizes[size_name]]
    assume(others)  # a size pinned to one value cannot disagree within its bounds
    other = data.draw(st.sampled_from(others))
    feed = {t.name: _array(t, io.shape(t, sizes)) for t in io.inputs}
    t = io.input(name)
    shape = list(io.shape(t, sizes))
    shape[axis] = other
    feed[name] = _array(t, tuple(shape))
    with pytest.raises(ValueError, match=rf"\({size_name}\) is \d+, but another input has "
                                         rf"{size_name} = \d+"):
        check_feed(io, feed)


@given(data=st.data(), io=io_specs(shared=True))
def test_check_feed_refuses_a_size_just_past_either_bound(data, io):
    size_name = data.draw(st.sampled_from(io.dynamic))
    low, high = io.sizes[size_name]
    pasts = [s for s in (low - 1, None if high is None else high + 1) if s is not None and s >= 0]
    assume(pasts)  # [0, unbounded): nothing is past it
    past = data.draw(st.sampled_from(pasts))
    sizes = {**data.draw(sizes_within(io)), size_name: past}
    feed = {u.name: _array(u, io.shape(u, sizes)) for u in io.inputs}
    with pytest.raises(ValueError, match=rf"\({size_name}\) is {past}, expected {low}\.\."):
        check_feed(io, feed)


@given(data=st.data(), io=io_specs(static=True))
def test_check_feed_refuses_a_static_dim_off_by_one(data, io):
    static = [(t, axis, d) for t in io.inputs for axis, d in enumerate(t.dims)
              if isinstance(d, int)]
    sizes = data.draw(sizes_within(io))
    t, axis, want = data.draw(st.sampled_from(static))
    got = data.draw(st.sampled_from([s for s in (want - 1, want + 1) if s >= 0]))
    feed = {u.name: _array(u, io.shape(u, sizes)) for u in io.inputs}
    shape = list(io.shape(t, sizes))
    shape[axis] = got
    feed[t.name] = _array(t, tuple(shape))
    with pytest.raises(ValueError, match=rf"input {t.name}: dim {axis} is {got}, expected {want}"):
        check_feed(io, feed)


@given(data=st.data(), io=io_specs(integer=True))
def test_check_feed_refuses_integer_values_just_outside_their_range(data, io):
    sizes = data.draw(sizes_within(io))
    nonempty = [t for t in io.inputs
                if t.low is not None and np.prod(io.shape(t, sizes), dtype=np.int64) > 0]
    t = data.draw(st.sampled_from(nonempty))
    assert t.low is not None and t.high is not None
    feed = {u.name: _array(u, io.shape(u, sizes)) for u in io.inputs}
    feed[t.name] = np.full(io.shape(t, sizes), t.high - 1, dtype=t.dtype)
    check_feed(io, feed)  # the largest valid value
    bad = data.draw(st.sampled_from([t.low - 1, t.high]))
    value = feed[t.name].copy()
    value.flat[data.draw(st.integers(0, value.size - 1))] = bad
    feed[t.name] = value
    with pytest.raises(ValueError, match=rf"input {t.name}: values must be in \[{t.low}, "
                                         rf"{t.high}\)"):
        check_feed(io, feed)


@given(data=st.data(), io=io_specs())
def test_check_feed_refuses_wrong_names_dtypes_and_ranks(data, io):
    sizes = data.draw(sizes_within(io))
    feed = {t.name: _array(t, io.shape(t, sizes)) for t in io.inputs}
    t = data.draw(st.sampled_from(io.inputs))
    kind = data.draw(st.sampled_from(["missing", "unknown", "dtype", "rank"]))
    if kind == "missing":
        del feed[t.name]
        message = rf"missing \['{t.name}'\]"
    elif kind == "unknown":
        feed["not_an_input_" + t.name] = feed[t.name]
        message = rf"unknown \['not_an_input_{t.name}'\]"
    elif kind == "dtype":
        other = data.draw(st.sampled_from([d for d in ("float32", "float16", "float64", "int64",
                                                       "int32", "bool", "uint8")
                                           if d != t.dtype]))
        feed[t.name] = feed[t.name].astype(other)
        message = rf"input {t.name}: dtype {other}, expected {t.dtype}"
    else:
        feed[t.name] = feed[t.name][..., None]
        dims = re.escape(", ".join(str(d) for d in t.dims))
        message = rf"input {t.name}: rank {len(t.dims) + 1}, expected {len(t.dims)} \({dims}\)$"
    with pytest.raises(ValueError, match=message):
        check_feed(io, feed)


@pytest.mark.parametrize("shape", [(2,), (2, 3, 1)], ids=["rank-1", "rank-3"])
def test_check_feed_refuses_another_rank_naming_the_dims_it_expected(shape):
    io = IOSpec((TensorSpec("x", "float32", ("n", 3)),), sizes={"n": (1, None)})
    with pytest.raises(ValueError, match=rf"^input x: rank {len(shape)}, expected 2 \(n, 3\)$"):
        check_feed(io, {"x": np.zeros(shape, np.float32)})


@given(io=io_specs(), sizes=st.dictionaries(st.sampled_from(["a", "b", "n", "seq"]),
                                            st.integers(-3, 50)))
def test_clamp_moves_every_size_into_its_bounds_and_keeps_those_inside(io, sizes):
    clamped = io.clamp(sizes)
    assert set(clamped) == set(io.dynamic)
    for name, value in clamped.items():
        low, high = io.sizes[name]
        assert low <= value and (high is None or value <= high)
        if name in sizes and sizes[name] >= low and (high is None or sizes[name] <= high):
            assert value == sizes[name]
    assert io.clamp(clamped) == clamped


def test_clamp_keeps_a_size_within_bounds_and_moves_one_outside_to_the_nearest_bound():
    io = IOSpec((TensorSpec("x", "float32", ("n", "m", "k")),),
                sizes={"n": (2, 5), "m": (1, None), "k": (0, 3)})
    assert io.clamp({"n": 4, "m": 9, "k": 3}) == {"n": 4, "m": 9, "k": 3}
    assert io.clamp({"n": 9, "m": 0, "k": -1, "other": 7}) == {"n": 5, "m": 1, "k": 0}
    assert io.clamp({}) == {"n": 2, "m": 1, "k": 0}


def test_input_names_the_missing_input_in_its_key_error():
    with pytest.raises(KeyError, match="^'nope'$"):
        attention_io(4).input("nope")


@given(data=st.data(), io=io_specs())
def test_fixed_pins_the_named_sizes_and_keeps_the_others(data, io):
    sizes = data.draw(sizes_within(io))
    pinned = io.fixed(sizes)
    for name in io.sizes:
        if name in sizes:
            assert pinned.sizes[name] == (sizes[name], sizes[name]) and pinned.is_static(name)
        else:
            assert pinned.sizes[name] == io.sizes[name]
    assert check_feed(pinned, make_feed(pinned, sizes, 0)) == sizes


@given(io=io_specs(), dtype=st.sampled_from(["float16", "float64"]))
def test_with_float_dtype_changes_only_floating_inputs(io, dtype):
    changed = with_float_dtype(io, dtype)
    for before, after in zip(io.inputs, changed.inputs):
        assert after.dtype == (dtype if before.dtype.startswith("float") else before.dtype)
        assert dataclasses.replace(after, dtype=before.dtype) == before



# ------------------------------------------------------------------ every refusal, word for word
# Each check of TensorSpec, IOSpec and from_json refuses with one line naming what is wrong and
# what came (cut to a few dozen characters where the value may be long).


def _x(**fields) -> TensorSpec:
    return TensorSpec(**{"name": "x", "dtype": "float32", "dims": (), **fields})


_DTYPES = "('float32', 'float16', 'float64', 'int64', 'int32', 'bool')"
_ROLES = "('data', 'padding', 'key_padding', 'attention', 'causal')"
_NAMED = "a size in [0, 2**31), an input size's name, or None"


@pytest.mark.parametrize("make, message", [
    (lambda: _x(name="1x"),
     "input name '1x' is not an identifier (or dotted ones) of <= 64 characters"),
    (lambda: _x(name="x" * 65),
     f"input name '{'x' * 65}' is not an identifier (or dotted ones) of <= 64 characters"),
    (lambda: _x(name=7), "input name 7 is not an identifier (or dotted ones) of <= 64 characters"),
    (lambda: _x(dtype="int8"), f"input x: dtype 'int8' is not one of {_DTYPES}"),
    (lambda: _x(role="mask"), f"input x: role 'mask' is not one of {_ROLES}"),
    (lambda: _x(dims=[1]), "input x: dims must be a tuple of at most 8"),
    (lambda: _x(dims=(1,) * 9), "input x: dims must be a tuple of at most 8"),
    (lambda: _x(dims=(-1,)), "input x: dim -1 is neither a size in [0, 2**31) nor a size name"),
    (lambda: _x(dims=(2**31,)), "input x: dim 2147483648 is neither a size in [0, 2**31) nor a "
                                "size name"),
    (lambda: _x(dims=(True,)), "input x: dim True is neither a size in [0, 2**31) nor a size "
                               "name"),
    (lambda: _x(dims=("1n",)), "input x: dim '1n' is neither a size in [0, 2**31) nor a size "
                               "name"),
    (lambda: _x(low=0), "input x: low is for integer inputs only, and must be an int, got 0"),
    (lambda: _x(dtype="int64", low=0, high=2**62 + 1),
     f"input x: high is for integer inputs only, and must be an int, got {2**62 + 1}"),
    (lambda: _x(dtype="int32", low=True, high=2),
     "input x: low is for integer inputs only, and must be an int, got True"),
    (lambda: _x(dtype="int32", low=0, high=1.5),
     "input x: high is for integer inputs only, and must be an int, got 1.5"),
    (lambda: _x(dtype="int64"), "input x: an integer input needs low < high (the range of valid "
                                "values), got [None, None)"),
    (lambda: _x(dtype="int64", low=3), "input x: an integer input needs low < high (the range "
                                       "of valid values), got [3, None)"),
    (lambda: _x(dtype="int64", high=3), "input x: an integer input needs low < high (the range "
                                        "of valid values), got [None, 3)"),
    (lambda: _x(dtype="int64", low=3, high=3), "input x: an integer input needs low < high (the "
                                               "range of valid values), got [3, 3)"),
    (lambda: _x(role="padding", dims=("b", "s")),
     "input x: a padding mask is bool (a padding mask also 0/1 integers, low 0, high 2), "
     "got float32"),
    (lambda: _x(role="attention", dtype="int64", low=0, high=2),
     "input x: a attention mask is bool (a padding mask also 0/1 integers, low 0, "
     "high 2), got int64"),
    (lambda: _x(role="causal", dims=("a", "b")), "input x: a causal mask is (seq, seq), got "
                                                 "('a', 'b')"),
    (lambda: _x(role="causal", dims=("s",)), "input x: a causal mask is (seq, seq), got ('s',)"),
    (lambda: _x(role="key_padding", dtype="bool", dims=("s",)),
     "input x: a padding mask is (batch, seq), got ('s',)"),
    (lambda: _x(role="padding", dtype="bool", dims=("b", "s", "t")),
     "input x: a padding mask is (batch, seq), got ('b', 's', 't')"),
], ids=lambda v: "" if callable(v) else v[:40])
def test_a_tensor_spec_refuses_each_bad_field_naming_it(make, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make()


_N = TensorSpec("x", "float32", ("n",))


@pytest.mark.parametrize("make, message", [
    (lambda: IOSpec(()), "a model takes 1 to 64 inputs, got 0"),
    (lambda: IOSpec(tuple(TensorSpec(f"x{i}", "float32", ()) for i in range(65))),
     "a model takes 1 to 64 inputs, got 65"),
    (lambda: IOSpec((_x(), _x())), "input and output names must be distinct, got ['x', 'x', "
                                   "'output']"),
    (lambda: IOSpec((_x(),), ("x",)), "input and output names must be distinct, got ['x', 'x']"),
    (lambda: IOSpec((_x(),), ()), "output names must be identifiers, got ()"),
    (lambda: IOSpec((_x(),), ("1y",)), "output names must be identifiers, got ('1y',)"),
    (lambda: IOSpec((_x(),), (3,)), "output names must be identifiers, got (3,)"),
    (lambda: IOSpec((_x(),), constants={"1c": 1}),
     "constant '1c': a distinct identifier with a scalar value, got 1"),
    (lambda: IOSpec((_x(),), constants={"x": 1}),
     "constant 'x': a distinct identifier with a scalar value, got 1"),
    (lambda: IOSpec((_x(),), constants={"c" * 50: [1]}),
     f"constant '{'c' * 40}': a distinct identifier with a scalar value, got [1]"),
    (lambda: IOSpec((_N,)), "size names ['n'] have no bounds in sizes"),
    (lambda: IOSpec((_N,), sizes={"n": (-1, None)}),
     "size 'n': bounds must be (min >= 0, max >= min or None), got (-1, None)"),
    (lambda: IOSpec((_N,), sizes={"n": (2, 1)}),
     "size 'n': bounds must be (min >= 0, max >= min or None), got (2, 1)"),
    (lambda: IOSpec((_N,), sizes={"n": (1.0, None)}),
     "size 'n': bounds must be (min >= 0, max >= min or None), got (1.0, None)"),
    (lambda: IOSpec((_N,), sizes={"n": (1, 2.0)}),
     "size 'n': bounds must be (min >= 0, max >= min or None), got (1, 2.0)"),
    (lambda: IOSpec((_N,), sizes={"n": (1, None), "1m": (1, None)}),
     "size '1m': bounds must be (min >= 0, max >= min or None), got (1, None)"),
    (lambda: IOSpec((_N,), sizes={"n": (1, None)}, output_dims={"z" * 70: ()}),
     f"output_dims names '{'z' * 64}', which is not an output of ['output']"),
    (lambda: IOSpec((_N,), sizes={"n": (1, None)}, output_dims={"output": ("m",)}),
     f"output output: dims must be at most 8 of: {_NAMED}; got ('m',)"),
    (lambda: IOSpec((_N,), sizes={"n": (1, None)}, output_dims={"output": ["n"]}),
     f"output output: dims must be at most 8 of: {_NAMED}; got ['n']"),
    (lambda: IOSpec((_N,), sizes={"n": (1, None)}, output_dims={"output": (None,) * 9}),
     f"output output: dims must be at most 8 of: {_NAMED}; got {str((None,) * 9)[:80]}"),
    (lambda: IOSpec((_N,), sizes={"n": (1, None)}, output_dims={"output": ("a" * 40,) * 3}),
     f"output output: dims must be at most 8 of: {_NAMED}; got {str(('a' * 40,) * 3)[:80]}"),
    (lambda: IOSpec((_N,), sizes={"n": (1, None)}, output_dims={"output": (True,)}),
     f"output output: dims must be at most 8 of: {_NAMED}; got (True,)"),
    (lambda: IOSpec((_N,), sizes={"n": (1, None)}, output_dims={"output": (-1,)}),
     f"output output: dims must be at most 8 of: {_NAMED}; got (-1,)"),
    (lambda: IOSpec((_N,), sizes={"n": (1, None)}, output_dims={"output": (2**31,)}),
     f"output output: dims must be at most 8 of: {_NAMED}; got (2147483648,)"),
    (lambda: IOSpec((_N,), sizes={"n": (1, None), "m": (1, None)}, batch="m"),
     "batch 'm' is not a size any input uses"),
    (lambda: IOSpec((_N,), sizes={"n": (1, None)}, batch="b" * 70),
     f"batch '{'b' * 64}' is not a size any input uses"),
], ids=lambda v: "" if callable(v) else v[:40])
def test_an_io_spec_refuses_each_bad_field_naming_it(make, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make()


def test_every_limit_is_inclusive():
    """64 inputs, 8 dims, a static dim of 0 or 2**31 - 1, integer bounds of +-2**62."""
    IOSpec(tuple(TensorSpec(f"x{i}", "float32", ()) for i in range(64)))
    big = 2**31 - 1
    t = TensorSpec("x", "float32", (0, big, 1, 1, 1, 1, 1, 1))
    IOSpec((t,), output_dims={"output": (0, big, None, None, None, None, None, None)})
    TensorSpec("ids", "int64", (), low=-2**62, high=2**62)


def test_to_json_is_the_same_text_for_equal_specs_whatever_their_dicts_order():
    a = IOSpec((TensorSpec("x", "float32", ("n", "m")),), ("y", "z"),
               {"n": (1, None), "m": (0, 4)}, {"c": 1, "b": 2},
               {"y": ("n",), "z": ("m",)}, "n")
    b = IOSpec(a.inputs, a.outputs, {"m": (0, 4), "n": (1, None)}, {"b": 2, "c": 1},
               {"z": ("m",), "y": ("n",)}, "n")
    assert a == b and a.to_json() == b.to_json()


def test_from_json_reads_the_dims_of_64_outputs():
    io = IOSpec((_N,), tuple(f"o{i}" for i in range(64)), {"n": (1, None)},
                output_dims={f"o{i}": ("n",) for i in range(64)})
    assert IOSpec.from_json(io.to_json()) == io


_KEYS = "batch, constants, inputs, output_dims, outputs, sizes"
_TYPES = ("io spec inputs and outputs must be lists, sizes, constants and output_dims objects, "
          "batch a size name or null")
_VALID = {"inputs": [{"name": "x", "dtype": "float32", "dims": ["n"]}], "outputs": ["y"],
          "sizes": {"n": [1, None]}}


@pytest.mark.parametrize("data, message", [
    ([], f"an io spec is a JSON object with {_KEYS}"),
    ({**_VALID, "other": 1}, f"an io spec is a JSON object with {_KEYS}"),
    ({**_VALID, "inputs": {}}, _TYPES),
    ({**_VALID, "outputs": "y"}, _TYPES),
    ({**_VALID, "sizes": []}, _TYPES),
    ({**_VALID, "constants": []}, _TYPES),
    ({**_VALID, "output_dims": []}, _TYPES),
    ({**_VALID, "batch": 1}, _TYPES),
    ({**_VALID, "output_dims": {"o" * 50: 1}}, f"output '{'o' * 40}': dims must be a list"),
    ({**_VALID, "inputs": [["x" * 80]]}, f"io spec input {str(['x' * 80])[:60]} is malformed"),
    ({**_VALID, "inputs": [{"name": "x", "dtype": "float32", "dims": ["n"], "other": 1}]},
     "io spec input {'name': 'x', 'dtype': 'float32', 'dims': ['n'], 'other': 1} is malformed"),
    ({**_VALID, "inputs": [{"name": "x", "dtype": "float32", "dims": "n"}]},
     "io spec input {'name': 'x', 'dtype': 'float32', 'dims': 'n'} is malformed"),
    ({**_VALID, "sizes": {"s" * 50: [1]}}, f"size '{'s' * 40}': bounds must be [min, max]"),
    ({**_VALID, "sizes": {"n": 1}}, "size 'n': bounds must be [min, max]"),
    ({**_VALID, "sizes": {"n": [1, 2, 3]}}, "size 'n': bounds must be [min, max]"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None)
def test_from_json_refuses_each_bad_field_naming_it(data, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        IOSpec.from_json(json.dumps(data))


def test_from_json_reads_what_to_json_leaves_out_as_its_defaults():
    """A spec written before constants, output dims and the batch existed."""
    io = IOSpec.from_json(json.dumps(_VALID))
    assert io == IOSpec((_N,), ("y",), {"n": (1, None)})
    assert io.constants == {} and io.output_dims == {} and io.batch is None
    full = IOSpec.from_json(json.dumps({**_VALID, "constants": {"c": 1},
                                        "output_dims": {"y": ["n"]}, "batch": "n"}))
    assert full == IOSpec((_N,), ("y",), {"n": (1, None)}, {"c": 1}, {"y": ("n",)}, "n")


def test_from_json_reads_at_most_one_input_and_output_past_the_limit():
    """65 inputs are refused as too many, whatever follows (the rest is never built)."""
    inputs = [{"name": f"x{i}", "dtype": "float32", "dims": []} for i in range(65)]
    with pytest.raises(ValueError, match=r"^a model takes 1 to 64 inputs, got 65$"):
        IOSpec.from_json(json.dumps({**_VALID, "inputs": inputs + [{"bad": 1}] * 1000}))
    dims = {f"o{i}": [] for i in range(65)}  # then "zz", which is never read
    with pytest.raises(ValueError, match=r"^output_dims names 'o1', which is not an output"):
        IOSpec.from_json(json.dumps({**_VALID, "outputs": ["o0"],
                                     "output_dims": {**dims, "zz": 1}}))

# Text that is not an io spec: JSON of the wrong shape, fields of the wrong type, names and bounds
# out of range.
_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(),
                               st.text(max_size=6)),
                     lambda inner: st.one_of(st.lists(inner, max_size=4),
                                             st.dictionaries(st.text(max_size=8), inner,
                                                             max_size=4)), max_leaves=12)


@st.composite
def damaged_specs(draw: st.DrawFn) -> str:
    """A valid spec's JSON with one field replaced by any JSON value."""
    data = json.loads(draw(io_specs()).to_json())
    where = draw(st.sampled_from(["top", "input", "size", "output"]))
    value = draw(_JSON)
    if where == "top":
        data[draw(st.sampled_from(["inputs", "outputs", "sizes", "constants", "extra"]))] = value
    elif where == "input":
        data["inputs"][0][draw(st.sampled_from(["name", "dtype", "dims", "low", "high", "role",
                                                "other"]))] = value
    elif where == "size" and data["sizes"]:
        data["sizes"][next(iter(data["sizes"]))] = value
    else:
        data["outputs"] = [value]
    return json.dumps(data)


@given(text=st.one_of(damaged_specs(), _JSON.map(json.dumps), st.text(max_size=30)))
@example(text='{"inputs": [{"name": "x", "dtype": "float32", "dims": []}], "outputs": [[1]], '
              '"sizes": {}}').via("an unhashable output name")
@example(text='{"inputs": [{"name": "x", "dtype": "float32", "dims": ["n"]}], "outputs": ["y"], '
              '"sizes": {"n": [0, 1.5]}}').via("a float bound")
def test_from_json_accepts_only_valid_specs_and_refuses_the_rest_with_a_value_or_type_error(
        text):
    try:
        io = IOSpec.from_json(text)
    except (ValueError, TypeError):
        return
    assert IOSpec.from_json(io.to_json()) == io


# Found by the property above: json.loads raises RecursionError past ~1000 levels, which
# from_json let through (recorded_io catches ValueError and TypeError only, so a .onnx whose
# io_spec metadata nested deeply crashed `validate` and `serve` with a traceback).
@pytest.mark.parametrize("depth", [10_000, 100_000], ids=["deep", "deeper"])
def test_from_json_refuses_deeply_nested_text_with_a_value_error(depth):
    with pytest.raises(ValueError, match=r"^an io spec's JSON is nested too deeply$"):
        IOSpec.from_json("[" * depth + "]" * depth)


@given(inputs=st.lists(st.tuples(
    st.from_regex(r"[a-z]{1,6}", fullmatch=True),
    st.sampled_from(["float32", "float16", "int64", "bool"]),
    st.lists(st.one_of(st.integers(-2, 4), st.none(), st.sampled_from(["batch", "q_len", "?"])),
             max_size=4)), min_size=1, max_size=4, unique_by=lambda i: i[0]))
def test_io_from_graph_describes_any_graph_inputs_and_accepts_its_own_feeds(inputs):
    io = io_from_graph(inputs)
    assert [t.name for t in io.inputs] == [name for name, _, _ in inputs]
    for t, (_, dtype, dims) in zip(io.inputs, inputs):
        assert t.dtype == dtype and len(t.dims) == len(dims)
        for want, got in zip(dims, t.dims):
            if isinstance(want, int) and want >= 0:
                assert got == want
            else:
                assert isinstance(got, str)
    sizes = io.clamp({})
    assert check_feed(io, make_feed(io, sizes, 0)) == sizes


def test_io_from_graph_gives_every_unnamed_dim_a_size_name_of_its_own():
    """Even where "NAME_dimAXIS" is cut to 64 characters or another dim has that name: two dims
    of one size name must be equal, and nothing says these are."""
    long, other = "t" * 60, "t" * 60 + "u"  # long_dim0 cut to 64 is "ttt..._dim": other's too
    io = io_from_graph([("y", "float32", [None, None]),  # a later input names a dim y_dim0
                        ("x", "float32", ["batch", "q_len", "k_len", 0, 3, "y_dim0"]),
                        (long, "float16", [None, -1, True, "1st"]),
                        (other, "float16", [None])])
    y, x, t, u = io.inputs
    assert x.dims == ("batch", "q_len", "k_len", 0, 3, "y_dim0")
    assert t.dims == ("t" * 59 + "_dim0", "t" * 59 + "_dim1", "t" * 59 + "_dim2",
                      "t" * 59 + "_dim3")
    assert u.dims == ("t" * 57 + "_dim0_1",) and y.dims == ("y_dim0_1", "y_dim1")
    names = [d for spec in io.inputs for d in spec.dims if isinstance(d, str)]
    assert len(set(names)) == len(names) and all(len(n) <= 64 for n in names)
    # an empty query or key sequence is valid attention; every other size holds at least one
    assert io.sizes == {**{n: (1, None) for n in names}, "q_len": (0, None), "k_len": (0, None)}
    assert io.outputs == ("output",) and io.batch is None and io.output_dims == {}
    sizes = {n: 1 + i for i, n in enumerate(io.dynamic)}  # every size its own value
    assert check_feed(io, make_feed(io, sizes, 0)) == sizes


@pytest.mark.parametrize("dtype, rank, role, bounds", [
    ("bool", 4, "attention", (None, None)), ("bool", 2, "padding", (None, None)),
    ("bool", 3, "data", (None, None)), ("bool", 5, "data", (None, None)),
    ("bool", 1, "data", (None, None)), ("float32", 4, "data", (None, None)),
    ("float32", 2, "data", (None, None)), ("int64", 2, "data", (0, 1)),
    ("int32", 4, "data", (0, 1)),
], ids=["bool-4", "bool-2", "bool-3", "bool-5", "bool-1", "float-4", "float-2", "int64", "int32"])
def test_io_from_graph_takes_rank_4_and_2_bool_inputs_as_masks_and_integers_as_zeros(
        dtype, rank, role, bounds):
    t = io_from_graph([("m", dtype, [1] * rank)]).inputs[0]
    assert (t.role, t.low, t.high) == (role, *bounds)


@pytest.mark.parametrize("dtype, shown", [(None, "unknown"), ("", "unknown"),
                                          ("uint8", "uint8"), ("string", "string")])
def test_io_from_graph_refuses_a_dtype_an_io_spec_cannot_describe(dtype, shown):
    with pytest.raises(ValueError, match=rf"^input ok: element type {shown}$"):
        io_from_graph([("ok", dtype, [1])])


@pytest.mark.parametrize("mask", [False, True], ids=["plain", "mask"])
def test_attention_io_is_values_keys_queries_and_an_optional_attention_mask(mask):
    io = attention_io(12, mask=mask)
    expected = [TensorSpec("values", "float32", ("batch", "k_len", 12)),
                TensorSpec("keys", "float32", ("batch", "k_len", 12)),
                TensorSpec("queries", "float32", ("batch", "q_len", 12))]
    if mask:
        expected.append(TensorSpec("mask", "bool", ("batch", 1, "q_len", "k_len"),
                                   role="attention"))
    assert list(io.inputs) == expected and io.outputs == ("output",)
    assert io.sizes == {"batch": (1, None), "q_len": (0, None), "k_len": (0, None)}
    # output (B, Lq, E), and rows of the batch are independent requests
    assert io.output_dims == {"output": ("batch", "q_len", 12)} and io.batch == "batch"
    assert attention_io(12) == attention_io(12, mask=False)
    assert io.has_input("queries") and io.has_input("mask") == mask and not io.has_input("x")
    with pytest.raises(KeyError):
        io.input("x")


# ------------------------------------------------------------------ make_feed, role by role
# flash_export.core.feeds.make_feed's promises for every role (the io_spec module docstring):
# padding masks are (batch, seq) rows of real tokens then padding, each row a length from 1 to seq
# (key_padding the same with True = padding), every token real with padded=False; a causal mask is
# True or -inf exactly above the diagonal; an attention mask blocks about a quarter of its entries
# and every key of the first query row of the first batch entry; integers cover [low, high); the
# same seed gives the same feed and another seed another one. Sizes are large enough that the fixed
# seed meets every case (a row of each length, each integer of the range), small enough to run in
# milliseconds.


def _one(t: TensorSpec, sizes: dict, **kwargs) -> np.ndarray:
    io = IOSpec((t,), sizes={n: (0, None) for n in t.dims if isinstance(n, str)})
    return make_feed(io, sizes, 3, **kwargs)[t.name]


def _real_lengths(real: np.ndarray) -> np.ndarray:
    """(batch,) the number of real tokens per row, checking each row is real tokens, then
    padding."""
    lengths = real.sum(axis=1)
    assert np.array_equal(real, np.arange(real.shape[1])[None, :] < lengths[:, None])
    return lengths


_PADDING = TensorSpec("mask", "bool", ("batch", "seq"), role="padding")
_KEY_PADDING = TensorSpec("mask", "bool", ("batch", "seq"), role="key_padding")


@pytest.mark.parametrize("seq", [1, 2, 3, 5])
def test_a_padding_mask_holds_rows_of_every_length_from_1_to_seq_equally_often(seq):
    mask = _one(_PADDING, {"batch": 3000, "seq": seq})
    assert mask.dtype == np.bool_ and mask.shape == (3000, seq)
    counts = np.bincount(_real_lengths(mask), minlength=seq + 1)
    assert counts[0] == 0 and counts.sum() == 3000  # never a row without a real token
    assert np.all(np.abs(counts[1:] / 3000 - 1 / seq) < 0.05), counts


def test_a_key_padding_mask_is_a_padding_mask_with_true_for_padding():
    sizes = {"batch": 200, "seq": 4}
    key_padding = _one(_KEY_PADDING, sizes)
    assert key_padding.dtype == np.bool_
    assert np.array_equal(~key_padding, _one(_PADDING, sizes))  # the same rows, same seed
    lengths = _real_lengths(~key_padding)
    assert lengths.min() == 1 and lengths.max() == 4


@pytest.mark.parametrize("t", [_PADDING, _KEY_PADDING], ids=["padding", "key_padding"])
def test_unpadded_masks_make_every_token_real_and_padded_is_the_default(t):
    sizes = {"batch": 50, "seq": 4}
    real = np.full((50, 4), t.role == "padding")
    assert np.array_equal(_one(t, sizes, padded=False), real)
    assert not np.array_equal(_one(t, sizes), real)  # padded unless asked not to be
    assert np.array_equal(_one(t, sizes), _one(t, sizes, padded=True))


@pytest.mark.parametrize("t", [_PADDING, _KEY_PADDING], ids=["padding", "key_padding"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_a_padding_mask_of_an_empty_sequence_is_empty(t, padded):
    assert _one(t, {"batch": 3, "seq": 0}, padded=padded).shape == (3, 0)


@pytest.mark.parametrize("dtype, masked, open_", [("bool", True, False),
                                                  ("float32", -np.inf, 0.0),
                                                  ("float16", -np.inf, 0.0)])
def test_a_causal_mask_blocks_exactly_the_keys_after_each_query(dtype, masked, open_):
    t = TensorSpec("causal", dtype, ("seq", "seq"), role="causal")
    mask = _one(t, {"seq": 5})
    assert mask.dtype.name == dtype and mask.shape == (5, 5)
    for query in range(5):
        for key in range(5):
            assert mask[query, key] == (masked if key > query else open_), (query, key)


@pytest.mark.parametrize("dims, sizes", [
    (("batch", "heads", "q", "k"), {"batch": 3, "heads": 2, "q": 4, "k": 40}),
    (("batch", "q", "k"), {"batch": 3, "q": 4, "k": 40}),
], ids=["rank-4", "rank-3"])
def test_an_attention_mask_blocks_a_quarter_and_all_of_the_first_batch_entrys_first_row(
        dims, sizes):
    t = TensorSpec("mask", "bool", dims, role="attention")
    mask = _one(t, sizes)
    assert mask.dtype == np.bool_ and mask.shape == tuple(sizes[d] for d in dims)
    rows = mask.reshape(sizes["batch"], -1, sizes["q"], sizes["k"])  # (batch, heads, q, k)
    assert not rows[0, :, 0, :].any()  # the first query row of the first entry sees no key
    seeing = rows.any(axis=-1)  # (batch, heads, q): the rows that see some key
    seeing[0, :, 0] = True
    assert seeing.all()  # only that row sees nothing
    blocked = 1 - mask.mean()
    assert 0.2 < blocked < 0.35, blocked


# Found writing the test above: a (q, k) attention mask (PyTorch's attn_mask) made make_feed
# raise numpy's "cannot reshape", so validate and bench crashed on a spec that declares one.
@pytest.mark.parametrize("dims", [("q", "k"), ("k",)], ids=["rank-2", "rank-1"])
def test_an_attention_mask_without_a_batch_dim_is_made_too(dims):
    sizes = {"q": 4, "k": 40}
    mask = _one(TensorSpec("mask", "bool", dims, role="attention"), sizes)
    assert mask.dtype == np.bool_ and mask.shape == tuple(sizes[d] for d in dims)
    if len(dims) == 2:  # the one entry's first query row sees no key, every other row some
        assert not mask[0].any() and mask[1:].any(axis=-1).all()


@pytest.mark.parametrize("dtype", ["int64", "int32"])
def test_integer_inputs_take_every_value_from_low_to_high_exclusive(dtype):
    t = TensorSpec("ids", dtype, ("n",), low=-3, high=4)
    ids = _one(t, {"n": 500})
    assert ids.dtype.name == dtype and ids.shape == (500,)
    assert sorted(set(ids.tolist())) == list(range(-3, 4))


def test_bool_data_inputs_hold_both_values_about_equally_often():
    flags = _one(TensorSpec("flags", "bool", ("n",)), {"n": 1000})
    assert flags.dtype == np.bool_ and 0.4 < flags.mean() < 0.6


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_float_data_inputs_are_standard_normal_values(dtype):
    x = _one(TensorSpec("x", dtype, ("n", 4)), {"n": 1000})
    assert x.dtype.name == dtype and x.shape == (1000, 4)
    assert abs(float(x.mean())) < 0.1 and 0.9 < float(x.std()) < 1.1


def test_the_same_seed_gives_the_same_feed_and_another_seed_another():
    io = IOSpec((TensorSpec("x", "float32", ("n",)), _PADDING,
                 TensorSpec("ids", "int64", ("n",), low=0, high=1000)),
                sizes={"n": (1, None), "batch": (1, None), "seq": (1, None)})
    sizes = {"n": 20, "batch": 20, "seq": 8}
    first, again, other = (make_feed(io, sizes, seed) for seed in (7, 7, 8))
    for name in first:
        assert np.array_equal(first[name], again[name])
        assert not np.array_equal(first[name], other[name]), name


# ------------------------------------------------------------------ a spec against its graph

# x (batch, seq, heads) with heads pinned to 4; y (batch, seq, heads, 8); z (batch, unknown)
_SPEC = IOSpec((TensorSpec("x", "float32", ("batch", "seq", "heads")),
                TensorSpec("ids", "int64", ("batch", 2), 0, 5)),
               ("y", "z"), {"batch": (1, None), "seq": (1, 9), "heads": (4, 4)},
               output_dims={"y": ("batch", "seq", "heads", 8), "z": ("batch", None)},
               batch="batch")
# The graph the exporter writes for it: dynamic sizes named after the spec's, a pinned one as
# its int.
_INPUTS = [("x", "float32", ["batch", "seq", 4]), ("ids", "int64", ["batch", 2])]
_OUTPUTS = [("y", "float32", ["batch", "seq", 4, 8]), ("z", "int64", ["batch", "z_dim1"])]


def _with(dims: list, axis: int, value) -> list:
    return [value if i == axis else d for i, d in enumerate(dims)]


def test_a_graph_that_agrees_with_its_spec_returns_the_spec_unchanged():
    assert with_graph_outputs(_SPEC, _INPUTS, _OUTPUTS) == _SPEC
    # the pinned size by its name, an unknown dim anything at all
    named = [("y", "float32", ["batch", "seq", "heads", 8]), ("z", "int64", ["batch", 3])]
    assert with_graph_outputs(_SPEC, _INPUTS, named) == _SPEC


@pytest.mark.parametrize("axis, value", [
    (0, 3), (0, "seq"), (0, "other"), (0, None),
    (1, 9), (1, 1), (1, "batch"), (1, None),
    (2, 5), (2, 0), (2, "seq"), (2, None),
    (3, 7), (3, 0), (3, "seq"), (3, None),
], ids=["batch-as-int", "batch-as-seq", "batch-as-unknown-name", "batch-as-none",
        "seq-as-int", "seq-as-its-min", "seq-as-batch", "seq-as-none",
        "pinned-as-other-int", "pinned-as-zero", "pinned-as-seq", "pinned-as-none",
        "static-as-other-int", "static-as-zero", "static-as-name", "static-as-none"])
def test_every_output_dim_the_graph_contradicts_is_refused_naming_tensor_and_axis(axis, value):
    outputs = [("y", "float32", _with(_OUTPUTS[0][2], axis, value)), _OUTPUTS[1]]
    want = _SPEC.output_dims["y"][axis]
    shown = r"\?" if value is None else value
    with pytest.raises(ValueError, match=rf"^the io_spec says output y axis {axis} is {want}, "
                                         rf"the graph's is {shown}$"):
        with_graph_outputs(_SPEC, _INPUTS, outputs)


def test_an_output_the_graph_lacks_or_of_another_rank_is_refused():
    with pytest.raises(ValueError, match=r"^the io_spec gives dims for output 'y', the graph "
                                         r"has no such output$"):
        with_graph_outputs(_SPEC, _INPUTS, _OUTPUTS[1:])
    for dims in (["batch", "seq", 4], ["batch", "seq", 4, 8, 1]):
        with pytest.raises(ValueError, match=rf"^the io_spec says output y has rank 4, the "
                                             rf"graph's has rank {len(dims)}$"):
            with_graph_outputs(_SPEC, _INPUTS, [("y", "float32", dims), _OUTPUTS[1]])


@pytest.mark.parametrize("inputs, name", [
    ([("x", "float32", ["rows", "seq", 4]), _INPUTS[1]], "x"),
    ([("x", "float32", [2, "seq", 4]), _INPUTS[1]], "x"),
    ([("x", "float32", [None, "seq", 4]), _INPUTS[1]], "x"),
    ([_INPUTS[0], ("ids", "int64", ["seq", 2])], "ids"),
    ([_INPUTS[0], ("ids", "int64", [])], "ids"),
    ([_INPUTS[0]], "ids"),
], ids=["renamed", "static", "unknown", "other-size", "rank-0", "missing-input"])
def test_a_declared_dynamic_batch_missing_from_an_input_axis_is_refused(inputs, name):
    with pytest.raises(ValueError, match=rf"^the io_spec puts the batch \(batch\) on input "
                                         rf"{name} axis 0, where the graph has no such dim$"):
        with_graph_outputs(_SPEC, inputs, _OUTPUTS)


def test_only_a_declared_dynamic_batch_is_looked_for_on_the_inputs():
    renamed = [("x", "float32", ["rows", "s", 4]), ("ids", "int64", [2])]
    undeclared = dataclasses.replace(_SPEC, batch=None)
    assert with_graph_outputs(undeclared, renamed, _OUTPUTS) == undeclared
    pinned = dataclasses.replace(_SPEC, sizes={**_SPEC.sizes, "batch": (2, 2)})
    assert with_graph_outputs(pinned, renamed, _OUTPUTS) == pinned
    # other sizes are the graph's business (a renamed seq is no batch)
    assert with_graph_outputs(_SPEC, [("x", "float32", ["batch", "s", 4]), _INPUTS[1]],
                              _OUTPUTS) == _SPEC


def test_a_spec_without_output_dims_gets_the_graphs():
    bare = dataclasses.replace(_SPEC, output_dims={})
    outputs = [("y", "float32", ["batch", "seq", 4, "y_dim3"]), ("z", "int64", [3, None]),
               ("w", "bool", [])]
    filled = with_graph_outputs(bare, _INPUTS, outputs)
    assert filled == dataclasses.replace(bare, outputs=("y", "z", "w"), output_dims={
        "y": ("batch", "seq", 4, None), "z": (3, None), "w": ()})
    assert with_graph_outputs(bare, _INPUTS, []) == bare  # a graph that describes none


_GRAPH_DIMS = st.lists(st.one_of(st.integers(-2, 9), st.booleans(), st.none(),
                                 st.sampled_from(["batch", "seq", "heads", "other", "y_dim0"])),
                       max_size=5)


@given(dims=_GRAPH_DIMS)
@example(dims=[0, -1, True, False, None])
@example(dims=["batch", "seq", "heads", "other", 9])
def test_graph_output_dims_keeps_static_sizes_and_the_specs_size_names_only(dims):
    got = graph_output_dims(_SPEC, dims)
    assert isinstance(got, tuple) and len(got) == len(dims)
    for d, kept in zip(dims, got):
        static = isinstance(d, int) and not isinstance(d, bool) and d >= 0
        assert kept == (d if static or d in ("batch", "seq", "heads") else None), (d, kept)



@pytest.mark.parametrize("dtype", ["int64", "int32"])
def test_a_padding_mask_may_be_0_1_integers_as_tokenizers_give_it(dtype):
    """Hugging Face's attention_mask is int64 0/1: a padding input of that dtype with [0, 2)
    feeds 0/1 rows each with a real first token, and passes its own request check."""
    mask = TensorSpec("attention_mask", dtype, ("batch", "seq"), low=0, high=2, role="padding")
    io = IOSpec((TensorSpec("input_ids", "int64", ("batch", "seq"), low=0, high=7), mask),
                sizes={"batch": (1, None), "seq": (1, None)})
    feed = make_feed(io, {"batch": 64, "seq": 9}, seed=5)
    values = feed["attention_mask"]
    assert values.dtype == np.dtype(dtype) and set(np.unique(values)) == {0, 1}
    assert (values[:, 0] == 1).all() and (np.diff(values, axis=1) <= 0).all()  # right padding
    assert check_feed(io, feed) == {"batch": 64, "seq": 9}
    assert (make_feed(io, {"batch": 3, "seq": 9}, seed=5, padded=False)["attention_mask"]
            == 1).all()
    for low, high in ((0, 3), (1, 2)):
        with pytest.raises(ValueError, match="a padding mask is bool"):
            TensorSpec("m", dtype, ("batch", "seq"), low=low, high=high, role="padding")
    with pytest.raises(ValueError, match="a attention mask is bool"):
        TensorSpec("m", dtype, ("batch", "seq"), low=0, high=2, role="attention")

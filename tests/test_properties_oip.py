"""The Open Inference Protocol's request checks and wire encoding (flash_export.serving.protocol,
oip_wire), for any graph and any request: a valid request, JSON (flat or nested) or binary, parses
to exactly the arrays sent; a body of exactly the limit is read and one byte more is a 413; every
size is taken at its limit and refused past it; anything malformed is a RequestError (400 or 413),
never another exception; tensors survive the wire both ways.

The graphs are real onnxruntime sessions of one Identity node, built per IOSpec with onnx.helper
(no torch, no export): parse checks requests against the IOSpec and the limits before anything
runs.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
import warnings
from typing import Optional

import numpy as np
import onnxruntime
import pytest
from _strategies import io_specs, sizes_within
from hypothesis import example, given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from flash_export.core.errors import RequestError
from flash_export.core.feeds import check_feed, make_feed
from flash_export.core.io_spec import IOSpec, TensorSpec, attention_io
from flash_export.serving.artifact import model_name
from flash_export.serving.limits import Limits
from flash_export.serving.protocol import (
    DATATYPES,
    HEADER_LENGTH,
    InferRequest,
    OIPModel,
)
from flash_export.serving.wire import (
    byte_count,
    error_body,
    from_binary,
    from_json_data,
    json_array,
    json_body,
    json_data,
    load_json,
    to_binary,
)

_ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
               "float64": TensorProto.DOUBLE, "int64": TensorProto.INT64,
               "int32": TensorProto.INT32, "bool": TensorProto.BOOL}


@functools.lru_cache(maxsize=64)
def _session(io_json: str):
    """An onnxruntime session whose graph takes the inputs of the IOSpec `io_json` and returns
    its first input through an Identity node, as its first output."""
    io = IOSpec.from_json(io_json)
    inputs = [helper.make_tensor_value_info(t.name, _ONNX_TYPES[t.dtype], list(t.dims))
              for t in io.inputs]
    first = io.inputs[0]
    output = helper.make_tensor_value_info(io.outputs[0], _ONNX_TYPES[first.dtype],
                                           list(first.dims))
    graph = helper.make_graph([helper.make_node("Identity", [first.name], [io.outputs[0]])],
                              "identity", inputs, [output])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])
    return onnxruntime.InferenceSession(model.SerializeToString(),
                                        providers=["CPUExecutionProvider"])


def _model(io: IOSpec, limits: Optional[Limits] = None) -> OIPModel:
    """An OIPModel of `io` (its first output only) over a real session of an Identity graph."""
    limits = Limits() if limits is None else limits
    io = IOSpec(io.inputs, io.outputs[:1], io.sizes, io.constants)
    return OIPModel("m", _session(io.to_json()), io, limits)


def _tensor(name: str, value: np.ndarray, how: str) -> dict:
    tensor = {"name": name, "datatype": DATATYPES[value.dtype.name], "shape": list(value.shape)}
    if how == "binary":
        tensor["parameters"] = {"binary_data_size": value.nbytes}
    else:
        # nested: as many list levels as dims (a scalar's data is still a list of one)
        nested = how == "nested" and value.ndim > 0
        tensor["data"] = value.tolist() if nested else value.ravel().tolist()
    return tensor


def encode(feed: dict, how: dict, *, pad: int = 0, **fields) -> tuple[bytes, str | None]:
    """A request body for `feed` (input -> "flat", "nested" or "binary") and its
    Inference-Header-Content-Length (None without binary inputs); `pad` spaces end the JSON."""
    header = json.dumps({"inputs": [_tensor(n, v, how[n]) for n, v in feed.items()],
                         **fields}).encode() + b" " * pad
    blobs = b"".join(to_binary(v) for n, v in feed.items() if how[n] == "binary")
    binary = any(h == "binary" for h in how.values())
    return header + blobs, (str(len(header)) if binary else None)


ENCODINGS = st.sampled_from(["flat", "nested", "binary"])


@st.composite
def requests(draw: st.DrawFn, io: IOSpec | None = None):
    """(io, feed, encoding per input) of a valid request at sizes within the bounds."""
    io = io if io is not None else draw(io_specs())
    sizes = draw(sizes_within(io))
    feed = make_feed(io, sizes, draw(st.integers(0, 2**32 - 1)))
    return io, feed, {name: draw(ENCODINGS) for name in feed}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


# ------------------------------------------------------------------ valid requests


@given(request=requests(), request_id=st.one_of(st.none(), st.text(max_size=8)),
       binary_out=st.booleans())
def test_any_valid_request_parses_to_exactly_the_arrays_sent(request, request_id, binary_out):
    io, feed, how = request
    model = _model(io)
    fields = {} if request_id is None else {"id": request_id}
    fields["parameters"] = {"binary_data_output": binary_out}
    body, length = encode(feed, how, **fields)
    parsed = model.parse(body, length)
    assert isinstance(parsed, InferRequest) and parsed.id == request_id
    assert list(parsed.feed) == list(feed)
    assert all(_same(parsed.feed[n], feed[n]) for n in feed)
    assert parsed.outputs == (io.outputs[0],)
    assert parsed.binary == {io.outputs[0]: binary_out}


@given(request=requests(), binary=st.booleans())
def test_the_answer_carries_what_the_graph_computed_in_the_encoding_asked(request, binary):
    io, feed, how = request
    model = _model(io)
    body, length = encode(feed, how, id="r7",
                          outputs=[{"name": io.outputs[0], "parameters": {"binary_data": binary}}])
    parsed = model.parse(body, length)
    results = model.run(parsed.feed)
    expected = feed[io.inputs[0].name]
    assert _same(results[io.outputs[0]], expected)
    headers, answer = model.answer(parsed, results)
    if binary:
        split = int(headers[HEADER_LENGTH])
        reply = json.loads(answer[:split])
        (tensor,) = reply["outputs"]
        assert tensor["parameters"] == {"binary_data_size": expected.nbytes}
        got = from_binary("o", expected.dtype.name, tuple(tensor["shape"]),
                          memoryview(answer)[split:])
        assert headers["content-type"] == "application/octet-stream"
    else:
        reply = json.loads(answer)
        (tensor,) = reply["outputs"]
        got = np.asarray(tensor["data"], dtype=expected.dtype).reshape(tensor["shape"])
        assert headers == {"content-type": "application/json"}
    assert reply["id"] == "r7" and reply["model_name"] == "m" and reply["model_version"] == "1"
    assert tensor["name"] == io.outputs[0] and tensor["datatype"] == DATATYPES[expected.dtype.name]
    assert _same(got, expected)


# Found by the property above: answer() reported a rank-0 output with shape [1]
# (np.ascontiguousarray returns at least one dim), so a client reshaping by the reply's shape got
# a (1,) array for a scalar.
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_scalar_output_is_answered_with_an_empty_shape(binary):
    io = IOSpec((TensorSpec("x", "float32", ()),), ("y",))
    model = _model(io)
    body, length = encode({"x": np.array(0.5, np.float32)}, {"x": "flat"},
                          outputs=[{"name": "y", "parameters": {"binary_data": binary}}])
    parsed = model.parse(body, length)
    headers, answer = model.answer(parsed, model.run(parsed.feed))
    reply = json.loads(answer[:int(headers.get(HEADER_LENGTH, len(answer)))])
    assert reply["outputs"][0]["shape"] == []


# ------------------------------------------------------------------ the body limit


LIMIT = 2048
_ATTENTION = attention_io(4, mask=True)


@pytest.fixture(scope="module")
def attention_model():
    return _model(_ATTENTION, Limits(max_body_bytes=LIMIT, max_batch=3, max_length=7))


@pytest.fixture(scope="module")
def roomy_model():
    """The same limits on sizes, and room for any body they allow."""
    return _model(_ATTENTION, Limits(max_body_bytes=1 << 20, max_batch=3, max_length=7))


def _padded_to(size: int, binary: bool) -> tuple[bytes, str | None]:
    feed = make_feed(_ATTENTION, {"batch": 1, "q_len": 2, "k_len": 3}, 0)
    how = {n: "binary" if binary else "flat" for n in feed}
    body, _ = encode(feed, how)
    assert len(body) <= size
    return encode(feed, how, pad=size - len(body))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("extra, status", [(-1, None), (0, None), (1, 413), (1000, 413)],
                         ids=["below", "at", "one-past", "far-past"])
def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_a_413(attention_model, binary,
                                                                        extra, status):
    body, length = _padded_to(LIMIT + extra, binary)
    assert len(body) == LIMIT + extra
    if status is None:
        attention_model.parse(body, length)
        return
    with pytest.raises(RequestError, match=rf"the body is {LIMIT + extra} bytes, over the limit "
                                           rf"of {LIMIT}") as caught:
        attention_model.parse(body, length)
    assert caught.value.status == status


@given(limit=st.integers(1024, 4096), extra=st.integers(-2, 2), binary=st.booleans())
def test_any_body_limit_is_inclusive(limit, extra, binary):
    model = _model(_ATTENTION, Limits(max_body_bytes=limit))
    body, length = _padded_to(limit + extra, binary)
    if extra <= 0:
        assert set(model.parse(body, length).feed) == {t.name for t in _ATTENTION.inputs}
    else:
        with pytest.raises(RequestError) as caught:
            model.parse(body, length)
        assert caught.value.status == 413


@pytest.mark.parametrize("size, value, ok", [
    ("batch", 3, True), ("batch", 4, False), ("k_len", 7, True), ("k_len", 8, False),
    ("q_len", 0, True), ("q_len", 7, True), ("q_len", 8, False)],
    ids=["batch-at", "batch-past", "length-at", "length-past", "q-empty", "q-at", "q-past"])
def test_every_size_is_taken_at_its_limit_and_refused_past_it(roomy_model, size, value, ok):
    sizes = {"batch": 1, "q_len": 2, "k_len": 3, size: value}
    feed = make_feed(_ATTENTION, sizes, 0)
    body, length = encode(feed, {n: "flat" for n in feed})
    if ok:
        assert check_feed(_ATTENTION, roomy_model.parse(body, length).feed) == sizes
        return
    cap = 3 if size == "batch" else 7
    with pytest.raises(RequestError, match=rf"\({size}\) is {value}, expected \d+\.\.{cap}$"):
        roomy_model.parse(body, length)


@pytest.mark.parametrize("field", ["max_body_bytes", "max_response_bytes"])
@pytest.mark.parametrize("size, ok", [(1023, False), (1024, True)], ids=["1023", "1024"])
def test_limits_take_a_body_and_response_limit_of_1024_bytes_and_up(field, size, ok):
    if ok:
        assert getattr(Limits(**{field: size}), field) == size
    else:
        with pytest.raises(ValueError, match="limits must be positive"):
            Limits(**{field: size})


@pytest.mark.parametrize("field, value", [("max_batch", 0), ("max_length", 0),
                                          ("body_timeout_s", 0.0), ("body_timeout_s", math.nan)])
def test_limits_refuse_bounds_that_allow_nothing(field, value):
    with pytest.raises(ValueError, match="limits must be positive"):
        Limits(**{field: value})
    Limits(**{field: 1})


def test_a_graph_with_a_bounded_size_keeps_the_tighter_of_its_bound_and_the_limit():
    io = IOSpec((TensorSpec("x", "float32", ("batch", "seq")),),
                sizes={"batch": (2, 5), "seq": (1, 3)})
    model = _model(io, Limits(max_batch=4, max_length=9))
    assert model.sizes == {"batch": (2, 4), "seq": (1, 3)}
    rows = IOSpec((TensorSpec("x", "float32", ("rows", "seq")),),
                  sizes={"rows": (1, None), "seq": (1, None)}, batch="rows")  # declared batch
    model = OIPModel("m", _session(rows.to_json()), rows, Limits(max_batch=4, max_length=9))
    assert model.sizes == {"rows": (1, 4), "seq": (1, 9)}


_TWICE = IOSpec((TensorSpec("x", "float32", ("n", 16)),), ("y", "z"), {"n": (1, None)},
                output_dims={"y": ("n", 16), "z": ("n", 16)})


@functools.lru_cache(maxsize=1)
def _twice_session():
    """A session of _TWICE: x (n, 16) float32 returned twice, as y and z."""
    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 16]) for n in "xyz"]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], [n]) for n in "yz"], "twice",
                              value[:1], value[1:])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])
    return onnxruntime.InferenceSession(model.SerializeToString(),
                                        providers=["CPUExecutionProvider"])


# An output takes at most 25 bytes a float as JSON, 4 as binary: (16, 16) is 6,400 or 1,024.
@pytest.mark.parametrize("rows, outputs, limit, words", [
    (16, {"y": False, "z": True}, 7424, None),
    (16, {"y": False, "z": True}, 7423, "0.0 MiB (y [16, 16]: 256 values as JSON; z [16, 16]: "
                                        "256 values as binary), over the response limit of "
                                        "0.0 MiB"),
    (16, {"z": False}, 6400, None),
    (16, {"z": False}, 6399, "0.0 MiB (z [16, 16]: 256 values as JSON), over the response "
                             "limit of 0.0 MiB"),
    (16, {"y": True, "z": True}, 2048, None),
    (16, {"y": True, "z": True}, 2047, "0.0 MiB (y [16, 16]: 256 values as binary; z [16, 16]: "
                                       "256 values as binary), over the response limit of "
                                       "0.0 MiB"),
    (12800, {"y": False}, 3 * 2**19, "4.9 MiB (y [12800, 16]: 204,800 values as JSON), over "
                                     "the response limit of 1.5 MiB"),
    (12800, {"y": True}, 3 * 2**19, None),  # 800 KiB
], ids=["both-at", "both-past", "z-alone-at", "z-alone-past", "binary-at", "binary-past",
        "mib-json-past", "mib-binary-within"])
def test_the_response_limit_counts_every_requested_output_and_is_inclusive(rows, outputs, limit,
                                                                          words):
    """Checked from the spec's output dims before anything runs; binary outputs are smaller."""
    model = OIPModel("m", _twice_session(), _TWICE,
                     Limits(max_length=1 << 14, max_response_bytes=limit))
    asked = [{"name": n, "parameters": {"binary_data": b}} for n, b in outputs.items()]
    body, length = encode({"x": np.ones((rows, 16), np.float32)}, {"x": "binary"},
                          outputs=asked)
    if words is None:
        assert model.parse(body, length).binary == outputs
        return
    hint = "" if all(outputs.values()) else "; binary outputs are smaller"
    with pytest.raises(RequestError, match=f"^{re.escape(f'the answer would take up to {words}')}"
                                           f": ask for fewer rows or tokens{hint}$") as caught:
        model.parse(body, length)
    assert caught.value.status == 413


# ------------------------------------------------------------------ malformed requests


_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 10),
                               st.floats(allow_nan=False, allow_infinity=False),
                               st.text(max_size=4)),
                     lambda inner: st.one_of(st.lists(inner, max_size=3),
                                             st.dictionaries(st.text(max_size=6), inner,
                                                             max_size=3)), max_leaves=8)
_FIELDS = ["name", "shape", "datatype", "parameters", "data", "binary_data_size", "other"]


@st.composite
def damaged_requests(draw: st.DrawFn):
    """(model, body, header length) of a valid request with one thing changed."""
    io, feed, how = draw(requests(io=_ATTENTION))
    body, length = encode(feed, how)
    split = len(body) if length is None else int(length)
    header = json.loads(body[:split])
    blobs = body[split:]
    kind = draw(st.sampled_from(["field", "top", "drop", "header_length", "blob", "outputs"]))
    if kind == "field":
        tensor = draw(st.sampled_from(header["inputs"]))
        field = draw(st.sampled_from(_FIELDS))
        value = draw(_JSON)
        if field == "binary_data_size":
            tensor.setdefault("parameters", {})[field] = value
        else:
            tensor[field] = value
    elif kind == "top":
        header[draw(st.sampled_from(["id", "parameters", "inputs", "outputs", "other"]))] = \
            draw(_JSON)
    elif kind == "drop":
        del header["inputs"][draw(st.integers(0, len(header["inputs"]) - 1))]
    elif kind == "outputs":
        header["outputs"] = [{"name": draw(st.sampled_from(["output", "nope"])),
                              "parameters": {"binary_data": draw(_JSON)}}]
    text = json.dumps(header).encode()
    if kind == "header_length":
        length = draw(st.one_of(st.text(max_size=6), st.integers(-5, len(text) + 5).map(str)))
    elif length is not None:
        length = str(len(text))
    if kind == "blob":
        blobs = blobs[:draw(st.integers(0, len(blobs)))] + draw(st.binary(max_size=8))
    return text + blobs, length


@given(request=damaged_requests())
@example(request=(b'{"inputs": [], "id": 1}', None)).via("an id that is not a string")
def test_a_damaged_request_is_a_request_error_or_a_request_that_passes_every_check(
        attention_model, request):
    body, length = request
    try:
        parsed = attention_model.parse(body, length)
    except RequestError as exc:
        assert exc.status in (400, 413) and str(exc) and "\n" not in str(exc)
        return
    check_feed(_ATTENTION, parsed.feed)
    assert all(np.isfinite(v).all() for v in parsed.feed.values() if v.dtype.kind == "f")


@given(body=st.binary(max_size=200), length=st.one_of(st.none(), st.text(max_size=5)))
def test_any_bytes_are_a_request_error_or_a_request(attention_model, body, length):
    try:
        attention_model.parse(body, length)
    except RequestError as exc:
        assert exc.status in (400, 413)


@pytest.mark.parametrize("body, words", [
    (b'{"inputs": [{"name": "values"}], "id": 5}', "the request id must be a string"),
    (b'{"inputs": {}}', "inputs must be a non-empty list"),
    (b'{"inputs": [], "parameters": []}', "parameters must be a JSON object"),
    (b'{"inputs": [7]}', "each input is an object with a name"),
    (b'{"inputs": [{"name": "values", "bogus": 1}]}', r"input values: unknown fields \['bogus'\]"),
])
def test_a_malformed_header_is_a_400_naming_the_field(attention_model, body, words):
    with pytest.raises(RequestError, match=words) as caught:
        attention_model.parse(body)
    assert caught.value.status == 400


@pytest.mark.parametrize("change, words", [
    ({"shape": [1, 3, 4.0]}, "is not 3 sizes >= 0"),
    ({"shape": [1, 3, True]}, "is not 3 sizes >= 0"),
    ({"shape": [1, -1, 4]}, "is not 3 sizes >= 0"),
    ({"shape": [1, 3]}, "is not 3 sizes >= 0"),
    ({"parameters": {"binary_data_size": 11}, "data": None}, "binary_data_size 11, expected 48"),
    ({"parameters": {"binary_data_size": True}, "data": None}, "binary_data_size True"),
    ({"parameters": {"binary_data_size": 48}}, "both data and binary_data_size"),
    ({"data": None}, "data must be a list"),
])
def test_a_malformed_input_is_a_400_naming_the_input(attention_model, change, words):
    feed = make_feed(_ATTENTION, {"batch": 1, "q_len": 2, "k_len": 3}, 0)
    header = json.loads(encode(feed, {n: "flat" for n in feed})[0])
    header["inputs"][0].update(change)
    if header["inputs"][0].get("data", 0) is None and "parameters" in change:
        del header["inputs"][0]["data"]
    with pytest.raises(RequestError, match=words) as caught:
        attention_model.parse(json.dumps(header).encode())
    assert caught.value.status == 400 and "input values" in str(caught.value)


def test_an_input_without_data_or_binary_size_is_a_400(attention_model):
    feed = make_feed(_ATTENTION, {"batch": 1, "q_len": 2, "k_len": 3}, 0)
    header = json.loads(encode(feed, {n: "flat" for n in feed})[0])
    del header["inputs"][1]["data"]
    with pytest.raises(RequestError, match="input keys: no data and no binary_data_size"):
        attention_model.parse(json.dumps(header).encode())


@pytest.mark.parametrize("outputs, words", [
    ([], "outputs must list some of"),
    ({}, "outputs must list some of"),
    ([{"name": "output"}, {"name": "output"}], "outputs must list some of"),
    ([{"name": "output", "extra": 1}], "requested output"),
    ([{"name": "output", "parameters": {"binary_data": 1}}], "binary_data must be true or false"),
])
def test_a_bad_output_request_is_a_400(attention_model, outputs, words):
    feed = make_feed(_ATTENTION, {"batch": 1, "q_len": 2, "k_len": 3}, 0)
    body, _ = encode(feed, {n: "flat" for n in feed}, outputs=outputs)
    with pytest.raises(RequestError, match=words):
        attention_model.parse(body)


def test_binary_data_output_must_be_a_boolean(attention_model):
    feed = make_feed(_ATTENTION, {"batch": 1, "q_len": 2, "k_len": 3}, 0)
    body, _ = encode(feed, {n: "flat" for n in feed}, parameters={"binary_data_output": "yes"})
    with pytest.raises(RequestError, match="binary_data_output must be true or false"):
        attention_model.parse(body)


def test_the_graph_refusing_a_checked_feed_is_a_400_with_its_reason():
    io = IOSpec((TensorSpec("x", "float32", ("n",)),), sizes={"n": (0, None)})
    model = _model(io)
    with pytest.raises(RequestError, match=r"^the graph refused the request: \w+: .*rank for "
                                           r"input: x") as caught:
        model.run({"x": np.zeros((2, 2), np.float32)})
    assert caught.value.status == 400


# ------------------------------------------------------------------ metadata and names


@given(io=io_specs())
def test_metadata_lists_every_input_with_minus_one_for_each_dynamic_dim(io):
    meta = _model(io).metadata()
    assert meta["name"] == "m" and meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [
        (t.name, DATATYPES[t.dtype]) for t in io.inputs]
    for i, t in zip(meta["inputs"], io.inputs):
        assert i["shape"] == [d if isinstance(d, int) else -1 for d in t.dims]
    (out,) = meta["outputs"]
    first = io.inputs[0]
    assert out == {"name": io.outputs[0], "datatype": DATATYPES[first.dtype],
                   "shape": [d if isinstance(d, int) else -1 for d in first.dims]}


def test_server_metadata_names_the_binary_extension():
    from flash_export._version import __version__

    assert OIPModel.server_metadata() == {"name": "flash-export", "version": __version__,
                                          "extensions": ["binary_tensor_data"]}


@given(name=st.text(alphabet="aZ09_-.!/ é", min_size=0, max_size=70))
def test_model_name_takes_exactly_1_to_64_url_safe_characters_not_starting_with_a_dot(name):
    ok = (1 <= len(name) <= 64 and not name.startswith(".")
          and all(c.isascii() and (c.isalnum() or c in "_-.") for c in name))
    if ok:
        assert model_name("x.onnx", name) == name
    else:
        with pytest.raises(ValueError, match="model name"):
            model_name("x.onnx", name)


def test_model_name_defaults_to_the_artifact_stem():
    assert model_name("/models/encoder-v2.onnx") == "encoder-v2"
    assert model_name("/models/a.b.onnx") == "a.b"


@pytest.mark.parametrize("dims, out_dims, batch, expected, reason", [
    ([("b", "n"), ("b",)], ("n", "b"), "b", {"x0": 0, "x1": 0, "y": 1}, None),
    ([("n", "b"), ("b",)], ("n", "b"), "b", {"x0": 1, "x1": 0, "y": 1}, None),
    ([("batch", "n"), ("batch",)], ("batch",), None, None,
     "the model declares no per-request batch dim"),
    ([("b", "n"), ("b", "b")], ("b",), "b", None, "x1 has the batch (b) on 2 axes, not 1"),
    ([("b", "n"), ("n",)], ("b",), "b", None, "x1 has the batch (b) on 0 axes, not 1"),
    ([("b", "n")], None, "b", None, "output y's dims are not recorded"),
    ([("b", "n")], ("n",), "b", None, "y has the batch (b) on 0 axes, not 1"),
    ([("b", "n")], ("b",), "b!", None, "the batch (b) is static"),
], ids=["leading", "lbe", "undeclared", "twice", "missing-in-input", "output-dims-unknown",
        "missing-in-output", "static"])
def test_requests_are_joined_only_along_a_declared_batch_on_one_axis_of_every_tensor(
        dims, out_dims, batch, expected, reason):
    """`b!`: the batch b, pinned to one size."""
    inputs = tuple(TensorSpec(f"x{i}", "float32", d) for i, d in enumerate(dims))
    sizes = {n: (1, None) for d in dims for n in d}
    if batch == "b!":
        batch, sizes["b"] = "b", (2, 2)
    io = IOSpec(inputs, ("y",), sizes=sizes,
                output_dims={} if out_dims is None else {"y": out_dims}, batch=batch)
    assert io.batch_axes() == expected
    assert io.unbatched_reason() == reason


# ------------------------------------------------------------------ the wire


_ARRAYS = st.sampled_from(["float32", "float16", "float64", "int64", "int32", "bool"]).flatmap(
    lambda dtype: st.tuples(st.just(dtype), st.lists(st.integers(0, 3), max_size=3)))


def _random_array(dtype: str, shape: list[int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype.startswith("int"):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4)).astype(dtype)


@given(spec=_ARRAYS, seed=st.integers(0, 2**32 - 1), nested=st.booleans())
def test_json_data_reads_back_exactly_as_sent(spec, seed, nested):
    dtype, shape = spec
    value = _random_array(dtype, shape, seed)
    data = json.loads(json_body(value.tolist() if nested and value.ndim else json_data(value)))
    assert _same(from_json_data("x", dtype, tuple(shape), data), value)


@given(spec=_ARRAYS, seed=st.integers(0, 2**32 - 1))
def test_binary_data_reads_back_exactly_as_sent(spec, seed):
    dtype, shape = spec
    value = _random_array(dtype, shape, seed)
    raw = to_binary(value)
    assert len(raw) == value.nbytes
    assert _same(from_binary("x", dtype, tuple(shape), memoryview(raw)), value)


@given(dtype=st.sampled_from(["float32", "float16", "float64"]),
       values=st.lists(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.5]), max_size=6))
def test_non_finite_outputs_become_strings_and_finite_ones_stay_numbers(dtype, values):
    value = np.array(values, dtype=dtype)
    data = json_data(value)
    json_body(data)  # strict JSON: would raise on a NaN or an infinity
    for got, want in zip(data, values):
        if math.isnan(want):
            assert got == "NaN"
        elif math.isinf(want):
            assert got == ("Infinity" if want > 0 else "-Infinity")
        else:
            assert got == want and isinstance(got, float)
    assert np.array_equal(np.asarray(data, dtype=dtype), value, equal_nan=True)


@pytest.mark.parametrize("raw", [b"[NaN]", b"[Infinity]", b"[-Infinity]", b"[1" + b"0" * 19 + b"]",
                                 b"[-1" + b"0" * 19 + b"]", b"\xff", b"[" * 50_000, b"{"],
                         ids=["nan", "inf", "-inf", "20-digits", "-20-digits", "not-utf8",
                              "deep", "truncated"])
def test_load_json_refuses_what_strict_json_does_not_hold_with_a_400(raw):
    with pytest.raises(RequestError) as caught:
        load_json(raw)
    assert caught.value.status == 400


@pytest.mark.parametrize("digits", [1, 18, 19])
def test_load_json_takes_integers_of_up_to_19_digits(digits):
    assert load_json(b"[" + b"9" * digits + b", -" + b"9" * digits + b"]") == [
        int("9" * digits), -int("9" * digits)]


@given(raw=st.binary(max_size=64))
def test_load_json_reads_any_bytes_or_answers_400(raw):
    try:
        load_json(raw)
    except RequestError as exc:
        assert exc.status == 400


@pytest.mark.parametrize("dtype, data, words", [
    ("bool", [1, 0], "holds integers, expected BOOL"),
    ("int64", [1.5, 2.0], "holds floats, expected INT64"),
    ("int32", [1.5, 2.0], "holds floats, expected INT32"),
    ("float32", ["1", "2"], "holds strings, expected FP32"),
    ("float32", [1.0, [2.0]], "ragged|mixed values"),
    ("int32", [2**31, 0], "out of INT32's range"),
    ("int32", [-2**31 - 1, 0], "out of INT32's range"),
    ("float32", [1.0, 2.0, 3.0], "holds 3 values, shape \\[2\\] needs 2"),
    ("int64", [2**63, 2**63], "integers past int64"),
    ("int64", [2**64, 0], "mixed values"),
])
def test_json_data_of_the_wrong_kind_or_count_is_a_400(dtype, data, words):
    with pytest.raises(RequestError, match=words) as caught:
        from_json_data("x", dtype, (2,), data)
    assert caught.value.status == 400


@pytest.mark.parametrize("low, high", [(-2**31, 2**31 - 1)])
def test_int32_takes_its_whole_range(low, high):
    assert from_json_data("x", "int32", (2,), [low, high]).tolist() == [low, high]


def test_float_overflow_in_json_data_becomes_an_infinity_for_the_caller_to_refuse():
    value = from_json_data("x", "float16", (1,), [1e6])
    assert np.isinf(value).all()


@pytest.mark.parametrize("raw", [b"\x00\x01\x01", b"\x02\x00\x00"], ids=["valid", "two"])
def test_bool_bytes_are_0_or_1(raw):
    if max(raw) <= 1:
        assert from_binary("m", "bool", (3,), memoryview(raw)).tolist() == [False, True, True]
    else:
        with pytest.raises(RequestError, match="BOOL bytes must be 0 or 1") as caught:
            from_binary("m", "bool", (3,), memoryview(raw))
        assert caught.value.status == 400


def test_binary_data_is_little_endian():
    raw = to_binary(np.array([1], dtype=">i4"))
    assert raw == struct.pack("<i", 1)
    assert from_binary("x", "int32", (1,), memoryview(raw)).tolist() == [1]


@given(message=st.text(max_size=30))
def test_error_body_is_the_protocols_error_object(message):
    assert json.loads(error_body(message)) == {"error": message}


def test_json_body_is_compact_strict_json():
    assert json_body({"a": [1, 2.5]}) == b'{"a":[1,2.5]}'
    with pytest.raises(ValueError):
        json_body([math.nan])



@pytest.mark.parametrize("dtype, data, kind", [
    ("int64", [True, False], "booleans"),
    ("bool", [1, 2], "integers"),
    ("bool", [2**63, 2**63], "integers past int64"),
    ("bool", [1.5, 2.5], "floats"),
    ("bool", ["a", "b"], "strings"),
    ("bool", [None, None], "mixed values"),
])
def test_json_data_of_the_wrong_kind_names_the_kind_it_holds(dtype, data, kind):
    with pytest.raises(RequestError, match=rf"^input x: data holds {kind}, expected "
                                           rf"{DATATYPES[dtype]} values$"):
        from_json_data("x", dtype, (2,), data)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_json_constant_is_named_in_the_400(constant):
    with pytest.raises(RequestError, match=rf"{constant} is not JSON \(send finite numbers\)"):
        load_json(f"[{constant}]".encode())


@pytest.mark.parametrize("text, count", [("7", 7), (" 0 ", 0), ("9" * 12, 10**12 - 1),
                                         ("1" * 13, None), ("", None), (" ", None)],
                         ids=["one-digit", "zero", "max-digits", "one-digit-too-many", "empty",
                              "blank"])
def test_a_byte_count_takes_1_to_max_digits_digits(text, count):
    assert byte_count(text, 12) == count


@pytest.mark.parametrize("dtype", ["float32", "int64", "bool"])
def test_json_array_joins_its_blocks_into_one_flat_array(dtype):
    """Past 8192 values (one block) json_array writes several blocks, read back as one list."""
    value = _random_array(dtype, [3, 7000], 5)
    assert json.loads(json_array(value)) == json_data(value)


# JSON data is converted a block of 8192 rows at a time: data past one block reads back whole,
# and blocks must agree on their rows.
@pytest.mark.parametrize("rows", [8193, 16384, 20000], ids=["two-blocks", "two-full", "three"])
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_json_data_of_several_blocks_reads_back_whole(rows, nested):
    value = _random_array("float32", [rows, 2], rows)
    data = value.tolist() if nested else json_data(value)
    shape = (rows, 2)
    assert _same(from_json_data("x", "float32", shape, data), value)


def test_json_data_whose_blocks_disagree_on_their_rows_is_ragged():
    data = [[1.0, 2.0]] * 8192 + [[1.0, 2.0, 3.0]]
    with pytest.raises(RequestError, match=r"^input x: data is ragged \(nested lists of unequal "
                                           r"lengths\)$") as caught:
        from_json_data("x", "float32", (8193, 2), data)
    assert caught.value.status == 400


@pytest.mark.parametrize("shape, data", [((2,), []), ((0, 3), [1.0]), ((0,), [[]])],
                         ids=["empty-data", "data-for-empty", "nested-empty"])
def test_empty_data_fits_only_an_empty_shape(shape, data):
    if math.prod(shape) == 0 and np.asarray(data).size == 0:
        assert from_json_data("x", "float32", shape, data).shape == shape
        return
    with pytest.raises(RequestError, match=rf"holds {np.asarray(data).size} values, shape "
                                           rf"\[{', '.join(map(str, shape))}\] needs "
                                           rf"{math.prod(shape)}$"):
        from_json_data("x", "float32", shape, data)


def test_float_overflow_in_json_data_warns_nobody():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isinf(from_json_data("x", "float32", (2,), [1e39, -1e39])).all()


def test_json_nested_too_deeply_is_a_400_saying_so():
    with pytest.raises(RequestError, match=r"^the JSON is nested too deeply$") as caught:
        load_json(b"[" * 50_000 + b"]" * 50_000)
    assert caught.value.status == 400


# ------------------------------------------------------------------ every refusal, word for word
# Each check of a request answers 400 with one line naming what is wrong and what came (cut to a
# few dozen characters where the client's value may be long).


def _attention_header(**change) -> dict:
    feed = make_feed(_ATTENTION, {"batch": 1, "q_len": 2, "k_len": 3}, 0)
    header = json.loads(encode(feed, {n: "flat" for n in feed})[0])
    header.update(change)
    return header


def _with_input(index: int, **change) -> dict:
    header = _attention_header()
    header["inputs"][index].update(change)
    return header


_NAMES = "['values', 'keys', 'queries', 'mask']"


@pytest.mark.parametrize("header, message", [
    ([1], "the inference header must be a JSON object"),
    ({"inputs": [], **{c: 1 for c in "abcdefghi"}},
     "unknown request fields ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h']"),
    ({"inputs": [], "id": 5}, "the request id must be a string"),
    ({"inputs": [], "parameters": []}, "the request: parameters must be a JSON object"),
    ({"inputs": {"a": 1}}, "inputs must be a non-empty list of tensors"),
    ({"inputs": []}, "inputs must be a non-empty list of tensors"),
    ({"inputs": [7]}, "each input is an object with a name, shape, datatype and data"),
    ({"inputs": [{"name": "z" * 70}]}, f"unknown input '{'z' * 64}'; inputs are {_NAMES}"),
    (_attention_header(inputs=_attention_header()["inputs"][:1] * 2),
     "input values is given twice"),
    (_with_input(0, **{c: 1 for c in "abcdefghi"}),
     "input values: unknown fields ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h']"),
    (_with_input(0, datatype="INT64_INT64_INT64"),
     "input values: datatype 'INT64_INT64_INT6', expected FP32"),
    (_with_input(0, shape=list(range(100, 130))),
     f"input values: shape {str(list(range(100, 130)))[:80]} is not 3 sizes >= 0 "
     "(batch, k_len, 4)"),
    (_with_input(0, shape=[1, 8, 4]), "input values: dim 1 (k_len) is 8, expected 0..7"),
    (_attention_header(inputs=_attention_header()["inputs"][:3]),
     f"inputs are {_NAMES}; missing ['mask']"),
    (_with_input(0, parameters=[]), "input values: parameters must be a JSON object"),
    (_with_input(0, parameters={"binary_data_size": 48.0}, data=None),
     "input values: binary_data_size 48.0, expected 48 for shape [1, 3, 4]"),
    (_with_input(1, data=None), "input keys: no data and no binary_data_size"),
    (_attention_header(parameters={"binary_data_output": 1}),
     "binary_data_output must be true or false"),
    (_attention_header(outputs={}), "outputs must list some of ['output']"),
    (_attention_header(outputs=[7]), "requested output 7: outputs are ['output']"),
    (_attention_header(outputs=[{"name": "nope", "parameters": {"x": "y" * 80}}]),
     f"requested output {str({'name': 'nope', 'parameters': {'x': 'y' * 80}})[:80]}: outputs "
     "are ['output']"),
    (_attention_header(outputs=[{"name": "output", "parameters": []}]),
     "output output: parameters must be a JSON object"),
], ids=lambda v: v[:30] if isinstance(v, str) else None)
def test_a_bad_request_is_a_400_saying_exactly_what_is_wrong(roomy_model, header, message):
    if isinstance(header, dict):
        for tensor in header.get("inputs", []):
            if isinstance(tensor, dict) and tensor.get("data", 0) is None:
                del tensor["data"]
    with pytest.raises(RequestError, match=f"^{re.escape(message)}$") as caught:
        roomy_model.parse(json.dumps(header).encode())
    assert caught.value.status == 400


def _binary_body(feed: dict, extra: bytes = b"", cut: int = 0) -> tuple[bytes, str]:
    body, length = encode(feed, {n: "binary" for n in feed})
    return body[:len(body) - cut] + extra, length


def test_a_binary_section_of_the_wrong_size_is_a_400_naming_both_sizes(roomy_model):
    feed = make_feed(_ATTENTION, {"batch": 1, "q_len": 2, "k_len": 3}, 0)
    body, length = _binary_body(feed, extra=b"\0")
    sizes = 48 + 48 + 32 + 6
    with pytest.raises(RequestError, match=rf"^the binary section is {sizes + 1} bytes, the "
                                           rf"inputs declare {sizes}$") as caught:
        roomy_model.parse(body, length)
    assert caught.value.status == 400
    body, length = _binary_body(feed, cut=7)  # the mask's 6 bytes and one of the queries'
    with pytest.raises(RequestError, match=r"^input queries: the binary section holds 31 more "
                                           r"bytes, expected 32$") as caught:
        roomy_model.parse(body, length)
    assert caught.value.status == 400


def test_binary_bool_bytes_other_than_0_and_1_are_a_400_naming_the_input(roomy_model):
    feed = make_feed(_ATTENTION, {"batch": 1, "q_len": 2, "k_len": 3}, 0)
    body, length = _binary_body(feed, cut=1, extra=b"\2")
    with pytest.raises(RequestError, match=r"^input mask: BOOL bytes must be 0 or 1$"):
        roomy_model.parse(body, length)


@pytest.mark.parametrize("length, message", [
    ("0000000000012", "'0000000000012' is not a byte count"),
    ("x" * 25, f"'{'x' * 20}' is not a byte count"),
], ids=["13-digits", "long-garbage"])
def test_a_header_length_past_12_digits_or_not_a_number_is_a_400(roomy_model, length, message):
    body = json.dumps(_attention_header()).encode()
    with pytest.raises(RequestError, match=f"^Inference-Header-Content-Length "
                                           f"{re.escape(message)} within the {len(body)}-byte "
                                           f"body$") as caught:
        roomy_model.parse(body, length)
    assert caught.value.status == 400


def test_a_value_out_of_its_range_is_a_400_from_check_feed():
    io = IOSpec((TensorSpec("ids", "int64", ("n",), low=0, high=10),), sizes={"n": (1, None)})
    body, _ = encode({"ids": np.array([3, 10], np.int64)}, {"ids": "flat"})
    with pytest.raises(RequestError, match=r"^input ids: values must be in \[0, 10\), got "
                                           r"3\.\.10$") as caught:
        _model(io).parse(body)
    assert caught.value.status == 400


def test_a_parsed_request_carries_its_sizes_and_json_outputs_by_default(roomy_model):
    body = json.dumps(_attention_header(outputs=[{"name": "output"}])).encode()
    parsed = roomy_model.parse(body)
    assert parsed.sizes == {"batch": 1, "k_len": 3, "q_len": 2}
    assert parsed.binary == {"output": False}
    assert roomy_model.parse(json.dumps(_attention_header()).encode()).binary == {
        "output": False}


def test_the_model_keeps_its_specs_batch_axes():
    model = OIPModel("m", _session(_ATTENTION.to_json()), _ATTENTION)
    assert model.batch_axes == {"values": 0, "keys": 0, "queries": 0, "mask": 0, "output": 0}


def test_an_output_of_a_type_the_protocol_lacks_is_a_500_naming_it():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [2])
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.UINT8)],
                              "cast", [x], [y])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    io = IOSpec((TensorSpec("x", "float32", (2,)),), ("y",))
    with pytest.raises(RequestError, match=r"^output y: type tensor\(uint8\) has no protocol "
                                           r"datatype$") as caught:
        OIPModel("m", session, io)
    assert caught.value.status == 500


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_an_answer_of_two_outputs_carries_both(binary):
    model = OIPModel("m", _twice_session(), _TWICE)
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    body, length = encode({"x": x}, {"x": "flat"}, parameters={"binary_data_output": binary})
    parsed = model.parse(body, length)
    headers, answer = model.answer(parsed, model.run(parsed.feed))
    split = int(headers.get(HEADER_LENGTH, len(answer)))
    reply = json.loads(answer[:split])
    assert [t["name"] for t in reply["outputs"]] == ["y", "z"]
    if binary:
        got = [from_binary("o", "float32", (2, 16), memoryview(answer)[split + i * 128:
                                                                      split + (i + 1) * 128])
               for i in range(2)]
        assert len(answer) == split + 256
    else:
        got = [np.asarray(t["data"], np.float32).reshape(2, 16) for t in reply["outputs"]]
    assert all(_same(g, x) for g in got)


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_binary_float_input_holding_nan_or_an_infinity_is_a_400(roomy_model, bad):
    feed = make_feed(_ATTENTION, {"batch": 1, "q_len": 2, "k_len": 3}, 0)
    feed["values"][0, 1, 2] = bad
    body, length = _binary_body(feed)
    with pytest.raises(RequestError, match=r"^input values: holds NaN or an infinity; inputs "
                                           r"must be finite$") as caught:
        roomy_model.parse(body, length)
    assert caught.value.status == 400


@pytest.mark.parametrize("digits", [20, 25])
def test_an_integer_past_19_digits_is_a_400_counting_its_digits(digits):
    with pytest.raises(RequestError, match=rf"^the body is not valid JSON: an integer of {digits} "
                                           r"digits is out of range$"):
        load_json(b"[" + b"9" * digits + b"]")

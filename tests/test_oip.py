"""flash_export.serving.protocol without a server: request checks, answers, batching of a real
session."""

import json
import struct

import numpy as np
import onnx
import pytest

from flash_export.core.errors import RequestError
from flash_export.runtime import create_session, session_io
from flash_export.serving.batching import run_many
from flash_export.serving.limits import Limits
from flash_export.serving.protocol import DATATYPES, HEADER_LENGTH, OIPModel

E = 16
LIMITS = Limits(max_body_bytes=1 << 20, max_batch=4, max_length=50, body_timeout_s=1.0)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    from flash_export import FlashAttention
    from flash_export.export.onnx import export_onnx

    path = tmp_path_factory.mktemp("oip") / "att.onnx"
    return export_onnx(FlashAttention(E, 2, 4).eval(), path, mask=True)


class CountingSession:
    """The real session, counting its runs (to see requests merged)."""

    def __init__(self, session):
        self.session, self.runs = session, []

    def run(self, names, feed):
        self.runs.append({n: v.shape for n, v in feed.items()})
        return self.session.run(names, feed)

    def __getattr__(self, name):
        return getattr(self.session, name)


@pytest.fixture(scope="module")
def session(graph):
    return create_session(graph)


@pytest.fixture
def model(session):
    return OIPModel("att", CountingSession(session), session_io(session), LIMITS)


def _feed(seed, batch=1, q_len=3, k_len=5):
    rng = np.random.default_rng(seed)
    return {"values": rng.standard_normal((batch, k_len, E)).astype(np.float32),
            "keys": rng.standard_normal((batch, k_len, E)).astype(np.float32),
            "queries": rng.standard_normal((batch, q_len, E)).astype(np.float32),
            "mask": rng.random((batch, 1, q_len, k_len)) > 0.3}


def _json(feed, **override):
    inputs = [{"name": n, "datatype": DATATYPES[v.dtype.name], "shape": list(v.shape),
               "data": v.ravel().tolist()} for n, v in feed.items()]
    return json.dumps({"inputs": inputs, **override}).encode()


def _binary(feed):
    inputs = [{"name": n, "datatype": DATATYPES[v.dtype.name], "shape": list(v.shape),
               "parameters": {"binary_data_size": v.nbytes}} for n, v in feed.items()]
    header = json.dumps({"inputs": inputs, "outputs": [
        {"name": "output", "parameters": {"binary_data": True}}]}).encode()
    return header + b"".join(v.tobytes() for v in feed.values()), str(len(header))


def test_json_and_binary_requests_answer_what_onnxruntime_computes(model, session):
    feed = _feed(0, batch=2)
    want = session.run(["output"], feed)[0]
    request = model.parse(_json(feed, id="r1"))
    headers, body = model.answer(request, model.run(request.feed))
    reply = json.loads(body)
    assert headers == {"content-type": "application/json"} and reply["id"] == "r1"
    (out,) = reply["outputs"]
    assert out["shape"] == list(want.shape) and out["datatype"] == "FP32"
    assert np.array_equal(np.asarray(out["data"], dtype=np.float32).reshape(want.shape), want)

    body, length = _binary(feed)
    request = model.parse(body, length)
    headers, body = model.answer(request, model.run(request.feed))
    split = int(headers[HEADER_LENGTH])
    (out,) = json.loads(body[:split])["outputs"]
    assert out["parameters"] == {"binary_data_size": want.nbytes}
    assert np.array_equal(np.frombuffer(body[split:], np.float32).reshape(want.shape), want)


def test_requests_of_one_shape_merge_into_one_run_up_to_the_batch_limit(model, session):
    feeds = [_feed(i, batch=1 + i % 2) for i in range(5)] + [_feed(9, q_len=4)]
    answers = run_many(model, feeds)
    # batches 1, 2, 1 fill a run of 4 rows (max_batch); 2 + 1 the next; q_len 4 runs alone
    assert [r["queries"][0] for r in model.session.runs] == [4, 3, 1]
    for feed, answer in zip(feeds, answers):
        assert np.array_equal(answer["output"], session.run(["output"], feed)[0])


def test_an_old_spec_without_the_batch_declaration_is_never_batched(graph, tmp_path):
    """An artifact written before the declaration: its dims say "batch", nothing says the rows
    are independent requests."""
    proto = onnx.load(str(graph))
    for prop in proto.metadata_props:
        if prop.key == "io_spec":
            spec = json.loads(prop.value)
            prop.value = json.dumps({k: v for k, v in spec.items()
                                     if k not in ("batch", "output_dims")})
    onnx.save(proto, str(tmp_path / "old.onnx"))
    old = create_session(tmp_path / "old.onnx")
    io = session_io(old)
    assert io.batch is None and io.output_dims == {"output": ("batch", "q_len", E)}
    model = OIPModel("old", CountingSession(old), io, LIMITS)
    feeds = [_feed(i) for i in range(3)]
    for feed, answer in zip(feeds, run_many(model, feeds)):
        assert np.array_equal(answer["output"], old.run(["output"], feed)[0])
    assert len(model.session.runs) == 3


def test_a_request_the_graph_refuses_does_not_sink_its_batch(model, session):
    good, bad = _feed(1), _feed(2)
    bad["values"] = bad["values"][:, :, :-1].copy()  # (1, 5, 15): the graph refuses it
    answers = run_many(model, [good, bad])
    assert np.array_equal(answers[0]["output"], session.run(["output"], good)[0])
    assert isinstance(answers[1], RequestError) and answers[1].status == 400


def test_metadata_names_every_input_and_output_with_dynamic_dims_as_minus_one(model):
    meta = model.metadata()
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("values", "FP32", [-1, -1, E]), ("keys", "FP32", [-1, -1, E]),
        ("queries", "FP32", [-1, -1, E]), ("mask", "BOOL", [-1, 1, -1, -1])]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, -1, E]}]


def _edit(feed, which, **changes):
    raw = json.loads(_json(feed))
    for tensor in raw["inputs"]:
        if tensor["name"] == which:
            tensor.update(changes)
    return json.dumps(raw).encode()


BAD = {
    "nan_literal": (lambda f: _json(f).replace(b"[", b"[NaN, ", 1), "not JSON"),
    "infinity_literal": (lambda f: _json(f).replace(b"[", b"[-Infinity, ", 1), "not JSON"),
    "float_overflow": (lambda f: _edit(f, "values", data=[1e300] * f["values"].size),
                       "NaN or an infinity"),
    "huge_integer": (lambda f: _edit(f, "values", shape=[1, 5, 10**30]), "digits"),
    "deep_nesting": (lambda f: b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "not_an_object": (lambda f: b"[1, 2]", "JSON object"),
    "ragged": (lambda f: _edit(f, "keys", data=[[1.0], [1.0, 2.0]]), "ragged"),
    "strings": (lambda f: _edit(f, "keys", data=["1"] * f["keys"].size), "strings"),
    "bool_as_ints": (lambda f: _edit(f, "mask", data=[1] * f["mask"].size), "integers"),
    "wrong_datatype": (lambda f: _edit(f, "values", datatype="FP16"), "expected FP32"),
    "wrong_count": (lambda f: _edit(f, "values", data=[0.0] * 7), "holds 7 values"),
    "static_dim": (lambda f: _edit(f, "values", shape=[1, 5, E + 1]), f"expected {E}"),
    "shared_dim": (lambda f: _edit(f, "keys", shape=[1, 6, E],
                                   data=[0.0] * (6 * E)), "another input"),
    "length": (lambda f: _json(_feed(0, k_len=LIMITS.max_length + 1)), "expected 0..50"),
    "batch": (lambda f: _json(_feed(0, batch=LIMITS.max_batch + 1)), "expected 1..4"),
    "unknown_name": (lambda f: _edit(f, "keys", name="kes"), "unknown input 'kes'"),
    "unknown_field": (lambda f: _json(f, extra=1), "unknown request fields"),
    "unknown_output": (lambda f: _json(f, outputs=[{"name": "logits"}]), "outputs are"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_request_is_a_400_naming_what_is_wrong(model, case):
    make, words = BAD[case]
    with pytest.raises(RequestError, match=words) as caught:
        model.parse(make(_feed(0)))
    assert caught.value.status == 400
    assert model.session.runs == []


def test_binary_sections_are_checked_byte_for_byte(model):
    feed = _feed(0)
    body, length = _binary(feed)
    for bad, words in [(body + b"x", "binary section is"), (body[:-1], "more bytes"),
                       (body, None)]:
        if words:
            with pytest.raises(RequestError, match=words):
                model.parse(bad, length)
    # "\u00b2" (superscript two) passes str.isdigit, which int() refuses; int() reads
    # "\u0661\u0662" (Arabic-Indic 12): a byte count is ASCII digits only.
    for header in ("-1", "1e3", str(len(body) + 1), "9" * 40, "\u00b2", "1\u00b2",
                   "\u0661\u0662"):
        with pytest.raises(RequestError, match="Inference-Header-Content-Length"):
            model.parse(body, header)
    mask_at = len(body) - feed["mask"].nbytes
    with pytest.raises(RequestError, match="BOOL bytes must be 0 or 1"):
        model.parse(body[:mask_at] + b"\x02" + body[mask_at + 1:], length)
    nan = struct.pack("<f", float("nan"))
    with pytest.raises(RequestError, match="NaN or an infinity"):
        model.parse(body[:int(length)] + nan + body[int(length) + 4:], length)
    with pytest.raises(RequestError) as caught:
        model.parse(b" " * (LIMITS.max_body_bytes + 1))
    assert caught.value.status == 413


def test_an_answer_over_the_response_limit_is_refused_before_anything_runs(session):
    """The IOSpec's output dims at the request's sizes bound the answer before the run."""
    io = session_io(session)
    limits = Limits(max_batch=4, max_length=4096, max_response_bytes=2**20)
    model = OIPModel("att", CountingSession(session), io, limits)
    feed = _feed(0, batch=2, q_len=2000, k_len=1)  # output (2, 2000, 16): 64,000 values
    with pytest.raises(RequestError, match=r"up to 1\.5 MiB \(output \[2, 2000, 16\]: 64,000 "
                                           r"values as JSON\), over the response limit of "
                                           r"1\.0 MiB") as caught:
        model.parse(_json(feed))
    assert caught.value.status == 413 and model.session.runs == []
    body, length = _binary(feed)  # 256,000 bytes as binary: within the limit
    request = model.parse(body, length)
    headers, reply = model.answer(request, model.run(request.feed))
    assert len(reply) > 256_000 and len(reply) < 2**20


def test_an_answer_whose_shape_is_known_only_after_the_run_is_checked_before_encoding(session):
    import dataclasses

    io = dataclasses.replace(session_io(session), output_dims={})  # dims unknown before a run
    limits = Limits(max_batch=4, max_length=4096, max_response_bytes=2**20)
    model = OIPModel("att", CountingSession(session), io, limits)
    request = model.parse(_json(_feed(0, batch=2, q_len=2000, k_len=1)))
    results = model.run(request.feed)
    with pytest.raises(RequestError, match="over the response limit") as caught:
        model.answer(request, results)
    assert caught.value.status == 413


def test_a_byte_count_is_ascii_digits_only():
    from flash_export.serving.wire import byte_count

    assert byte_count(" 42 ", 18) == 42
    for text in ("", "-1", "4 2", "1\u00b2", "\u0661\u0662", "1" * 19):
        assert byte_count(text, 18) is None, text


def test_non_finite_outputs_are_strict_json_strings_that_numpy_reads_back(model):
    feed = _feed(0)
    request = model.parse(_json(feed))
    out = np.array([[[np.nan, np.inf, -np.inf, 1.5]]], dtype=np.float32)
    _, body = model.answer(request, {"output": out})
    data = json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} in the answer"))[
        "outputs"][0]["data"]
    assert data == ["NaN", "Infinity", "-Infinity", 1.5]
    assert np.array_equal(np.asarray(data, dtype=np.float32).reshape(out.shape), out,
                          equal_nan=True)

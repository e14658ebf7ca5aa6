"""`flash-export serve --max-body-mib` at its exact value, in the replica's body reader: a body of
exactly the limit is read, one byte more is a 413, whether the client declares a Content-Length
or streams the body in chunks without one. (flash_export.serving.protocol's own check of the whole
body is in test_properties_oip.py.)

The reader runs in a real OIPDeployment (an onnxruntime session of a one-node graph) on real
starlette requests fed through the ASGI receive channel, without a Ray cluster: the limit is
checked before anything reaches Ray Serve's batching.
"""

from __future__ import annotations

import asyncio

import onnx
import pytest
from onnx import TensorProto, helper

from flash_export.core.errors import RequestError
from flash_export.core.io_spec import attention_io
from flash_export.serving.limits import Limits

pytest.importorskip("ray.serve", reason="the serve extra (Ray Serve) is not installed")
starlette_requests = pytest.importorskip("starlette.requests")

LIMIT = 4096


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    from flash_export.serving.ray_serve import OIPDeployment

    io = attention_io(4, mask=True)
    types = {"float32": TensorProto.FLOAT, "bool": TensorProto.BOOL}
    inputs = [helper.make_tensor_value_info(t.name, types[t.dtype], list(t.dims))
              for t in io.inputs]
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "q_len", 4])
    graph = helper.make_graph([helper.make_node("Identity", ["queries"], ["output"])], "g",
                              inputs, [output])
    path = tmp_path_factory.mktemp("serve") / "identity.onnx"
    onnx.save(helper.make_model(graph, ir_version=10,
                                opset_imports=[helper.make_opsetid("", 18)]), path)
    return OIPDeployment(str(path), "identity", 1, Limits(max_body_bytes=LIMIT), 1, 0.0)


def _read(deployment, request) -> bytes:
    """`_read_body` as a request handler calls it: the bytes it took from the replica's body
    budget (`held`) are the bytes read, and go back after."""
    held = [0]
    try:
        body = asyncio.run(deployment._read_body(request, held))
        assert held[0] == len(body)
        return body
    finally:
        deployment._bodies.give(held[0])


def _request(body: bytes, declared: bool, chunk: int = 1000):
    """A starlette request for `body`, streamed in `chunk`-byte messages, with a Content-Length
    header when `declared`; its scope's "received" counts the messages the reader took."""
    headers = [(b"content-length", str(len(body)).encode())] if declared else []
    scope = {"type": "http", "method": "POST", "path": "/v2/models/identity/infer",
             "headers": headers, "query_string": b"", "root_path": ""}
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    scope["received"] = 0

    async def receive():
        scope["received"] += 1
        if chunks:
            data = chunks.pop(0)
            return {"type": "http.request", "body": data, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    return starlette_requests.Request(scope, receive)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "streamed"])
@pytest.mark.parametrize("extra", [-1, 0, 1], ids=["below", "at", "one-past"])
def test_the_body_reader_reads_exactly_the_limit_and_refuses_one_byte_more(deployment, declared,
                                                                           extra):
    body = b"x" * (LIMIT + extra)
    request = _request(body, declared)
    if extra <= 0:
        assert _read(deployment, request) == body
        return
    with pytest.raises(RequestError, match=f"limit of {LIMIT} bytes") as caught:
        _read(deployment, request)
    assert caught.value.status == 413
    if declared:  # refused on its Content-Length, before a byte of the body is read
        assert str(caught.value).startswith(f"Content-Length {LIMIT + 1} is over")
        assert request.scope["received"] == 0


def test_a_content_length_that_lies_low_is_still_cut_at_the_limit(deployment):
    body = b"x" * (LIMIT + 1)
    request = _request(body, declared=False)
    request.scope["headers"] = [(b"content-length", b"10")]
    with pytest.raises(RequestError, match=f"the body passed the limit of {LIMIT} bytes"):
        _read(deployment, request)

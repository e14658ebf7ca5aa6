"""`flash-export serve` with its default options, on a model of both batch layouts.

One server for the module (its start is the expensive part), started as a user starts it: only
the port is chosen. The model (`_batch_models`' ``both``) takes (L, B, E) and answers one output
per layout, so a request joined on the wrong axis, or split on the wrong one, shows at once.
"""

import concurrent.futures
import http.client
import json
import threading
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic use

pytest.importorskip("ray", reason="the serve extra (ray[serve]) is not installed")

from _batch_models import export_all, feed  # noqa: E402  (sibling modules)
from _serving import serving  # noqa: E402
from test_serve import _free_port  # noqa: E402

from flash_export.oip import DATATYPES  # noqa: E402
from flash_export.runtime import create_session  # noqa: E402

NAME = "both"
INFER = f"/v2/models/{NAME}/infer"


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Path:
    return export_all(tmp_path_factory.mktemp("serve_defaults"), [NAME])[NAME]


@pytest.fixture(scope="module")
def port(graph):
    port = _free_port()
    with serving([str(graph), "--port", str(port)]):
        yield port


@pytest.fixture(scope="module")
def direct(graph):
    session = create_session(graph)
    names = [o.name for o in session.get_outputs()]
    return lambda request: dict(zip(names, session.run(names, request)))


def _body(request: dict, binary: bool) -> tuple:
    """(body, extra headers) of an infer request: JSON data, or binary inputs and outputs."""
    if not binary:
        tensors = [{"name": n, "shape": list(v.shape), "datatype": DATATYPES[v.dtype.name],
                    "data": v.ravel().tolist()} for n, v in request.items()]
        return json.dumps({"inputs": tensors}).encode(), {}
    tensors = [{"name": n, "shape": list(v.shape), "datatype": DATATYPES[v.dtype.name],
                "parameters": {"binary_data_size": v.nbytes}} for n, v in request.items()]
    header = json.dumps({"inputs": tensors, "parameters": {"binary_data_output": True}}).encode()
    body = header + b"".join(v.tobytes() for v in request.values())
    return body, {"Inference-Header-Content-Length": str(len(header))}


def _decode(status: int, headers: dict, body: bytes) -> dict:
    assert status == 200, body[:300]
    split = int(headers.get("inference-header-content-length", len(body)))
    reply = json.loads(body[:split])
    out, offset = {}, split
    for tensor in reply["outputs"]:
        dtype = np.dtype({v: k for k, v in DATATYPES.items()}[tensor["datatype"]])
        if "data" in tensor:
            out[tensor["name"]] = np.asarray(tensor["data"], dtype=dtype).reshape(tensor["shape"])
        else:
            size = tensor["parameters"]["binary_data_size"]
            out[tensor["name"]] = np.frombuffer(body[offset:offset + size], dtype).reshape(
                tensor["shape"])
            offset += size
    return out


class Client:
    """One keep-alive HTTP connection per thread."""

    def __init__(self, port: int) -> None:
        self.port, self.local = port, threading.local()

    def request(self, method: str, path: str, body: bytes = b"", headers=None) -> tuple:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                                timeout=60)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json",
                                                        **(headers or {})})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()

    def infer(self, request: dict, binary: bool) -> dict:
        body, headers = _body(request, binary)
        return _decode(*self.request("POST", INFER, body, headers))


def test_200_concurrent_request_mixes_each_answered_as_its_own_direct_run(port, direct):
    """Random mixes of 2-6 concurrent requests (batch 1-3, lengths that often match, so the
    replica joins them): every answer bitwise equal to onnxruntime on that request alone."""
    rng = np.random.default_rng(24)
    client = Client(port)
    mismatches = []
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        for mix in range(200):
            requests = [feed(NAME, rng, int(rng.integers(1, 4)), int(rng.choice([1, 2, 5])))
                        for _ in range(int(rng.integers(2, 7)))]
            binary = [bool((mix + i) % 2) for i in range(len(requests))]  # JSON and binary
            answers = list(pool.map(client.infer, requests, binary))
            for i, (request, answer) in enumerate(zip(requests, answers)):
                for name, want in direct(request).items():
                    got = answer[name]
                    if got.shape != want.shape or not np.array_equal(got, want):
                        mismatches.append((mix, i, name, got.shape, want.shape))
    assert not mismatches, f"{len(mismatches)} answers differ: {mismatches[:5]}"

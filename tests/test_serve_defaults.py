"""`flash-export serve` with its default options, on a model of both batch layouts.

One server for the module (its start is the expensive part), started as a user starts it: only
the port is chosen. The model (`_batch_models`' ``both``) takes (L, B, E) and answers one output
per layout, so a request joined on the wrong axis, or split on the wrong one, shows at once.
"""

import concurrent.futures
import http.client
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic use

pytest.importorskip("ray", reason="the serve extra (ray[serve]) is not installed")

from _batch_models import export_all, feed  # noqa: E402  (sibling modules)
from _serving import serving  # noqa: E402
from test_serve import _free_port  # noqa: E402

from flash_export.runtime import create_session  # noqa: E402
from flash_export.serving.protocol import DATATYPES  # noqa: E402

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


def _body(request: dict, binary: bool, binary_out=None) -> tuple:
    """(body, extra headers) of an infer request: JSON data, or binary inputs (and outputs,
    unless `binary_out` says otherwise)."""
    if not binary:
        tensors = [{"name": n, "shape": list(v.shape), "datatype": DATATYPES[v.dtype.name],
                    "data": v.ravel().tolist()} for n, v in request.items()]
        return json.dumps({"inputs": tensors}).encode(), {}
    tensors = [{"name": n, "shape": list(v.shape), "datatype": DATATYPES[v.dtype.name],
                "parameters": {"binary_data_size": v.nbytes}} for n, v in request.items()]
    header = json.dumps({"inputs": tensors, "parameters": {
        "binary_data_output": binary if binary_out is None else binary_out}}).encode()
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


def _seconds(port: int, method: str, path: str, body: bytes = b"", headers=None) -> float:
    """One request on a fresh connection: its wall time (it must answer 200)."""
    started = time.perf_counter()
    status, _, reply = Client(port).request(method, path, body, headers)
    assert status == 200, reply[:300]
    return time.perf_counter() - started


def test_70_slow_bodies_delay_neither_health_nor_valid_requests(port):
    """70 connections send their headers, then a byte every 0.5 s (more than the 64 requests a
    replica runs at once): before, health and valid requests waited 8-10 s for them to time
    out. Health must answer within 1 s, a valid request within 2x its unloaded latency; then
    with 200 connections held, health still within 1 s."""
    rng = np.random.default_rng(3)
    body, headers = _body(feed(NAME, rng, 1, 5), binary=True)
    for _ in range(3):  # warm
        _seconds(port, "POST", INFER, body, headers)
    unloaded = [_seconds(port, "POST", INFER, body, headers) for _ in range(15)]
    slow = []
    stop = threading.Event()
    try:
        for _ in range(70):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: 100000\r\n\r\n{{".encode())
            slow.append(sock)

        def trickle() -> None:
            while not stop.wait(0.5):
                for sock in slow:
                    sock.sendall(b" ")

        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(0.5)  # every slow body has reached the replica
        health, loaded = [], []
        for _ in range(15):
            health.append(_seconds(port, "GET", "/v2/health/ready"))
            loaded.append(_seconds(port, "POST", INFER, body, headers))
        for _ in range(130):  # 200 held: the README's figure, with the default options
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{{"
                         .encode())
            slow.append(sock)
        time.sleep(0.5)
        held = [_seconds(port, "GET", "/v2/health/ready") for _ in range(5)]
        _seconds(port, "POST", INFER, body, headers)
    finally:
        stop.set()
        for sock in slow:
            sock.close()
    ms = [round(1e3 * statistics.median(x), 1) for x in (unloaded, loaded, health)]
    print(f"\n70 slow bodies: valid request median {ms[0]} ms unloaded, {ms[1]} ms loaded; "
          f"health median {ms[2]} ms, max {1e3 * max(health):.0f} ms; with 200 held: health "
          f"max {1e3 * max(held):.0f} ms")
    assert max(health) < 1.0 and max(held) < 1.0, (health, held)
    assert statistics.median(loaded) < 2 * statistics.median(unloaded), (unloaded, loaded)


def test_an_answer_over_the_response_limit_is_a_413_naming_its_size(port):
    """(4096, 40, 16) in, 10 MiB as binary: each output's 2,621,440 values would take up to
    125 MiB as JSON, past the default 64 MiB."""
    request = {"src": np.zeros((4096, 40, 16), np.float32)}
    tensors = [{"name": "src", "shape": [4096, 40, 16], "datatype": "FP32",
                "parameters": {"binary_data_size": request["src"].nbytes}}]
    header = json.dumps({"inputs": tensors}).encode()
    status, _, reply = Client(port).request(
        "POST", INFER, header + request["src"].tobytes(),
        {"Inference-Header-Content-Length": str(len(header))})
    assert status == 413, reply[:300]
    assert json.loads(reply)["error"].startswith(
        "the answer would take up to 125.0 MiB (output_0 [4096, 40, 16]: 2,621,440 values as "
        "JSON; output_1 [40, 4096, 16]: 2,621,440 values as JSON), over the response limit of "
        "64.0 MiB")


def test_health_answers_while_a_large_answer_is_computed_and_encoded(port, direct):
    """(2048, 24, 16) in binary, about 40 MB of JSON out: the run, and the JSON encoding (on
    the replica's event loop before), must not hold up health."""
    request = feed(NAME, np.random.default_rng(4), 24, 2048)
    body, headers = _body(request, binary=True, binary_out=False)
    done = threading.Event()
    reply = []

    def send() -> None:  # no JSON work here: it would hold this process's GIL, not the server's
        try:
            reply.append(Client(port).request("POST", INFER, body, headers))
        finally:
            done.set()

    sender = threading.Thread(target=send)
    sender.start()
    health = []
    while not done.is_set():
        health.append(_seconds(port, "GET", "/v2/health/ready"))
        time.sleep(0.02)
    sender.join()
    print(f"\nhealth during a {len(health) * 0.02:.1f}+ s request: {len(health)} answers, max "
          f"{1e3 * max(health):.0f} ms")
    answer = _decode(*reply[0])
    for name, want in direct(request).items():
        assert np.array_equal(answer[name], want)
    assert len(health) >= 3 and max(health) < 1.0, health

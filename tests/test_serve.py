"""`flash-export serve` for real: a local Ray cluster on loopback, 2 replicas, tritonclient.

One cluster for the whole module (its start is the expensive part). The server is stopped by the
fixture's context manager whatever happens, so a failing test cannot leave Ray running.
"""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic use

ray = pytest.importorskip("ray", reason="the serve extra (ray[serve]) is not installed")
httpclient = pytest.importorskip("tritonclient.http",
                                 reason="tritonclient[http] (dev extra) is not installed")

from _serving import serving  # noqa: E402  (a sibling module)

from flash_export.runtime import create_session  # noqa: E402
from flash_export.serving.limits import Limits  # noqa: E402

E, HEADS, CHUNK = 32, 4, 8
LIMITS = Limits(max_body_bytes=1 << 20, max_batch=4, max_length=96, body_timeout_s=2.0)
NAME = "att"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Path:
    import torch

    from flash_export import FlashAttention
    from flash_export.export.onnx import export_onnx

    folder = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)  # the same weights whichever tests ran before in this process
    return export_onnx(FlashAttention(E, HEADS, CHUNK).eval(), folder / f"{NAME}.onnx",
                       mask=True)


@dataclass
class Running:
    port: int
    process: subprocess.Popen
    banner: str


@pytest.fixture(scope="module")
def server(graph):
    """`flash-export serve` as a user runs it, in its own process; stopped by SIGTERM."""
    port = _free_port()
    with serving([str(graph), "--replicas", "2", "--port", str(port),
                   "--max-body-mib", str(LIMITS.max_body_bytes / 2**20), "--max-batch",
                   str(LIMITS.max_batch), "--max-length", str(LIMITS.max_length),
                   "--body-timeout", str(LIMITS.body_timeout_s), "--batch-size", "4",
                   "--max-ongoing", "128"]) as (process, banner):
        yield Running(port, process, banner)


@pytest.fixture(scope="module")
def direct(graph):
    session = create_session(graph)
    return lambda feed: session.run(["output"], feed)[0]


def _ray_processes(kind: str) -> list:
    """This test process's own Ray workers whose title names `kind` (other clusters may run)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if kind in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _feed(rng: np.random.Generator, batch: int, q_len: int, k_len: int) -> dict:
    values = rng.standard_normal((batch, k_len, E)).astype(np.float32)
    return {"values": values, "keys": rng.standard_normal((batch, k_len, E)).astype(np.float32),
            "queries": rng.standard_normal((batch, q_len, E)).astype(np.float32),
            "mask": rng.random((batch, 1, q_len, k_len)) > 0.25}


def _inputs(feed: dict, binary: bool) -> list:
    out = []
    for name, value in feed.items():
        tensor = httpclient.InferInput(name, list(value.shape),
                                       httpclient.np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value, binary_data=binary)
        out.append(tensor)
    return out


def test_health_and_metadata_through_tritonclient(server):
    assert server.banner.strip() == (f"serving {NAME} (2 replicas) at http://127.0.0.1:"
                                     f"{server.port}/v2/models/{NAME} (POST http://127.0.0.1:"
                                     f"{server.port}/v2/models/{NAME}/infer); Ctrl-C stops")
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME)
    meta = client.get_model_metadata(NAME)
    assert meta["inputs"] == [
        {"name": "values", "datatype": "FP32", "shape": [-1, -1, E]},
        {"name": "keys", "datatype": "FP32", "shape": [-1, -1, E]},
        {"name": "queries", "datatype": "FP32", "shape": [-1, -1, E]},
        {"name": "mask", "datatype": "BOOL", "shape": [-1, 1, -1, -1]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, -1, E]}]
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]


def test_load_from_16_clients_with_a_replica_killed(server, direct, capsys):
    """>= 500 requests, 16 clients, mixed lengths and masks; one replica is SIGKILLed midway.

    Every answer must equal a direct onnxruntime run; a request that fails because its replica
    died is retried and counted; the dead replica must come back.
    """
    clients, per_client = 16, 32
    total = clients * per_client
    done = [0]
    lock = threading.Lock()
    retries: dict = {}
    latencies: list = []
    mismatches: list = []
    kill_at = total // 3
    killed = threading.Event()

    replicas_before = _ray_processes("ServeReplica")
    assert len(replicas_before) == 2, [p.cmdline() for p in replicas_before]
    victim = replicas_before[0]

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}",
                                                  network_timeout=60.0)
        for i in range(per_client):
            feed = _feed(rng, int(rng.integers(1, 3)), int(rng.integers(1, 65)),
                         int(rng.integers(1, 65)))
            binary = bool(i % 2)
            outputs = [httpclient.InferRequestedOutput("output", binary_data=binary)]
            for _attempt in range(10):
                started = time.perf_counter()
                try:
                    result = client.infer(NAME, _inputs(feed, binary), outputs=outputs)
                    break
                except Exception as exc:  # counted by kind: a dropped replica, a reset socket
                    status = getattr(exc, "status", lambda: None)()
                    kind = f"HTTP {status}" if status else type(exc).__name__
                    with lock:
                        retries[kind] = retries.get(kind, 0) + 1
                    client.close()
                    client = httpclient.InferenceServerClient(
                        f"127.0.0.1:{server.port}", network_timeout=60.0)
                    time.sleep(0.2)
            else:
                raise AssertionError(f"request {seed}/{i} failed 10 times: {retries}")
            latencies.append(time.perf_counter() - started)
            got = result.as_numpy("output")
            want = direct(feed)
            if got is None or got.shape != want.shape or not np.array_equal(got, want,
                                                                            equal_nan=True):
                mismatches.append((seed, i))
            with lock:
                done[0] += 1
                if done[0] == kill_at:
                    os.kill(victim.pid, signal.SIGKILL)
                    killed.set()
        client.close()

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(work, range(clients)))
    elapsed = time.perf_counter() - started
    assert killed.is_set()
    assert not mismatches, f"{len(mismatches)} answers differ from onnxruntime: {mismatches[:5]}"
    assert len(latencies) == total
    assert sum(retries.values()) < total // 4, retries

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        replicas = _ray_processes("ServeReplica")
        if len(replicas) == 2 and victim.pid not in {p.pid for p in replicas}:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the killed replica did not come back: {replicas}")
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_model_ready(NAME)

    ms = np.array(latencies) * 1e3
    with capsys.disabled():
        print(f"\nserve load: {total} requests, {clients} clients, 2 replicas (one SIGKILLed "
              f"after {kill_at}): p50 {np.percentile(ms, 50):.1f} ms, p99 "
              f"{np.percentile(ms, 99):.1f} ms, {total / elapsed:.1f} req/s; retries {retries}")


# --------------------------------------------------------------------------- hostile requests

def _raw(port: int, data: bytes, timeout: float = 15.0, *, then: bytes = b"") -> tuple:
    """Send raw bytes, read the answer: (status, headers, body, seconds). Never hangs past
    `timeout`: a server that holds the connection fails the test instead."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if then:
            try:
                sock.sendall(then)
            except OSError:  # the server answered and closed while we were still sending
                pass
        chunks = b""
        while b"\r\n\r\n" not in chunks:
            piece = sock.recv(65536)
            assert piece, f"connection closed without an answer after {chunks[:200]!r}"
            chunks += piece
        head, _, body = chunks.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "-1"))
        while length < 0 or len(body) < length:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            body += piece
    return status, headers, body, time.monotonic() - started


def _post(path: str, body: bytes, *, headers: str = "", length=None) -> bytes:
    size = len(body) if length is None else length
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n{headers}Connection: close\r\n\r\n").encode() + body


def _json_request(feed: dict, *, datatype=None) -> dict:
    from flash_export.serving.protocol import DATATYPES

    return {"inputs": [{"name": n, "shape": list(v.shape),
                        "datatype": (datatype or {}).get(n, DATATYPES[v.dtype.name]),
                        "data": v.ravel().tolist()} for n, v in feed.items()]}


def _small_feed(q_len: int = 3, k_len: int = 5, batch: int = 1) -> dict:
    return _feed(np.random.default_rng(1), batch, q_len, k_len)


INFER = f"/v2/models/{NAME}/infer"


def _hostile_cases() -> dict:
    ok = _json_request(_small_feed())
    wrong_dtype = _json_request(_small_feed(), datatype={"values": "FP64"})
    bad_shape = json.loads(json.dumps(ok))
    bad_shape["inputs"][0]["shape"] = [1, 5]
    renamed = json.loads(json.dumps(ok))
    renamed["inputs"][1]["name"] = "kes"
    missing = {"inputs": ok["inputs"][:3]}
    too_long = _json_request(_small_feed(k_len=LIMITS.max_length + 1))
    too_wide = _json_request(_small_feed(batch=LIMITS.max_batch + 1))
    nan = json.dumps(ok).replace(str(ok["inputs"][0]["data"][0]), "NaN", 1).encode()
    huge_int = json.dumps(ok).replace('"shape": [1, 5, 32]', '"shape": [1, 5, ' + "9" * 400 + "]",
                                      1).encode()
    ok_body = json.dumps(ok).encode()
    # HTTP header bytes are latin-1: b"\xb2" is a superscript two, which str.isdigit accepts.
    superscript_header = _post(INFER, ok_body).replace(
        b"Connection:", b"Inference-Header-Content-Length: \xb2\r\nConnection:")
    superscript_length = _post(INFER, ok_body).replace(
        f"Content-Length: {len(ok_body)}".encode(), b"Content-Length: 1\xb2")
    mask_ints = json.loads(json.dumps(ok))
    mask_ints["inputs"][3]["data"] = [2] * len(mask_ints["inputs"][3]["data"])
    return {
        "content_length_1e9": (_post(INFER, b"{}", length=10**9), 413),
        "content_length_negative": (_post(INFER, b"{}", length=-1), 400),
        "content_length_over_the_body": (_post(INFER, b"{}", length=1000), 408),
        "oversized_body": (_post(INFER, b"[" * (LIMITS.max_body_bytes + 1)), 413),
        "wrong_dtype": (_post(INFER, json.dumps(wrong_dtype).encode()), 400),
        "wrong_rank": (_post(INFER, json.dumps(bad_shape).encode()), 400),
        "unknown_input_name": (_post(INFER, json.dumps(renamed).encode()), 400),
        "missing_input": (_post(INFER, json.dumps(missing).encode()), 400),
        "length_over_the_limit": (_post(INFER, json.dumps(too_long).encode()), 400),
        "batch_over_the_limit": (_post(INFER, json.dumps(too_wide).encode()), 400),
        "deep_nesting": (_post(INFER, b"[" * 100_000 + b"]" * 100_000), 400),
        "huge_integer": (_post(INFER, huge_int), 400),
        "nan_in_the_input": (_post(INFER, nan), 400),
        "mask_of_integers": (_post(INFER, json.dumps(mask_ints).encode()), 400),
        "gzip_body": (_post(INFER, b"x", headers="Content-Encoding: gzip\r\n"), 415),
        "header_length_superscript": (superscript_header, 400),
        "content_length_superscript": (superscript_length, 400),
        "unknown_model": (_post("/v2/models/other/infer", json.dumps(ok).encode()), 404),
        "get_on_infer": (f"GET {INFER} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                         .encode(), 405),
    }


@pytest.mark.parametrize("case", sorted(_hostile_cases()))
def test_a_hostile_request_gets_a_4xx_json_error_and_the_server_stays_up(server, case):
    data, status = _hostile_cases()[case]
    got, headers, body, seconds = _raw(server.port, data)
    assert got == status, (got, body[:300])
    if case in ("content_length_negative", "content_length_superscript"):
        # Not HTTP: uvicorn's parser (in Ray Serve's proxy) refuses it before any application
        # code sees a request, with its own plain-text 400 (README: Serving).
        assert body == b"Invalid HTTP request received." and headers["server"] == "uvicorn"
    else:
        assert headers.get("content-type") == "application/json", headers
        assert set(json.loads(body)) == {"error"}, body[:300]
    assert seconds < LIMITS.body_timeout_s + 5, seconds
    live = _raw(server.port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"
                                    b"Connection: close\r\n\r\n")
    assert live[0] == 200


def _rss_mb(kind: str) -> float:
    return sum(p.memory_info().rss for p in _ray_processes(kind)) / 2**20


def test_a_270_mb_chunked_body_is_cut_off_at_the_limit_with_memory_bounded(server):
    """No Content-Length to refuse up front: the replica counts what arrives and stops at it."""
    port = server.port
    before = {k: _rss_mb(k) for k in ("ProxyActor", "ServeReplica")}
    peak = dict(before)
    stop = threading.Event()
    answer = [b""]

    def watch() -> None:
        while not stop.is_set():
            for k in peak:
                peak[k] = max(peak[k], _rss_mb(k))
            time.sleep(0.05)

    def read(sock: socket.socket) -> None:
        try:
            while b"\r\n\r\n" not in answer[0]:
                piece = sock.recv(65536)
                if not piece:
                    break
                answer[0] += piece
        except OSError:
            pass
        stop.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    sent = 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            reader = threading.Thread(target=read, args=(sock,))
            reader.start()
            sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                         f"Content-Type: application/json\r\n\r\n".encode())
            chunk = b"%x\r\n" % (1 << 20) + b"[" * (1 << 20) + b"\r\n"  # 1 MiB a chunk
            try:
                while sent < 270 and not stop.is_set():
                    sock.sendall(chunk)
                    sent += 1
            except OSError:  # answered and closed
                pass
            reader.join(30)
    finally:
        stop.set()
        watcher.join()
    assert answer[0].startswith(b"HTTP/1.1 413"), answer[0][:300]
    grown = {k: round(peak[k] - before[k]) for k in peak}
    assert all(g < 192 for g in grown.values()), (grown, sent)  # measured: proxy +80 MB


def test_200_held_connections_do_not_stop_the_server(server):
    port = server.port
    (proxy,) = _ray_processes("ProxyActor")
    threads = proxy.num_threads()
    held = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n"
                         "{".encode())
            held.append(sock)
        status, _, body, seconds = _raw(port, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n"
                                              b"Connection: close\r\n\r\n")
        assert status == 200 and seconds < 5, (status, seconds)
        assert proxy.num_threads() < threads + 8, (threads, proxy.num_threads())
        # Each held request is answered 408 once its body is overdue, and its socket freed.
        sock = held[0]
        sock.settimeout(LIMITS.body_timeout_s + 10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")
    finally:
        for sock in held:
            sock.close()


def test_nan_in_binary_input_is_refused_and_non_finite_outputs_are_valid_json(server, direct):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    feed = _small_feed()
    feed["values"][0, 0, 0] = np.nan
    with pytest.raises(Exception, match=r"\[400\] input values: holds NaN"):
        client.infer(NAME, _inputs(feed, True))
    # Finite inputs whose projections overflow: near-max queries, with signs that push some
    # projected row past float32's range (which signs do depends on the weights: search).
    signs = np.random.default_rng(2)
    for _ in range(50):
        feed = _small_feed()
        feed["queries"][:] = 3e38 * signs.choice([-1.0, 1.0], size=feed["queries"].shape[-1])
        want = direct(feed)
        if not np.isfinite(want).all():
            break
    assert not np.isfinite(want).all(), "no near-max query made a non-finite output"
    status, _, body, _ = _raw(server.port, _post(INFER, json.dumps(
        _json_request(feed)).encode()))
    assert status == 200
    reply = json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    data = reply["outputs"][0]["data"]
    assert {d for d in data if isinstance(d, str)} <= {"NaN", "Infinity", "-Infinity"}
    got = client.infer(NAME, _inputs(feed, False), outputs=[
        httpclient.InferRequestedOutput("output", binary_data=False)]).as_numpy("output")
    assert np.array_equal(got, want, equal_nan=True)


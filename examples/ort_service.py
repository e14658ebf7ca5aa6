"""Serve an exported FlashAttention graph over HTTP with onnxruntime only (no torch).

    python examples/ort_service.py model.onnx --port 8000
    curl -X POST localhost:8000/attend -d '{"values": [[[...]]], "keys": ..., "queries": ...}'

POST /attend takes JSON {"values": (B, Lk, E), "keys": (B, Lk, E), "queries": (B, Lq, E)
[, "mask": bool (B, 1, Lq, Lk)]} as nested lists and answers {"output": (B, Lq, E)}; bad input
gets a 400 with {"error": "..."}. `--selftest` starts the service on an ephemeral port of
127.0.0.1, posts one random request, checks the output shape and exits 0 (1 on failure).
"""

import argparse
import json
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional

import numpy as np

from flash_export.errors import FlashExportError
from flash_export.runtime import create_session

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bool)": np.bool_}


class AttentionService:
    """One onnxruntime session; `attend` turns a JSON request into a JSON answer."""

    def __init__(self, model_path: str, threads: int = 0) -> None:
        self.session = create_session(model_path, intra_op_num_threads=threads)
        self.inputs = {i.name: i for i in self.session.get_inputs()}

    @property
    def embed(self) -> int:
        """E, the embedding size the graph was exported with."""
        return int(self.inputs["queries"].shape[2])

    def attend(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """Run the graph on one request; raises ValueError on a malformed one."""
        feeds = {}
        for name, meta in self.inputs.items():
            if name not in request:
                raise ValueError(f"missing field {name!r}")
            array = np.asarray(request[name], dtype=_DTYPES.get(meta.type, np.float32))
            if array.ndim != len(meta.shape):
                raise ValueError(f"{name} must have rank {len(meta.shape)}, got {array.ndim}")
            feeds[name] = array
        unknown = set(request) - set(self.inputs)
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}")
        try:
            (output,) = self.session.run(["output"], feeds)
        except Exception as exc:  # onnxruntime reports bad shapes as its own exception types
            raise ValueError(str(exc).strip().splitlines()[0]) from exc
        return {"output": output.astype(np.float32).tolist()}


def make_handler(service: AttentionService) -> type:
    """An HTTP handler class bound to `service`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path != "/attend":
                self._reply(404, {"error": f"no route {self.path}; POST /attend"})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
                request = json.loads(self.rfile.read(length))
                if not isinstance(request, dict):
                    raise ValueError("the body must be a JSON object")
                self._reply(200, service.attend(request))
            except (ValueError, TypeError) as exc:
                self._reply(400, {"error": str(exc)})

        def _reply(self, status: int, body: Dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # keep the self-test output clean; put a real access log here in production

    return Handler


def selftest(service: AttentionService) -> int:
    """Serve on an ephemeral port, post one request, check the answer's shape."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(service))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        rng = np.random.default_rng(0)
        batch, q_len, k_len, embed = 2, 5, 7, service.embed
        request: Dict[str, List[Any]] = {
            "values": rng.standard_normal((batch, k_len, embed)).tolist(),
            "keys": rng.standard_normal((batch, k_len, embed)).tolist(),
            "queries": rng.standard_normal((batch, q_len, embed)).tolist(),
        }
        if "mask" in service.inputs:
            request["mask"] = (rng.random((batch, 1, q_len, k_len)) > 0.2).tolist()
        url = f"http://127.0.0.1:{server.server_address[1]}/attend"
        post = urllib.request.Request(url, data=json.dumps(request).encode(),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=60) as answer:
            output = np.asarray(json.loads(answer.read())["output"])
        if output.shape != (batch, q_len, embed) or not np.isfinite(output).all():
            print(f"selftest FAILED: output shape {output.shape}, expected "
                  f"{(batch, q_len, embed)}", file=sys.stderr)
            return 1
        print(f"selftest ok: POST /attend -> output {list(output.shape)}")
        return 0
    finally:
        server.shutdown()
        server.server_close()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the exported .onnx file")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime intra-op threads (default 0: onnxruntime decides)")
    parser.add_argument("--selftest", action="store_true",
                        help="serve on an ephemeral port, post one request, exit")
    args = parser.parse_args(argv)
    try:
        service = AttentionService(args.model, args.threads)
    except FlashExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.selftest:
        return selftest(service)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(service))
    print(f"serving {args.model} on http://{args.host}:{server.server_address[1]}/attend")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

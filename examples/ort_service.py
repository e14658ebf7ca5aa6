"""Serve an exported graph over HTTP with onnxruntime and numpy only (no torch).

    python examples/ort_service.py model.onnx --port 8000
    curl -X POST localhost:8000/infer -d '{"input_ids": [[1, 2, 3]]}'

POST /infer takes a JSON object with one nested list per graph input, named as the model's
forward names them (an attention graph: "values", "keys", "queries" [, "mask"]), and answers one
nested list per output ({"logits": ...}). Each request is checked against the IOSpec recorded in
the graph (names, dtypes, ranks, static and shared dims, value ranges such as the vocabulary)
before it runs; a bad one gets a 400 with {"error": "..."}. POST /attend is the same route under
its old name. `--selftest` starts the service on an ephemeral port of 127.0.0.1, posts one
request generated from the IOSpec, checks every output and exits 0 (1 on failure).
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
from flash_export.io_spec import check_feed, make_feed
from flash_export.runtime import create_session, session_io


class GraphService:
    """One onnxruntime session; `infer` turns a JSON request into a JSON answer."""

    def __init__(self, model_path: str, threads: int = 0) -> None:
        self.session = create_session(model_path, intra_op_num_threads=threads)
        self.io = session_io(self.session)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def infer(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """Run the graph on one request; raises ValueError on a malformed one."""
        feed = {}
        for t in self.io.inputs:
            if t.name in request:
                feed[t.name] = np.asarray(request[t.name], dtype=t.dtype)
        feed.update({n: v for n, v in request.items() if n not in feed})  # named in the error
        check_feed(self.io, feed)
        try:
            results = self.session.run(self.outputs, feed)
        except Exception as exc:  # onnxruntime reports what the IOSpec cannot see itself
            raise ValueError(" ".join(str(exc).split())[:400]) from exc
        return {n: np.asarray(r, dtype=np.float64 if r.dtype.kind == "f" else r.dtype).tolist()
                for n, r in zip(self.outputs, results)}


def make_handler(service: GraphService) -> type:
    """An HTTP handler class bound to `service`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path not in ("/infer", "/attend"):
                self._reply(404, {"error": f"no route {self.path}; POST /infer"})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
                request = json.loads(self.rfile.read(length))
                if not isinstance(request, dict):
                    raise ValueError("the body must be a JSON object")
                self._reply(200, service.infer(request))
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


def selftest(service: GraphService) -> int:
    """Serve on an ephemeral port, post one request from the IOSpec, check every output."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(service))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        sizes = service.io.clamp({n: 2 if n == "batch" else 7 for n in service.io.dynamic})
        request = {n: a.tolist() for n, a in make_feed(service.io, sizes, seed=0).items()}
        url = f"http://127.0.0.1:{server.server_address[1]}/infer"
        post = urllib.request.Request(url, data=json.dumps(request).encode(),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=60) as answer:
            outputs = json.loads(answer.read())
        shapes = {n: list(np.asarray(outputs[n]).shape) for n in service.outputs}
        if set(outputs) != set(service.outputs) or not all(
                np.isfinite(np.asarray(outputs[n], dtype=np.float64)).all() for n in outputs):
            print(f"selftest FAILED: outputs {sorted(outputs)}, expected {service.outputs}, "
                  "all finite", file=sys.stderr)
            return 1
        print(f"selftest ok: POST /infer -> {shapes}")
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
        service = GraphService(args.model, args.threads)
    except FlashExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.selftest:
        return selftest(service)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(service))
    print(f"serving {args.model} on http://{args.host}:{server.server_address[1]}/infer")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`flash-export serve`: an exported graph on Ray Serve, speaking the Open Inference Protocol.

Each replica holds one onnxruntime session with our library (`flash_export.runtime`); requests
are checked and answered by `flash_export.serving.protocol`, and concurrent ones are merged into one
run by Ray Serve's batching (`serve.batch`) where the IOSpec declares a per-request batch. Ray
Serve's proxy (uvicorn) reads the HTTP request and streams its body to a replica, which enforces the
limits as it reads: a Content-Length over the limit is refused before a byte of the body is read,
a body that grows past it (chunked, or a Content-Length that lies low) is cut off at the limit,
and one that does not arrive in time (a Content-Length that lies high) gets 408. A request takes
a place to run only once its body has arrived, so slow senders hold no place that a complete
request needs, and health is answered whatever the request queue holds (`OIPDeployment`). A
graph exported for text-generation-with-past also answers the generate extension
(`flash_export.serving.generation`), one request's whole generation at a time on the runner. Needs
the serve extra (`pip install 'flash-export[serve]'`). `serving.server` starts and stops it.
"""

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from flash_export.core.errors import RequestError, first_line
from flash_export.runtime.generation import generate
from flash_export.serving.batching import run_many
from flash_export.serving.generation import generate_answer, parse_generate, unsupported_reason
from flash_export.serving.limits import Limits
from flash_export.serving.protocol import HEADER_LENGTH, OIPModel, error_body, json_body
from flash_export.serving.wire import byte_count

SERVE_EXTRA_HINT = "pip install 'flash-export[serve]' (Ray Serve)"


@dataclass(frozen=True)
class ServeConfig:
    """How to serve a graph.

    Attributes:
        replicas: Ray Serve replicas, each with its own onnxruntime session.
        threads: onnxruntime intra-op threads per replica (0: onnxruntime decides).
        address: a Ray cluster to join ("auto", "ray://host:10001", ...); None starts a local one.
        host: the address the HTTP proxy binds.
        port: the HTTP port.
        name: the model name in URLs; None: the artifact's file stem.
        limits: request bounds (`flash_export.serving.protocol.Limits`).
        max_batch_size: requests merged into one run by dynamic batching (1: no batching).
        batch_wait_s: how long a replica waits for more requests to batch.
        max_ongoing_requests: infer requests a replica parses, queues for a batch, runs and
            encodes at once, once their bodies have arrived; further ones wait for a place.
        max_pending_requests: infer requests a replica holds before that: sending their
            bodies, or waiting for a place; past it, 503 at once. Their bodies together stay
            within max_ongoing_requests x `Limits.max_body_bytes`. Health and metadata routes
            wait for neither (`HEALTH_SLOTS`).
        max_queued_requests: requests the proxy queues before answering 503 (when every
            replica's Ray slots are taken).
        request_timeout_s: end to end, past it the proxy answers 408.
        health_check_period_s: how often Ray Serve checks each replica (a dead one is replaced).
        replica_cpus: CPUs Ray reserves per replica (a fraction packs several on one CPU).
        start_timeout_s: how long `Server.start` waits for every replica to run.
    """

    replicas: int = 1
    threads: int = 0
    address: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8000
    name: Optional[str] = None
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = 8
    batch_wait_s: float = 0.002
    max_ongoing_requests: int = 64
    max_pending_requests: int = 256
    max_queued_requests: int = 256
    request_timeout_s: float = 60.0
    health_check_period_s: float = 10.0
    replica_cpus: float = 1.0
    start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.threads < 0 or not 0 <= self.port <= 65535 \
                or self.max_batch_size < 1 or self.batch_wait_s < 0 \
                or self.max_ongoing_requests < self.max_batch_size \
                or self.max_pending_requests < 1 \
                or self.max_queued_requests < 1 or not self.request_timeout_s > 0 \
                or not self.health_check_period_s > 0 or self.replica_cpus < 0 \
                or not self.start_timeout_s > 0:
            raise ValueError(f"invalid serve settings: {self}")


# Ray slots a replica keeps beyond its infer requests: health, metadata, and the 503s answered at
# once past `max_pending_requests`, are never queued behind requests.
HEALTH_SLOTS = 16
GRACEFUL_SHUTDOWN_S = 5.0  # how long a stopping replica lets its requests finish


class _ByteBudget:
    """Bytes of request bodies one replica holds at once; a read waits for room.

    Counted as bytes arrive, not as Content-Length promises, so connections that trickle hold
    almost none of it.
    """

    def __init__(self, total: int) -> None:
        self.free = total
        self._changed: Optional[asyncio.Event] = None

    async def take(self, count: int) -> None:
        while self.free < count:
            if self._changed is None:
                self._changed = asyncio.Event()
            self._changed.clear()
            await self._changed.wait()
        self.free -= count

    def give(self, count: int) -> None:
        self.free += count
        if self._changed is not None:
            self._changed.set()


class OIPDeployment:
    """A Ray Serve replica: one onnxruntime session, the OIP routes, batching, limits.

    Every request takes one of Ray's slots from its headers to its answer. An infer request
    first reads its body (at most `max_pending` of them at once, reading or waiting for a
    place; more get 503 at once), then takes one of `max_ongoing` places to be parsed, queued
    for a batch, run and encoded; health and metadata routes wait for neither. Parsing and
    encoding run on worker threads, as onnxruntime does, so the event loop stays free to answer.
    """

    def __init__(self, artifact: str, name: str, threads: int, limits: Limits,
                 max_batch_size: int, batch_wait_s: float, max_ongoing: int = 64,
                 max_pending: int = 256) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from ray import serve

        from flash_export.runtime.sessions import create_session, session_io

        options: Dict[str, Any] = {"config_entries": {"session.intra_op.allow_spinning": "0"}}
        if threads:
            options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
        session = create_session(artifact, **options)
        self.model = OIPModel(name, session, session_io(session), limits)
        self.prefix = f"/v2/models/{name}"
        # Bound per replica: serve.batch keeps its queue on the function it wraps.
        self._batched = serve.batch(max_batch_size=max_batch_size,
                                    batch_wait_timeout_s=batch_wait_s)(self._run_batch)
        self._max_pending, self._pending = max_pending, 0
        self._ongoing = asyncio.Semaphore(max_ongoing)
        self._bodies = _ByteBudget(max_ongoing * limits.max_body_bytes)
        self._codec = ThreadPoolExecutor(2, thread_name_prefix="oip-codec")
        self._no_generate = unsupported_reason(self.model.io)
        self._runner = ThreadPoolExecutor(1, thread_name_prefix="oip-run")

    async def _run_batch(self, feeds: List[Any]) -> List[Any]:
        # onnxruntime blocks, and releases the GIL: the event loop keeps answering meanwhile.
        return await asyncio.get_running_loop().run_in_executor(self._runner, run_many,
                                                                self.model, feeds)

    async def __call__(self, request: Any) -> Any:
        """Route one HTTP request (a starlette Request) to its OIP answer."""
        from starlette.responses import Response

        try:
            status, headers, body = await self._route(request)
        except RequestError as exc:
            status, headers, body = exc.status, {}, error_body(str(exc))
        except Exception as exc:  # anything unforeseen is still a protocol answer, not a drop
            status, headers, body = 500, {}, error_body(f"internal error: {first_line(exc)}")
        headers.setdefault("content-type", "application/json")
        return Response(body, status_code=status, headers=headers)

    async def _route(self, request: Any) -> Any:
        path = request.url.path.rstrip("/") or "/"
        method = request.method
        get = {"/v2/health/live": {}, "/v2/health/ready": {},
               "/v2": self.model.server_metadata(), self.prefix: self.model.metadata(),
               f"{self.prefix}/versions/1": self.model.metadata(), f"{self.prefix}/ready": {},
               f"{self.prefix}/versions/1/ready": {}}
        infer = (f"{self.prefix}/infer", f"{self.prefix}/versions/1/infer")
        generate = (f"{self.prefix}/generate", f"{self.prefix}/versions/1/generate")
        if path in get:
            if method not in ("GET", "HEAD"):
                raise RequestError(405, f"{path} takes GET, not {method}")
            return 200, {}, json_body(get[path])
        if path in generate and self._no_generate is not None:
            raise RequestError(404, f"no route {path[:100]}: {self._no_generate}")
        if path not in infer + generate:
            raise RequestError(404, f"no route {path[:100]}; this server has model "
                                    f"{self.model.name!r} ({self.prefix}/infer)")
        if method != "POST":
            raise RequestError(405, f"{path} takes POST, not {method}")
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise RequestError(415, f"Content-Encoding {encoding[:20]!r} is not supported; "
                                    "send the body uncompressed")
        if self._pending >= self._max_pending:
            raise RequestError(503, f"this replica holds {self._max_pending} requests sending "
                                    "their bodies or waiting to run; retry shortly")
        held = [0]  # body bytes taken from the budget
        self._pending += 1
        try:
            try:
                body = await self._read_body(request, held)
                await self._ongoing.acquire()
            finally:
                self._pending -= 1
            try:
                if path in generate:
                    return await self._generate(body)
                return await self._infer(body, request.headers.get(HEADER_LENGTH))
            finally:
                self._ongoing.release()
        finally:
            self._bodies.give(held[0])

    async def _infer(self, body: bytes, header_length: Optional[str]) -> Any:
        loop = asyncio.get_running_loop()
        parsed = await loop.run_in_executor(self._codec, self.model.parse, body, header_length)
        answer = await self._batched(parsed.feed)
        if isinstance(answer, RequestError):
            raise answer
        headers, reply = await loop.run_in_executor(self._codec, self.model.answer, parsed,
                                                    answer)
        return 200, headers, reply

    async def _generate(self, body: bytes) -> Any:
        loop = asyncio.get_running_loop()
        parsed = await loop.run_in_executor(self._codec, parse_generate, body, self.model.io,
                                            self.model.limits)
        tokens = await loop.run_in_executor(  # the runner: never beside an infer batch's run
            self._runner, lambda: generate(self.model.session, parsed.ids,
                                           max_new_tokens=parsed.max_tokens,
                                           sampling=parsed.sampling))
        return 200, {}, generate_answer(self.model.name, parsed, tokens)

    async def _read_body(self, request: Any, held: List[int]) -> bytes:
        """The body, within `Limits.max_body_bytes` and `Limits.body_timeout_s`.

        Its bytes are taken from the replica's budget as they arrive (`held[0]` counts them,
        for the caller to give back).
        """
        limits = self.model.limits
        declared = request.headers.get("content-length")
        if declared is not None:
            count = byte_count(declared, 18)
            if count is None:
                raise RequestError(400, f"Content-Length {declared.strip()[:20]!r} is not a "
                                        "byte count")
            if count > limits.max_body_bytes:
                raise RequestError(413, f"Content-Length {count} is over the limit of "
                                        f"{limits.max_body_bytes} bytes")
        waiting = [False]

        async def read() -> bytes:
            chunks = []
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise RequestError(413, f"the body passed the limit of "
                                            f"{limits.max_body_bytes} bytes")
                waiting[0] = True
                await self._bodies.take(len(chunk))
                waiting[0] = False
                held[0] += len(chunk)
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), limits.body_timeout_s)
        except asyncio.TimeoutError:
            if waiting[0]:
                raise RequestError(503, "this replica holds as many request bodies as it may "
                                        "(--max-ongoing x --max-body-mib); retry shortly") \
                    from None
            raise RequestError(408, f"the body did not arrive within {limits.body_timeout_s:g} "
                                    "s (a Content-Length larger than the body sent?)") from None


def with_limits(config: ServeConfig, **limits: Any) -> ServeConfig:
    """`config` with some `Limits` fields replaced."""
    return dataclasses.replace(config, limits=dataclasses.replace(config.limits, **limits))

"""A running `flash-export serve`: Ray, Serve's proxy and the replicas, started and stopped as one.

with Server("model.onnx", ServeConfig(replicas=2)) as server:
print(server.url)  # http://127.0.0.1:8000/v2/models/model
"""

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from flash_export.core.errors import FlashExportError, first_line
from flash_export.serving.artifact import model_name, require_onnx_graph
from flash_export.serving.protocol import OIPModel
from flash_export.serving.ray_serve import (
    GRACEFUL_SHUTDOWN_S,
    HEALTH_SLOTS,
    SERVE_EXTRA_HINT,
    OIPDeployment,
    ServeConfig,
)


class Server:
    """A running `flash-export serve`: Ray (local or joined), Serve's proxy and the replicas.

    A context manager; `stop()` (also on exit, and on a failed or interrupted start) ends it
    within seconds: on a cluster this process started, Serve shuts down (when the application
    runs) and Ray with it; on a joined cluster, only this application is deleted, and the
    cluster's Serve goes on.

    Args:
        artifact: the exported .onnx file.
        config: how to serve it.

    Attributes:
        unbatched: why concurrent requests are never joined into one run (None: they are, up
            to `ServeConfig.max_batch_size`).

    Raises:
        ArtifactError, RuntimeLibraryError: the file is not an ONNX graph (a TorchScript
            archive, say), or cannot be opened here (checked before Ray starts).
        FlashExportError: Ray Serve is not installed.
        ValueError: a bad model name.
    """

    def __init__(self, artifact: Union[str, os.PathLike], config: ServeConfig = ServeConfig()
                 ) -> None:
        self.artifact = Path(artifact).resolve()
        self.config = config
        self.name = model_name(artifact, config.name)
        self.own_cluster = False  # this process started the local Ray cluster
        self.connected = False  # this process called ray.init (and must disconnect)
        self.running = False
        require_onnx_graph(artifact, "serve")
        try:
            import ray  # noqa: F401  (fail before any work when the extra is missing)
            from ray import serve  # noqa: F401
        except ImportError as exc:
            raise FlashExportError(f"serve needs Ray Serve ({exc.name} is missing): "
                                   f"{SERVE_EXTRA_HINT}") from None
        from flash_export.runtime.sessions import create_session, session_io

        # The replicas open the same file; opening it here first reports a bad artifact as one
        # line before a cluster starts.
        session = create_session(self.artifact)
        io = session_io(session)
        OIPModel(self.name, session, io, config.limits)
        self.unbatched = "--batch-size is 1" if config.max_batch_size == 1 else \
            io.unbatched_reason()

    @property
    def url(self) -> str:
        """The model's base URL."""
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"http://{host}:{self.config.port}/v2/models/{self.name}"

    def start(self, progress: Optional[Callable[[str], None]] = None) -> "Server":
        """Start (or join) Ray, Serve's proxy and the replicas; returns when all are ready.

        Args:
            progress: called with one line whenever what the replicas wait for changes.

        Raises:
            FlashExportError: the port is taken (checked before a local cluster starts, and
                before Serve's proxy starts on a joined one), Ray or Serve cannot start, a
                replica fails, or the replicas are not all running within
                `ServeConfig.start_timeout_s` (naming the CPUs they reserve and the cluster's).
        """
        import ray
        from ray import serve

        config = self.config
        if config.address is None and not ray.is_initialized():
            require_free_port(config.host, config.port)  # before a cluster starts: at once
        try:
            if not ray.is_initialized():
                if config.address is None:
                    cpus = max(os.cpu_count() or 1,
                               math.ceil(config.replicas * config.replica_cpus))
                    ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                             log_to_driver=False, configure_logging=False)
                    self.own_cluster = True
                else:
                    ray.init(address=config.address, log_to_driver=False,
                             configure_logging=False)
                self.connected = True
            if not serve.status().proxies:  # no Serve on the cluster yet: its proxy will bind
                require_free_port(config.host, config.port)
            serve.start(http_options={"host": config.host, "port": config.port,
                                      "request_timeout_s": config.request_timeout_s})
            deployment = serve.deployment(
                name=self.name, num_replicas=config.replicas,
                max_ongoing_requests=(config.max_ongoing_requests
                                      + config.max_pending_requests + HEALTH_SLOTS),
                max_queued_requests=config.max_queued_requests,
                health_check_period_s=config.health_check_period_s,
                # Ctrl-C drains requests in flight for at most this long.
                graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
                ray_actor_options={"num_cpus": config.replica_cpus})(OIPDeployment)
            app = deployment.bind(str(self.artifact), self.name, config.threads, config.limits,
                                  config.max_batch_size, config.batch_wait_s,
                                  config.max_ongoing_requests, config.max_pending_requests)
            self.running = True
            serve.run_many([serve.RunTarget(app, name=self.name, route_prefix="/")],
                           wait_for_applications_running=False)
            self._wait_until_running(progress)
        except BaseException as exc:
            self.stop()
            if isinstance(exc, Exception) and not isinstance(exc, FlashExportError):
                raise FlashExportError(f"Ray Serve could not start {self.name}: "
                                       f"{first_line(exc)}") from exc
            raise
        return self

    def _wait_until_running(self, progress: Optional[Callable[[str], None]]) -> None:
        """Poll Serve until the application runs, fails, or `start_timeout_s` passes."""
        import ray
        from ray import serve

        config = self.config
        started = time.monotonic()
        deadline = started + config.start_timeout_s
        told = ""
        while True:
            app = serve.status().applications.get(self.name)
            status = str(getattr(app, "status", "")).rsplit(".", 1)[-1]
            if status == "RUNNING":
                return
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise FlashExportError(f"Ray Serve could not start {self.name}: "
                                       f"{_app_message(app) or status}")
            running = _running_replicas(app)
            free = ray.available_resources().get("CPU", 0.0)
            total = ray.cluster_resources().get("CPU", 0.0)
            waiting = (f"{running} of {config.replicas} replicas running; they reserve "
                       f"{config.replicas} x {config.replica_cpus:g} CPU, the cluster has "
                       f"{total:g} CPUs ({free:g} free)")
            short = free < config.replica_cpus
            if short and progress is not None and waiting != told \
                    and time.monotonic() > started + 3:
                progress(f"waiting for CPUs: {waiting}; giving up after "
                         f"{config.start_timeout_s:g} s")
                told = waiting
            if time.monotonic() > deadline:
                fits = math.floor(100 * total / config.replicas) / 100
                hint = (f"; pass --num-cpus {fits:g} (CPUs per replica) or fewer --replicas, "
                        "or add machines") if short and fits > 0 else "; add machines" \
                    if short else "; see `ray status` and the replica logs"
                raise FlashExportError(f"{self.name} did not start within "
                                       f"{config.start_timeout_s:g} s: {waiting}{hint}")
            time.sleep(0.25)

    def stop(self) -> None:
        """End it within seconds (see the class docstring); safe to call more than once."""
        import ray
        from ray import serve

        try:
            if self.running and ray.is_initialized():
                if not self.own_cluster:
                    serve.delete(self.name, _blocking=False)  # the cluster's Serve goes on
                elif str(getattr(serve.status().applications.get(self.name), "status",
                                 "")).endswith("RUNNING"):
                    serve.shutdown()  # drains requests in flight; a few seconds
        finally:
            self.running = False
            if self.connected and ray.is_initialized():
                ray.shutdown()  # a cluster this process started goes with it
            self.own_cluster = self.connected = False

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _app_message(app: Any) -> str:
    """The first line saying why an application (or one of its deployments) is not running."""
    messages = [getattr(app, "message", "")] + [
        getattr(d, "message", "") for d in getattr(app, "deployments", {}).values()]
    return next((first_line(Exception(m)) for m in messages if m), "")


def _running_replicas(app: Any) -> int:
    return sum(int(getattr(d, "replica_states", {}).get("RUNNING", 0))
               for d in getattr(app, "deployments", {}).values())


def _listen_address(host: str, port: int) -> Any:
    import socket

    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]


def require_free_port(host: str, port: int) -> None:
    """Bind `host`:`port` as the HTTP proxy will (SO_REUSEADDR), then let go.

    Raises:
        FlashExportError: the port is in use, or the address cannot be bound here.
    """
    import errno
    import socket

    if not port:
        return  # any free port
    try:
        family, kind, proto, _, address = _listen_address(host, port)
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise FlashExportError(f"port {port} on {host} is in use: stop what listens there "
                                   "or choose another --port") from None
        raise FlashExportError(f"cannot listen on {host}:{port}: "
                               f"{exc.strerror or first_line(exc)}") from None

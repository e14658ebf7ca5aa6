"""`flash-export serve` and `flash-export triton`: an exported graph behind a serving engine.

Registered on the `flash-export` group by `flash_export.cli`; like every command, each only
parses, calls one library function (`flash_export.serving.ray_serve`, `flash_export.serving.triton`)
and prints.
"""

import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import click

from flash_export.cli.options import Console, F, common_options


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# `serve`'s limits and sizes: (option, its range, its default (shown), help).
SERVE_LIMITS: List[Tuple[str, click.ParamType, float, str]] = [
    ("--max-body-mib", click.FloatRange(min=0.001), 16.0,
     "Largest request body (MiB); 413 past it."),
    ("--max-batch", click.IntRange(min=1), 64, "Largest batch dim of one request."),
    ("--max-length", click.IntRange(min=1), 4096,
     "Largest sequence length (every dynamic size but the batch), within the graph's own bounds."),
    ("--body-timeout", click.FloatRange(min=0.1), 10.0,
     "Seconds a request body may take to arrive; 408 past it."),
    ("--batch-size", click.IntRange(min=1), 8,
     "Dynamic batching: concurrent requests merged into one run, for a model that declares its "
     "per-request batch (1: off)."),
    ("--max-response-mib", click.FloatRange(min=0.001), 64.0,
     "Largest answer (MiB), checked from the output shapes before running; 413 past it."),
    ("--max-ongoing", click.IntRange(min=1), 64,
     "Requests one replica parses, queues and runs at once, once their bodies have arrived."),
    ("--max-pending", click.IntRange(min=1), 256,
     "Requests one replica holds sending their bodies or waiting for one of the --max-ongoing "
     "places; past it, 503 at once."),
    ("--num-cpus", click.FloatRange(min=0), 1.0,
     "CPUs Ray reserves for each replica (a fraction packs several replicas on one CPU)."),
    ("--start-timeout", click.FloatRange(min=1), 120.0,
     "Seconds to wait for every replica to run before giving up, naming the resources missing."),
]


def _number_options(table: List[Tuple[str, click.ParamType, float, str]]
                    ) -> Callable[[F], F]:
    """The options of `table`, in its order, each showing its default."""
    def decorate(f: F) -> F:
        for flag, kind, default, words in reversed(table):
            f = click.option(flag, type=kind, default=default, show_default=True, help=words)(f)
        return f

    return decorate


@click.command()
@common_options
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ray Serve replicas, each with its own onnxruntime session.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="onnxruntime intra-op threads per replica (0: onnxruntime decides).")
@click.option("--address", default=None,
              help="Ray cluster to join (auto, HOST:PORT, ray://HOST:10001). Default: start a "
                   "local one.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the HTTP proxy binds (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="HTTP port.")
@click.option("--name", default=None,
              help="Model name in URLs. Default: the artifact's file stem.")
@_number_options(SERVE_LIMITS)
def serve(artifact: Path, replicas: int, threads: int, address: Optional[str], host: str,
          port: int, name: Optional[str], max_body_mib: float, max_batch: int, max_length: int,
          body_timeout: float, batch_size: int, max_response_mib: float, max_ongoing: int,
          max_pending: int, num_cpus: float, start_timeout: float) -> None:
    """Serve ARTIFACT (.onnx) on Ray Serve with the Open Inference Protocol until Ctrl-C.

    Needs the serve extra: pip install 'flash-export[serve]'.
    """
    import signal

    from flash_export.serving.limits import Limits
    from flash_export.serving.ray_serve import ServeConfig
    from flash_export.serving.server import Server

    try:
        config = ServeConfig(
            replicas=replicas, threads=threads, address=address, host=host, port=port,
            name=name, max_batch_size=batch_size, replica_cpus=num_cpus,
            start_timeout_s=start_timeout,
            max_ongoing_requests=max(max_ongoing, batch_size),
            max_pending_requests=max_pending,
            limits=Limits(max_body_bytes=int(max_body_mib * 2**20), max_batch=max_batch,
                          max_length=max_length, body_timeout_s=body_timeout,
                          max_response_bytes=int(max_response_mib * 2**20)))
        server = Server(artifact, config)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    console = Console()
    # SIGINT even where it arrives ignored (a job started in the background by a script): Ctrl-C
    # during the start unwinds through Server.start, which stops what it started.
    signal.signal(signal.SIGINT, _interrupt)
    try:
        server.start(progress=lambda line: click.echo(line, err=True)
                     if console.verbosity >= 0 else None)
        # SIGTERM (a service manager's stop) unwinds like Ctrl-C, through the `finally` below;
        # set after Ray's start, which installs a SIGTERM handler of its own that exits.
        signal.signal(signal.SIGTERM, _interrupt)
        console.result(f"serving {server.name} ({replicas} replica{'s' * (replicas > 1)}) at "
                       f"{server.url} (POST {server.url}/infer); Ctrl-C stops")
        console.info(f"dynamic batching: up to {batch_size} requests per run" if
                     server.unbatched is None else
                     f"dynamic batching off: {server.unbatched}; each request runs alone")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    console.info("stopped")


@click.command()
@common_options
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("repo_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default=None,
              help="Model name in the repository. Default: the artifact's file stem.")
@click.option("--max-batch-size", type=click.IntRange(min=0), default=8, show_default=True,
              help="Triton's max_batch_size with dynamic batching (0: off; off anyway unless "
                   "the model declares its per-request batch at axis 0 of every input and "
                   "output).")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Instance group kind: KIND_CPU or KIND_GPU.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances per device.")
@click.option("--server-repo", default=None, metavar="ABS_PATH",
              help="Where Triton sees REPO_DIR (a container's /models); the library path in "
                   "config.pbtxt is built from it. Default: REPO_DIR's absolute path.")
def triton(artifact: Path, repo_dir: Path, name: Optional[str], max_batch_size: int,
           device: str, instances: int, server_repo: Optional[str]) -> None:
    """Write a Triton Inference Server model repository for ARTIFACT (.onnx) into REPO_DIR."""
    from flash_export.serving.triton import TritonConfig, server_command, write_repository

    try:
        config = TritonConfig(name=name, max_batch_size=max_batch_size, device=device,
                              instances=instances, server_repo=server_repo)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        written = write_repository(artifact, repo_dir, config)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    console = Console()
    console.info(f"wrote {written.parent}")
    console.result(" ".join(server_command(repo_dir, config)))

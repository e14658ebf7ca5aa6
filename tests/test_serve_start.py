"""`flash-export serve` says what is wrong, fast, and always stops: a non-ONNX file, a port in use,
a cluster without the CPUs its replicas reserve, Ctrl-C while they wait.

The cluster is a real one-CPU Ray cluster on loopback that `serve --address` joins, started by a
process of this module and stopped with everything it started.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic use

pytest.importorskip("ray", reason="the serve extra (ray[serve]) is not installed")

from test_serve import _free_port  # noqa: E402  (a sibling module)

from flash_export.cli.main import main  # noqa: E402

# Both sides of the joined cluster agree on no token (Ray's default makes a joining process
# look for the token where the cluster wrote it).
ENV = {"RAY_AUTH_MODE": "disabled"}
# The head prints its GCS address, then on each line read from stdin Serve's status as JSON:
# {"proxies": how many HTTP proxies Serve runs, "apps": name -> status}.
HEAD = """
import json, signal, sys, ray
from ray import serve
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
print(ray.get_runtime_context().gcs_address, flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
try:
    for _ in sys.stdin:
        s = serve.status()
        print(json.dumps({"proxies": len(s.proxies), "apps": {
            k: str(v.status).rsplit(".", 1)[-1] for k, v in s.applications.items()}}),
            flush=True)
finally:
    ray.shutdown()
"""


def _cli() -> list:
    exe = Path(sys.executable).with_name("flash-export")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "flash_export"]


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Path:
    """A stock ONNX graph (x -> x + 1): what is served does not matter here."""
    import onnx
    from onnx import TensorProto, helper

    model = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["output"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])]),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path_factory.mktemp("serve_start") / "add.onnx"
    onnx.save(model, str(path))
    return path


def test_a_torchscript_file_is_named_as_one_with_what_to_do(tmp_path):
    from flash_export import FlashAttention
    from flash_export.export.torchscript import export_torchscript

    archive = export_torchscript(FlashAttention(16, 2, 4).eval(), tmp_path / "fa.pt")
    run = CliRunner().invoke(main, ["serve", str(archive)])
    assert run.exit_code == 1, run.output
    assert run.output.strip() == (
        f"error: {archive} is a TorchScript archive, not an ONNX graph: `flash-export serve` "
        "runs .onnx files. Export one from the same model with `flash-export onnx` (or "
        "flash_export.export_onnx) and serve that; a .pt runs in libtorch or PyTorch")


def test_a_port_in_use_is_named_before_ray_starts(graph):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        run = subprocess.run([*_cli(), "serve", str(graph), "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - started
    assert run.returncode == 1, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: port {port} on 127.0.0.1 is in use: stop what listens there or choose "
        "another --port")
    assert "ray" not in run.stderr.lower()  # no cluster was started
    print(f"\nport in use: refused in {seconds:.1f} s")


class Cluster:
    def __init__(self, head: subprocess.Popen, address: str) -> None:
        self.head, self.address = head, address

    def serve_status(self) -> dict:
        self.head.stdin.write("\n")
        self.head.stdin.flush()
        return json.loads(self.head.stdout.readline())


@pytest.fixture(scope="module")
def cluster():
    """A one-CPU Ray cluster."""
    head = subprocess.Popen([sys.executable, "-c", HEAD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True, env={**os.environ, **ENV})
    family = []
    try:
        line = []
        reader = threading.Thread(target=lambda: line.append(head.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)
        assert line and line[0].strip(), "the Ray head did not start in 120 s"
        family = psutil.Process(head.pid).children(recursive=True)
        yield Cluster(head, line[0].strip())
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        finally:
            for p in family:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()
            if head.poll() is None:
                head.kill()


def _join(graph, address, *args) -> subprocess.Popen:
    return subprocess.Popen([*_cli(), "serve", str(graph), "--address", address,
                             "--port", str(_free_port()), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})


def test_replicas_the_cluster_cannot_hold_time_out_naming_the_cpus(graph, cluster):
    """3 replicas x 1 CPU on a 1-CPU cluster: before, serve waited forever, silently."""
    run = _join(graph, cluster.address, "--replicas", "3", "--name", "short", "--start-timeout",
                "5")
    try:
        _, err = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith(("waiting", "error"))]
    assert lines[-1] == (
        "error: short did not start within 5 s: 1 of 3 replicas running; they reserve 3 x 1 "
        "CPU, the cluster has 1 CPUs (0 free); pass --num-cpus 0.33 (CPUs per replica) or fewer "
        "--replicas, or add machines")
    assert lines[0].startswith("waiting for CPUs: ")


def test_ctrl_c_while_a_replica_waits_stops_within_seconds_and_only_this_application(
        graph, cluster):
    """--num-cpus 0.4: two of three replicas fit the one CPU, the third waits. Before, Ctrl-C
    was ignored until Serve's shutdown gave up (22-90 s), and stopping a `serve --address`
    shut Serve down for every application on the cluster."""
    run = _join(graph, cluster.address, "--replicas", "3", "--num-cpus", "0.4", "--name",
                "waiting")
    err = []
    reader = threading.Thread(target=lambda: err.extend(iter(run.stderr.readline, "")),
                              daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    try:
        while not any(line.startswith("waiting for CPUs: 2 of 3 replicas running; they "
                                      "reserve 3 x 0.4 CPU") for line in err):
            assert time.monotonic() < deadline and run.poll() is None, "".join(err)[-2000:]
            time.sleep(0.2)
        run.send_signal(signal.SIGINT)
        started = time.monotonic()
        run.wait(60)
    finally:
        if run.poll() is None:
            run.kill()
    seconds = time.monotonic() - started
    print(f"\nCtrl-C while a replica waits for CPUs: stopped in {seconds:.1f} s")
    assert seconds < 15 and run.returncode == 0, (seconds, "".join(err)[-2000:])
    status = cluster.serve_status()
    assert status["proxies"] >= 1, status  # the cluster's Serve still runs
    assert status["apps"].get("waiting", "DELETING") == "DELETING", status

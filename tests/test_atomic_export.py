"""Exports under SIGKILL: the previous artifact set survives intact and valid, or none exists."""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flash_export.artifacts.manifest import verify_manifest as verify_artifact
from flash_export.export.torchscript import load_torchscript

# A fork server: it imports torch and flash_export once, then for each line read (a seed) forks
# an exporter that exports `model` in a loop into argv[1], "ready PID" after its first export
# (when killing it has a previous artifact set to spare), and waits for it to die: each kill
# costs one export, not a Python start and torch's import. The server itself runs no torch op,
# so each exporter starts from torch as just imported; an exporter whose server is gone stops.
# It does import the modules an ONNX export loads on its first call (torch.export, dynamo, the
# torchlib registry: seconds per fork otherwise), so a kill lands in exporting, not in importing.
SCRIPT = """
import importlib, os, sys, torch
from flash_export import FlashAttention, export_torchscript
from flash_export.export.onnx import export_onnx
export = export_torchscript if sys.argv[2] == "torchscript" else export_onnx
if sys.argv[2] == "onnx":
    for name in ("torch._dynamo", "torch.export", "torch._functorch.aot_autograd",
                 "torch._export.passes", "torch.onnx._internal.exporter._core",
                 "onnxscript.function_libs.torch_lib.ops", "onnxscript.rewriter.onnx_fusions",
                 "onnxscript.evaluator", "flash_export.artifacts.trust"):
        importlib.import_module(name)
server = os.getpid()
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        torch.manual_seed(int(line))
        model = FlashAttention(256, 8, 16)
        export(model, sys.argv[1])
        print("ready", os.getpid(), flush=True)
        while os.getppid() == server:
            export(model, sys.argv[1])
        os._exit(0)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""
# Kill moments after "ready": up to about two export durations.
WINDOW_S = {"torchscript": 0.6, "onnx": 3.0}
KILLS = 12


def _check_artifact(kind: str, target: Path) -> None:
    verify_artifact(target)  # the file under the final name is one the manifest accepts
    if kind == "torchscript":
        _, meta = load_torchscript(target)
    else:
        import onnx

        model = onnx.load(str(target))
        onnx.checker.check_model(model, full_check=True)
        meta = {p.key: p.value for p in model.metadata_props}
    assert meta["embed"] == "256"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_sigkill_at_random_moments_never_leaves_a_partial_artifact(kind: str,
                                                                  tmp_path: Path) -> None:
    target = tmp_path / ("model.pt" if kind == "torchscript" else "model.onnx")
    rng = random.Random(1234)
    valid = 0
    server = subprocess.Popen([sys.executable, "-c", SCRIPT, str(target), kind],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdin is not None and server.stdout is not None
    watchdog = threading.Timer(600, server.kill)  # a hung exporter fails the test, not the run
    watchdog.start()
    try:
        for kill in range(KILLS):
            server.stdin.write(f"{kill}\n")
            server.stdin.flush()
            line = server.stdout.readline()
            assert line.startswith("ready "), f"kill {kind} #{kill}: the exporter said {line!r}"
            pid = int(line.split()[1])
            # Stratified: kill k lands at a random moment of the k-th of KILLS equal slices of
            # the window, so a dozen kills cover it as evenly as many more purely random ones.
            time.sleep(WINDOW_S[kind] * (kill + rng.random()) / KILLS)
            os.kill(pid, signal.SIGKILL)
            assert server.stdout.readline().strip() == "reaped"
            # An artifact set existed before the kill, so it must still be there, whole.
            assert target.exists(), f"kill {kind} #{kill} removed the previous artifact"
            _check_artifact(kind, target)
            valid += 1
    finally:
        watchdog.cancel()
        server.kill()
        server.wait()
    leftovers = [p.name for p in tmp_path.iterdir()
                 if p.name not in (target.name, f"{target.name}.manifest.json")]
    # Staging folders of killed runs may remain under hidden names; never under the final name.
    assert all(name.startswith(f".{target.name}.") for name in leftovers), leftovers
    assert valid == KILLS

"""flash_export.runtime: sessions, library registration, no torch, and the service example."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _service_check import SERVICE_CHECK  # a sibling module
from onnx import TensorProto, helper

from flash_export.core.errors import ArtifactError, RuntimeLibraryError
from flash_export.runtime import (
    create_session,
    library_path,
    model_domains,
    session_options,
    sessions,
)

ROOT = Path(__file__).resolve().parents[1]
E = 16


def _attention_like_graph(path: Path, custom: bool) -> Path:
    """A tiny graph with our I/O names: a FlashAttention node, or standard ops standing in."""
    inputs = [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", "k_len", E]),
              helper.make_tensor_value_info("keys", TensorProto.FLOAT, ["batch", "k_len", E]),
              helper.make_tensor_value_info("queries", TensorProto.FLOAT, ["batch", "q_len", E])]
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "q_len", E])
    opsets = [helper.make_opsetid("", 18)]
    if custom:
        nodes = [helper.make_node("FlashAttention", ["queries", "keys", "values"], ["output"],
                                  domain="com.flash_export", num_heads=2, chunk_size=4, causal=0,
                                  scale=1.0 / np.sqrt(E / 2))]
        opsets.append(helper.make_opsetid("com.flash_export", 1))
    else:
        axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
        nodes = [helper.make_node("Add", ["values", "keys"], ["vk"]),
                 helper.make_node("ReduceMean", ["vk", "axes"], ["mean"], keepdims=1),
                 helper.make_node("Add", ["queries", "mean"], ["output"])]
    graph = helper.make_graph(nodes, "g", inputs, [output],
                              initializer=[] if custom else [axes])
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=10), str(path))
    return path


@pytest.fixture()
def standard_graph(tmp_path):
    return _attention_like_graph(tmp_path / "standard.onnx", custom=False)


@pytest.fixture()
def custom_graph(tmp_path):
    return _attention_like_graph(tmp_path / "custom.onnx", custom=True)


@pytest.fixture()
def registrations(monkeypatch):
    calls = []
    monkeypatch.setattr(sessions, "register_library", lambda so, path=None: calls.append(so))
    return calls


def test_library_registered_only_for_the_custom_domain(standard_graph, custom_graph,
                                                       registrations):
    assert model_domains(standard_graph) == {""}
    assert model_domains(custom_graph) == {"", "com.flash_export"}
    session = create_session(standard_graph)
    assert registrations == []
    x = np.ones((2, 3, E), np.float32)
    out = session.run(["output"], {"values": x, "keys": x, "queries": x[:, :1]})[0]
    assert out.shape == (2, 1, E)
    with pytest.raises(ArtifactError):  # the stub registered nothing, so onnxruntime rejects it
        create_session(custom_graph)
    assert len(registrations) == 1


def test_missing_library_names_path_and_fix(custom_graph, monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "libflash_export.so"
    monkeypatch.setenv("FLASH_EXPORT_LIBRARY", str(missing))
    with pytest.raises(RuntimeLibraryError, match=r"not found at .*nowhere.*custom_ops/build\.py"):
        create_session(custom_graph)


def test_library_that_fails_to_register(custom_graph, monkeypatch, tmp_path):
    fake = tmp_path / "libflash_export.so"
    fake.write_text("not a shared object")
    monkeypatch.setenv("FLASH_EXPORT_LIBRARY", str(fake))
    with pytest.raises(RuntimeLibraryError, match="cannot register"):
        create_session(custom_graph)


def test_missing_or_corrupt_file_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        create_session(tmp_path / "absent.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(ArtifactError):
        create_session(bad)


def test_session_options_are_mapped(standard_graph):
    session = create_session(standard_graph, intra_op_num_threads=1, inter_op_num_threads=1,
                             graph_optimization_level="disable_all", execution_mode="sequential",
                             log_severity_level=3)
    so = session.get_session_options()
    assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert session.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize("options,error", [
    ({"no_such_option": 1}, TypeError),
    ({"graph_optimization_level": "fastest"}, ValueError),
    ({"execution_mode": "sideways"}, ValueError),
], ids=["unknown", "bad-level", "bad-mode"])
def test_bad_session_options(options, error):
    with pytest.raises(error):
        session_options(**options)


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_runtime_imports_no_torch():
    done = _run("import sys, flash_export.runtime\n"
                "assert 'torch' not in sys.modules, 'flash_export.runtime imported torch'\n")
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not Path(library_path()).is_file(),
                    reason=f"native library not built at {library_path()} (run "
                           "custom_ops/build.py and set FLASH_EXPORT_LIBRARY)")
def test_custom_node_runs_with_the_library(custom_graph):
    # A subprocess: a faulty native library must fail this test, not kill the run.
    done = _run("import numpy as np, sys\n"
                "from flash_export.runtime import create_session\n"
                f"s = create_session({str(custom_graph)!r})\n"
                f"x = np.random.default_rng(0).standard_normal((2, 5, {E})).astype(np.float32)\n"
                "out = s.run(['output'], {'values': x, 'keys': x, 'queries': x[:, :3]})[0]\n"
                f"assert out.shape == (2, 3, {E}) and np.isfinite(out).all(), out.shape\n"
                "assert 'torch' not in sys.modules\n")
    assert done.returncode == 0, done.stderr


def test_a_stock_graph_answers_an_oip_request_without_torch(standard_graph):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", SERVICE_CHECK, str(standard_graph)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "service ok {'output': [2, 7, 16]}" in done.stdout

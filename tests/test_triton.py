"""`flash-export triton`: the model repository, parsed with Triton's own config schema.

Triton does not install here, so the repository is checked field by field with
`tritonclient`'s `model_config_pb2`, and its graph is run the way Triton's onnxruntime backend
runs it: onnxruntime with the library at config.pbtxt's op_library_filename registered.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from flash_export.cli.main import main
from flash_export.core.errors import ExportError
from flash_export.export import onnx as onnx_export
from flash_export.runtime import create_session
from flash_export.serving.triton import TritonConfig, write_repository

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="tritonclient (dev extra) is not installed")
text_format = pytest.importorskip("google.protobuf.text_format")

E = 16


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    from flash_export import FlashAttention

    folder = tmp_path_factory.mktemp("triton")
    model = FlashAttention(E, 2, 4).eval()
    return {"custom": onnx_export.export_onnx(model, folder / "att.onnx", mask=True),
            "standard": onnx_export.export_onnx(model, folder / "std.onnx", target="standard"),
            "static": onnx_export.export_onnx(model, folder / "fixed.onnx", static_shapes=True)}


def _parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _feed(batch=2, q_len=3, k_len=5):
    rng = np.random.default_rng(0)
    return {"values": rng.standard_normal((batch, k_len, E)).astype(np.float32),
            "keys": rng.standard_normal((batch, k_len, E)).astype(np.float32),
            "queries": rng.standard_normal((batch, q_len, E)).astype(np.float32),
            "mask": rng.random((batch, 1, q_len, k_len)) > 0.3}


def test_the_repository_holds_what_triton_needs_and_runs_as_its_backend_would(graphs, tmp_path):
    written = write_repository(graphs["custom"], tmp_path / "repo")
    folder = tmp_path / "repo" / "att"
    assert written == folder / "config.pbtxt"
    config = _parse(written)
    t = model_config_pb2.DataType
    assert config.name == "att" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("values", t.TYPE_FP32, [-1, E]), ("keys", t.TYPE_FP32, [-1, E]),
        ("queries", t.TYPE_FP32, [-1, E]), ("mask", t.TYPE_BOOL, [1, -1, -1])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("output", t.TYPE_FP32, [-1, E])]
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, model_config_pb2.ModelInstanceGroup.Kind.KIND_CPU)]
    (library,) = config.model_operations.op_library_filename
    assert library == str((folder / "libflash_export.so").resolve())
    assert sorted(p.name for p in folder.rglob("*")) == ["1", "config.pbtxt",
                                                         "libflash_export.so", "model.onnx"]
    so = ort.SessionOptions()
    so.register_custom_ops_library(library)  # what the backend does with op_library_filename
    served = ort.InferenceSession(str(folder / "1" / "model.onnx"), so)
    feed = _feed()
    assert np.array_equal(served.run(None, feed)[0],
                          create_session(graphs["custom"]).run(None, feed)[0])


def test_gpu_instances_and_a_repository_seen_from_a_container(graphs, tmp_path):
    config = _parse(write_repository(graphs["custom"], tmp_path, TritonConfig(
        name="flash", device="gpu", instances=2, max_batch_size=32, server_repo="/models")))
    assert config.name == "flash" and config.max_batch_size == 32
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (2, model_config_pb2.ModelInstanceGroup.Kind.KIND_GPU)]
    assert list(config.model_operations.op_library_filename) == [
        "/models/flash/libflash_export.so"]


def test_a_stock_graph_needs_no_library_and_a_static_one_no_batching(graphs, tmp_path):
    stock = _parse(write_repository(graphs["standard"], tmp_path))
    assert not stock.HasField("model_operations")
    assert not (tmp_path / "std" / "libflash_export.so").exists()
    fixed = _parse(write_repository(graphs["static"], tmp_path))
    assert fixed.max_batch_size == 0 and not fixed.HasField("dynamic_batching")
    assert [list(i.dims) for i in fixed.input][0][0] > 0  # the batch dim stays in dims


def _transpose_graph(path: Path, io) -> Path:
    """A stock ONNX graph x (batch, seq, E) -> output (seq, batch, E), recording `io`."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["output"], perm=[1, 0, 2])], "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", E])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["seq", "batch", E])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    model.metadata_props.add(key="io_spec", value=io.to_json())
    onnx.save(model, str(path))
    return path


def test_triton_batches_only_a_declared_batch_at_axis_0_of_every_tensor(graphs, tmp_path):
    """Triton joins requests on axis 0: a (L, B, E) output, or a batch nobody declared, must
    get max_batch_size 0 (the issue: 8 and dynamic batching for both)."""
    from flash_export.core.io_spec import IOSpec, TensorSpec

    declared = IOSpec((TensorSpec("x", "float32", ("batch", "seq", E)),), ("output",),
                      {"batch": (1, None), "seq": (1, None)}, batch="batch")
    lbe = _parse(write_repository(_transpose_graph(tmp_path / "lbe.onnx", declared),
                                  tmp_path / "repo"))
    assert lbe.max_batch_size == 0 and not lbe.HasField("dynamic_batching")
    assert [list(i.dims) for i in lbe.input] == [[-1, -1, E]]
    undeclared = dataclasses.replace(declared, batch=None)
    plain = _parse(write_repository(_transpose_graph(tmp_path / "plain.onnx", undeclared),
                                    tmp_path / "repo"))
    assert plain.max_batch_size == 0
    assert _parse(write_repository(graphs["custom"], tmp_path / "repo")).max_batch_size == 8


def test_external_data_travels_with_the_graph(tmp_path, monkeypatch):
    from flash_export import FlashAttention

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1024)
    graph = onnx_export.export_onnx(FlashAttention(E, 2, 4).eval(), tmp_path / "big.onnx",
                                    target="standard")
    (data,) = tmp_path.glob("big.onnx.*.data")
    write_repository(graph, tmp_path / "repo")
    version = tmp_path / "repo" / "big" / "1"
    assert (version / data.name).read_bytes() == data.read_bytes()
    feed = {k: v for k, v in _feed().items() if k != "mask"}
    got = ort.InferenceSession(str(version / "model.onnx")).run(None, feed)[0]
    assert np.array_equal(got, create_session(graph).run(None, feed)[0])


def _stock_graph_with_data_in(folder: Path, location: str) -> Path:
    """x (batch, 64) @ W: a stock graph whose 64 KiB weight lives at `location`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["output"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 256])],
        [numpy_helper.from_array(weight, "w")]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    path = folder / "mm.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location=location,
                    size_threshold=0)
    return path


def test_external_data_in_a_subfolder_keeps_its_place_beside_the_graph(tmp_path):
    """Before: a FileNotFoundError traceback, and 1/model.onnx left without a config."""
    graph = _stock_graph_with_data_in(tmp_path, "weights/mm.data")
    write_repository(graph, tmp_path / "repo")
    version = tmp_path / "repo" / "mm" / "1"
    assert (version / "weights" / "mm.data").read_bytes() == \
        (tmp_path / "weights" / "mm.data").read_bytes()
    x = {"x": np.ones((2, 64), np.float32)}
    got = ort.InferenceSession(str(version / "model.onnx")).run(None, x)[0]
    assert np.array_equal(got, ort.InferenceSession(str(graph)).run(None, x)[0])


def test_a_dangling_symlink_at_the_model_folder_is_one_line(graphs, tmp_path):
    """Before: a FileExistsError traceback."""
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "att").symlink_to(tmp_path / "nowhere")
    run = CliRunner().invoke(main, ["triton", str(graphs["custom"]), str(tmp_path / "repo")])
    assert run.exit_code == 1
    assert run.output == (f"error: {tmp_path / 'repo' / 'att'} exists; choose another REPO_DIR "
                          "or --name\n")


def test_a_write_that_fails_midway_leaves_nothing_and_a_rerun_works(tmp_path):
    """A real failure: the file size limit (RLIMIT_FSIZE) lets the graph be copied, not its
    64 KiB of data. Before: a traceback, 1/model.onnx without a config, and a rerun refused
    because REPO/NAME existed."""
    import resource

    graph = _stock_graph_with_data_in(tmp_path, "mm.onnx.data")
    repo = tmp_path / "repo"
    exe = Path(sys.executable).with_name("flash-export")
    cli = [str(exe)] if exe.is_file() else [sys.executable, "-m", "flash_export"]
    run = subprocess.run([*cli, "triton", str(graph), str(repo)], capture_output=True,
                         text=True, timeout=120, preexec_fn=lambda: resource.setrlimit(
                             resource.RLIMIT_FSIZE, (16384, 16384)))
    assert run.returncode == 1, run.stderr
    assert run.stderr.startswith(f"error: cannot write the repository entry {repo / 'mm'}: File "
                                 "too large") and len(run.stderr.splitlines()) == 1, run.stderr
    assert sorted(p.name for p in repo.iterdir()) == []  # no half entry, no staging left
    write_repository(graph, repo)  # the rerun
    assert (repo / "mm" / "config.pbtxt").is_file()


def test_an_existing_model_folder_is_not_overwritten(graphs, tmp_path):
    write_repository(graphs["custom"], tmp_path)
    with pytest.raises(ExportError, match="exists"):
        write_repository(graphs["custom"], tmp_path)


def test_the_cli_writes_the_repository_and_prints_the_tritonserver_command(graphs, tmp_path):
    run = CliRunner().invoke(main, ["triton", str(graphs["custom"]), str(tmp_path / "repo"),
                                    "--server-repo", "/models"])
    assert run.exit_code == 0, run.output
    assert run.output.splitlines()[-1] == "tritonserver --model-repository=/models"
    bad = CliRunner().invoke(main, ["triton", str(graphs["custom"]), str(tmp_path / "r2"),
                                    "--server-repo", "models"])
    assert bad.exit_code == 2 and "absolute path" in bad.output
    exe = Path(sys.executable).with_name("flash-export")
    cli = [str(exe)] if exe.is_file() else [sys.executable, "-m", "flash_export"]
    done = subprocess.run([*cli, "triton", str(graphs["standard"]), str(tmp_path / "r3"),
                           "--device", "gpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == (f"tritonserver --model-repository="
                                            f"{(tmp_path / 'r3').resolve()}")
    assert "kind: KIND_GPU" in (tmp_path / "r3" / "std" / "config.pbtxt").read_text()


def test_the_readme_triton_example_runs_verbatim(tmp_path):
    import re

    from flash_export import FlashAttention

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Serving: `flash-export serve`"):]
    section = section[:section.index("\n## ", 10)]
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                if "flash-export triton" in b]
    (printed,) = [b for b in re.findall(r"```text\n(.*?)```", section, flags=re.S)
                  if b.startswith("tritonserver")]
    (tmp_path / "out").mkdir()
    onnx_export.export_onnx(FlashAttention(128, 8, 64).eval(),
                            tmp_path / "out" / "flash_attention.onnx")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == printed.strip()
    config = _parse(tmp_path / "triton_repo" / "flash_attention" / "config.pbtxt")
    assert list(config.model_operations.op_library_filename) == [
        "/models/flash_attention/libflash_export.so"]

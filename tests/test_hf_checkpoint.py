"""A transformers checkpoint folder exported for a task from the CLI, then validated against
transformers' eager attention in float64 at lengths it was not exported at, refused when the
folder or the graph is not what was exported, and answered through the serving protocol.

(Llama for text-generation runs as the README's Hugging Face section, a real subprocess.)"""

import json
import shutil

import pytest

pytest.importorskip("transformers", reason="flash_export.hf needs transformers: the hf extra "
                    "(pip install -e '.[hf]'; make test installs it)")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from flash_export.artifacts.files import sha256_file  # noqa: E402
from flash_export.bench.benchmark import BenchConfig, benchmark  # noqa: E402
from flash_export.check.validate import validate  # noqa: E402
from flash_export.cli.main import main  # noqa: E402
from flash_export.core.contract import DOMAIN, OP_NAME  # noqa: E402
from flash_export.core.errors import (  # noqa: E402
    ArtifactError,
    ConversionError,
    FlashExportError,
    ModelError,
)
from flash_export.core.feeds import make_feed  # noqa: E402
from flash_export.hf.export import export_hf_onnx  # noqa: E402
from flash_export.runtime import create_session, session_io  # noqa: E402
from flash_export.serving.protocol import DATATYPES, OIPModel  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)


def _save(model, folder):
    torch.manual_seed(0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A BERT checkpoint folder (token types, 64 positions) and its feature-extraction graph,
    exported by the CLI with its built-in check."""
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    folder = _save(tf.BertModel(tf.BertConfig(vocab_size=100, max_position_embeddings=64,
                                              **SMALL)), root / "bert")
    out = root / "bert.onnx"
    result = CliRunner().invoke(main, ["onnx", "--hf", str(folder), "--task",
                                       "feature-extraction", str(out)])
    assert result.exit_code == 0, result.output
    assert ("check: passed at lengths 17 and 40, batch 2, against transformers eager attention "
            "in float64") in result.output
    return folder, out


def test_a_bert_folder_exports_as_optimum_names_it_with_one_node_per_layer(bert):
    folder, out = bert
    proto = onnx.load(str(out))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask",
                                                   "token_type_ids"]
    assert [o.name for o in proto.graph.output] == ["last_hidden_state"]
    assert all(d.dim_param for i in proto.graph.input for d in i.type.tensor_type.shape.dim)
    nodes = [n for n in proto.graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in nodes] == [OP_NAME] * 2
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["hf_task"] == "feature-extraction" and meta["hf_model_class"] == "BertModel"
    assert json.loads(meta["hf_weights"]) == {
        "model.safetensors": sha256_file(folder / "model.safetensors")}
    assert json.loads(meta["hf_config"]) == json.loads((folder / "config.json").read_text())
    io = json.loads(meta["io_spec"])
    assert io["sizes"] == {"batch": [1, None], "seq": [1, 64]} and io["batch"] == "batch"
    mask = next(t for t in io["inputs"] if t["name"] == "attention_mask")
    assert (mask["dtype"], mask["role"], mask["low"], mask["high"]) == ("int64", "padding", 0, 2)


def test_validate_passes_at_lengths_not_seen_at_export_and_says_what_it_compared(bert):
    _, out = bert
    result = CliRunner().invoke(main, ["validate", str(out), "--seq", "1,9,64", "--batch", "1,3",
                                       "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])
    assert report["passed"] and report["spec_source"] == "checkpoint"
    assert "transformers eager attention in float64" in report["reference"]
    lengths = {c["sizes"]["seq"] for b in report["backends"] for c in b["cases"]}
    assert lengths == {1, 9, 64}  # 17 was the export's length
    assert {b["name"] for b in report["backends"]} == {"pytorch", "onnx:custom"}
    assert all(len(b["cases"]) == 12 for b in report["backends"])  # 3 lengths x 2 batches x mask


def test_validate_fails_a_graph_whose_weights_were_edited(bert, tmp_path):
    _, out = bert
    proto = onnx.load(str(out))
    weights = {t.name: t for t in proto.graph.initializer}
    weight = next(weights[n.input[1]] for n in proto.graph.node
                  if n.op_type == "MatMul" and n.input[1] in weights)  # the first projection
    values = onnx.numpy_helper.to_array(weight).copy()
    values[0] += 0.5  # one input feature's row (a column would cancel: LayerNorm's mean is 0)
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    edited = tmp_path / "edited.onnx"
    onnx.save(proto, str(edited))
    report = validate(edited, seq=[9], batch=[2])
    assert not report.passed
    assert {b.name for b in report.backends if not b.passed} == {"onnx:custom"}


def test_validate_refuses_a_folder_whose_weights_or_config_are_not_the_exported_ones(bert,
                                                                                    tmp_path):
    folder, out = bert
    other = tmp_path / "retrained"
    shutil.copytree(folder, other)
    torch.manual_seed(1)
    tf.BertModel(tf.BertConfig.from_pretrained(folder)).save_pretrained(other)
    with pytest.raises(ArtifactError, match="weights .* are not the ones bert.onnx was "
                                            "exported with"):
        validate(out, checkpoint=other)
    shutil.copy(folder / "model.safetensors", other / "model.safetensors")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-5}))
    with pytest.raises(ArtifactError, match="config.json is not the config"):
        validate(out, checkpoint=other)


def test_bench_times_the_graph_against_the_checkpoint_in_pytorch(bert):
    _, out = bert
    report = benchmark(out, config=BenchConfig(seqs=(9, 33), batches=(2,), iters=2, warmup=1,
                                               memory=False,
                                               backends=("custom", "eager", "sdpa", "native")))
    rows = {(r.backend, r.seq_q): r for r in report.rows}
    assert set(rows) == {(b, n) for b in ("custom", "eager", "sdpa", "native") for n in (9, 33)}
    assert all(r.status == "ok" and r.p50_ms > 0 and r.batch == 2 for r in rows.values()), rows
    assert report.spec["model"].startswith("BertModel from ")
    with pytest.raises(FlashExportError, match=r"backends \['standard'\] do not apply"):
        benchmark(out, config=BenchConfig(backends=("standard",)))


def test_the_protocol_answers_a_tokenised_batch_as_onnxruntime_computes_it(bert):
    """int64 ids and a 0/1 mask pass the request checks, and two requests of one length share
    a run."""
    _, out = bert
    session = create_session(out)
    model = OIPModel("bert", session, session_io(session))
    assert model.batch_axes == {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0,
                                "last_hidden_state": 0}
    feed = make_feed(model.io, {"batch": 2, "seq": 7}, seed=3)
    body = json.dumps({"inputs": [
        {"name": n, "datatype": DATATYPES[v.dtype.name], "shape": list(v.shape),
         "data": v.ravel().tolist()} for n, v in feed.items()]}).encode()
    request = model.parse(body)
    _, answer = model.answer(request, model.run(request.feed))
    (got,) = json.loads(answer)["outputs"]
    want = session.run(["last_hidden_state"], feed)[0]
    assert got["shape"] == [2, 7, 64]
    assert np.array_equal(np.asarray(got["data"], np.float32).reshape(want.shape), want)
    bad = dict(feed, input_ids=np.full((2, 7), 100, np.int64))  # the vocabulary is 100
    with pytest.raises(Exception, match=r"input_ids: values must be in \[0, 100\)"):
        model.parse(json.dumps({"inputs": [
            {"name": n, "datatype": DATATYPES[v.dtype.name], "shape": list(v.shape),
             "data": v.ravel().tolist()} for n, v in bad.items()]}).encode())


def test_a_vit_folder_exports_for_image_classification_and_validates(tmp_path):
    torch.manual_seed(0)
    folder = _save(tf.ViTForImageClassification(tf.ViTConfig(
        image_size=32, patch_size=8, num_labels=3, **SMALL)), tmp_path / "vit")
    out = tmp_path / "vit.onnx"
    result = CliRunner().invoke(main, ["onnx", "--hf", str(folder), "--task",
                                       "image-classification", "--no-check", str(out)])
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out)).graph
    assert [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
            for i in graph.input] == [("pixel_values", ["batch", 3, 32, 32])]
    assert [o.name for o in graph.output] == ["logits"]
    report = validate(out, batch=[1, 4])
    assert report.passed, report.failure_lines()
    assert [len(b.cases) for b in report.backends] == [2, 2]  # one shape per batch: no length


def test_refusals_name_what_is_wrong_before_anything_is_exported(tmp_path):
    torch.manual_seed(0)
    vit = _save(tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, **SMALL)),
                tmp_path / "vit")
    with pytest.raises(ModelError, match="does not load for task text-generation"):
        export_hf_onnx(vit, tmp_path / "a.onnx", task="text-generation")
    with pytest.raises(ModelError, match="unknown task 'translation'; choose one of "
                                         "feature-extraction, text-generation"):
        export_hf_onnx(vit, tmp_path / "a.onnx", task="translation")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(vit / "config.json", pickled)
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"no safetensors weights \(only pytorch_model.bin: "
                                         "pickle"):
        export_hf_onnx(pickled, tmp_path / "a.onnx", task="feature-extraction")
    gemma2 = _save(tf.Gemma2ForCausalLM(tf.Gemma2Config(
        vocab_size=100, head_dim=16, num_key_value_heads=2, **SMALL)), tmp_path / "gemma2")
    with pytest.raises(ConversionError, match="softcapping"):
        export_hf_onnx(gemma2, tmp_path / "a.onnx", task="text-generation")
    assert not list(tmp_path.glob("*.onnx"))


def test_the_cli_refuses_options_that_do_not_apply_to_a_checkpoint(bert, tmp_path):
    folder, out = bert
    runner = CliRunner()
    alone = runner.invoke(main, ["onnx", "--hf", str(folder), str(tmp_path / "a.onnx")])
    assert alone.exit_code == 2 and "--hf DIR and --task TASK go together" in alone.output
    mixed = runner.invoke(main, ["onnx", "--hf", str(folder), "--task", "feature-extraction",
                                 "--target", "standard", "--heads", "2",
                                 str(tmp_path / "a.onnx")])
    assert mixed.exit_code == 2 and "--target, --heads do not apply to --hf" in mixed.output
    with pytest.raises(FlashExportError, match="exported from a transformers checkpoint"):
        validate(out, dtype="float16")

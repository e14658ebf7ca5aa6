"""`text-generation-with-past`: one graph with the KV cache in and out, run token by token by
`flash_export.runtime.generate` (numpy and onnxruntime, no torch), giving transformers' greedy
`generate` tokens on left-padded batches; sampling, end-of-sequence and refusals."""

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

pytest.importorskip("transformers", reason="flash_export.hf needs transformers: the hf extra "
                    "(pip install -e '.[hf]'; make test installs it)")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402
from _serving import serving  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from test_serve import _free_port  # noqa: E402

from flash_export.bench.benchmark import benchmark  # noqa: E402
from flash_export.check.validate import validate  # noqa: E402
from flash_export.cli.main import main  # noqa: E402
from flash_export.core.errors import FlashExportError  # noqa: E402
from flash_export.runtime import Sampling, create_session, generate  # noqa: E402

SMALL = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=96)
CHECKPOINTS = {
    "llama-gqa": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2,
                                                            pad_token_id=0, **SMALL)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=100, n_embd=64, n_layer=2,
                                                     n_head=4, n_positions=128)),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> (name, checkpoint folder, with-past graph), each exported once by the CLI
    without its check."""
    made = {}

    def get(name):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            CHECKPOINTS[name]().save_pretrained(root / "ckpt")
            out = root / "model.onnx"
            result = CliRunner().invoke(main, ["onnx", "--hf", str(root / "ckpt"), "--task",
                                               "text-generation-with-past", "--no-check",
                                               str(out)])
            assert result.exit_code == 0, result.output
            made[name] = (name, root / "ckpt", out)
        return made[name]

    return get


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def exported(request, checkpoint):
    return checkpoint(request.param)


def _prompt(batch=3, length=9, seed=0):
    ids = np.random.default_rng(seed).integers(3, 100, size=(batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1, :4] = 0  # left padding
    mask[2, :length - 1] = 0  # one real token
    return ids, mask


def test_the_graph_takes_and_returns_the_cache_as_optimum_names_it(exported):
    name, _, out = exported
    graph = onnx.load(str(out)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    kv_heads = 2 if name == "llama-gqa" else 4  # grouped heads stay grouped in the cache
    assert [i.name for i in graph.input] == [
        "input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
        "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert [o.name for o in graph.output] == [
        "logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert dims["attention_mask"] == ["batch", "total"]
    assert dims["past_key_values.1.value"] == ["batch", kv_heads, "past", 16]
    assert dims["present.1.value"][:2] == ["batch", kv_heads]
    assert sum(n.domain == "com.flash_export" for n in graph.node) == 2


def test_validate_finds_eagers_32_greedy_tokens_on_left_padded_batches(exported):
    _, _, out = exported
    report = validate(out, seq=[13], batch=[3])  # the export traced 5 new tokens, 7 cached
    assert report.passed, report.failure_lines()
    generation = [c for c in report.checks if c.name.startswith("generate.")]
    assert [(c.name, c.got) for c in generation] == [("generate.B=3.L=13", "identical")]


def test_generate_equals_transformers_generate_without_importing_torch(exported, tmp_path):
    _, folder, out = exported
    ids, mask = _prompt()
    eager = tf.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    with torch.no_grad():
        theirs = eager.eval().generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(
            mask), max_new_tokens=12, do_sample=False).numpy()
    code = ("import sys, json, numpy as np\n"
            "sys.modules['torch'] = None  # any import of torch now fails\n"
            "from flash_export.runtime import generate\n"
            f"ids, mask = np.array({ids.tolist()}), np.array({mask.tolist()})\n"
            f"print(json.dumps(generate({str(out)!r}, ids, mask, max_new_tokens=12).tolist()))\n"
            "assert 'transformers' not in sys.modules\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert np.array_equal(np.array(json.loads(run.stdout)), theirs)


def test_sampling_is_seeded_and_top_k_1_is_greedy(exported):
    _, _, out = exported
    session = create_session(out)
    ids, mask = _prompt()
    greedy = generate(session, ids, mask, max_new_tokens=8)
    hot = [Sampling(do_sample=True, temperature=5.0, seed=s) for s in (1, 1, 2)]
    drawn = [generate(session, ids, mask, max_new_tokens=8, sampling=h) for h in hot]
    assert np.array_equal(drawn[0], drawn[1]) and not np.array_equal(drawn[0], drawn[2])
    assert not np.array_equal(drawn[0], greedy)  # a hot softmax over 100 tokens wanders
    top1 = generate(session, ids, mask, max_new_tokens=8,
                    sampling=Sampling(do_sample=True, top_k=1, seed=3))
    assert np.array_equal(top1, greedy)


def test_a_row_that_ends_continues_with_padding_and_all_ended_stops(exported):
    _, _, out = exported
    session = create_session(out)
    ids, mask = _prompt()
    greedy = generate(session, ids, mask, max_new_tokens=6)
    first = int(greedy[0, 9])  # row 0's first new token, made its end of sequence
    ended = generate(session, ids, mask, max_new_tokens=6, eos_token_id=first, pad_token_id=99)
    assert ended[0, 9] == first and (ended[0, 10:] == 99).all()
    for row in (1, 2):  # the others run on until they meet it themselves
        hits = np.flatnonzero(greedy[row, 9:] == first)
        stop = 9 + (hits[0] + 1 if len(hits) else 6)
        assert np.array_equal(ended[row, :stop], greedy[row, :stop])
    every = generate(session, ids, mask, max_new_tokens=6, eos_token_id=list(greedy[:, 9]))
    assert every.shape == (3, 10)  # each row ended on its first token: one step


def test_validate_fails_a_graph_whose_weights_were_edited(exported, tmp_path):
    _, _, out = exported
    proto = onnx.load(str(out))
    weights = {t.name: t for t in proto.graph.initializer}
    weight = next(weights[n.input[1]] for n in reversed(proto.graph.node)
                  if n.op_type == "MatMul" and n.input[1] in weights)  # the LM head
    values = onnx.numpy_helper.to_array(weight).copy()
    # Token 7's logit moves along a random direction of the final hidden state (adding a
    # constant would cancel: a normalised hidden state sums to about 0).
    values[:, 7] += 3 * np.random.default_rng(0).standard_normal(values.shape[0])
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    edited = tmp_path / "edited.onnx"
    onnx.save(proto, str(edited))
    report = validate(edited, seq=[9], batch=[3])
    (check,) = [c for c in report.checks if c.name.startswith("generate.")]
    assert not report.passed and "differs at new token" in check.got


def test_generate_refuses_a_graph_without_a_cache_and_bad_inputs(exported, tmp_path):
    _, _, out = exported
    ids, mask = _prompt()
    plain = tmp_path / "plain.onnx"  # token inputs, no cache: what text-generation exports
    node = onnx.helper.make_node("Identity", ["input_ids"], ["logits"])
    inputs = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT64, ["b", "s"])
              for n in ("input_ids", "attention_mask", "position_ids")]
    graph = onnx.helper.make_graph([node], "plain", inputs, [
        onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.INT64, ["b", "s"])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)],
                                     ir_version=9), str(plain))
    with pytest.raises(FlashExportError, match="not a text-generation-with-past graph"):
        generate(plain, ids, mask, max_new_tokens=2)
    session = create_session(out)
    with pytest.raises(FlashExportError, match="input_ids must be a non-empty"):
        generate(session, ids.astype(np.float32), mask, max_new_tokens=2)
    with pytest.raises(FlashExportError, match="attention_mask must be 0/1"):
        generate(session, ids, mask * 2, max_new_tokens=2)
    with pytest.raises(FlashExportError, match="temperature must be > 0"):
        Sampling(temperature=0.0)
    with pytest.raises(FlashExportError, match="is a with-past graph: its cost is the decode"):
        benchmark(out)


def _post(url, doc):
    request = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_answers_the_generate_extension_over_http(checkpoint):
    """`flash-export serve` on a with-past graph: POST .../generate with token ids as text gives
    the ids `generate` computes; a bad request is a 400 naming the problem; infer still works."""
    _, _, out = checkpoint("llama-gqa")
    port = _free_port()
    prompt = [5, 17, 99, 42, 7]
    want = generate(out, np.array([prompt]), max_new_tokens=8)[0, len(prompt):]
    with serving([str(out), "--port", str(port), "--name", "llama"]):
        url = f"http://127.0.0.1:{port}/v2/models/llama/generate"
        status, answer = _post(url, {"text_input": " ".join(map(str, prompt)), "id": "r1",
                                     "parameters": {"max_tokens": 8}})
        assert status == 200, answer
        assert answer == {"model_name": "llama", "model_version": "1", "id": "r1",
                          "text_output": " ".join(str(t) for t in want)}
        status, answer = _post(url, {"text_input": "5 100"})
        assert status == 400 and "token ids must be in [0, 100)" in answer["error"]
        status, answer = _post(url, {"text_input": "5", "parameters": {"max_tokens": 5000}})
        assert status == 400 and "within" in answer["error"]

"""Model factories: the zoo's and a user's own file, built from FlashAttention and rebuilt
exactly from a spec."""

from pathlib import Path

import pytest
import torch

from flash_export import FlashAttention, ModelError, ModelSpec
from flash_export.nn.model_io import reference_outputs

ENCODER = "flash_export.models.encoder:build"
USER_FILE = '''
from flash_export import FlashAttention


def build(embed_size, heads, chunk_size, causal):
    return FlashAttention(embed_size, heads, chunk_size, causal=causal)
'''


@pytest.fixture()
def user_factory(tmp_path: Path) -> str:
    (tmp_path / "mine.py").write_text(USER_FILE)
    return f"{tmp_path / 'mine.py'}:build"


def test_encoder_is_built_from_flash_attention_and_matches_float64_reference():
    model = ModelSpec(embed=64, heads=4, chunk=8, model=ENCODER).build()
    assert sum(isinstance(m, FlashAttention) for m in model.modules()) == 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 21, 64, generator=g)
    pad = torch.arange(21)[None, :] < torch.tensor([[21], [13]])  # (2, 21), True = real token
    with torch.no_grad():
        got = model(x, pad).double()
    (ref,) = reference_outputs(model, {"x": x, "padding_mask": pad})
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", [None, ENCODER, "user"], ids=["default", "zoo", "file"])
def test_same_spec_builds_identical_weights_and_seed_changes_them(model, user_factory):
    model = user_factory if model == "user" else model
    a = ModelSpec(embed=32, heads=2, chunk=8, model=model).build().state_dict()
    b = ModelSpec(embed=32, heads=2, chunk=8, model=model).build().state_dict()
    c = ModelSpec(embed=32, heads=2, chunk=8, model=model, seed=1).build().state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_weights_load_strictly_and_mismatch_is_one_line(tmp_path):
    spec = ModelSpec(embed=32, heads=2, chunk=8)
    trained = spec.build()
    with torch.no_grad():
        trained.q_proj.weight.add_(1.0)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    loaded = ModelSpec(embed=32, heads=2, chunk=8, weights=str(tmp_path / "w.pt")).build()
    assert torch.equal(loaded.q_proj.weight, trained.q_proj.weight)
    with pytest.raises(ModelError, match="do not fit") as err:
        ModelSpec(embed=64, heads=2, chunk=8, weights=str(tmp_path / "w.pt")).build()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("model,message", [
    ("nofactory", "FILE.py:FACTORY"),
    ("missing.py:build", "not found"),
    ("user:nope", "no callable"),
    ("flash_export.models.nosuch:build", "is not a model of the zoo; its models are "),
    ("flash_export.models.gpt:nope", "has no callable 'nope'"),
], ids=["syntax", "missing-file", "missing-factory", "missing-module", "missing-zoo-factory"])
def test_bad_model_option_is_a_model_error(model, message, user_factory):
    model = model.replace("user", user_factory.rpartition(":")[0])
    with pytest.raises(ModelError, match=message):
        ModelSpec(model=model).build()


def test_zoo_models_are_sized_on_the_meta_device_before_any_build():
    spec = ModelSpec(embed=4096, heads=32, chunk=64, model="flash_export.models.gpt:build")
    assert spec.parameter_count() > 12 * 4096 * 4096  # counted without allocating ~1 GB

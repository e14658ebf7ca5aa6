"""The example models in models/: built from FlashAttention, rebuilt exactly from a spec."""

from pathlib import Path

import pytest
import torch

from flash_export import FlashAttention, ModelError, ModelSpec, reference_forward

ROOT = Path(__file__).resolve().parents[1]
ENCODER = f"{ROOT / 'models' / 'encoder.py'}:build"


def test_encoder_is_built_from_flash_attention_and_matches_float64_reference():
    model = ModelSpec(embed=64, heads=4, chunk=8, model=ENCODER).build()
    assert sum(isinstance(m, FlashAttention) for m in model.modules()) == 2
    g = torch.Generator().manual_seed(0)
    v, k, q = (torch.randn(2, n, 64, generator=g) for n in (21, 21, 13))
    with torch.no_grad():
        got = model(v, k, q).double()
    torch.testing.assert_close(got, reference_forward(model, v, k, q), atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", [None, ENCODER], ids=["default", "encoder"])
def test_same_spec_builds_identical_weights_and_seed_changes_them(model):
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
    (f"{ROOT / 'models' / 'encoder.py'}:nope", "no callable"),
], ids=["syntax", "missing-file", "missing-factory"])
def test_bad_model_option_is_a_model_error(model, message):
    with pytest.raises(ModelError, match=message):
        ModelSpec(model=model).build()

"""TorchScript export: scripted (not traced), atomic, carries metadata, bitwise equal to eager."""

import hashlib
import json
import re
import zipfile
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import nn

from flash_export import (
    ArtifactError,
    ExportError,
    FlashAttention,
    ModelSpec,
    export_torchscript,
)
from flash_export.artifacts.metadata import METADATA_FILE
from flash_export.export.torchscript import load_torchscript


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = FlashAttention(64, 4, 16, causal=False).eval()
    path = export_torchscript(model, tmp_path_factory.mktemp("ts") / "fa.pt")
    return model, path


LENGTHS = [(1, 1), (7, 63), (65, 65), (129, 33), (300, 17)]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("lq,lk", LENGTHS, ids=[f"q{q}-k{k}" for q, k in LENGTHS])
def test_loaded_module_equals_eager_bitwise_at_unseen_lengths(exported, lq, lk, masked):
    model, path = exported
    loaded, _ = load_torchscript(path)
    g = torch.Generator().manual_seed(lq * 1000 + lk)
    v, k, q = (torch.randn(3, n, 64, generator=g) for n in (lk, lk, lq))
    mask = (torch.rand(3, 1, lq, lk, generator=g) > 0.5) if masked else None
    with torch.no_grad():
        assert torch.equal(loaded(v, k, q, mask), model(v, k, q, mask))


def test_archive_carries_metadata_and_is_scripted_not_traced(exported):
    _, path = exported
    loaded, meta = load_torchscript(path)
    assert meta["embed"] == "64" and meta["heads"] == "4" and meta["chunk_size"] == "16"
    assert meta["causal"] == "0" and meta["flash_export_version"]
    assert ModelSpec.from_json(meta["model_spec"]).chunk == 16
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith(METADATA_FILE)]
        assert names and json.loads(z.read(names[0]))["artifact"] == "torchscript"
        code = "".join(z.read(n).decode() for n in z.namelist()
                       if "/code/" in n and n.endswith(".py"))
    # A traced archive would have the chunk loop unrolled; the scripted one keeps it.
    assert re.search(r"__range_length\(0, \w+, chunk_size\)", code), "no chunk loop in the archive"


def test_causal_flag_survives_export(tmp_path):
    model = FlashAttention(32, 2, 8, causal=True).eval()
    loaded, meta = load_torchscript(export_torchscript(model, tmp_path / "c.pt"))
    v = torch.randn(1, 20, 32)
    q = torch.randn(1, 9, 32)
    assert meta["causal"] == "1"
    with torch.no_grad():
        assert torch.equal(loaded(v, v.clone(), q), model(v, v.clone(), q))


class _Unscriptable(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = FlashAttention(32, 2, 8)

    def forward(self, values, keys, queries, mask=None):
        out = self.attention(values, keys, queries)
        return {**{"x": out}}["x"] if values.numel() > 0 else queries  # dict unpacking


def test_failed_export_leaves_existing_file_intact_and_no_temporaries(tmp_path):
    target = tmp_path / "model.pt"
    export_torchscript(FlashAttention(32, 2, 8), target)
    good = target.read_bytes()
    with pytest.raises(ExportError, match="torch.jit.script failed"):
        export_torchscript(_Unscriptable(), target, spec=ModelSpec())
    assert target.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt.manifest.json"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch.jit, "save", explode)
    with pytest.raises(ExportError, match="disk full"):
        export_torchscript(FlashAttention(32, 2, 8), tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


class _Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = FlashAttention(32, 2, 8)

    def forward(self, values, keys, queries, mask: Optional[torch.Tensor] = None):
        return self.inner(values, keys, queries, mask)


def test_wrapper_without_a_spec_records_the_layer_and_no_spec(tmp_path):
    _, meta = load_torchscript(export_torchscript(_Wrapper(), tmp_path / "x.pt"))
    assert "model_spec" not in meta
    assert (meta["embed"], meta["heads"], meta["chunk_size"]) == ("32", "2", "8")


@pytest.mark.parametrize("model", [nn.Linear(4, 4), nn.Sequential()], ids=["linear", "empty"])
def test_torchscript_export_refuses_a_model_without_flash_attention(tmp_path, model):
    """As the ONNX exporter does: a factory returning nn.Linear is not a model to ship here."""
    with pytest.raises(ExportError, match="contains no FlashAttention layer"):
        export_torchscript(model, tmp_path / "x.pt", spec=ModelSpec())
    assert list(tmp_path.iterdir()) == []


def _forged(tmp_path, monkeypatch):
    """A different TorchScript program with a correct hash file beside it, from elsewhere."""
    monkeypatch.setenv("FLASH_EXPORT_TRUST_STORE", str(tmp_path / "their-store"))
    forged = export_torchscript(FlashAttention(32, 2, 8, causal=True), tmp_path / "m.pt")
    monkeypatch.setenv("FLASH_EXPORT_TRUST_STORE", str(tmp_path / "my-store"))
    assert forged.with_name("m.pt.manifest.json").is_file()  # a hash file that proves nothing
    return forged


def test_loading_refuses_a_forged_file_with_a_matching_manifest(tmp_path, monkeypatch):
    forged = _forged(tmp_path, monkeypatch)
    with pytest.raises(ArtifactError, match="not exported by you here.*--expect-sha256.*--trust"):
        load_torchscript(forged)


def test_loading_trusts_the_store_the_expected_hash_or_trust(tmp_path, monkeypatch):
    forged = _forged(tmp_path, monkeypatch)
    digest = hashlib.sha256(forged.read_bytes()).hexdigest()
    assert load_torchscript(forged, expect_sha256=digest)[0] is not None
    with pytest.raises(ArtifactError, match="expected 0{64}"):
        load_torchscript(forged, expect_sha256="0" * 64)
    assert load_torchscript(forged, trust=True)[0] is not None
    mine = export_torchscript(FlashAttention(32, 2, 8), tmp_path / "mine.pt")
    assert load_torchscript(mine)[0] is not None  # every export lands in the user's store
    data = bytearray(mine.read_bytes())
    data[-30] ^= 0xFF  # any change, even in the zip's directory, breaks the hash
    mine.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="not exported by you here"):
        load_torchscript(mine)


def test_no_code_path_unpickles_with_weights_only_false():
    root = Path(__file__).resolve().parents[1]
    offenders = [str(p) for p in root.rglob("*.py")
                 if ".venv" not in p.parts and p.name != Path(__file__).name
                 and "weights_only=False" in p.read_text()]
    assert offenders == []

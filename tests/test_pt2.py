""".pt2 packages (torch.export + AOTInductor): metadata, manifest, trust, validate and bench.

One package per session (`pt2_package` in conftest.py): each AOTInductor compile runs g++ for tens
of seconds. The CLI export of a zoo model runs in test_readme.py, from the README's own block.
"""

import json
import zipfile

import pytest
import torch

from flash_export.artifacts.kinds import artifact_kind
from flash_export.artifacts.manifest import verify_manifest
from flash_export.artifacts.metadata import read_metadata
from flash_export.bench.benchmark import BenchConfig, benchmark
from flash_export.check.validate import validate
from flash_export.core.errors import ArtifactError, ExportError
from flash_export.export.pt2 import export_pt2, load_pt2


def test_package_records_metadata_as_data_and_for_cpp(pt2_package):
    path, spec = pt2_package
    assert artifact_kind(path) == "pt2"
    meta = read_metadata(path)  # the zip's extra/flash_export.json, nothing loaded
    assert meta["artifact"] == "pt2" and meta["attention"] == "native"
    assert "libflash_export_torch.so" in meta["requires"]
    assert json.loads(meta["model_spec"])["causal"] is True
    assert [t["name"] for t in json.loads(meta["io_spec"])["inputs"]] == [
        "values", "keys", "queries", "mask"]
    verify_manifest(path)
    compiled, loaded, origin = load_pt2(path)
    assert loaded == meta and origin.verified
    assert compiled.get_metadata()["io_spec"] == meta["io_spec"]  # what C++ get_metadata() sees


def test_the_package_runs_in_the_models_order_positionally_or_by_name(pt2_package):
    """Torch's own runner takes the inputs positionally in the model's order (values, keys,
    queries, mask), as the module does; `load_pt2`'s callable takes them either way. (A fresh
    process that only imports flash_export.nn.torch_op before torch's loader: test_readme.py runs
    the README's block.)"""
    path, spec = pt2_package
    torch.manual_seed(0)
    inputs = (torch.randn(2, 9, 32), torch.randn(2, 9, 32), torch.randn(2, 5, 32),
              torch.rand(2, 1, 5, 9) > 0.3)  # (B, Lk, E), (B, Lk, E), (B, Lq, E), mask
    with torch.no_grad():
        expected = spec.build().eval()(*inputs)
    compiled, _, _ = load_pt2(path)
    by_name = compiled(**dict(zip(("values", "keys", "queries", "mask"), inputs)))
    torch.testing.assert_close(by_name, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(compiled(*inputs), by_name)
    assert torch.equal(torch._inductor.aoti_load_package(str(path))(*inputs), by_name)


def test_validate_passes_at_lengths_not_seen_at_export(pt2_package):
    path, _ = pt2_package
    report = validate(path, seq=[1, 7, 33, 130], batch=[1, 3])
    assert report.passed, report.failure_lines()
    assert report.kind == "pt2" and [b.name for b in report.backends] == ["eager", "pt2"]
    cases = report.backends[1].cases
    assert {(c.case.seq_q != c.case.seq_k, c.case.mask) for c in cases} == {
        (False, False), (False, True), (True, False), (True, True)}
    with pytest.raises(ArtifactError, match="runs only in float32"):
        validate(path, dtype="float16")


def test_bench_times_the_package_as_its_own_backend(pt2_package):
    path, _ = pt2_package
    report = benchmark(path, config=BenchConfig(seqs=(9, 40), iters=2, warmup=1, memory=False))
    rows = {(r.backend, r.seq_q): r for r in report.rows}
    assert set(rows) == {(b, s) for b in ("pt2", "eager", "sdpa") for s in (9, 40)}
    assert all(r.status == "ok" and r.p50_ms > 0 for r in rows.values()), report.rows


def test_a_package_of_unknown_origin_is_refused(pt2_package, tmp_path, monkeypatch):
    path, _ = pt2_package
    monkeypatch.setenv("FLASH_EXPORT_TRUST_STORE", str(tmp_path / "empty-store"))
    with pytest.raises(ArtifactError, match="a .pt2 package holds a compiled library"):
        load_pt2(path)
    with pytest.raises(ArtifactError, match="not exported by you here"):
        validate(path, seq=[3], batch=[1])


def test_edited_metadata_fails_the_manifest(pt2_package, tmp_path):
    path, _ = pt2_package
    copy = tmp_path / "edited.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(copy, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/extra/flash_export.json"):
                data = data.replace(b'"chunk_size": "8"', b'"chunk_size": "9"')
            dst.writestr(item, data)
    (tmp_path / "edited.pt2.manifest.json").write_text(
        (path.parent / (path.name + ".manifest.json")).read_text())
    assert read_metadata(copy)["chunk_size"] == "9"
    with pytest.raises(ArtifactError, match="do not match its manifest"):
        verify_manifest(copy)


def test_export_refuses_a_wrong_suffix_and_a_model_without_flash_attention(tmp_path):
    from flash_export import FlashAttention

    with pytest.raises(ExportError, match=r"AOTInductor package must be written to a file "
                                          r"ending in \.pt2"):
        export_pt2(FlashAttention(32, 4, 8), tmp_path / "m.pt")
    with pytest.raises(ExportError, match="contains no FlashAttention layer"):
        export_pt2(torch.nn.Linear(4, 4), tmp_path / "m.pt2")
    assert not any(tmp_path.iterdir())

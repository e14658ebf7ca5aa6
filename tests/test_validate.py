"""flash-export validate: parity against the float64 reference, and the breakage it must catch."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from flash_export.check.validate import default_seqs, sweep, validate
from flash_export.cli.main import main
from flash_export.export.torchscript import export_torchscript
from flash_export.nn.spec import ModelSpec
from flash_export.runtime import library_path

SPEC = ModelSpec(embed=32, heads=4, chunk=8, seed=3)
SMALL = ["--seq", "1,7,9", "--batch", "1,2"]

try:
    from flash_export.export.onnx import export_onnx
except ImportError as exc:  # the ONNX exporter is optional in a partial checkout
    export_onnx = None
    ONNX_EXPORT_ERROR = str(exc)
else:
    ONNX_EXPORT_ERROR = ""

needs_onnx_export = pytest.mark.skipif(export_onnx is None,
                                       reason=f"flash_export.export.onnx unavailable: "
                                              f"{ONNX_EXPORT_ERROR}")
needs_library = pytest.mark.skipif(not Path(library_path()).is_file(),
                                   reason=f"native library not built at {library_path()}")


def entry_point() -> list:
    """The installed console script when present, else `python -m flash_export.cli`."""
    beside = Path(sys.executable).parent / "flash-export"
    if beside.is_file():
        return [str(beside)]
    return [sys.executable, "-m", "flash_export.cli"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Artifacts of SPEC, exported once per module on first use."""
    root = tmp_path_factory.mktemp("artifacts")
    cache = {}

    def get(name: str) -> Path:
        if name in cache:
            return cache[name]
        if name == "pt":
            path = export_torchscript(SPEC.build(), root / "model.pt", spec=SPEC)
        else:
            if export_onnx is None:
                pytest.skip(f"flash_export.export.onnx unavailable: {ONNX_EXPORT_ERROR}")
            target, _, variant = name.partition("-")
            path = export_onnx(SPEC.build(), root / f"{name}.onnx", target=target, spec=SPEC,
                               mask=variant == "mask", static_shapes=variant == "static")
        cache[name] = path
        return path

    return get


def test_default_seqs_cover_chunk_tails():
    assert default_seqs(8) == [1, 7, 8, 9, 29, 1024]
    assert default_seqs(1) == [1, 2, 8, 1024]


def test_sweep_pairs_unequal_lengths():
    cases = sweep([1, 7, 9], [1, 2], [False, True])
    pairs = {(c.seq_q, c.seq_k) for c in cases}
    assert pairs == {(1, 1), (1, 7), (7, 7), (7, 9), (9, 9), (9, 1)}
    assert len(cases) == 6 * 2 * 2


@pytest.mark.parametrize("mask_graph", [False, True], ids=["no-mask-input", "mask-input"])
@pytest.mark.parametrize("kind", [
    "pt",
    pytest.param("standard", marks=needs_onnx_export),
    pytest.param("custom", marks=[needs_onnx_export, needs_library]),
], ids=["torchscript", "onnx-standard", "onnx-custom"])
def test_good_artifact_passes(artifacts, kind, mask_graph):
    if kind == "pt" and mask_graph:
        pytest.skip("a TorchScript file always takes a mask; covered by no-mask-input")
    path = artifacts(kind + ("-mask" if mask_graph else ""))
    report = validate(path, seq=[1, 7, 9], batch=[1, 2])
    assert report.passed, report.failure_lines()
    assert report.spec == SPEC and report.spec_source == "artifact"
    names = [b.name for b in report.backends]
    assert names == ["eager", "torchscript" if kind == "pt" else f"onnx:{kind}"]
    masks = {c.case.mask for b in report.backends for c in b.cases}
    assert masks == ({False, True} if kind == "pt" or mask_graph else {False})
    assert all(len(b.cases) == len(report.backends[0].cases) for b in report.backends)


def test_cli_pass_writes_json(artifacts, tmp_path):
    out = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["validate", str(artifacts("pt")), *SMALL,
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "validation passed" in result.output
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["spec"]["seed"] == 3
    case = data["backends"][1]["cases"][0]
    for key in ("max_abs", "mean_abs", "p99_abs", "max_rel", "mean_rel", "p99_rel",
                "worst_index", "passed", "batch", "seq_q", "seq_k", "mask"):
        assert key in case


def _perturb_weight(src: Path, dst: Path) -> None:
    model = onnx.load(str(src))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    array = numpy_helper.to_array(init).copy()
    array.flat[0] += 0.05
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(dst))


def _swap_keys_values(src: Path, dst: Path) -> None:
    model = onnx.load(str(src))
    swap = {"keys": "values", "values": "keys"}

    def rewire(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for i, name in enumerate(node.input):
                node.input[i] = swap.get(name, name)
            for attr in node.attribute:
                if attr.HasField("g"):
                    rewire(attr.g)

    rewire(model.graph)
    onnx.save(model, str(dst))


def _wrong_chunk(src: Path, dst: Path) -> None:
    model = onnx.load(str(src))
    for node in model.graph.node:
        if node.op_type == "FlashAttention":
            for attr in node.attribute:
                if attr.name == "chunk_size":
                    attr.i = 5
    onnx.save(model, str(dst))


def _claim_dynamic(src: Path, dst: Path) -> None:
    """A graph specialised to one size whose metadata claims the usual dynamic dims."""
    from flash_export.core.io_spec import attention_io

    model = onnx.load(str(src))
    for prop in model.metadata_props:
        if prop.key == "io_spec":
            prop.value = attention_io(SPEC.embed).to_json()
    onnx.save(model, str(dst))


@pytest.mark.parametrize("source, breakage, expected", [
    pytest.param("standard", _perturb_weight, "onnx:standard B=", marks=needs_onnx_export,
                 id="perturbed-initializer"),
    pytest.param("standard", _swap_keys_values, "onnx:standard B=", marks=needs_onnx_export,
                 id="swapped-keys-values"),
    pytest.param("custom", _wrong_chunk, "node[0].chunk_size: expected 8, got 5",
                 marks=[needs_onnx_export, needs_library], id="wrong-chunk-attribute"),
    pytest.param("standard-static", _claim_dynamic,
                 "check graph.queries.dim1: expected q_len (dynamic), got 17",
                 marks=needs_onnx_export, id="static-shapes"),
])
def test_breakage_fails_naming_backend_and_shape(artifacts, tmp_path, source, breakage, expected):
    broken = tmp_path / "broken.onnx"
    breakage(artifacts(source), broken)
    result = CliRunner().invoke(main, ["validate", str(broken), *SMALL])
    assert result.exit_code == 1, result.output
    assert expected in result.output
    assert "validation FAILED" in result.output


@pytest.mark.parametrize("options, expected", [
    (["--chunk", "5"], "check metadata.chunk_size: expected 5, got 8"),
    (["--seed", "4"], "eager"),
], ids=["explicit-chunk", "explicit-seed"])
def test_explicit_model_options_win(artifacts, options, expected):
    result = CliRunner().invoke(main, ["validate", str(artifacts("pt")), *SMALL, *options])
    assert result.exit_code == 1, result.output
    assert expected in result.output
    if "--seed" in options:  # other weights: the artifact, not eager, disagrees
        assert "FAIL torchscript B=" in result.output


@pytest.mark.parametrize("args", [
    ["--seq", "1,x"], ["--batch", "0"], ["--provider", "tpu"],
], ids=["bad-seq", "zero-batch", "bad-provider"])
def test_bad_usage_exits_2(artifacts, args):
    result = CliRunner().invoke(main, ["validate", str(artifacts("pt")), *args])
    assert result.exit_code == 2, result.output


def test_not_an_artifact_exits_1(tmp_path):
    bogus = tmp_path / "model.onnx"
    bogus.write_text("not a model")
    result = CliRunner().invoke(main, ["validate", str(bogus)])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") or "error: " in result.output


@needs_onnx_export
def test_entry_point_subprocess_reports_failure(artifacts, tmp_path):
    broken = tmp_path / "perturbed.onnx"
    _perturb_weight(artifacts("standard"), broken)
    proc = subprocess.run([*entry_point(), "validate", str(broken), "--seq", "7", "--batch", "1"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL onnx:standard B=1 Lq=7 Lk=7" in proc.stdout


def test_pt_of_unknown_origin_needs_trust_or_its_hash(artifacts, tmp_path, monkeypatch):
    copy = tmp_path / "copied.pt"
    copy.write_bytes(artifacts("pt").read_bytes())
    monkeypatch.setenv("FLASH_EXPORT_TRUST_STORE", str(tmp_path / "another-users-store"))
    args = ["validate", str(copy), "--seq", "7", "--batch", "1"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "not exported by you here" in refused.output
    trusted = CliRunner().invoke(main, [*args, "--trust"])
    assert trusted.exit_code == 0, trusted.output
    assert "unknown origin, loaded because of --trust" in trusted.output
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    pinned = CliRunner().invoke(main, [*args, "--expect-sha256", digest])
    assert pinned.exit_code == 0 and "the hash you expected" in pinned.output, pinned.output


@needs_onnx_export
@needs_library
def test_all_targets_compares_every_onnx_target(artifacts):
    report = validate(artifacts("pt"), seq=[7], batch=[1], all_targets=True)
    assert report.passed, report.failure_lines()
    assert [b.name for b in report.backends] == [
        "eager", "torchscript", "onnx:custom", "onnx:standard", "onnx:contrib",
        "onnx:attention23"]

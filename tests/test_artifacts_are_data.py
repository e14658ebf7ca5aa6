"""Artifacts are data, never code: what an artifact says is checked, and never obeyed by itself.

Each test is one finding of the trust review, tried as an attacker would: an `.onnx` whose
metadata names a script, weights or sizes it does not hold, tampered specs, a kill between the
renames of an external-data export, and the error paths that used to end in tracebacks.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from flash_export.artifacts import files, manifest
from flash_export.bench.benchmark import BenchConfig, benchmark
from flash_export.check.validate import validate
from flash_export.cli.main import main
from flash_export.core.errors import ArtifactError, FlashExportError
from flash_export.export import onnx as onnx_export
from flash_export.export.onnx import export_onnx
from flash_export.nn.spec import ModelSpec
from flash_export.runtime import create_session

SPEC = ModelSpec(embed=32, heads=4, chunk=8, seed=3)
QUICK = ["--seq", "7", "--batch", "1"]
BENCH = ["--seq", "8", "--iters", "1", "--warmup", "0", "--no-memory"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A standard-target export of SPEC (stock onnxruntime runs it)."""
    return export_onnx(SPEC.build(), tmp_path_factory.mktemp("exported") / "model.onnx",
                       target="standard", spec=SPEC)


def _edit_metadata(src: Path, dst: Path, **changes: str) -> Path:
    model = onnx.load(str(src))
    meta: Dict[str, str] = {p.key: p.value for p in model.metadata_props}
    meta.update(changes)
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(dst))
    return dst


def _edit_spec(src: Path, dst: Path, **fields: object) -> Path:
    spec = json.loads(next(p.value for p in onnx.load(str(src)).metadata_props
                           if p.key == "model_spec"))
    spec.update(fields)
    return _edit_metadata(src, dst, model_spec=json.dumps(spec))


def _invoke(*args: str) -> "object":
    return CliRunner().invoke(main, [str(a) for a in args])


# --------------------------------------------------------------------------- finding 1


@pytest.fixture()
def hostile_model_file(tmp_path: Path) -> Path:
    """A "model factory" that writes a file when imported: the code an artifact asks us to run."""
    script = tmp_path / "payload.py"
    script.write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(tmp_path / 'pwned')!r}).write_text("ran")
        from flash_export import FlashAttention
        def build(embed_size, heads, chunk_size, causal):
            return FlashAttention(embed_size, heads, chunk_size, causal=causal)
    """))
    return script


@pytest.mark.parametrize("command", ["validate", "bench"])
def test_metadata_naming_a_model_file_is_refused_without_trust(exported: Path, tmp_path: Path,
                                                               hostile_model_file: Path,
                                                               command: str) -> None:
    hostile = _edit_spec(exported, tmp_path / "hostile.onnx", model=f"{hostile_model_file}:build")
    result = _invoke(command, hostile, *(QUICK if command == "validate" else BENCH))
    assert result.exit_code == 1, result.output
    assert "--model" in result.output and "--trust" in result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "pwned").exists(), "the artifact's script ran"


def test_trust_or_naming_the_model_yourself_runs_it(exported: Path, tmp_path: Path,
                                                    hostile_model_file: Path) -> None:
    recorded = _edit_spec(exported, tmp_path / "recorded.onnx",
                          model=f"{hostile_model_file}:build")
    assert _invoke("validate", recorded, *QUICK, "--trust").exit_code == 0
    assert (tmp_path / "pwned").read_text() == "ran"
    (tmp_path / "pwned").unlink()
    named = _invoke("validate", recorded, *QUICK, "--model", f"{hostile_model_file}:build")
    assert named.exit_code == 0, named.output
    assert (tmp_path / "pwned").exists()


def test_metadata_naming_weights_is_refused_without_trust(exported: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "w.pt"
    torch.save(SPEC.build().state_dict(), ckpt)
    hostile = _edit_spec(exported, tmp_path / "w.onnx", weights=str(ckpt))
    with pytest.raises(ArtifactError, match=f"--weights {ckpt}.*--trust"):
        validate(hostile, seq=[7], batch=[1])
    assert validate(hostile, seq=[7], batch=[1], trust=True).passed


def test_a_small_file_declaring_a_huge_model_is_refused_before_allocating(exported: Path,
                                                                          tmp_path: Path) -> None:
    """28 KB declaring embed 8192 once pushed validate to 4.7 GB RSS."""
    huge = _edit_spec(exported, tmp_path / "huge.onnx", embed=8192, heads=8)
    huge = _edit_metadata(huge, huge, embed="8192", heads="8")
    assert huge.stat().st_size < 128 * 1024  # the declared weights alone would be 1 GiB
    code = textwrap.dedent(f"""
        import resource, sys
        from flash_export.core.errors import ArtifactError
        from flash_export.check.validate import validate
        try:
            validate({str(huge)!r}, seq=[7], batch=[1])
        except ArtifactError as exc:
            print("refused:", exc)
        print("maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "refused:" in run.stdout and "embed 8192" in run.stdout, run.stdout
    rss_kb = int(run.stdout.split("maxrss_kb")[1])
    assert rss_kb < 1_500_000, f"peak RSS {rss_kb / 1e6:.1f} GB: it allocated the declared model"


def test_metadata_keys_contradicting_the_spec_are_refused(exported: Path, tmp_path: Path) -> None:
    edited = _edit_metadata(exported, tmp_path / "edited.onnx", chunk_size="5")
    with pytest.raises(ArtifactError, match="metadata chunk_size is '5' but its model_spec says 8"):
        validate(edited, seq=[7], batch=[1])


def test_a_run_that_would_not_fit_in_memory_is_refused_up_front(exported: Path) -> None:
    """(B, H, L, L) float64 reference scores at L = 10^6 are 64 TB: refused, not attempted."""
    result = _invoke("validate", exported, "--seq", "1000000", "--batch", "1")
    assert result.exit_code == 1 and "would need about" in result.output, result.output
    with pytest.raises(FlashExportError, match="over the limit of 0.1 GiB"):
        validate(exported, seq=[2048], batch=[4], max_memory=2**30 // 10)
    with pytest.raises(FlashExportError, match="would need about"):
        benchmark(exported, config=BenchConfig(seqs=(300_000,), memory=False))


def test_a_consistently_tampered_file_validates_but_not_as_the_file_you_exported(
        exported: Path, tmp_path: Path) -> None:
    """Edited weights plus a matching edited seed give a self-consistent file: validate says it
    is what its metadata describes, says the origin is unverified, and --expect-sha256 refuses
    it."""
    other = ModelSpec(embed=32, heads=4, chunk=8, seed=99)
    tampered = export_onnx(other.build(), tmp_path / "tampered.onnx", target="standard",
                           spec=other)
    tampered.with_name("tampered.onnx.manifest.json").unlink()
    store = Path(os.environ["FLASH_EXPORT_TRUST_STORE"])
    (store / f"{files.sha256_file(tampered)}.json").unlink()  # it came from elsewhere
    original = files.sha256_file(exported)
    report = validate(tampered, seq=[7], batch=[1])
    assert report.passed and report.provenance.source == "unverified"
    result = _invoke("validate", tampered, *QUICK)
    assert "unknown origin" in result.output
    pinned = _invoke("validate", tampered, *QUICK, "--expect-sha256", original)
    assert pinned.exit_code == 1 and f"expected {original}" in pinned.output
    mine = validate(exported, seq=[7], batch=[1])
    assert mine.provenance.source == "trust store"


# --------------------------------------------------------------------------- finding 2 (Python)


def _with_attribute(src: Path, dst: Path, name: str, value: object) -> Path:
    model = onnx.load(str(src))
    node = next(n for n in model.graph.node if n.op_type == "FlashAttention")
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [onnx.helper.make_attribute(name, value)])
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def custom_exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(SPEC.build(), tmp_path_factory.mktemp("custom") / "custom.onnx",
                       target="custom", spec=SPEC)


@pytest.mark.parametrize("name, value, message", [
    ("casual", 1, "unknown attribute 'casual'"),
    ("causal", 1.0, "attribute causal is FLOAT (1.0), expected INT"),
    ("causal", "1", "attribute causal is STRING ('1'), expected INT"),
    ("causal", [1], "attribute causal is INTS ([1]), expected INT"),
    ("scale", 1, "attribute scale is INT (1), expected FLOAT"),
    ("chunk_size", 2.0, "attribute chunk_size is FLOAT (2.0), expected INT"),
    ("num_heads", 4.0, "attribute num_heads is FLOAT (4.0), expected INT"),
], ids=["typo", "float-causal", "string-causal", "ints-causal", "int-scale", "float-chunk",
        "float-heads"])
def test_create_session_and_validate_refuse_malformed_custom_nodes(
        custom_exported: Path, tmp_path: Path, name: str, value: object, message: str) -> None:
    bad = _with_attribute(custom_exported, tmp_path / "bad.onnx", name, value)
    with pytest.raises(ArtifactError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        create_session(bad)
    result = _invoke("validate", bad, *QUICK)
    assert result.exit_code == 1 and message in result.output, result.output


# --------------------------------------------------------------------------- finding 4


def _outputs(path: Path, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 9, SPEC.embed), dtype=np.float32)
    session = create_session(path)
    return session.run(None, {"values": x, "keys": x.copy(), "queries": x[:, :5].copy()})[0]


OTHER = ModelSpec(embed=32, heads=4, chunk=8, seed=4)


@pytest.fixture()
def external(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """SPEC exported with its weights in an external data file (threshold 0), as m.onnx."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    return export_onnx(SPEC.build(), tmp_path / "m.onnx", target="standard", spec=SPEC)


def test_external_data_export_replaces_the_pair_and_cleans_up(external: Path,
                                                              tmp_path: Path) -> None:
    target = external
    first = {p.name for p in tmp_path.glob("m.onnx.*.data")}
    export_onnx(OTHER.build(), target, target="standard", spec=OTHER)
    second = {p.name for p in tmp_path.glob("m.onnx.*.data")}
    assert len(first) == len(second) == 1 and first != second, (first, second)
    entry = manifest.verify_manifest(target)
    assert set(entry.data) == second  # the manifest covers the data file


def test_a_kill_between_the_renames_never_leaves_a_mixed_pair(external: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """The data file moves before the graph; dying right after it must leave the old pair."""
    target = external
    before = _outputs(target)

    real_replace = os.replace
    moved = []

    def die_after_the_data(src: object, dst: object) -> None:
        if str(dst).endswith(".data") and Path(str(src)).parent.name.endswith(".tmp"):
            real_replace(src, dst)
            moved.append(dst)
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(manifest.os, "replace", die_after_the_data)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(OTHER.build(), target, target="standard", spec=OTHER)
    monkeypatch.setattr(manifest.os, "replace", real_replace)
    assert moved, "the test did not interrupt the export"
    np.testing.assert_array_equal(_outputs(target), before)  # the old pair, whole
    manifest.verify_manifest(target)


def test_a_graph_beside_data_it_was_not_exported_with_is_refused(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = export_onnx(SPEC.build(), tmp_path / "a" / "m.onnx", target="standard", spec=SPEC)
    b = export_onnx(OTHER.build(), tmp_path / "b" / "m.onnx", target="standard", spec=OTHER)
    (data_a,) = a.parent.glob("m.onnx.*.data")
    (data_b,) = b.parent.glob("m.onnx.*.data")
    data_a.write_bytes(data_b.read_bytes())  # same size and layout, other weights
    with pytest.raises(ArtifactError, match="not the one this graph was exported with"):
        create_session(a)
    with pytest.raises(ArtifactError, match="do not match its manifest"):
        manifest.verify_manifest(a)


# --------------------------------------------------------------------------- finding 7 and 8


def test_the_plain_onnxruntime_line_works_after_a_bare_import(custom_exported: Path) -> None:
    code = textwrap.dedent(f"""
        import onnxruntime as ort
        import flash_export
        so = ort.SessionOptions()
        so.register_custom_ops_library(flash_export.runtime.library_path())
        ort.InferenceSession({str(custom_exported)!r}, so)
        print(type(flash_export.runtime.library_path()).__name__)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "str"


BLOCK_IMPORTS = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, _Block())
"""


def test_the_runtime_runs_an_exported_graph_without_torch(custom_exported: Path) -> None:
    """The README's dependency set for serving: onnxruntime, numpy and onnx; never torch."""
    code = BLOCK_IMPORTS.format(blocked={"torch", "onnxscript"}) + textwrap.dedent(f"""
        import numpy as np
        from flash_export.runtime import create_session
        session = create_session({str(custom_exported)!r})
        x = np.ones((1, 5, 32), np.float32)
        (out,) = session.run(None, {{"values": x, "keys": x, "queries": x}})
        print(out.shape, "torch" in sys.modules)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(1, 5, 32) False"


def test_the_runtime_needs_onnx_and_says_so(custom_exported: Path) -> None:
    code = BLOCK_IMPORTS.format(blocked={"torch", "onnx"}) + textwrap.dedent(f"""
        from flash_export.core.errors import ArtifactError
        from flash_export.runtime import create_session
        try:
            create_session({str(custom_exported)!r})
        except ArtifactError as exc:
            print(exc)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "the onnx package is not importable" in run.stdout


# --------------------------------------------------------------------------- finding 9


@pytest.mark.parametrize("command", ["validate", "bench"])
@pytest.mark.parametrize("edit", [
    {"spec": {"seed": 2**70}},
    {"spec": {"chunk": "abc"}},
    {"meta": {"chunk_size": "abc"}},
    {"spec": {"chunk": -5}, "meta": {"chunk_size": "-5"}},
    {"meta": {"dtype": "int8"}},
    {"meta": {"target": "tpu"}},
], ids=["seed-2**70", "spec-chunk-abc", "meta-chunk-abc", "chunk-minus-5", "dtype-int8",
        "unknown-target"])
def test_malformed_metadata_is_one_line_and_exit_1(exported: Path, tmp_path: Path,
                                                   command: str, edit: Dict[str, dict]) -> None:
    bad = tmp_path / "bad.onnx"
    _edit_spec(exported, bad, **edit.get("spec", {}))
    _edit_metadata(bad, bad, **edit.get("meta", {}))
    result = _invoke(command, bad, *(QUICK if command == "validate" else BENCH))
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output


def test_bench_refuses_a_chunk_its_graph_does_not_have(custom_exported: Path,
                                                       tmp_path: Path) -> None:
    bad = _edit_spec(custom_exported, tmp_path / "c.onnx", chunk=5)
    bad = _edit_metadata(bad, bad, chunk_size="5")
    with pytest.raises(ArtifactError, match="the spec says chunk_size 5, the graph's "
                                            "FlashAttention node has 8"):
        benchmark(bad, config=BenchConfig(seqs=(8,), iters=1, warmup=0, memory=False))


@pytest.mark.parametrize("command, option", [
    ("validate", "--json"), ("bench", "--json"), ("bench", "--csv"), ("bench", "--plot"),
    ("doctor", "--json")])
def test_an_output_into_a_missing_folder_is_a_usage_error_before_any_work(
        exported: Path, tmp_path: Path, command: str, option: str) -> None:
    out = tmp_path / "missing" / ("report.png" if option == "--plot" else "report.out")
    args = [] if command == "doctor" else [exported, *(QUICK if command == "validate"
                                                       else BENCH)]
    result = _invoke(command, *args, option, out)
    assert result.exit_code == 2, result.output
    assert "folder" in result.output and "does not exist" in result.output
    assert "validating" not in result.output and "benchmarking" not in result.output


@pytest.mark.parametrize("body", ["raise SystemExit(0)", "import sys; sys.exit(3)"],
                         ids=["exit-0", "exit-3"])
def test_a_model_file_that_exits_is_a_model_error_and_no_artifact(tmp_path: Path,
                                                                  body: str) -> None:
    script = tmp_path / "exits.py"
    script.write_text(body + "\n")
    out = tmp_path / "x.pt"
    result = _invoke("torchscript", "--model", f"{script}:build", out)
    assert result.exit_code == 1 and "importing" in result.output, result.output
    assert not out.exists()


def test_torchscript_refuses_a_factory_without_flash_attention(tmp_path: Path) -> None:
    script = tmp_path / "linear.py"
    script.write_text("import torch\n"
                      "def build(embed_size, heads, chunk_size, causal):\n"
                      "    return torch.nn.Linear(embed_size, embed_size)\n")
    for command, out in (("torchscript", tmp_path / "x.pt"), ("onnx", tmp_path / "x.onnx")):
        result = _invoke(command, "--model", f"{script}:build", out)
        assert result.exit_code == 1, result.output
        assert "contains no FlashAttention layer" in result.output
        assert not out.exists()


def test_a_seed_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    result = _invoke("torchscript", "--seed", str(2**70), tmp_path / "x.pt")
    assert result.exit_code == 2 and "seed must be in" in result.output, result.output


def test_a_forged_pt_is_refused_by_validate_even_with_a_matching_manifest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flash_export.export.torchscript import export_torchscript

    monkeypatch.setenv("FLASH_EXPORT_TRUST_STORE", str(tmp_path / "elsewhere"))
    forged = export_torchscript(SPEC.build(), tmp_path / "forged.pt", spec=SPEC)
    listed = json.loads(forged.with_name("forged.pt.manifest.json").read_text())
    assert listed["entries"][0]["sha256"] == hashlib.sha256(forged.read_bytes()).hexdigest()
    monkeypatch.setenv("FLASH_EXPORT_TRUST_STORE", str(tmp_path / "mine"))
    calls: list = []
    real: Callable = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    result = _invoke("validate", forged, *QUICK)
    assert result.exit_code == 1 and "not exported by you here" in result.output
    assert calls == []


@pytest.mark.parametrize("edit, message", [
    (lambda t: t["dims"].__setitem__(2, 72), "has size 72 on axis 2, the graph's has"),
    (lambda t: t.__setitem__("name", "vals"), "the graph takes input 'values', the io_spec"),
    (lambda t: t.__setitem__("dtype", "float16"), "values is float16 of rank 3, the graph's"),
    (lambda t: t["dims"].append(1), "of rank 4, the graph's is float32 of rank 3"),
], ids=["static-size", "name", "dtype", "rank"])
def test_an_io_spec_that_disagrees_with_the_graph_is_refused(
        exported: Path, tmp_path: Path, edit: Any, message: str) -> None:
    """Feeds are built from the recorded IOSpec: an edited one (found by the model fuzzer: a
    bit flip turning 32 into 72) fed the reference inputs the graph never took."""
    meta = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    io = json.loads(meta["io_spec"])
    values = next(t for t in io["inputs"] if t["name"] == "values")
    edit(values)
    bad = _edit_metadata(exported, tmp_path / "io.onnx", io_spec=json.dumps(io))
    with pytest.raises(ArtifactError, match=re.escape(message)):
        validate(bad, seq=[7], batch=[1])
    result = _invoke("validate", bad, *QUICK)
    assert result.exit_code == 1 and message in result.output

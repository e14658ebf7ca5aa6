"""Artifact files (flash_export.artifacts): kinds by suffix, SHA-256 of any bytes, manifests that
accept exactly the versions written and ignore anything malformed, metadata read from an archive
as data, and writes that are atomic and recorded in the trust store."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
from _strategies import DIGESTS
from hypothesis import given
from hypothesis import strategies as st

from flash_export.artifacts.files import sha256_file, write_atomically
from flash_export.artifacts.kinds import KINDS as REGISTERED
from flash_export.artifacts.kinds import (
    ArtifactKind,
    artifact_kind,
    bench_backends,
    kind_of,
    register_kind,
    require_kind,
)
from flash_export.artifacts.manifest import (
    MANIFEST_SUFFIX,
    ManifestEntry,
    atomic_write,
    current_entry,
    manifest_path,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from flash_export.artifacts.metadata import onnx_metadata, read_metadata, torchscript_metadata
from flash_export.artifacts.trust import TRUST_STORE_ENV, is_trusted
from flash_export.core.contract import TARGETS
from flash_export.core.errors import ArtifactError, ExportError

KINDS = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript",
         ".pt2": "pt2"}


@given(stem=st.text(alphabet="abc_-.", min_size=1, max_size=8),
       suffix=st.sampled_from(sorted(KINDS) + [".ONNX", ".Pt2", ".PT", ".txt", ".onnx.data",
                                                "", ".pt3", ".zip"]))
def test_the_kind_is_the_suffix_in_any_case_and_anything_else_is_refused(stem, suffix):
    path = f"/models/{stem}{suffix}"
    kind = KINDS.get(Path(path).suffix.lower())
    if kind is None:
        with pytest.raises(ArtifactError, match="expected a .onnx, .pt or .pt2 artifact"):
            artifact_kind(path)
        for wanted in ("onnx", "torchscript", "pt2"):
            with pytest.raises(ExportError, match="must be written to a file ending in"):
                require_kind(path, wanted)
        return
    assert artifact_kind(path) == kind
    require_kind(path, kind)
    for other in {"onnx", "torchscript", "pt2"} - {kind}:
        with pytest.raises(ExportError, match="must be written to a file ending in"):
            require_kind(path, other)


@pytest.mark.parametrize("kind, words", [
    ("onnx", "an ONNX model must be written to a file ending in .onnx"),
    ("torchscript", "a TorchScript archive must be written to a file ending in .pt or .pth or "
                    ".ts"),
    ("pt2", "an AOTInductor package must be written to a file ending in .pt2"),
])
def test_a_kind_under_another_suffix_says_which_suffix_it_needs(kind, words):
    with pytest.raises(ExportError, match=words):
        require_kind("model.bin", kind)


@pytest.fixture
def registry(monkeypatch):
    """The kinds registry, restored afterwards whatever a test registers."""
    monkeypatch.setattr("flash_export.artifacts.kinds.KINDS", dict(REGISTERED))
    from flash_export.artifacts import kinds

    return kinds.KINDS


def test_register_kind_adds_a_kind_or_replaces_one_of_the_same_name(registry):
    toy = ArtifactKind("toy", "a toy", (".toy", ".tz"), metadata=None, exporter=None)
    assert register_kind(toy) is toy and registry["toy"] is toy
    assert kind_of("m.TZ") is toy and artifact_kind("m.toy") == "toy"
    again = ArtifactKind("toy", "a toy, again", (".toy",), metadata=None, exporter=None)
    assert register_kind(again) is again and registry["toy"] is again  # its own suffix: fine
    assert register_kind(REGISTERED["onnx"]) is REGISTERED["onnx"]
    assert list(registry) == ["onnx", "torchscript", "pt2", "toy"]


@pytest.mark.parametrize("suffixes, words", [
    ((".toy", "toy"), r"kind toy: suffix 'toy' must be lower case, '\.x'"),
    ((".Toy",), r"kind toy: suffix '\.Toy' must be lower case, '\.x'"),
    ((".toy", ".pt"), r"kind toy: suffix \.pt is already torchscript's"),
    ((".onnx",), r"kind toy: suffix \.onnx is already onnx's"),
], ids=["no-dot", "upper-case", "claimed-second", "claimed-first"])
def test_register_kind_refuses_a_suffix_malformed_or_claimed_by_another_kind(registry, suffixes,
                                                                            words):
    with pytest.raises(ValueError, match=rf"^{words}$"):
        register_kind(ArtifactKind("toy", "a toy", suffixes, metadata=None, exporter=None))
    assert "toy" not in registry


@pytest.mark.parametrize("kept, listed", [
    (["onnx"], r"\.onnx"), (["onnx", "pt2"], r"\.onnx or \.pt2"),
], ids=["one-kind", "two-kinds"])
def test_an_unknown_suffix_lists_the_first_suffix_of_every_kind(registry, kept, listed):
    for name in set(REGISTERED) - set(kept):
        del registry[name]
    with pytest.raises(ArtifactError, match=rf"^m\.bin: expected a {listed} artifact, got "
                                            rf"suffix '\.bin'$"):
        kind_of("m.bin")


def test_a_kinds_handler_is_imported_from_its_path_and_a_missing_one_is_refused():
    assert REGISTERED["onnx"].handler("metadata") is onnx_metadata
    assert REGISTERED["onnx"].handler("bench_backend") is REGISTERED["onnx"].bench_backend
    for role, words in [("loader", "loader"), ("validate_backend", "validate backend")]:
        with pytest.raises(ArtifactError, match=rf"^an ONNX model has no {words}$"):
            REGISTERED["onnx"].handler(role)


# What `recorded` lets through to `bench`: a target, when given, is one of TARGETS; any other key.
_BENCH_META = st.fixed_dictionaries({}, optional={
    "target": st.sampled_from(TARGETS), "attention": st.sampled_from(["native", "flash", ""]),
    "dtype": st.sampled_from(["float32", "float16"]), "other": st.text(max_size=4)})


@given(meta=_BENCH_META)
def test_every_kind_benches_any_recorded_metadata_as_one_of_its_bench_backends(meta):
    for name in ("onnx", "torchscript", "pt2"):
        kind = REGISTERED[name]
        backend = kind.handler("bench_backend")(meta)
        assert backend in kind.bench_backends, (name, meta, backend)
        assert backend in bench_backends()
    assert REGISTERED["onnx"].handler("bench_backend")(meta) == meta.get("target", "custom")
    native = meta.get("attention") == "native"
    assert REGISTERED["torchscript"].handler("bench_backend")(meta) == (
        "torchscript-native" if native else "torchscript")


def test_bench_backends_default_to_custom_onnx_and_stock_torchscript():
    backends = {name: REGISTERED[name].handler("bench_backend")({})
                for name in ("onnx", "torchscript", "pt2")}
    assert backends == {"onnx": "custom", "torchscript": "torchscript", "pt2": "pt2"}
    # every kind's backends, in registration order (a kind a test registers comes after)
    builtin = TARGETS + ("torchscript", "torchscript-native", "pt2")
    assert bench_backends()[:len(builtin)] == builtin


@given(data=st.binary(max_size=3 * (1 << 20) // 2))
def test_sha256_file_is_the_sha256_of_the_bytes_from_a_path_or_an_open_file(tmp_path_factory,
                                                                            data):
    path = tmp_path_factory.mktemp("h") / "f.bin"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == sha256_file(str(path)) == want
    assert sha256_file(io.BytesIO(data)) == want


_ENTRIES = st.lists(st.builds(ManifestEntry, DIGESTS, st.dictionaries(
    st.text(alphabet="abz019._-", min_size=1, max_size=8).filter(lambda n: n not in (".", "..")),
    DIGESTS, max_size=2)), max_size=4)


@given(entries=_ENTRIES)
def test_a_manifest_reads_back_the_versions_written_once_each_in_order(tmp_path_factory, entries):
    artifact = tmp_path_factory.mktemp("m") / "model.onnx"
    write_manifest(artifact, entries + entries)
    assert manifest_path(artifact) == artifact.with_name("model.onnx" + MANIFEST_SUFFIX)
    unique = []
    for e in entries:
        if e not in unique:
            unique.append(e)
    assert read_manifest(artifact) == unique
    assert json.loads(manifest_path(artifact).read_text())["file"] == "model.onnx"


_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=6)),
                     lambda inner: st.one_of(st.lists(inner, max_size=3),
                                             st.dictionaries(st.text(max_size=6), inner,
                                                             max_size=3)), max_leaves=10)


@given(content=st.one_of(
    _JSON.map(json.dumps), st.text(max_size=20),
    st.lists(st.one_of(_JSON, st.fixed_dictionaries({"sha256": st.one_of(DIGESTS, _JSON)},
                                                    optional={"data": _JSON})), max_size=3)
    .map(lambda e: json.dumps({"entries": e}))))
def test_a_manifest_of_any_content_reads_as_its_well_formed_entries_only(tmp_path_factory,
                                                                         content):
    artifact = tmp_path_factory.mktemp("m") / "model.pt"
    manifest_path(artifact).write_text(content)
    for entry in read_manifest(artifact):
        assert isinstance(entry.sha256, str)
        assert all(isinstance(k, str) and isinstance(v, str) and Path(k).name == k
                   for k, v in entry.data.items())


@pytest.mark.parametrize("entries", [
    [{"sha256": "a" * 64, "data": {"../x.data": "b" * 64}}],
    [{"sha256": "a" * 64, "data": {"sub/x.data": "b" * 64}}],
    [{"sha256": 5}],
    [{"sha256": "a" * 64, "data": {"x": 5}}],
    [{"sha256": "a" * 64, "data": []}],
    ["a" * 64],
], ids=["dotdot", "folder", "int-hash", "int-data-hash", "list-data", "bare-string"])
def test_a_manifest_entry_naming_a_path_or_of_the_wrong_types_is_ignored(tmp_path, entries):
    artifact = tmp_path / "model.onnx"
    manifest_path(artifact).write_text(json.dumps({"entries": entries}))
    assert read_manifest(artifact) == []


def test_a_manifest_entry_without_data_files_has_none(tmp_path):
    artifact = tmp_path / "model.onnx"
    manifest_path(artifact).write_text(json.dumps({"entries": [{"sha256": "a" * 64}]}))
    assert read_manifest(artifact) == [ManifestEntry("a" * 64, {})]


@pytest.fixture
def exported(tmp_path, monkeypatch):
    """model.onnx and its data file written by atomic_write, in a trust store of its own."""
    monkeypatch.setenv(TRUST_STORE_ENV, str(tmp_path / "store"))
    target = tmp_path / "model.onnx"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"graph v1")
        (tmp.parent / "model.v1.data").write_bytes(b"weights v1")

    atomic_write(target, write)
    return target


def test_an_atomic_write_leaves_the_files_their_manifest_and_a_trust_record(exported):
    folder = exported.parent
    assert exported.read_bytes() == b"graph v1"
    entry = verify_manifest(exported)
    assert entry == ManifestEntry(hashlib.sha256(b"graph v1").hexdigest(),
                                  {"model.v1.data": hashlib.sha256(b"weights v1").hexdigest()})
    assert current_entry(exported) == entry and read_manifest(exported) == [entry]
    assert is_trusted(entry.sha256)
    assert sorted(p.name for p in folder.iterdir()) == [
        "model.onnx", "model.onnx" + MANIFEST_SUFFIX, "model.v1.data", "store"]


def test_a_rewrite_replaces_the_set_and_deletes_only_the_stale_data(exported):
    folder = exported.parent
    (folder / "unrelated.data").write_bytes(b"keep me")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"graph v2")
        (tmp.parent / "model.v2.data").write_bytes(b"weights v2")

    atomic_write(exported, write, stale=[folder / "model.v1.data", folder / "model.onnx"])
    assert exported.read_bytes() == b"graph v2"
    assert not (folder / "model.v1.data").exists() and (folder / "unrelated.data").exists()
    assert verify_manifest(exported).data == {
        "model.v2.data": hashlib.sha256(b"weights v2").hexdigest()}


@pytest.mark.parametrize("change", ["graph", "data", "data-missing", "manifest"])
def test_verify_manifest_refuses_a_changed_or_incomplete_set(exported, change):
    folder = exported.parent
    if change == "graph":
        exported.write_bytes(b"graph v1!")
        words = "do not match its manifest"
    elif change == "data":
        (folder / "model.v1.data").write_bytes(b"weights v2")
        words = "do not match its manifest"
    elif change == "data-missing":
        (folder / "model.v1.data").unlink()
        words = "do not match its manifest"
    else:
        manifest_path(exported).write_text("{")
        words = "has no readable manifest"
    with pytest.raises(ArtifactError, match=words):
        verify_manifest(exported)
    assert current_entry(exported) is None


def test_verify_manifest_of_a_missing_artifact_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="artifact not found"):
        verify_manifest(tmp_path / "model.onnx")


def test_a_failed_write_leaves_nothing_and_keeps_the_previous_file(exported):
    folder = exported.parent
    before = sorted(p.name for p in folder.iterdir())

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(exported, fail)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert exported.read_bytes() == b"graph v1"
    with pytest.raises(ExportError, match="nothing was written"):
        atomic_write(exported, lambda tmp: None)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_atomic_write_refuses_a_folder_or_a_missing_folder(tmp_path):
    with pytest.raises(ExportError, match="is a directory"):
        atomic_write(tmp_path, lambda tmp: tmp.write_bytes(b"x"))
    with pytest.raises(ExportError, match="output folder does not exist"):
        atomic_write(tmp_path / "no" / "model.onnx", lambda tmp: tmp.write_bytes(b"x"))


def test_an_export_the_store_cannot_record_warns_with_the_hash_to_pass(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(TRUST_STORE_ENV, str(blocker / "store"))
    target = tmp_path / "model.pt"
    with pytest.warns(UserWarning, match="--expect-sha256 [0-9a-f]{64} or --trust"):
        atomic_write(target, lambda tmp: tmp.write_bytes(b"program"))
    assert target.read_bytes() == b"program"


@given(text=st.text(max_size=200))
def test_write_atomically_writes_exactly_the_text_and_leaves_no_temporary(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("w")
    target = folder / "f.json"
    target.write_text("old")
    write_atomically(target, text)
    assert target.read_bytes() == text.encode()
    assert [p.name for p in folder.iterdir()] == ["f.json"]


@pytest.fixture
def drawn_names(monkeypatch):
    """secrets.token_hex answering from a list of names (recording each byte count asked)."""
    names: list[str] = []
    asked: list[int] = []

    def token_hex(nbytes: int) -> str:
        asked.append(nbytes)
        return names.pop(0) if len(names) > 1 else names[0]

    monkeypatch.setattr("secrets.token_hex", token_hex)
    return names, asked


def test_write_atomically_never_writes_through_a_name_planted_at_its_temporary(tmp_path,
                                                                                drawn_names):
    names, asked = drawn_names
    victim = tmp_path / "victim"
    victim.write_text("mine")
    (tmp_path / ".f.json.planted.tmp").symlink_to(victim)  # someone guessed the first name
    names[:] = ["planted", "free"]
    write_atomically(tmp_path / "f.json", "new")
    assert (tmp_path / "f.json").read_text() == "new" and victim.read_text() == "mine"
    assert asked == [8, 8]  # 16 hex digits a name
    assert sorted(p.name for p in tmp_path.iterdir()) == [".f.json.planted.tmp", "f.json",
                                                           "victim"]


def test_write_atomically_gives_up_after_100_taken_names(tmp_path, drawn_names):
    names, asked = drawn_names
    (tmp_path / ".f.json.taken.tmp").write_text("")
    names[:] = ["taken"]
    with pytest.raises(FileExistsError) as caught:
        write_atomically(tmp_path / "f.json", "new")
    assert (caught.value.errno, caught.value.strerror, caught.value.filename) == (
        errno.EEXIST, "no free temporary name", str(tmp_path))
    assert len(asked) == 100 and not (tmp_path / "f.json").exists()


@pytest.mark.parametrize("umask, mode", [(0o000, 0o666), (0o027, 0o640)])
def test_write_atomically_makes_a_file_of_mode_0666_less_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_atomically(tmp_path / "f.json", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == mode


def _archive(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@given(meta=st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=4),
       folder=st.sampled_from(["model", "archive/deep"]))
def test_archive_metadata_reads_back_any_object_of_strings(meta, folder):
    raw = _archive({f"{folder}/data.pkl": b"\x80\x04 never unpickled",
                    f"{folder}/extra/flash_export.json": json.dumps(meta).encode()})
    assert torchscript_metadata(io.BytesIO(raw), "m.pt") == meta


@pytest.mark.parametrize("entries, words", [
    ({"m/data.pkl": b""}, "^m.pt carries no flash_export.json: not written by flash-export$"),
    ({"a/extra/flash_export.json": b"{}", "b/extra/flash_export.json": b"{}"},
     "^m.pt: 2 flash_export.json entries of 2 bytes: not written by flash-export$"),
    ({"m/extra/flash_export.json": b"{" + b" " * (1 << 20) + b"}"},
     "^m.pt: 1 flash_export.json entries of 1048578 bytes: not written by flash-export$"),
    ({"m/extra/flash_export.json": b"not json"}, "unreadable flash_export.json"),
    ({"m/extra/flash_export.json": b'{"a": 1}'}, "not a JSON object of strings"),
    ({"m/extra/flash_export.json": b'["a"]'}, "not a JSON object of strings"),
    ({"m/extra/flash_export.json": b"\xff\xfe"}, "is not a TorchScript archive"),
], ids=["none", "two", "too-large", "not-json", "not-strings", "a-list", "not-utf8"])
def test_archive_metadata_not_written_by_flash_export_is_an_artifact_error(entries, words):
    with pytest.raises(ArtifactError, match=words):
        torchscript_metadata(io.BytesIO(_archive(entries)), "m.pt")


@pytest.mark.parametrize("name, words", [("m.pt", "is not a TorchScript archive"),
                                         ("m.pt2", "is not a .pt2 package")])
def test_a_file_that_is_not_a_zip_archive_is_an_artifact_error_naming_its_kind(tmp_path, name,
                                                                               words):
    path = tmp_path / name
    path.write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match=words):
        read_metadata(path)


def test_read_metadata_of_a_missing_file_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="artifact not found"):
        read_metadata(tmp_path / "m.pt")


def test_read_metadata_reads_an_archive_without_running_it(tmp_path):
    path = tmp_path / "m.pt2"
    path.write_bytes(_archive({"pkg/extra/flash_export.json": b'{"kind": "pt2"}'}))
    assert read_metadata(path) == {"kind": "pt2"}


def test_read_metadata_of_an_onnx_file_is_its_metadata_props_after_the_safety_checks(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, {"io_spec": "{}", "kind": "onnx"})
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert read_metadata(path) == {"io_spec": "{}", "kind": "onnx"}
    path.write_bytes(b"\x08\xff")
    with pytest.raises(ArtifactError, match="is not an ONNX model"):
        read_metadata(path)


def test_an_atomic_write_moves_the_main_file_into_place_last(tmp_path, monkeypatch):
    """A reader that sees the main file sees its data files too (os.replace is watched, not
    replaced)."""
    import os

    monkeypatch.setenv(TRUST_STORE_ENV, str(tmp_path / "store"))
    moved = []
    real_replace = os.replace

    def watched(src, dst):
        moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", watched)

    def write(tmp: Path) -> None:
        for name in ("z.data", "a.data"):
            (tmp.parent / name).write_bytes(name.encode())
        tmp.write_bytes(b"graph")

    atomic_write(tmp_path / "m.onnx", write)
    files = [n for n in moved if not n.endswith(MANIFEST_SUFFIX) and not n.endswith(".json")]
    assert sorted(files[:-1]) == ["a.data", "z.data"] and files[-1] == "m.onnx"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_atomic_write_stages_in_a_hidden_folder_beside_the_target(tmp_path, monkeypatch):
    monkeypatch.setenv(TRUST_STORE_ENV, str(tmp_path / "store"))
    staged = []

    def write(tmp: Path) -> None:
        staged.append(tmp)
        tmp.write_bytes(b"graph")

    atomic_write(tmp_path / "m.onnx", write, stale=[tmp_path / "never-existed.data"])
    (tmp,) = staged
    assert tmp.name == "m.onnx" and tmp.parent.parent == tmp_path
    assert tmp.parent.name.startswith(".m.onnx.") and tmp.parent.name.endswith(".tmp")
    assert not tmp.parent.exists()


def test_a_changed_artifact_is_named_by_its_new_hash_prefix(exported):
    exported.write_bytes(b"changed")
    digest = hashlib.sha256(b"changed").hexdigest()
    with pytest.raises(ArtifactError, match=rf"\(sha256 {digest[:16]}\.\.\.\): changed after "
                                            "export$"):
        verify_manifest(exported)


def test_archive_metadata_of_exactly_1_mib_is_read_and_the_reason_of_a_bad_zip_is_given():
    body = b'{"a": "' + b"x" * ((1 << 20) - 9) + b'"}'
    assert len(body) == 1 << 20
    meta = torchscript_metadata(io.BytesIO(_archive({"m/extra/flash_export.json": body})), "m.pt")
    assert len(meta["a"]) == (1 << 20) - 9
    with pytest.raises(ArtifactError, match="is not a TorchScript archive: BadZipFile: "):
        torchscript_metadata(io.BytesIO(b"not a zip"), "m.pt")

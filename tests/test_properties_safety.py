"""The checks on untrusted ONNX files (flash_export.artifacts.safety), on graphs built here with
onnx.helper (no torch, no export): every external-data reference that leaves the model's folder,
goes through a link, names a non-regular or hard-linked file, reads past its end or is not the data
the graph was exported with is refused with an ArtifactError naming the tensor, wherever the tensor
sits (initializer, sparse initializer, node attribute, subgraph, function); every FlashAttention
node's attributes are checked by name and type."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from flash_export.artifacts.external_data import (
    EXTERNAL_DATA_KEY,
    check_external_location,
    model_tensors,
)
from flash_export.artifacts.safety import (
    all_nodes,
    check_custom_nodes,
    check_onnx_file,
    load_graph,
    open_onnx,
)
from flash_export.core.contract import (
    DOMAIN,
    NODE_ATTRIBUTES,
    NODE_INPUTS,
    OP_NAME,
    V2_ATTRIBUTES,
    V2_INPUTS,
)
from flash_export.core.errors import ArtifactError

WEIGHTS = np.arange(16, dtype=np.float32)


def _external_tensors(path: Path | str) -> int:
    """How many tensors of the checked file at `path` read external data."""
    with open_onnx(path) as opened:
        return opened.external_tensors


def _listing(tensor: onnx.TensorProto, key: str, value: str) -> onnx.TensorProto:
    """`tensor` with one more external_data entry."""
    entry = tensor.external_data.add()
    entry.key, entry.value = key, value
    return tensor


def _external(tensor: onnx.TensorProto, location: str | None, **fields: str) -> onnx.TensorProto:
    """`tensor` marked EXTERNAL at `location` (None: no location entry) with `fields` (offset,
    length, ...)."""
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {**({} if location is None else {"location": location}), **fields}.items():
        _listing(tensor, key, value)
    return tensor


def _model(tensors: list[onnx.TensorProto], metadata: dict[str, str] | None = None
           ) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])],
                              initializer=tensors)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


@pytest.fixture
def folder(tmp_path) -> Path:
    """A model folder holding w.data (the 64 bytes of WEIGHTS)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.data").write_bytes(WEIGHTS.tobytes())
    return folder


def _save(folder: Path, model: onnx.ModelProto) -> Path:
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _weights(location: str | None = "w.data", **fields: str) -> onnx.TensorProto:
    return _external(numpy_helper.from_array(WEIGHTS, "w"), location, **fields)


def test_a_clean_external_reference_is_counted_and_the_model_returned(folder):
    path = _save(folder, _model([_weights(offset="0", length="64")]))
    with open_onnx(path) as opened:
        assert list(opened.data) == ["w.data"] and len(opened.data["w.data"].view) == 64
        assert opened.model.graph.initializer[0].name == "w"
        # the bytes parsed and their hash, what a session is built from
        assert opened.raw == path.read_bytes() and opened.path == path
        assert opened.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("location, words", [
    ("", "empty or NUL-containing"),
    ("w.data\x00", "empty or NUL-containing"),
    ("/etc/passwd", "is an absolute path"),
    ("../w.data", "contains '..'"),
    ("sub/../../w.data", "contains '..'"),
    ("sub\\..\\w.data", "contains '..'"),
    (".", "names no file"),
    ("./", "names no file"),
    ("missing.data", "is missing or unreadable"),
], ids=["empty", "nul", "absolute", "dotdot", "inner-dotdot", "backslash-dotdot", "dot",
        "dot-slash", "missing"])
def test_a_location_outside_or_nowhere_is_refused(folder, location, words):
    with pytest.raises(ArtifactError, match=rf"^t: .*{words}"):
        check_external_location(location, folder, "t")
    path = _save(folder, _model([_weights(location)]))
    with pytest.raises(ArtifactError, match=rf"model.onnx: tensor 'w'.*{words}"):
        check_onnx_file(path)


def test_a_location_through_a_symlink_is_refused_even_inside_the_folder(folder):
    (folder / "link.data").symlink_to(folder / "w.data")
    (folder / "dir").mkdir()
    (folder / "dirlink").symlink_to(folder / "dir")
    (folder / "dir" / "w.data").write_bytes(b"x" * 64)
    for location, link in [("link.data", "link.data"), ("dirlink/w.data", "dirlink")]:
        with pytest.raises(ArtifactError, match=rf"^t: external data location '{location}' goes "
                                                rf"through a symlink \({link}\); flash-export "
                                                rf"follows no links$"):
            check_external_location(location, folder, "t")


def test_a_hard_linked_or_non_regular_file_is_refused(folder):
    os.link(folder / "w.data", folder / "second.data")
    with pytest.raises(ArtifactError, match=r"^t: external data file 'w.data' has 2 hard links; "
                                            r"a hard link may expose a file from elsewhere, copy "
                                            r"it instead$"):
        check_external_location("w.data", folder, "t")
    (folder / "sub").mkdir()
    with pytest.raises(ArtifactError, match=r"^t: external data location 'sub' is not a regular "
                                            r"file$"):
        check_external_location("sub", folder, "t")


def test_a_file_in_a_subfolder_is_allowed(folder):
    (folder / "sub").mkdir()
    (folder / "sub" / "w.data").write_bytes(b"x")
    assert check_external_location("sub/./w.data", folder, "t") == folder / "sub" / "w.data"


@given(offset=st.integers(0, 80), length=st.one_of(st.none(), st.integers(0, 80)))
def test_a_reference_is_accepted_exactly_when_it_reads_inside_the_file(tmp_path_factory, offset,
                                                                       length):
    folder = tmp_path_factory.mktemp("m")
    (folder / "w.data").write_bytes(WEIGHTS.tobytes())
    fields = {"offset": str(offset)}
    if length is not None:
        fields["length"] = str(length)
    path = _save(folder, _model([_weights(**fields)]))
    end = offset + (64 if length is None else length)
    inside = offset <= 64 and (length is None or end <= 64)
    if inside:
        with open_onnx(path) as opened:
            assert list(opened.data) == ["w.data"]
    else:
        with pytest.raises(ArtifactError, match=r"reads bytes \d+\.\.\d+ of 'w.data', which has "
                                                r"only 64"):
            open_onnx(path).close()


@pytest.mark.parametrize("fields, words", [
    ({"offset": "-1"}, "negative external data offset"),
    ({"length": "-5"}, "negative external data length"),
    ({"offset": "ten"}, "external data offset 'ten', not an integer"),
    ({"length": ""}, "external data length '', not an integer"),
], ids=["negative-offset", "negative-length", "word-offset", "empty-length"])
def test_an_offset_or_length_that_is_not_a_byte_count_is_refused(folder, fields, words):
    path = _save(folder, _model([_weights(**fields)]))
    with pytest.raises(ArtifactError, match=words):
        check_onnx_file(path)


@pytest.mark.parametrize("tensor, words", [
    (lambda: _listing(_weights(offset="0"), "location", "other.data"),
     "tensor 'w' repeats external_data key 'location'"),
    (lambda: _listing(numpy_helper.from_array(WEIGHTS, "w"), "location", "../../etc/passwd"),
     "lists external_data but is not marked EXTERNAL"),
    (lambda: _weights(None, offset="0"), "empty or NUL-containing external data location"),
], ids=["repeated-key", "fields-on-an-inline-tensor", "reference-without-a-location"])
def test_an_external_data_list_that_is_not_one_reference_is_refused(folder, tensor, words):
    path = _save(folder, _model([tensor()]))
    with pytest.raises(ArtifactError, match=words) as refused:
        check_onnx_file(path)
    assert str(refused.value).startswith(f"{path}: ")  # the file is named first


def _pinned(folder: Path, digest: str) -> Path:
    return _save(folder, _model([_weights()], {EXTERNAL_DATA_KEY: json.dumps({"w.data": digest})}))


def test_data_pinned_by_the_exporter_must_be_that_data(folder):
    good = hashlib.sha256(WEIGHTS.tobytes()).hexdigest()
    check_onnx_file(_pinned(folder, good))
    with pytest.raises(ArtifactError, match="is not the one this graph was exported with"):
        check_onnx_file(_pinned(folder, "0" * 64))


@pytest.mark.parametrize("text", ["{", "[]", '{"w.data": 5}', '"x"'],
                         ids=["not-json", "list", "not-a-string", "a-string"])
def test_pinned_hashes_that_are_not_an_object_of_strings_are_refused(folder, text):
    path = _save(folder, _model([_weights()], {EXTERNAL_DATA_KEY: text}))
    with pytest.raises(ArtifactError, match=rf"^{path}: metadata {EXTERNAL_DATA_KEY} is not a "
                                            r"JSON object of SHA-256 strings$"):
        check_onnx_file(path)


def test_every_place_a_tensor_can_hide_is_checked(folder):
    """Initializers, sparse initializers (values and indices), node attributes (t, tensors,
    sparse_tensor, sparse_tensors), If branches, Loop bodies and local functions."""
    def bad(name: str) -> onnx.TensorProto:
        return _external(numpy_helper.from_array(WEIGHTS, name), "/abs/" + name)

    def sparse(name: str) -> onnx.SparseTensorProto:
        return helper.make_sparse_tensor(bad(name + "_v"), bad(name + "_i"), [16])

    places = {
        "t": lambda: helper.make_node("Constant", [], ["c"], value=bad("attr_t")),
        "tensors": lambda: helper.make_node("Custom", [], ["c"], domain="x",
                                            tensors=[bad("attr_tensors")]),
        "sparse": lambda: helper.make_node("Constant", [], ["c"], sparse_value=sparse("attr_sp")),
        "sparses": lambda: helper.make_node("Custom", [], ["c"], domain="x",
                                            sparse_tensors=[sparse("attr_sps")]),
        "subgraph": lambda: helper.make_node("If", ["cond"], ["c"], then_branch=helper.make_graph(
            [], "then", [], [], initializer=[bad("then_init")]), else_branch=helper.make_graph(
            [], "else", [], [])),
        "subgraphs": lambda: helper.make_node("Custom", [], ["c"], domain="x", graphs=[
            helper.make_graph([], "body", [], [], initializer=[bad("body_init")])]),
    }
    seen = []
    for make in places.values():
        model = _model([])
        model.graph.node.append(make())
        names = [t.name for t in model_tensors(model)]
        seen.extend(names)
        path = _save(folder, model)
        with pytest.raises(ArtifactError, match="is an absolute path"):
            open_onnx(path).close()
    model = _model([])
    model.graph.sparse_initializer.append(sparse("init_sp"))
    model.functions.append(helper.make_function("f", "fn", [], ["c"], [
        helper.make_node("Constant", [], ["c"], value=bad("function_t"))], [], []))
    seen.extend(t.name for t in model_tensors(model))
    assert sorted(seen) == sorted([
        "attr_t", "attr_tensors", "attr_sp_v", "attr_sp_i", "attr_sps_v", "attr_sps_i",
        "then_init", "body_init", "init_sp_v", "init_sp_i", "function_t"])
    path = _save(folder, model)
    with pytest.raises(ArtifactError, match="is an absolute path"):
        check_onnx_file(path)


def test_all_nodes_walks_subgraphs_depth_first_and_local_functions():
    inner = helper.make_node("Relu", ["a"], ["b"], name="inner")
    branch = helper.make_graph([inner], "then", [], [])
    outer = helper.make_node("If", ["c"], ["d"], name="outer", then_branch=branch,
                             else_branch=helper.make_graph([], "else", [], []))
    body = helper.make_node("Loop", [], [], name="loop", body=helper.make_graph(
        [helper.make_node("Neg", ["a"], ["b"], name="in_loop")], "body", [], []))
    many = helper.make_node("Custom", [], [], name="many", domain="x", graphs=[
        helper.make_graph([helper.make_node("Abs", [], [], name="in_graphs")], "g", [], [])])
    model = _model([])
    model.graph.ClearField("node")
    model.graph.node.extend([outer, body, many])
    model.functions.append(helper.make_function(
        "f", "fn", [], [], [helper.make_node("Sin", [], [], name="in_function")], [], []))
    assert [n.name for n in all_nodes(model)] == [
        "outer", "inner", "loop", "in_loop", "many", "in_graphs", "in_function"]
    assert [n.name for n in all_nodes(branch)] == ["inner"]


def _flash(**attrs) -> onnx.NodeProto:
    return helper.make_node(OP_NAME, ["v", "k", "q"], ["o"], domain=DOMAIN, name="fa", **attrs)


def _valid_attributes() -> dict:
    values = {"INT": 2, "FLOAT": 0.5, "STRING": "x"}
    return {name: values[kind] for name, (kind, _) in NODE_ATTRIBUTES.items()}


def _with_nodes(nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    model = _model([])
    model.graph.node.extend(nodes)
    return model


def test_flash_attention_nodes_with_their_attributes_are_counted():
    assert check_custom_nodes(_with_nodes([_flash(**_valid_attributes())] * 2), "m.onnx") == 2
    required = {n: v for n, v in _valid_attributes().items() if NODE_ATTRIBUTES[n][1]}
    assert check_custom_nodes(_with_nodes([_flash(**required)]), "m.onnx") == 1
    other = helper.make_node(OP_NAME, [], [], domain="other.domain", bogus=1)
    assert check_custom_nodes(_with_nodes([other]), "m.onnx") == 0


@pytest.mark.parametrize("change, words", [
    ("unknown", "has unknown attribute 'window'; expected only "),
    ("repeated", "repeats attribute"),
    ("wrong-type", r"attribute {name} is (FLOAT|INT|STRING) \(.+\), expected"),
    ("missing", "lacks required attribute"),
])
def test_a_flash_attention_attribute_unknown_repeated_mistyped_or_missing_is_refused(change,
                                                                                     words):
    attrs = _valid_attributes()
    node = _flash(**attrs)
    name = next(n for n, (_, required) in NODE_ATTRIBUTES.items() if required)
    if change == "unknown":
        node.attribute.append(helper.make_attribute("window", 3))
    elif change == "repeated":
        node.attribute.append(helper.make_attribute(name, attrs[name]))
    elif change == "wrong-type":
        kind = NODE_ATTRIBUTES[name][0]
        node = _flash(**{**attrs, name: "text" if kind != "STRING" else 1})
    else:
        node = _flash(**{n: v for n, v in attrs.items() if n != name})
    model = _with_nodes([helper.make_node("If", ["c"], ["d"], then_branch=helper.make_graph(
        [node], "then", [], []), else_branch=helper.make_graph([], "else", [], []))])
    with pytest.raises(ArtifactError, match=rf"m.onnx: {OP_NAME} node 'fa'.*"
                                            + words.format(name=name)):
        check_custom_nodes(model, "m.onnx")


def test_an_unnamed_flash_attention_node_is_named_by_its_index():
    node = _flash(**_valid_attributes())
    node.name = ""
    node.attribute.append(helper.make_attribute("extra", b"\xff\xfe"))
    with pytest.raises(ArtifactError, match=f"{OP_NAME} node 0 has unknown attribute 'extra'"):
        check_custom_nodes(_with_nodes([node]), "m.onnx")


def test_a_missing_file_or_one_that_is_not_onnx_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="ONNX file not found"):
        load_graph(tmp_path / "none.onnx")
    with pytest.raises(ArtifactError, match="ONNX file not found"):
        load_graph(tmp_path)
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 10)
    for read in (check_onnx_file, load_graph):
        with pytest.raises(ArtifactError, match=rf"^{tmp_path / 'junk.onnx'} is not an ONNX "
                                                r"model: DecodeError: "):
            read(tmp_path / "junk.onnx")


def test_load_graph_is_the_model_the_file_holds(tmp_path):
    model = _model([numpy_helper.from_array(WEIGHTS, "w")], {"k": "v"})
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    assert load_graph(tmp_path / "m.onnx") == model


def test_a_model_in_the_working_folder_resolves_its_data_there(folder, monkeypatch):
    _save(folder, _model([_weights()]))
    monkeypatch.chdir(folder)
    assert _external_tensors("model.onnx") == 1


def test_refusals_name_the_file_and_tensor_and_say_what_to_do(folder):
    path = folder / "model.onnx"
    messages = {
        "/abs.data": f"{path}: tensor 'w': external data location '/abs.data' is an absolute "
                     "path; it must be a file beside the model",
        "../w.data": f"{path}: tensor 'w': external data location '../w.data' contains '..': it "
                     "must stay inside the model's folder",
    }
    for location, message in messages.items():
        _save(folder, _model([_weights(location)]))
        with pytest.raises(ArtifactError) as caught:
            check_onnx_file(path)
        assert str(caught.value) == message
    _save(folder, _model([_weights(offset="x" * 50)]))
    with pytest.raises(ArtifactError) as caught:
        check_onnx_file(path)
    assert str(caught.value) == (f"{path}: tensor 'w' has external data offset "
                                 f"{'x' * 40!r}, not an integer")
    _save(folder, _model([_weights(length="-3")]))
    with pytest.raises(ArtifactError, match=rf"^{path}: tensor 'w' has a negative external data "
                                            r"length \(-3\)$"):
        check_onnx_file(path)
    _pinned(folder, "0" * 64)
    with pytest.raises(ArtifactError, match=r"\(its SHA-256 differs\)$"):
        check_onnx_file(path)
    with pytest.raises(ArtifactError, match=r"is not an ONNX model: DecodeError: "):
        path.write_bytes(b"\xff" * 10)
        check_onnx_file(path)


def test_every_external_tensor_is_checked_and_counted_after_inline_ones(folder):
    inline = numpy_helper.from_array(WEIGHTS, "inline")
    second = _external(numpy_helper.from_array(WEIGHTS, "w2"), "w.data", offset="32",
                       length="32")
    path = _save(folder, _model([inline, _weights(length="32"), second]))
    assert _external_tensors(path) == 2
    path = _save(folder, _model([inline, _weights("/etc/passwd")]))
    with pytest.raises(ArtifactError, match="is an absolute path"):
        check_onnx_file(path)


@pytest.mark.parametrize("length", [None, "0"], ids=["to-the-end", "empty"])
def test_a_reference_at_the_very_end_of_its_file_reads_nothing_and_is_accepted(folder, length):
    fields = {"offset": "64"} if length is None else {"offset": "64", "length": length}
    path = _save(folder, _model([_weights(**fields)]))
    assert _external_tensors(path) == 1


@pytest.mark.skipif(os.name == "nt", reason="POSIX file names: a backslash or a colon is a "
                                            "character of the name")
@pytest.mark.parametrize("name", ["\\w.data", "C:w.data", "a\\b.data"])
def test_on_posix_a_name_with_a_backslash_or_a_drive_colon_is_a_file_beside_the_model(folder,
                                                                                      name):
    (folder / name).write_bytes(WEIGHTS.tobytes())
    assert check_external_location(name, folder, "t") == folder / name


def test_a_mistyped_attribute_shows_its_value_decoded_and_cut_at_40_characters():
    name = next(n for n, (kind, _) in NODE_ATTRIBUTES.items() if kind == "INT")
    for value, shown in [("text", "'text'"), (b"\xff" + b"a" * 60, repr("\ufffd" + "a" * 60)[:40]),
                         (2.5, "2.5")]:
        node = _flash(**{**_valid_attributes(), name: value})
        kind = "FLOAT" if isinstance(value, float) else "STRING"
        with pytest.raises(ArtifactError) as caught:
            _check_model(_with_nodes([node]))
        assert str(caught.value).endswith(f"attribute {name} is {kind} ({shown}), expected INT")


def test_an_unknown_attribute_lists_the_known_ones():
    node = _flash(**_valid_attributes())
    node.attribute.append(helper.make_attribute("window", 3))
    with pytest.raises(ArtifactError) as caught:
        _check_model(_with_nodes([node]))
    assert str(caught.value).endswith(
        "has unknown attribute 'window'; expected only " + ", ".join(sorted(NODE_ATTRIBUTES)))


def _check_model(model: onnx.ModelProto) -> None:
    """check_onnx_file on `model` saved in a folder of its own (messages name the file)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(model.SerializeToString())
        try:
            check_onnx_file(path)
        except ArtifactError as exc:
            assert str(exc).startswith(f"{path}: {OP_NAME} node")
            raise


# ------------------------------------------------------------------ what an opened file hands on


def test_external_files_are_exactly_the_data_files_bytes_by_the_graphs_names(folder):
    (folder / "sub").mkdir()
    (folder / "sub" / "v.data").write_bytes(WEIGHTS[::-1].tobytes()[:32])
    (folder / "empty.data").write_bytes(b"")
    (folder / "one.data").write_bytes(b"\x01")
    tensors = [numpy_helper.from_array(WEIGHTS, "inline"), _weights(length="32"),
               _external(numpy_helper.from_array(WEIGHTS[:8], "v"), "sub/v.data"),
               _external(numpy_helper.from_array(WEIGHTS[:0], "e"), "empty.data"),
               _external(numpy_helper.from_array(WEIGHTS[:0], "b"), "one.data", length="1"),
               _external(numpy_helper.from_array(WEIGHTS[8:], "w2"), "w.data", offset="32")]
    with open_onnx(_save(folder, _model(tensors))) as opened:
        names, buffers, sizes = opened.external_files()
        assert names == ["w.data", "sub/v.data", "empty.data", "one.data"]
        assert [bytes(b) for b in buffers] == [(folder / n).read_bytes() for n in names]
        assert sizes == [64, 32, 0, 1]
    with open_onnx(_save(folder, _model([numpy_helper.from_array(WEIGHTS, "w")]))) as opened:
        assert opened.external_files() == ([], [], [])


@pytest.mark.parametrize("change", ["longer", "same-size"])
def test_check_unchanged_refuses_a_data_file_written_to_after_it_was_opened(folder, change):
    (folder / "v.data").write_bytes(b"v" * 64)
    path = _save(folder, _model([_weights(), _external(numpy_helper.from_array(WEIGHTS, "v"),
                                                       "v.data")]))
    with open_onnx(path) as opened:
        opened.check_unchanged()
        stat_before = os.stat(folder / "v.data")
        with open(folder / "v.data", "r+b") as f:  # the same file (inode), written in place
            f.write(b"x" * (65 if change == "longer" else 64))
        # a write within the clock's tick may keep the mtime: move it as a later write would
        os.utime(folder / "v.data", ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns + 10**9))
        with pytest.raises(ArtifactError, match=rf"^{path}: external data file 'v.data' was "
                                                rf"written to while it was loaded: load it again$"):
            opened.check_unchanged()


def test_check_unchanged_takes_a_data_file_renamed_away_as_unchanged(folder):
    path = _save(folder, _model([_weights()]))
    with open_onnx(path) as opened:
        os.rename(folder / "w.data", folder / "moved.data")  # what was opened is still read
        opened.check_unchanged()
        assert bytes(opened.external_files()[1][0]) == WEIGHTS.tobytes()


def test_open_onnx_refuses_a_data_file_or_folder_reached_through_a_symlink(folder):
    (folder / "link.data").symlink_to(folder / "w.data")
    (folder / "dir").mkdir()
    (folder / "dir" / "w.data").write_bytes(WEIGHTS.tobytes())
    (folder / "dirlink").symlink_to(folder / "dir")
    for location, link in [("link.data", "link.data"), ("dirlink/w.data", "dirlink")]:
        path = _save(folder, _model([_weights(location)]))
        with pytest.raises(ArtifactError, match=rf"tensor 'w': external data location "
                                                rf"'{location}' goes through a symlink "
                                                rf"\({link}\); flash-export follows no links$"):
            open_onnx(path)
    # a plain file where a folder should be is missing, not a link
    path = _save(folder, _model([_weights("w.data/w.data")]))
    with pytest.raises(ArtifactError, match=r"'w.data/w.data' is missing or unreadable "
                                            r"\(Not a directory\)$"):
        open_onnx(path)


def _refused_without_waiting(call, fifo: Path) -> str:
    """The ArtifactError message of `call()`, which must not wait for a writer on `fifo`."""
    refused: list[str] = []

    def run() -> None:
        with pytest.raises(ArtifactError) as caught:
            call()
        refused.append(str(caught.value))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():  # blocked in open(): a writer lets it go, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(30)
        pytest.fail(f"waited for a writer on the FIFO {fifo.name}")
    return refused[0]


def test_a_fifo_named_as_data_is_refused_without_waiting_for_a_writer(folder):
    os.mkfifo(folder / "fifo.data")
    path = _save(folder, _model([_weights("fifo.data")]))
    assert _refused_without_waiting(lambda: open_onnx(path), folder / "fifo.data") == (
        f"{path}: tensor 'w': external data location 'fifo.data' is not a regular file")


def test_a_closed_data_file_holds_no_bytes_and_closing_again_closes_nothing(folder):
    path = _save(folder, _model([_weights()]))
    with open_onnx(path) as opened:
        data = opened.data["w.data"]
        assert bytes(data.view) == WEIGHTS.tobytes() and data.fd >= 0
    assert len(data.view) == 0 and data.fd < 0
    reused = os.open(folder / "w.data", os.O_RDONLY)  # may get the number just freed
    try:
        data.close()
        os.fstat(reused)  # still open
        assert len(data.view) == 0 and data.fd < 0
    finally:
        os.close(reused)


# ------------------------------------------------------------------ op versions

_V1_ATTRIBUTES = {n: v for n, v in _valid_attributes().items() if n not in V2_ATTRIBUTES}


def _node(inputs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node(OP_NAME, inputs, ["o"], domain=DOMAIN, name="fa", **attrs)


def _importing(version: int | None, node: onnx.NodeProto) -> onnx.ModelProto:
    """A model holding `node` that imports the op's domain at `version` (None: not at all)."""
    model = _with_nodes([node])
    if version is not None:
        model.opset_import.append(helper.make_opsetid(DOMAIN, version))
    return model


def _slots(*names: str) -> list[str]:
    """Node inputs by position: `names` filled in, the optional slots before them left empty."""
    last = max(NODE_INPUTS.index(n) for n in ("value", *names))
    return [n if n in ("query", "key", "value", *names) else "" for n in NODE_INPUTS[:last + 1]]


@pytest.mark.parametrize("feature", sorted(V2_ATTRIBUTES) + sorted(V2_INPUTS))
def test_a_version_1_model_may_use_no_version_2_attribute_or_input(feature):
    attrs = dict(_V1_ATTRIBUTES)
    inputs = _slots("mask")
    if feature in V2_ATTRIBUTES:
        attrs[feature] = _valid_attributes()[feature]
    else:
        inputs = _slots("mask", feature)
    node = _node(inputs, **attrs)
    with pytest.raises(ArtifactError, match=rf"^m.onnx: {OP_NAME} node 'fa' uses '{feature}', "
                                            rf"which came with version 2 of {DOMAIN}; the model "
                                            r"imports version 1$"):
        check_custom_nodes(_importing(1, node), "m.onnx")
    for version in (2, 3, None):
        assert check_custom_nodes(_importing(version, node), "m.onnx") == 1


def test_a_version_1_model_takes_version_1_attributes_a_mask_and_empty_optional_slots():
    for inputs in (_slots(), _slots("mask"), _slots("mask") + ["", ""]):
        node = _node(inputs, **_V1_ATTRIBUTES)
        assert check_custom_nodes(_importing(1, node), "m.onnx") == 1


def test_a_version_1_refusal_names_attributes_before_inputs_in_the_contracts_order():
    first, *_ = (n for n in NODE_ATTRIBUTES if n in V2_ATTRIBUTES)
    node = _node(_slots("bias"), **_valid_attributes())  # every attribute, and a bias
    with pytest.raises(ArtifactError, match=rf"uses '{first}', which came with version 2"):
        check_custom_nodes(_importing(1, node), "m.onnx")
    node = _node(_slots("seqlens_k", "bias"), **_V1_ATTRIBUTES)
    with pytest.raises(ArtifactError, match=r"uses 'seqlens_k', which came with version 2"):
        check_custom_nodes(_importing(1, node), "m.onnx")


def test_a_node_takes_every_input_the_op_has_and_no_more():
    node = _node(list(NODE_INPUTS), **_valid_attributes())
    assert check_custom_nodes(_importing(2, node), "m.onnx") == 1
    node = _node([*NODE_INPUTS, "extra"], **_valid_attributes())
    with pytest.raises(ArtifactError, match=rf"^m.onnx: {OP_NAME} node 'fa' has "
                                            rf"{len(NODE_INPUTS) + 1} inputs, expected at most "
                                            rf"{len(NODE_INPUTS)} \({', '.join(NODE_INPUTS)}\)$"):
        check_custom_nodes(_importing(2, node), "m.onnx")


def test_a_mistyped_attribute_whose_value_onnx_cannot_read_is_shown_as_a_question_mark():
    name = next(n for n, (kind, _) in NODE_ATTRIBUTES.items() if kind == "INT")
    node = _flash(**_valid_attributes())
    odd = next(a for a in node.attribute if a.name == name)
    odd.type = onnx.AttributeProto.FLOAT
    odd.ref_attr_name = "outer"  # a reference to a function's attribute: no value of its own
    with pytest.raises(ArtifactError, match=rf"attribute {name} is FLOAT \(\?\), expected "
                                            r"INT$"):
        check_custom_nodes(_with_nodes([node]), "m.onnx")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_open_onnx_leaves_no_descriptor_open_after_a_refusal_or_a_close(folder):
    (folder / "dir").mkdir()
    (folder / "dir" / "link.data").symlink_to(folder / "w.data")
    os.link(folder / "w.data", folder / "dir" / "twice.data")
    before = len(os.listdir("/proc/self/fd"))
    for location, words in [("dir/missing.data", "is missing or unreadable"),
                            ("dir/link.data", r"goes through a symlink \(link.data\)"),
                            ("dir/twice.data", "has 2 hard links"),
                            ("dir", "is not a regular file")]:
        path = _save(folder, _model([_weights(location)]))
        with pytest.raises(ArtifactError, match=rf"^{path}: tensor 'w': external data "
                                                rf"(location|file) '{location}' {words}"):
            open_onnx(path)
    (folder / "dir" / "twice.data").unlink()
    (folder / "dir" / "w.data").write_bytes(WEIGHTS.tobytes())
    with open_onnx(_save(folder, _model([_weights("dir/w.data")]))) as opened:
        assert opened.external_tensors == 1
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_model_path_that_is_missing_a_folder_or_a_fifo_is_not_found(tmp_path):
    """An ArtifactError each (a folder named x.onnx was an IsADirectoryError), no descriptor
    left open."""
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
    missing = tmp_path / "no" / "m.onnx"
    with pytest.raises(ArtifactError, match=rf"^ONNX file not found: {missing}$"):
        open_onnx(missing)
    with pytest.raises(ArtifactError, match=rf"^ONNX file not found: {tmp_path / 'm.onnx'}$"):
        check_onnx_file(tmp_path / "m.onnx")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(ArtifactError, match=rf"^ONNX file not found: {tmp_path / 'dir.onnx'} "
                                            r"\(not a regular file\)$"):
        check_onnx_file(tmp_path / "dir.onnx")
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    assert _refused_without_waiting(lambda: check_onnx_file(fifo), fifo) == (
        f"ONNX file not found: {fifo} (not a regular file)")
    if before:
        assert len(os.listdir("/proc/self/fd")) == before

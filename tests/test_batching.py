"""Dynamic batching by declaration: requests are joined only along a batch the model declares.

Real exported models of every layout (`_batch_models`), real onnxruntime sessions; `run_many` is
what each `flash-export serve` replica runs on its queued requests. Every answer must equal a
direct run of its own request, bitwise.
"""

import json

import numpy as np
import onnx
import pytest
from _batch_models import E, export_all, feed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flash_export.core.errors import ArtifactError
from flash_export.runtime import create_session, session_io
from flash_export.serving.batching import run_many
from flash_export.serving.limits import Limits
from flash_export.serving.protocol import OIPModel

LIMITS = Limits(max_batch=8)
LAYOUTS = ("lbe_out", "both", "undeclared")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    return export_all(tmp_path_factory.mktemp("layouts"), LAYOUTS)


@pytest.fixture(scope="module")
def sessions(graphs):
    return {name: create_session(path) for name, path in graphs.items()}


class CountingSession:
    """The real session, counting its runs (to see requests joined)."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def run(self, names, feed):
        self.runs += 1
        return self.session.run(names, feed)

    def __getattr__(self, name):
        return getattr(self.session, name)


def _model(sessions, name):
    session = sessions[name]
    return OIPModel(name, CountingSession(session), session_io(session), LIMITS)


def _assert_each_answer_is_its_own_run(model, feeds, answers):
    session = model.session.session
    names = [o.name for o in model.outputs]
    for i, (request, answer) in enumerate(zip(feeds, answers)):
        for name, want in zip(names, session.run(names, request)):
            got = answer[name]
            assert got.shape == want.shape, (model.name, i, name, got.shape, want.shape)
            assert np.array_equal(got, want), (model.name, i, name,
                                               float(np.abs(got - want).max()))


def test_derive_io_takes_the_batch_from_the_layout_pytorch_declares():
    """PyTorch's default nn.TransformerEncoder is seq-first: (L, B, E), the batch on axis 1."""
    import torch
    from _batch_models import _encoder

    from flash_export import convert
    from flash_export.nn.model_io import derive_io

    for batch_first, dims in ((False, ("seq", "batch", E)), (True, ("batch", "seq", E))):
        model = convert(_encoder(batch_first))
        src = torch.randn(2, 5, E) if batch_first else torch.randn(5, 2, E)
        io = derive_io(model, (src,), {})
        assert io.input("src").dims == dims and io.batch == "batch", (batch_first, io)


def test_exports_record_where_each_input_and_output_holds_the_batch(sessions):
    specs = {name: session_io(s) for name, s in sessions.items()}
    assert specs["lbe_out"].batch_axes() == {"x": 0, "padding_mask": 0, "output": 1}
    assert specs["both"].input("src").dims == ("seq", "batch", E)
    assert specs["both"].batch_axes() == {"src": 1, "output_0": 1, "output_1": 0}
    undeclared = specs["undeclared"]  # a wrapper that says nothing: dynamic, never batched
    assert undeclared.input("x").dims == ("batch", "seq", E) and undeclared.batch is None
    assert undeclared.batch_axes() is None
    assert undeclared.unbatched_reason() == "the model declares no per-request batch dim"


@pytest.mark.parametrize("layout", ["both", "lbe_out"])
def test_concurrent_requests_join_on_their_own_axes_and_come_back_unmixed(sessions, layout):
    """The issue's two leaks: a seq-first encoder (one client's tokens appended to another's
    sequence; `both`'s output_0) and a (L, B, E) output (split on the wrong axis)."""
    model = _model(sessions, layout)
    rng = np.random.default_rng(0)
    feeds = [feed(layout, rng, batch, 5) for batch in (1, 2, 1)]
    answers = run_many(model, feeds)
    assert model.session.runs == 1  # joined into one run...
    _assert_each_answer_is_its_own_run(model, feeds, answers)  # ...and split back exactly


def test_a_model_that_declares_no_batch_runs_each_request_alone(sessions):
    model = _model(sessions, "undeclared")
    rng = np.random.default_rng(1)
    feeds = [feed("undeclared", rng, 1, 5) for _ in range(3)]
    answers = run_many(model, feeds)
    assert model.session.runs == 3
    _assert_each_answer_is_its_own_run(model, feeds, answers)


def _with_io_spec(path, out, edit):
    graph = onnx.load(str(path))
    for prop in graph.metadata_props:
        if prop.key == "io_spec":
            prop.value = json.dumps(edit(json.loads(prop.value)))
    onnx.save(graph, str(out))
    return create_session(out)


def test_a_spec_that_puts_the_batch_where_the_graph_has_none_is_refused(graphs, tmp_path):
    def moved(spec):
        spec["output_dims"]["output"] = ["batch", "seq", E]  # the graph's is (seq, batch, E)
        return spec

    session = _with_io_spec(graphs["lbe_out"], tmp_path / "edited.onnx", moved)
    with pytest.raises(ArtifactError, match="output output axis 0 is batch, the graph's is seq"):
        session_io(session)


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(layout=st.sampled_from(LAYOUTS),
       requests=st.lists(st.tuples(st.integers(1, 3), st.sampled_from([1, 2, 5])), min_size=1,
                         max_size=8),
       seed=st.integers(0, 2**32 - 1))
def test_run_many_answers_every_request_mix_as_its_own_direct_run(sessions, layout, requests,
                                                                  seed):
    model = _model(sessions, layout)
    rng = np.random.default_rng(seed)
    feeds = [feed(layout, rng, batch, length) for batch, length in requests]
    answers = run_many(model, feeds)
    _assert_each_answer_is_its_own_run(model, feeds, answers)
    if model.batch_axes is None:
        assert model.session.runs == len(feeds)
    else:  # joined: one run per distinct length, within the batch limit
        assert model.session.runs <= len(feeds)


@pytest.mark.parametrize("edit, words", [
    ({"batch": "rows"}, "batch 'rows' is not a size any input uses"),
    ({"batch": 0}, "batch a size name or null"),
    ({"output_dims": {"output": ["batch", "vocab"]}}, "output output: dims must be"),
    ({"output_dims": {"logits": ["batch"]}}, "not an output"),
], ids=["undeclared_size", "not_a_name", "unknown_dim_name", "unknown_output"])
def test_a_malformed_batch_declaration_is_refused(edit, words):
    from flash_export.core.io_spec import IOSpec, TensorSpec

    spec = IOSpec((TensorSpec("x", "float32", ("batch", "seq", E)),), ("output",),
                  {"batch": (1, None), "seq": (1, None)},
                  output_dims={"output": ("seq", "batch", E)}, batch="batch")
    assert IOSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match=words):
        IOSpec.from_json(json.dumps({**json.loads(spec.to_json()), **edit}))

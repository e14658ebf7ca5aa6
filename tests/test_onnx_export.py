"""ONNX export: every target, compared with PyTorch at lengths never seen at export."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import onnx
import pytest
import torch
from _service_check import SERVICE_CHECK  # a sibling module

from flash_export.artifacts.safety import all_nodes
from flash_export.check.export_check import check_onnx_export
from flash_export.core.contract import DOMAIN_VERSION
from flash_export.core.contract import TARGETS as CONTRACT_TARGETS
from flash_export.core.errors import ExportError, ValidationError
from flash_export.export import onnx as onnx_export
from flash_export.export.onnx import default_opset, export_onnx, runtime_limits
from flash_export.nn.attention import FlashAttention
from flash_export.runtime import create_session, library_path

ROOT = Path(__file__).resolve().parents[1]


class _ContractEncoder(torch.nn.Module):
    """Two layers under the attention contract: the first attends from queries to keys/values
    (with the mask), the second over its own output."""

    def __init__(self, embed: int, heads: int, chunk: int, causal: bool) -> None:
        super().__init__()
        self.first = FlashAttention(embed, heads, chunk, causal=causal)
        self.second = FlashAttention(embed, heads, chunk, causal=causal)
        self.norm = torch.nn.LayerNorm(embed)

    def forward(self, values: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.norm(self.first(values, keys, queries, mask) + queries)  # (B, Lq, E)
        return self.norm(self.second(x, x, x) + x)  # (B, Lq, E)

TARGETS = list(CONTRACT_TARGETS)  # every target the contract names
# (q_len, k_len) never used at export (17, 23): single token, chunk tails, Lq > Lk (causal rows
# that see no key) and Lq < Lk.
UNSEEN = ((1, 1), (64, 65), (65, 200), (200, 63))

def _seeded(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    return factory().eval()


MODELS: Dict[str, Tuple[Callable[[], torch.nn.Module], bool]] = {
    # name: (factory, export with mask input)
    "default": (lambda: FlashAttention(128, 8, 64), False),
    "causal": (lambda: FlashAttention(128, 8, 64, causal=True), False),
    "masked": (lambda: FlashAttention(128, 8, 64), True),
    "encoder-causal-masked": (lambda: _ContractEncoder(48, 4, 16, causal=True), True),
}


@pytest.fixture(scope="module")
def models() -> Dict[str, torch.nn.Module]:
    return {name: _seeded(factory) for name, (factory, _) in MODELS.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory,
             models: Dict[str, torch.nn.Module]) -> Callable[..., Path]:
    """Export each (model, target, dtype, static) once per module; exports take seconds."""
    cache: Dict[Tuple[str, str, str, bool], Path] = {}
    folder = tmp_path_factory.mktemp("onnx")

    def get(name: str, target: str, dtype: str = "float32", static: bool = False) -> Path:
        key = (name, target, dtype, static)
        if key not in cache:
            path = folder / f"{name}-{target}-{dtype}-{int(static)}.onnx"
            cache[key] = export_onnx(models[name], path, target=target, dtype=dtype,
                                     static_shapes=static, mask=MODELS[name][1])
        return cache[key]

    return get


def _maybe_skip(target: str) -> None:
    if target == "custom" and not Path(library_path()).is_file():
        pytest.skip(f"native library not built at {library_path()} (run custom_ops/build.py and "
                    "set FLASH_EXPORT_LIBRARY)")


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
@pytest.mark.parametrize("target", TARGETS, ids=TARGETS)
def test_matches_pytorch_at_unseen_lengths(exported, models, target, name):
    _maybe_skip(target)
    results = check_onnx_export(models[name], exported(name, target), seq_lengths=UNSEEN,
                                batch=3)
    assert [(r.q_len, r.k_len) for r in results] == list(UNSEEN)
    assert all(r.max_abs <= r.bound for r in results)


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_custom_target_is_one_flash_attention_node_per_layer(exported, models, name):
    model = onnx.load(str(exported(name, "custom")))
    nodes = [n for n in model.graph.node if n.domain == "com.flash_export"]
    layers = [m for m in models[name].modules() if isinstance(m, FlashAttention)]
    assert len(nodes) == len(layers)
    assert {o.domain: o.version for o in model.opset_import}["com.flash_export"] == DOMAIN_VERSION
    for node, layer in zip(nodes, layers):
        assert node.op_type == "FlashAttention"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == pytest.approx({"num_heads": layer.heads, "chunk_size": layer.chunk_size,
                                       "causal": int(layer.causal), "scale": layer.scale})
    masked_nodes = [n for n in nodes if len(n.input) == 4]
    assert len(nodes[0].input) == (4 if MODELS[name][1] else 3)
    assert len(masked_nodes) == (1 if MODELS[name][1] else 0)  # later encoder layers: no mask


@pytest.mark.parametrize("target", TARGETS, ids=TARGETS)
def test_file_is_valid_dynamic_and_labelled(exported, target):
    path = exported("masked", target)
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    _, ir = runtime_limits()
    assert {o.domain: o.version for o in model.opset_import}[""] == default_opset(target)
    assert model.ir_version <= ir
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in model.graph.input}
    assert inputs == {"values": ["batch", "k_len", 128], "keys": ["batch", "k_len", 128],
                      "queries": ["batch", "q_len", 128], "mask": ["batch", 1, "q_len", "k_len"]}
    assert model.graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.BOOL
    assert [o.name for o in model.graph.output] == ["output"]
    used = onnx_export._used_names(model.graph)
    assert all(name in used for name in inputs)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["target"] == target and meta["artifact"] == "onnx"
    assert meta["domain"] == "com.flash_export" and meta["domain_version"] == str(DOMAIN_VERSION)
    assert meta["dtype"] == "float32" and meta["heads"] == "8" and meta["chunk_size"] == "64"


@pytest.mark.parametrize("target,domain,op_type", [
    ("standard", "", "Loop"),
    ("contrib", "com.microsoft", "MultiHeadAttention"),
    ("attention23", "", "Attention"),
], ids=["standard", "contrib", "attention23"])
def test_stock_targets_run_without_the_library(exported, monkeypatch, target, domain, op_type):
    model = onnx.load(str(exported("causal", target)))
    nodes = list(all_nodes(model.graph))  # contrib and attention23 nest theirs in If branches
    assert all(n.domain != "com.flash_export" for n in nodes)
    assert any(n.domain == domain and n.op_type == op_type for n in nodes)
    if target == "standard":
        assert {n.domain for n in nodes} == {""}
    monkeypatch.setenv("FLASH_EXPORT_LIBRARY", "/nonexistent/libflash_export.so")
    session = create_session(exported("causal", target))
    x = np.zeros((1, 5, 128), np.float32)
    out = session.run(None, {"values": x, "keys": x, "queries": x[:, :3]})[0]
    assert out.shape == (1, 3, 128)


def test_standard_loop_carries_only_row_state(exported):
    model = onnx.load(str(exported("default", "standard")))
    (loop,) = [n for n in model.graph.node if n.op_type == "Loop"]
    # Trip count, condition and three O(Lq x D) states (acc, l_sum, m); no scan outputs, which
    # would grow with Lk.
    assert len(loop.input) == 5 and len(loop.output) == 3


@pytest.mark.parametrize("target", ["standard", "custom"], ids=["standard", "custom"])
def test_static_shapes_fix_every_dim(exported, models, target):
    path = exported("masked", target, static=True)
    model = onnx.load(str(path))
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}
    assert dims == {"values": [2, 23, 128], "keys": [2, 23, 128], "queries": [2, 17, 128],
                    "mask": [2, 1, 17, 23]}
    _maybe_skip(target)
    # Static dims override the requested lengths: both pairs become the one shape, checked once.
    assert [r[:2] for r in check_onnx_export(models["masked"], path)] == [(17, 23)]


@pytest.mark.parametrize("target", TARGETS, ids=TARGETS)
def test_float16_export_runs_and_matches(exported, models, target):
    path = exported("causal", target, dtype="float16")
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    _maybe_skip(target)
    check_onnx_export(models["causal"], path, seq_lengths=((7, 63), (65, 129)))


def test_float16_attention23_runs_the_float32_kernel(exported):
    """onnxruntime's float16 CPU Attention is 2-3x slower; inside the guard's If branches it does
    not insert the float32 casts it adds at top level, so the export states them."""
    model = onnx.load(str(exported("causal", "attention23", dtype="float16")))
    nodes = list(all_nodes(model.graph))
    produced_by = {out: n for n in nodes for out in n.output}
    attention = [n for n in nodes if n.op_type == "Attention"]
    assert attention
    for node in attention:
        for name in node.input[:3]:
            source = produced_by[name]
            assert source.op_type == "Cast", (name, source.op_type)
            assert source.attribute[0].i == onnx.TensorProto.FLOAT


def test_mismatch_raises_validation_error_naming_target_and_shape(exported):
    other = _seeded(lambda: FlashAttention(128, 8, 64, causal=False))
    with torch.no_grad():
        other.out_proj.bias.add_(0.5)
    with pytest.raises(ValidationError, match=r"standard .*q_len=7 k_len=9.*max abs error"):
        check_onnx_export(other, exported("default", "standard"), seq_lengths=((7, 9),))


@pytest.mark.parametrize("kwargs,message", [
    ({"target": "tensorrt"}, "unknown ONNX target"),
    ({"dtype": "bfloat16"}, "unsupported dtype"),
    ({"opset": 99}, "opset 99 is not usable"),
    ({"target": "attention23", "opset": 22}, "opset 22 is not usable"),
], ids=["target", "dtype", "opset-too-high", "attention23-below-23"])
def test_bad_options_raise_export_error(tmp_path, models, kwargs, message):
    with pytest.raises(ExportError, match=message):
        export_onnx(models["default"], tmp_path / "x.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_composite_model_without_spec_records_none_and_validates_against_the_object(tmp_path,
                                                                                   models):
    from flash_export.check.validate import validate
    from flash_export.core.errors import ArtifactError

    model = models["encoder-causal-masked"]
    path = export_onnx(model, tmp_path / "x.onnx", target="standard")
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert "model_spec" not in meta and meta["embed"] == str(model.first.embed_size)
    with pytest.raises(ArtifactError, match="records no model spec.*--model"):
        validate(path, seq=[7], batch=[1])
    assert validate(path, seq=[7, 9], batch=[1], model=model).passed


def test_explicit_lower_opset(tmp_path, models):
    path = export_onnx(models["default"], tmp_path / "o18.onnx", target="standard", opset=18)
    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    check_onnx_export(models["default"], path, seq_lengths=((3, 70),))


@pytest.fixture()
def reuse_export(exported, monkeypatch):
    """Skip the slow torch export in tests about writing: reuse a cached graph."""
    cached = onnx.load(str(exported("default", "standard")))
    monkeypatch.setattr(onnx_export, "_export_program",
                        lambda *args, **kwargs: onnx.ModelProto.FromString(
                            cached.SerializeToString()))


def test_failed_export_keeps_the_good_file(tmp_path, models, monkeypatch, reuse_export):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"good")

    def broken(*args, **kwargs):
        raise onnx.checker.ValidationError("injected failure")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(ExportError, match="injected failure"):
        export_onnx(models["default"], path, target="standard")
    assert path.read_bytes() == b"good"
    with pytest.raises(ExportError):
        export_onnx(models["default"], tmp_path / "new.onnx", target="standard")
    assert not (tmp_path / "new.onnx").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging


def test_large_model_goes_to_external_data(tmp_path, models, monkeypatch, reuse_export):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1024)
    path = export_onnx(models["default"], tmp_path / "big.onnx", target="standard")
    (data,) = tmp_path.glob("big.onnx.*.data")  # named after its content's SHA-256
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging
    assert path.stat().st_size < data.stat().st_size
    onnx.checker.check_model(str(path), full_check=True)
    check_onnx_export(models["default"], path, seq_lengths=((5, 9),))


def test_a_masked_graph_answers_an_oip_request_without_torch(exported):
    path = exported("masked", "standard")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", SERVICE_CHECK, str(path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "service ok {'output': [2, 7, 128]}" in done.stdout

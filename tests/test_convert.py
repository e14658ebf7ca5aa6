"""convert(): nn.MultiheadAttention models computed by FlashAttention, with MHA's semantics.

References are the ORIGINAL PyTorch model in float64 on MHA's documented path
(F.multi_head_attention_forward; PyTorch's fused fast path is switched off for the reference
and the baseline only), the baseline the original in float32: the STYLE.md tolerance rule.
"""

import contextlib
import copy
import math
import subprocess
import sys
from typing import Any, Dict, Iterator

import pytest
import torch
from helpers import check_against_reference
from torch import Tensor, nn

import flash_export
import flash_export.nn.attention
from flash_export import ConversionError, FlashAttention, convert, replace_attention
from flash_export.nn.conversion import FlashMultiheadAttention

LENGTHS = [1, 7, 63, 65]
E, H = 32, 4


@contextlib.contextmanager
def pytorch_slow_path() -> Iterator[None]:
    """PyTorch's documented MHA path: no fused kernels, no nested tensors."""
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


def _double(x: Any) -> Any:
    return x.double() if isinstance(x, Tensor) and x.is_floating_point() else x


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def assert_matches_original(model: nn.Module, converted: nn.Module, *args: Any,
                            **kwargs: Any) -> float:
    """Converted (float32, eval, no_grad, PyTorch's fast path allowed) against the original in
    float64, baseline the original in float32; returns the max abs error."""
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        got = _first(converted(*args, **kwargs))
        with pytorch_slow_path():
            baseline = _first(model(*args, **kwargs))
            expected = _first(reference(*[_double(a) for a in args],
                                        **{k: _double(v) for k, v in kwargs.items()}))
    assert torch.isfinite(expected).all()
    c = check_against_reference(got, expected, baseline)
    assert c.passed, (f"max abs error {c.max_abs:.3g} > bound {c.bound:.3g} "
                      f"(nonfinite {c.nonfinite}, worst at {c.worst_index})")
    return c.max_abs


def _randomise_biases(model: nn.Module) -> nn.Module:
    # nn.MultiheadAttention initialises its biases to zero, which would hide a dropped bias.
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _encoder(batch_first: bool) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, batch_first=batch_first)
    # Nested tensors only exist for batch_first; asking for them otherwise just warns.
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)
    return _randomise_biases(enc).eval()


def _padding(b: int, length: int) -> Tensor:
    """(B, L) bool, True = padded: a full row, a half-padded row, and a fully padded row."""
    lengths = torch.tensor([length, (length + 1) // 2, 0])[:b]
    return torch.arange(length)[None, :] >= lengths[:, None]


def _seq(b: int, length: int, batch_first: bool, seed: int = 1) -> Tensor:
    x = torch.randn(b, length, E, generator=torch.Generator().manual_seed(seed))
    return x if batch_first else x.transpose(0, 1)


def _causal_bool(length: int) -> Tensor:
    return torch.ones(length, length, dtype=torch.bool).triu(1)  # True = blocked


ENCODER_MASKS = ["padding", "causal-float", "causal-bool", "causal+padding", "none"]


def _encoder_kwargs(case: str, length: int) -> Dict[str, Any]:
    if case == "padding":
        return {"src_key_padding_mask": _padding(3, length)}
    if case == "causal-float":  # what generate_square_subsequent_mask gives: 0 and -inf
        return {"mask": nn.Transformer.generate_square_subsequent_mask(length), "is_causal": True}
    if case == "causal-bool":
        return {"mask": _causal_bool(length), "is_causal": True}
    if case == "causal+padding":
        return {"mask": _causal_bool(length), "is_causal": True,
                "src_key_padding_mask": _padding(3, length)}
    return {}


@pytest.mark.parametrize("case", ENCODER_MASKS)
@pytest.mark.parametrize("length", LENGTHS, ids=[f"L{n}" for n in LENGTHS])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_encoder_matches_pytorch(batch_first, length, case):
    enc = _encoder(batch_first)
    converted = convert(enc)
    assert_matches_original(enc, converted, _seq(3, length, batch_first),
                            **_encoder_kwargs(case, length))


def test_fully_padded_sequence_gives_mha_result_not_nan():
    # MHA's documented path gives a query that sees no key zeros before the output projection;
    # PyTorch's fused encoder instead writes zeros at every padded position (nested tensors).
    enc = _encoder(True)
    mha = enc.layers[0].self_attn
    converted = convert(mha)
    x = _seq(2, 5, True)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1] = True
    with torch.no_grad():
        out, weights = converted(x, x, x, key_padding_mask=pad, need_weights=False)
        with pytorch_slow_path():
            expected = mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    assert weights is None
    torch.testing.assert_close(out[1], mha.out_proj.bias.detach().expand(5, E), atol=0, rtol=0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


DECODER_SHAPES = [(1, 1), (7, 63), (65, 7), (63, 65)]


@pytest.mark.parametrize("lq,lk", DECODER_SHAPES, ids=[f"q{q}-k{k}" for q, k in DECODER_SHAPES])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_decoder_layer_matches_pytorch(batch_first, lq, lk):
    torch.manual_seed(0)
    layer = _randomise_biases(nn.TransformerDecoderLayer(E, H, dim_feedforward=64,
                                                         batch_first=batch_first)).eval()
    converted = convert(layer)
    tgt, memory = _seq(3, lq, batch_first, seed=1), _seq(3, lk, batch_first, seed=2)
    assert_matches_original(layer, converted, tgt, memory, tgt_mask=_causal_bool(lq),
                            tgt_is_causal=True, memory_key_padding_mask=_padding(3, lk),
                            tgt_key_padding_mask=_padding(3, lq).flip(0))


@pytest.mark.parametrize("ls,lt", [(7, 63), (65, 1)], ids=["s7-t63", "s65-t1"])
def test_transformer_matches_pytorch(ls, lt):
    torch.manual_seed(0)
    model = _randomise_biases(nn.Transformer(E, H, num_encoder_layers=2, num_decoder_layers=2,
                                             dim_feedforward=64, batch_first=True)).eval()
    converted = convert(model)
    assert sum(isinstance(m, FlashMultiheadAttention) for m in converted.modules()) == 6
    src, tgt = _seq(3, ls, True, seed=1), _seq(3, lt, True, seed=2)
    assert_matches_original(model, converted, src, tgt,
                            tgt_mask=nn.Transformer.generate_square_subsequent_mask(lt),
                            src_key_padding_mask=_padding(3, ls),
                            memory_key_padding_mask=_padding(3, ls))


# Bare nn.MultiheadAttention: (batch_first, bias, lq, lk, masks), every MHA call form.
MHA_CASES = {
    "self-bf-padding": (True, True, 7, 7, {"key_padding_mask"}),
    "cross-seqfirst-2d-mask": (False, True, 7, 63, {"key_padding_mask", "attn_mask_2d"}),
    "cross-bf-3d-mask": (True, True, 65, 7, {"attn_mask_3d"}),
    "nobias-cross": (True, False, 63, 65, {"key_padding_mask"}),
    "unbatched": (True, True, 7, 65, {"key_padding_mask", "attn_mask_2d"}),
    "unbatched-3d-mask": (False, True, 65, 1, {"attn_mask_3d"}),
    # The hint without a padding mask: MHA ignores attn_mask (here all False) and applies the
    # top-left causal rule, also when Lq != Lk.
    "causal-hint-drops-mask": (True, True, 7, 63, {"attn_mask_2d_open", "is_causal"}),
    # ... even an additive one, which is then neither applied nor refused.
    "causal-hint-drops-additive-mask": (False, True, 65, 65, {"attn_mask_2d_additive",
                                                              "is_causal"}),
    # With a padding mask MHA applies attn_mask and ignores the hint.
    "causal-hint-with-padding": (False, True, 65, 65, {"attn_mask_2d", "key_padding_mask",
                                                       "is_causal"}),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_call_forms_match_pytorch(case):
    batch_first, bias, lq, lk, masks = MHA_CASES[case]
    unbatched = case.startswith("unbatched")
    b = 1 if unbatched else 3
    torch.manual_seed(0)
    mha = _randomise_biases(nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first))
    mha.eval()
    converted = convert(mha, chunk_size=16)
    q, k, v = _seq(b, lq, batch_first, 1), _seq(b, lk, batch_first, 2), _seq(b, lk, batch_first, 3)
    g = torch.Generator().manual_seed(4)
    kwargs: Dict[str, Any] = {"need_weights": False}
    if "key_padding_mask" in masks:
        kwargs["key_padding_mask"] = _padding(b, lk)
    if "attn_mask_2d" in masks:
        kwargs["attn_mask"] = torch.rand(lq, lk, generator=g) < 0.3
    if "attn_mask_2d_open" in masks:
        kwargs["attn_mask"] = torch.zeros(lq, lk, dtype=torch.bool)
    if "attn_mask_2d_additive" in masks:
        kwargs["attn_mask"] = torch.randn(lq, lk, generator=g)
    if "attn_mask_3d" in masks:
        kwargs["attn_mask"] = torch.rand(b * H, lq, lk, generator=g) < 0.3
    if "is_causal" in masks:
        kwargs["is_causal"] = True
    if unbatched:  # B = 1 in either layout
        q, k, v = q.reshape(lq, E), k.reshape(lk, E), v.reshape(lk, E)
        if "key_padding_mask" in kwargs:
            kwargs["key_padding_mask"] = _padding(3, lk)[1]  # (Lk,), half padded
    assert_matches_original(mha, converted, q, k, v, **kwargs)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_pytorch_fast_path_never_replaces_flash_attention(monkeypatch):
    # eval + no_grad + batch_first + even heads + a padding mask: PyTorch's fused encoder (nested
    # tensors and torch._transformer_encoder_layer_fwd) takes the original model. No forward hooks
    # here: a hook inside a layer would itself turn PyTorch's fast path off.
    fused: Dict[str, int] = {}

    def counting(name: str) -> None:
        real = getattr(torch, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            fused[name] = fused.get(name, 0) + 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, name, wrapper)

    for name in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention",
                 "_nested_tensor_from_mask"):
        counting(name)
    flash_calls = []
    real_core = flash_export.nn.attention.flash_attention_core

    def core(*args: Any) -> Tensor:
        flash_calls.append(args[0].shape)
        return real_core(*args)

    monkeypatch.setattr(flash_export.nn.attention, "flash_attention_core", core)
    enc = _encoder(True)
    converted = convert(enc)
    x, pad = _seq(3, 9, True), _padding(3, 9)
    with torch.no_grad():
        enc(x, src_key_padding_mask=pad)
        assert fused.get("_transformer_encoder_layer_fwd") == 2, fused  # the control
        fused.clear()
        converted(x, src_key_padding_mask=pad)
        converted.layers[0](x, src_key_padding_mask=pad)
        converted.layers[0].self_attn(x, x, x, need_weights=False)
    assert fused == {}
    assert len(flash_calls) == 4


def _call_targets(program: torch.export.ExportedProgram) -> str:
    return " ".join(str(n.target) for n in program.graph.nodes if n.op == "call_function")


def test_torch_export_runs_flash_attention_not_pytorch_attention():
    converted = convert(_encoder(True))
    x, pad = _seq(3, 9, True), _padding(3, 9)
    program = torch.export.export(converted, (x,), kwargs={"src_key_padding_mask": pad})
    targets = _call_targets(program)
    for fused in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention",
                  "scaled_dot_product_attention", "_nested_tensor"):
        assert fused not in targets
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, src_key_padding_mask=pad),
                                   converted(x, src_key_padding_mask=pad), atol=1e-6, rtol=0)


def test_torch_export_with_a_dynamic_sequence_length_matches_eager():
    # FlashAttention's chunk loop is Python, so tracing fixes the length; the ONNX exporter swaps
    # in its adapter (one opaque op per attention) to keep it dynamic, and so does this test.
    from flash_export.export.onnx_targets import OnnxAttention

    converted = convert(_encoder(True))
    adapted = replace_attention(converted, OnnxAttention).eval()
    seq = torch.export.Dim("seq", min=2, max=512)
    x, pad = _seq(3, 9, True), _padding(3, 9)
    program = torch.export.export(adapted, (x,), kwargs={"src_key_padding_mask": pad},
                                  dynamic_shapes={"src": {1: seq},
                                                  "src_key_padding_mask": {1: seq}})
    assert "flash_export.onnx_attention_masked" in _call_targets(program)
    assert "_transformer_encoder_layer_fwd" not in _call_targets(program)
    x2, pad2 = _seq(3, 65, True, seed=5), _padding(3, 65)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x2, src_key_padding_mask=pad2),
                                   converted(x2, src_key_padding_mask=pad2), atol=1e-5, rtol=0)


def test_exported_graph_makes_rows_with_additive_mask_values_nan():
    # A recorded graph cannot raise on values: rows reached by a refused float-mask entry come out
    # NaN, never finite and wrong. 0/-inf masks are exact.
    torch.manual_seed(0)
    converted = convert(nn.MultiheadAttention(E, H, batch_first=True).eval())
    x = _seq(2, 7, True)
    mask = torch.zeros(7, 7)
    program = torch.export.export(converted, (x, x, x), kwargs={"attn_mask": mask,
                                                               "need_weights": False})
    run = program.module()
    good = nn.Transformer.generate_square_subsequent_mask(7)
    with torch.no_grad():
        torch.testing.assert_close(run(x, x, x, attn_mask=good, need_weights=False)[0],
                                   converted(x, x, x, attn_mask=good, need_weights=False)[0])
        bad = good.clone()
        bad[3, 0] = -1e9  # the common "large negative" mask: additive, refused
        out = run(x, x, x, attn_mask=bad, need_weights=False)[0]
    assert out[:, 3].isnan().all()
    assert torch.isfinite(out[:, [0, 1, 2, 4, 5, 6]]).all()


def test_scripted_module_matches_eager_and_keeps_refusals():
    torch.manual_seed(0)
    converted = convert(_randomise_biases(nn.MultiheadAttention(E, H)).eval(), chunk_size=7)
    scripted = torch.jit.script(converted)
    q, kv = _seq(3, 9, False, 1), _seq(3, 20, False, 2)
    kwargs = {"key_padding_mask": _padding(3, 20), "need_weights": False,
              "attn_mask": nn.Transformer.generate_square_subsequent_mask(20)[:9]}
    with torch.no_grad():
        torch.testing.assert_close(scripted(q, kv, kv, **kwargs)[0],
                                   converted(q, kv, kv, **kwargs)[0], atol=0, rtol=0)
    with pytest.raises(torch.jit.Error, match="ConversionError.*need_weights=False"):
        scripted(q, kv, kv)
    # nn.MultiheadAttention's size attributes stay readable, by scripted user code too
    original = nn.MultiheadAttention(E, H)
    for name in ("embed_dim", "num_heads", "head_dim", "kdim", "vdim"):
        assert getattr(scripted, name) == getattr(original, name), name


def test_user_model_calling_multihead_attention_converts_and_scripts():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, batch_first=True)
            self.norm = nn.LayerNorm(E)

        def forward(self, x: Tensor, pad: Tensor) -> Tensor:
            return self.norm(x + self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0])

    torch.manual_seed(0)
    model = _randomise_biases(Block()).eval()
    converted = convert(model)
    x, pad = _seq(3, 63, True), _padding(3, 63)
    assert_matches_original(model, converted, x, pad)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(converted)(x, pad), converted(x, pad),
                                   atol=0, rtol=0)


def test_original_is_untouched_and_sharing_is_kept():
    shared = nn.MultiheadAttention(E, H)
    model = nn.ModuleDict({"a": shared, "b": shared, "norm": nn.LayerNorm(E)}).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert(model)
    assert model["a"] is shared and type(shared) is nn.MultiheadAttention
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(converted["a"], FlashMultiheadAttention)
    assert converted["a"] is converted["b"]
    assert converted["a"].training  # the training mode is kept
    assert converted["a"].attention.q_proj.weight.data_ptr() != shared.in_proj_weight.data_ptr()


def test_flash_attention_model_comes_back_as_a_copy():
    model = nn.Sequential(FlashAttention(E, H))
    converted = convert(model)
    assert converted is not model and isinstance(converted[0], FlashAttention)
    assert converted[0].q_proj.weight is not model[0].q_proj.weight


def test_flash_export_convert_is_the_function_whatever_was_imported_first():
    code = ("import flash_export.nn.conversion, torch\n"
            "from flash_export import convert\n"
            "m = convert(torch.nn.MultiheadAttention(8, 2), chunk_size=4)\n"
            "print(type(m).__name__, m.attention.chunk_size)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["FlashMultiheadAttention", "4"]
    assert callable(flash_export.convert)


# --- refusals -----------------------------------------------------------------------------------

REFUSED_MODULES = {
    "kdim": (lambda: nn.MultiheadAttention(E, H, kdim=16), "kdim=16"),
    "vdim": (lambda: nn.MultiheadAttention(E, H, vdim=16), "vdim=16"),
    "add_bias_kv": (lambda: nn.MultiheadAttention(E, H, add_bias_kv=True), "add_bias_kv"),
    "add_zero_attn": (lambda: nn.MultiheadAttention(E, H, add_zero_attn=True), "add_zero_attn"),
    "subclass": (lambda: type("MyAttention", (nn.MultiheadAttention,), {})(E, H), "MyAttention"),
}


@pytest.mark.parametrize("case", list(REFUSED_MODULES))
def test_unmatchable_modules_are_refused_naming_their_path(case):
    build, feature = REFUSED_MODULES[case]
    model = nn.Sequential(nn.Linear(E, E), nn.ModuleDict({"attn": build()}))
    with pytest.raises(ConversionError, match=rf"'1\.attn'.*{feature}|{feature}.*'1\.attn'"):
        convert(model)


def test_model_without_attention_is_refused():
    with pytest.raises(ConversionError, match="nothing to convert: Sequential"):
        convert(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True], ids=["zero", "negative", "float", "bool"])
def test_bad_chunk_size_is_refused(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        convert(nn.MultiheadAttention(E, H), chunk_size=bad)


def _converted_mha(**kwargs: Any) -> FlashMultiheadAttention:
    torch.manual_seed(0)
    module = convert(nn.MultiheadAttention(E, H, batch_first=True, **kwargs).eval())
    assert isinstance(module, FlashMultiheadAttention)
    return module


def test_need_weights_is_refused_with_the_fix_in_the_message():
    mha = _converted_mha()
    x = _seq(2, 5, True)
    with pytest.raises(ConversionError, match="need_weights=False"):
        mha(x, x, x)  # MHA's default is need_weights=True
    with pytest.raises(ConversionError, match="need_weights=False"):
        mha(x, x, x, need_weights=True, average_attn_weights=False)


ADDITIVE = {
    "attn_mask-large-negative": ("attn_mask", lambda: torch.zeros(5, 5).fill_diagonal_(-1e9)),
    "attn_mask-bias": ("attn_mask", lambda: torch.full((5, 5), 0.5)),
    "attn_mask-nan": ("attn_mask", lambda: torch.full((5, 5), math.nan)),
    "key_padding_mask-finite": ("key_padding_mask", lambda: torch.full((2, 5), -1e4)),
}


@pytest.mark.parametrize("case", list(ADDITIVE))
def test_additive_float_masks_are_refused(case):
    name, build = ADDITIVE[case]
    mha = _converted_mha()
    x = _seq(2, 5, True)
    with pytest.raises(ConversionError, match=f"{name} is an additive float mask"):
        mha(x, x, x, need_weights=False, **{name: build()})


def test_dropout_is_refused_in_training_only():
    mha = _converted_mha(dropout=0.1)
    x = _seq(2, 5, True)
    mha(x, x, x, need_weights=False)  # eval: dropout is off, exact
    with pytest.raises(ConversionError, match=r"dropout 0\.1 in training mode.*\.eval\(\)"):
        mha.train()(x, x, x, need_weights=False)


def test_training_without_dropout_matches_and_backpropagates():
    torch.manual_seed(0)
    mha = _randomise_biases(nn.MultiheadAttention(E, H, batch_first=True))
    converted = convert(mha)
    x = _seq(2, 7, True).requires_grad_()
    pad = _padding(2, 7)
    out = converted(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    torch.testing.assert_close(out, mha(x, x, x, key_padding_mask=pad, need_weights=False)[0],
                               atol=1e-5, rtol=0)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# MHA's own errors, raised with MHA's types and messages: (query shape, kwargs).
MHA_ERRORS = {
    "is_causal-without-mask": ((2, 5, E), {"is_causal": True}),
    "attn_mask-2d-shape": ((2, 5, E), {"attn_mask": torch.zeros(4, 5, dtype=torch.bool)}),
    "attn_mask-3d-shape": ((2, 5, E), {"attn_mask": torch.zeros(2, 5, 5, dtype=torch.bool)}),
    "attn_mask-rank": ((2, 5, E), {"attn_mask": torch.zeros(1, 1, 5, 5, dtype=torch.bool)}),
    "attn_mask-int": ((2, 5, E), {"attn_mask": torch.zeros(5, 5, dtype=torch.int64)}),
    "key_padding_mask-batch": ((2, 5, E), {"key_padding_mask": torch.zeros(3, 5).bool()}),
    "key_padding_mask-length": ((2, 5, E), {"key_padding_mask": torch.zeros(2, 4).bool()}),
    "key_padding_mask-rank": ((2, 5, E), {"key_padding_mask": torch.zeros(2, 1, 5).bool()}),
    "query-rank": ((1, 2, 5, E), {}),
    "embed": ((2, 5, E + 1), {}),
    "unbatched-3d-mask": ((5, E), {"attn_mask": torch.zeros(2, 5, 5, dtype=torch.bool)}),
    "unbatched-key_padding_mask-rank": ((5, E), {"key_padding_mask": torch.zeros(1, 5).bool()}),
    "unbatched-attn_mask-rank": ((5, E), {"attn_mask": torch.zeros(1, 1, 5, 5, dtype=torch.bool)}),
}


@pytest.mark.parametrize("case", list(MHA_ERRORS))
def test_multihead_attention_errors_are_mirrored(case):
    shape, kwargs = MHA_ERRORS[case]
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)  # training mode: MHA's documented path
    converted = convert(mha)
    x = torch.randn(shape)
    with pytest.raises(Exception) as expected:
        mha(x, x, x, need_weights=False, **kwargs)
    with pytest.raises(type(expected.value)) as got:
        converted(x, x, x, need_weights=False, **kwargs)
    assert str(got.value) == str(expected.value)

"""FlashAttention semantics: parity with nn.MultiheadAttention and the float64 reference."""

import math

import pytest
import torch
from helpers import assert_matches_reference, core_reference
from torch import nn

from flash_export import FlashAttention, reference_forward
from flash_export.nn.attention import flash_attention_core


def _inputs(b: int, lq: int, lk: int, e: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(b, lk, e, generator=g).to(dtype)
    k = torch.randn(b, lk, e, generator=g).to(dtype)
    q = torch.randn(b, lq, e, generator=g).to(dtype)
    return v, k, q


def _mha(e: int, h: int, bias: bool = True) -> nn.MultiheadAttention:
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(e, h, bias=bias, batch_first=True).eval()
    with torch.no_grad():  # non-zero biases so a dropped bias would show
        if bias:
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha


SHAPES = [(1, 1, 1), (2, 7, 63), (1, 65, 65), (3, 129, 64)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("b,lq,lk", SHAPES, ids=[f"b{b}-q{q}-k{k}" for b, q, k in SHAPES])
def test_matches_multihead_attention_without_mask(b, lq, lk, bias):
    mha = _mha(64, 4, bias)
    fa = FlashAttention.from_multihead_attention(mha, chunk_size=16).eval()
    v, k, q = _inputs(b, lq, lk, 64)
    with torch.no_grad():
        expected = mha(q, k, v, need_weights=False)[0]
        got = fa(v, k, q)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("b,lq,lk", SHAPES[1:], ids=[f"b{b}-q{q}-k{k}" for b, q, k in SHAPES[1:]])
def test_matches_multihead_attention_with_key_padding_mask(b, lq, lk):
    mha = _mha(64, 4)
    fa = FlashAttention.from_multihead_attention(mha, chunk_size=7).eval()
    v, k, q = _inputs(b, lq, lk, 64)
    lengths = torch.randint(1, lk + 1, (b,), generator=torch.Generator().manual_seed(3))
    padding = torch.arange(lk)[None, :] >= lengths[:, None]  # (B, Lk), True = padded (MHA)
    ours = (~padding)[:, None, None, :].to(torch.int64)  # (B, 1, 1, Lk), 0 = blocked (ours)
    with torch.no_grad():
        expected = mha(q, k, v, key_padding_mask=padding, need_weights=False)[0]
        got = fa(v, k, q, ours)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
def test_matches_multihead_attention_with_boolean_mask(per_head):
    b, h, lq, lk = 2, 4, 33, 70
    mha = _mha(64, h)
    fa = FlashAttention.from_multihead_attention(mha, chunk_size=16).eval()
    v, k, q = _inputs(b, lq, lk, 64)
    g = torch.Generator().manual_seed(5)
    allowed = torch.rand(b, h if per_head else 1, lq, lk, generator=g) > 0.4
    allowed[..., 0] = True  # MHA gives NaN for rows with no key; that case is tested elsewhere
    with torch.no_grad():
        mha_mask = (~allowed).expand(b, h, lq, lk).reshape(b * h, lq, lk)  # True = blocked
        expected = mha(q, k, v, attn_mask=mha_mask, need_weights=False)[0]
        got = fa(v, k, q, allowed)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lq,lk", [(5, 9), (9, 5), (64, 64), (1, 100), (100, 1), (600, 700),
                                   (700, 600)],
                         ids=["q<k", "q>k", "square", "one-query", "one-key", "query-blocks-q<k",
                              "query-blocks-q>k"])
def test_causal_is_bottom_right_aligned_against_float64_reference(lq, lk):
    fa = FlashAttention(32, 4, 8, causal=True).eval()
    v, k, q = _inputs(2, lq, lk, 32)
    with torch.no_grad():
        got = fa(v, k, q).double()
    expected = reference_forward(fa, v, k, q)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # Independent statement of the alignment: query i sees key j iff j <= i + lk - lq.
    rows = torch.arange(lq)[:, None]
    cols = torch.arange(lk)[None, :]
    explicit = FlashAttention(32, 4, 8).eval()
    explicit.load_state_dict(fa.state_dict())
    with torch.no_grad():
        masked = explicit(v, k, q, (cols <= rows + (lk - lq)).to(torch.uint8)).double()
    torch.testing.assert_close(got, masked, atol=1e-6, rtol=0)


def test_causal_query_that_sees_no_key_gives_bias_only():
    # Lq > Lk: the first Lq - Lk queries see no key at all.
    fa = FlashAttention(16, 2, 4, causal=True).eval()
    v, k, q = _inputs(1, 6, 2, 16)
    with torch.no_grad():
        out = fa(v, k, q)
    torch.testing.assert_close(out[0, :4], fa.out_proj.bias.expand(4, 16), atol=0, rtol=0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000], ids=["c1", "c7", "c64", "c1000"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_results_do_not_depend_on_chunk_size(chunk, causal):
    base = FlashAttention(48, 3, 64, causal=causal).eval()
    other = FlashAttention(48, 3, chunk, causal=causal).eval()
    other.load_state_dict(base.state_dict())
    v, k, q = _inputs(2, 37, 129, 48)
    mask = torch.rand(2, 1, 37, 129, generator=torch.Generator().manual_seed(2)) > 0.3
    with torch.no_grad():
        torch.testing.assert_close(other(v, k, q, mask), base(v, k, q, mask), atol=2e-6, rtol=0)


def test_fully_masked_rows_are_zero_before_output_projection():
    fa = FlashAttention(32, 4, 8).eval()
    v, k, q = _inputs(2, 5, 20, 32)
    mask = torch.ones(2, 1, 5, 20)
    mask[:, :, 2] = 0  # query 2 sees nothing
    mask[1, :, 4] = 0
    with torch.no_grad():
        qp, kp, vp = fa.split_heads(fa.q_proj(q)), fa.split_heads(fa.k_proj(k)), \
            fa.split_heads(fa.v_proj(v))
        o = flash_attention_core(qp, kp, vp, (mask != 0), False, fa.scale, fa.chunk_size)
    assert torch.isfinite(o).all()
    assert torch.equal(o[:, :, 2], torch.zeros_like(o[:, :, 2]))
    assert torch.equal(o[1, :, 4], torch.zeros_like(o[1, :, 4]))
    assert o[0, :, 4].abs().sum() > 0


def test_empty_keys_give_zeros_and_empty_queries_give_empty_output():
    fa = FlashAttention(32, 4, 8).eval()
    with torch.no_grad():
        v, k, q = _inputs(2, 3, 0, 32)
        out = fa(v, k, q)
        assert out.shape == (2, 3, 32)
        torch.testing.assert_close(out, fa.out_proj.bias.expand(2, 3, 32), atol=0, rtol=0)
        v, k, q = _inputs(2, 0, 5, 32)
        assert fa(v, k, q).shape == (2, 0, 32)


DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_half_precisions_meet_the_tolerance_rule(dtype, causal, masked):
    torch.manual_seed(0)
    b, h, lq, lk, d = 2, 4, 63, 129, 16
    q, k, v = (torch.randn(b, h, n, d) for n in (lq, lk, lk))
    allowed = (torch.rand(b, 1, lq, lk) > 0.3) if masked else None
    scale = 1 / math.sqrt(d)
    ours = flash_attention_core(q.to(dtype), k.to(dtype), v.to(dtype), allowed, causal, scale, 16)
    assert ours.dtype == dtype
    reference = core_reference(q, k, v, allowed, causal, scale, torch.float64)
    baseline = core_reference(q, k, v, allowed, causal, scale, dtype)
    assert_matches_reference(ours, reference, baseline)


def test_float16_accumulates_in_float32():
    # 4096 equal keys: summing p in float16 would lose the tail; float32 keeps the average exact.
    q = torch.zeros(1, 1, 1, 8, dtype=torch.float16)
    k = torch.zeros(1, 1, 4096, 8, dtype=torch.float16)
    v = torch.full((1, 1, 4096, 8), 0.1, dtype=torch.float16)
    v[..., 2048:, :] = 0.3
    out = flash_attention_core(q, k, v, None, False, 1.0, 64)
    torch.testing.assert_close(out.float(), torch.full((1, 1, 1, 8), 0.2), atol=1e-3, rtol=0)


def test_nan_in_a_key_reaches_the_rows_that_attend_to_it():
    fa = FlashAttention(16, 2, 4).eval()
    v, k, q = _inputs(1, 3, 10, 16)
    k[0, 7] = float("nan")
    mask = torch.ones(1, 1, 3, 10)
    mask[0, 0, 1, 7] = 0  # query 1 never looks at key 7
    with torch.no_grad():
        out = fa(v, k, q, mask)
    assert torch.isnan(out[0, 0]).all() and torch.isnan(out[0, 2]).all()
    assert torch.isfinite(out[0, 1]).all()


BAD_INPUTS = {
    "rank": (lambda v, k, q: (v[0], k, q, None), "rank 2"),
    "embed": (lambda v, k, q: (v, k, q[..., :16], None), "embed size 32, got 16"),
    "batch": (lambda v, k, q: (v, k, torch.cat([q, q]), None), "batch"),
    "kv-length": (lambda v, k, q: (v[:, :3], k, q, None), "same length"),
    "mask-shape": (lambda v, k, q: (v, k, q, torch.ones(2, 3, 5, 9)), "does not broadcast"),
    "mask-rank": (lambda v, k, q: (v, k, q, torch.ones(1, 2, 4, 5, 9)), "rank 5"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_inputs_raise_value_error_naming_expected_and_got(case):
    fa = FlashAttention(32, 4, 8)
    make, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        fa(*make(*_inputs(2, 5, 9, 32)))


@pytest.mark.parametrize("args,message", [
    ((30, 4, 8), "multiple of heads"),
    ((32, 0, 8), "heads must be >= 1"),
    ((32, 4, 0), "chunk_size must be >= 1"),
], ids=["indivisible", "no-heads", "chunk0"])
def test_bad_construction_raises_value_error(args, message):
    with pytest.raises(ValueError, match=message):
        FlashAttention(*args)


def test_from_multihead_attention_rejects_what_it_cannot_copy():
    with pytest.raises(ValueError, match="kdim"):
        FlashAttention.from_multihead_attention(nn.MultiheadAttention(32, 4, kdim=16, vdim=16))
    with pytest.raises(ValueError, match="add_bias_kv"):
        FlashAttention.from_multihead_attention(nn.MultiheadAttention(32, 4, add_bias_kv=True))

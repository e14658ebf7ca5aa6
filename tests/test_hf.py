"""flash_export.hf: transformers models computing attention with our kernel, against eager."""

import copy

import pytest

pytest.importorskip("transformers", reason="flash_export.hf needs transformers: the hf extra "
                    "(pip install -e '.[hf]'; make test installs it)")

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from _hf_models import (  # noqa: E402
    COMMON,
    FAMILIES,
    as_dtype,
    eager,
    one_thread,  # noqa: F401  (an autouse fixture)
    padding_mask,
    token_ids,
)
from helpers import assert_matches_reference  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    ALL_MASK_ATTENTION_FUNCTIONS,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

import flash_export.hf  # noqa: E402
from flash_export.core.errors import ConversionError  # noqa: E402
from flash_export.hf import IMPLEMENTATION, swap_attention  # noqa: E402
from flash_export.hf.attention import attention_forward, attention_mask  # noqa: E402
from flash_export.hf.reference import reference_model  # noqa: E402


class CountKernelCalls(TorchDispatchMode):
    """Counts calls of flash_export::attention: proof the swapped model ran our kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.flash_export.attention:  # swapped layers call v2
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_swapped_model_matches_float64_eager_on_the_real_tokens_of_a_padded_batch(family):
    model, inputs = family.build()
    ours = swap_attention(copy.deepcopy(model))
    reference = reference_model(model)
    with torch.no_grad(), CountKernelCalls() as counted:
        got = ours(**inputs)
    assert counted.calls == family.attention_calls
    with torch.no_grad():
        baseline = model(**inputs)  # transformers' eager attention in float32
        expected = reference(**as_dtype(inputs, torch.float64))
    for output, marks in family.outputs:
        # Padded query rows see no key: our kernel gives zeros there, eager a mean of the
        # values. Nothing reads them; only real tokens are compared.
        real = inputs[marks].bool() if marks else ...
        assert_matches_reference(got[output][real], expected[output][real],
                                 baseline[output][real])


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_llama_greedy_generate_gives_eagers_tokens_on_a_left_padded_batch(cache):
    """Prefill with key padding, then one query per step against the cache: a DynamicCache
    (keys end with the query: padding + causal) and a StaticCache (keys run past it: a
    materialised mask)."""
    config = tf.LlamaConfig(**COMMON, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2)
    model = eager(tf.LlamaForCausalLM, config)
    ours = swap_attention(copy.deepcopy(model))
    mask = padding_mask(3, 9)
    mask[1] = mask[1].flip(0)  # left padding only, as generation needs
    request = dict(input_ids=token_ids(mask), attention_mask=mask, max_new_tokens=16,
                   min_new_tokens=16, do_sample=False, cache_implementation=cache)
    with torch.no_grad():
        expected = model.generate(**request)
        with CountKernelCalls() as counted:
            got = ours.generate(**request, return_dict_in_generate=True)
    assert counted.calls == 16 * 2
    assert type(got.past_key_values).__name__ == f"{cache.capitalize()}Cache"
    assert torch.equal(got.sequences, expected)


# --------------------------------------------------------------------------- refusals

def _refused_models():
    gemma2 = tf.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16,
                             attn_logit_softcapping=50.0)
    gpt_oss = tf.GptOssConfig(**COMMON, num_key_value_heads=2, head_dim=16, num_local_experts=2,
                              num_experts_per_tok=1, layer_types=["full_attention"] * 2)
    deepseek = tf.DeepseekV3Config(**COMMON, num_key_value_heads=4, n_routed_experts=2,
                                   num_experts_per_tok=1, first_k_dense_replace=2,
                                   kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16,
                                   qk_rope_head_dim=8, v_head_dim=16)
    t5 = tf.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4)
    beit = tf.BeitConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=96, image_size=32, patch_size=8,
                         use_relative_position_bias=True)
    bloom = tf.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4)
    return [
        pytest.param(tf.Gemma2ForCausalLM, gemma2, "attention logit softcapping", id="gemma2"),
        pytest.param(tf.GptOssForCausalLM, gpt_oss, "attention sinks", id="gpt-oss"),
        pytest.param(tf.DeepseekV3ForCausalLM, deepseek, "Dv != Dqk", id="deepseek-v3-mla"),
        pytest.param(tf.T5Model, t5, "position bias", id="t5"),
        # Its bias table starts at zeros: the per-call check would pass until it is trained.
        pytest.param(tf.BeitModel, beit, "position bias", id="beit"),
        pytest.param(tf.BloomForCausalLM, bloom, "computes attention itself", id="bloom"),
    ]


@pytest.mark.parametrize("cls, config, feature", _refused_models())
def test_a_model_the_kernel_cannot_compute_exactly_is_refused_in_one_line_naming_it(
        cls, config, feature):
    model = cls(config).eval()
    before = model.config._attn_implementation
    with pytest.raises(ConversionError, match=feature) as raised:
        swap_attention(model)
    assert "\n" not in str(raised.value)
    assert model.config._attn_implementation == before  # not switched


class _OwnAttention(nn.Module):
    """An attention layer computing its softmax itself, as non-interface models do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, *args, **kwargs):
        weights = torch.softmax(hidden_states @ hidden_states.transpose(1, 2), dim=-1)
        return weights @ hidden_states, None


def test_a_model_holding_an_attention_layer_that_bypasses_the_interface_is_refused():
    model = eager(tf.LlamaForCausalLM, tf.LlamaConfig(**COMMON))
    model.model.layers[1].self_attn = _OwnAttention(model.model.layers[1].self_attn)
    with pytest.raises(ConversionError, match="_OwnAttention .*computes attention itself"):
        swap_attention(model)
    assert model.config._attn_implementation == "eager"


def test_an_untested_transformers_release_is_refused(monkeypatch):
    monkeypatch.setattr(flash_export.hf.swap, "transformers_version", lambda: "5.99.0")
    with pytest.raises(ConversionError, match="tested with transformers>=5.23,<5.24, found "
                       "5.99.0"):
        swap_attention(eager(tf.BertModel, tf.BertConfig(**COMMON)))


def _layer(is_causal: bool = False) -> nn.Module:
    layer = nn.Module()
    layer.is_causal = is_causal
    return layer


_q = torch.randn(1, 4, 5, 8, generator=torch.Generator().manual_seed(0))  # (B, H, L, D)


@pytest.mark.parametrize("kwargs, feature", [
    (dict(softcap=50.0), "softcapping"),
    (dict(s_aux=torch.zeros(4)), "sinks"),
    (dict(sinks=torch.zeros(4)), "sinks"),
    (dict(position_bias=torch.zeros(1, 4, 5, 5)), "position bias"),
    (dict(value=_q[..., :4]), "Dv != Dqk"),
    (dict(dropout=0.1), "dropout"),
    (dict(output_attentions=True), "attention weights"),
    (dict(query=_q.double(), key=_q.double(), value=_q.double()), "float64"),
], ids=["softcap", "s_aux", "sinks", "position-bias", "dv-neq-dqk", "dropout",
        "output-attentions", "float64"])
def test_every_call_refuses_what_the_kernel_cannot_compute(kwargs, feature):
    """The per-call check, for models that pass a feature without a config entry naming it."""
    flash_export.hf.register()
    args = dict(query=_q, key=_q, value=_q, attention_mask=None)
    args.update(kwargs)
    with pytest.raises(ConversionError, match=feature):
        attention_forward(_layer(), **args)


def test_a_float_mask_computes_as_its_bool_mask_and_one_carrying_a_bias_is_refused():
    flash_export.hf.register()
    allowed = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    as_bool, _ = attention_forward(_layer(), _q, _q, _q, allowed)
    as_float, _ = attention_forward(_layer(), _q, _q, _q, additive)
    assert torch.equal(as_float, as_bool)
    with pytest.raises(ConversionError, match="bias"):
        attention_forward(_layer(), _q, _q, _q, additive + 0.5 * allowed)


def test_a_float_mask_is_refused_under_export_where_its_values_are_unknown():
    flash_export.hf.register()

    class Attend(nn.Module):
        def forward(self, q, mask):
            return attention_forward(_layer(), q, q, q, mask)[0]

    with pytest.raises(Exception) as raised:
        torch.export.export(Attend(), (_q, torch.zeros(1, 1, 5, 5)))
    cause = raised.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, ConversionError) and "cannot be exported" in str(cause)


# --------------------------------------------------------------------------- the pitfalls

def test_swapping_a_model_leaves_others_built_from_the_same_config_object_alone():
    config = tf.LlamaConfig(**COMMON, num_key_value_heads=2)
    first = eager(tf.LlamaForCausalLM, config)
    second = tf.LlamaForCausalLM(first.config).eval()  # shares first's config object
    assert second.config is first.config
    swap_attention(first)
    assert first.config._attn_implementation == IMPLEMENTATION
    assert second.config._attn_implementation == "eager"
    assert first.model.layers[0].self_attn.config is first.config  # one config per model
    assert second.model.layers[0].self_attn.config is second.config
    with torch.no_grad(), CountKernelCalls() as counted:
        second(input_ids=token_ids(padding_mask()))
    assert counted.calls == 0


def test_the_registered_name_builds_models_and_carries_its_mask_function():
    """transformers reads a name containing "flash" as FlashAttention-2/3 and fails to build;
    a name without a mask function of its own gets no mask (padding silently dropped)."""
    flash_export.hf.register()
    assert "flash" not in IMPLEMENTATION
    assert ALL_MASK_ATTENTION_FUNCTIONS[IMPLEMENTATION] is attention_mask
    model = tf.AutoModel.from_config(tf.BertConfig(**COMMON), attn_implementation=IMPLEMENTATION)
    assert model.config._attn_implementation == IMPLEMENTATION


_B, _LQ, _LK = 2, 5, 7
_padded = torch.ones(_B, _LK, dtype=torch.bool)
_padded[1, :3] = False


@pytest.mark.parametrize("case, kwargs, form", [
    ("causal, no padding", dict(q_offset=2), None),
    ("causal, key padding", dict(q_offset=2, attention_mask=_padded), (_B, _LK)),
    ("bidirectional, key padding", dict(mask_function=bidirectional_mask_function,
                                        allow_is_bidirectional_skip=True,
                                        attention_mask=_padded), (_B, 1, 1, _LK)),
    ("bidirectional, caller wants it whole", dict(mask_function=bidirectional_mask_function,
                                                  attention_mask=_padded), (_B, 1, _LQ, _LK)),
    ("causal, keys past the queries", dict(q_offset=0, attention_mask=_padded),
     (_B, 1, _LQ, _LK)),
    ("causal, static-cache offset", dict(q_offset=torch.tensor(2), attention_mask=_padded),
     (_B, 1, _LQ, _LK)),
    ("sliding window", dict(q_offset=2, mask_function=sliding_window_causal_mask_function(3),
                            attention_mask=_padded), (_B, 1, _LQ, _LK)),
], ids=lambda x: x if isinstance(x, str) else "")
def test_the_mask_function_passes_key_padding_and_materialises_every_other_pattern(
        case, kwargs, form):
    args = dict(batch_size=_B, q_length=_LQ, kv_length=_LK, mask_function=causal_mask_function)
    args.update(kwargs)
    got = attention_mask(**args)
    if form is None:
        assert got is None
    elif len(form) < 4:  # key padding: what transformers' own mask is at the last query row
        assert got.shape == form and torch.equal(got, _padded)
    else:  # transformers' own mask, whole or to broadcast
        assert got.shape == form
        whole = sdpa_mask(**args, allow_is_causal_skip=False)  # (B, 1, Lq, Lk)
        assert torch.equal(got.expand(whole.shape), whole)

"""Tiny random-weight transformers models (2 layers, hidden 64) and padded inputs, no downloads.

Each family builds an eager float32 model from a fresh config (so no two models share one) and
inputs whose batch holds an unpadded row, a right-padded row and a left-padded row. `outputs`
names what to compare and which input marks its real tokens.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

VOCAB = 100
LAYERS = 2
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
              intermediate_size=96)
ENC_DEC = dict(vocab_size=VOCAB, d_model=64, encoder_layers=LAYERS, decoder_layers=LAYERS,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
               decoder_ffn_dim=96)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models in one torch thread: on a shared 2-core machine, the thread team waiting at
    its barriers costs more than the maths (greedy generate of 8 tokens: 2.9 s with 2 threads
    under load, 0.1 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def padding_mask(batch: int = 3, length: int = 11) -> Tensor:
    """(batch, length) int64, 1 = a real token: row 1 right-padded by 4, row 2 left-padded by 5
    (their first/last real tokens differ from row 0's, at odd lengths)."""
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, length - 4:] = 0
    if batch > 2:
        mask[2, :5] = 0
    return mask


def token_ids(mask: Tensor, pad: int = 0, seed: int = 1) -> Tensor:
    """Random ids in [3, VOCAB) where `mask` is 1, `pad` elsewhere."""
    ids = torch.randint(3, VOCAB, mask.shape, generator=torch.Generator().manual_seed(seed))
    return ids.masked_fill(mask == 0, pad)


def eager(cls: type, config: tf.PretrainedConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = cls(config)
    model.set_attn_implementation("eager")
    return model.eval()


@dataclass(frozen=True)
class Family:
    """One model family: its builder, and (output, real-token input or None) to compare."""

    name: str
    build: Callable[[], Tuple[nn.Module, Dict[str, Tensor]]]
    outputs: Tuple[Tuple[str, Optional[str]], ...]
    attention_calls: int  # flash_export::attention calls per forward: one per attention layer


def _text(cls: type, config: tf.PretrainedConfig, pad: int = 0
          ) -> Callable[[], Tuple[nn.Module, Dict[str, Tensor]]]:
    def build() -> Tuple[nn.Module, Dict[str, Tensor]]:
        mask = padding_mask()
        return eager(cls, config), {"input_ids": token_ids(mask, pad), "attention_mask": mask}
    return build


def _vit() -> Tuple[nn.Module, Dict[str, Tensor]]:
    config = tf.ViTConfig(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                          intermediate_size=96, image_size=32, patch_size=8)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return eager(tf.ViTModel, config), {"pixel_values": pixels}


def _whisper() -> Tuple[nn.Module, Dict[str, Tensor]]:
    config = tf.WhisperConfig(**ENC_DEC, num_mel_bins=16, max_source_positions=16,
                              max_target_positions=32, pad_token_id=0, decoder_start_token_id=1)
    mask = padding_mask()
    features = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(1))
    return eager(tf.WhisperModel, config), {"input_features": features,
                                            "decoder_input_ids": token_ids(mask),
                                            "decoder_attention_mask": mask}


def _bart() -> Tuple[nn.Module, Dict[str, Tensor]]:
    config = tf.BartConfig(**ENC_DEC, max_position_embeddings=64, pad_token_id=1)
    mask, decoder_mask = padding_mask(), padding_mask(length=7)
    return eager(tf.BartModel, config), {
        "input_ids": token_ids(mask, pad=1), "attention_mask": mask,
        "decoder_input_ids": token_ids(decoder_mask, pad=1, seed=2),
        "decoder_attention_mask": decoder_mask}


_LM = (("logits", "attention_mask"),)
_ENCODER = (("last_hidden_state", "attention_mask"),)

FAMILIES = (
    Family("bert", _text(tf.BertModel, tf.BertConfig(**COMMON, max_position_embeddings=64)),
           _ENCODER, LAYERS),
    # RoBERTa counts positions from its pad id: padded ids must be pad_token_id.
    Family("roberta", _text(tf.RobertaModel, tf.RobertaConfig(
        **COMMON, max_position_embeddings=64, pad_token_id=1), pad=1), _ENCODER, LAYERS),
    # A local window of 4 keys in layer 0 (global every 2nd layer).
    Family("modernbert", _text(tf.ModernBertModel, tf.ModernBertConfig(
        **COMMON, local_attention=4, global_attn_every_n_layers=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)),
        _ENCODER, LAYERS),
    Family("gpt2", _text(tf.GPT2LMHeadModel, tf.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=64, bos_token_id=1,
        eos_token_id=2)), _LM, LAYERS),
    Family("llama-gqa", _text(tf.LlamaForCausalLM, tf.LlamaConfig(
        **COMMON, num_key_value_heads=2)), _LM, LAYERS),
    Family("llama-mqa", _text(tf.LlamaForCausalLM, tf.LlamaConfig(
        **COMMON, num_key_value_heads=1)), _LM, LAYERS),
    Family("mistral-sliding-window", _text(tf.MistralForCausalLM, tf.MistralConfig(
        **COMMON, num_key_value_heads=2, sliding_window=4)), _LM, LAYERS),
    Family("qwen2", _text(tf.Qwen2ForCausalLM, tf.Qwen2Config(
        **COMMON, num_key_value_heads=2)), _LM, LAYERS),
    Family("phi3", _text(tf.Phi3ForCausalLM, tf.Phi3Config(
        **COMMON, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        _LM, LAYERS),
    # One sliding (window 4) and one full layer; head_dim 16 with its own query scaling.
    Family("gemma3", _text(tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(
        **COMMON, num_key_value_heads=2, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"])), _LM, LAYERS),
    Family("vit", _vit, (("last_hidden_state", None),), LAYERS),
    # Encoder self-attention (no mask), decoder causal self-attention and cross-attention.
    Family("whisper", _whisper, (("encoder_last_hidden_state", None),
                                 ("last_hidden_state", "decoder_attention_mask")), 3 * LAYERS),
    Family("bart", _bart, (("encoder_last_hidden_state", "attention_mask"),
                           ("last_hidden_state", "decoder_attention_mask")), 3 * LAYERS),
)


def as_dtype(inputs: Dict[str, Tensor], dtype: torch.dtype) -> Dict[str, Tensor]:
    """`inputs` with floating tensors (pixels, audio features) cast to `dtype`."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}

"""Token generation with an exported `text-generation-with-past` graph: numpy and onnxruntime only.

    from flash_export.runtime import generate
    tokens = generate("llama.onnx", input_ids, attention_mask, max_new_tokens=32)

The graph (`flash-export onnx --hf DIR --task text-generation-with-past`) takes the new tokens,
their positions, a 0/1 mask over past and new tokens, and the KV cache; it returns logits and the
grown cache. `generate` runs the prompt once with an empty cache (prefill), then one token per
step with the last step's cache (decode), as transformers' `generate` does: positions counted
over each row's real tokens (left padding works), a row that produced the end-of-sequence token
continues with padding, and the loop stops when every row has ended.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from flash_export.core.errors import FlashExportError

PAST_PREFIX = "past_key_values."
TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the last position's logits.

    Attributes:
        do_sample: False: the most likely token (greedy); True: drawn from the softmax.
        temperature: divides the logits before the softmax (> 0).
        top_k: draw only among the k most likely tokens (0: all).
        seed: seed of the draws (None: fresh entropy).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise FlashExportError(f"temperature must be > 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise FlashExportError(f"top_k must be an int >= 0, got {self.top_k!r}")


def positions(mask: np.ndarray) -> np.ndarray:
    """(B, L) int64 positions of a 0/1 mask's tokens, as transformers' `generate` gives them.

    Each row counts its real tokens from 0; padding sits at position 1 (never read).
    """
    counted = np.cumsum(mask.astype(np.int64), axis=-1) - 1
    return np.where(mask == 0, 1, counted).astype(np.int64)


def generate(graph: Union[str, Path, Any], input_ids: Any, attention_mask: Any = None, *,
             max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_token_id: Union[int, Sequence[int], None] = None,
             pad_token_id: Optional[int] = None) -> np.ndarray:
    """Generate up to `max_new_tokens` tokens per row after a (left-padded) prompt.

    Args:
        graph: a `.onnx` file exported for text-generation-with-past, or an onnxruntime session
            of one (`flash_export.runtime.create_session`).
        input_ids: (B, S) integer token ids.
        attention_mask: (B, S) 0/1, 1 = a real token (pad on the left); default all 1.
        max_new_tokens: tokens to add at most (>= 0).
        sampling: greedy (default) or sampling settings.
        eos_token_id: the end-of-sequence token(s); default the checkpoint config's.
        pad_token_id: what an ended row continues with; default the config's, else the first
            end-of-sequence token.

    Returns:
        (B, S + n) int64: the prompt, then the n <= max_new_tokens generated tokens.

    Raises:
        FlashExportError: a graph without a KV cache, or inputs of the wrong shape or type.
    """
    session = _session(graph)
    names = [i.name for i in session.get_inputs()]
    pasts = [i for i in session.get_inputs() if i.name.startswith(PAST_PREFIX)]
    if not pasts or any(n not in names for n in TOKEN_INPUTS):
        raise FlashExportError(f"{graph} is not a text-generation-with-past graph (inputs "
                               f"{names[:6]}...): export it with --task text-generation-with-past")
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or 0 in ids.shape:
        raise FlashExportError(f"input_ids must be a non-empty (batch, length) integer array, "
                               f"got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape or not np.isin(mask, (0, 1)).all():
        raise FlashExportError(f"attention_mask must be 0/1 of input_ids' shape {ids.shape}, "
                               f"got {mask.shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise FlashExportError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    eos, pad = _special_tokens(session, eos_token_id, pad_token_id)
    return _loop(session, ids, mask.astype(np.int64), pasts, max_new_tokens, sampling, eos, pad)


def _loop(session: Any, ids: np.ndarray, mask: np.ndarray, pasts: List[Any], new: int,
          sampling: Sampling, eos: List[int], pad: Optional[int]) -> np.ndarray:
    """Prefill, then decode one token a step (see `generate`)."""
    batch = ids.shape[0]
    cache = {p.name: np.zeros((batch, p.shape[1], 0, p.shape[3]), _float(p.type))
             for p in pasts}  # (B, Hkv, 0, D): nothing cached yet
    outputs = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(sampling.seed)
    tokens, step_ids, step_pos = ids, ids, positions(mask)
    ended = np.zeros(batch, dtype=bool)
    for _ in range(new):
        results = dict(zip(outputs, session.run(outputs, {
            "input_ids": step_ids, "attention_mask": mask, "position_ids": step_pos, **cache})))
        chosen = _choose(results[outputs[0]][:, -1, :], sampling, rng)  # (B,)
        if pad is not None:
            chosen = np.where(ended, pad, chosen)
        ended |= np.isin(chosen, eos)
        tokens = np.concatenate([tokens, chosen[:, None]], axis=1)
        if ended.all():
            break
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        step_ids, step_pos = chosen[:, None], step_pos[:, -1:] + 1
        cache = {p.name: results["present." + p.name[len(PAST_PREFIX):]] for p in pasts}
    return tokens


def _choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """(B,) int64 next tokens from (B, V) logits."""
    if not sampling.do_sample:
        return logits.argmax(axis=-1).astype(np.int64)
    scaled = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int64)


def _special_tokens(session: Any, eos: Union[int, Sequence[int], None],
                    pad: Optional[int]) -> "tuple[List[int], Optional[int]]":
    """The end-of-sequence tokens and the pad token: given, else the recorded config's."""
    config: Dict[str, Any] = {}
    text = session.get_modelmeta().custom_metadata_map.get("hf_config")
    if text:
        try:
            loaded = json.loads(text)
            config = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            config = {}
    found = config.get("eos_token_id") if eos is None else eos
    listed = [] if found is None else list(np.atleast_1d(np.asarray(found, dtype=object)))
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in listed):
        raise FlashExportError(f"eos_token_id must be token ids, got {found!r}")
    eos_list = [int(t) for t in listed]
    pad = config.get("pad_token_id") if pad is None else pad
    if pad is None and eos_list:
        pad = eos_list[0]
    return eos_list, int(pad) if isinstance(pad, (int, np.integer)) else None


def _float(onnx_type: str) -> Any:
    return np.float16 if onnx_type == "tensor(float16)" else np.float32


def _session(graph: Any) -> Any:
    if isinstance(graph, (str, Path)):
        from flash_export.runtime.sessions import create_session

        return create_session(graph)
    return graph

"""The generate extension: ``POST /v2/models/{name}/generate`` for a with-past graph, token ids.

Triton's and KServe's generate extension, for a graph exported with `--task
text-generation-with-past`: the request is a JSON object ``{"text_input": "5 17 99",
"parameters": {"max_tokens": 16}}`` whose text is the prompt's token ids separated by spaces
(no tokenizer is served: ids in, ids out), the answer ``{"model_name": ..., "model_version":
"1", "text_output": "12 7 3 ..."}`` holds the new tokens only. Parameters: ``max_tokens``
(default 16), ``do_sample`` (default false: greedy), ``temperature``, ``top_k`` and ``seed``
(`flash_export.runtime.generation.Sampling`). Everything is checked against the graph's IOSpec
(ids within the vocabulary, prompt plus new tokens within its positions) and `Limits` (body,
prompt length, answer size) before anything runs; a bad request raises `RequestError`. Each
request runs its own prefill and decode loop (requests are not batched together). Imports no
torch, no Ray.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

from flash_export.core.errors import RequestError
from flash_export.core.io_spec import IOSpec
from flash_export.runtime.generation import PAST_PREFIX, TOKEN_INPUTS, Sampling
from flash_export.serving.limits import Limits
from flash_export.serving.wire import json_body, load_json

DEFAULT_MAX_TOKENS = 16
_KEYS = ("text_input", "parameters", "id")
_PARAMETERS = ("max_tokens", "do_sample", "temperature", "top_k", "seed")
_TOKEN_DIGITS = 10  # a token id's decimal digits at most (int32 ids)
_JSON_ID_BYTES = 21  # an id and its separator, at most, in the answer


@dataclass(frozen=True)
class GenerateRequest:
    """A checked generate request.

    Attributes:
        id: the request's "id", echoed back (None when it had none).
        ids: (1, S) int64, the prompt's token ids.
        max_tokens: new tokens at most.
        sampling: greedy or sampling settings.
    """

    id: Optional[str]
    ids: np.ndarray
    max_tokens: int
    sampling: Sampling


def unsupported_reason(io: IOSpec) -> Optional[str]:
    """Why a graph has no generate route (None when it has one: a with-past graph)."""
    names = [t.name for t in io.inputs]
    if all(n in names for n in TOKEN_INPUTS) and any(n.startswith(PAST_PREFIX) for n in names):
        return None
    return ("this model is not a text-generation-with-past graph (export one with flash-export "
            "onnx --hf DIR --task text-generation-with-past)")


def parse_generate(body: bytes, io: IOSpec, limits: Limits) -> GenerateRequest:
    """Check a generate request's body against the graph and the limits.

    Raises:
        RequestError: 400 for a malformed or out-of-range request, 413 for an answer that
            could pass `Limits.max_response_bytes`; one line naming what is wrong.
    """
    doc = load_json(body)
    if not isinstance(doc, dict):
        raise RequestError(400, "a generate request is a JSON object with text_input")
    unknown = sorted(set(doc) - set(_KEYS))
    if unknown:
        raise RequestError(400, f"unknown keys {unknown[:5]}; a generate request has "
                                f"{list(_KEYS)}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(400, "id must be a string")
    ids = _prompt(doc.get("text_input"), io, limits)
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError(400, "parameters must be a JSON object")
    unknown = sorted(set(params) - set(_PARAMETERS))
    if unknown:
        raise RequestError(400, f"unknown parameters {unknown[:5]}; known: {list(_PARAMETERS)}")
    max_tokens = _integer(params, "max_tokens", DEFAULT_MAX_TOKENS)
    longest = _positions(io, limits)
    if max_tokens < 0 or ids.shape[1] + max_tokens > longest:
        raise RequestError(400, f"max_tokens {max_tokens}: the prompt's {ids.shape[1]} tokens "
                                f"plus the new ones must stay within {longest} positions")
    answer = 128 + len(str(request_id or "")) + _JSON_ID_BYTES * max_tokens
    if answer > limits.max_response_bytes:
        raise RequestError(413, f"max_tokens {max_tokens} could make an answer of {answer} "
                                f"bytes, over the limit of {limits.max_response_bytes}")
    do_sample = params.get("do_sample", False)
    if not isinstance(do_sample, bool):
        raise RequestError(400, "do_sample must be true or false")
    temperature = params.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not temperature > 0:
        raise RequestError(400, f"temperature must be a number > 0, got {temperature!r}")
    seed = params.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise RequestError(400, f"seed must be an integer >= 0, got {seed!r}")
    top_k = _integer(params, "top_k", 0)
    if top_k < 0:
        raise RequestError(400, f"top_k must be >= 0, got {top_k}")
    return GenerateRequest(request_id, ids, max_tokens, Sampling(
        do_sample=do_sample, temperature=float(temperature), top_k=top_k, seed=seed))


def generate_answer(name: str, request: GenerateRequest, tokens: np.ndarray) -> bytes:
    """The answer's body: the new tokens (after the prompt) as text of ids."""
    new = tokens[0, request.ids.shape[1]:]
    answer: Dict[str, Any] = {"model_name": name, "model_version": "1",
                              "text_output": " ".join(str(int(t)) for t in new)}
    if request.id is not None:
        answer["id"] = request.id
    return json_body(answer)


def _prompt(text: Any, io: IOSpec, limits: Limits) -> np.ndarray:
    """text_input's token ids as a (1, S) int64 array, each within the vocabulary."""
    if not isinstance(text, str):
        raise RequestError(400, "text_input must be a string of token ids separated by spaces "
                                "(no tokenizer is served)")
    words = text.split()
    longest = _positions(io, limits)
    if not words or len(words) > longest:
        raise RequestError(400, f"text_input holds {len(words)} token ids; 1 to {longest} "
                                "are taken")
    if not all(w.isascii() and w.isdigit() and len(w) <= _TOKEN_DIGITS for w in words):
        bad = next(w for w in words if not (w.isascii() and w.isdigit()
                                            and len(w) <= _TOKEN_DIGITS))
        raise RequestError(400, f"text_input: {bad[:20]!r} is not a token id (a decimal "
                                "integer)")
    ids = np.array([[int(w) for w in words]], dtype=np.int64)
    spec = io.input("input_ids")
    low, high = spec.low or 0, spec.high
    if high is not None and (ids.min() < low or ids.max() >= high):
        raise RequestError(400, f"text_input: token ids must be in [{low}, {high}), got "
                                f"{ids.min()}..{ids.max()}")
    return ids


def _positions(io: IOSpec, limits: Limits) -> int:
    """How many tokens a sequence may hold: the graph's bound, capped by `Limits.max_length`."""
    high = io.sizes.get("total", (1, None))[1]
    return limits.max_length if high is None else min(high, limits.max_length)


def _integer(params: Dict[str, Any], name: str, default: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{name} must be an integer, got {value!r}")
    return value

"""The generate extension's request checks (`flash_export.serving.generation`), torch-free: each
malformed or out-of-range request is a RequestError with its status and one line naming it,
before anything runs."""

import json

import numpy as np
import pytest

from flash_export.core.errors import RequestError
from flash_export.core.io_spec import IOSpec, TensorSpec
from flash_export.serving.generation import (
    generate_answer,
    parse_generate,
    unsupported_reason,
)
from flash_export.serving.limits import Limits

WITH_PAST = IOSpec(
    (TensorSpec("input_ids", "int64", ("batch", "seq"), low=0, high=100),
     TensorSpec("attention_mask", "int64", ("batch", "total"), low=0, high=2, role="padding"),
     TensorSpec("position_ids", "int64", ("batch", "seq"), low=0, high=64),
     TensorSpec("past_key_values.0.key", "float32", ("batch", 2, "past", 16)),
     TensorSpec("past_key_values.0.value", "float32", ("batch", 2, "past", 16))),
    outputs=("logits", "present.0.key", "present.0.value"),
    sizes={"batch": (1, None), "seq": (1, 64), "total": (1, 64), "past": (0, 64)}, batch="batch")
LIMITS = Limits(max_length=48, max_response_bytes=1024)


def _parse(doc, limits=LIMITS):
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return parse_generate(body, WITH_PAST, limits)


def test_a_request_is_parsed_with_its_defaults_and_answered_with_the_new_ids_only():
    request = _parse({"text_input": " 5 17\t99 ", "id": "a"})
    assert request.ids.tolist() == [[5, 17, 99]] and request.ids.dtype == np.int64
    assert request.max_tokens == 16 and not request.sampling.do_sample
    sampled = _parse({"text_input": "5", "parameters": {
        "max_tokens": 3, "do_sample": True, "temperature": 0.5, "top_k": 4, "seed": 9}})
    assert (sampled.max_tokens, sampled.sampling.temperature, sampled.sampling.top_k,
            sampled.sampling.seed) == (3, 0.5, 4, 9)
    answer = json.loads(generate_answer("m", request, np.array([[5, 17, 99, 3, 0, 12]])))
    assert answer == {"model_name": "m", "model_version": "1", "text_output": "3 0 12",
                      "id": "a"}


@pytest.mark.parametrize("doc, status, message", [
    (b"[1, 2]", 400, "a generate request is a JSON object"),
    (b"{", 400, "not valid JSON"),
    ({"text_input": "5", "prompt": "x"}, 400, r"unknown keys \['prompt'\]"),
    ({"text_input": [5, 17]}, 400, "text_input must be a string of token ids"),
    ({"text_input": "   "}, 400, "text_input holds 0 token ids; 1 to 48"),
    ({"text_input": " ".join(["1"] * 49)}, 400, "text_input holds 49 token ids; 1 to 48"),
    ({"text_input": "5 -1"}, 400, "'-1' is not a token id"),
    ({"text_input": "5 x"}, 400, "'x' is not a token id"),
    ({"text_input": "5 ١"}, 400, "is not a token id"),  # a non-ASCII digit
    ({"text_input": "5 100"}, 400, r"token ids must be in \[0, 100\), got 5..100"),
    ({"text_input": "5", "id": 3}, 400, "id must be a string"),
    ({"text_input": "5", "parameters": []}, 400, "parameters must be a JSON object"),
    ({"text_input": "5", "parameters": {"n": 2}}, 400, "unknown parameters \\['n'\\]"),
    ({"text_input": "5", "parameters": {"max_tokens": 1.5}}, 400, "max_tokens must be an int"),
    ({"text_input": "5", "parameters": {"max_tokens": True}}, 400, "max_tokens must be an int"),
    ({"text_input": "5", "parameters": {"max_tokens": -1}}, 400, "plus the new ones"),
    ({"text_input": "5 6", "parameters": {"max_tokens": 47}}, 400,
     "the prompt's 2 tokens plus the new ones must stay within 48 positions"),
    ({"text_input": "5", "parameters": {"max_tokens": 47}}, 413, "over the limit of 1024"),
    ({"text_input": "5", "parameters": {"do_sample": 1}}, 400, "do_sample must be true or"),
    ({"text_input": "5", "parameters": {"temperature": 0}}, 400, "temperature must be a n"),
    ({"text_input": "5", "parameters": {"temperature": "hot"}}, 400, "temperature must be"),
    ({"text_input": "5", "parameters": {"seed": -2}}, 400, "seed must be an integer >= 0"),
    ({"text_input": "5", "parameters": {"top_k": -1}}, 400, "top_k must be >= 0"),
], ids=lambda v: None if isinstance(v, (dict, bytes)) else str(v)[:30])
def test_a_bad_request_is_refused_naming_what_is_wrong(doc, status, message):
    with pytest.raises(RequestError, match=message) as caught:
        _parse(doc)
    assert caught.value.status == status


def test_the_route_exists_only_for_a_graph_with_a_cache():
    assert unsupported_reason(WITH_PAST) is None
    plain = IOSpec(WITH_PAST.inputs[:2], outputs=("logits",),
                   sizes={"batch": (1, None), "seq": (1, 64), "total": (1, 64)})
    assert "not a text-generation-with-past graph" in unsupported_reason(plain)

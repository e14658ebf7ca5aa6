"""Attributes of the FlashAttention node: a wrong type or value is an error, never a default.

onnx.helper.make_node(..., scale=1) writes an INT, causal=1.0 a FLOAT, causal="1" a STRING:
before, the library read each attribute with one typed getter and took the default whenever that
failed, so such nodes ran with 1/sqrt(D), non-causal or chunk 64. Every case here must be
rejected when onnxruntime creates the session (kernel creation happens then) with the library's
own one-line message naming the attribute, what it must be and what it is. The head dim limit
depends on the input shape, so it is checked at run.

Sessions are created in one subprocess (native code that can crash never runs in pytest's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _native_cases import flash_node, model_bytes, reference_attention
from onnx import TensorProto, helper, numpy_helper

from flash_export.runtime import library_path

REPO = Path(__file__).resolve().parents[1]
PREFIX = "FlashAttention: "
RULES = {
    "num_heads": "an INT >= 1 (required)",
    "chunk_size": "an INT >= 1 (default 64)",
    "causal": "an INT 0 or 1 (default 0)",
    "scale": "a finite FLOAT other than 0 (default 1/sqrt(head_dim))",
}
VALID = {"num_heads": 2, "chunk_size": 4, "causal": 1, "scale": 0.5}


def _tensor() -> Any:
    return numpy_helper.from_array(np.array([1], dtype=np.int64), name="t")


# Values of every attribute type onnx.helper writes, with how the message must show each.
TYPED_VALUES: dict[str, tuple[Any, str]] = {
    "INT": (1, "an INT (1)"),
    "FLOAT": (1.0, "a FLOAT (1.0)"),
    "STRING": ("1", 'a STRING ("1")'),
    "INTS": ([1, 2], "an INTS ([1, 2])"),
    "FLOATS": ([1.0, 0.5], "a FLOATS ([1.0, 0.5])"),
    "TENSOR": ("tensor", "a TENSOR"),
    "STRINGS": (["1"], "of another type"),
    "empty INTS": ("empty", "of another type"),
}
EXPECTED_TYPE = {"num_heads": "INT", "chunk_size": "INT", "causal": "INT", "scale": "FLOAT"}
WRONG_TYPE_CASES = [(name, kind) for name in RULES for kind in TYPED_VALUES
                    if kind != EXPECTED_TYPE[name]]

OUT_OF_RANGE_CASES: list[tuple[str, Any, str]] = [  # (attribute, value, shown as)
    ("num_heads", 0, "0"),
    ("num_heads", -1, "-1"),
    ("num_heads", -(2**40), str(-(2**40))),
    ("chunk_size", 0, "0"),
    ("chunk_size", -64, "-64"),
    ("causal", 2, "2"),
    ("causal", -1, "-1"),
    ("scale", 0.0, "0.0"),
    ("scale", -0.0, "-0.0"),
    ("scale", float("inf"), "inf"),
    ("scale", float("-inf"), "-inf"),
    ("scale", float("nan"), "nan"),
]


def node_model(attrs: dict[str, Any], embed: int | str = "E") -> bytes:
    """One float32 FlashAttention node with `attrs` as given (any ONNX attribute type)."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", f"L{n}", embed])
              for n in ("query", "key", "value")]
    node = flash_node(["query", "key", "value"])
    for name, value in attrs.items():
        if isinstance(value, str) and value == "tensor":
            node.attribute.append(helper.make_attribute(name, _tensor()))
        elif isinstance(value, str) and value == "empty":
            node.attribute.append(helper.make_attribute(name, [],
                                                        attr_type=helper.AttributeProto.INTS))
        else:
            node.attribute.append(helper.make_attribute(name, value))
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "Lquery", embed])
    return model_bytes([node], inputs, [out])


def _worker(cases: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Create (and, if that works, run) one session per case: {id: {stage, message}}."""
    import onnxruntime as ort

    results = {}
    for case_id, case in cases.items():
        options = ort.SessionOptions()
        options.log_severity_level = 4  # the rejections are the point, not log noise
        options.register_custom_ops_library(str(library_path()))
        embed = case.get("embed", 8)
        try:
            session = ort.InferenceSession(node_model(case["attrs"]), options,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own pybind exception types
            results[case_id] = {"stage": "create", "message": str(exc)}
            continue
        rng = np.random.default_rng(0)
        q = rng.standard_normal((1, 3, embed)).astype(np.float32)
        k = rng.standard_normal((1, 5, embed)).astype(np.float32)
        v = rng.standard_normal((1, 5, embed)).astype(np.float32)
        try:
            out = session.run(None, {"query": q, "key": k, "value": v})[0]
        except Exception as exc:
            results[case_id] = {"stage": "run", "message": str(exc)}
            continue
        results[case_id] = {"stage": "ok", "message": json.dumps(out.astype(float).tolist())}
    return results


def _cases() -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {}
    for name, kind in WRONG_TYPE_CASES:
        attrs = {**VALID, name: TYPED_VALUES[kind][0]}
        cases[f"type-{name}-{kind}"] = {"attrs": attrs}
    for name, value, shown in OUT_OF_RANGE_CASES:
        cases[f"range-{name}-{shown}"] = {"attrs": {**VALID, name: value}}
    cases["missing-num_heads"] = {"attrs": {k: v for k, v in VALID.items() if k != "num_heads"}}
    cases["head-dim-limit"] = {"attrs": {"num_heads": 1}, "embed": (1 << 20) + 1}
    cases["negative-scale"] = {"attrs": {**VALID, "scale": -0.5}}
    cases["huge-chunk"] = {"attrs": {**VALID, "chunk_size": 2**40}}
    cases["defaults"] = {"attrs": {"num_heads": 2}}
    return cases


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, str]]:
    if not Path(library_path()).is_file():
        pytest.skip(f"native library not built at {library_path()}")
    code = """
        import json
        from test_node_attributes import _cases, _worker
        print(json.dumps(_worker(_cases())))
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "FLASH_EXPORT_LIBRARY": str(library_path())}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, f"worker died ({proc.returncode}):\n{proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_rejected(result: dict[str, str], stage: str, fragment: str) -> None:
    assert result["stage"] == stage, f"expected a rejection at {stage}, got {result}"
    assert PREFIX + fragment in result["message"], result["message"]
    assert "\n" not in result["message"].strip(), "the message must be one line"


@pytest.mark.parametrize(("name", "kind"), WRONG_TYPE_CASES,
                         ids=[f"{n}-{k}" for n, k in WRONG_TYPE_CASES])
def test_wrong_type_is_rejected_at_session_creation(name: str, kind: str,
                                                    results: dict[str, dict[str, str]]) -> None:
    shown = TYPED_VALUES[kind][1]
    _assert_rejected(results[f"type-{name}-{kind}"], "create",
                     f"attribute {name} is {shown}")
    assert f"expected {RULES[name]}" in results[f"type-{name}-{kind}"]["message"]


@pytest.mark.parametrize(("name", "value", "shown"), OUT_OF_RANGE_CASES,
                         ids=[f"{n}={s}" for n, _, s in OUT_OF_RANGE_CASES])
def test_out_of_range_value_is_rejected_at_session_creation(
        name: str, value: Any, shown: str, results: dict[str, dict[str, str]]) -> None:
    _assert_rejected(results[f"range-{name}-{shown}"], "create",
                     f"attribute {name} is {shown}, expected {RULES[name]}")


def test_missing_num_heads_is_rejected(results: dict[str, dict[str, str]]) -> None:
    _assert_rejected(results["missing-num_heads"], "create",
                     f"attribute num_heads is missing, expected {RULES['num_heads']}")


def test_head_dim_over_the_cpu_limit_is_rejected_at_run(results: dict[str, dict[str, str]]) -> None:
    embed = (1 << 20) + 1
    _assert_rejected(results["head-dim-limit"], "run",
                     f"head dim {embed} is over the CPU kernel's "
                     f"limit, expected at most {1 << 20}")


@pytest.mark.parametrize("case", ["negative-scale", "huge-chunk", "defaults"])
def test_valid_attributes_run(case: str, results: dict[str, dict[str, str]]) -> None:
    """A negative scale is well defined (and allowed), chunk_size has no upper bound."""
    result = results[case]
    assert result["stage"] == "ok", result
    attrs = _cases()[case]["attrs"]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 3, 8)).astype(np.float32)
    k = rng.standard_normal((1, 5, 8)).astype(np.float32)
    v = rng.standard_normal((1, 5, 8)).astype(np.float32)
    expected = reference_attention(q, k, v, attrs["num_heads"], causal=bool(attrs.get("causal")),
                                   scale=attrs.get("scale"))
    np.testing.assert_allclose(np.array(json.loads(result["message"])), expected, atol=1e-5)

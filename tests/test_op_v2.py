"""The op's contract v2 (grouped-query heads, head-major layouts, seqlens_k, window, bias, softcap)
through onnxruntime, the ctypes binding on every CPU vector path, and the torch op.

Every output is judged against the contract written out plainly in float64
(`_native_cases.reference_v2`) by the one tolerance rule, in float32 and float16. The native code
runs in subprocesses first (a canary for the in-process node tests; the per-ISA matrix entirely),
so a crash fails a test instead of killing the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from _native_cases import V2_CASES as CASES
from _native_cases import V2_DTYPES as DTYPES
from _native_cases import check_output_v2, flash_node
from _native_cases import v2_call as arrays
from onnx import helper

from flash_export.artifacts.safety import check_custom_nodes
from flash_export.core.contract import DOMAIN, NODE_INPUTS
from flash_export.core.errors import ArtifactError, ExportError
from flash_export.runtime import library_path
from flash_export.runtime.native_abi import CPU_ISAS

REPO = Path(__file__).resolve().parents[1]

# On each vector path: every case but the bias broadcasts, which the kernels read through strides
# alike on every path (onnxruntime runs them all), save the full and the most broadcast one.
ISA_CASES = [name for name in CASES if not name.startswith("bias-")
             or name in ("bias-2x4x5x37", "bias-1x1x1x1", "bias-scalar")]


# --------------------------------------------------------------------------- onnxruntime


def _node_model(call: dict[str, Any], domain_version: int = 2, **attrs: Any) -> bytes:
    """One FlashAttention node of the call's attributes; inputs declare the fed types."""
    o = call["options"]
    fed = {"query": call["q"], "key": call["k"], "value": call["v"], "mask": o.get("mask"),
           "seqlens_k": o.get("seqlens_k"), "bias": o.get("bias")}
    names = [n if fed[n] is not None else "" for n in NODE_INPUTS]
    while names and not names[-1]:
        names.pop()
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(fed[n].dtype),
                                            None) for n in names if n]
    out = helper.make_tensor_value_info(
        "out", helper.np_dtype_to_tensor_dtype(call["q"].dtype), None)
    if o["kv_num_heads"] != call["num_heads"]:
        attrs.setdefault("kv_num_heads", o["kv_num_heads"])
    for name in ("window_size", "output_layout"):
        if o[name]:
            attrs.setdefault(name, o[name])
    if o["softcap"]:
        attrs.setdefault("softcap", o["softcap"])
    node = flash_node(names, num_heads=call["num_heads"], chunk_size=16, causal=int(o["causal"]),
                      **attrs)
    graph = helper.make_graph([node], "flash", inputs, [out])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, domain_version)]
    return helper.make_model(graph, ir_version=10, opset_imports=opsets).SerializeToString()


def _run_node(model: bytes, call: dict[str, Any], threads: int = 1) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(library_path()))
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    o = call["options"]
    feed = {"query": call["q"], "key": call["k"], "value": call["v"], "mask": o.get("mask"),
            "seqlens_k": o.get("seqlens_k"), "bias": o.get("bias")}
    return session.run(None, {n: x for n, x in feed.items() if x is not None})[0]


def _subprocess(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
                "FLASH_EXPORT_LIBRARY": str(library_path()), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=120, check=False)


@pytest.fixture(scope="module")
def canary() -> None:
    """Every case through the node once in a subprocess before any runs in-process."""
    result = _subprocess("""
        from _native_cases import V2_CASES as CASES, v2_call as arrays
        from test_op_v2 import _node_model, _run_node
        import numpy as np
        for case in CASES.values():
            call = arrays(case, np.float32)
            _run_node(_node_model(call), call)
    """)
    if result.returncode != 0:
        pytest.fail(f"the v2 cases crashed or failed in a subprocess ({result.returncode}):\n"
                    f"{result.stderr[-4000:]}")


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_node_matches_reference(canary: None, case: str, dtype: str) -> None:
    call = arrays(CASES[case], DTYPES[dtype])
    out = _run_node(_node_model(call), call, threads=2)
    check_output_v2(out, call["q"], call["k"], call["v"], call["num_heads"], **call["options"])


def test_version_1_node_is_bitwise_the_same_under_version_2(canary: None) -> None:
    """An artifact written before contract v2 (domain version 1, no v2 attribute) runs exactly as
    a version-2 node that spells out every v2 default."""
    call = arrays(dict(b=2, h=4, hk=4, lq=9, lk=70, causal=True), np.float16)
    old = _run_node(_node_model(call, domain_version=1), call, threads=2)
    new = _run_node(_node_model(call, kv_num_heads=4, window_size=0, softcap=0.0,
                                output_layout=0), call, threads=2)
    assert np.array_equal(old, new)
    check_output_v2(old, call["q"], call["k"], call["v"], 4, **call["options"])


@pytest.mark.parametrize("use", ["kv_num_heads", "window_size", "seqlens_k", "bias"])
def test_structural_check_holds_version_1_models_to_version_1(use: str) -> None:
    """A model importing the domain at version 1 may not use version 2's attributes or inputs;
    the same node in a version-2 model passes."""
    import onnx

    case = dict(b=1, h=2, hk=1 if use == "kv_num_heads" else 2, lq=1, lk=5)
    case.update({"window_size": dict(window=3), "seqlens_k": dict(seqlens=(4,)),
                 "bias": dict(bias=(5,))}.get(use, {}))
    call = arrays(case, np.float32)
    old, new = (onnx.load_from_string(_node_model(call, domain_version=v)) for v in (1, 2))
    with pytest.raises(ArtifactError, match=f"uses '{use}', which came with version 2 of "
                       f"{DOMAIN}; the model imports version 1"):
        check_custom_nodes(old, "old.onnx")
    assert check_custom_nodes(new, "new.onnx") == 1


# --------------------------------------------------------------------------- the C entry point


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_binding_matches_reference_on_every_cpu_path(isa: str) -> None:
    """The cases through the ctypes binding on each vector path (FLASH_EXPORT_CPU_ISA), float32
    and float16, serial and on 2 threads by turns, in a subprocess."""
    result = _subprocess("""
        import json
        import os
        from flash_export.runtime.native import NativeLibrary, attention
        from flash_export.runtime import library_path
        lib = NativeLibrary(library_path())
        print(json.dumps({"isa": lib.cpu_isa()}), flush=True)
        if lib.cpu_isa() == os.environ["FLASH_EXPORT_CPU_ISA"]:
            from _native_cases import check_output_v2
            from _native_cases import V2_CASES as CASES, V2_DTYPES as DTYPES, v2_call as arrays
            from test_op_v2 import ISA_CASES
            for i, name in enumerate(ISA_CASES):
                for dtype in DTYPES.values():
                    call = arrays(CASES[name], dtype, seed=1)
                    q, k, v, heads, options = (call[n] for n in ("q", "k", "v", "num_heads",
                                                                 "options"))
                    out = attention(lib, q, k, v, heads, chunk_size=16, threads=1 + i % 2,
                                    **options)
                    try:
                        check_output_v2(out, q, k, v, heads, **options)
                    except AssertionError as exc:
                        raise AssertionError(f"{name} {dtype.__name__}: {exc}") from None
    """, env={"FLASH_EXPORT_CPU_ISA": isa})
    assert result.returncode == 0, result.stderr[-4000:]
    ran = json.loads(result.stdout.strip().splitlines()[0])["isa"]
    if ran != isa:
        pytest.skip(f"this CPU cannot run the {isa} path (kernel picked {ran})")


# --------------------------------------------------------------------------- ONNX targets


class _CallsV2(torch.nn.Module):
    """A layer calling the registered op's v2 overload, as a model on contract v2 does."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                seqlens_k: torch.Tensor) -> torch.Tensor:
        return torch.ops.flash_export.attention.v2(q, k, v, None, seqlens_k, None, num_heads=8,
                                                   kv_num_heads=2, causal=True, window_size=5,
                                                   output_layout=1)


def _export(target: str, call: dict[str, Any]) -> Any:
    from flash_export.export.onnx_targets import TARGETS

    args = tuple(torch.from_numpy(x) for x in (call["q"], call["k"], call["v"],
                                               call["options"]["seqlens_k"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.onnx.export(_CallsV2().eval(), args, dynamo=True, opset_version=18,
                                 custom_translation_table=TARGETS[target].translations)


def test_custom_target_exports_a_v2_call_as_one_version_2_node(canary: None) -> None:
    call = arrays(dict(b=2, h=8, hk=2, lq=3, lk=37, causal=True, window=5,
                       seqlens=(36, 20), hm=(True, True, True), layout=1), np.float32)
    model = _export("custom", call).model_proto
    node, = (n for n in model.graph.node if n.domain == DOMAIN)
    assert {o.domain: o.version for o in model.opset_import}[DOMAIN] == 2
    assert list(node.input)[3:] == ["", node.input[4]] and node.input[4]
    assert {a.name for a in node.attribute} >= {"kv_num_heads", "window_size", "output_layout"}
    assert check_custom_nodes(model, "v2.onnx") == 1
    model.ir_version = 10  # onnxruntime 1.31 reads up to IR 13; the exporter writes IR 14
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library_path()))
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = dict(zip((i.name for i in session.get_inputs()),
                    (call["q"], call["k"], call["v"], call["options"]["seqlens_k"])))
    out = session.run(None, feed)[0]
    check_output_v2(out, call["q"], call["k"], call["v"], 8, **call["options"])


def test_other_targets_refuse_a_v2_call_and_a_v2_node_by_name() -> None:
    import onnx

    from flash_export.export.onnx_guard import rewrite_as_attention23, rewrite_as_contrib

    call = arrays(dict(b=1, h=8, hk=2, lq=1, lk=5, seqlens=(4,), hm=(True, True, True)),
                  np.float32)
    with pytest.raises(Exception) as refused:
        _export("standard", call)
    chain, cause = [], refused.value
    while cause is not None:
        chain.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    assert any("target 'standard' cannot express flash_export::attention.v2" in c
               for c in chain), chain[-1]
    node_model = onnx.load_from_string(_node_model(call))
    for rewrite in (rewrite_as_contrib, rewrite_as_attention23):
        with pytest.raises(ExportError, match="uses kv_num_heads, seqlens_k \\(op contract v2\\), "
                           "which this target does not express"):
            rewrite(node_model)

"""The native FlashAttention op (custom_ops/) through onnxruntime and through its C entry point.

Every check compares with a float64 reference under the one tolerance rule
(flash_export.core.tolerance.compare): max error at most max(the dtype's floor, 2 x the error of
PyTorch's own same-dtype computation), and no NaN where the reference is finite. A subprocess
canary loads the library first, so a crash fails the tests instead of killing the run; invalid
inputs and the per-ISA kernels are exercised in subprocesses only.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import pytest
from _native_cases import check_output as _check
from _native_cases import flash_node, model_bytes, reference_attention
from onnx import TensorProto, helper

from flash_export.core.tolerance import max_abs_error
from flash_export.runtime import library_path
from flash_export.runtime.native import NativeLibrary, Strided, attention, attention_params
from flash_export.runtime.native_abi import CPU_ISAS

REPO = Path(__file__).resolve().parents[1]
ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


def _model(dtype: np.dtype, *, mask: bool = False, **attrs: Any) -> bytes:
    """One FlashAttention node; inputs have symbolic shapes."""
    elem = ONNX_TYPES[np.dtype(dtype)]
    names = ["query", "key", "value"]
    inputs = [helper.make_tensor_value_info("query", elem, ["B", "Lq", "E"]),
              helper.make_tensor_value_info("key", elem, ["B", "Lk", "E"]),
              helper.make_tensor_value_info("value", elem, ["B", "Lk", "E"])]
    if mask:
        names.append("mask")
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, None))
    output = helper.make_tensor_value_info("out", elem, ["B", "Lq", "E"])
    return model_bytes([flash_node(names, **attrs)], inputs, [output])


def _session(model: bytes, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(library_path()))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _run(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None,
         threads: int = 1, **attrs: Any) -> np.ndarray:
    session = _session(_model(q.dtype, mask=mask is not None, **attrs), threads)
    feed = {"query": q, "key": k, "value": v}
    if mask is not None:
        feed["mask"] = mask
    return session.run(None, feed)[0]


def _run_declared_as_fed(*arrays: np.ndarray, **attrs: Any) -> np.ndarray:
    """Run a node whose graph inputs declare exactly the fed dtypes, with unknown shapes, so that
    bad inputs reach the kernel's own validation instead of onnxruntime's input checks."""
    names = ["query", "key", "value", "mask"][: len(arrays)]
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None)
              for n, a in zip(names, arrays)]
    # The output has query's type, as every exporter declares it: the library's shape inference
    # states it, so a dtype fault in any input reaches the kernel and its message.
    out_type = helper.np_dtype_to_tensor_dtype(arrays[0].dtype)
    output = helper.make_tensor_value_info("out", out_type, None)
    session = _session(model_bytes([flash_node(names, **attrs)], inputs, [output]))
    return session.run(None, dict(zip(names, arrays)))[0]


def _qkv(batch: int, seq_q: int, seq_k: int, embed: int, dtype: Any = np.float32,
         seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, seq_q, embed)).astype(dtype),
            rng.standard_normal((batch, seq_k, embed)).astype(dtype),
            rng.standard_normal((batch, seq_k, embed)).astype(dtype))


def _subprocess(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
                "FLASH_EXPORT_LIBRARY": str(library_path()), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=120, check=False)


@pytest.fixture(scope="module", autouse=True)
def _canary() -> None:
    """Load the library and run one node in a subprocess before anything runs in-process."""
    if not Path(library_path()).is_file():
        pytest.skip(f"native library not built at {library_path()}: "
                    "run `python custom_ops/build.py --out DIR` and set FLASH_EXPORT_LIBRARY")
    result = _subprocess("""
        import numpy as np
        from test_native_op import _run
        q = np.ones((1, 3, 8), np.float32)
        print(_run(q, q, q, num_heads=2).sum())
    """)
    if result.returncode != 0:
        pytest.fail(f"canary run of the native op failed ({result.returncode}):\n{result.stderr}")


SHAPES = [  # (batch, Lq, Lk, heads, head_dim)
    (1, 1, 1, 1, 16),
    (2, 63, 65, 2, 64),
    (3, 64, 64, 1, 128),
    (1, 65, 1, 4, 16),
    (2, 1, 65, 2, 64),
    (1, 7, 129, 2, 16),
    (2, 65, 63, 1, 128),
    (1, 1000, 1000, 1, 64),
]
SHAPE_IDS = [f"B{b}-Lq{lq}-Lk{lk}-H{h}-D{d}" for b, lq, lk, h, d in SHAPES]


@pytest.mark.parametrize("variant", ["plain", "causal", "mask", "mask_causal"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(shape: tuple[int, ...], dtype: Any, variant: str) -> None:
    batch, seq_q, seq_k, heads, head_dim = shape
    q, k, v = _qkv(batch, seq_q, seq_k, heads * head_dim, dtype)
    causal = "causal" in variant
    mask = None
    if "mask" in variant:
        mask = np.random.default_rng(1).random((batch, 1, seq_q, seq_k)) > 0.3
    out = _run(q, k, v, mask, num_heads=heads, causal=int(causal))
    _check(out, q, k, v, heads, mask=mask, causal=causal)


MASK_SHAPES = [(), (1,), (37,), (29, 37), (1, 29, 1), (2, 1, 1, 37), (1, 3, 29, 37),
               (2, 3, 29, 37), (3, 1, 37)]


@pytest.mark.parametrize("fill", ["random", "all_false"])
@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=[str(s) for s in MASK_SHAPES])
def test_mask_broadcast(mask_shape: tuple[int, ...], fill: str) -> None:
    q, k, v = _qkv(2, 29, 37, 3 * 16)
    rng = np.random.default_rng(2)
    mask = np.asarray(rng.random(mask_shape) > 0.4)
    if fill == "all_false":
        mask = np.zeros(mask_shape, bool)
    out = _run(q, k, v, mask, num_heads=3)
    _check(out, q, k, v, 3, mask=mask)
    if fill == "all_false":
        assert np.all(out == 0.0), "rows that see no key must be zeros"


def test_causal_with_more_queries_than_keys_gives_zero_rows() -> None:
    q, k, v = _qkv(1, 70, 5, 32)
    out = _run(q, k, v, num_heads=2, causal=1)
    _check(out, q, k, v, 2, causal=True)
    assert np.all(out[:, :65] == 0.0) and np.all(out[:, 65:] != 0.0)


@pytest.mark.parametrize("seq", [(0, 5), (5, 0), (0, 0)], ids=["Lq0", "Lk0", "both0"])
def test_empty_sequences(seq: tuple[int, int]) -> None:
    q, k, v = _qkv(2, seq[0], seq[1], 32)
    out = _run(q, k, v, num_heads=2)
    assert out.shape == q.shape and np.all(out == 0.0)


def test_num_heads_is_read() -> None:
    q, k, v = _qkv(2, 33, 41, 64)
    one, four = _run(q, k, v, num_heads=1), _run(q, k, v, num_heads=4)
    assert max_abs_error(one, four) > 1e-3
    _check(one, q, k, v, 1)
    _check(four, q, k, v, 4)


def test_scale_is_read() -> None:
    q, k, v = _qkv(2, 33, 41, 64)
    default, scaled = _run(q, k, v, num_heads=2), _run(q, k, v, num_heads=2, scale=0.5)
    assert max_abs_error(default, scaled) > 1e-3
    _check(default, q, k, v, 2)
    _check(scaled, q, k, v, 2, scale=0.5)


def test_causal_is_read() -> None:
    q, k, v = _qkv(2, 33, 41, 64)
    plain, causal = _run(q, k, v, num_heads=2, causal=0), _run(q, k, v, num_heads=2, causal=1)
    assert max_abs_error(plain, causal) > 1e-3
    _check(causal, q, k, v, 2, causal=True)


def test_chunk_size_is_read() -> None:
    """Chunking changes only the float32 rounding: every size passes, but bits differ."""
    q, k, v = _qkv(2, 65, 130, 64)
    outs = {c: _run(q, k, v, num_heads=2, chunk_size=c) for c in (1, 7, 64, 1000)}
    for out in outs.values():
        _check(out, q, k, v, 2)
    assert not np.array_equal(outs[1], outs[64]), "chunk_size=1 and 64 gave identical bits"
    assert np.array_equal(outs[64], _run(q, k, v, num_heads=2, chunk_size=64))


def test_intra_op_threads_give_identical_results() -> None:
    q, k, v = _qkv(2, 257, 300, 128)
    mask = np.random.default_rng(3).random((257, 300)) > 0.2
    one = _run(q, k, v, mask, threads=1, num_heads=2, causal=1)
    two = _run(q, k, v, mask, threads=2, num_heads=2, causal=1)
    assert np.array_equal(one, two)
    _check(two, q, k, v, 2, mask=mask, causal=True)


def test_three_session_options_two_live_sessions() -> None:
    q, k, v = _qkv(1, 20, 30, 32)
    sessions = [_session(_model(np.float32, num_heads=2)) for _ in range(3)]
    del sessions[0]  # its SessionOptions registered the library too; the op must outlive it
    for session in sessions:
        _check(session.run(None, {"query": q, "key": k, "value": v})[0], q, k, v, 2)


def test_nan_propagates_only_to_rows_that_see_it() -> None:
    q, k, v = _qkv(1, 10, 10, 16)
    q[0, 2, 3] = np.nan
    k[0, 6, 0] = np.nan  # causal: query rows >= 6 see key 6
    out = _run(q, k, v, num_heads=1, causal=1)
    nan_rows = np.isnan(out[0]).all(axis=-1)
    assert nan_rows.tolist() == [i == 2 or i >= 6 for i in range(10)]
    assert np.isfinite(out[0][~nan_rows]).all()


def neg_inf_case(case: str, dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                  np.ndarray | None, bool]:
    """(q, k, v, mask, causal) of one case whose query rows have -inf logits; 2 heads of D = 8.

    Query element 0 (head 0) of some rows is -inf and every key's element 0 is positive, so those
    rows' head-0 logits are -inf for every key; key 3's element 0 is negative (a +inf logit) in
    the cases where a mask hides it. Masking decides visibility, values decide numbers: a row that
    sees keys whose logits are all -inf is NaN, a row that sees no key is zeros.
    """
    rng = np.random.default_rng(4)
    seq_q, seq_k = 5, {"one-key": 1, "causal": 3}.get(case, 9)
    q = rng.standard_normal((1, seq_q, 16))
    k = rng.standard_normal((1, seq_k, 16))
    v = rng.standard_normal((1, seq_k, 16))
    k[..., 0] = np.abs(k[..., 0]) + 0.5
    q[0, 1, 0] = -np.inf
    mask, causal = None, False
    if case == "masked-inf-key":
        k[0, 3, 0] = -1.0  # a +inf logit for the -inf rows, NaN-free for the others
        q[0, 4, 0] = -np.inf
        mask = np.ones((seq_q, seq_k), bool)
        mask[1, 3] = False  # row 1 sees only -inf logits: NaN
        mask[3, :] = False  # row 3 sees no key: zeros
        mask[4, :] = False
        mask[4, 3] = True  # row 4 sees only the +inf logit: NaN
        mask[2, 5:] = False
    elif case == "causal":
        causal = True  # Lq 5 > Lk 3: rows 0-1 see no key, row 3 sees keys 0-1
        q[0, 0, 0] = -np.inf
        q[0, 3, 0] = -np.inf
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), mask, causal


NEG_INF_CASES = ["one-key", "several-keys", "masked-inf-key", "causal"]


def check_neg_inf(out: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                  mask: np.ndarray | None, causal: bool) -> None:
    reference = reference_attention(q, k, v, 2, mask=mask, causal=causal)
    nan = np.isnan(reference)
    assert nan.any(), "the case has no NaN in the reference"
    assert np.array_equal(np.isnan(out), nan), (
        f"NaN at {np.argwhere(np.isnan(out)).tolist()}, reference {np.argwhere(nan).tolist()}")
    zero_rows = (reference == 0).all(-1)
    assert (out[zero_rows] == 0).all(), "rows that see no key must be zeros"
    _check(out, q, k, v, 2, mask=mask, causal=causal)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", NEG_INF_CASES)
def test_rows_whose_visible_logits_are_all_neg_inf_are_nan(case: str, dtype: Any) -> None:
    q, k, v, mask, causal = neg_inf_case(case, dtype)
    out = _run(q, k, v, mask, num_heads=2, causal=int(causal))
    check_neg_inf(out, q, k, v, mask, causal)


def test_large_logits_do_not_overflow() -> None:
    q, k, v = _qkv(1, 50, 70, 64)
    q *= 40.0  # logits of magnitude ~1e4 after the 1/sqrt(D) scale
    k *= 40.0
    out = _run(q, k, v, num_heads=1)
    assert np.isfinite(out).all()
    _check(out, q, k, v, 1)


INVALID_CASES: dict[str, tuple[str, str]] = {
    # id: (python building args for _run, expected message fragment)
    "query_rank": ("q[0], k, v, num_heads=2", "query has rank 2, expected 3 (batch, sequence, "
                   "heads * head dim) or 4 (batch, heads, sequence, head dim)"),
    "key_rank": ("q, k[None, None], v, num_heads=2", "key has rank 5, expected 3"),
    "value_rank": ("q, k, v[0], num_heads=2", "value has rank 2, expected 3"),
    "query_dtype": ("q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), num_heads=2",
                    "query has element type float64, expected float32, float16 or bfloat16"),
    "key_dtype": ("q, k.astype(np.float16), v, num_heads=2",
                  "key has element type float16, expected float32 (query's element type)"),
    "value_dtype": ("q, k, v.astype(np.int32), num_heads=2",
                    "value has element type int32, expected float32"),
    "batch": ("q, k[:1], v[:1], num_heads=2", "key has batch 1, expected 2 (query's batch)"),
    "embed": ("q, k[..., :24], v, num_heads=2",
              "key has head dim 12, expected 16 (query's head dim)"),
    "value_embed": ("q, k, v[..., :15], num_heads=2",
                    "value has embed 15, not divisible by num_heads 2"),
    "value_length": ("q, k, v[:, :5], num_heads=2",
                     "value has sequence length 5, expected 9 (key's sequence length)"),
    "heads_divide": ("q, k, v, num_heads=3", "query has embed 32, not divisible by num_heads 3"),
    "num_heads_zero": ("q, k, v, num_heads=0", "num_heads is 0, expected an INT >= 1"),
    "num_heads_missing": ("q, k, v", "num_heads is missing, expected an INT >= 1 (required)"),
    "chunk_size": ("q, k, v, num_heads=2, chunk_size=0", "chunk_size is 0, expected an INT >= 1"),
    "causal": ("q, k, v, num_heads=2, causal=2", "causal is 2, expected an INT 0 or 1"),
    "scale": ("q, k, v, num_heads=2, scale=float('inf')", "scale is inf, expected a finite FLOAT"),
    "scale_int": ("q, k, v, num_heads=2, scale=1", "scale is an INT (1), expected a finite FLOAT"),
    "causal_float": ("q, k, v, num_heads=2, causal=1.0",
                     "causal is a FLOAT (1.0), expected an INT 0 or 1"),
    "mask_dtype": ("q, k, v, np.ones((7, 9), np.float32), num_heads=2",
                   "mask has element type float32, expected bool"),
    "mask_rank": ("q, k, v, np.ones((1, 2, 2, 7, 9), bool), num_heads=2",
                  "mask has rank 5, expected at most 4"),
    "mask_lk": ("q, k, v, np.ones((7, 8), bool), num_heads=2",
                "mask dimension 1 is 8, expected 1 or 9 (Lk)"),
    "mask_heads": ("q, k, v, np.ones((2, 3, 7, 9), bool), num_heads=2",
                   "mask dimension 1 is 3, expected 1 or 2 (num_heads)"),
    "mask_batch": ("q, k, v, np.ones((3, 1, 1, 9), bool), num_heads=2",
                   "mask dimension 0 is 3, expected 1 or 2 (batch)"),
}


def _refusals(runner: str, cases: dict[str, tuple[str, str]], caught: str) -> dict[str, str]:
    """Run every case through `runner` (this module's) in one subprocess, where a read past a
    buffer may crash; maps case id to the message of the `caught` exception it raised (or
    'OK')."""
    arguments = {name: args for name, (args, _) in cases.items()}
    result = _subprocess(f"""
        import json
        import numpy as np
        from test_native_op import _qkv, {runner}
        out = {{}}
        for name, args in {arguments!r}.items():
            q, k, v = _qkv(2, 7, 9, 32)
            try:
                eval("{runner}(" + args + ")")
                out[name] = "OK"
            except {caught} as exc:
                out[name] = str(exc)
        print(json.dumps(out))
    """)
    assert result.returncode == 0, f"subprocess crashed ({result.returncode}):\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


# The node's faults that are about tensors, refused by the ctypes binding in the node's words: both
# have the library's params filler check the call (the node adds its "FlashAttention: " prefix).
SHARED_FAULTS = ("query_rank", "key_rank", "value_rank", "query_dtype", "key_dtype", "value_dtype",
                 "batch",
                 "embed", "value_embed", "value_length", "heads_divide", "mask_dtype",
                 "mask_rank", "mask_lk", "mask_heads", "mask_batch")
BINDING_CASES: dict[str, tuple[str, str]] = {
    **{name: INVALID_CASES[name] for name in SHARED_FAULTS},
    # float32 queries with float16 keys and values were read as float32: past both buffers,
    # garbage up to 5e34, and a segfault at Lk = 200,000
    "kv_float16_long": ("q, *[np.zeros((2, 200_000, 32), np.float16)] * 2, num_heads=2",
                        "key has element type float16, expected float32 (query's element type)"),
    "value_float16": ("q, k, v.astype(np.float16), num_heads=2",
                      "value has element type float16, expected float32 (query's element type)"),
    "num_heads_zero": ("q, k, v, num_heads=0", "num_heads is 0, expected at least 1"),
    "chunk_size": ("q, k, v, num_heads=2, chunk_size=0", "chunk_size is 0, expected at least 1"),
    "scale_nan": ("q, k, v, num_heads=2, scale=float('nan')",
                  "scale is nan, expected a finite float32 other than 0"),
    "scale_zero": ("q, k, v, num_heads=2, scale=0.0",
                   "scale is 0, expected a finite float32 other than 0"),
    "scale_overflow": ("q, k, v, num_heads=2, scale=1e39",
                       "scale is 1e+39, expected a finite float32 other than 0"),
}


def _run_binding(*arrays: np.ndarray, num_heads: int, **attrs: Any) -> np.ndarray:
    """`flash_export.runtime.native.attention` with _run_declared_as_fed's arguments (mask 4th)."""
    lib = NativeLibrary(library_path())
    return attention(lib, *arrays[:3], num_heads, mask=arrays[3] if len(arrays) > 3 else None,
                     **attrs)


def _node_says(message: str, words: str) -> bool:
    # onnxruntime wraps the node's message in its own; the node prefixes "FlashAttention: "
    return "FlashAttention: " in message and words in message


def _binding_says(message: str, words: str) -> bool:
    return message.startswith(words) and "\n" not in message


# Who refuses: (runner in the subprocess, its cases, the exception it raises (onnxruntime raises
# its own pybind types), how its message must carry the case's words).
REFUSERS: dict[str, tuple[str, dict[str, tuple[str, str]], str, Callable[[str, str], bool]]] = {
    "node": ("_run_declared_as_fed", INVALID_CASES, "Exception", _node_says),
    "binding": ("_run_binding", BINDING_CASES, "ValueError", _binding_says),
}
REFUSALS = [(refuser, case) for refuser, (_, cases, _, _) in REFUSERS.items() for case in cases]


@pytest.fixture(scope="module")
def refusals() -> Callable[[str], dict[str, str]]:
    """Each refuser's messages by case, from one subprocess per refuser."""
    return functools.cache(lambda refuser: _refusals(*REFUSERS[refuser][:3]))


@pytest.mark.parametrize(("refuser", "case"), REFUSALS, ids=[f"{r}-{c}" for r, c in REFUSALS])
def test_invalid_input_rejected(refuser: str, case: str,
                                refusals: Callable[[str], dict[str, str]]) -> None:
    """The node, and the ctypes binding for the faults it shares, refuse in the node's words."""
    _, cases, _, says = REFUSERS[refuser]
    message = refusals(refuser)[case]
    assert says(message, cases[case][1]), message


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_every_cpu_path_matches_reference(isa: str) -> None:
    """The C entry point on each vector path (forced by FLASH_EXPORT_CPU_ISA), in a subprocess."""
    result = _subprocess("""
        import json, os
        import numpy as np
        from flash_export.runtime.native import NativeLibrary, Strided, attention, attention_params
        from flash_export.runtime import library_path
        from test_native_op import _check, _qkv
        lib = NativeLibrary(library_path())
        isa = lib.cpu_isa()
        for b, lq, lk, h, d, dtype, causal, chunk, masked in [
            (2, 65, 63, 2, 64, np.float32, True, 64, True),
            (1, 100, 130, 3, 24, np.float16, True, 7, False),
            (3, 17, 49, 1, 128, np.float32, False, 16, True),
            (1, 50, 1, 2, 8, np.float16, False, 1, False),
            # AMX (float16): several query blocks and packing chunks, odd key blocks, padded
            # head dims, its largest head, and a larger one that falls back to AVX-512
            (1, 200, 600, 2, 64, np.float16, False, 64, True),
            (2, 33, 65, 1, 256, np.float16, True, 64, False),
            (1, 97, 63, 3, 40, np.float16, True, 64, True),
            (1, 40, 70, 1, 264, np.float16, False, 64, False),
        ]:
            q, k, v = _qkv(b, lq, lk, h * d, dtype)
            mask = np.random.default_rng(5).random((lq, lk)) > 0.3 if masked else None
            for threads in (1, 2):
                out = attention(lib, q, k, v, h, mask=mask, causal=causal, chunk_size=chunk,
                               threads=threads)
                _check(out, q, k, v, h, mask=mask, causal=causal)
        # Infinities go where the float64 reference puts them (AMX hands such calls to AVX-512:
        # its part products would turn inf * 0 into NaN). A -inf key element against positive
        # query elements gives that key a -inf logit: every row ignores it and stays finite.
        q, k, v = _qkv(1, 40, 300, 128, np.float16)
        q[..., 5] = np.abs(q[..., 5]) + 0.5
        k[0, 290, 5] = -np.inf
        out = attention(lib, q, k, v, 2)
        assert np.isfinite(out).all()
        _check(out, q, k, v, 2)
        # An infinite value reaches exactly its own column of every row that attends to it. Key 9
        # holds every head-0 row's largest logit, so its probability is exactly 1, whose low part
        # is 0: 0 * inf is where a part product would make NaN.
        q, k, v = _qkv(1, 40, 70, 128, np.float16)
        q[..., :64] = np.abs(q[..., :64])
        k[0, 9, :64] = 2.0
        v[0, 9, 5] = np.inf
        out = attention(lib, q, k, v, 2, threads=2)
        assert (out[0, :, 5] == np.inf).all()
        assert np.isfinite(np.delete(out, 5, axis=2)).all()
        # Rows whose visible logits are all -inf are NaN, rows that see no key zeros (the AMX
        # path hands these calls to AVX-512 when packing finds the infinity).
        from test_native_op import NEG_INF_CASES, check_neg_inf, neg_inf_case
        for case in NEG_INF_CASES:
            for dtype in (np.float32, np.float16):
                q, k, v, mask, causal = neg_inf_case(case, dtype)
                for chunk in (1, 64):
                    out = attention(lib, q, k, v, 2, mask=mask, causal=causal, chunk_size=chunk)
                    check_neg_inf(out, q, k, v, mask, causal)
        # Causal, a NaN value past the diagonal: the first query block, which sees only earlier
        # keys (key 107 is visible from row 97; the plan says where the block ends: 96 rows on
        # AMX, 25 on the portable path, 50 rounded up to the vector width on the others), must
        # stay finite.
        from flash_export.runtime.native import Strided, attention_params
        q, k, v = _qkv(1, 100, 110, 128, np.float16)
        v[0, 107, 3] = np.nan
        out = attention(lib, q, k, v, 2, causal=True)
        bq = lib.cpu_plan(attention_params(lib, *(Strided.of(x) for x in (q, k, v, out)), 2,
                                           causal=True))["bq"]
        assert 25 <= bq <= 96
        assert np.isfinite(out[0, :bq]).all()
        print(json.dumps({"isa": isa, "info": lib.build_info()}))
    """, env={"FLASH_EXPORT_CPU_ISA": isa})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["isa"] != isa:
        pytest.skip(f"this CPU cannot run the {isa} path (kernel picked {report['isa']})")
    assert report["info"]["cpu_isa"] == isa


@pytest.mark.parametrize("isa", ["amx", "avx512"])
def test_bfloat16_core_matches_reference(isa: str) -> None:
    """bfloat16 (reachable through the C entry point only): the AMX build hands it to AVX-512."""
    result = _subprocess("""
        import json
        import numpy as np
        import torch
        from _native_cases import reference_attention
        from helpers import assert_matches_reference
        from flash_export.runtime.native import NativeLibrary, Strided, attention, attention_params
        from flash_export.runtime import library_path
        lib = NativeLibrary(library_path())
        torch.manual_seed(0)
        for lq, lk, d, causal, masked in [(63, 65, 64, True, False), (200, 300, 128, False, True),
                                          (7, 1, 32, False, False)]:
            q, k, v = (torch.randn(2, n, 3 * d).to(torch.bfloat16) for n in (lq, lk, lk))
            mask = (torch.rand(2, 1, lq, lk) > 0.4).numpy() if masked else None
            # numpy has no bfloat16: the core reads and writes the raw 16-bit words
            words = [x.view(torch.int16).numpy().view(np.uint16) for x in (q, k, v)]
            out = attention(lib, *words, 3, mask=mask, causal=causal, dtype="bfloat16")
            out = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
            values = [x.float().numpy() for x in (q, k, v)]
            ref, base = (reference_attention(*values, 3, mask=mask, causal=causal, dtype=t)
                         for t in (torch.float64, torch.bfloat16))
            assert_matches_reference(out, torch.from_numpy(ref), torch.from_numpy(base))
        print(json.dumps({"isa": lib.cpu_isa()}))
    """, env={"FLASH_EXPORT_CPU_ISA": isa})
    assert result.returncode == 0, result.stderr
    if json.loads(result.stdout.strip().splitlines()[-1])["isa"] != isa:
        pytest.skip(f"this CPU cannot run the {isa} path")


def test_build_info_is_json_and_states_the_contract() -> None:
    """The op the library registers (custom_ops/ort/flash_attention_op.h) is the one
    flash_export.core.contract names; every other test here runs nodes of that domain, version and
    name, which proves that it registered them."""
    from flash_export.core.contract import DOMAIN, DOMAIN_VERSION, OP_NAME

    info = NativeLibrary(library_path()).build_info()
    assert (info["op_domain"], info["op_name"], info["op_version"]) == (
        DOMAIN, OP_NAME, DOMAIN_VERSION)
    assert info["ort_api_version"] >= 17
    assert info["cpu_isa"] in CPU_ISAS
    assert isinstance(info["cuda"], bool) and isinstance(info["cuda_archs"], list)


def test_core_matches_onnxruntime_bitwise() -> None:
    q, k, v = _qkv(2, 70, 90, 64)
    core = attention(NativeLibrary(library_path()), q, k, v, 2, causal=True, threads=2)
    assert np.array_equal(core, _run(q, k, v, num_heads=2, causal=1, threads=2))


def test_openmp_forward_runs_every_item_on_the_team_it_is_given() -> None:
    """flash_export_attention_forward_cpu_openmp hands its work to the `GOMP_parallel` it is
    passed, with a team of at most `threads`, and matches the serial forward bitwise. The runtime
    here is a stand-in with GOMP_parallel's signature that records each region and runs its team
    on Python threads (ctypes releases the GIL, so the members run the C items in parallel)."""
    regions: list[tuple[int, int]] = []
    region_fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
    def gomp_parallel(fn: int, data: int, num_threads: int, flags: int) -> None:
        regions.append((num_threads, flags))
        member = region_fn(fn)
        team = [threading.Thread(target=member, args=(data,)) for _ in range(num_threads - 1)]
        for t in team:
            t.start()
        member(data)
        for t in team:
            t.join()

    address = ctypes.cast(gomp_parallel, ctypes.c_void_p).value
    lib = NativeLibrary(library_path())
    # decode ("rows"), one item per head ("heads"), and two packing groups ("shared": four
    # regions, packing then attending per group)
    cases = [((8, 1, 1024, 512), 8, False, "rows"), ((2, 70, 90, 128), 2, True, "heads"),
             ((1, 40, 5500, 192), 3, False, "shared")]
    for (b, lq, lk, e), h, causal, regime in cases:
        q, k, v = _qkv(b, lq, lk, e)
        serial = attention(lib, q, k, v, h, causal=causal)
        before = len(regions)
        team = attention(lib, q, k, v, h, causal=causal, threads=2, gomp_parallel=address)
        assert np.array_equal(serial, team), regime
        ran = regions[before:]
        # a team of `threads`, or of one where a region has a single item
        assert ran and all(n in (1, 2) and flags == 0 for n, flags in ran), (regime, ran)
        assert ran[0][0] == 2, (regime, ran)
        if regime == "shared":
            params = attention_params(lib, *(Strided.of(x) for x in (q, k, v, np.empty_like(q))),
                                      h)
            plan = lib.cpu_plan(params, 2)
            assert plan["regime"] == "shared" and plan["groups"] >= 2, plan
            assert len(ran) == 2 * plan["groups"]
    # No runtime: the forward starts threads of its own, same result
    q, k, v = _qkv(2, 70, 90, 128)
    assert np.array_equal(attention(lib, q, k, v, 2, threads=2, gomp_parallel=0),
                          attention(lib, q, k, v, 2))

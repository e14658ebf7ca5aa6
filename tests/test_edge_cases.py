"""Numeric edge cases through every backend: eager, a loaded TorchScript file, each ONNX target.

Cases: a fully masked query row and Lk = 0 give zeros before the output projection (so the output
row equals out_proj.bias); logits of magnitude ~1e4 in float16 stay finite; Lq = 0 gives an empty
output; a NaN in an input comes out as NaN in exactly the rows that attend to it.

Infinite logits (masking decides visibility, values decide numbers): a row that sees keys whose
logits are all -inf has no defined softmax and is NaN, as in the float64 reference: with one
visible key, with several, beside masked keys whose logits are +inf or NaN (infinite query), and
beside masked finite keys (infinite keys, which the other rows must not feel through the mask);
a +inf logit is NaN; a row that sees no key stays zeros whatever its query holds. Causal: the
same through the causal rule alone (test_causal_neg_inf_rows).

ONNX backends run in a subprocess per target (the native kernel can crash); a backend that cannot
express a case is an explicit xfail naming the backend and the case.
"""

import copy
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import pytest
import torch

from flash_export.core.contract import TARGETS
from flash_export.core.tolerance import compare, max_abs_error
from flash_export.export.onnx import export_onnx
from flash_export.export.torchscript import export_torchscript, load_torchscript
from flash_export.nn.attention import FlashAttention
from flash_export.nn.swap import reference_forward
from flash_export.runtime import library_path

EMBED, HEADS, CHUNK = 32, 4, 8
ONNX_TARGETS = TARGETS  # every target the contract names
BACKENDS = ("eager", "torchscript") + tuple(f"onnx:{t}" for t in ONNX_TARGETS)
NEG_INF_CASES = ("neginf-several-keys", "neginf-one-key", "neginf-masked-keys",
                 "neginf-infinite-keys")
CASES = ("masked-row", "lk0", "lq0", "nan-query", "nan-key", "large-logits") + NEG_INF_CASES
# Known gaps, each with the reason: (backend, case, dtype) -> why it cannot pass today. They are
# strict xfails: a fix makes them XPASS, which fails, so the entry must then be removed. None today.
KNOWN_GAPS: Dict[Tuple[str, str, str], str] = {}

Inputs = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _model() -> FlashAttention:
    torch.manual_seed(0)
    model = FlashAttention(EMBED, HEADS, CHUNK).eval()
    with torch.no_grad():  # a visible bias, so "zeros before out_proj" is checkable
        model.out_proj.bias.copy_(torch.linspace(-1.0, 1.0, EMBED))
    return model


def opposing_keys(model: FlashAttention, n: int, g: torch.Generator) -> torch.Tensor:
    """(n, E) float64 keys whose projections have, in every dim, the opposite sign of the
    projection of a query that is +inf in element 0 (every other element finite): that query's
    logits are then -inf against each of them, in every head."""
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        query_sign = torch.sign(m64.q_proj.weight[:, 0])  # (E,): signs of the projected query
        target = -query_sign * (1.0 + torch.rand(n, EMBED, generator=g, dtype=torch.float64))
        return torch.linalg.solve(m64.k_proj.weight, (target - m64.k_proj.bias).T).T  # (n, E)


def opposing_queries(model: FlashAttention, n: int, g: torch.Generator) -> torch.Tensor:
    """(n, E) float64 queries whose logits are -inf, in every head, against a key that is +inf in
    element 0 (the mirror of opposing_keys); against finite keys they are finite."""
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        key_sign = torch.sign(m64.k_proj.weight[:, 0])  # (E,): signs of the projected key
        target = -key_sign * (1.0 + torch.rand(n, EMBED, generator=g, dtype=torch.float64))
        return torch.linalg.solve(m64.q_proj.weight, (target - m64.q_proj.bias).T).T  # (n, E)


def _causal_model() -> FlashAttention:
    model = _model()
    model.causal = True
    return model


def make_case(case: str, model: FlashAttention, dtype: torch.dtype) -> Inputs:
    """(values, keys, queries, mask) of one case as numpy arrays; mask bool (B, 1, Lq, Lk)."""
    g = torch.Generator().manual_seed(1)
    b, lq, lk = 2, 5, 11
    if case == "lk0":
        lk = 0
    if case == "lq0":
        lq = 0
    v, k, q = (torch.randn(b, n, EMBED, generator=g, dtype=torch.float64) for n in (lk, lk, lq))
    mask = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    if case == "masked-row":
        mask[0, 0, 1, :] = False
        mask[1, 0, 4, :] = False
    elif case == "nan-query":
        q[0, 2, 3] = float("nan")
    elif case == "nan-key":
        k[1, 6, 0] = float("nan")
        mask[1, 0, 3, 6] = False  # row 3 of batch 1 cannot see the NaN key: must stay finite
    elif case == "neginf-infinite-keys":
        # The -inf logits come from infinite keys: row 1 sees only those, beside masked finite
        # keys; the other rows see only finite keys, beside the masked infinite ones.
        q[0, 1] = opposing_queries(model, 1, g)[0]
        k[0, 2, 0] = k[0, 5, 0] = float("inf")
        mask[0, 0, :, 2] = mask[0, 0, :, 5] = False
        mask[0, 0, 1, :] = False
        mask[0, 0, 1, 2] = mask[0, 0, 1, 5] = True  # row 1: NaN
        mask[0, 0, 3, :] = False  # row 3 sees no key: zeros
    elif case in NEG_INF_CASES:
        k[0] = opposing_keys(model, lk, g)  # batch 0: every key gives an infinite query -inf
        q[0, 1, 0] = q[0, 3, 0] = float("inf")
        mask[0, 0, 3, :] = False  # row 3 sees no key: zeros, whatever its query holds
        if case == "neginf-one-key":
            mask[0, 0, 1, :] = False
            mask[0, 0, 1, 4] = True  # row 1 sees one key: NaN
        elif case == "neginf-masked-keys":
            k[0, 7] = -k[0, 7]  # a +inf logit for the infinite queries
            k[0, 8, 5] = float("nan")
            mask[0, 0, :, 8] = False  # no row sees the NaN key
            mask[0, 0, 1, 7] = False  # row 1 sees only -inf logits: NaN
            mask[0, 0, 2, 7:] = False
            q[0, 4, 0] = float("inf")
            mask[0, 0, 4, :] = False
            mask[0, 0, 4, 7] = True  # row 4 sees only the +inf logit: NaN
    elif case == "large-logits":
        # Scale queries and keys so the largest |scaled q.k| after projection is ~1e4.
        m64 = copy.deepcopy(model).double()
        with torch.no_grad():
            qh, kh = m64.split_heads(m64.q_proj(q)), m64.split_heads(m64.k_proj(k))
            peak = (qh @ kh.transpose(-1, -2)).abs().max().item() * m64.scale
        factor = (1e4 / peak) ** 0.5
        q, k = q * factor, k * factor
    return tuple(t.to(dtype).numpy() for t in (v, k, q)) + (mask.numpy(),)  # type: ignore


def expected_nan_rows(case: str, mask: np.ndarray) -> Optional[np.ndarray]:
    """(B, Lq) bool: rows that attend to the NaN (None for cases without NaN)."""
    b, _, lq, _ = mask.shape
    rows = np.zeros((b, lq), dtype=bool)
    if case == "nan-query":
        rows[0, 2] = True
    elif case == "nan-key":
        rows[1] = mask[1, 0, :, 6]
    elif case in NEG_INF_CASES:
        rows[0, 1] = True
        rows[0, 4] = case == "neginf-masked-keys"
    else:
        return None
    return rows


def check_reference_nan_rows(case: str, model: FlashAttention, inputs: Inputs) -> None:
    """The case is what it claims: the float64 reference is NaN in exactly its expected rows (so
    the opposing keys survived the cast to the test dtype)."""
    ref = reference_forward(model, *(torch.from_numpy(a) for a in inputs)).numpy()
    expected = expected_nan_rows(case, inputs[3])
    assert expected is not None
    assert (np.isnan(ref).any(axis=-1) == expected).all(), np.isnan(ref).any(axis=-1).tolist()


# ONNX backends run in tests/_onnx_case_worker.py, a process per target that imports no torch.
WORKER = str(Path(__file__).with_name("_onnx_case_worker.py"))


# --------------------------------------------------------------------------- fixtures

Result = Tuple[Optional[np.ndarray], str]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    return _export_everywhere(_model(), tmp_path_factory.mktemp("edge"), mask=True)


def _export_everywhere(model: torch.nn.Module, folder: Path, *, mask: bool) -> Dict[str, Path]:
    """`model` as TorchScript and as every ONNX target in both dtypes (custom: with a library)."""
    out = {"torchscript": export_torchscript(model, folder / "model.pt")}
    for target in ONNX_TARGETS:
        if target == "custom" and not Path(library_path()).is_file():
            continue
        for dtype in ("float32", "float16"):
            out[f"onnx:{target}:{dtype}"] = export_onnx(
                model, folder / f"{target}-{dtype}.onnx", target=target, dtype=dtype, mask=mask)
    return out


@pytest.fixture(scope="module")
def onnx_results(artifacts: Dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
                 ) -> Callable[[str, str], Dict[str, Result]]:
    """All cases of one (ONNX backend, dtype) in one subprocess, run once and cached."""
    cache: Dict[Tuple[str, str], Dict[str, Result]] = {}

    def get(backend: str, dtype: str) -> Dict[str, Result]:
        if (backend, dtype) in cache:
            return cache[backend, dtype]
        tdtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
        folder = tmp_path_factory.mktemp(f"{backend.replace(':', '_')}_{dtype}")
        for case in CASES:
            v, k, q, mask = make_case(case, _model(), tdtype)
            np.savez(folder / f"{case}.npz", values=v, keys=k, queries=q, mask=mask)
        proc = subprocess.run([sys.executable, WORKER, str(artifacts[f"{backend}:{dtype}"]),
                               str(folder)], capture_output=True, text=True, timeout=300)
        died = (f"worker died with rc {proc.returncode} (negative: a signal): "
                f"{proc.stderr[-800:]}")
        results: Dict[str, Result] = {}
        for case in CASES:
            out, err = folder / f"{case}.npy", folder / f"{case}.err"
            results[case] = ((np.load(out), "") if out.is_file() else
                             (None, err.read_text() if err.is_file() else died))
        cache[backend, dtype] = results
        return results

    return get


def run_backend(backend: str, case: str, dtype: str, inputs: Inputs, artifacts: Dict[str, Path],
                onnx_results: Callable[[str, str], Dict[str, Result]]) -> Result:
    tdtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    if backend.startswith("onnx:"):
        if f"{backend}:{dtype}" not in artifacts:
            pytest.skip(f"{backend}: native library not built at {library_path()}")
        return onnx_results(backend, dtype)[case]
    module: Callable[..., torch.Tensor]
    if backend == "eager":
        module = _model().to(tdtype)
    else:
        module = load_torchscript(artifacts["torchscript"])[0].to(tdtype)
    v, k, q, mask = (torch.from_numpy(a) for a in inputs)
    try:
        with torch.no_grad():
            return module(v, k, q, mask).numpy(), ""
    except Exception as exc:  # recorded as the backend's gap below
        return None, f"{type(exc).__name__}: {' '.join(str(exc).split())}"


# --------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_case(backend: str, case: str, dtype: str, artifacts: Dict[str, Path],
                   onnx_results: Callable[[str, str], Dict[str, Result]],
                   request: pytest.FixtureRequest) -> None:
    if case == "large-logits" and dtype == "float32":
        pytest.skip("large-logits is a float16 case (float32 has range to spare)")
    gap = KNOWN_GAPS.get((backend, case, dtype))
    if gap:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{backend} / {case}: {gap}"))
    model = _model()
    tdtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    inputs = make_case(case, model, tdtype)
    out, error = run_backend(backend, case, dtype, inputs, artifacts, onnx_results)
    assert out is not None, f"{backend} / {case} / {dtype} failed: {error}"
    v, k, q, mask = inputs
    b, lq = q.shape[0], q.shape[1]
    assert out.shape == (b, lq, EMBED), f"{backend}: shape {out.shape}"
    out64 = out.astype(np.float64)
    bias = model.out_proj.bias.detach().to(tdtype).double().numpy()
    tol = 1e-6 if dtype == "float32" else 2e-3

    if case == "lq0":
        return
    if case == "lk0":
        np.testing.assert_allclose(out64, np.broadcast_to(bias, out64.shape), atol=tol,
                                   err_msg=f"{backend}: Lk=0 must give out_proj.bias")
        return
    if case in NEG_INF_CASES:
        check_reference_nan_rows(case, model, inputs)
        np.testing.assert_allclose(out64[0, 3], bias, atol=tol,
                                   err_msg=f"{backend}: a row that sees no key must give "
                                           "out_proj.bias, whatever its query holds")
    if case == "masked-row":
        for bi, row in ((0, 1), (1, 4)):
            np.testing.assert_allclose(out64[bi, row], bias, atol=tol,
                                       err_msg=f"{backend}: a fully masked row must give "
                                               "zeros before out_proj, i.e. out_proj.bias")
    nan_rows = expected_nan_rows(case, mask)
    if nan_rows is not None:
        row_has_nan = np.isnan(out64).any(axis=-1)
        assert (row_has_nan == nan_rows).all(), (
            f"{backend}: NaN rows {np.argwhere(row_has_nan).tolist()}, expected exactly the rows "
            f"that attend to the NaN {np.argwhere(nan_rows).tolist()}")
        assert np.isfinite(out64[~nan_rows]).all(), f"{backend}: non-NaN rows must be finite"
        if case not in NEG_INF_CASES:
            return
        tv, tk, tq, tm = (torch.from_numpy(a) for a in inputs)
        ref = reference_forward(model, tv, tk, tq, tm).numpy()[~nan_rows]  # float64
        baseline = reference_forward(model, tv, tk, tq, tm, dtype=tdtype).double().numpy()
        c = compare(out64[~nan_rows], ref, baseline_error=max_abs_error(baseline[~nan_rows], ref),
                    dtype=dtype)
        assert c.passed, (f"{backend} / {case} / {dtype}: max abs {c.max_abs:.3g} > bound "
                          f"{c.bound:.3g} (nonfinite {c.nonfinite})")
        return
    assert np.isfinite(out64).all(), f"{backend}: non-finite output for {case} in {dtype}"
    tv, tk, tq, tm = (torch.from_numpy(a) for a in inputs)
    ref = reference_forward(model, tv, tk, tq, tm).numpy()  # float64
    baseline = reference_forward(model, tv, tk, tq, tm, dtype=tdtype).double().numpy()
    c = compare(out64, ref, baseline_error=max_abs_error(baseline, ref), dtype=dtype)
    assert c.passed, (f"{backend} / {case} / {dtype}: max abs {c.max_abs:.3g} > bound "
                      f"{c.bound:.3g} (nonfinite {c.nonfinite})")


@pytest.mark.parametrize("target", ONNX_TARGETS)
def test_causal_nan_key_reaches_only_the_rows_that_see_it(
        target: str, causal_artifacts: Dict[str, Path]) -> None:
    """Causal, no mask input: the NaN key's visibility comes from the causal rule alone."""
    from flash_export.runtime import create_session

    model = _causal_model()
    if f"onnx:{target}:float32" not in causal_artifacts:
        pytest.skip(f"onnx:{target}: native library not built at {library_path()}")
    path = causal_artifacts[f"onnx:{target}:float32"]  # this model, exported without a mask
    rng = np.random.default_rng(0)
    v, k, q = (rng.standard_normal((2, n, EMBED)).astype(np.float32) for n in (11, 11, 5))
    k[1, 8, 3] = np.nan  # bottom-right causal: query i sees key j <= i + 6, so rows 2-4 see it
    out = create_session(path).run(["output"], {"values": v, "keys": k, "queries": q})[0]
    expected = np.zeros((2, 5), dtype=bool)
    expected[1, 2:] = True
    assert (np.isnan(out).any(axis=-1) == expected).all(), np.isnan(out).any(axis=-1).tolist()
    assert np.isfinite(out[~expected]).all()
    tv, tk, tq = (torch.from_numpy(a).double() for a in (v, k, q))
    ref = reference_forward(model, tv, tk, tq, None).numpy()
    np.testing.assert_allclose(out[~expected], ref[~expected], atol=1e-5)


@pytest.fixture(scope="module")
def causal_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """The causal model (no mask input) as TorchScript and as every ONNX target and dtype."""
    return _export_everywhere(_causal_model(), tmp_path_factory.mktemp("causal"), mask=False)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_neg_inf_rows(backend: str, dtype: str, causal_artifacts: Dict[str, Path],
                             tmp_path: Path) -> None:
    """Causal, Lq 5 > Lk 3: rows 0-1 see no key (zeros, i.e. out_proj.bias, even for an infinite
    query), row 3's query makes every logit it sees -inf (NaN), the rest is finite."""
    model = _causal_model()
    tdtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    g = torch.Generator().manual_seed(3)
    v, q = (torch.randn(2, n, EMBED, generator=g, dtype=torch.float64) for n in (3, 5))
    k = torch.randn(2, 3, EMBED, generator=g, dtype=torch.float64)
    k[0] = opposing_keys(model, 3, g)
    q[0, 0, 0] = q[0, 3, 0] = float("inf")
    v, k, q = (t.to(tdtype) for t in (v, k, q))
    if backend.startswith("onnx:"):
        if f"{backend}:{dtype}" not in causal_artifacts:
            pytest.skip(f"{backend}: native library not built at {library_path()}")
        np.savez(tmp_path / "causal.npz", values=v.numpy(), keys=k.numpy(), queries=q.numpy())
        path = causal_artifacts[f"{backend}:{dtype}"]
        proc = subprocess.run([sys.executable, WORKER, str(path), str(tmp_path)],
                              capture_output=True, text=True, timeout=300)
        result = tmp_path / "causal.npy"
        assert result.is_file(), f"{backend} failed ({proc.returncode}): {proc.stderr[-800:]}" + (
            (tmp_path / "causal.err").read_text() if (tmp_path / "causal.err").is_file() else "")
        out = np.load(result).astype(np.float64)
    else:
        module = (model.to(tdtype) if backend == "eager"
                  else load_torchscript(causal_artifacts["torchscript"])[0].to(tdtype))
        with torch.no_grad():
            out = module(v, k, q).double().numpy()
    ref = reference_forward(_causal_model(), v, k, q).numpy()  # float64
    nan_rows = np.isnan(ref).any(axis=-1)
    assert nan_rows.tolist() == [[False, False, False, True, False], [False] * 5], nan_rows
    assert (np.isnan(out).any(axis=-1) == nan_rows).all(), np.isnan(out).any(axis=-1).tolist()
    bias = model.out_proj.bias.detach().to(tdtype).double().numpy()
    tol = 1e-6 if dtype == "float32" else 2e-3
    np.testing.assert_allclose(out[:, :2], np.broadcast_to(bias, out[:, :2].shape), atol=tol,
                               err_msg=f"{backend}: rows that see no key must give out_proj.bias")
    baseline = reference_forward(_causal_model(), v, k, q, dtype=tdtype).double().numpy()
    c = compare(out[~nan_rows], ref[~nan_rows],
                baseline_error=max_abs_error(baseline[~nan_rows], ref[~nan_rows]), dtype=dtype)
    assert c.passed, f"{backend} / {dtype}: max abs {c.max_abs:.3g} > bound {c.bound:.3g}"

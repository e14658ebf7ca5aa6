"""Numeric edge cases through every backend: eager, a loaded TorchScript file, each ONNX target.

Cases: a fully masked query row and Lk = 0 give zeros before the output projection (so the output
row equals out_proj.bias); logits of magnitude ~1e4 in float16 stay finite; Lq = 0 gives an empty
output; a NaN in an input comes out as NaN in exactly the rows that attend to it.

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

from flash_export.attention import FlashAttention, reference_forward
from flash_export.export import export_torchscript, load_torchscript
from flash_export.onnx_export import export_onnx
from flash_export.runtime import library_path
from flash_export.tolerance import compare, max_abs_error

EMBED, HEADS, CHUNK = 32, 4, 8
ONNX_TARGETS = ("custom", "standard", "contrib", "attention23")
BACKENDS = ("eager", "torchscript") + tuple(f"onnx:{t}" for t in ONNX_TARGETS)
CASES = ("masked-row", "lk0", "lq0", "nan-query", "nan-key", "large-logits")
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
    else:
        return None
    return rows


# --------------------------------------------------------------------------- ONNX subprocess


def _onnx_worker(path: str, folder: str) -> None:
    """Run every `<case>.npz` in `folder` through `path`: `<case>.npy` or `<case>.err`."""
    from flash_export.runtime import create_session

    session = create_session(path)
    names = {i.name for i in session.get_inputs()}
    for case_file in sorted(Path(folder).glob("*.npz")):
        data = np.load(case_file)
        feed = {n: data[n] for n in ("values", "keys", "queries", "mask") if n in names}
        try:
            np.save(case_file.with_suffix(".npy"), session.run(["output"], feed)[0])
        except Exception as exc:  # onnxruntime's own error: reported as the backend's gap
            case_file.with_suffix(".err").write_text(
                f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:600])


if __name__ == "__main__":
    _onnx_worker(sys.argv[1], sys.argv[2])
    sys.exit(0)


# --------------------------------------------------------------------------- fixtures

Result = Tuple[Optional[np.ndarray], str]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    folder = tmp_path_factory.mktemp("edge")
    model = _model()
    out = {"torchscript": export_torchscript(model, folder / "model.pt")}
    for target in ONNX_TARGETS:
        if target == "custom" and not Path(library_path()).is_file():
            continue
        for dtype in ("float32", "float16"):
            out[f"onnx:{target}:{dtype}"] = export_onnx(
                model, folder / f"{target}-{dtype}.onnx", target=target, dtype=dtype, mask=True)
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
        proc = subprocess.run([sys.executable, __file__, str(artifacts[f"{backend}:{dtype}"]),
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
        return
    assert np.isfinite(out64).all(), f"{backend}: non-finite output for {case} in {dtype}"
    tv, tk, tq, tm = (torch.from_numpy(a) for a in inputs)
    ref = reference_forward(model, tv, tk, tq, tm).numpy()  # float64
    baseline = reference_forward(model, tv, tk, tq, tm, dtype=tdtype).double().numpy()
    c = compare(out64, ref, baseline_error=max_abs_error(baseline, ref), dtype=dtype)
    assert c.passed, (f"{backend} / {case} / {dtype}: max abs {c.max_abs:.3g} > bound "
                      f"{c.bound:.3g} (nonfinite {c.nonfinite})")


@pytest.mark.parametrize("target", ONNX_TARGETS)
def test_causal_nan_key_reaches_only_the_rows_that_see_it(target: str, tmp_path: Path) -> None:
    """Causal, no mask input: the NaN key's visibility comes from the causal rule alone."""
    from flash_export.runtime import create_session

    model = _model()
    model.causal = True
    path = tmp_path / f"{target}.onnx"
    export_onnx(model, path, target=target)
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

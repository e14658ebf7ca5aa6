"""Parity runs: backends on input cases against the float64 reference, under the tolerance rule.

The one case runner behind `flash-export validate`, the check `flash-export onnx` runs after
writing a file, and the tests. A backend is anything that maps a model's named inputs to its
outputs: a PyTorch module or an ONNX file in onnxruntime. Inputs come from the model's IOSpec
(`feeds.make_feed`); every output is judged by `tolerance.compare` against the model with
plain attention in float64 (`model_io.reference_outputs`), the baseline being the same plain
computation in the outputs' dtype.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from flash_export.check.report import BackendResult, Case, CaseResult
from flash_export.core.contract import feed_dtype
from flash_export.core.errors import summary
from flash_export.core.feeds import make_feed
from flash_export.core.io_spec import IOSpec
from flash_export.core.tolerance import compare, max_abs_error
from flash_export.nn.model_io import call, reference_model
from flash_export.runtime.sessions import ort_session

# Called as progress(done, total, label) while cases run.
ProgressFn = Callable[[int, int, str], None]
# Named inputs -> outputs, as float64 arrays.
RunFn = Callable[[Dict[str, torch.Tensor]], List[np.ndarray]]


# --------------------------------------------------------------------------- cases


def default_seqs(chunk: int) -> List[int]:
    """1, chunk-1, chunk, chunk+1, 3*chunk+5, 1024: chunk tails on both sides, no 0/duplicates."""
    return _unique_positive([1, chunk - 1, chunk, chunk + 1, 3 * chunk + 5, 1024])


def _unique_positive(values: Sequence[int]) -> List[int]:
    out: List[int] = []
    for v in values:
        if v > 0 and v not in out:
            out.append(v)
    return out


def sweep(seqs: Sequence[int], batches: Sequence[int], masks: Sequence[bool],
          io: Optional[IOSpec] = None) -> List[Case]:
    """The cases for lengths `seqs`, batches and mask modes.

    With q_len and k_len (the attention contract): for each length L, (Lq=L, Lk=L) and (Lq=L,
    Lk=the next length in the list). Otherwise every dynamic size but the batch is L, moved into
    its bounds (duplicates dropped); a model without such sizes has one case per batch.
    `io` None means the attention contract.
    """
    seqs = _unique_positive(seqs)
    names = [n for n in (io.dynamic if io is not None else ("q_len", "k_len")) if n != "batch"]
    size_sets: List[Dict[str, int]] = []
    if "q_len" in names and "k_len" in names:
        for i, lq in enumerate(seqs):
            for lk in (lq, seqs[(i + 1) % len(seqs)]):
                sizes = {**{n: lq for n in names}, "q_len": lq, "k_len": lk}
                sizes = io.clamp(sizes) if io is not None else sizes
                sizes.pop("batch", None)
                if sizes not in size_sets:
                    size_sets.append(sizes)
    else:
        for length in seqs or [1]:
            sizes = {n: length for n in names}
            sizes = io.clamp(sizes) if io is not None else sizes
            sizes.pop("batch", None)
            if sizes not in size_sets:
                size_sets.append(sizes)
    if io is not None and "batch" in io.dynamic:
        batches = [io.clamp({"batch": b})["batch"] for b in batches]
    return [Case(b, tuple(sorted(s.items())), m) for b in _unique_positive(batches)
            for s in size_sets for m in masks]


def make_inputs(case: Case, io: IOSpec, dtype: torch.dtype, seed: int) -> Dict[str, torch.Tensor]:
    """Valid named inputs for one case: float inputs in `dtype`, others as `io` declares.

    Attention masks block ~25% of positions and the whole first query row of batch 0 (a row that
    sees no key, which every backend must give as zeros); without `case.mask` they are left out.
    Padding masks pad each row to a random length >= 1, or not at all without `case.mask`.
    """
    sizes = {"batch": case.batch, **dict(case.sizes)}
    feed = make_feed(io, sizes, seed, padded=case.mask)
    out = {}
    for t in io.inputs:
        if t.role == "attention" and not case.mask:
            continue
        tensor = torch.from_numpy(feed[t.name])
        out[t.name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


def case_seed(index: int) -> int:
    """Input seed of case `index` (distinct from the parameter seed's stream)."""
    return 1_000_003 * (index + 1)


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """One implementation to compare: `run(inputs)` gives its outputs as float64 arrays."""

    name: str
    source: str
    run: Optional[RunFn]
    load_error: Optional[str] = None


class _RunError(Exception):
    """A backend failed on one case; the message is already one readable line."""


def one_line(exc: BaseException) -> str:
    """One line for a backend's failure (`errors.summary`, or a _RunError's own line)."""
    return str(exc) if isinstance(exc, _RunError) else summary(exc)


def torch_backend(name: str, module: Any, source: str, io: IOSpec) -> Backend:
    """A PyTorch module (eager or TorchScript) already in the dtype it runs in."""
    def run(inputs: Dict[str, torch.Tensor]) -> List[np.ndarray]:
        return [o.double().numpy() for o in call(module, {**inputs, **io.constants})]

    return Backend(name, source, run)


def pt2_backend(name: str, compiled: Any, source: str, io: IOSpec) -> Backend:
    """A loaded AOTInductor package (`pt2_export.load_pt2`), called with the inputs by name.

    A package takes every input it was exported with: an attention mask the case leaves out is
    fed all True (which must equal no mask), as for ONNX graphs.
    """
    def run(inputs: Dict[str, torch.Tensor]) -> List[np.ndarray]:
        feed = dict(inputs)
        sizes = _sizes_of(io, feed)
        for t in io.inputs:
            if t.name not in feed:
                feed[t.name] = torch.ones(io.shape(t, sizes), dtype=torch.bool)
        return [o.double().numpy() for o in call(compiled, {**feed, **io.constants})]

    return Backend(name, source, run)


def torchscript_backend(program: Any, source: str, io: IOSpec, meta: Mapping[str, str],
                        dtype: str) -> Backend:
    """A loaded TorchScript archive in `dtype` (the torchscript kind's validate backend)."""
    name = "torchscript-native" if meta.get("attention") == "native" else "torchscript"
    return torch_backend(name, program.eval().to(getattr(torch, dtype)), source, io)


def pt2_package_backend(program: Any, source: str, io: IOSpec, meta: Mapping[str, str],
                        dtype: str) -> Backend:
    """A loaded `.pt2` package, in the dtype it was compiled for (the pt2 kind's)."""
    return pt2_backend("pt2", program, source, io)


def onnx_backend(name: str, path: Path, provider: str, io: IOSpec,
                 session: Any = None) -> Backend:
    """An ONNX file in onnxruntime (`runtime.ort_session`, or the `session` given).

    Inputs are fed by name in the graph's own dtypes; an attention mask the case leaves out is
    fed all True (which must equal no mask). A file that fails to load gives a backend with a
    `load_error` instead of an exception.
    """
    if session is None:
        try:
            session = ort_session(path, provider=provider)
        except Exception as exc:  # onnxruntime raises its own exception types at load
            return Backend(name, str(path), None, load_error=one_line(exc))
    graph_inputs = {i.name: i for i in session.get_inputs()}
    missing = [t.name for t in io.inputs if t.name not in graph_inputs]
    if missing:
        return Backend(name, str(path), None, load_error=f"graph inputs are "
                       f"{sorted(graph_inputs)}, missing {missing}")
    fixed = {n: i.shape for n, i in graph_inputs.items()
             if any(isinstance(d, int) for d in i.shape[:2])}
    note = f" (the graph fixes input dims {fixed})" if fixed else ""
    outputs = [o.name for o in session.get_outputs()]

    def run(inputs: Dict[str, torch.Tensor]) -> List[np.ndarray]:
        feed = _graph_feed(io, inputs, lambda n: feed_dtype(graph_inputs[n].type))
        try:
            results = session.run(outputs, feed)
        except Exception as exc:  # onnxruntime's Fail/InvalidArgument/RuntimeException
            raise _RunError(one_line(exc) + note) from exc
        return [np.asarray(r, dtype=np.float64) for r in results]

    return Backend(name, str(path), run)


def openvino_backend(name: str, path: Path, io: IOSpec) -> Backend:
    """An ONNX file in OpenVINO (CPU), computing in float32.

    OpenVINO's CPU plugin computes in bfloat16 by default where the CPU has it (issue 27
    reports 0.28 max error on a zoo GPT's logits that way): the precision hint is pinned to
    f32. Inputs are fed as for onnxruntime (an attention mask left out: all True). A file that
    fails to read or compile gives a backend with a `load_error`.
    """
    try:
        import openvino

        core = openvino.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "f32"})
    except ImportError:
        return Backend(name, str(path), None, load_error="openvino is not installed: pip "
                       "install 'flash-export[openvino]'")
    except Exception as exc:  # OpenVINO raises its own exception types at read and compile
        return Backend(name, str(path), None, load_error=one_line(exc))
    types = {p.any_name: p.get_element_type().get_type_name() for p in compiled.inputs}

    def run(inputs: Dict[str, torch.Tensor]) -> List[np.ndarray]:
        feed = _graph_feed(io, inputs,
                           lambda n: np.float16 if types.get(n) == "f16" else np.float32)
        try:
            results = compiled(feed)
        except Exception as exc:  # OpenVINO's own exception types
            raise _RunError(one_line(exc)) from exc
        return [np.asarray(results[o], dtype=np.float64) for o in compiled.outputs]

    return Backend(name, str(path), run)


def _graph_feed(io: IOSpec, inputs: Mapping[str, torch.Tensor],
                float_dtype: Callable[[str], Any]) -> Dict[str, np.ndarray]:
    """A case's inputs as a graph runtime takes them.

    Floats in the dtype `float_dtype(name)` gives; an attention mask the case leaves out is fed
    all True (which must equal no mask).
    """
    feed = {n: t.numpy().astype(float_dtype(n)) if t.is_floating_point() else t.numpy()
            for n, t in inputs.items()}
    sizes = _sizes_of(io, feed)
    for t in io.inputs:
        if t.name not in feed:
            feed[t.name] = np.ones(io.shape(t, sizes), dtype=np.bool_)
    return feed


def _sizes_of(io: IOSpec, feed: Mapping[str, Any]) -> Dict[str, int]:
    sizes: Dict[str, int] = {}
    for t in io.inputs:
        if t.name in feed:
            for d, n in zip(t.dims, feed[t.name].shape):
                if isinstance(d, str):
                    sizes.setdefault(d, int(n))
    return sizes


# --------------------------------------------------------------------------- the runner


def run_cases(model: Optional[nn.Module], io: IOSpec, backends: Sequence[Backend],
              cases: Sequence[Case], *, dtype: str, atol: Optional[float] = None,
              rtol: Optional[float] = None, progress: Optional[ProgressFn] = None,
              references: Optional[Tuple[nn.Module, nn.Module]] = None,
              compare_padded_rows: bool = True) -> Dict[str, BackendResult]:
    """Run every backend on every case against the float64 reference of `model`.

    The baseline of the tolerance rule is the same model with plain attention in `dtype` (the
    same for every caller: `validate`, `flash-export onnx`'s check and the tests).

    Args:
        model: the model the backends came from (None with `references`).
        io: its inputs and outputs.
        backends: what to compare.
        cases: the sizes, batches and mask modes to run.
        dtype: the precision the backends run in.
        atol: with `rtol`, replaces the 2x-baseline rule (`tolerance.compare`).
        rtol: see `atol`.
        progress: called as progress(done, total, label).
        references: (the float64 reference, the baseline in `dtype`) when `model` is None:
            models whose reference is not plain attention (transformers' eager, say).
        compare_padded_rows: False: the rows a padding input marks as padding are left out of
            every output whose first dims are that input's (batch, seq).

    Returns:
        One BackendResult per backend, by name, its cases (one per case and output) in order.
    """
    report = progress or (lambda done, total, label: None)
    results = {b.name: BackendResult(b.name, b.source, b.load_error) for b in backends}
    if references is not None:
        plain = references
    else:
        assert model is not None, "run_cases needs a model or its references"
        plain = (reference_model(model, torch.float64),
                 reference_model(model, getattr(torch, dtype)))
    for done, case in enumerate(cases):
        report(done, len(cases), case.label)
        _run_case(case, case_seed(done), plain, io, dtype, backends, results, atol, rtol,
                  compare_padded_rows)
    report(len(cases), len(cases), "done")
    return results


def _run_case(case: Case, seed: int, plain: Tuple[nn.Module, nn.Module], io: IOSpec,
              dtype_name: str, backends: Sequence[Backend], results: Dict[str, BackendResult],
              atol: Optional[float], rtol: Optional[float], padded_rows: bool = True) -> None:
    inputs = make_inputs(case, io, getattr(torch, dtype_name), seed)
    wide = {n: t.double() if t.is_floating_point() else t for n, t in inputs.items()}
    refs = [r.numpy() for r in call(plain[0], {**wide, **io.constants})]  # float64: the reference
    baselines = [b.double().numpy()  # the same, in the dtype
                 for b in call(plain[1], {**inputs, **io.constants})]
    names = list(io.outputs) if len(io.outputs) == len(refs) else \
        [f"output_{i}" for i in range(len(refs))]
    real = {} if padded_rows else _real_rows(io, inputs, names)
    refs = [_zero_padded(r, real.get(n)) for n, r in zip(names, refs)]
    baselines = [_zero_padded(b, real.get(n)) for n, b in zip(names, baselines)]
    for b in backends:
        if b.run is None:
            continue
        try:
            outs = b.run(inputs)
        except Exception as exc:  # a backend that cannot run a shape fails that case
            results[b.name].cases.append(CaseResult(case, names[0], error=one_line(exc)))
            continue
        if len(outs) != len(refs):
            results[b.name].cases.append(CaseResult(
                case, names[0], error=f"{len(outs)} outputs, expected {len(refs)}"))
            continue
        for name, out, ref, base in zip(names, outs, refs, baselines):
            out = _zero_padded(out, real.get(name)) if out.shape == ref.shape else out
            result = CaseResult(case, name)
            if out.shape != ref.shape:
                result.error = f"output shape {list(out.shape)}, expected {list(ref.shape)}"
            else:
                result.comparison = compare(out, ref, baseline_error=max_abs_error(base, ref),
                                            dtype=dtype_name, atol=atol, rtol=rtol)
            results[b.name].cases.append(result)


def _real_rows(io: IOSpec, inputs: Mapping[str, torch.Tensor],
               names: Sequence[str]) -> Dict[str, np.ndarray]:
    """Output name -> (B, L) bool of its real rows.

    For the outputs whose first dims are a padding input's (batch, seq), as the IOSpec records
    them.
    """
    real = {}
    for t in io.inputs:
        if t.role == "padding" and t.name in inputs:
            for name in names:
                if tuple(io.output_dims.get(name, ())[:2]) == tuple(t.dims):
                    real[name] = inputs[t.name].numpy().astype(bool)
    return real


def _zero_padded(values: np.ndarray, real: Optional[np.ndarray]) -> np.ndarray:
    """`values` (B, L, ...) with the rows `real` (B, L) marks False set to 0."""
    if real is None or values.shape[:2] != real.shape:
        return values
    return np.where(real.reshape(real.shape + (1,) * (values.ndim - 2)), values, 0.0)

"""The check `flash-export onnx` runs after writing a file: the ONNX graph against PyTorch."""

from pathlib import Path
from typing import Iterable, List, NamedTuple, Optional, Sequence, Union

from torch import nn

from flash_export.core.contract import EXPORT_DTYPES
from flash_export.core.errors import ValidationError
from flash_export.export.opsets import (  # noqa: F401  (default_opset, runtime_limits: public here too)
    choose_opset,
    default_opset,
    exporter_max_opset,
    ir_version_for,
    runtime_limits,
)
from flash_export.export.prepare import PathLike


class OnnxCheck(NamedTuple):
    """One size set checked by `check_onnx_export`; prints as one line for the CLI."""

    q_len: int
    k_len: int
    max_abs: float
    bound: float
    output: str = "output"
    shape: str = ""  # the sizes checked, e.g. "batch=2 q_len=17 k_len=23" or "batch=2 seq=65"

    def __str__(self) -> str:
        where = "" if self.output == "output" else f" ({self.output})"
        return f"{self.shape}{where}: max abs error {self.max_abs:.3g} <= bound {self.bound:.3g}"


# long: a public entry point whose docstring is a third of it; the body is 44 lines
def check_onnx_export(model: nn.Module, path: PathLike, *,
                      seq_lengths: Iterable[Union[int, Sequence[int]]] = ((17, 23), (65, 200)),
                      batch: int = 2, mask: Optional[bool] = None,
                      provider: str = "cpu") -> List[OnnxCheck]:
    """Run an exported file in onnxruntime against the float64 reference of `model`.

    The same case runner and rule as `flash-export validate` (`parity.run_cases`), on the inputs
    the file's IOSpec declares: seeded values, masks blocking ~25% of positions and the whole
    first query row of batch 0, padding masks padding each row; the baseline is the model with
    plain attention in the file's dtype.

    Args:
        model: the module `path` was exported from (float32 weights).
        path: the `.onnx` file.
        seq_lengths: (q_len, k_len) pairs, or ints meaning q_len == k_len; by default one pair
            seen at export (17, 23) and one not seen (65, 200). A model with one sequence size
            takes each pair's first length. Static dims override them.
        batch: batch size (a static batch overrides it).
        mask: feed masks; default: whether the file has a mask input.
        provider: onnxruntime execution provider, "cpu" or "cuda".

    Returns:
        One OnnxCheck (q_len, k_len, max_abs, bound, output) per size set and output.

    Raises:
        ValidationError: an output breaks the tolerance rule, or onnxruntime fails to load or
            run the file.
    """
    from flash_export.artifacts.recorded_io import recorded_io
    from flash_export.check.parity import onnx_backend, run_cases
    from flash_export.check.report import Case
    from flash_export.runtime.sessions import ort_session, session_inputs

    session = ort_session(path, provider=provider)
    meta = session.get_modelmeta().custom_metadata_map
    io = recorded_io(meta, path, session_inputs(session))
    dtype = next((t.dtype for t in io.inputs if t.dtype in EXPORT_DTYPES), "float32")
    masked = [t.name for t in io.inputs if t.role != "data"]
    use_mask = bool(masked) if mask is None else mask
    if use_mask and not masked:
        raise ValidationError(f"{path} has no mask input (export with mask=True)")
    cases = []
    for item in seq_lengths:
        lq, lk = (item, item) if isinstance(item, int) else (int(item[0]), int(item[1]))
        sizes = io.clamp({"batch": batch, "q_len": lq, "k_len": lk,
                          **{n: lq for n in io.dynamic if n not in ("batch", "q_len", "k_len")}})
        b = sizes.pop("batch", next((t.dims[0] for t in io.inputs
                                     if isinstance(t.dims[0], int)), batch))
        case = Case(int(b), tuple(sorted(sizes.items())), use_mask)
        if case not in cases:  # static dims (a ViT's) make every length the same case
            cases.append(case)
    target = meta.get("target", "onnx")
    backend = onnx_backend(target, Path(path), provider, io, session=session)
    if backend.load_error:
        raise ValidationError(f"{target}: {path}: {backend.load_error}")
    checks = []
    for r in run_cases(model, io, [backend], cases, dtype=dtype)[target].cases:
        sizes = dict(r.case.sizes)
        named = [f"q_len={sizes.pop('q_len')}", f"k_len={sizes.pop('k_len')}"] \
            if "q_len" in sizes and "k_len" in sizes else []
        shape = " ".join([f"batch={r.case.batch}", *named, *(f"{k}={v}" for k, v in
                                                              sizes.items())])
        where = "" if r.output == "output" else f" output {r.output}"
        if r.error or r.comparison is None:
            raise ValidationError(f"{target}: onnxruntime failed at {shape}{where}: {r.error}")
        c = r.comparison
        if not c.passed:
            raise ValidationError(
                f"{target} ONNX output differs from the float64 reference at {shape}{where} "
                f"({dtype}): max abs error {c.max_abs:.3g} > bound {c.bound:.3g} "
                f"(nonfinite {c.nonfinite}, worst at {list(c.worst_index)})")
        checks.append(OnnxCheck(r.case.seq_q, r.case.seq_k, c.max_abs, c.bound, r.output, shape))
    return checks

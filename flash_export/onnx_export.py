"""Export a FlashAttention model to ONNX for onnxruntime, and check the file against PyTorch.

The targets (how the attention is expressed; see `flash_export.onnx_targets`):

- ``custom`` (default): one ``com.flash_export::FlashAttention`` node (version 1), run by the
  native kernel library that `flash_export.runtime.create_session` registers.
- ``standard``: standard ONNX ops only, the chunk loop as an ONNX ``Loop``.
- ``contrib``: onnxruntime's ``com.microsoft::MultiHeadAttention`` (stock onnxruntime).
- ``attention23``: the ONNX ``Attention`` operator (opset >= 23, stock onnxruntime).
"""

import functools
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import onnx
import torch
from torch import Tensor, nn

from flash_export.artifact import atomic_write, sha256_file
from flash_export.attention import replace_attention
from flash_export.contract import DOMAIN, DOMAIN_VERSION, EXPORT_DTYPES, ORT_TYPES
from flash_export.errors import ExportError, ValidationError, summary
from flash_export.export import PathLike, artifact_metadata, flash_layers, spec_of
from flash_export.onnx_targets import TARGETS
from flash_export.spec import ModelSpec

INPUT_NAMES = ("values", "keys", "queries", "mask")
OUTPUT_NAME = "output"
# Initializer bytes above which weights go to an external data file beside the .onnx: protobuf
# cannot serialise a message over 2 GiB. Leaves 64 MiB for the graph itself; tests lower it.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
# Example lengths for tracing: distinct, >= 2 and Lq != Lk, so no dim is specialised or merged.
_EXAMPLE_BATCH, _EXAMPLE_LQ, _EXAMPLE_LK = 2, 17, 23


@functools.cache
def runtime_limits() -> Tuple[int, int]:
    """The highest (default-domain opset, IR version) the installed onnxruntime loads.

    Probed with a one-node model, so it follows whichever onnxruntime is installed.
    """
    import onnxruntime as ort

    def loads(opset: int, ir_version: int) -> bool:
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])],
                                       "probe", [x], [y])
        model = onnx.helper.make_model(graph, ir_version=ir_version,
                                       opset_imports=[onnx.helper.make_opsetid("", opset)])
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime reports an unsupported version as a generic failure
            return False
        return True

    ir = next((i for i in range(onnx.IR_VERSION, 3, -1) if loads(13, i)), 7)
    opset = next((o for o in range(onnx.defs.onnx_opset_version(), 12, -1) if loads(o, ir)), 17)
    return opset, ir


def exporter_max_opset() -> int:
    """The highest opset torch's exporter reliably converts its opset-18 graph to.

    torch.onnx delegates to onnxscript's version converter, which steps every op up to its own
    maximum; past it, it falls back to onnx's C converter, which lacks adapters for ops such as
    Gelu and then silently keeps opset 18.
    """
    try:
        from onnxscript.version_converter._version_converter import SUPPORTED_MAX_ONNX_OPSET
    except ImportError:  # a newer onnxscript moved it: trust torch's own constant
        from torch.onnx._constants import ONNX_MAX_OPSET as SUPPORTED_MAX_ONNX_OPSET
    return int(SUPPORTED_MAX_ONNX_OPSET)


def default_opset(target: str) -> int:
    """The opset `export_onnx` uses for `target` when none is given."""
    return max(TARGETS[target].min_opset, min(runtime_limits()[0], exporter_max_opset()))


def _ir_version_for(opset: int, proto_ir: int) -> int:
    """The IR version of the onnx release that introduced `opset`, capped at the runtime's."""
    needed = proto_ir
    for _release, ir, ai_opset, *_ in onnx.helper.VERSION_TABLE:
        if ai_opset >= opset:
            needed = max(needed, ir)
            break
    return min(needed, runtime_limits()[1])


def _choose_opset(target: str, opset: Optional[int]) -> int:
    low = TARGETS[target].min_opset
    high = min(runtime_limits()[0], exporter_max_opset())
    if opset is None:
        return default_opset(target)
    if not low <= opset <= high:
        raise ExportError(f"opset {opset} is not usable for target {target!r}: the target needs "
                          f">= {low}, the installed onnxruntime loads <= {runtime_limits()[0]} "
                          f"and the exporter converts to <= {exporter_max_opset()}")
    return opset


def _root_cause(exc: BaseException) -> BaseException:
    seen: Set[int] = set()
    while exc.__cause__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    return exc


def _used_names(graph: onnx.GraphProto) -> Set[str]:
    """Every value name a node of `graph` or of its subgraphs (Loop bodies) reads."""
    used: Set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                used |= _used_names(sub)
    used.update(o.name for o in graph.output)
    return used


def _check_graph(model: onnx.ModelProto, mask: bool) -> None:
    expected = list(INPUT_NAMES[:4 if mask else 3])
    names = [i.name for i in model.graph.input]
    if names != expected:
        raise ExportError(f"exported graph inputs are {names}, expected {expected}")
    unused = [n for n in names if n not in _used_names(model.graph)]
    if unused:
        raise ExportError(f"exported graph ignores its input(s) {unused}: the model's forward "
                          "must be (values, keys, queries, mask=None)")
    outputs = [o.name for o in model.graph.output]
    if outputs != [OUTPUT_NAME]:
        raise ExportError(f"exported graph outputs are {outputs}, expected [{OUTPUT_NAME!r}]")


def _export_program(model: nn.Module, args: Tuple[Tensor, ...], target: str, opset: int,
                    static_shapes: bool) -> onnx.ModelProto:
    dynamic_shapes: Optional[Tuple[Dict[int, Any], ...]] = None
    if not static_shapes:
        batch = torch.export.Dim("batch")
        q_len = torch.export.Dim("q_len")
        k_len = torch.export.Dim("k_len")
        dynamic_shapes = ({0: batch, 1: k_len}, {0: batch, 1: k_len}, {0: batch, 1: q_len},
                          {0: batch, 2: q_len, 3: k_len})[:len(args)]
    # Quiet the exporter's own chatter: "torchvision is not installed", and the version
    # converter announcing its fallback to the onnx C API (which then succeeds).
    loggers = [logging.getLogger(name) for name in
               ("torch.onnx._internal.exporter._registration", "onnxscript.version_converter")]
    old_levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # The exporter warns once per dim name it renames to itself.
            warnings.filterwarnings("ignore", message=r"# The axis name", category=UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            program = torch.onnx.export(
                model, args, dynamo=True, input_names=list(INPUT_NAMES[:len(args)]),
                output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes,
                custom_translation_table=TARGETS[target].translations,  # type: ignore[arg-type]
                opset_version=opset, verbose=False)
    except Exception as exc:  # the exporter raises many types; report the root cause in one line
        cause = _root_cause(exc)
        if isinstance(cause, ExportError):
            raise cause from exc
        raise ExportError(f"torch.onnx.export failed for target {target!r}: "
                          f"{summary(cause)}") from exc
    finally:
        for log, level in zip(loggers, old_levels):
            log.setLevel(level)
    if program is None:
        raise ExportError(f"torch.onnx.export returned no program for target {target!r}")
    return program.model_proto


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def _save_checked(model: onnx.ModelProto, tmp: Path) -> None:
    """Save `model` at `tmp` (with external data when large) and run the full checker on it.

    `tmp` already has the final file name (in `atomic_write`'s staging folder), so the graph's
    reference to its weights file stays valid after the move. The weights file is named after
    its content (`model.onnx.<sha256[:16]>.data`) and the graph pins its SHA-256 in metadata
    (`safety.EXTERNAL_DATA_KEY`): a new export never overwrites the data an existing graph uses,
    and a graph never loads beside data it was not exported with.
    """
    if _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        from flash_export.safety import EXTERNAL_DATA_KEY

        provisional = tmp.name + ".data"
        # Small tensors stay inline: shape inference must read shape constants from the graph.
        try:
            onnx.save_model(model, str(tmp), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=provisional)
        except onnx.checker.ValidationError as exc:  # onnx refuses e.g. ".." in the data name
            raise ExportError(f"cannot save external data as {provisional!r}: "
                              f"{summary(exc)}; choose a file name without '..'") from exc
        digest = sha256_file(tmp.parent / provisional)
        final = f"{tmp.name}.{digest[:16]}.data"
        os.replace(tmp.parent / provisional, tmp.parent / final)
        graph = onnx.load(str(tmp), load_external_data=False)
        for tensor in onnx.external_data_helper._get_all_tensors(graph):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = final
        graph.metadata_props.add(key=EXTERNAL_DATA_KEY, value=json.dumps({final: digest}))
        onnx.save_model(graph, str(tmp))
    else:
        onnx.save_model(model, str(tmp))
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"exported model fails onnx.checker: {summary(exc)}") from exc


def _our_data_files(target: Path) -> List[Path]:
    """The data files an existing export at `target` uses, which a new export may replace.

    Only files this exporter names (`<target>.data`, `<target>.<hash>.data`) beside `target`;
    anything else the old graph references is left alone.
    """
    if not target.is_file():
        return []
    try:
        graph = onnx.load(str(target), load_external_data=False)
    except Exception:  # not a readable graph: nothing of ours to clean up
        return []
    names = {e.value for t in onnx.external_data_helper._get_all_tensors(graph)
             for e in t.external_data if e.key == "location"}
    return [target.parent / n for n in sorted(names)
            if n == f"{target.name}.data" or (n.startswith(f"{target.name}.")
                                               and n.endswith(".data") and "/" not in n)]


def _example_args(embed: int, dtype: torch.dtype, mask: bool) -> Tuple[Tensor, ...]:
    """(values, keys, queries[, mask]) to trace with: distinct sizes, so no dim is merged."""
    gen = torch.Generator().manual_seed(0)
    b, lq, lk = _EXAMPLE_BATCH, _EXAMPLE_LQ, _EXAMPLE_LK
    args: Tuple[Tensor, ...] = (torch.randn(b, lk, embed, generator=gen, dtype=dtype),  # values
                                torch.randn(b, lk, embed, generator=gen, dtype=dtype),  # keys
                                torch.randn(b, lq, embed, generator=gen, dtype=dtype))  # queries
    if mask:
        args += (torch.rand(b, 1, lq, lk, generator=gen) > 0.2,)  # (B, 1, Lq, Lk)
    return args


def export_onnx(model: nn.Module, path: PathLike, *, target: str = "custom",
                opset: Optional[int] = None, dtype: Optional[str] = None,
                spec: Optional[ModelSpec] = None, static_shapes: bool = False,
                mask: bool = False) -> Path:
    """Export `model` to an ONNX file that onnxruntime runs.

    Graph inputs: ``values`` (batch, k_len, E), ``keys`` (batch, k_len, E), ``queries``
    (batch, q_len, E) in the export dtype and, with ``mask=True``, ``mask``: bool
    (batch, 1, q_len, k_len), True where a query may attend to a key (a row with no True key gives
    zeros). Output: ``output`` (batch, q_len, E). batch, q_len and k_len are dynamic unless
    `static_shapes`. The file carries flash-export metadata_props (versions, spec, target,
    domain, dtype).

    Args:
        model: a FlashAttention or a module built from FlashAttention layers whose forward is
            (values, keys, queries, mask=None) -> (B, Lq, E). It is not modified.
        path: the `.onnx` file to write (atomically). Models whose weights pass ~2 GB also write
            `<path>.data` beside it.
        target: "custom", "standard", "contrib" or "attention23" (see the module docstring).
        opset: default-domain opset; default the highest both the installed onnxruntime loads
            and the exporter converts to (`default_opset`).
        dtype: None or "float32" (float32), or "float16" (model and inputs in half).
        spec: how to rebuild `model`; read off `model` when it is a plain FlashAttention.
        static_shapes: fix batch and lengths at the example sizes (batch 2, q_len 17, k_len 23).
        mask: add the ``mask`` input.

    Returns:
        The written path.

    Raises:
        ExportError: a bad option, a model the exporter cannot convert, a graph that fails the
            checks, or a file that cannot be written.
    """
    if target not in TARGETS:
        raise ExportError(f"unknown ONNX target {target!r}; choose one of {sorted(TARGETS)}")
    dtype_name = "float32" if dtype is None else dtype
    if dtype_name not in EXPORT_DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r}; choose one of {list(EXPORT_DTYPES)}")
    torch_dtype = getattr(torch, dtype_name)
    opset = _choose_opset(target, opset)
    meta = artifact_metadata(spec_of(model, spec), artifact="onnx", target=target,
                             domain=DOMAIN, domain_version=str(DOMAIN_VERSION),
                             dtype=dtype_name)
    embed = flash_layers(model)[0].embed_size
    adapted = replace_attention(model, TARGETS[target].adapter).to(torch_dtype).eval()

    proto = _export_program(adapted, _example_args(embed, torch_dtype, mask), target, opset,
                            static_shapes)

    got = {o.domain or "": o.version for o in proto.opset_import}
    if got.get("") != opset:
        raise ExportError(f"the exporter could not convert the graph to opset {opset} (it kept "
                          f"{got.get('')}); pass a lower opset=")
    rewrite = TARGETS[target].rewrite
    if rewrite is not None:
        rewrite(proto)
    _check_graph(proto, mask)
    proto.ir_version = _ir_version_for(opset, proto.ir_version)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)

    try:
        return atomic_write(path, lambda tmp: _save_checked(proto, tmp),
                            stale=_our_data_files(Path(path)))
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc}") from exc


class OnnxCheck(NamedTuple):
    """One length pair checked by `check_onnx_export`; prints as one line for the CLI."""

    q_len: int
    k_len: int
    max_abs: float
    bound: float

    def __str__(self) -> str:
        return (f"q_len={self.q_len} k_len={self.k_len}: max abs error {self.max_abs:.3g} "
                f"<= bound {self.bound:.3g}")


def _length_pairs(seq_lengths: Iterable[Union[int, Sequence[int]]]) -> List[Tuple[int, int]]:
    pairs = []
    for item in seq_lengths:
        if isinstance(item, int):
            pairs.append((item, item))
        else:
            lq, lk = item
            pairs.append((int(lq), int(lk)))
    return pairs


def check_onnx_export(model: nn.Module, path: PathLike, *,
                      seq_lengths: Iterable[Union[int, Sequence[int]]] = ((17, 23), (65, 200)),
                      batch: int = 2, mask: Optional[bool] = None,
                      provider: str = "cpu") -> List[OnnxCheck]:
    """Run an exported file in onnxruntime against the float64 reference of `model`.

    The same case runner and rule as `flash-export validate` (`parity.run_cases`): seeded inputs,
    a mask (when used) blocking ~25% of positions and the whole first query row of batch 0, the
    baseline being PyTorch's own plain attention in the file's dtype.

    Args:
        model: the module `path` was exported from (float32 weights).
        path: the `.onnx` file.
        seq_lengths: (q_len, k_len) pairs, or ints meaning q_len == k_len; by default one pair
            seen at export (17, 23) and one not seen (65, 200). Static dims override them.
        batch: batch size (a static batch overrides it).
        mask: feed a mask; default: whether the file has a ``mask`` input.
        provider: onnxruntime execution provider, "cpu" or "cuda".

    Returns:
        One OnnxCheck (q_len, k_len, max_abs, bound) per length pair.

    Raises:
        ValidationError: an output breaks the tolerance rule, or onnxruntime fails to load or
            run the file.
    """
    from flash_export.parity import Case, onnx_backend, run_cases
    from flash_export.runtime import ort_session

    session = ort_session(path, provider=provider)
    inputs = {i.name: i for i in session.get_inputs()}
    dtype_name = ORT_TYPES.get(inputs["queries"].type, "") if "queries" in inputs else ""
    if dtype_name not in EXPORT_DTYPES:
        raise ValidationError(f"{path}: unsupported or missing queries input")
    use_mask = "mask" in inputs if mask is None else mask
    if use_mask and "mask" not in inputs:
        raise ValidationError(f"{path} has no mask input (export with mask=True)")

    def fixed(name: str, axis: int, default: int) -> int:  # a static dim overrides the default
        dim = inputs[name].shape[axis]
        return dim if isinstance(dim, int) else default

    cases = [Case(fixed("queries", 0, batch), fixed("queries", 1, lq), fixed("keys", 1, lk),
                  use_mask) for lq, lk in _length_pairs(seq_lengths)]
    target = session.get_modelmeta().custom_metadata_map.get("target", "onnx")
    backend = onnx_backend(target, Path(path), provider, session=session)
    if backend.load_error:
        raise ValidationError(f"{target}: {path}: {backend.load_error}")
    result = run_cases(model, [backend], cases, embed=fixed("queries", 2, 0),
                       dtype=dtype_name)[target]
    checks = []
    for r in result.cases:
        shape = f"batch={r.case.batch} q_len={r.case.seq_q} k_len={r.case.seq_k}"
        if r.error or r.comparison is None:
            raise ValidationError(f"{target}: onnxruntime failed at {shape}: {r.error}")
        c = r.comparison
        if not c.passed:
            raise ValidationError(
                f"{target} ONNX output differs from the float64 reference at {shape} "
                f"({dtype_name}): max abs error {c.max_abs:.3g} > bound {c.bound:.3g} "
                f"(nonfinite {c.nonfinite}, worst at {list(c.worst_index)})")
        checks.append(OnnxCheck(r.case.seq_q, r.case.seq_k, c.max_abs, c.bound))
    return checks

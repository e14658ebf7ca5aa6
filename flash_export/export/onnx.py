"""Export a FlashAttention model to ONNX for onnxruntime, and check the file against PyTorch.

The targets (how the attention is expressed; see `flash_export.export.onnx_targets`):

- ``custom`` (default): one ``com.flash_export::FlashAttention`` node (version 1), run by the
  native kernel library that `flash_export.runtime.create_session` registers.
- ``standard``: standard ONNX ops only, the chunk loop as an ONNX ``Loop``.
- ``contrib``: onnxruntime's ``com.microsoft::MultiHeadAttention`` (stock onnxruntime).
- ``attention23``: the ONNX ``Attention`` operator (opset >= 23, stock onnxruntime).
"""

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

import onnx
import torch
from torch import nn

from flash_export.artifacts.files import sha256_file
from flash_export.artifacts.kinds import require_kind
from flash_export.artifacts.manifest import atomic_write
from flash_export.core.contract import DOMAIN, DOMAIN_VERSION, EXPORT_DTYPES
from flash_export.core.errors import ExportError, summary
from flash_export.core.io_graph import with_graph_outputs
from flash_export.core.io_spec import IOSpec
from flash_export.export.onnx_targets import TARGETS
from flash_export.export.opsets import (  # noqa: F401  (default_opset, runtime_limits: public here too)
    choose_opset,
    default_opset,
    exporter_max_opset,
    ir_version_for,
    runtime_limits,
)
from flash_export.export.prepare import PathLike, flash_layers, prepare
from flash_export.nn.model_io import CONTRACT_INPUTS, dynamic_shapes
from flash_export.nn.spec import ModelSpec
from flash_export.nn.swap import replace_attention

# Initializer bytes above which weights go to an external data file beside the .onnx: protobuf
# cannot serialise a message over 2 GiB. Leaves 64 MiB for the graph itself; tests lower it.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2


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


def _check_graph(model: onnx.ModelProto, io: IOSpec) -> None:
    """Check the graph against `io`: its inputs, each used, each declared dim dynamic, outputs.

    Raises:
        ExportError: naming the input, dim or output that differs.
    """
    expected = [t.name for t in io.inputs]
    names = [i.name for i in model.graph.input]
    if names != expected:
        raise ExportError(f"exported graph inputs are {names}, expected {expected}")
    unused = [n for n in names if n not in _used_names(model.graph)]
    if unused and names[:3] == list(CONTRACT_INPUTS):  # other models may ignore an input, e.g. a
        # causal mask that is_causal=True makes redundant
        raise ExportError(f"exported graph ignores its input(s) {unused}: the model's forward "
                          "does not use them (a FlashAttention whose forward is (values, keys, "
                          "queries, mask=None) needs all three; wrap a self-attention layer in a "
                          "module that takes one input)")
    for value, t in zip(model.graph.input, io.inputs):
        dims = value.type.tensor_type.shape.dim
        for axis, (want, got) in enumerate(zip(t.dims, dims)):
            if isinstance(want, str) and not io.is_static(want) and got.HasField("dim_value"):
                raise ExportError(f"the model specialises input {t.name!r} dim {axis} ({want}) "
                                  f"to {got.dim_value}: something in its forward depends on that "
                                  "size (a fixed-size parameter or slice, say); make it dynamic "
                                  "or declare the dim static in io=")
    outputs = [o.name for o in model.graph.output]
    if outputs != list(io.outputs):
        raise ExportError(f"exported graph outputs are {outputs}, expected {list(io.outputs)}")


def _export_program(model: nn.Module, example: Dict[str, Any], io: IOSpec, target: str,
                    opset: int, static_shapes: bool,
                    dynamic: Optional[Mapping[str, Any]] = None) -> onnx.ModelProto:
    if dynamic is None and not static_shapes:
        dynamic = {**dynamic_shapes(io), **{n: None for n in io.constants}}
    # Quiet the exporter's own chatter: "torchvision is not installed", and the version
    # converter announcing its fallback to the onnx C API (which then succeeds).
    loggers = [logging.getLogger(name) for name in
               ("torch.onnx._internal.exporter._registration", "onnxscript.version_converter")]
    old_levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # The exporter warns once per dim name it renames to itself, and does not rename
            # dims when the model takes constants (`_name_dims` does it then).
            warnings.filterwarnings("ignore", message=r"# The axis name", category=UserWarning)
            warnings.filterwarnings("ignore", message=r"# ONNX model has different number of "
                                    "inputs", category=UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            program = torch.onnx.export(
                model, (), kwargs={**example, **io.constants}, dynamo=True,
                input_names=[t.name for t in io.inputs], output_names=list(io.outputs),
                dynamic_shapes=None if dynamic is None else dict(dynamic),
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
    return _name_dims(program.model_proto, io)


def _name_dims(model: onnx.ModelProto, io: IOSpec) -> onnx.ModelProto:
    """Give the graph's symbolic dims the IOSpec's size names, everywhere they appear."""
    renames: Dict[str, str] = {}
    for value, t in zip(model.graph.input, io.inputs):
        for got, want in zip(value.type.tensor_type.shape.dim, t.dims):
            if isinstance(want, str) and got.dim_param and got.dim_param != want:
                renames.setdefault(got.dim_param, want)
    if renames:
        values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
        for value in values:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param in renames:
                    dim.dim_param = renames[dim.dim_param]
    return model


def _with_output_dims(model: onnx.ModelProto, io: IOSpec) -> IOSpec:
    """`io` with its outputs' dims as the graph's symbolic shapes give them (see `IOSpec`).

    They bound an answer's size before a run, and tell on which axis of each output the
    declared batch comes back (`IOSpec.batch_axes`).

    Raises:
        ExportError: the model's own io_spec() declares output dims the graph contradicts.
    """
    def described(values: Any) -> List[Any]:
        return [(v.name, None, [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                                for d in v.type.tensor_type.shape.dim]) for v in values]

    try:
        return with_graph_outputs(io, described(model.graph.input), described(model.graph.output))
    except ValueError as exc:
        raise ExportError(f"the exported graph does not match the model's IOSpec: {exc}") from exc


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
        from flash_export.artifacts.external_data import EXTERNAL_DATA_KEY

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


# long: a public entry point whose docstring is half of it; the body is 41 lines
def export_onnx(model: nn.Module, path: PathLike, *, target: str = "custom",
                opset: Optional[int] = None, dtype: Optional[str] = None,
                spec: Optional[ModelSpec] = None, static_shapes: bool = False,
                mask: bool = False, io: Optional[IOSpec] = None,
                args: Optional[Sequence[Any]] = None,
                kwargs: Optional[Mapping[str, Any]] = None) -> Path:
    """Export `model` to an ONNX file that onnxruntime runs.

    Graph inputs are the model's forward parameters, by name, and outputs are named after what
    it returns (``output``; ``output_0``, ...; or a returned dict's keys), all as its IOSpec
    says (`model_io.resolve_io`: `io`, the model's own io_spec(), the example inputs, or the
    attention contract). Declared dynamic dims stay dynamic unless `static_shapes`. For the
    attention contract (a FlashAttention, or a forward (values, keys, queries, mask=None)) the
    inputs are ``values`` (batch, k_len, E), ``keys`` (batch, k_len, E), ``queries``
    (batch, q_len, E) and, with ``mask=True``, ``mask``: bool (batch, 1, q_len, k_len), True where
    a query may attend to a key; the output is ``output`` (batch, q_len, E). The file carries
    flash-export metadata_props (versions, spec, IOSpec, target, domain, dtype).

    Args:
        model: any module built with FlashAttention layers. It is not modified.
        path: the `.onnx` file to write (atomically). Models whose weights pass ~2 GB also write
            a data file beside it.
        target: "custom", "standard", "contrib" or "attention23" (see the module docstring).
        opset: default-domain opset; default the highest both the installed onnxruntime loads
            and the exporter converts to (`default_opset`).
        dtype: None or "float32" (float32), or "float16" (model and float inputs in half).
        spec: how to rebuild `model`; read off `model` when it is a plain FlashAttention.
        static_shapes: fix every dynamic dim at the example sizes (batch 2, q_len or seq 17,
            k_len 23, others 19, 29, ...).
        mask: the attention contract only: add the ``mask`` input.
        io: the model's inputs and outputs, when neither the model nor the examples say.
        args: example positional inputs, as `torch.export` takes them.
        kwargs: example keyword inputs.

    Returns:
        The written path.

    Raises:
        ExportError: a bad option, a `path` not ending in .onnx, a model the exporter cannot
            convert, a graph that fails the checks, or a file that cannot be written.
    """
    require_kind(path, "onnx")
    if target not in TARGETS:
        raise ExportError(f"unknown ONNX target {target!r}; choose one of {sorted(TARGETS)}")
    dtype_name = "float32" if dtype is None else dtype
    if dtype_name not in EXPORT_DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r}; choose one of {list(EXPORT_DTYPES)}")
    torch_dtype = getattr(torch, dtype_name)
    opset = choose_opset(target, opset)
    flash_layers(model)
    adapted = replace_attention(model, TARGETS[target].adapter).to(torch_dtype).eval()
    prepared = prepare(model, adapted, spec=spec, io=io, args=args, kwargs=kwargs, mask=mask,
                       dtype=dtype_name, artifact="onnx", target=target, domain=DOMAIN,
                       domain_version=str(DOMAIN_VERSION))
    io_spec = prepared.io
    if static_shapes:
        io_spec = io_spec.fixed({n: int(prepared.example[t.name].shape[a])
                                 for t in io_spec.inputs for a, n in enumerate(t.dims)
                                 if isinstance(n, str) and t.name in prepared.example})
        prepared.meta["io_spec"] = io_spec.to_json()
    return write_graph(adapted, path, example=prepared.example, io=io_spec, meta=prepared.meta,
                       target=target, opset=opset, static_shapes=static_shapes)


def write_graph(runnable: nn.Module, path: PathLike, *, example: Mapping[str, Any],
                io: IOSpec, meta: Mapping[str, str], target: str, opset: int,
                static_shapes: bool = False,
                dynamic: Optional[Mapping[str, Any]] = None) -> Path:
    """Export `runnable(**example)` as `io` declares, check the graph, write it with `meta`.

    What every ONNX export shares once its model, inputs and metadata are prepared: the
    exporter with the target's translations, the opset, the target's rewrite, the graph checks
    (inputs, dynamic dims, outputs), the outputs' dims recorded into the IOSpec (`meta`'s
    "io_spec" is replaced), and the atomic, checked write. `example` may hold a list of
    tensors for one argument (flattened into consecutive graph inputs, named in `io`'s order);
    `dynamic` then gives the exporter's dynamic shapes in the same structure (default: one
    per input of `io`, by name).

    Raises:
        ExportError: the exporter fails, the graph does not match `io`, or `path` cannot be
            written.
    """
    proto = _export_program(runnable, dict(example), io, target, opset, static_shapes, dynamic)
    got = {o.domain or "": o.version for o in proto.opset_import}
    if got.get("") != opset:
        raise ExportError(f"the exporter could not convert the graph to opset {opset} (it kept "
                          f"{got.get('')}); pass a lower opset=")
    rewrite = TARGETS[target].rewrite
    if rewrite is not None:
        rewrite(proto)
    _check_graph(proto, io)
    io = _with_output_dims(proto, io)
    proto.ir_version = ir_version_for(opset, proto.ir_version)
    del proto.metadata_props[:]
    for key, value in {**meta, "io_spec": io.to_json()}.items():
        proto.metadata_props.add(key=key, value=value)

    try:
        return atomic_write(path, lambda tmp: _save_checked(proto, tmp),
                            stale=_our_data_files(Path(path)))
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc}") from exc

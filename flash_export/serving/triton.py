"""`flash-export triton`: a Triton Inference Server model repository for an exported graph.

    REPO/NAME/config.pbtxt          platform onnxruntime_onnx, inputs/outputs, batching,
                                    instance groups, model_operations naming our library
    REPO/NAME/1/model.onnx          the graph (with its external data file, same name as before)
    REPO/NAME/libflash_export.so    the native library, when the graph uses com.flash_export

Triton's onnxruntime backend hands `op_library_filename` to onnxruntime's
RegisterCustomOpsLibrary (dlopen) as it is, so the config holds the library's absolute path as
the server sees it: REPO's own path, or `server_repo` when Triton sees the repository elsewhere
(a container's /models). Imports no torch and no onnxruntime; nothing here runs Triton.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, List, Optional, Sequence, Set, Tuple, Union

from flash_export.core.contract import DOMAIN, ONNX_ELEM
from flash_export.core.errors import ArtifactError, ExportError
from flash_export.core.io_graph import GraphInput
from flash_export.core.io_spec import IOSpec
from flash_export.runtime.library import library_path
from flash_export.serving.artifact import model_name, require_onnx_graph

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64",
                "int64": "TYPE_INT64", "int32": "TYPE_INT32", "bool": "TYPE_BOOL"}
DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class TritonConfig:
    """How Triton should run the graph.

    Attributes:
        name: the model's name in the repository; None: the artifact's file stem.
        max_batch_size: Triton's max_batch_size when the IOSpec declares a per-request batch
            at axis 0 of every input and output (0 turns batching off; it is off anyway
            otherwise: Triton joins requests along axis 0).
        queue_delay_us: dynamic batching's max_queue_delay_microseconds.
        device: "cpu" (KIND_CPU) or "gpu" (KIND_GPU: onnxruntime's CUDA provider, and our
            library's CUDA kernels when it was built with nvcc).
        instances: model instances per device.
        server_repo: where Triton sees the repository (the library path in config.pbtxt is
            built from it); None: the repository's absolute path here.
    """

    name: Optional[str] = None
    max_batch_size: int = 8
    queue_delay_us: int = 1000
    device: str = "cpu"
    instances: int = 1
    server_repo: Optional[str] = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 0 or self.queue_delay_us < 0 or self.instances < 1 \
                or self.device not in DEVICES:
            raise ValueError(f"invalid Triton settings: {self}")
        if self.server_repo is not None and not self.server_repo.startswith("/"):
            raise ValueError(f"server_repo must be an absolute path, got {self.server_repo!r}")


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str
    dims: Tuple[int, ...]  # -1 where dynamic


# long: writes one repository top to bottom (model file, data, config) in the order Triton reads it
def write_repository(artifact: Union[str, os.PathLike], repo: Union[str, os.PathLike],
                     config: TritonConfig = TritonConfig()) -> Path:
    """Write a Triton model repository entry for an exported .onnx file.

    Args:
        artifact: the exported .onnx file.
        repo: the repository folder (created if missing); REPO/NAME must not exist yet.
        config: Triton settings.

    Returns:
        The config.pbtxt written.

    The entry is written into a hidden folder beside REPO/NAME and renamed into place, so a
    failure (a full disk, say) leaves nothing under REPO/NAME and a rerun starts afresh.

    Raises:
        ArtifactError: the file is not an ONNX graph (a TorchScript archive, say), fails the
            checks every load runs, or has an input or output of a type Triton's onnxruntime
            backend cannot carry.
        ExportError: REPO/NAME exists (a dangling symlink too), the native library is missing,
            or the repository cannot be written (one line naming the path and the reason).
        ValueError: a bad model name.
    """
    from flash_export.artifacts.external_data import check_external_location, model_tensors
    from flash_export.artifacts.recorded_io import recorded_io
    from flash_export.artifacts.safety import check_onnx_file

    source = Path(artifact)
    name = model_name(source, config.name)
    require_onnx_graph(source, "triton")
    model = check_onnx_file(source)
    meta = {p.key: p.value for p in model.metadata_props}
    initializers = {i.name for i in model.graph.initializer}
    inputs = [_tensor(v, source) for v in model.graph.input if v.name not in initializers]
    outputs = [_tensor(v, source) for v in model.graph.output]
    io = recorded_io(meta, source, _described(model.graph.input, initializers),
                     _described(model.graph.output, set()))
    needs_library = DOMAIN in {o.domain for o in model.opset_import}
    library = Path(library_path())
    if needs_library and not library.is_file():
        raise ExportError(f"native library not found at {library}; the graph needs it")
    # The graph names each data file by a location relative to itself (a subfolder too): the
    # copy goes to the same location relative to 1/model.onnx.
    locations = sorted({next(e.value for e in t.external_data if e.key == "location")
                        for t in model_tensors(model) if t.data_location == 1})
    data_files = {location: check_external_location(location, source.parent.resolve(),
                                                    str(source)) for location in locations}

    folder = Path(repo) / name
    if os.path.lexists(folder):
        raise ExportError(f"{folder} exists; choose another REPO_DIR or --name")
    served = Path(config.server_repo or Path(repo).resolve()) / name
    text = config_text(name, io, inputs, outputs, config,
                       str(served / library.name) if needs_library else None)
    staging = None
    try:
        Path(repo).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=repo))
        (staging / "1").mkdir()
        shutil.copyfile(source, staging / "1" / "model.onnx")
        for location, data in data_files.items():
            target = staging / "1" / PurePosixPath(location)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data, target)
        if needs_library:
            shutil.copyfile(library, staging / library.name)
        (staging / "config.pbtxt").write_text(text)
        os.chmod(staging, 0o755)  # mkdtemp's 0o700 would hide the model from Triton's user
        if os.path.lexists(folder):  # appeared meanwhile: never replace it
            raise ExportError(f"{folder} exists; choose another REPO_DIR or --name")
        os.rename(staging, folder)
        staging = None
    except OSError as exc:
        raise ExportError(f"cannot write the repository entry {folder}: "
                          f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}"
                          ) from exc
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return folder / "config.pbtxt"


def config_text(name: str, io: IOSpec, inputs: Sequence[_Tensor], outputs: Sequence[_Tensor],
                config: TritonConfig, library: Optional[str]) -> str:
    """config.pbtxt in protobuf text format (Triton's ModelConfig)."""
    batch = _batch_name(io) if config.max_batch_size else None
    strip = 1 if batch is not None else 0
    lines = [f"name: {_quote(name)}", 'platform: "onnxruntime_onnx"',
             f"max_batch_size: {config.max_batch_size if batch is not None else 0}"]
    for field, tensors in (("input", inputs), ("output", outputs)):
        for t in tensors:
            dims = ", ".join(str(d) for d in t.dims[strip:])
            lines.append(f"{field} {{ name: {_quote(t.name)} data_type: {TRITON_TYPES[t.dtype]} "
                         f"dims: [ {dims} ] }}")
    if batch is not None:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: "
                     f"{config.queue_delay_us} }}")
    kind = "KIND_GPU" if config.device == "gpu" else "KIND_CPU"
    lines.append(f"instance_group [ {{ count: {config.instances} kind: {kind} }} ]")
    if library is not None:
        lines.append(f"model_operations {{ op_library_filename: [ {_quote(library)} ] }}")
    return "\n".join(lines) + "\n"


def _described(values: Any, skip: Set[str]) -> List[GraphInput]:
    """(name, None, dims) of graph inputs or outputs, symbolic dims by name (see `GraphInput`)."""
    return [(v.name, ONNX_ELEM.get(v.type.tensor_type.elem_type),
             [d.dim_value if d.HasField("dim_value") else d.dim_param or None
              for d in v.type.tensor_type.shape.dim]) for v in values if v.name not in skip]


def _tensor(value: Any, source: Path) -> _Tensor:
    kind = value.type.WhichOneof("value")
    dtype = ONNX_ELEM.get(value.type.tensor_type.elem_type) if kind == "tensor_type" else None
    if dtype not in TRITON_TYPES:
        raise ArtifactError(f"{source}: {value.name} is not a tensor of a type Triton's "
                            f"onnxruntime backend takes here ({', '.join(TRITON_TYPES)})")
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1
                 for d in value.type.tensor_type.shape.dim)
    return _Tensor(value.name, dtype, dims)


def _batch_name(io: IOSpec) -> Optional[str]:
    """The declared per-request batch, when it is axis 0 of every input and output.

    Triton's dynamic batcher joins requests along axis 0 of every tensor; anything else (a
    (L, B, E) tensor, no declared batch) is served with max_batch_size 0.
    """
    axes = io.batch_axes()
    if axes is None or any(axis != 0 for axis in axes.values()):
        return None
    return io.batch


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def server_command(repo: Union[str, os.PathLike], config: TritonConfig) -> List[str]:
    """The `tritonserver` command line that loads the repository (as Triton sees it)."""
    return ["tritonserver", f"--model-repository={config.server_repo or Path(repo).resolve()}"]

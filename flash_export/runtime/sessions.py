"""Find the native kernel library and build onnxruntime sessions. Imports no torch.

An onnxruntime service needs only onnxruntime, numpy, onnx (for the checks `create_session` runs
on a file before onnxruntime opens it) and this module:

    session = create_session("model.onnx", intra_op_num_threads=4)
    (output,) = session.run(["output"], {"values": v, "keys": k, "queries": q})
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Tuple, Union

from flash_export.core.contract import DOMAIN as LIBRARY_DOMAIN
from flash_export.core.errors import ArtifactError, RuntimeLibraryError, first_line, summary
from flash_export.runtime.library import _BUILD_HINT, library_path

if TYPE_CHECKING:
    import onnxruntime

    from flash_export.core.io_spec import IOSpec


def _enum(value: Any, enum_type: Any, prefix: str) -> Any:
    """Accept an onnxruntime enum member, its int value or its name without `prefix`."""
    if isinstance(value, str):
        name = prefix + value.upper()
        if not hasattr(enum_type, name):
            choices = sorted(n[len(prefix):].lower() for n in dir(enum_type)
                             if n.startswith(prefix))
            raise ValueError(f"unknown {prefix.rstrip('_').lower()} {value!r}; choose {choices}")
        return getattr(enum_type, name)
    if isinstance(value, int) and not isinstance(value, enum_type):
        return enum_type(value)
    return value


def session_options(**options: Any) -> onnxruntime.SessionOptions:
    """Build `onnxruntime.SessionOptions` from keyword arguments.

    Every keyword is a SessionOptions attribute (intra_op_num_threads, inter_op_num_threads,
    graph_optimization_level, execution_mode, log_severity_level, enable_profiling, ...).
    `graph_optimization_level` also takes "disable_all", "enable_basic", "enable_extended",
    "enable_all" or an int; `execution_mode` takes "sequential" or "parallel".
    `config_entries` takes a dict of session config keys (add_session_config_entry), e.g.
    {"session.intra_op.allow_spinning": "0"}.

    Raises:
        RuntimeLibraryError: onnxruntime is not installed.
        TypeError: an option SessionOptions does not have.
        ValueError: an enum option with an unknown name.
    """
    ort = _onnxruntime()
    so = ort.SessionOptions()
    for key, value in options.items():
        if key == "config_entries":
            for entry, setting in dict(value).items():
                so.add_session_config_entry(str(entry), str(setting))
            continue
        if key.startswith("_") or not hasattr(so, key) or callable(getattr(so, key)):
            raise TypeError(f"unknown session option {key!r}")
        if key == "graph_optimization_level":
            value = _enum(value, ort.GraphOptimizationLevel, "ORT_")
        elif key == "execution_mode":
            value = _enum(value, ort.ExecutionMode, "ORT_")
        setattr(so, key, value)
    return so


def register_library(so: onnxruntime.SessionOptions,
                     path: Optional[Union[str, os.PathLike[str]]] = None) -> Path:
    """Register the native kernel library (default `library_path()`) into `so`.

    Raises:
        RuntimeLibraryError: the library is missing or onnxruntime cannot register it.
    """
    lib = Path(path if path is not None else library_path())
    if not lib.is_file():
        raise RuntimeLibraryError(f"native library not found at {lib}: {_BUILD_HINT}")
    try:
        so.register_custom_ops_library(str(lib))
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        raise RuntimeLibraryError(f"onnxruntime cannot register {lib}: {first_line(exc)} (was "
                                  "it built against this onnxruntime? rebuild it)") from exc
    return lib


def model_domains(path: Union[str, os.PathLike[str]]) -> Set[str]:
    """The operator domains `path` imports ("" is the default domain).

    Reads only the graph, after the same safety checks as `create_session` (external data is
    checked, never parsed).

    Raises:
        ArtifactError: the file is missing, is not ONNX, references external data unsafely or
            has a malformed com.flash_export node.
    """
    with _opened(path) as opened:
        return _domains(opened.model)


def _domains(model: Any) -> Set[str]:
    return {o.domain or "" for o in model.opset_import}


def create_session(path: Union[str, os.PathLike[str]], providers: Optional[Sequence[str]] = None,
                   **options: Any) -> onnxruntime.InferenceSession:
    """Create an onnxruntime session for an exported file.

    The native library is registered only when the model uses the `com.flash_export` domain, so
    files of the standard, contrib and attention23 targets run on stock onnxruntime.

    The file and its external data are opened once and checked
    (`flash_export.artifacts.safety.open_onnx`), and onnxruntime gets those same bytes: the graph
    from memory, the data from read-only mappings of the descriptors that were hashed. It never
    opens a file by name, so a data file renamed over the original while the session loads is never
    read; a write into the data file itself after it was opened makes the load fail. Cost:
    onnxruntime copies the initializers out of the mappings (as it does when it prepacks them), so
    the data file's size is held twice until the session is built (once in the page cache).

    Args:
        path: the `.onnx` file (with its `.data` file beside it when it has one).
        providers: execution providers in priority order; default ["CPUExecutionProvider"].
        **options: SessionOptions attributes, see `session_options`.

    Returns:
        The session; its inputs are values, keys, queries (and mask), its output `output`.

    Raises:
        ArtifactError: the file is missing, is not ONNX, references external data unsafely
            (`flash_export.artifacts.safety`: outside its folder, through a link, hard-linked, past
            the end of the file, not the data it was exported with), has a FlashAttention node with
            an unknown or wrong-typed attribute, or onnxruntime rejects it (the native library
            rejects out-of-range attributes here); always one line.
        RuntimeLibraryError: onnxruntime is not installed, or the model needs the native library
            and it is missing or fails to register.
        TypeError, ValueError: a bad session option.
    """
    ort = _onnxruntime()
    so = session_options(**options)
    chosen = list(providers) if providers is not None else ["CPUExecutionProvider"]
    with _opened(path) as opened:
        if LIBRARY_DOMAIN in _domains(opened.model):
            register_library(so)
        if opened.data:
            so.add_external_initializers_from_files_in_memory(*opened.external_files())
        try:
            session = ort.InferenceSession(opened.raw, so, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ArtifactError(f"onnxruntime cannot load {path}: {summary(exc)}") from exc
        opened.check_unchanged()  # onnxruntime holds its own copy from here on
    try:  # protobuf lets non-UTF-8 strings through; reading them later would raise untyped
        for arg in [*session.get_inputs(), *session.get_outputs()]:
            _ = (arg.name, arg.type, arg.shape)
        meta = session.get_modelmeta()
        _ = (meta.custom_metadata_map, meta.producer_name, meta.graph_name, meta.domain,
             meta.description, meta.graph_description)
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path}: a graph input/output name, dim name or metadata string is "
                            f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    return session


def session_io(session: Any) -> IOSpec:
    """The IOSpec of a session's graph, as the exporter recorded it.

    Its inputs (names, dtypes, dims, valid values) and outputs (names, dims: the graph's where
    the spec records none); graphs from before IOSpecs are described by their own inputs.

    A service checks each request with `flash_export.core.feeds.check_feed(io, feed)` before
    running it.

    Raises:
        ArtifactError: the recorded IOSpec is malformed, or the graph contradicts it.
    """
    from flash_export.artifacts.recorded_io import recorded_io
    from flash_export.core.contract import ORT_TYPES

    outputs = [(o.name, ORT_TYPES.get(o.type), list(o.shape)) for o in session.get_outputs()]
    return recorded_io(session.get_modelmeta().custom_metadata_map, "the session's graph",
                       session_inputs(session), outputs)


def session_inputs(session: Any) -> List[Tuple[str, Optional[str], Sequence[Any]]]:
    """(name, dtype name, dims) of a session's graph inputs (see `io_graph.io_from_graph`)."""
    from flash_export.core.contract import ORT_TYPES

    return [(i.name, ORT_TYPES.get(i.type), list(i.shape)) for i in session.get_inputs()]


def ort_session(path: Union[str, os.PathLike[str]], *, provider: str = "cpu",
                threads: Optional[int] = None) -> Any:
    """An onnxruntime session for `path` with flash-export's library registered when needed.

    Raises:
        RuntimeLibraryError: the provider is unavailable or the session cannot be built.
    """
    providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda"
                 else ["CPUExecutionProvider"])
    # Idle intra-op threads spin-wait by default; in an interleaved benchmark they would steal the
    # cores of whichever backend runs next, so every session here sleeps instead.
    options: Dict[str, Any] = {"config_entries": {"session.intra_op.allow_spinning": "0"}}
    if threads is not None:
        options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
    session = create_session(path, providers=providers, **options)
    if provider == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeLibraryError("CUDAExecutionProvider is not usable here (no GPU or CUDA "
                                  "libraries); onnxruntime fell back to CPU")
    return session


def _onnxruntime() -> Any:
    """The onnxruntime module; flash-export never installs one (see the README's install lines).

    Raises:
        RuntimeLibraryError: it is not importable, with the line that installs it.
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeLibraryError(f"onnxruntime is not installed ({exc}): pip install "
                                  "onnxruntime, or for CUDA pip install onnxruntime-gpu (one of "
                                  "the two)") from exc
    return onnxruntime


def _opened(path: Union[str, os.PathLike[str]]) -> Any:
    """`safety.open_onnx(path)`: the file and its data opened, checked and held open.

    Raises:
        ArtifactError: missing, not ONNX, an unsafe external-data reference, or no onnx package
            to check it with.
    """
    try:
        from flash_export.artifacts import safety
    except ImportError as exc:  # onnx is a dependency; fail closed if it was removed
        raise ArtifactError(f"cannot check {path} before loading it: the onnx package is not "
                            f"importable ({exc})") from exc
    return safety.open_onnx(path)

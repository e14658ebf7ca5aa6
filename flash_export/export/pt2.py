"""AOTInductor packages: `torch.export` with the registered operator, compiled to a `.pt2`.

PyTorch's supported path to C++ since TorchScript's deprecation: `torch.export` (dynamic batch
and lengths) -> `torch._inductor.aoti_compile_and_package` -> a `.pt2` zip holding a compiled
shared library, loaded in C++ by `torch::inductor::AOTIModelPackageLoader` and in Python by
`torch._inductor.aoti_load_package`. A chunk loop over a symbolic length does not export, so the
attention is the operator `flash_export::attention` (`flash_export.nn.torch_op`): a C++ process
loads the libtorch shim (custom_ops/torch) first, which the metadata records. The package is
compiled for this machine's CPU (its vector ISA is in the metadata as AOTI_CPU_ISA).

The metadata is written twice, as the same dict: into the package's `extra/flash_export.json`
(read as data, like a TorchScript archive's, by `artifact.read_metadata`) and as AOTInductor
metadata, which a C++ program reads with `AOTIModelPackageLoader::get_metadata()`.

The package takes the model's tensor inputs positionally, in the IOSpec's (the forward's) order,
as the module is called: `runner(values, keys, queries)` from
`torch._inductor.aoti_load_package` (after `import flash_export.nn.torch_op`), and the same order in
C++'s `AOTIModelPackageLoader::run`. Non-tensor arguments it was exported with are baked in.
`load_pt2` returns a callable that also takes the inputs by name.
"""

import contextlib
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from flash_export.artifacts.files import sha256_file
from flash_export.artifacts.kinds import require_kind
from flash_export.artifacts.manifest import atomic_write
from flash_export.artifacts.metadata import METADATA_FILE
from flash_export.artifacts.trust import Provenance, require_provenance
from flash_export.core.errors import ArtifactError, ExportError, first_line, summary
from flash_export.core.io_spec import IOSpec
from flash_export.export.prepare import (
    PathLike,
    attention_as,
    native_metadata,
    prepare,
    quiet_jit_deprecation,
)
from flash_export.nn.model_io import dynamic_shapes
from flash_export.nn.spec import ModelSpec

ProgressFn = Callable[[int, int, str], None]  # (done, total, label); total 0: one step


class _Positional(nn.Module):
    """`model` called with its tensor inputs in order and its constant arguments baked in.

    What `export_pt2` exports, so that the package is called as the module is: positionally.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], constants: Mapping[str, Any]):
        super().__init__()
        self.model = model
        self.names = tuple(names)
        self.constants = dict(constants)

    def forward(self, *inputs: Any) -> Any:
        return self.model(**dict(zip(self.names, inputs)), **self.constants)


def export_pt2(model: nn.Module, path: PathLike, *, spec: Optional[ModelSpec] = None,
               io: Optional[IOSpec] = None, mask: bool = False,
               args: Optional[Sequence[Any]] = None,
               kwargs: Optional[Mapping[str, Any]] = None,
               progress: Optional[ProgressFn] = None) -> Path:
    """Export `model` with `torch.export` and compile it to an AOTInductor package.

    Every dynamic size of the IOSpec (batch, q_len, k_len, seq ...) stays dynamic within its
    bounds; the attention is `flash_export::attention`. Float32. The package takes the tensor
    inputs positionally, in the IOSpec's order (see the module docstring).

    Args:
        model: any module built with FlashAttention layers. It is not modified.
        path: the `.pt2` file to write (atomically, with a manifest beside it).
        spec: how to rebuild `model`; read off `model` when it is a plain FlashAttention.
        io: the model's inputs and outputs (see `flash_export.nn.model_io.resolve_io`).
        mask: the attention contract only: add the ``mask`` input (then required).
        args: example positional inputs, as `torch.export` takes them.
        kwargs: example keyword inputs.
        progress: called as progress(0, 0, step) before each step (the compile takes tens of
            seconds).

    Returns:
        The written path.

    Raises:
        ExportError: `path` does not end in .pt2, the model holds no FlashAttention,
            `torch.export` or the compile fails, or the file cannot be written.
        RuntimeLibraryError: the native library cannot be loaded.
    """
    require_kind(path, "pt2")
    native = attention_as(model, "native").eval()
    prepared = prepare(model, native, spec=spec, io=io, args=args, kwargs=kwargs, mask=mask,
                       dtype="float32", artifact="pt2", **native_metadata())
    return compile_pt2(native, path, example=prepared.example, io=prepared.io,
                       meta=prepared.meta, progress=progress)


def compile_pt2(runnable: nn.Module, path: PathLike, *, example: Mapping[str, Any], io: IOSpec,
                meta: Mapping[str, str], progress: Optional[ProgressFn] = None) -> Path:
    """`torch.export` `runnable` at `example` as `io` declares, compile it, write it with `meta`.

    What every `.pt2` export shares once its model (calling the registered op), inputs and
    metadata are prepared: positional inputs in `io`'s order, each declared dynamic size
    dynamic, the AOTInductor compile, the metadata in the package twice, the atomic write.

    Raises:
        ExportError: `torch.export` or the compile fails, or `path` cannot be written.
    """
    step = progress or (lambda done, total, label: None)
    names = [t.name for t in io.inputs]
    shapes = dynamic_shapes(io)
    step(0, 0, "torch.export")
    try:
        with _quiet(), torch.no_grad():
            program = torch.export.export(
                _Positional(runnable, names, io.constants),
                tuple(example[n] for n in names),
                dynamic_shapes=(tuple(shapes[n] for n in names),))  # one entry: *inputs
    except Exception as exc:  # torch.export raises many types (constraint violations, ...)
        raise ExportError(f"torch.export failed: {summary(exc)}") from exc
    meta = {**meta, "io_spec": io.to_json()}

    def write(tmp: Path) -> None:
        step(0, 0, "compiling with AOTInductor (g++, tens of seconds)")
        try:
            with _quiet():
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(tmp),
                    inductor_configs={"aot_inductor.metadata": dict(meta)})
        except Exception as exc:  # inductor and the C++ compiler fail in many ways
            raise ExportError(f"AOTInductor compile failed: {summary(exc)}") from exc
        with zipfile.ZipFile(tmp, "a") as archive:  # the folder the package's files live in
            root = archive.namelist()[0].split("/", 1)[0]
            archive.writestr(f"{root}/extra/{METADATA_FILE}", json.dumps(meta))

    try:
        return atomic_write(path, write)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc}") from exc


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # torch's own pytree and torch.jit deprecations, raised from inside export and the compile.
    with warnings.catch_warnings(), quiet_jit_deprecation():
        warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
        yield


def load_pt2(path: PathLike, *, trust: bool = False, expect_sha256: Optional[str] = None,
             ) -> Tuple[Any, Dict[str, str], Provenance]:
    """Load a `.pt2` package written by `export_pt2`: (callable, metadata, provenance).

    A package holds a compiled shared library, a program: it is loaded only when its SHA-256 is
    in the user's trust store, equals `expect_sha256`, or `trust` is set. The callable takes the
    model's tensor inputs positionally in the model's order (`compiled(v, k, q)`) or by name
    (`compiled(values=v, keys=k, queries=q)`; constant arguments passed by name are ignored:
    the package has them baked in), and returns the model's outputs. It registers
    `flash_export::attention` in this process first.

    Raises:
        ArtifactError: the file is missing, of unknown origin (without `trust`), not the
            expected file, unreadable, or has no flash-export metadata.
        RuntimeLibraryError: the native library (the operator's kernel) cannot be loaded.
    """
    from flash_export.artifacts.metadata import torchscript_metadata
    from flash_export.nn.torch_op import register

    if not Path(path).is_file():
        raise ArtifactError(f"artifact not found: {path}")
    # One open file for the hash, the metadata and the load: the bytes judged are the bytes run.
    with open(path, "rb") as f:
        origin = require_provenance(path, expect_sha256=expect_sha256, trust=trust,
                                    digest=sha256_file(f),
                                    why="a .pt2 package holds a compiled library, a program")
        f.seek(0)
        meta = torchscript_metadata(f, path)
        register()  # the package calls flash_export::attention
        f.seek(0)
        try:
            compiled = torch._inductor.aoti_load_package(f)
        except (RuntimeError, ValueError, OSError) as exc:
            raise ArtifactError(f"cannot load .pt2 package {path}: {first_line(exc)}") from exc
    from flash_export.artifacts.recorded_io import recorded_io

    return Pt2Model(compiled, [t.name for t in recorded_io(meta, path).inputs]), meta, origin


class Pt2Model:
    """A loaded `.pt2` package, callable positionally or by input name.

    Packages written before the positional calling convention take their inputs by name only;
    both kinds take both calls here. Anything else (`get_metadata()`, `loader`, ...) is the
    AOTInductor model's.
    """

    def __init__(self, compiled: Any, names: Sequence[str]) -> None:
        self.compiled = compiled
        self.names = list(names)
        spec = torch.utils._pytree.treespec_loads(compiled.loader.get_call_spec()[0])
        self._by_name = bool(spec.child(1).context)  # the call spec names kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's outputs for its inputs, positionally in order or by name.

        Raises:
            TypeError: an input missing, given twice, or not the package's.
        """
        if len(args) > len(self.names):
            raise TypeError(f"the package takes {len(self.names)} inputs ({', '.join(self.names)}"
                            f"), got {len(args)}")
        inputs = dict(zip(self.names, args))
        for name, value in kwargs.items():
            if name in inputs:
                raise TypeError(f"input {name!r} given twice")
            if name in self.names:
                inputs[name] = value
            elif isinstance(value, torch.Tensor):
                raise TypeError(f"the package has no input {name!r}; its inputs are "
                                f"{', '.join(self.names)}")
        missing = [n for n in self.names if n not in inputs]
        if missing:
            raise TypeError(f"missing input(s) {', '.join(missing)}")
        if self._by_name:
            return self.compiled(**inputs)
        return self.compiled(*(inputs[n] for n in self.names))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.compiled, name)

"""`flash_export::attention`: the native kernel as one PyTorch operator.

Eager PyTorch, TorchScript, `torch.compile` and `torch.export` all see the same operator, whose
CPU kernel is our kernel core (custom_ops/core) called through its public C entry point
(`flash_export_attention_forward_cpu_openmp`, via the ctypes binding `flash_export.runtime.native`),
on torch's own OpenMP team of `torch.get_num_threads()` threads. Its contract is the ONNX node's
(`flash_export.core.contract`):

    attention(Tensor query, Tensor key, Tensor value, Tensor? mask, int num_heads,
              int chunk_size, bool causal, float scale) -> Tensor

query (B, Lq, E), key and value (B, Lk, E), all float32, float16 or bfloat16 alike; mask an
optional bool tensor broadcastable to (B, num_heads, Lq, Lk), True = attend; every input on one
device; scale finite and not 0 in float32; output (B, Lq, E). Both CPU kernels (this module's and
the shim's) have the library's params filler (`flash_export_attention_params`, which every native
entry point uses) check a call before anything runs. The fake kernel, which meta tensors, tracing
and CPU inputs with a meta mask reach, checks devices, element types and scale in its words.

Who registers what, so nothing is registered twice:
- In Python, importing this module registers the op (`import flash_export.nn.torch_op` before
  `torch._inductor.aoti_load_package` or `torch.jit.load` of a native artifact; `import
  flash_export` alone imports no torch, so it cannot). `register()`, which the import calls (as
  do `FlashAttention(attention="native")` and the loaders of native artifacts), defines the
  schema and the ctypes CPU kernel, then a fake (meta) implementation for tracing and an
  autograd kernel that refuses a backward. It is idempotent. With torch already imported, the
  import took 27-53 ms on a 2-CPU VM (importing torch itself takes seconds).
- In a C++ process, the libtorch shim (custom_ops/torch, `libflash_export_torch.so`) defines
  the same schema with TORCH_LIBRARY and a CPU kernel calling the same core (its items on
  ATen's intra-op pool, through `flash_export_attention_forward_cpu_pool`); loading it
  is what lets `torch::jit::load` and `AOTIModelPackageLoader` resolve the op.
- A Python process that loaded the shim before `register()` keeps the shim's definition and
  kernel; `register()` then adds only the fake and autograd kernels. The shim refuses to load
  after `register()` (its TORCH_LIBRARY would define the schema a second time): Python never
  needs it.
"""

import ctypes
import functools
import math
import threading
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from flash_export.core.contract import TORCH_OP
from flash_export.core.errors import RuntimeLibraryError
from flash_export.runtime.native import Strided, attention_params, check

NAMESPACE = "flash_export"
OP = "attention"
QUALNAME = TORCH_OP
# Kept identical to custom_ops/torch/flash_export_torch.cc (a test compares them).
SCHEMA = ("attention(Tensor query, Tensor key, Tensor value, Tensor? mask, int num_heads, "
          "int chunk_size, bool causal, float scale) -> Tensor")

_FLOAT32_MAX = 3.4028234663852886e38  # the scale rule's range (custom_ops scale_is_valid)

_lock = threading.Lock()
_library: Optional[torch.library.Library] = None  # kept alive: dropping it unregisters


def _has_schema() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(QUALNAME, "")
        return True
    except RuntimeError:
        return False


def register() -> None:
    """Register `flash_export::attention` in this process, once.

    Raises:
        RuntimeLibraryError: the native library cannot be loaded (see `flash-export doctor`).
    """
    global _library
    with _lock:
        if _library is not None:
            return
        _native()  # a missing library fails here, not at the first call
        lib = torch.library.Library(NAMESPACE, "FRAGMENT")
        if not _has_schema():
            lib.define(SCHEMA)
            lib.impl(OP, _cpu_kernel, "CPU")
        if not torch._C._dispatch_has_kernel_for_dispatch_key(QUALNAME, "Meta"):
            torch.library.register_fake(QUALNAME, _fake, lib=lib)
        torch.library.register_autograd(QUALNAME, _refuse_backward,
                                        setup_context=_no_context, lib=lib)
        _library = lib


@functools.cache
def _native() -> Any:
    from flash_export.runtime.library import library_path
    from flash_export.runtime.native import NativeLibrary

    path = library_path()
    try:
        return NativeLibrary(path)
    except OSError as exc:
        raise RuntimeLibraryError(f"cannot load the native library {path}: {exc}") from exc


def _cpu_kernel(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor],
                num_heads: int, chunk_size: int, causal: bool, scale: float) -> Tensor:
    # The core reads any batch and row strides, but each row's E elements in a run.
    q, k, v = (t.contiguous() if t.dim() == 3 and t.stride(2) != 1 else t
               for t in (query, key, value))
    try:  # the library checks the call (devices, dtypes, sizes, mask, attributes) and fills it
        params = attention_params(_native(), _strided(q), _strided(k), _strided(v), None,
                                  num_heads, mask=None if mask is None else _strided(mask),
                                  causal=causal, scale=scale, chunk_size=chunk_size)
    except ValueError as exc:
        raise ValueError(f"{QUALNAME}: {exc}") from None
    out = torch.empty(query.shape, dtype=query.dtype)  # (B, Lq, E), contiguous as params say
    params.out = out.data_ptr()
    check(_native().forward_cpu_openmp(params, _torch_openmp(), torch.get_num_threads()),
          "flash_export_attention_forward_cpu_openmp")
    return out


def thread_pool() -> str:
    """Where the CPU kernel's work items run in this process, in words (for `doctor`)."""
    if _torch_openmp() is not None and _native().has_openmp_forward:
        return "torch's OpenMP team"
    if not _native().has_openmp_forward:
        return "threads of its own (the library predates the OpenMP entry point)"
    backend = torch.__config__.parallel_info().split("parallel backend:")[-1].strip()
    return f"threads of its own (torch's parallel backend: {backend or 'unknown'})"


@functools.cache
def _torch_openmp() -> Optional[int]:
    """Address of `GOMP_parallel` in the OpenMP runtime torch's CPU ops run on, or None.

    The kernel's work items then run on the team that just ran the projections, whose threads
    are still spinning for more work; threads of its own would contend with them for the cores
    (on 2 cores the whole forward took 1.3-1.6x as long, E = 128-512). None where torch does not
    thread with OpenMP or its runtime cannot be found: the kernel then starts threads of its own.
    """
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    lib_dir = Path(torch.__file__).parent / "lib"
    for path in sorted(lib_dir.glob("libtorch_cpu.*")):
        try:
            # Looked up from libtorch_cpu's handle: the runtime among its own dependencies.
            entry = ctypes.CDLL(str(path)).GOMP_parallel
        except (OSError, AttributeError):
            continue
        return ctypes.cast(entry, ctypes.c_void_p).value
    return None


def _strided(t: Tensor) -> Strided:
    return Strided(t.data_ptr(), tuple(t.shape), t.stride(), _dtype_name(t.dtype),
                   _device_name(t.device))


@functools.cache
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # "float32", "bool": the library's names


@functools.cache
def _device_name(device: torch.device) -> str:
    return str(device)  # "cpu", "meta", "cuda:1"


def _fake(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], num_heads: int,
          chunk_size: int, causal: bool, scale: float) -> Tensor:
    # The meta kernel, and the fake one under torch.export / torch.compile: no data, and sizes
    # that may be symbolic, so the library's params filler cannot see the call. What needs no
    # sizes is checked here in the filler's words (CPU inputs with a meta mask dispatch here,
    # not to the CPU kernel); the sizes as far as symbolic shapes allow.
    _check_devices_dtypes_scale(query, key, value, mask, scale)
    torch._check(query.dim() == 3 and key.dim() == 3 and value.dim() == 3,
                 lambda: f"{QUALNAME}: query, key and value must be (B, L, E)")
    torch._check(num_heads >= 1 and query.shape[2] % num_heads == 0,
                 lambda: f"{QUALNAME}: num_heads {num_heads} must divide E")
    return query.new_empty(query.shape)


def _check_devices_dtypes_scale(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor],
                                scale: float) -> None:
    """flash_export_attention_params's checks that need no sizes, for the fake kernel.

    Raises:
        ValueError: in the library's words: an input on another device than query's, key or
            value of another element type than query's, a query type the kernel does not run, a
            mask that is not bool, a scale that is not finite or 0 in float32.
    """
    # In the filler's order: the attributes, devices, then element types
    if isinstance(scale, (int, float)) and not (  # a symbolic scale is checked when it runs
            math.isfinite(scale) and abs(scale) <= _FLOAT32_MAX
            and ctypes.c_float(scale).value != 0.0):
        raise ValueError(f"{QUALNAME}: scale is {scale:g}, expected a finite float32 other than 0")
    named = (("key", key), ("value", value), ("mask", mask))
    for name, t in named:
        if t is not None and t.device != query.device:
            raise ValueError(f"{QUALNAME}: {name} is on {t.device}, expected {query.device} "
                             "(query's device)")
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{QUALNAME}: query has element type {_type_name(query)}, expected "
                         "float32, float16 or bfloat16")
    for name, t in named[:2]:
        if t.dtype != query.dtype:
            raise ValueError(f"{QUALNAME}: {name} has element type {_type_name(t)}, expected "
                             f"{_type_name(query)} (query's element type)")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"{QUALNAME}: mask has element type {_type_name(mask)}, expected bool")


def _type_name(t: Tensor) -> str:
    return _dtype_name(t.dtype)


def _no_context(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
    pass


def _refuse_backward(ctx: Any, grad: Tensor) -> Any:
    raise RuntimeError(f"{QUALNAME} has no backward: it is an inference kernel. Train with "
                       "FlashAttention(attention='chunk') (the default), or run the native one "
                       "under torch.no_grad() / torch.inference_mode()")


register()  # the module's promise: importing it makes flash_export::attention usable

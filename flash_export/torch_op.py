"""`flash_export::attention`: the native kernel as one PyTorch operator.

Eager PyTorch, TorchScript, `torch.compile` and `torch.export` all see the same operator, whose
CPU kernel is our kernel core (custom_ops/core) called through its public C entry point
(`flash_export_attention_forward_cpu_openmp`, via the ctypes binding `flash_export.native`), on
torch's own OpenMP team of `torch.get_num_threads()` threads. Its contract is the ONNX node's
(`flash_export.contract`):

    attention(Tensor query, Tensor key, Tensor value, Tensor? mask, int num_heads,
              int chunk_size, bool causal, float scale) -> Tensor

query (B, Lq, E), key and value (B, Lk, E), all float32, float16 or bfloat16 alike; mask an
optional bool tensor broadcastable to (B, num_heads, Lq, Lk), True = attend; output (B, Lq, E).

Who registers what, so nothing is registered twice:
- In Python, importing this module registers the op (`import flash_export.torch_op` before
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
import threading
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from flash_export.contract import TORCH_OP
from flash_export.errors import RuntimeLibraryError

NAMESPACE = "flash_export"
OP = "attention"
QUALNAME = TORCH_OP
# Kept identical to custom_ops/torch/flash_export_torch.cc (a test compares them).
SCHEMA = ("attention(Tensor query, Tensor key, Tensor value, Tensor? mask, int num_heads, "
          "int chunk_size, bool causal, float scale) -> Tensor")
# Element types the CPU core runs, by torch dtype (flash_export.h's FLASH_EXPORT_* codes).
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

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
    from flash_export.native import NativeLibrary
    from flash_export.runtime import library_path

    path = library_path()
    try:
        return NativeLibrary(path)
    except OSError as exc:
        raise RuntimeLibraryError(f"cannot load the native library {path}: {exc}") from exc


def check_arguments(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor],
                    num_heads: int, chunk_size: int) -> Tuple[int, int, int, int]:
    """Check the op's arguments against its contract; return (B, Lq, Lk, E).

    Raises:
        ValueError: a rank, size, dtype or attribute the kernel cannot honour, saying expected
            vs got.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 3:
            raise ValueError(f"{QUALNAME}: {name} must be (B, L, E), got rank {t.dim()}")
        if t.dtype != query.dtype:
            raise ValueError(f"{QUALNAME}: {name} is {t.dtype}, query is {query.dtype}")
    batch, seq_q, embed = query.shape
    seq_k = key.shape[1]
    if tuple(key.shape) != (batch, seq_k, embed) or tuple(value.shape) != tuple(key.shape):
        raise ValueError(f"{QUALNAME}: key and value must be (B, Lk, E) = "
                         f"{(batch, seq_k, embed)} for query {tuple(query.shape)}, got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if num_heads < 1 or embed % num_heads != 0:
        raise ValueError(f"{QUALNAME}: num_heads must be >= 1 and divide E = {embed}, "
                         f"got {num_heads}")
    if chunk_size < 1:
        raise ValueError(f"{QUALNAME}: chunk_size must be >= 1, got {chunk_size}")
    if mask is not None:
        target = (batch, num_heads, seq_q, seq_k)
        if mask.dtype != torch.bool:
            raise ValueError(f"{QUALNAME}: mask must be bool (True = attend), got {mask.dtype}")
        sizes = tuple(mask.shape)
        if len(sizes) > 4 or any(s != 1 and s != t for s, t in zip(sizes, target[4 - len(sizes):])):
            raise ValueError(f"{QUALNAME}: mask of shape {list(sizes)} does not broadcast to "
                             f"(B, H, Lq, Lk) = {list(target)}")
    return batch, seq_q, seq_k, embed


def _cpu_kernel(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor],
                num_heads: int, chunk_size: int, causal: bool, scale: float) -> Tensor:
    from flash_export.native import attention_params, check

    batch, seq_q, seq_k, _ = check_arguments(query, key, value, mask, num_heads, chunk_size)
    if query.dtype not in _DTYPES:
        raise ValueError(f"{QUALNAME}: the CPU kernel runs float32, float16 or bfloat16, got "
                         f"{query.dtype}")
    # The core reads any batch and row strides, but each row's E elements in a run.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    out = torch.empty(query.shape, dtype=query.dtype)  # (B, Lq, E)
    allowed = None
    if mask is not None:
        allowed = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(
            batch, num_heads, seq_q, seq_k)  # (B, H, Lq, Lk), broadcast dims of stride 0
    params = attention_params(_strided(q), _strided(k), _strided(v), _strided(out), num_heads,
                              dtype=_DTYPES[query.dtype],
                              mask=None if allowed is None else _strided(allowed),
                              causal=causal, scale=scale, chunk_size=chunk_size)
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


def _strided(t: Tensor) -> Any:
    from flash_export.native import Strided

    return Strided(t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def _fake(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], num_heads: int,
          chunk_size: int, causal: bool, scale: float) -> Tensor:
    # Shapes only (symbolic under torch.export): the output is query's (B, Lq, E).
    torch._check(query.dim() == 3 and key.dim() == 3 and value.dim() == 3,
                 lambda: f"{QUALNAME}: query, key and value must be (B, L, E)")
    torch._check(num_heads >= 1 and query.shape[2] % num_heads == 0,
                 lambda: f"{QUALNAME}: num_heads {num_heads} must divide E")
    return query.new_empty(query.shape)


def _no_context(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
    pass


def _refuse_backward(ctx: Any, grad: Tensor) -> Any:
    raise RuntimeError(f"{QUALNAME} has no backward: it is an inference kernel. Train with "
                       "FlashAttention(attention='chunk') (the default), or run the native one "
                       "under torch.no_grad() / torch.inference_mode()")


register()  # the module's promise: importing it makes flash_export::attention usable

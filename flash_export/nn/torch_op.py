"""`flash_export::attention`: the native kernel as one PyTorch operator.

Eager PyTorch, TorchScript, `torch.compile` and `torch.export` all see the same operator, whose
CPU kernel is our kernel core (custom_ops/core) called through its public C entry point
(`flash_export_attention_forward_cpu_openmp`, via the ctypes binding `flash_export.runtime.native`),
on torch's own OpenMP team of `torch.get_num_threads()` threads. Its contract is the ONNX node's
(`flash_export.core.contract`), in two overloads:

    attention(Tensor query, Tensor key, Tensor value, Tensor? mask, int num_heads,
              int chunk_size, bool causal, float scale) -> Tensor            # contract v1
    attention.v2(Tensor query, Tensor key, Tensor value, Tensor? mask=None,
                 Tensor? seqlens_k=None, Tensor? bias=None, *, int num_heads,
                 int kv_num_heads=0, int chunk_size=64, bool causal=False, float? scale=None,
                 int window_size=0, float softcap=0.0, int output_layout=0) -> Tensor

The default overload is what artifacts written before contract v2 call, unchanged. v2 adds
grouped-query heads (`kv_num_heads`), head-major inputs read through their strides (a rank-4
tensor is (B, heads, L, D), any strides but the last: a transposed (B, L, H, D) view is read in
place, no copy), per-sequence key counts (`seqlens_k`, int32 (B,), GroupQueryAttention's
convention), a sliding window, an additive logit bias broadcast through its strides, a softcap
and the output layout (0: (B, Lq, H*Dv), 1: (B, H, Lq, Dv)); flash_export.h states the semantics.
Inputs are all float32, float16 or bfloat16 alike (the bias too); the mask an optional bool
tensor broadcastable to (B, num_heads, Lq, Lk), True = attend; every input on one device; scale
finite and not 0 in float32. Both CPU kernels (this module's and the shim's) have the library's
params filler (`flash_export_attention_params_v2`, which every native entry point uses) check a
call before anything runs. The fake kernel, which meta tensors, tracing and CPU inputs with a meta
mask reach, checks devices, element types and scale in its words and computes the output shape.

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
OP_V2 = "attention.v2"
QUALNAME = TORCH_OP
QUALNAME_V2 = f"{TORCH_OP}.v2"
# Kept identical to custom_ops/torch/flash_export_torch.cc (a test compares them).
SCHEMA = ("attention(Tensor query, Tensor key, Tensor value, Tensor? mask, int num_heads, "
          "int chunk_size, bool causal, float scale) -> Tensor")
# Tensors positional (torch.library's autograd registration takes no keyword-only tensor), the
# attributes keyword-only.
SCHEMA_V2 = ("attention.v2(Tensor query, Tensor key, Tensor value, Tensor? mask=None, "
             "Tensor? seqlens_k=None, Tensor? bias=None, *, int num_heads, int kv_num_heads=0, "
             "int chunk_size=64, bool causal=False, float? scale=None, int window_size=0, "
             "float softcap=0.0, int output_layout=0) -> Tensor")

_FLOAT32_MAX = 3.4028234663852886e38  # the scale rule's range (custom_ops scale_is_valid)

_lock = threading.Lock()
_library: Optional[torch.library.Library] = None  # kept alive: dropping it unregisters


def _has_schema(overload: str = "") -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(QUALNAME, overload)
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
        for overload, schema, name, kernel, fake, qualname in (
                ("", SCHEMA, OP, _cpu_kernel, _fake, QUALNAME),
                ("v2", SCHEMA_V2, OP_V2, _cpu_kernel_v2, _fake_v2, QUALNAME_V2)):
            if not _has_schema(overload):
                lib.define(schema)
                lib.impl(name, kernel, "CPU")
            if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"):
                torch.library.register_fake(qualname, fake, lib=lib)
            torch.library.register_autograd(qualname, _refuse_backward,
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
    return _forward(query, key, value, num_heads, mask=mask, chunk_size=chunk_size,
                    causal=causal, scale=scale)


def _cpu_kernel_v2(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor] = None,
                   seqlens_k: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
                   num_heads: int, kv_num_heads: int = 0, chunk_size: int = 64,
                   causal: bool = False, scale: Optional[float] = None, window_size: int = 0,
                   softcap: float = 0.0, output_layout: int = 0) -> Tensor:
    return _forward(query, key, value, num_heads, kv_num_heads=kv_num_heads, mask=mask,
                    seqlens_k=seqlens_k, bias=bias, chunk_size=chunk_size, causal=causal,
                    scale=scale, window_size=window_size, softcap=softcap,
                    output_layout=output_layout)


def _forward(query: Tensor, key: Tensor, value: Tensor, num_heads: int, *, kv_num_heads: int = 0,
             mask: Optional[Tensor] = None, seqlens_k: Optional[Tensor] = None,
             bias: Optional[Tensor] = None, chunk_size: int = 64, causal: bool = False,
             scale: Optional[float] = None, window_size: int = 0, softcap: float = 0.0,
             output_layout: int = 0) -> Tensor:
    """Both overloads' CPU kernel: the library checks the call and fills it, the core runs it.

    Every tensor is read through its strides; only a last dimension that is not contiguous is
    copied (the core reads each head's D elements of a row in a run), and seqlens_k (B values).
    """
    q, k, v = (t.contiguous() if t.dim() in (3, 4) and t.stride(-1) != 1 and t.numel() > 1
               else t for t in (query, key, value))
    if seqlens_k is not None and seqlens_k.dim() == 1 and seqlens_k.stride(0) != 1:
        seqlens_k = seqlens_k.contiguous()
    try:  # the library checks the call (devices, dtypes, sizes, mask, attributes) and fills it
        params = attention_params(
            _native(), _strided(q), _strided(k), _strided(v), None, num_heads,
            mask=None if mask is None else _strided(mask), causal=causal, scale=scale,
            chunk_size=chunk_size, kv_num_heads=kv_num_heads,
            seqlens_k=None if seqlens_k is None else _strided(seqlens_k),
            bias=None if bias is None else _strided(bias), window_size=window_size,
            softcap=softcap, output_layout=output_layout)
    except ValueError as exc:
        raise ValueError(f"{QUALNAME}: {exc}") from None
    shape = ((params.batch, params.heads, params.seq_q, params.head_dim_v) if output_layout == 1
             else (params.batch, params.seq_q, params.heads * params.head_dim_v))
    out = torch.empty(shape, dtype=query.dtype)  # contiguous in output_layout, as params say
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
    return _fake_v2(query, key, value, mask, num_heads=num_heads, chunk_size=chunk_size,
                    causal=causal, scale=scale)


def _fake_v2(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor] = None,
             seqlens_k: Optional[Tensor] = None, bias: Optional[Tensor] = None, *, num_heads: int,
             kv_num_heads: int = 0, chunk_size: int = 64, causal: bool = False,
             scale: Optional[float] = None, window_size: int = 0, softcap: float = 0.0,
             output_layout: int = 0) -> Tensor:
    # The meta kernel, and the fake one under torch.export / torch.compile: no data, and sizes
    # that may be symbolic, so the library's params filler cannot see the call. What needs no
    # sizes is checked here in the filler's words (CPU inputs with a meta mask dispatch here,
    # not to the CPU kernel); the sizes as far as symbolic shapes allow; the output's shape is
    # the layouts' arithmetic.
    _check_devices_dtypes_scale(query, key, value, mask, scale, seqlens_k, bias)
    kv_heads = kv_num_heads or num_heads
    torch._check(all(t.dim() in (3, 4) for t in (query, key, value)),
                 lambda: f"{QUALNAME}: query, key and value must be (B, L, heads*D) or "
                 "(B, heads, L, D)")
    torch._check(num_heads >= 1 and kv_heads >= 1 and num_heads % kv_heads == 0,
                 lambda: f"{QUALNAME}: kv_num_heads {kv_heads} must divide num_heads "
                 f"{num_heads}")
    if query.dim() == 3:
        torch._check(query.shape[2] % num_heads == 0,
                     lambda: f"{QUALNAME}: num_heads {num_heads} must divide E")
    batch, seq_q = query.shape[0], query.shape[1 if query.dim() == 3 else 2]
    dim_v = value.shape[3] if value.dim() == 4 else value.shape[2] // kv_heads
    if output_layout == 1:
        return query.new_empty((batch, num_heads, seq_q, dim_v))  # (B, H, Lq, Dv)
    return query.new_empty((batch, seq_q, num_heads * dim_v))  # (B, Lq, H*Dv)


def _check_devices_dtypes_scale(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor],
                                scale: Optional[float], seqlens_k: Optional[Tensor] = None,
                                bias: Optional[Tensor] = None) -> None:
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
    named = (("key", key), ("value", value), ("mask", mask), ("seqlens_k", seqlens_k),
             ("bias", bias))
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
    if seqlens_k is not None and seqlens_k.dtype != torch.int32:
        raise ValueError(f"{QUALNAME}: seqlens_k has element type {_type_name(seqlens_k)}, "
                         "expected int32")
    if bias is not None and bias.dtype != query.dtype:
        raise ValueError(f"{QUALNAME}: bias has element type {_type_name(bias)}, expected "
                         f"{_type_name(query)} (query's element type)")


def _type_name(t: Tensor) -> str:
    return _dtype_name(t.dtype)


def _no_context(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
    pass


def _refuse_backward(ctx: Any, grad: Tensor) -> Any:
    raise RuntimeError(f"{QUALNAME} has no backward: it is an inference kernel. Train with "
                       "FlashAttention(attention='chunk') (the default), or run the native one "
                       "under torch.no_grad() / torch.inference_mode()")


register()  # the module's promise: importing it makes flash_export::attention usable

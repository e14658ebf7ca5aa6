"""The one ctypes binding of libflash_export.so's C ABI (custom_ops/core/flash_export.h).

For callers without onnxruntime: the native tests, the GPU check (benchmarks/cuda_harness.py) and
`flash-export doctor`. Imports no torch. Loading checks this module's params mirror against the
library's own `flash_export_params_size`, so a library of another layout fails at load instead of
reading the wrong fields (README, Development, shows a call).

The params of a call are filled by the library itself (`flash_export_attention_params_v2`, the
one params filler every adapter calls), from descriptions of the tensors (`Strided`): it checks the
call against the op's contract (v2: grouped heads, head-major layouts, seqlens_k, window, bias,
softcap; `flash_export.contract`) first, so a wrong size, element type or device is refused with a
message instead of read past a buffer.
"""

from __future__ import annotations

import array
import ctypes
import functools
import json
from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np

from flash_export.core.errors import RuntimeLibraryError
from flash_export.runtime.native_abi import (
    BFLOAT16_NAN,
    CPU_PLAN,
    CUDA_FORWARD,
    DEVICE_CODES,
    ELEMENT_CODES,
    ERROR_SIZE,
    OPENMP_FORWARD,
    OPTIONAL_ENTRIES,
    OTHER_DEVICE,
    OTHER_TYPE,
    SIGNATURES,
    AttentionInputs,
    AttentionOptions,
    AttentionParams,
    NativeError,
    TensorDescriptor,
)


class NativeLibrary:
    """libflash_export.so with the signatures of its C entry points declared and checked.

    Raises:
        OSError: the file is not a loadable shared library.
        RuntimeLibraryError: it lacks an entry point, or its params layout is not this mirror's.
    """

    def __init__(self, path: str) -> None:
        self.path = str(path)
        handle = ctypes.CDLL(self.path)
        self._fns: Dict[str, Any] = {}
        for name, (argtypes, restype) in SIGNATURES.items():
            fn = getattr(handle, name, None)
            if fn is None:
                if name in OPTIONAL_ENTRIES:
                    continue  # a library built without nvcc, or older than the entry point
                raise RuntimeLibraryError(f"{self.path} does not export {name}: not a "
                                          "flash-export library, or one of another version")
            fn.argtypes, fn.restype = argtypes, restype
            self._fns[name] = fn
        setting: Optional[bytes] = self._fns["flash_export_cpu_isa_error"]()
        if setting:
            raise RuntimeLibraryError(setting.decode())
        for entry, mirror in (("flash_export_params_size", AttentionParams),
                              ("flash_export_tensor_size", TensorDescriptor),
                              ("flash_export_options_size", AttentionOptions),
                              ("flash_export_inputs_size", AttentionInputs)):
            size = int(self._fns[entry]())
            if size != ctypes.sizeof(mirror):
                raise RuntimeLibraryError(
                    f"{self.path} has {mirror.__name__} of {size} bytes, runtime/native_abi.py "
                    f"mirrors {ctypes.sizeof(mirror)}: the library is from another version")

    @property
    def has_cuda(self) -> bool:
        """Whether the library exports the CUDA forward (it was built with nvcc)."""
        return CUDA_FORWARD in self._fns

    @property
    def has_openmp_forward(self) -> bool:
        """Whether the library exports the forward on a host's OpenMP team (newer builds)."""
        return OPENMP_FORWARD in self._fns

    def build_info(self) -> Dict[str, Any]:
        """The library's build report (flash_export_build_info) as a dict."""
        info: Dict[str, Any] = json.loads(self._fns["flash_export_build_info"]())
        return info

    def cpu_isa(self) -> str:
        """The CPU kernel's vector path on this machine: one of `native_abi.CPU_ISAS`."""
        isa: bytes = self._fns["flash_export_cpu_isa"]()
        return isa.decode()

    def cpu_plan(self, params: AttentionParams, threads: int = 1) -> Dict[str, Any]:
        """How the CPU forward would cut the work of `params`: flash_export_cpu_plan's JSON.

        `threads` is the caller's thread count (0: this machine's hardware threads).

        Raises:
            RuntimeLibraryError: a library older than that entry point.
        """
        if CPU_PLAN not in self._fns:
            raise RuntimeLibraryError(f"{self.path} does not export {CPU_PLAN}: a library "
                                      "older than this binding")
        plan: Dict[str, Any] = json.loads(self._fns[CPU_PLAN](ctypes.byref(params), threads))
        return plan

    def fill_params(self, inputs: AttentionInputs, options: AttentionOptions) -> AttentionParams:
        """flash_export_attention_params_v2: check a call against the op's contract, fill params.

        Raises:
            ValueError: the call breaks the contract; the library's message names the argument,
                what it must be and what it is.
        """
        params = AttentionParams()
        args = (ctypes.byref(inputs), ctypes.byref(options), ctypes.byref(params))
        fill = self._fns["flash_export_attention_params_v2"]
        if fill(*args, None, 0) != 0:  # no message buffer on the way that succeeds
            error = ctypes.create_string_buffer(ERROR_SIZE)
            fill(*args, error, ERROR_SIZE)  # the same checks again, to read their message
            raise ValueError(error.value.decode(errors="replace"))
        return params

    def forward_cpu(self, params: Optional[AttentionParams], threads: int = 1) -> int:
        """The CPU forward, serial or on `threads` threads; returns its status (0: ok)."""
        pointer = None if params is None else ctypes.byref(params)
        if threads <= 1:
            return int(self._fns["flash_export_attention_forward_cpu"](pointer))
        return int(self._fns["flash_export_attention_forward_cpu_threads"](pointer, threads))

    def forward_cpu_openmp(self, params: Optional[AttentionParams], gomp_parallel: Optional[int],
                           threads: int) -> int:
        """The CPU forward on the calling thread's OpenMP team; returns its status (0: ok).

        `gomp_parallel` is the address of `GOMP_parallel` in the OpenMP runtime the host framework
        runs on (None, or a library older than that entry point: `threads` std::threads, as
        `forward_cpu`), `threads` the framework's team size.
        """
        if gomp_parallel is None or not self.has_openmp_forward:
            return self.forward_cpu(params, threads)
        pointer = None if params is None else ctypes.byref(params)
        return int(self._fns[OPENMP_FORWARD](pointer, ctypes.c_void_p(gomp_parallel), threads))

    def forward_cuda(self, params: Optional[AttentionParams], stream: int = 0) -> int:
        """The CUDA forward on `stream` (a cudaStream_t as an int; 0: the legacy default stream).

        Returns its status (0: ok); unsupported (2) from a library built without nvcc.
        """
        if not self.has_cuda:
            return 2
        pointer = None if params is None else ctypes.byref(params)
        return int(self._fns[CUDA_FORWARD](pointer, ctypes.c_void_p(stream)))


def check(status: int, entry: str) -> None:
    """Raise NativeError unless `status` is ok."""
    if status != 0:
        raise NativeError(entry, status)


class Strided(NamedTuple):
    """Where a tensor's elements live: element i lives at address + sum(i[d] * strides[d]) elements.

    Any framework's tensor fits (numpy, torch, a device copy): see `Strided.of` for numpy.
    """

    address: int
    shape: Tuple[int, ...]
    strides: Tuple[int, ...]  # in elements, not bytes
    # The element type's name ("float32", "float16", "bfloat16", "bool", or any other, which the
    # library refuses by that name); None: the call's `dtype`.
    dtype: Optional[str] = None
    # "cpu", "cuda" ("cuda:1"), or any other device name (refused); None: the call's device.
    device: Optional[str] = None

    @classmethod
    def of(cls, array: np.ndarray, address: Optional[int] = None,
           dtype: Optional[str] = None) -> Strided:
        """A numpy array's layout and element type.

        `dtype` overrides numpy's name (e.g. "bfloat16" for uint16 words); `address` the array's
        own, when its data was copied elsewhere.
        """
        return cls(array.ctypes.data if address is None else address, array.shape,
                   tuple(s // array.itemsize for s in array.strides),
                   _numpy_name(array.dtype) if dtype is None else dtype)


@functools.cache
def _numpy_name(dtype: np.dtype) -> str:
    return dtype.name  # numpy derives it anew on every read: ~20 us a tensor


@functools.cache
def _codes(name: str, device: str) -> Tuple[bytes, bytes, int, int]:
    """(type name, device name, FLASH_EXPORT_* type code, device code) of a descriptor."""
    return (name.encode(), device.encode(), ELEMENT_CODES.get(name, OTHER_TYPE),
            DEVICE_CODES.get(device.split(":")[0], OTHER_DEVICE))


def _descriptors(tensors: Tuple[Optional[Strided], ...], dtypes: Tuple[Optional[str], ...],
                 device: str) -> Tuple[array.array, list]:
    """(dims, descriptors): each tensor's FlashExportTensor, and the array they point into.

    None stays None; `dtypes` are the element types of the tensors whose Strided states none.
    The sizes and strides of all live in the one int64 array `dims`, which the caller keeps alive
    while the library reads the descriptors.
    """
    # array.array fills in a few microseconds what a ctypes array takes 0.25 us an element for
    dims = array.array("q", [n for x in tensors if x is not None for n in (*x.shape, *x.strides)])
    at = dims.buffer_info()[0]
    descriptors: list = []
    for x, dtype in zip(tensors, dtypes):
        if x is None:
            descriptors.append(None)
            continue
        rank = len(x.shape)
        type_name, device_name, type_code, device_code = _codes(
            x.dtype or dtype or "an unstated element type", x.device or device)
        descriptors.append(TensorDescriptor(x.address, at, at + 8 * rank, type_name, device_name,
                                            rank, type_code, device_code))
        at += 16 * rank
    return dims, descriptors


def attention_params(lib: NativeLibrary, q: Strided, k: Strided, v: Strided,
                     out: Optional[Strided], num_heads: int, *, dtype: Optional[str] = None,
                     mask: Optional[Strided] = None, causal: bool = False,
                     scale: Optional[float] = None, chunk_size: int = 64,
                     device: str = "cpu", kv_num_heads: Optional[int] = None,
                     seqlens_k: Optional[Strided] = None, bias: Optional[Strided] = None,
                     window_size: int = 0, softcap: float = 0.0,
                     output_layout: int = 0) -> AttentionParams:
    """The params of one forward, checked and filled by the library (the op's contract v2).

    Each of q, k, v and out says its layout by its rank: 3 is (B, L, heads * D), 4 is head-major
    (B, heads, L, D); its last dimension contiguous, every other stride free.

    Args:
        lib: the loaded library.
        q: (B, Lq, H*D) or (B, H, Lq, D).
        k: (B, Lk, H_kv*D) or (B, H_kv, Lk, D), q's element type and device.
        v: (B, Lk, H_kv*Dv) or (B, H_kv, Lk, Dv).
        out: the output, (B, Lq, H*Dv) (output_layout 0) or (B, H, Lq, Dv) (1), of q's element
            type; None: set `params.out` to a contiguous one after this call.
        num_heads: H.
        dtype: the element type of the tensors whose `Strided.dtype` is None: "float32",
            "float16" or "bfloat16" (seqlens_k's default is "int32", the mask's "bool").
        mask: optional bool, broadcastable (numpy rules) to (B, H, Lq, Lk), any strides; True =
            attend.
        causal: causal mask, bottom-right aligned to each sequence's keys (query i sees key j iff
            j <= i + L_b - Lq).
        scale: logit scale, finite and not 0 in float32; default 1/sqrt(D).
        chunk_size: keys per online-softmax block (the CPU kernel's; CUDA ignores it).
        device: the forward's device, "cpu" or "cuda", and the device of the tensors whose
            `Strided.device` is None.
        kv_num_heads: H_kv, dividing H (grouped-query attention); None: H.
        seqlens_k: optional int32 (B,): sequence b has keys [0, seqlens_k[b]] (onnxruntime
            GroupQueryAttention's convention); None: every sequence has all Lk.
        bias: optional additive logit bias of q's type, broadcastable to (B, H, Lq, Lk).
        window_size: > 0: a query at position p sees key j only if |p - j| < window_size.
        softcap: > 0: logits become softcap * tanh(logits / softcap) before the bias.
        output_layout: 0 for (B, Lq, H*Dv), 1 for (B, H, Lq, Dv).

    Raises:
        ValueError: the call breaks the op's contract (the library's message says how).
    """
    options = AttentionOptions(num_heads, chunk_size, 0.0 if scale is None else scale,
                               scale is not None, causal, _codes("", device)[3], 0,
                               kv_num_heads or 0, window_size, softcap, output_layout)
    tensors = (q, k, v, mask, seqlens_k, bias, out)
    dims, described = _descriptors(tensors, (dtype, dtype, dtype, "bool", "int32", dtype, dtype),
                                   device)
    inputs = AttentionInputs(*(None if d is None else ctypes.pointer(d) for d in described))
    params = lib.fill_params(inputs, options)
    del dims, described  # read by the library, which keeps no pointer into them
    return params


# long: the docstring states each of the v2 contract's arguments; the body is 30 lines
def attention(lib: NativeLibrary, q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int, *,
              mask: Optional[np.ndarray] = None, causal: bool = False,
              scale: Optional[float] = None, chunk_size: int = 64, threads: int = 1,
              dtype: Optional[str] = None, gomp_parallel: Optional[int] = None,
              kv_num_heads: Optional[int] = None, seqlens_k: Optional[np.ndarray] = None,
              bias: Optional[np.ndarray] = None, window_size: int = 0, softcap: float = 0.0,
              output_layout: int = 0) -> np.ndarray:
    """Run the CPU core on numpy arrays (the op's contract v2; `attention_params` states it).

    Args:
        lib: the loaded library.
        q: (B, Lq, H*D) or head-major (B, H, Lq, D) queries, any strides (the last is made
            contiguous).
        k: (B, Lk, H_kv*D) or (B, H_kv, Lk, D) keys, q's dtype.
        v: (B, Lk, H_kv*Dv) or (B, H_kv, Lk, Dv) values, q's dtype.
        num_heads: H.
        mask: optional bool, broadcastable to (B, H, Lq, Lk); True = attend.
        causal: bottom-right aligned causal mask.
        scale: logit scale, finite and not 0; default 1/sqrt(D).
        chunk_size: keys per online-softmax block.
        threads: CPU threads (the caller's included); 1 runs the serial entry point.
        dtype: the element type; default q's. "bfloat16" with uint16 arrays of bfloat16 bits
            (numpy has no bfloat16).
        gomp_parallel: the address of an OpenMP runtime's `GOMP_parallel`: run on that
            runtime's team of `threads` (`NativeLibrary.forward_cpu_openmp`).
        kv_num_heads: H_kv (grouped-query attention); None: H.
        seqlens_k: optional int32 (B,), onnxruntime GroupQueryAttention's: sequence b has keys
            [0, seqlens_k[b]].
        bias: optional additive logit bias of q's dtype, broadcastable to (B, H, Lq, Lk).
        window_size: sliding window (0: none).
        softcap: logit softcap (0: none).
        output_layout: 0 for a (B, Lq, H*Dv) output, 1 for (B, H, Lq, Dv).

    Returns:
        The output in `output_layout`, of q's dtype, NaN wherever the kernel wrote nothing.

    Raises:
        ValueError: arrays or attributes the op's contract refuses (sizes, element types that
            differ or the kernel does not run, a mask that does not broadcast, a scale of 0...),
            checked by the library before anything runs.
        NativeError: the kernel returned a status other than ok.
    """
    def rows(x: np.ndarray) -> np.ndarray:  # the last dimension contiguous, other strides kept
        return x if x.ndim == 0 or x.strides[-1] == x.itemsize else np.ascontiguousarray(x)

    q, k, v = (rows(x) for x in (q, k, v))
    # numpy has no bfloat16: uint16 words are bfloat16 where the call says so
    as_bf16 = dtype == "bfloat16"
    q_, k_, v_ = (Strided.of(x, dtype="bfloat16" if as_bf16 and x.dtype == np.uint16 else None)
                  for x in (q, k, v))
    if dtype is not None and q_.dtype != dtype:
        raise ValueError(f"dtype {dtype!r} does not describe q, a {q_.dtype} array")
    bias_ = None
    if bias is not None:
        bias = np.asarray(bias)
        bias_ = Strided.of(bias, dtype="bfloat16" if as_bf16 and bias.dtype == np.uint16
                           else None)
    seqlens_ = None if seqlens_k is None else Strided.of(np.ascontiguousarray(seqlens_k))
    p = attention_params(lib, q_, k_, v_, None, num_heads,
                         mask=None if mask is None else Strided.of(np.asarray(mask)),
                         causal=causal, scale=scale, chunk_size=chunk_size,
                         kv_num_heads=kv_num_heads, seqlens_k=seqlens_, bias=bias_,
                         window_size=window_size, softcap=softcap, output_layout=output_layout)
    shape = ((p.batch, p.heads, p.seq_q, p.head_dim_v) if output_layout == 1
             else (p.batch, p.seq_q, p.heads * p.head_dim_v))
    out = np.full(shape, BFLOAT16_NAN if q_.dtype == "bfloat16" else np.nan, dtype=q.dtype)
    p.out = out.ctypes.data  # contiguous in output_layout, as the params say
    if gomp_parallel is not None:
        check(lib.forward_cpu_openmp(p, gomp_parallel, threads),
              "flash_export_attention_forward_cpu_openmp")
    else:
        check(lib.forward_cpu(p, threads), "flash_export_attention_forward_cpu")
    return out

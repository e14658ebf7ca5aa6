"""The one ctypes binding of libflash_export.so's C ABI (custom_ops/core/flash_export.h).

For callers without onnxruntime: the native tests, the GPU check (benchmarks/cuda_harness.py) and
`flash-export doctor`. Imports no torch. Loading checks this module's params mirror against the
library's own `flash_export_params_size`, so a library of another layout fails at load instead of
reading the wrong fields (README, Development, shows a call).

The params of a call are filled by the library itself (`flash_export_attention_params`, the one
params filler every adapter calls), from descriptions of the tensors (`Strided`): it checks the
call against the op's contract first, so a wrong size, element type or device is refused with a
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

# FLASH_EXPORT_FLOAT32 / _FLOAT16 / _BFLOAT16, by dtype name: the kernels' element types.
DTYPE_CODES: Dict[str, int] = {"float32": 0, "float16": 1, "bfloat16": 2}
# FlashExportTensor's element type codes: the kernels' and the mask's; any other name is
# FLASH_EXPORT_OTHER_TYPE.
_ELEMENT_CODES: Dict[str, int] = {**DTYPE_CODES, "bool": 3}
_OTHER_TYPE = 4
# FLASH_EXPORT_DEVICE_CPU / _CUDA by device type ("cuda:1" is a cuda); any other is _OTHER.
_DEVICE_CODES: Dict[str, int] = {"cpu": 0, "cuda": 1}
_OTHER_DEVICE = 2
_ERROR_SIZE = 512  # FLASH_EXPORT_ERROR_SIZE
# The entry points' status codes (FLASH_EXPORT_OK ...).
STATUS_NAMES: Dict[int, str] = {0: "ok", 1: "invalid_argument", 2: "unsupported",
                                3: "device_error", 4: "out_of_memory"}
# A bfloat16 NaN, to poison outputs held as raw 16-bit words.
_BFLOAT16_NAN = 0x7FC0


class AttentionParams(ctypes.Structure):
    """Mirror of FlashExportAttentionParams, field for field; ctypes applies the C alignment."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("batch", ctypes.c_int64), ("heads", ctypes.c_int64), ("head_dim", ctypes.c_int64),
        ("seq_q", ctypes.c_int64), ("seq_k", ctypes.c_int64),
        ("q_batch_stride", ctypes.c_int64), ("q_row_stride", ctypes.c_int64),
        ("q_head_stride", ctypes.c_int64),
        ("k_batch_stride", ctypes.c_int64), ("k_row_stride", ctypes.c_int64),
        ("k_head_stride", ctypes.c_int64),
        ("v_batch_stride", ctypes.c_int64), ("v_row_stride", ctypes.c_int64),
        ("v_head_stride", ctypes.c_int64),
        ("o_batch_stride", ctypes.c_int64), ("o_row_stride", ctypes.c_int64),
        ("o_head_stride", ctypes.c_int64),
        ("mask", ctypes.c_void_p),
        ("mask_batch_stride", ctypes.c_int64), ("mask_head_stride", ctypes.c_int64),
        ("mask_q_stride", ctypes.c_int64), ("mask_k_stride", ctypes.c_int64),
        ("chunk_size", ctypes.c_int64), ("scale", ctypes.c_float), ("causal", ctypes.c_bool),
        ("dtype", ctypes.c_int32),
    ]


class TensorDescriptor(ctypes.Structure):
    """Mirror of FlashExportTensor: one tensor of a call, as `attention_params` describes it."""

    # sizes and strides (const int64_t* in C) are addresses into an int64 array its maker keeps
    # alive (`_descriptors`): set as plain addresses, ctypes builds no pointer objects.
    _fields_ = [
        ("data", ctypes.c_void_p), ("sizes", ctypes.c_void_p), ("strides", ctypes.c_void_p),
        ("type_name", ctypes.c_char_p), ("device_name", ctypes.c_char_p),
        ("rank", ctypes.c_int32), ("dtype", ctypes.c_int32), ("device", ctypes.c_int32),
    ]


class AttentionOptions(ctypes.Structure):
    """Mirror of FlashExportAttentionOptions: the op's attributes and the forward's device."""

    _fields_ = [
        ("num_heads", ctypes.c_int64), ("chunk_size", ctypes.c_int64), ("scale", ctypes.c_double),
        ("has_scale", ctypes.c_bool), ("causal", ctypes.c_bool), ("device", ctypes.c_int32),
        ("dtypes", ctypes.c_uint32),
    ]


class NativeError(RuntimeError):
    """A forward entry point returned a status other than ok."""

    def __init__(self, entry: str, status: int) -> None:
        super().__init__(f"{entry} returned status {status} ({STATUS_NAMES.get(status, '?')})")
        self.entry = entry
        self.status = status


_PARAMS = ctypes.POINTER(AttentionParams)
_TENSOR = ctypes.POINTER(TensorDescriptor)
# name -> (argtypes, restype); every one but those in _OPTIONAL must be exported.
_SIGNATURES: Dict[str, Tuple[list, Any]] = {
    "flash_export_params_size": ([], ctypes.c_size_t),
    "flash_export_tensor_size": ([], ctypes.c_size_t),
    "flash_export_options_size": ([], ctypes.c_size_t),
    "flash_export_attention_params": ([_TENSOR, _TENSOR, _TENSOR, _TENSOR, _TENSOR,
                                       ctypes.POINTER(AttentionOptions), _PARAMS,
                                       ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int32),
    "flash_export_attention_forward_cpu": ([_PARAMS], ctypes.c_int32),
    "flash_export_attention_forward_cpu_threads": ([_PARAMS, ctypes.c_int32], ctypes.c_int32),
    "flash_export_attention_forward_cpu_openmp": ([_PARAMS, ctypes.c_void_p, ctypes.c_int32],
                                                  ctypes.c_int32),
    "flash_export_attention_forward_cuda": ([_PARAMS, ctypes.c_void_p], ctypes.c_int32),
    "flash_export_cpu_isa": ([], ctypes.c_char_p),
    "flash_export_cpu_plan": ([_PARAMS, ctypes.c_int32], ctypes.c_char_p),
    "flash_export_cpu_isa_error": ([], ctypes.c_char_p),
    "flash_export_build_info": ([], ctypes.c_char_p),
}
_CUDA_FORWARD = "flash_export_attention_forward_cuda"
_CPU_PLAN = "flash_export_cpu_plan"
_OPENMP_FORWARD = "flash_export_attention_forward_cpu_openmp"
_OPTIONAL = (_CUDA_FORWARD, _CPU_PLAN, _OPENMP_FORWARD)


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
        for name, (argtypes, restype) in _SIGNATURES.items():
            fn = getattr(handle, name, None)
            if fn is None:
                if name in _OPTIONAL:
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
                              ("flash_export_options_size", AttentionOptions)):
            size = int(self._fns[entry]())
            if size != ctypes.sizeof(mirror):
                raise RuntimeLibraryError(
                    f"{self.path} has {mirror.__name__} of {size} bytes, runtime/native.py "
                    f"mirrors {ctypes.sizeof(mirror)}: the library is from another version")

    @property
    def has_cuda(self) -> bool:
        """Whether the library exports the CUDA forward (it was built with nvcc)."""
        return _CUDA_FORWARD in self._fns

    @property
    def has_openmp_forward(self) -> bool:
        """Whether the library exports the forward on a host's OpenMP team (newer builds)."""
        return _OPENMP_FORWARD in self._fns

    def build_info(self) -> Dict[str, Any]:
        """The library's build report (flash_export_build_info) as a dict."""
        info: Dict[str, Any] = json.loads(self._fns["flash_export_build_info"]())
        return info

    def cpu_isa(self) -> str:
        """The CPU kernel's vector path on this machine: "amx", "avx512", "avx2" or "portable"."""
        isa: bytes = self._fns["flash_export_cpu_isa"]()
        return isa.decode()

    def cpu_plan(self, params: AttentionParams, threads: int = 1) -> Dict[str, Any]:
        """How the CPU forward would cut the work of `params`: flash_export_cpu_plan's JSON.

        `threads` is the caller's thread count (0: this machine's hardware threads).

        Raises:
            RuntimeLibraryError: a library older than that entry point.
        """
        if _CPU_PLAN not in self._fns:
            raise RuntimeLibraryError(f"{self.path} does not export {_CPU_PLAN}: a library "
                                      "older than this binding")
        plan: Dict[str, Any] = json.loads(self._fns[_CPU_PLAN](ctypes.byref(params), threads))
        return plan

    def fill_params(self, query: TensorDescriptor, key: TensorDescriptor, value: TensorDescriptor,
                    mask: Optional[TensorDescriptor], out: Optional[TensorDescriptor],
                    options: AttentionOptions) -> AttentionParams:
        """flash_export_attention_params: check a call against the op's contract, fill its params.

        Raises:
            ValueError: the call breaks the contract; the library's message names the argument,
                what it must be and what it is.
        """
        params = AttentionParams()
        args = (ctypes.byref(query), ctypes.byref(key), ctypes.byref(value),
                None if mask is None else ctypes.byref(mask),
                None if out is None else ctypes.byref(out), ctypes.byref(options),
                ctypes.byref(params))
        fill = self._fns["flash_export_attention_params"]
        if fill(*args, None, 0) != 0:  # no message buffer on the way that succeeds
            error = ctypes.create_string_buffer(_ERROR_SIZE)
            fill(*args, error, _ERROR_SIZE)  # the same checks again, to read their message
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
        return int(self._fns[_OPENMP_FORWARD](pointer, ctypes.c_void_p(gomp_parallel), threads))

    def forward_cuda(self, params: Optional[AttentionParams], stream: int = 0) -> int:
        """The CUDA forward on `stream` (a cudaStream_t as an int; 0: the legacy default stream).

        Returns its status (0: ok); unsupported (2) from a library built without nvcc.
        """
        if not self.has_cuda:
            return 2
        pointer = None if params is None else ctypes.byref(params)
        return int(self._fns[_CUDA_FORWARD](pointer, ctypes.c_void_p(stream)))


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
    return (name.encode(), device.encode(), _ELEMENT_CODES.get(name, _OTHER_TYPE),
            _DEVICE_CODES.get(device.split(":")[0], _OTHER_DEVICE))


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
                     device: str = "cpu") -> AttentionParams:
    """The params of one forward, checked and filled by the library (flash_export_attention_params).

    Args:
        lib: the loaded library.
        q: (B, Lq, H*D), its last dimension contiguous (as for k, v and out).
        k: (B, Lk, H*D), q's element type and device.
        v: (B, Lk, H*D).
        out: (B, Lq, H*D) of q's element type; None: set `params.out` to a contiguous one after
            this call.
        num_heads: H.
        dtype: the element type of the tensors whose `Strided.dtype` is None: "float32",
            "float16" or "bfloat16".
        mask: optional bool (where its `Strided.dtype` is None too), broadcastable (numpy
            rules) to (B, H, Lq, Lk), any strides; True = attend.
        causal: bottom-right aligned causal mask (query i sees key j iff j <= i + Lk - Lq).
        scale: logit scale, finite and not 0 in float32; default 1/sqrt(D).
        chunk_size: keys per online-softmax block (the CPU kernel's; CUDA ignores it).
        device: the forward's device, "cpu" or "cuda", and the device of the tensors whose
            `Strided.device` is None.

    Raises:
        ValueError: the call breaks the op's contract (the library's message says how).
    """
    options = AttentionOptions(num_heads, chunk_size, 0.0 if scale is None else scale,
                               scale is not None, causal, _codes("", device)[3])
    dims, described = _descriptors((q, k, v, mask, out), (dtype, dtype, dtype, "bool", dtype),
                                   device)
    dq, dk, dv, dmask, dout = described
    params = lib.fill_params(dq, dk, dv, dmask, dout, options)
    del dims  # read by the library, which keeps no pointer into it
    return params


def attention(lib: NativeLibrary, q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int, *,
              mask: Optional[np.ndarray] = None, causal: bool = False,
              scale: Optional[float] = None, chunk_size: int = 64, threads: int = 1,
              dtype: Optional[str] = None, gomp_parallel: Optional[int] = None) -> np.ndarray:
    """Run the CPU core on numpy arrays.

    Args:
        lib: the loaded library.
        q: (B, Lq, E) queries.
        k: (B, Lk, E) keys, q's dtype.
        v: (B, Lk, E) values, q's dtype.
        num_heads: H; E must be divisible by it.
        mask: optional bool, broadcastable to (B, H, Lq, Lk); True = attend.
        causal: bottom-right aligned causal mask.
        scale: logit scale, finite and not 0; default 1/sqrt(E / H).
        chunk_size: keys per online-softmax block.
        threads: CPU threads (the caller's included); 1 runs the serial entry point.
        dtype: the element type; default q's. "bfloat16" with uint16 arrays of bfloat16 bits
            (numpy has no bfloat16).
        gomp_parallel: the address of an OpenMP runtime's `GOMP_parallel`: run on that
            runtime's team of `threads` (`NativeLibrary.forward_cpu_openmp`).

    Returns:
        (B, Lq, E) of q's dtype, NaN wherever the kernel wrote nothing.

    Raises:
        ValueError: arrays or attributes the op's contract refuses (sizes, element types that
            differ or the kernel does not run, a mask that does not broadcast, a scale of 0...),
            checked by the library before anything runs.
        NativeError: the kernel returned a status other than ok.
    """
    q, k, v = (np.ascontiguousarray(x) for x in (q, k, v))
    # numpy has no bfloat16: uint16 words are bfloat16 where the call says so
    q_, k_, v_ = (Strided.of(x, dtype="bfloat16" if dtype == "bfloat16" and x.dtype == np.uint16
                             else None) for x in (q, k, v))
    if dtype is not None and q_.dtype != dtype:
        raise ValueError(f"dtype {dtype!r} does not describe q, a {q_.dtype} array")
    p = attention_params(lib, q_, k_, v_, None, num_heads,
                         mask=None if mask is None else Strided.of(np.asarray(mask)),
                         causal=causal, scale=scale, chunk_size=chunk_size)
    out = np.full_like(q, _BFLOAT16_NAN if q_.dtype == "bfloat16" else np.nan)
    p.out = out.ctypes.data  # (B, Lq, E), contiguous as the params say
    if gomp_parallel is not None:
        check(lib.forward_cpu_openmp(p, gomp_parallel, threads),
              "flash_export_attention_forward_cpu_openmp")
    else:
        check(lib.forward_cpu(p, threads), "flash_export_attention_forward_cpu")
    return out

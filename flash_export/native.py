"""The one ctypes binding of libflash_export.so's C ABI (custom_ops/core/flash_export.h).

For callers without onnxruntime: the native tests, the GPU check (benchmarks/cuda_harness.py) and
`flash-export doctor`. Imports no torch. Loading checks this module's params mirror against the
library's own `flash_export_params_size`, so a library of another layout fails at load instead of
reading the wrong fields.

    lib = NativeLibrary(library_path())
    out = attention(lib, q, k, v, num_heads=2, causal=True)   # numpy (B, L, E) -> (B, Lq, E)
"""

from __future__ import annotations

import ctypes
import json
import math
from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np

from flash_export.errors import RuntimeLibraryError

# FLASH_EXPORT_FLOAT32 / _FLOAT16 / _BFLOAT16, by dtype name.
DTYPE_CODES: Dict[str, int] = {"float32": 0, "float16": 1, "bfloat16": 2}
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


class NativeError(RuntimeError):
    """A forward entry point returned a status other than ok."""

    def __init__(self, entry: str, status: int) -> None:
        super().__init__(f"{entry} returned status {status} ({STATUS_NAMES.get(status, '?')})")
        self.entry = entry
        self.status = status


_PARAMS = ctypes.POINTER(AttentionParams)
# name -> (argtypes, restype); every one but those in _OPTIONAL must be exported.
_SIGNATURES: Dict[str, Tuple[list, Any]] = {
    "flash_export_params_size": ([], ctypes.c_size_t),
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
        size = int(self._fns["flash_export_params_size"]())
        if size != ctypes.sizeof(AttentionParams):
            raise RuntimeLibraryError(
                f"{self.path} has params of {size} bytes, flash_export/native.py mirrors "
                f"{ctypes.sizeof(AttentionParams)}: the library is from another version")

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

    @classmethod
    def of(cls, array: np.ndarray, address: Optional[int] = None) -> Strided:
        """A numpy array's layout; at `address` instead when its data was copied elsewhere."""
        return cls(array.ctypes.data if address is None else address, tuple(array.shape),
                   tuple(s // array.itemsize for s in array.strides))


def attention_params(q: Strided, k: Strided, v: Strided, out: Strided, num_heads: int, *,
                     dtype: str, mask: Optional[Strided] = None, causal: bool = False,
                     scale: Optional[float] = None, chunk_size: int = 64) -> AttentionParams:
    """Fill the params of one forward.

    Args:
        q: (B, Lq, H*D), its last dimension contiguous (as for k, v and out).
        k: (B, Lk, H*D).
        v: (B, Lk, H*D).
        out: (B, Lq, H*D).
        num_heads: H.
        dtype: the element type of q, k, v and out: "float32", "float16" or "bfloat16".
        mask: optional, one byte per element (nonzero = attend), already broadcast to
            (B, H, Lq, Lk); a broadcast dimension has stride 0.
        causal: bottom-right aligned causal mask (query i sees key j iff j <= i + Lk - Lq).
        scale: logit scale; default 1/sqrt(D).
        chunk_size: keys per online-softmax block (the CPU kernel's; CUDA ignores it).

    Raises:
        ValueError: shapes that disagree, a last dimension that is not contiguous, an unknown
            dtype.
    """
    batch, seq_q, embed = q.shape
    seq_k = k.shape[1]
    if embed % num_heads != 0:
        raise ValueError(f"embed {embed} is not divisible by num_heads {num_heads}")
    head_dim = embed // num_heads
    for name, x, rows in (("k", k, seq_k), ("v", v, seq_k), ("out", out, seq_q)):
        if tuple(x.shape) != (batch, rows, embed):
            raise ValueError(f"{name} is {tuple(x.shape)}, expected {(batch, rows, embed)}")
    if mask is not None and tuple(mask.shape) != (batch, num_heads, seq_q, seq_k):
        raise ValueError(f"mask is {tuple(mask.shape)}, expected it broadcast to "
                         f"{(batch, num_heads, seq_q, seq_k)}")
    if dtype not in DTYPE_CODES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPE_CODES)}")
    p = AttentionParams(q=q.address, k=k.address, v=v.address, out=out.address, batch=batch,
                        heads=num_heads, head_dim=head_dim, seq_q=seq_q, seq_k=seq_k,
                        chunk_size=chunk_size, causal=causal, dtype=DTYPE_CODES[dtype])
    p.scale = (1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0) if scale is None else scale
    for prefix, x in (("q", q), ("k", k), ("v", v), ("o", out)):
        if embed > 1 and x.strides[2] != 1 and 0 not in x.shape:  # empty: nothing is read
            raise ValueError(f"{prefix}: the last dimension must be contiguous, got stride "
                             f"{x.strides[2]}")
        setattr(p, f"{prefix}_batch_stride", x.strides[0])
        setattr(p, f"{prefix}_row_stride", x.strides[1])
        setattr(p, f"{prefix}_head_stride", head_dim)
    if mask is not None:
        p.mask = mask.address
        (p.mask_batch_stride, p.mask_head_stride, p.mask_q_stride,
         p.mask_k_stride) = mask.strides
    return p


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
        scale: logit scale; default 1/sqrt(E / H).
        chunk_size: keys per online-softmax block.
        threads: CPU threads (the caller's included); 1 runs the serial entry point.
        dtype: the element type; default q's. "bfloat16" with uint16 arrays of bfloat16 bits
            (numpy has no bfloat16).
        gomp_parallel: the address of an OpenMP runtime's `GOMP_parallel`: run on that
            runtime's team of `threads` (`NativeLibrary.forward_cpu_openmp`).

    Returns:
        (B, Lq, E) of q's dtype, NaN wherever the kernel wrote nothing.

    Raises:
        NativeError: the kernel returned a status other than ok.
    """
    q, k, v = (np.ascontiguousarray(x) for x in (q, k, v))
    dtype = q.dtype.name if dtype is None else dtype
    out = np.full_like(q, _BFLOAT16_NAN if dtype == "bfloat16" else np.nan)
    batch, seq_q, _ = q.shape
    broadcast = None
    if mask is not None:
        broadcast = np.broadcast_to(np.asarray(mask, dtype=np.bool_),
                                    (batch, num_heads, seq_q, k.shape[1]))
    p = attention_params(Strided.of(q), Strided.of(k), Strided.of(v), Strided.of(out), num_heads,
                         dtype=dtype, mask=None if broadcast is None else Strided.of(broadcast),
                         causal=causal, scale=scale, chunk_size=chunk_size)
    if gomp_parallel is not None:
        check(lib.forward_cpu_openmp(p, gomp_parallel, threads),
              "flash_export_attention_forward_cpu_openmp")
    else:
        check(lib.forward_cpu(p, threads), "flash_export_attention_forward_cpu")
    return out

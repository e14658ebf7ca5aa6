"""ctypes harness for the native attention core: no onnxruntime, torch tensors and raw pointers.

Fills a mirror of ``flash_export::AttentionParams`` (custom_ops/core/flash_attention.h) from torch
tensors laid out as (B, L, H*D) with arbitrary batch/row strides, calls the framework-free C entry
points of libflash_export.so (``flash_export_attention_forward_cuda`` on CUDA tensors, on the
current torch stream; ``flash_export_attention_forward_cpu`` on CPU tensors) and provides the
float64 reference the results are judged against.

Imports torch but never touches a GPU at import time.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

DTYPE_CODES: Dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
STATUS_NAMES: Dict[int, str] = {0: "ok", 1: "invalid_argument", 2: "unsupported", 3: "device_error"}

CUDA_ENTRY = "flash_export_attention_forward_cuda"
CPU_ENTRY = "flash_export_attention_forward_cpu"
SIZE_ENTRY = "flash_export_params_size"


class AttentionParams(ctypes.Structure):
    """Field-for-field mirror of flash_export::AttentionParams; ctypes applies the C alignment."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("batch", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("seq_q", ctypes.c_int64),
        ("seq_k", ctypes.c_int64),
        ("q_batch_stride", ctypes.c_int64),
        ("q_row_stride", ctypes.c_int64),
        ("q_head_stride", ctypes.c_int64),
        ("k_batch_stride", ctypes.c_int64),
        ("k_row_stride", ctypes.c_int64),
        ("k_head_stride", ctypes.c_int64),
        ("v_batch_stride", ctypes.c_int64),
        ("v_row_stride", ctypes.c_int64),
        ("v_head_stride", ctypes.c_int64),
        ("o_batch_stride", ctypes.c_int64),
        ("o_row_stride", ctypes.c_int64),
        ("o_head_stride", ctypes.c_int64),
        ("mask", ctypes.c_void_p),
        ("mask_batch_stride", ctypes.c_int64),
        ("mask_head_stride", ctypes.c_int64),
        ("mask_q_stride", ctypes.c_int64),
        ("mask_k_stride", ctypes.c_int64),
        ("chunk_size", ctypes.c_int64),
        ("scale", ctypes.c_float),
        ("causal", ctypes.c_bool),
        ("dtype", ctypes.c_int32),
    ]


class NativeError(RuntimeError):
    """A native entry point returned a non-ok Status."""

    def __init__(self, entry: str, status: int) -> None:
        super().__init__(f"{entry} returned status {status} ({STATUS_NAMES.get(status, '?')})")
        self.status = status


class NativeLibrary:
    """libflash_export.so (or a CUDA-only build of the kernel) with its C signatures declared.

    Entry points the library lacks are reported by ``has_cuda`` / ``has_cpu`` instead of failing
    at load time, so a CPU-only build can rehearse everything but the CUDA call.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lib = ctypes.CDLL(str(self.path))
        params_ptr = ctypes.POINTER(AttentionParams)
        self._cuda = self._declare(CUDA_ENTRY, [params_ptr, ctypes.c_void_p], ctypes.c_int32)
        self._cpu = self._declare(CPU_ENTRY, [params_ptr], ctypes.c_int32)
        self._size = self._declare(SIZE_ENTRY, [], ctypes.c_size_t)

    def _declare(self, name: str, argtypes: list, restype: Any) -> Optional[Any]:
        fn = getattr(self._lib, name, None)
        if fn is not None:
            fn.argtypes = argtypes
            fn.restype = restype
        return fn

    @property
    def has_cuda(self) -> bool:
        """Whether the library exports the CUDA entry point."""
        return self._cuda is not None

    @property
    def has_cpu(self) -> bool:
        """Whether the library exports the CPU entry point."""
        return self._cpu is not None

    def params_size(self) -> Optional[int]:
        """sizeof(AttentionParams) as the library was compiled, or None if it does not say."""
        return None if self._size is None else int(self._size())

    def forward_cuda(self, params: AttentionParams, stream: int) -> int:
        """Call the CUDA entry point; `stream` is a cudaStream_t as an int (0: legacy default)."""
        if self._cuda is None:
            raise NativeError(CUDA_ENTRY, 2)
        return int(self._cuda(ctypes.byref(params), ctypes.c_void_p(stream)))

    def forward_cpu(self, params: AttentionParams) -> int:
        """Call the serial CPU entry point."""
        if self._cpu is None:
            raise NativeError(CPU_ENTRY, 2)
        return int(self._cpu(ctypes.byref(params)))


@dataclass
class PreparedCall:
    """Filled params plus the tensors whose memory they point into (kept alive here)."""

    params: AttentionParams
    out: torch.Tensor  # (B, Lq, H*D)
    mask_u8: Optional[torch.Tensor]  # (B, H, Lq, Lk) uint8 view, broadcast dims with stride 0


def _check_blh(name: str, x: torch.Tensor, num_heads: int) -> Tuple[int, int, int]:
    if x.dim() != 3:
        raise ValueError(f"{name} must be (B, L, H*D), got shape {tuple(x.shape)}")
    if x.shape[2] % num_heads != 0:
        raise ValueError(f"{name}: last dim {x.shape[2]} is not a multiple of heads {num_heads}")
    if x.shape[2] > 1 and x.stride(2) != 1:
        raise ValueError(f"{name}: last dim must be contiguous, got stride {x.stride(2)}")
    return int(x.shape[0]), int(x.shape[1]), int(x.shape[2]) // num_heads


def broadcast_mask(mask: torch.Tensor, batch: int, heads: int, seq_q: int,
                   seq_k: int) -> torch.Tensor:
    """Right-align a bool/uint8 mask onto (B, H, Lq, Lk) as uint8, broadcast dims with stride 0."""
    return torch.broadcast_to(mask.to(torch.uint8), (batch, heads, seq_q, seq_k))


def prepare_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, *,
                 mask: Optional[torch.Tensor] = None, causal: bool = False,
                 scale: Optional[float] = None, chunk_size: int = 64,
                 out: Optional[torch.Tensor] = None) -> PreparedCall:
    """Fill AttentionParams for q (B, Lq, H*D), k/v (B, Lk, H*D) of one dtype on one device.

    Args:
        q: (B, Lq, H*D) float32/float16/bfloat16, last dim contiguous, any batch/row strides.
        k: (B, Lk, H*D), same dtype and device.
        v: (B, Lk, H*D), same dtype and device.
        num_heads: H.
        mask: optional bool/uint8, broadcastable to (B, H, Lq, Lk); True/nonzero = attend.
        causal: bottom-right aligned causal mask (query i sees key j iff j <= i + Lk - Lq).
        scale: logit scale; default 1/sqrt(D).
        chunk_size: keys per online-softmax block (the CPU kernel's knob; CUDA ignores it).
        out: optional (B, Lq, H*D) output; default a NaN-poisoned new tensor, so an element the
            kernel forgets to write shows up as NaN.

    Returns:
        The filled params with the output and mask tensors they point into.
    """
    batch, seq_q, head_dim = _check_blh("q", q, num_heads)
    kb, seq_k, kd = _check_blh("k", k, num_heads)
    vb, vl, vd = _check_blh("v", v, num_heads)
    if (kb, kd) != (batch, head_dim) or (vb, vl, vd) != (batch, seq_k, head_dim):
        raise ValueError(f"shapes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPE_CODES:
        raise ValueError(f"q/k/v dtypes must match and be one of {list(DTYPE_CODES)}")
    if out is None:
        out = torch.full((batch, seq_q, num_heads * head_dim), float("nan"), dtype=q.dtype,
                         device=q.device)
    _check_blh("out", out, num_heads)

    p = AttentionParams()
    p.q, p.k, p.v, p.out = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    p.batch, p.heads, p.head_dim, p.seq_q, p.seq_k = batch, num_heads, head_dim, seq_q, seq_k
    for prefix, x in (("q", q), ("k", k), ("v", v), ("o", out)):
        setattr(p, f"{prefix}_batch_stride", x.stride(0))
        setattr(p, f"{prefix}_row_stride", x.stride(1))
        setattr(p, f"{prefix}_head_stride", head_dim * x.stride(2))
    mask_u8 = None
    if mask is not None:
        mask_u8 = broadcast_mask(mask.to(q.device), batch, num_heads, seq_q, seq_k)
        p.mask = mask_u8.data_ptr()
        (p.mask_batch_stride, p.mask_head_stride, p.mask_q_stride,
         p.mask_k_stride) = mask_u8.stride()
    p.chunk_size = chunk_size
    p.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    p.causal = causal
    p.dtype = DTYPE_CODES[q.dtype]
    return PreparedCall(params=p, out=out, mask_u8=mask_u8)


def run_prepared(lib: NativeLibrary, call: PreparedCall, device: torch.device) -> None:
    """Launch one prepared call: CUDA on the current torch stream, CPU serially. Raises on error."""
    if device.type == "cuda":
        status = lib.forward_cuda(call.params, torch.cuda.current_stream(device).cuda_stream)
        entry = CUDA_ENTRY
    else:
        status = lib.forward_cpu(call.params)
        entry = CPU_ENTRY
    if status != 0:
        raise NativeError(entry, status)


def native_attention(lib: NativeLibrary, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     num_heads: int, *, mask: Optional[torch.Tensor] = None,
                     causal: bool = False, scale: Optional[float] = None,
                     chunk_size: int = 64) -> torch.Tensor:
    """Attention through the native core on q's device; returns (B, Lq, H*D) in q's dtype."""
    call = prepare_call(q, k, v, num_heads, mask=mask, causal=causal, scale=scale,
                        chunk_size=chunk_size)
    run_prepared(lib, call, q.device)
    return call.out


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, H, L, D) view."""
    batch, length, embed = x.shape
    return x.view(batch, length, num_heads, embed // num_heads).transpose(1, 2)


def visible_keys(seq_q: int, seq_k: int, *, causal: bool, mask: Optional[torch.Tensor],
                 device: torch.device) -> torch.Tensor:
    """Bool (..., Lq, Lk): which key each query may attend to (causal bottom-right, then mask)."""
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if causal:
        visible = visible.tril(seq_k - seq_q)  # j <= i + (Lk - Lq)
    if mask is not None:
        visible = visible & mask.to(device=device, dtype=torch.bool)
    return visible


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, *,
                        mask: Optional[torch.Tensor] = None, causal: bool = False,
                        scale: Optional[float] = None,
                        compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Matmul-softmax-matmul attention computed in `compute_dtype` on q's device.

    With float64 this is the reference; with q's own dtype it is PyTorch's same-dtype computation
    whose error sets the tolerance. Rows that see no key are zeros.

    Args:
        q: (B, Lq, H*D).
        k: (B, Lk, H*D).
        v: (B, Lk, H*D).
        num_heads: H.
        mask: optional bool/uint8 broadcastable to (B, H, Lq, Lk).
        causal: bottom-right aligned causal mask.
        scale: logit scale; default 1/sqrt(D).
        compute_dtype: dtype of every matmul and the softmax.

    Returns:
        (B, Lq, H*D) in `compute_dtype`.
    """
    qh, kh, vh = (split_heads(x, num_heads).to(compute_dtype) for x in (q, k, v))  # (B, H, L, D)
    batch, heads, seq_q, head_dim = qh.shape
    seq_k = kh.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    logits = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    visible = visible_keys(seq_q, seq_k, causal=causal, mask=mask, device=q.device)
    visible = torch.broadcast_to(visible, logits.shape)  # (B, H, Lq, Lk)
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = probs.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)  # no key -> zeros, not NaN
    out = torch.matmul(probs, vh)  # (B, H, Lq, D)
    return out.transpose(1, 2).reshape(batch, seq_q, heads * head_dim)


@dataclass
class ErrorReport:
    """One output judged against the float64 reference by the project's tolerance rule."""

    max_abs: float  # of the native output
    baseline_max_abs: float  # of PyTorch's same-dtype computation
    bound: float  # max(1e-5, 2 x baseline)
    nonfinite: int  # NaN/Inf in the output where the reference is finite
    passed: bool


def max_abs_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Max |actual - reference| in float64; NaN anywhere counts as infinite; 0 when empty."""
    if actual.numel() == 0:
        return 0.0
    diff = (actual.double() - reference.double()).abs()
    if torch.isnan(diff).any():
        return math.inf
    return float(diff.max())


def judge(actual: torch.Tensor, reference64: torch.Tensor, baseline: torch.Tensor,
          floor: float = 1e-5) -> ErrorReport:
    """Apply the rule: max abs error <= max(floor, 2 x baseline error), no NaN/Inf where finite."""
    err = max_abs_error(actual, reference64)
    base = max_abs_error(baseline, reference64)
    bound = max(floor, 2.0 * base)
    finite_ref = torch.isfinite(reference64)
    nonfinite = int((~torch.isfinite(actual.double()) & finite_ref).sum()) if actual.numel() else 0
    return ErrorReport(max_abs=err, baseline_max_abs=base, bound=bound, nonfinite=nonfinite,
                       passed=err <= bound and nonfinite == 0)

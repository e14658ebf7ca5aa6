"""Helpers for the native-library tests: ctypes view of the core, float64 reference, tolerance.

torch is imported only by the reference, so that workers measuring the core's memory
(tests/test_scratch_memory.py) run without it.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}


class AttentionParams(ctypes.Structure):
    """Mirror of flash_export::AttentionParams (custom_ops/core/flash_attention.h)."""

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


def load_library(path: Path) -> ctypes.CDLL:
    """Load libflash_export.so and declare the signatures of its C entry points."""
    lib = ctypes.CDLL(str(path))
    lib.flash_export_attention_forward_cpu.argtypes = [ctypes.POINTER(AttentionParams)]
    lib.flash_export_attention_forward_cpu.restype = ctypes.c_int32
    lib.flash_export_attention_forward_cpu_threads.argtypes = [
        ctypes.POINTER(AttentionParams), ctypes.c_int32]
    lib.flash_export_attention_forward_cpu_threads.restype = ctypes.c_int32
    lib.flash_export_build_info.restype = ctypes.c_char_p
    lib.flash_export_cpu_isa.restype = ctypes.c_char_p
    return lib


def _mask_strides(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Element strides of a bool mask right-aligned onto (B, H, Lq, Lk); broadcast dims get 0."""
    shape4 = (1,) * (4 - mask.ndim) + mask.shape
    strides4 = (0,) * (4 - mask.ndim) + tuple(s // mask.itemsize for s in mask.strides)
    return tuple(0 if n == 1 else s for n, s in zip(shape4, strides4))  # type: ignore[return-value]


def run_core(
    lib: ctypes.CDLL,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    num_heads: int,
    *,
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
    chunk_size: int = 64,
    threads: int = 1,
) -> np.ndarray:
    """Run the CPU core on (B, L, E) arrays through the C entry point; returns (B, Lq, E)."""
    q, k, v = (np.ascontiguousarray(x) for x in (q, k, v))
    batch, seq_q, embed = q.shape
    head_dim = embed // num_heads
    out = np.full_like(q, np.nan)
    p = AttentionParams()
    p.q, p.k, p.v, p.out = (x.ctypes.data for x in (q, k, v, out))
    p.batch, p.heads, p.head_dim, p.seq_q, p.seq_k = batch, num_heads, head_dim, seq_q, k.shape[1]
    for prefix, x in (("q", q), ("k", k), ("v", v), ("o", out)):
        setattr(p, f"{prefix}_batch_stride", x.shape[1] * embed)
        setattr(p, f"{prefix}_row_stride", embed)
        setattr(p, f"{prefix}_head_stride", head_dim)
    if mask is not None:
        mask = np.ascontiguousarray(mask, dtype=np.bool_)
        p.mask = mask.ctypes.data
        (p.mask_batch_stride, p.mask_head_stride, p.mask_q_stride,
         p.mask_k_stride) = _mask_strides(mask)
    p.chunk_size = chunk_size
    p.scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    p.causal = causal
    p.dtype = DTYPE_CODES[q.dtype]
    status = lib.flash_export_attention_forward_cpu_threads(ctypes.byref(p), threads)
    if status != 0:
        raise RuntimeError(f"flash_export_attention_forward_cpu returned status {status}")
    return out


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, embed = x.shape
    return x.reshape(batch, length, num_heads, embed // num_heads).transpose(1, 2)  # (B, H, L, D)


def reference_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    num_heads: int,
    *,
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
    dtype: Any = None,
) -> np.ndarray:
    """Matmul-softmax-matmul attention in `dtype` (a torch dtype, default float64); rows that see
    no key are zeros, rows whose visible logits are all -inf are NaN. (B, Lq, E)."""
    import torch

    dtype = torch.float64 if dtype is None else dtype
    qt, kt, vt = (_split_heads(torch.from_numpy(np.asarray(x)).to(dtype), num_heads)
                  for x in (q, k, v))
    seq_q, seq_k, head_dim = qt.shape[2], kt.shape[2], qt.shape[3]
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    logits = (qt @ kt.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool)
    if causal:
        visible = torch.ones(seq_q, seq_k, dtype=torch.bool).tril(seq_k - seq_q)
    if mask is not None:
        visible = visible & torch.from_numpy(np.asarray(mask, dtype=np.bool_))
    visible = visible.expand_as(logits)
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = probs.masked_fill(~visible.any(-1, keepdim=True), 0.0)  # (B, H, Lq, Lk)
    out = probs @ vt  # (B, H, Lq, D)
    return out.transpose(1, 2).reshape(q.shape[0], seq_q, -1).numpy()


def max_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference, in float64."""
    if actual.size == 0:
        return 0.0
    return float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))

"""The torch side of the GPU check (gpu_check.py): the native core on torch tensors, judged.

Calls the framework-free C entry points of libflash_export.so through flash_export.runtime.native
(the one ctypes binding) on torch tensors laid out as (B, L, H*D) with arbitrary batch/row strides:
``flash_export_attention_forward_cuda`` on CUDA tensors, on the current torch stream;
``flash_export_attention_forward_cpu`` on CPU tensors. The reference is
flash_export.nn.attention.reference_attention_core and the verdict
flash_export.core.tolerance.compare.

Imports torch but never touches a GPU at import time. Needs the flash_export package importable
(installed, or the repository root on PYTHONPATH as gpu_check.sh sets it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from flash_export.core.tolerance import Comparison, compare, max_abs_error
from flash_export.nn.attention import reference_attention_core
from flash_export.runtime.native import NativeLibrary, Strided, attention_params, check
from flash_export.runtime.native_abi import AttentionParams


@dataclass
class PreparedCall:
    """Filled params plus the tensors whose memory they point into (kept alive here)."""

    params: AttentionParams
    out: torch.Tensor  # (B, Lq, H*D)
    mask: Optional[torch.Tensor]  # bool, broadcastable to (B, H, Lq, Lk)


def strided(x: torch.Tensor) -> Strided:
    """Where a tensor's elements live and what they are, as flash_export.runtime.native says."""
    return Strided(x.data_ptr(), tuple(x.shape), tuple(x.stride()),
                   str(x.dtype).removeprefix("torch."), str(x.device))


def prepare_call(lib: NativeLibrary, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 num_heads: int, *, mask: Optional[torch.Tensor] = None, causal: bool = False,
                 scale: Optional[float] = None, chunk_size: int = 64,
                 out: Optional[torch.Tensor] = None) -> PreparedCall:
    """Fill the params for q (B, Lq, H*D), k/v (B, Lk, H*D) of one dtype on one device.

    Args:
        lib: the loaded library, whose params filler checks the call.
        q: (B, Lq, H*D) float32/float16/bfloat16, last dim contiguous, any batch/row strides.
        k: (B, Lk, H*D), same dtype and device.
        v: (B, Lk, H*D), same dtype and device.
        num_heads: H.
        mask: optional bool, broadcastable to (B, H, Lq, Lk); True = attend.
        causal: bottom-right aligned causal mask (query i sees key j iff j <= i + Lk - Lq).
        scale: logit scale; default 1/sqrt(D).
        chunk_size: keys per online-softmax block (the CPU kernel's knob; CUDA ignores it).
        out: optional (B, Lq, H*D) output; default a NaN-poisoned new tensor, so an element the
            kernel forgets to write shows up as NaN.

    Returns:
        The filled params with the output and mask tensors they point into.

    Raises:
        ValueError: the library's params filler refuses the call (dtypes, devices, sizes).
    """
    if out is None:
        out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    allowed = None if mask is None else mask.to(device=q.device, dtype=torch.bool)
    params = attention_params(lib, strided(q), strided(k), strided(v), strided(out), num_heads,
                              mask=None if allowed is None else strided(allowed), causal=causal,
                              scale=scale, chunk_size=chunk_size, device=q.device.type)
    return PreparedCall(params=params, out=out, mask=allowed)


def run_prepared(lib: NativeLibrary, call: PreparedCall, device: torch.device) -> None:
    """Launch one prepared call: CUDA on the current torch stream, CPU serially. Raises on error."""
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device).cuda_stream
        check(lib.forward_cuda(call.params, stream), "flash_export_attention_forward_cuda")
    else:
        check(lib.forward_cpu(call.params), "flash_export_attention_forward_cpu")


def native_attention(lib: NativeLibrary, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     num_heads: int, *, mask: Optional[torch.Tensor] = None,
                     causal: bool = False, scale: Optional[float] = None,
                     chunk_size: int = 64) -> torch.Tensor:
    """Attention through the native core on q's device; returns (B, Lq, H*D) in q's dtype."""
    call = prepare_call(lib, q, k, v, num_heads, mask=mask, causal=causal, scale=scale,
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
    """reference_attention_core on (B, L, H*D) tensors, computed in `compute_dtype` on q's device.

    With float64 this is the reference; with q's own dtype it is PyTorch's same-dtype computation
    whose error sets the tolerance.

    Returns:
        (B, Lq, H*D) in `compute_dtype`.
    """
    qh, kh, vh = (split_heads(x, num_heads).to(compute_dtype) for x in (q, k, v))  # (B, H, L, D)
    allowed = None if mask is None else mask.to(device=q.device, dtype=torch.bool)
    scale = 1.0 / math.sqrt(qh.shape[-1]) if scale is None else scale
    out = reference_attention_core(qh, kh, vh, allowed, causal, scale)  # (B, H, Lq, D)
    return out.transpose(1, 2).reshape(q.shape)  # (B, Lq, H*D)


def compare_to_reference(out: torch.Tensor, reference64: torch.Tensor,
                         baseline: torch.Tensor) -> Tuple[Comparison, float]:
    """The tolerance rule for `out` against the float64 reference, and the baseline's own error;
    `baseline` is PyTorch's computation in out's dtype."""
    ref = reference64.double().cpu().numpy()
    base_error = max_abs_error(baseline.double().cpu().numpy(), ref)
    verdict = compare(out.double().cpu().numpy(), ref, baseline_error=base_error,
                      dtype=str(out.dtype).replace("torch.", ""))
    return verdict, base_error

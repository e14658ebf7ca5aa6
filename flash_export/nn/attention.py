"""FlashAttention: multi-head attention over key/value chunks with an online softmax.

The fast path (`flash_attention_core`) never materialises the (Lq, Lk) score matrix: it walks the
keys in chunks of `chunk_size`, keeping a running max `m`, a running sum `l` and an unnormalised
output `acc` per query row (Dao et al., 2022). The plain path (`reference_attention_core`) is
matmul-softmax-matmul in whatever dtype it is given; tests and `validate` run it in float64.

Argument order: the public `forward(values, keys, queries, mask)` keeps the original module's
order (as do `check_inputs` and `reference_forward`, which mirror it); everything below it takes
(query, key, value), as the ONNX node and PyTorch's attention functions do.

Both cores take (B, H, L, D) tensors and an optional boolean `allowed` mask broadcastable to
(B, H, Lq, Lk), True where a query may attend to a key. Masking decides visibility, values decide
numbers: a query row that sees no key gives zeros; a row that sees keys whose logits are all -inf
has no defined softmax and gives NaN (as does a +inf or NaN logit).
"""

import math
from typing import List, Optional

import torch
from torch import Tensor, nn

# How FlashAttention.attend computes (its `attention` argument).
ATTENTION_KINDS = ("chunk", "native")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs accumulate in float32; float32/float64 keep their own precision.
    if dtype == torch.float16 or dtype == torch.bfloat16:
        return torch.float32
    return dtype


def _causal_allowed(q_start: int, q_end: int, k_start: int, k_end: int, lq: int, lk: int,
                    device: torch.device) -> Tensor:
    """Bottom-right aligned causal mask block: query i sees key j iff j <= i + (Lk - Lq)."""
    rows = torch.arange(q_start, q_end, device=device).unsqueeze(1)  # (Lq_blk, 1)
    cols = torch.arange(k_start, k_end, device=device).unsqueeze(0)  # (1, C)
    return cols <= rows + (lk - lq)  # (Lq_blk, C)


def flash_attention_core(q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor],
                         causal: bool, scale: float, chunk_size: int) -> Tensor:
    """Attention with an online softmax over key chunks.

    Args:
        q: (B, H, Lq, D) queries, any float dtype.
        k: (B, H, Lk, D) keys, same dtype as `q`.
        v: (B, H, Lk, D) values, same dtype as `q`.
        allowed: optional bool mask broadcastable to (B, H, Lq, Lk), True = may attend.
        causal: block keys after the query (bottom-right aligned when Lq != Lk).
        scale: multiplies the logits, usually 1/sqrt(D).
        chunk_size: keys per online-softmax step (>= 1).

    Returns:
        (B, H, Lq, D) in the dtype of `q`; rows that see no key are zeros, rows whose visible
        logits are all -inf are NaN.
    """
    out_dtype = q.dtype
    acc_dtype = _compute_dtype(q.dtype)
    q = q.to(acc_dtype) * scale  # (B, H, Lq, D)
    k = k.to(acc_dtype)  # (B, H, Lk, D)
    v = v.to(acc_dtype)  # (B, H, Lk, D)
    lq = q.size(2)
    lk = k.size(2)
    if not causal:
        return _online_softmax(q, k, v, allowed, False, 0, lq, lk, chunk_size).to(out_dtype)
    # Causal: walk the queries in blocks so each block stops at its last visible key, which
    # skips the key chunks above the diagonal (about half the work when Lq == Lk).
    q_block = max(chunk_size, 512)
    blocks: List[Tensor] = []
    for q_start in range(0, lq, q_block):
        q_end = min(q_start + q_block, lq)
        k_stop = min(lk, max(0, q_end + lk - lq))  # keys j < k_stop are visible to some row
        rows = allowed
        if rows is not None and rows.size(2) != 1:
            rows = rows[:, :, q_start:q_end]
        blocks.append(_online_softmax(q[:, :, q_start:q_end], k, v, rows, True, q_start, lq,
                                      k_stop, chunk_size))
    if len(blocks) == 0:
        return q.to(out_dtype)  # Lq == 0: (B, H, 0, D)
    return torch.cat(blocks, dim=2).to(out_dtype)


def _online_softmax(q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor], causal: bool,
                    q_start: int, lq: int, k_stop: int, chunk_size: int) -> Tensor:
    """One query block of `flash_attention_core`, keys [0, k_stop), in the accumulation dtype.

    q is the scaled (B, H, Lq_blk, D) block starting at row `q_start` of `lq`; k and v are the
    full (B, H, Lk, D) tensors; `allowed` is already sliced to the block's rows.
    """
    lk = k.size(2)
    rows = q.size(2)
    row_shape: List[int] = [q.size(0), q.size(1), rows, 1]
    m = torch.full(row_shape, -math.inf, dtype=q.dtype, device=q.device)  # (B, H, Lq_blk, 1)
    l_sum = torch.zeros(row_shape, dtype=q.dtype, device=q.device)  # (B, H, Lq_blk, 1)
    acc = torch.zeros_like(q)  # (B, H, Lq_blk, D)
    # Whether each row has seen a visible key: l_sum == 0 cannot tell a row that saw none (zeros)
    # from one whose visible logits were all -inf (NaN, as softmax gives it).
    seen = torch.full(row_shape, k_stop > 0 and allowed is None and not causal,
                      dtype=torch.bool, device=q.device)  # (B, H, Lq_blk, 1)
    for start in range(0, k_stop, chunk_size):
        end = min(start + chunk_size, k_stop)
        s = torch.matmul(q, k[:, :, start:end].transpose(-2, -1))  # (B, H, Lq_blk, C)
        visible: Optional[Tensor] = None  # broadcastable to (B, H, Lq_blk, C)
        if allowed is not None:
            visible = allowed if allowed.size(-1) == 1 else allowed[..., start:end]
        if causal:
            in_causal = _causal_allowed(q_start, q_start + rows, start, end, lq, lk, q.device)
            visible = in_causal if visible is None else visible & in_causal
        if visible is not None:
            s = s.masked_fill(torch.logical_not(visible), -math.inf)
            seen = seen | visible.any(dim=-1, keepdim=True)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))  # (B, H, Lq_blk, 1)
        # A row that has seen only blocked keys keeps m = -inf; shift it by 0 instead so that
        # exp(-inf - shift) is 0 rather than NaN.
        shift = torch.where(torch.isinf(m_new) & (m_new < 0), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - shift)  # (B, H, Lq_blk, C)
        alpha = torch.exp(m - shift)  # (B, H, Lq_blk, 1), rescales what came before
        l_sum = l_sum * alpha + p.sum(dim=-1, keepdim=True)
        acc = acc * alpha + torch.matmul(p, v[:, :, start:end])  # (B, H, Lq_blk, D)
        m = m_new
    # Rows that saw no key are zeros, never 0/0 (nor a NaN gradient through the other branch). A
    # row that saw keys with all logits -inf has l_sum == 0 and acc == 0: 0/0, NaN. A NaN that
    # reached l_sum stays NaN.
    return torch.where(seen, acc / torch.where(seen, l_sum, torch.ones_like(l_sum)),
                       torch.zeros_like(acc))


def reference_attention_core(q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor],
                             causal: bool, scale: float) -> Tensor:
    """Plain matmul-softmax-matmul attention in the dtype of its inputs (float64 for a reference).

    Args:
        q: (B, H, Lq, D) queries.
        k: (B, H, Lk, D) keys.
        v: (B, H, Lk, D) values.
        allowed: optional bool mask broadcastable to (B, H, Lq, Lk), True = may attend.
        causal: bottom-right aligned causal mask.
        scale: multiplies the logits.

    Returns:
        (B, H, Lq, D); rows that see no key are zeros.
    """
    lq = q.size(2)
    lk = k.size(2)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    visible = torch.ones(s.shape, dtype=torch.bool, device=q.device)  # (B, H, Lq, Lk)
    if allowed is not None:
        visible = visible & allowed
    if causal:
        visible = visible & _causal_allowed(0, lq, 0, lk, lq, lk, q.device)
    s = s.masked_fill(torch.logical_not(visible), -math.inf)
    any_visible = visible.any(dim=-1, keepdim=True)  # (B, H, Lq, 1)
    p = torch.softmax(torch.where(any_visible, s, torch.zeros_like(s)), dim=-1)
    p = torch.where(visible, p, torch.zeros_like(p))  # (B, H, Lq, Lk)
    return torch.matmul(p, v)  # (B, H, Lq, D)


class FlashAttention(nn.Module):
    """Multi-head attention computed over key/value chunks with an online softmax.

    Memory stays O(L) per head instead of O(Lq x Lk). The chunk loop is static, so the module is
    `torch.jit.script`-able and sequence lengths stay dynamic.

    Args:
        embed_size: E, the embedding size of values, keys and queries.
        heads: H, the number of heads; E must be divisible by H.
        chunk_size: keys per online-softmax step (>= 1). Results do not depend on it beyond
            rounding.
        causal: block keys after each query, bottom-right aligned (query i sees keys
            j <= i + Lk - Lq), as FlashAttention 2 does.
        bias: whether the four projections have biases.
        attention: how `attend` computes: "chunk" (the default), the chunk loop below in
            plain PyTorch, scriptable and loadable by any libtorch; or "native", the registered
            operator `flash_export::attention` (`flash_export.nn.torch_op`: our C++ kernel core,
            inference only), which `torch.export` and AOTInductor see as one op and a C++
            process runs through the libtorch shim (custom_ops/torch).
    """

    embed_size: torch.jit.Final[int]
    heads: torch.jit.Final[int]
    head_dim: torch.jit.Final[int]
    chunk_size: torch.jit.Final[int]
    causal: torch.jit.Final[bool]
    scale: torch.jit.Final[float]
    native: torch.jit.Final[bool]
    __jit_unused_properties__ = ["has_bias", "attention"]

    def __init__(self, embed_size: int, heads: int, chunk_size: int = 64, *,
                 causal: bool = False, bias: bool = True, attention: str = "chunk") -> None:
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        if embed_size < 1 or embed_size % heads != 0:
            raise ValueError(
                f"embed_size must be a positive multiple of heads ({heads}), got {embed_size}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.embed_size = embed_size
        self.heads = heads
        self.head_dim = embed_size // heads
        self.chunk_size = chunk_size
        self.causal = causal
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.native = attention == "native"
        if self.native:
            from flash_export.nn.torch_op import register

            register()
        self.q_proj = nn.Linear(embed_size, embed_size, bias=bias)
        self.k_proj = nn.Linear(embed_size, embed_size, bias=bias)
        self.v_proj = nn.Linear(embed_size, embed_size, bias=bias)
        self.out_proj = nn.Linear(embed_size, embed_size, bias=bias)

    @property
    def has_bias(self) -> bool:
        """Whether the projections carry biases."""
        return self.q_proj.bias is not None

    @property
    def attention(self) -> str:
        """"native" when `attend` runs the registered operator, else "chunk"."""
        return "native" if self.native else "chunk"

    def extra_repr(self) -> str:  # noqa: D102
        return (f"embed_size={self.embed_size}, heads={self.heads}, "
                f"chunk_size={self.chunk_size}, causal={self.causal}"
                + (", attention=native" if self.native else ""))

    def forward(self, values: Tensor, keys: Tensor, queries: Tensor,
                mask: Optional[Tensor] = None) -> Tensor:
        """Attend from `queries` to `keys`, mixing `values`.

        Args:
            values: (B, Lk, E) float tensor.
            keys: (B, Lk, E), same dtype as `values`.
            queries: (B, Lq, E), same dtype; Lq may differ from Lk.
            mask: optional tensor of any dtype broadcastable to (B, heads, Lq, Lk); positions
                where `mask == 0` are blocked.

        Returns:
            (B, Lq, E) in the input dtype.
        """
        allowed = self.check_inputs(values, keys, queries, mask)
        q = self.q_proj(queries)  # (B, Lq, E)
        k = self.k_proj(keys)  # (B, Lk, E)
        v = self.v_proj(values)  # (B, Lk, E)
        o = self.attend(q, k, v, allowed)  # (B, Lq, E)
        return self.out_proj(o)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor]) -> Tensor:
        """Attention between projected tensors: (B, Lq, E), (B, Lk, E) x2 -> (B, Lq, E).

        Export adapters and the float64 reference override this one method, so every
        implementation shares the projections and the input checks above.
        """
        if self.native:  # a constant: TorchScript compiles this branch only for native modules
            return torch.ops.flash_export.attention(q, k, v, allowed, self.heads,
                                                    self.chunk_size, self.causal,
                                                    self.scale)  # (B, Lq, E)
        o = flash_attention_core(self.split_heads(q), self.split_heads(k), self.split_heads(v),
                                 allowed, self.causal, self.scale, self.chunk_size)
        return self.merge_heads(o)

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, L, E) -> (B, H, L, D)."""
        return x.view(x.size(0), x.size(1), self.heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, x: Tensor) -> Tensor:
        """(B, H, L, D) -> (B, L, E)."""
        return x.transpose(1, 2).reshape(x.size(0), x.size(2), self.embed_size)

    def check_inputs(self, values: Tensor, keys: Tensor, queries: Tensor,
                     mask: Optional[Tensor]) -> Optional[Tensor]:
        """Raise ValueError on inputs forward cannot honour; return the mask as bool (or None)."""
        names = ["values", "keys", "queries"]
        tensors = [values, keys, queries]
        for i in range(3):
            t = tensors[i]
            if t.dim() != 3:
                raise ValueError(f"{names[i]} must be (B, L, {self.embed_size}), "
                                 f"got a tensor of rank {t.dim()}")
            if t.size(2) != self.embed_size:
                raise ValueError(f"{names[i]} must have embed size {self.embed_size}, "
                                 f"got {t.size(2)}")
            if t.size(0) != queries.size(0):
                raise ValueError(f"{names[i]} has batch {t.size(0)}, expected "
                                 f"{queries.size(0)} (the batch of queries)")
        if values.size(1) != keys.size(1):
            raise ValueError(f"values and keys must have the same length, got "
                             f"{values.size(1)} and {keys.size(1)}")
        if mask is None:
            return None
        target = [queries.size(0), self.heads, queries.size(1), keys.size(1)]
        if mask.dim() > 4:
            raise ValueError(f"mask must broadcast to (B, H, Lq, Lk) = {target}, "
                             f"got rank {mask.dim()} shape {list(mask.shape)}")
        offset = 4 - mask.dim()
        for i in range(mask.dim()):
            size = mask.size(i)
            if size != 1 and size != target[offset + i]:
                raise ValueError(f"mask of shape {list(mask.shape)} does not broadcast to "
                                 f"(B, H, Lq, Lk) = {target}")
        allowed = mask != 0
        while allowed.dim() < 4:
            allowed = allowed.unsqueeze(0)
        return allowed  # broadcastable to (B, H, Lq, Lk)

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention,
                                 chunk_size: int = 64) -> "FlashAttention":
        """Copy the weights of a `torch.nn.MultiheadAttention` into a new FlashAttention.

        The result computes `mha(queries, keys, values, need_weights=False)[0]` for a
        batch-first `mha` (dropout aside).

        Raises:
            ValueError: `mha` uses separate key/value sizes, bias_kv or add_zero_attn.
        """
        if not mha._qkv_same_embed_dim:
            raise ValueError(f"keys and values must have embed size {mha.embed_dim}, got kdim "
                             f"{mha.kdim} and vdim {mha.vdim}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn have no FlashAttention equivalent")
        bias = mha.in_proj_bias is not None
        fa = cls(mha.embed_dim, mha.num_heads, chunk_size, bias=bias)
        fa.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        e = mha.embed_dim
        with torch.no_grad():
            for i, proj in enumerate((fa.q_proj, fa.k_proj, fa.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * e:(i + 1) * e])
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[i * e:(i + 1) * e])
            fa.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                fa.out_proj.bias.copy_(mha.out_proj.bias)
        return fa


class ReferenceAttention(FlashAttention):
    """FlashAttention computed with plain matmul-softmax-matmul (used as a float64 reference)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor]) -> Tensor:
        """(B, Lq, E), (B, Lk, E) x2 -> (B, Lq, E) without chunking."""
        o = reference_attention_core(self.split_heads(q), self.split_heads(k),
                                     self.split_heads(v), allowed, self.causal, self.scale)
        return self.merge_heads(o)

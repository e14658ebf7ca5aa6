"""The Transformer block every zoo model stacks: attention and an MLP, each with a residual."""

from typing import Optional

from torch import Tensor, nn

from flash_export.attention import FlashAttention


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    Args:
        embed_size: E.
        heads: H, dividing E.
        chunk_size: keys per online-softmax step.
        causal: causal self-attention.
        mlp_ratio: the MLP's hidden size over E.
    """

    def __init__(self, embed_size: int, heads: int, chunk_size: int, *, causal: bool = False,
                 mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_size)
        self.attention = FlashAttention(embed_size, heads, chunk_size, causal=causal)
        self.norm2 = nn.LayerNorm(embed_size)
        self.mlp = nn.Sequential(nn.Linear(embed_size, mlp_ratio * embed_size), nn.GELU(),
                                 nn.Linear(mlp_ratio * embed_size, embed_size))

    def forward(self, x: Tensor, allowed: Optional[Tensor] = None) -> Tensor:
        """x: (B, L, E); allowed: bool broadcastable to (B, H, L, L), True = may attend."""
        h = self.norm1(x)  # (B, L, E)
        x = x + self.attention(h, h, h, allowed)  # (B, L, E)
        return x + self.mlp(self.norm2(x))  # (B, L, E)

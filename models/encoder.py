"""A Transformer encoder stack built from FlashAttention: attention, MLP, LayerNorms, residuals.

Export it with `flash-export onnx --model models/encoder.py:build out.onnx` (or `torchscript`).
The forward follows flash-export's model contract: (values, keys, queries, mask=None) -> (B, Lq, E).
"""

from typing import Optional

import torch
from torch import Tensor, nn

from flash_export import FlashAttention


class EncoderBlock(nn.Module):
    """Post-norm Transformer block: x = norm1(attn(v, k, q) + q); out = norm2(mlp(x) + x)."""

    def __init__(self, embed_size: int, heads: int, chunk_size: int = 64, *,
                 causal: bool = False, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.attention = FlashAttention(embed_size, heads, chunk_size, causal=causal)
        self.norm1 = nn.LayerNorm(embed_size)
        self.norm2 = nn.LayerNorm(embed_size)
        self.mlp = nn.Sequential(
            nn.Linear(embed_size, mlp_ratio * embed_size),
            nn.GELU(),
            nn.Linear(mlp_ratio * embed_size, embed_size),
        )

    def forward(self, values: Tensor, keys: Tensor, queries: Tensor,
                mask: Optional[Tensor] = None) -> Tensor:
        """values, keys: (B, Lk, E); queries: (B, Lq, E); mask broadcastable to (B, H, Lq, Lk)."""
        x = self.norm1(self.attention(values, keys, queries, mask) + queries)  # (B, Lq, E)
        return self.norm2(self.mlp(x) + x)  # (B, Lq, E)


class Encoder(nn.Module):
    """`layers` EncoderBlocks: the first attends from queries to keys/values, later ones to x."""

    def __init__(self, embed_size: int, heads: int, chunk_size: int = 64, *,
                 causal: bool = False, layers: int = 2) -> None:
        super().__init__()
        self.first = EncoderBlock(embed_size, heads, chunk_size, causal=causal)
        self.rest = nn.ModuleList(
            [EncoderBlock(embed_size, heads, chunk_size, causal=causal)
             for _ in range(layers - 1)])

    def forward(self, values: Tensor, keys: Tensor, queries: Tensor,
                mask: Optional[Tensor] = None) -> Tensor:
        """values, keys: (B, Lk, E); queries: (B, Lq, E) -> (B, Lq, E).

        The mask applies to the first block only (later blocks attend over Lq, not Lk).
        """
        x = self.first(values, keys, queries, mask)  # (B, Lq, E)
        for block in self.rest:
            x = block(x, x, x)  # (B, Lq, E)
        return x


def build(embed_size: int = 128, heads: int = 8, chunk_size: int = 64, causal: bool = False,
          layers: int = 2) -> Encoder:
    """Factory used by `--model models/encoder.py:build`."""
    return Encoder(embed_size, heads, chunk_size, causal=causal, layers=layers)


if __name__ == "__main__":
    model = build().eval()
    x = torch.rand(1, 50, 128)
    print(model(x, x, x).shape)

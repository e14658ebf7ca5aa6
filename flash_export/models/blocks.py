"""What the zoo's models share: the Transformer block they stack and a token embedding."""

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from flash_export.core.io_spec import TensorSpec
from flash_export.nn.attention import FlashAttention


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


class TokenEmbedding(nn.Module):
    """Token ids -> token + learned position embeddings (so sequences are at most max_len).

    Args:
        vocab_size: the number of token ids.
        max_len: the longest sequence.
        embed_size: E.
    """

    def __init__(self, vocab_size: int, max_len: int, embed_size: int) -> None:
        super().__init__()
        self.vocab_size, self.max_len = vocab_size, max_len
        self.tokens = nn.Embedding(vocab_size, embed_size)
        self.positions = nn.Embedding(max_len, embed_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids: (B, L) int64 -> (B, L, E)."""
        positions = torch.arange(input_ids.size(1), device=input_ids.device)  # (L,)
        return self.tokens(input_ids) + self.positions(positions)  # (B, L, E)

    def ids_spec(self) -> TensorSpec:
        """The token ids input: (batch, seq) int64 in the vocabulary."""
        return TensorSpec("input_ids", "int64", ("batch", "seq"), 0, self.vocab_size)

    def sizes(self) -> Dict[str, Tuple[int, Optional[int]]]:
        """Any batch, and sequences of 1 to max_len tokens."""
        return {"batch": (1, None), "seq": (1, self.max_len)}

"""A Transformer encoder stack: features and an optional padding mask -> features.

Pre-norm FlashAttention blocks (attention, MLP, LayerNorms, residuals) over (B, L, E) features,
causal when asked; the padding mask follows Hugging Face's convention (True = a real token).
"""

from typing import Optional

from torch import Tensor, nn

from flash_export.core.io_spec import IOSpec, TensorSpec
from flash_export.models.blocks import Block


class Encoder(nn.Module):
    """forward(x (B, L, E), padding_mask (B, L) bool or None) -> (B, L, E)."""

    def __init__(self, embed_size: int = 128, heads: int = 8, chunk_size: int = 64, *,
                 causal: bool = False, layers: int = 2) -> None:
        super().__init__()
        self.embed_size = embed_size
        self.blocks = nn.ModuleList(Block(embed_size, heads, chunk_size, causal=causal)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(embed_size)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """x: (B, L, E); padding_mask: (B, L) bool, True = a real token."""
        allowed = None if padding_mask is None else padding_mask[:, None, None, :]  # (B,1,1,L)
        for block in self.blocks:
            x = block(x, allowed)  # (B, L, E)
        return self.norm(x)  # (B, L, E)

    def io_spec(self) -> IOSpec:
        """Features and their padding mask; features out; one request per batch row."""
        return IOSpec((TensorSpec("x", "float32", ("batch", "seq", self.embed_size)),
                       TensorSpec("padding_mask", "bool", ("batch", "seq"), role="padding")),
                      ("output",), {"batch": (1, None), "seq": (1, None)}, batch="batch")


def build(embed_size: int = 128, heads: int = 8, chunk_size: int = 64, causal: bool = False,
          layers: int = 2) -> Encoder:
    """`--model flash_export.models.encoder:build`."""
    return Encoder(embed_size, heads, chunk_size, causal=causal, layers=layers)

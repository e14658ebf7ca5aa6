"""A BERT-style encoder: token ids and a padding mask -> one hidden state per token.

Learned positions, an embedding LayerNorm, bidirectional FlashAttention blocks that never look at
padding, a final LayerNorm. The mask follows Hugging Face's `attention_mask`: True (1) marks a
real token.
"""

from torch import Tensor, nn

from flash_export.core.io_spec import IOSpec, TensorSpec
from flash_export.models.blocks import Block, TokenEmbedding


class Bert(nn.Module):
    """forward(input_ids (B, L) int64, attention_mask (B, L) bool) -> (B, L, E)."""

    def __init__(self, embed_size: int = 128, heads: int = 8, chunk_size: int = 64, *,
                 layers: int = 2, vocab_size: int = 1024, max_len: int = 1024) -> None:
        super().__init__()
        self.embed = TokenEmbedding(vocab_size, max_len, embed_size)
        self.embed_norm = nn.LayerNorm(embed_size)
        self.blocks = nn.ModuleList(Block(embed_size, heads, chunk_size)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(embed_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids: (B, L) int64; attention_mask: (B, L) bool, True = a real token."""
        x = self.embed_norm(self.embed(input_ids))  # (B, L, E)
        allowed = attention_mask[:, None, None, :]  # (B, 1, 1, L): keys that are real tokens
        for block in self.blocks:
            x = block(x, allowed)  # (B, L, E)
        return self.norm(x)  # (B, L, E)

    def io_spec(self) -> IOSpec:
        """Token ids and their padding mask (at most max_len); hidden states; a request per row."""
        return IOSpec((self.embed.ids_spec(),
                       TensorSpec("attention_mask", "bool", ("batch", "seq"), role="padding")),
                      ("last_hidden_state",), self.embed.sizes(), batch="batch")


def build(embed_size: int = 128, heads: int = 8, chunk_size: int = 64, causal: bool = False,
          layers: int = 2, vocab_size: int = 1024, max_len: int = 1024) -> Bert:
    """`--model flash_export.models.bert:build`. An encoder is bidirectional whatever `causal`."""
    return Bert(embed_size, heads, chunk_size, layers=layers, vocab_size=vocab_size,
                max_len=max_len)

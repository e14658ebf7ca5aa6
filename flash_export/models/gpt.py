"""A decoder-only language model: token ids -> next-token logits (GPT-2's shape, small).

Learned positions (so sequences are at most `max_len` long), causal FlashAttention blocks, a
final LayerNorm and an output projection tied to the token embedding.
"""

from torch import Tensor, nn

from flash_export.core.io_spec import IOSpec
from flash_export.models.blocks import Block, TokenEmbedding


class GPT(nn.Module):
    """forward(input_ids (B, L) int64 in [0, vocab_size)) -> logits (B, L, vocab_size)."""

    def __init__(self, embed_size: int = 128, heads: int = 8, chunk_size: int = 64, *,
                 layers: int = 2, vocab_size: int = 1024, max_len: int = 1024) -> None:
        super().__init__()
        self.embed = TokenEmbedding(vocab_size, max_len, embed_size)
        self.blocks = nn.ModuleList(Block(embed_size, heads, chunk_size, causal=True)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(embed_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids: (B, L) int64 -> logits (B, L, vocab_size), float."""
        x = self.embed(input_ids)  # (B, L, E)
        for block in self.blocks:
            x = block(x)  # (B, L, E)
        return self.norm(x) @ self.embed.tokens.weight.t()  # (B, L, V), tied weights

    def io_spec(self) -> IOSpec:
        """Token ids in the vocabulary, at most max_len of them; logits out; one request per row."""
        return IOSpec((self.embed.ids_spec(),), ("logits",), self.embed.sizes(), batch="batch")


def build(embed_size: int = 128, heads: int = 8, chunk_size: int = 64, causal: bool = True,
          layers: int = 2, vocab_size: int = 1024, max_len: int = 1024) -> GPT:
    """`--model flash_export.models.gpt:build`. A language model is causal whatever `causal`."""
    return GPT(embed_size, heads, chunk_size, layers=layers, vocab_size=vocab_size,
               max_len=max_len)

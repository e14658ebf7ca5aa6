"""A small vision transformer: RGB images -> class logits (ViT's shape, CIFAR-sized).

4 x 4 patches of a 32 x 32 image (64 tokens) plus a class token, learned positions,
bidirectional FlashAttention blocks, a LayerNorm and a linear head on the class token. The
sequence length is fixed by the image size: only the batch is dynamic.
"""

import torch
from torch import Tensor, nn

from flash_export.core.io_spec import IOSpec, TensorSpec
from flash_export.models.blocks import Block


class ViT(nn.Module):
    """forward(images (B, 3, S, S) float) -> logits (B, classes)."""

    def __init__(self, embed_size: int = 128, heads: int = 8, chunk_size: int = 64, *,
                 layers: int = 2, image_size: int = 32, patch_size: int = 4,
                 classes: int = 10) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide image_size {image_size}")
        self.image_size = image_size
        self.patches = nn.Conv2d(3, embed_size, patch_size, stride=patch_size)
        tokens = (image_size // patch_size) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, embed_size))
        self.positions = nn.Parameter(torch.randn(1, tokens, embed_size) * 0.02)
        self.blocks = nn.ModuleList(Block(embed_size, heads, chunk_size) for _ in range(layers))
        self.norm = nn.LayerNorm(embed_size)
        self.head = nn.Linear(embed_size, classes)

    def forward(self, images: Tensor) -> Tensor:
        """images: (B, 3, S, S) -> logits (B, classes)."""
        x = self.patches(images).flatten(2).transpose(1, 2)  # (B, P, E)
        x = torch.cat([self.cls.expand(x.size(0), -1, -1), x], dim=1) + self.positions  # (B, T, E)
        for block in self.blocks:
            x = block(x)  # (B, T, E)
        return self.head(self.norm(x[:, 0]))  # (B, classes)

    def io_spec(self) -> IOSpec:
        """RGB images of the model's size; class logits out; one request per image (batch row)."""
        size = self.image_size
        return IOSpec((TensorSpec("images", "float32", ("batch", 3, size, size)),),
                      ("logits",), {"batch": (1, None)}, batch="batch")


def build(embed_size: int = 128, heads: int = 8, chunk_size: int = 64, causal: bool = False,
          layers: int = 2, image_size: int = 32, patch_size: int = 4, classes: int = 10) -> ViT:
    """`--model flash_export.models.vit:build`. Attention over patches is bidirectional."""
    return ViT(embed_size, heads, chunk_size, layers=layers, image_size=image_size,
               patch_size=patch_size, classes=classes)

"""Small exported models of every batch layout, for the dynamic-batching tests.

Each is a real model converted with `flash_export.convert` (PyTorch's own encoder layers, so the
attention mixes every position of a sequence and a request joined on the wrong axis shows at
once) and exported with example inputs, the way a user does; its IOSpec is whatever
`derive_io` makes of it.

- ``seq_first``: PyTorch's default `nn.TransformerEncoder` (batch_first=False), (L, B, E) in
  and out: the batch is axis 1.
- ``lbe_out``: a batch-first encoder with a padding mask, returning (L, B, E): the inputs'
  batch is axis 0, the output's axis 1.
- ``both``: declares `batch_first = False`; (L, B, E) in, one output per layout.
- ``undeclared``: seq-first self-attention in a wrapper that declares nothing: never batched.
- ``attention``: the attention contract with a mask (batch axis 0 everywhere).
"""

from pathlib import Path
from typing import Dict

import numpy as np
import torch
from torch import nn

from flash_export import FlashAttention, convert
from flash_export.export.onnx import export_onnx

E, HEADS = 16, 2


def _encoder(batch_first: bool) -> nn.Module:
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)


class LBEOut(nn.Module):
    """Batch-first in (with a padding mask), (L, B, E) out."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _encoder(True)

    def forward(self, x, padding_mask):
        return self.encoder(x, src_key_padding_mask=padding_mask).transpose(0, 1)


class Both(nn.Module):
    """(L, B, E) in; (L, B, E) and (B, L, E) out."""

    batch_first = False

    def __init__(self) -> None:
        super().__init__()
        self.seq_first, self.batch_first_encoder = _encoder(False), _encoder(True)

    def forward(self, src):
        return self.seq_first(src), self.batch_first_encoder(src.transpose(0, 1))


class Undeclared(nn.Module):
    """Self-attention over (L, B, E) in a wrapper that says nothing about its layout."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = FlashAttention(E, HEADS, 4)

    def forward(self, x):
        y = x.transpose(0, 1)  # (B, L, E)
        return self.attention(y, y, y).transpose(0, 1)  # (L, B, E)


def export_all(folder: Path, names=None) -> Dict[str, Path]:
    """name -> the exported .onnx, for the models named (default: all)."""
    torch.manual_seed(0)
    builders = {
        "seq_first": lambda: (_encoder(False), (torch.randn(5, 2, E),), {}),
        "lbe_out": lambda: (LBEOut(), (torch.randn(2, 5, E), torch.zeros(2, 5, dtype=torch.bool)),
                            {}),
        "both": lambda: (Both(), (torch.randn(5, 2, E),), {}),
        "undeclared": lambda: (Undeclared(), (torch.randn(5, 2, E),), {}),
    }
    out = {}
    for name in names or [*builders, "attention"]:
        path = folder / f"{name}.onnx"
        if name == "attention":
            out[name] = export_onnx(FlashAttention(E, HEADS, 4).eval(), path, mask=True)
            continue
        model, args, kwargs = builders[name]()
        if name != "undeclared":
            model = convert(model, chunk_size=4)
        out[name] = export_onnx(model.eval(), path, args=args, kwargs=kwargs)
    return out


def feed(name: str, rng: np.random.Generator, batch: int, length: int) -> Dict[str, np.ndarray]:
    """One request for model `name`: `batch` rows of `length` positions."""
    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    if name in ("seq_first", "both", "undeclared"):
        return {"src" if name != "undeclared" else "x": normal(length, batch, E)}
    if name == "lbe_out":
        lengths = rng.integers(1, length + 1, size=batch)
        return {"x": normal(batch, length, E),
                "padding_mask": np.arange(length)[None, :] >= lengths[:, None]}
    k_len = length + 2
    return {"values": normal(batch, k_len, E), "keys": normal(batch, k_len, E),
            "queries": normal(batch, length, E),
            "mask": rng.random((batch, 1, length, k_len)) > 0.25}

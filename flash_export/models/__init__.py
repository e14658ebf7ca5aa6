"""The model zoo: models people deploy, built from FlashAttention, each with a `build` factory.

Use one with `--model flash_export.models.NAME:build` (no file needed after `pip install`):

- ``gpt``: a decoder-only language model, token ids -> logits (causal, tied embeddings).
- ``bert``: a BERT-style encoder, token ids + padding mask -> hidden states.
- ``vit``: a small vision transformer, 32x32 RGB images -> class logits.
- ``encoder``: a Transformer encoder stack, features (+ padding mask) -> features.

Every factory takes `embed_size`, `heads`, `chunk_size` and `causal` (what `ModelSpec` passes)
plus its own keyword options, and every model declares its inputs with `io_spec()`.
May import `nn` and `core`; the exporters, checks and CLI build on it.
"""

ZOO = ("gpt", "bert", "vit", "encoder")

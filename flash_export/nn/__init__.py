"""The nn layer: the PyTorch side of a model.

`FlashAttention` and its float64 reference, the `flash_export::attention` torch op, `convert` for
nn.MultiheadAttention models, attention swaps, how a model meets its IOSpec (`model_io`), the
`ModelSpec` that rebuilds a model and what an artifact records about it (`recorded`). May import
`runtime`, `artifacts` and `core`; torch is imported by the modules that need it, never by the
package itself.
"""

"""Compatibility alias for the original README: `from flash_attention import FlashAttention`."""

from flash_export.nn.attention import FlashAttention

__all__ = ["FlashAttention"]

"""Compatibility alias for the original README: `from flash_attention import FlashAttention`."""

from flash_export.attention import FlashAttention

__all__ = ["FlashAttention"]

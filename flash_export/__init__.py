"""flash-export: take a chunked FlashAttention module to TorchScript and onnxruntime."""

from flash_export._version import __version__
from flash_export.attention import (
    FlashAttention,
    ReferenceAttention,
    flash_attention_core,
    reference_attention_core,
    reference_forward,
    replace_attention,
)
from flash_export.errors import (
    ArtifactError,
    ExportError,
    FlashExportError,
    ModelError,
    RuntimeLibraryError,
    ValidationError,
)
from flash_export.export import export_torchscript, load_torchscript
from flash_export.spec import ModelSpec

__all__ = [
    "ArtifactError",
    "ExportError",
    "FlashAttention",
    "FlashExportError",
    "ModelError",
    "ModelSpec",
    "ReferenceAttention",
    "RuntimeLibraryError",
    "ValidationError",
    "__version__",
    "export_torchscript",
    "flash_attention_core",
    "load_torchscript",
    "reference_attention_core",
    "reference_forward",
    "replace_attention",
]

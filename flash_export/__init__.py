"""flash-export: take a chunked FlashAttention module to TorchScript and onnxruntime.

Attributes and submodules load lazily (PEP 562): `import flash_export` imports neither torch nor
onnxruntime, and `flash_export.runtime` (torch-free) works right after it.
"""

import importlib
from typing import TYPE_CHECKING, Any

from flash_export._version import __version__

_EXPORTS = {
    "FlashAttention": "flash_export.attention",
    "ReferenceAttention": "flash_export.attention",
    "flash_attention_core": "flash_export.attention",
    "reference_attention_core": "flash_export.attention",
    "reference_forward": "flash_export.attention_swap",
    "replace_attention": "flash_export.attention_swap",
    "FlashMultiheadAttention": "flash_export.conversion",
    "convert": "flash_export.conversion",
    "ArtifactError": "flash_export.errors",
    "ConversionError": "flash_export.errors",
    "ExportError": "flash_export.errors",
    "FlashExportError": "flash_export.errors",
    "ModelError": "flash_export.errors",
    "RuntimeLibraryError": "flash_export.errors",
    "ValidationError": "flash_export.errors",
    "export_torchscript": "flash_export.export",
    "load_torchscript": "flash_export.export",
    "export_onnx": "flash_export.onnx_export",
    "export_pt2": "flash_export.pt2_export",
    "load_pt2": "flash_export.pt2_export",
    "ModelSpec": "flash_export.spec",
}

# Submodules reachable as attributes after a bare `import flash_export`.
_SUBMODULES = frozenset({
    "artifact", "bench", "bench_files", "cli", "cli_options", "cli_render", "contract",
    "conversion", "doctor", "errors", "export", "io_spec", "model_io", "onnx_export",
    "onnx_guard", "onnx_targets", "opsets", "parity", "pt2_export", "recorded", "runners",
    "runtime", "safety", "spec", "timing", "tolerance", "torch_op", "trust", "validate"})

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from flash_export.attention import (  # noqa: F401
        FlashAttention,
        ReferenceAttention,
        flash_attention_core,
        reference_attention_core,
    )
    from flash_export.attention_swap import reference_forward, replace_attention  # noqa: F401
    from flash_export.conversion import FlashMultiheadAttention, convert  # noqa: F401
    from flash_export.errors import (  # noqa: F401
        ArtifactError,
        ConversionError,
        ExportError,
        FlashExportError,
        ModelError,
        RuntimeLibraryError,
        ValidationError,
    )
    from flash_export.export import export_torchscript, load_torchscript  # noqa: F401
    from flash_export.onnx_export import export_onnx  # noqa: F401
    from flash_export.pt2_export import export_pt2, load_pt2  # noqa: F401
    from flash_export.spec import ModelSpec  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"flash_export.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flash_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(__all__)

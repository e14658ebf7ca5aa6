"""flash-export: take a chunked FlashAttention module to TorchScript and onnxruntime.

Attributes and submodules load lazily (PEP 562): `import flash_export` imports neither torch nor
onnxruntime, and `flash_export.runtime` (torch-free) works right after it. The layers are the
subpackages (docs/ARCHITECTURE.md).
"""

import importlib
from typing import TYPE_CHECKING, Any

from flash_export._version import __version__

_EXPORTS = {
    "FlashAttention": "flash_export.nn.attention",
    "ReferenceAttention": "flash_export.nn.attention",
    "flash_attention_core": "flash_export.nn.attention",
    "reference_attention_core": "flash_export.nn.attention",
    "reference_forward": "flash_export.nn.swap",
    "replace_attention": "flash_export.nn.swap",
    "FlashMultiheadAttention": "flash_export.nn.conversion",
    "convert": "flash_export.nn.conversion",
    "ArtifactError": "flash_export.core.errors",
    "ConversionError": "flash_export.core.errors",
    "ExportError": "flash_export.core.errors",
    "FlashExportError": "flash_export.core.errors",
    "ModelError": "flash_export.core.errors",
    "RuntimeLibraryError": "flash_export.core.errors",
    "ValidationError": "flash_export.core.errors",
    "export_torchscript": "flash_export.export.torchscript",
    "load_torchscript": "flash_export.export.torchscript",
    "export_onnx": "flash_export.export.onnx",
    "export_pt2": "flash_export.export.pt2",
    "load_pt2": "flash_export.export.pt2",
    "ModelSpec": "flash_export.nn.spec",
}

# Submodules reachable as attributes after a bare `import flash_export`.
# codemap: begin (python -m flash_export._codemap)
_SUBMODULES = frozenset({"artifacts", "bench", "check", "cli", "core", "export", "hf", "models",
    "nn", "runtime", "serving", "torch_op"})
# codemap: end

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from flash_export.core.errors import (  # noqa: F401
        ArtifactError,
        ConversionError,
        ExportError,
        FlashExportError,
        ModelError,
        RuntimeLibraryError,
        ValidationError,
    )
    from flash_export.export.onnx import export_onnx  # noqa: F401
    from flash_export.export.pt2 import export_pt2, load_pt2  # noqa: F401
    from flash_export.export.torchscript import export_torchscript, load_torchscript  # noqa: F401
    from flash_export.nn.attention import (  # noqa: F401
        FlashAttention,
        ReferenceAttention,
        flash_attention_core,
        reference_attention_core,
    )
    from flash_export.nn.conversion import FlashMultiheadAttention, convert  # noqa: F401
    from flash_export.nn.spec import ModelSpec  # noqa: F401
    from flash_export.nn.swap import reference_forward, replace_attention  # noqa: F401


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

"""Hugging Face transformers models computing attention with flash_export's kernel.

    import flash_export.hf
    model = flash_export.hf.swap_attention(AutoModel.from_pretrained(folder).eval())

Owns the attention and mask functions registered in transformers' `AttentionInterface` and
`AttentionMaskInterface` (`attention`), the swap that switches a model to them or refuses it
by name (`swap`), the float64 eager reference (`reference`), and the ONNX export of a swapped
model (`onnx`) and of a checkpoint folder for a task (`export`: `export_hf_onnx`). May import
torch, transformers, the exporters (`flash_export.export`: the ONNX writer and targets),
`flash_export.nn.torch_op` (the kernel as the op `flash_export::attention`) and the layers
below; the checks (`flash_export.check.hf_validate`) and the CLI build on it, never the other
way. Needs the `hf` extra: ``pip install 'flash-export[hf]'``.
"""

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a venv without the extra
    raise ImportError("flash_export.hf needs transformers: pip install 'flash-export[hf]'"
                      ) from exc

from flash_export.hf.attention import CHUNK_SIZE, IMPLEMENTATION, register
from flash_export.hf.swap import TESTED_TRANSFORMERS, refusal, swap_attention

__all__ = ["CHUNK_SIZE", "IMPLEMENTATION", "TESTED_TRANSFORMERS", "refusal", "register",
           "swap_attention"]

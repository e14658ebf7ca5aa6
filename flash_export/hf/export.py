"""Export a transformers checkpoint folder for a task: what optimum calls `--task`, on our kernel.

A checkpoint folder is what `save_pretrained` writes: `config.json` and safetensors weights
(pickle weights are refused: loading them runs code). `export_hf_onnx` loads it for a task, swaps
its attention to our kernel (`flash_export.hf.swap`) and writes one ONNX graph whose inputs
mirror optimum's (`input_ids`, `attention_mask` as 0/1 int64, `token_type_ids` where the model
has token types; `pixel_values` for images) with dynamic batch and length, one
``com.flash_export::FlashAttention`` node per attention layer, and flash-export metadata: the
IOSpec (so `validate`, `bench` and `serve` feed it like any artifact), the task, the model class,
the checkpoint's `config.json` and the SHA-256 of each weights file (so `validate` refuses a
folder that is not the one exported).
"""

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from flash_export._version import __version__
from flash_export.artifacts.files import PathLike, sha256_file
from flash_export.artifacts.kinds import require_kind
from flash_export.core.contract import DOMAIN, DOMAIN_VERSION, HF_TASKS
from flash_export.core.errors import ArtifactError, ModelError, summary
from flash_export.core.feeds import make_feed
from flash_export.core.io_spec import IOSpec, TensorSpec
from flash_export.export.opsets import choose_opset
from flash_export.hf.attention import CHUNK_SIZE
from flash_export.hf.past import WithPast, with_past_example, with_past_io
from flash_export.hf.swap import swap_attention, transformers_version

# Metadata keys of an exported checkpoint (beside every artifact's: versions, dtype, IOSpec).
TASK_KEY = "hf_task"
MODEL_CLASS_KEY = "hf_model_class"
CONFIG_KEY = "hf_config"  # config.json as exported, normalised (sorted keys)
WEIGHTS_KEY = "hf_weights"  # {file name: SHA-256} of the safetensors files
CHECKPOINT_KEY = "hf_checkpoint"  # the folder's absolute path at export: validate's default

# The example the exporter traces with: two rows, one right-padded (with an all-ones mask the
# exporter may fold the mask input away), lengths no model special-cases.
_EXAMPLE_SIZES = {"batch": 2, "seq": 17}
_EXAMPLE_PADDED = 5


@dataclasses.dataclass(frozen=True)
class Task:
    """One export task: which transformers class loads the checkpoint, what the graph gives.

    Attributes:
        name: the task's name, as optimum's `--task` spells it.
        auto_class: the transformers Auto class that loads the checkpoint for it.
        output: the model output the graph returns (also the graph output's name).
        inputs: "text" (token ids, padding mask, token types) or "image" (pixel values).
        with_past: the KV cache as inputs and outputs (`flash_export.hf.past`).
    """

    name: str
    auto_class: str
    output: str
    inputs: str
    with_past: bool = False


_IMPLEMENTATIONS = {t.name: t for t in (
    Task("feature-extraction", "AutoModel", "last_hidden_state", "text"),
    Task("text-generation", "AutoModelForCausalLM", "logits", "text"),
    Task("text-generation-with-past", "AutoModelForCausalLM", "logits", "text", with_past=True),
    Task("image-classification", "AutoModelForImageClassification", "logits", "image"),
)}
# One per name in the contract, in its order (the CLI offers the contract's names without
# importing transformers); a name without one fails at import.
TASKS: Dict[str, Task] = {name: _IMPLEMENTATIONS[name] for name in HF_TASKS}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder as read before anything is loaded from it.

    Attributes:
        folder: the folder, absolute.
        config: its config.json, normalised (json with sorted keys).
        weights: each safetensors file's name -> its SHA-256.
    """

    folder: Path
    config: str
    weights: Dict[str, str]


def read_checkpoint(folder: PathLike) -> Checkpoint:
    """Read a checkpoint folder's config and hash its weights; nothing is loaded or executed.

    Raises:
        ModelError: not a folder, no readable config.json, or no safetensors weights (pickle
            weights alone are refused by name).
    """
    path = Path(folder).resolve()
    if not path.is_dir():
        raise ModelError(f"{folder}: not a checkpoint folder (save_pretrained writes one)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: no readable config.json: {summary(exc)}") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{folder}/config.json is not a JSON object")
    files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and p.is_file())
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        found = f" (only {', '.join(pickles)}: pickle, which runs code when loaded; re-save with " \
            "save_pretrained, which writes safetensors)" if pickles else ""
        raise ModelError(f"{folder}: no safetensors weights{found}")
    return Checkpoint(path, json.dumps(config, sort_keys=True),
                      {p.name: sha256_file(p) for p in files})


def task_named(name: str) -> Task:
    """The task called `name`.

    Raises:
        ModelError: an unknown task, listing the known ones.
    """
    if name not in TASKS:
        raise ModelError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def load_model(checkpoint: Checkpoint, task: Task) -> PreTrainedModel:
    """The checkpoint's model for `task`, in float32 with eager attention, in eval mode.

    Only safetensors weights are read and no code from the folder runs (no remote code).

    Raises:
        ModelError: the checkpoint does not load for `task` (its message in one line).
    """
    import transformers
    from transformers.utils import logging as hf_logging

    auto = getattr(transformers, task.auto_class)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per load on stderr: the CLI reports its own
    try:
        model = auto.from_pretrained(checkpoint.folder, local_files_only=True,
                                     use_safetensors=True, trust_remote_code=False,
                                     attn_implementation="eager", dtype=torch.float32)
    except (ValueError, OSError, KeyError, RuntimeError, TypeError) as exc:
        raise ModelError(f"{checkpoint.folder} does not load for task {task.name} "
                         f"({task.auto_class}): {summary(exc)}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    return model


class TaskOutput(nn.Module):
    """A transformers model as the graph computes it: named tensors in, the task's output out."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.output = task.output
        self.use_cache = "use_cache" in inspect.signature(model.forward).parameters

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None,
                pixel_values: Optional[Tensor] = None) -> Tensor:
        """The task's output for int64 (B, L) ids, 0/1 mask and types, or (B, C, H, W) pixels."""
        given = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "token_type_ids": token_type_ids, "pixel_values": pixel_values}
        kwargs: Dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if self.use_cache:
            kwargs["use_cache"] = False
        return self.model(**kwargs, return_dict=True)[self.output]


def task_io(model: PreTrainedModel, task: Task) -> IOSpec:
    """The graph's inputs and outputs for `task`, read off the model's configuration.

    Text: ``input_ids`` in [0, vocab), ``attention_mask`` 0/1 (1 = a real token), and
    ``token_type_ids`` where the configuration has more than one token type, each (batch, seq)
    int64 with seq up to max_position_embeddings. Images: float32 ``pixel_values``
    (batch, channels, size, size) at the configuration's image size.
    """
    config = model.config
    if task.inputs == "image":
        size = getattr(config, "image_size", None)
        height, width = (size, size) if isinstance(size, int) else tuple(size or (0, 0))
        channels = getattr(config, "num_channels", 3)
        if not (height and width):
            raise ModelError(f"{type(model).__name__}'s configuration gives no image_size")
        inputs: Tuple[TensorSpec, ...] = (
            TensorSpec("pixel_values", "float32", ("batch", channels, height, width)),)
        return IOSpec(inputs, outputs=(task.output,), sizes={"batch": (1, None)}, batch="batch")
    text = config.get_text_config()
    longest = getattr(text, "max_position_embeddings", None)
    specs = [TensorSpec("input_ids", "int64", ("batch", "seq"), low=0, high=text.vocab_size),
             TensorSpec("attention_mask", "int64", ("batch", "seq"), low=0, high=2,
                        role="padding")]
    types = getattr(text, "type_vocab_size", 1) or 1
    if types > 1 and "token_type_ids" in inspect.signature(model.forward).parameters:
        specs.append(TensorSpec("token_type_ids", "int64", ("batch", "seq"), low=0, high=types))
    return IOSpec(tuple(specs), outputs=(task.output,),
                  sizes={"batch": (1, None), "seq": (1, longest)}, batch="batch")


def example_feed(io: IOSpec) -> Dict[str, Tensor]:
    """The inputs the exporter traces with: batch 2, length 17, the second row padded."""
    feed = make_feed(io, io.clamp(_EXAMPLE_SIZES), seed=0, padded=False)
    if io.has_input("attention_mask"):
        feed["attention_mask"][1, -_EXAMPLE_PADDED:] = 0
    return {name: torch.from_numpy(array) for name, array in feed.items()}


def export_hf_onnx(checkpoint: PathLike, path: PathLike, *, task: str,
                   opset: Optional[int] = None) -> Path:
    """Export a transformers checkpoint folder for `task` to an ONNX file onnxruntime runs.

    Args:
        checkpoint: the folder `save_pretrained` wrote (config.json, safetensors weights).
        path: the `.onnx` file to write (atomically).
        task: one of `TASKS`: "feature-extraction", "text-generation" (one graph, no cache),
            "text-generation-with-past" (one graph, the KV cache in and out:
            `flash_export.hf.past`) or "image-classification".
        opset: default-domain opset; default the newest the exporter and onnxruntime share.

    Returns:
        The written path.

    Raises:
        ModelError: an unknown task, or a folder that is not a loadable checkpoint for it.
        ConversionError: a model `flash_export.hf.swap_attention` refuses (named feature).
        ExportError: the exporter fails, or the graph does not match its IOSpec.
    """
    from flash_export.export.onnx import write_graph

    require_kind(path, "onnx")
    chosen = task_named(task)
    read = read_checkpoint(checkpoint)
    opset = choose_opset("custom", opset)
    model = load_model(read, chosen)
    dynamic = None
    if chosen.with_past:
        io = with_past_io(model, chosen.output)
        runnable: nn.Module = WithPast(swap_attention(model), chosen.output).eval()
        example, dynamic = with_past_example(io)
    else:
        io = task_io(model, chosen)
        runnable = TaskOutput(swap_attention(model), chosen).eval()
        example = example_feed(io)
    meta = _metadata(read, chosen, model, artifact="onnx")
    with torch.no_grad():
        return write_graph(runnable, path, example=example, io=io, meta=meta, target="custom",
                           opset=opset, dynamic=dynamic)


def export_hf_pt2(checkpoint: PathLike, path: PathLike, *, task: str,
                  progress: Optional[Callable[[int, int, str], None]] = None) -> Path:
    """Compile a transformers checkpoint folder for `task` to an AOTInductor `.pt2` package.

    As `export_hf_onnx` (the same tasks but text-generation-with-past, inputs and metadata),
    through `torch.export` with dynamic batch and length: the attention is the registered op
    `flash_export::attention`, so a C++ process loads the libtorch shim first (as for any
    `.pt2` of ours). Inputs are positional, in the IOSpec's order.

    Raises:
        ModelError: an unknown or unsupported task, or a folder that does not load for it.
        ConversionError: a model `flash_export.hf.swap_attention` refuses.
        ExportError: `torch.export` or the compile fails.
    """
    from flash_export.export.prepare import native_metadata
    from flash_export.export.pt2 import compile_pt2

    require_kind(path, "pt2")
    chosen = task_named(task)
    if chosen.with_past:
        raise ModelError(f"pt2 --hf exports {', '.join(t for t in TASKS if not TASKS[t].with_past)}"
                         f"; for {task}, export ONNX (flash-export onnx --hf)")
    read = read_checkpoint(checkpoint)
    model = load_model(read, chosen)
    io = task_io(model, chosen)
    meta = {**_metadata(read, chosen, model, artifact="pt2"), **native_metadata()}
    return compile_pt2(TaskOutput(swap_attention(model), chosen).eval(), path,
                       example=example_feed(io), io=io, meta=meta, progress=progress)


def _metadata(read: Checkpoint, task: Task, model: nn.Module, *, artifact: str) -> Dict[str, str]:
    """What every artifact of a checkpoint records (the IOSpec is added by the writer)."""
    meta = {"flash_export_version": __version__, "torch_version": torch.__version__,
            "transformers_version": transformers_version(), "chunk_size": str(CHUNK_SIZE),
            "dtype": "float32", "artifact": artifact, TASK_KEY: task.name,
            MODEL_CLASS_KEY: type(model).__name__, CONFIG_KEY: read.config,
            WEIGHTS_KEY: json.dumps(read.weights, sort_keys=True),
            CHECKPOINT_KEY: str(read.folder)}
    if artifact == "onnx":
        meta.update(target="custom", domain=DOMAIN, domain_version=str(DOMAIN_VERSION))
    return meta


def recorded_checkpoint(meta: Mapping[str, str], path: PathLike) -> Tuple[Task, Checkpoint]:
    """The task and checkpoint an exported graph's metadata records, each value checked.

    Raises:
        ArtifactError: a missing or malformed key.
    """
    try:
        task = TASKS[meta[TASK_KEY]]
        config = meta[CONFIG_KEY]
        weights = json.loads(meta[WEIGHTS_KEY])
        folder = Path(meta[CHECKPOINT_KEY])
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"{path}: malformed Hugging Face metadata ({summary(exc)})") from exc
    if not (isinstance(weights, dict) and weights and all(
            isinstance(k, str) and isinstance(v, str) for k, v in weights.items())):
        raise ArtifactError(f"{path}: metadata {WEIGHTS_KEY} is not a map of file hashes")
    return task, Checkpoint(folder, config, weights)

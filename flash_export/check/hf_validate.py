"""Parity of an exported transformers checkpoint against transformers' eager attention in float64.

An ONNX graph `flash_export.hf.export.export_hf_onnx` wrote records its task, its checkpoint
folder's config.json and each weights file's SHA-256. The reference is that folder's model for
that task with eager attention computed in float64 (`flash_export.hf.reference`); the baseline of
the tolerance rule is the same model in float32 with transformers' own eager attention. A folder
whose config or weights differ from the recorded ones is refused before anything is loaded.
Padded query rows are not compared: no caller reads them, and a row that sees no key is zeros
here and a mean of the values in eager.
"""

import copy
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from flash_export.artifacts.trust import Provenance
from flash_export.check.parity import (
    Backend,
    ProgressFn,
    default_seqs,
    onnx_backend,
    pt2_backend,
    run_cases,
    sweep,
    torch_backend,
)
from flash_export.check.report import ValidationReport
from flash_export.check.structural import Check, dynamic_dim_checks, manifest_checks
from flash_export.core.contract import DOMAIN, OP_NAME
from flash_export.core.errors import ArtifactError
from flash_export.core.io_spec import IOSpec
from flash_export.core.tolerance import RULE

# New tokens a with-past graph's check generates per row (greedy).
NEW_TOKENS = 32
# The metadata key that marks an exported checkpoint (`flash_export.hf.export.TASK_KEY`): read
# here without importing transformers.
TASK_KEY = "hf_task"


def is_checkpoint_export(meta: Mapping[str, str]) -> bool:
    """Whether an artifact's metadata says it was exported from a transformers checkpoint."""
    return TASK_KEY in meta


# long: an entry point with validate's arguments, each documented; the body is 27 lines
def validate_checkpoint_export(path: Path, proto: Any, meta: Mapping[str, str], io: IOSpec,
                               origin: Provenance, *, checkpoint: Optional[Path],
                               seq: Optional[Sequence[int]], batch: Sequence[int],
                               atol: Optional[float], rtol: Optional[float], provider: str,
                               max_memory: Optional[int],
                               progress: Optional[ProgressFn], program: Any = None) -> Any:
    """`validate` for a graph exported from a checkpoint folder (see the module docstring).

    Args:
        path: the `.onnx` or `.pt2` file.
        proto: an ONNX file's graph, as `validate` read it (external data unread); None for a
            `.pt2` package.
        meta: its metadata.
        io: its IOSpec.
        origin: its provenance.
        checkpoint: the checkpoint folder; default: the one recorded at export.
        seq: lengths (default: `parity.default_seqs` of the recorded chunk), clamped to the
            model's positions.
        batch: batch sizes.
        atol: with `rtol`, replaces the 2x-baseline rule.
        rtol: see `atol`.
        provider: onnxruntime execution provider.
        max_memory: bytes the run may plan to use.
        progress: called as progress(done, total, label).
        program: a `.pt2` package as `validate` loaded it.

    Returns:
        The ValidationReport.

    Raises:
        ArtifactError: malformed metadata, or a folder whose config.json or weights are not
            the exported ones.
        ModelError: the folder does not load for the recorded task.
    """
    from flash_export.hf.export import TaskOutput, load_model
    from flash_export.hf.reference import reference_model
    from flash_export.hf.swap import swap_attention
    from flash_export.nn.spec import check_memory

    task, found = exported_checkpoint(path, meta, checkpoint)
    if task.with_past:
        return _validate_generation(path, proto, meta, io, origin, found, task, seq or [9, 40],
                                    batch, provider, max_memory)
    cases = sweep(list(seq) if seq else default_seqs(int(meta["chunk_size"])), batch,
                  [False, True] if any(t.role != "data" for t in io.inputs) else [False], io)
    eager = load_model(found, task)
    params = sum(p.numel() for p in eager.parameters())  # float32, float64 and our copy
    check_memory(16 * params + (256 << 20), max_memory, f"validating {path.name}")
    reference = TaskOutput(reference_model(eager), task).eval()  # float64, eager maths
    baseline = TaskOutput(eager, task).eval()  # float32, transformers' eager attention
    ours = TaskOutput(swap_attention(copy.deepcopy(eager)), task).eval()
    backends: List[Backend] = [
        torch_backend("pytorch", ours, f"(in memory: {found.folder}, attention swapped)", io),
        onnx_backend("onnx:custom", path, provider, io) if program is None
        else pt2_backend("pt2", program, str(path), io)]
    results = run_cases(None, io, backends, cases, dtype="float32", atol=atol, rtol=rtol,
                        progress=progress, references=(reference, baseline),
                        compare_padded_rows=False)
    report = ValidationReport(
        artifact=str(path), kind="onnx" if program is None else "pt2",
        target="custom" if program is None else None, dtype="float32", provider=provider,
        spec=None, spec_source="checkpoint", provenance=origin,
        rule="atol/rtol" if atol is not None or rtol is not None else RULE,
        checks=(_checks(proto, eager, meta) + dynamic_dim_checks(proto, io) if program is None
                else []) + manifest_checks(path),
        reference=f"transformers eager attention in float64 of {found.folder} "
                  f"({meta.get('hf_model_class', '?')}, task {task.name})")
    report.backends = list(results.values())
    return report


def _validate_generation(path: Path, proto: Any, meta: Mapping[str, str], io: IOSpec,
                         origin: Provenance, found: Any, task: Any, seq: Sequence[int],
                         batch: Sequence[int], provider: str, max_memory: Optional[int]) -> Any:
    """A with-past graph's check: greedy generation through it gives eager `generate`'s tokens.

    Per prompt length L and batch B: a batch whose row r is left-padded by r * L // B tokens,
    `NEW_TOKENS` new tokens, greedy, through `flash_export.runtime.generate` (onnxruntime only)
    and through transformers' `generate` with eager attention in float32.
    """
    import torch

    from flash_export.hf.export import load_model
    from flash_export.nn.spec import check_memory
    from flash_export.runtime.generation import generate
    from flash_export.runtime.sessions import ort_session

    eager = load_model(found, task)
    check_memory(8 * sum(p.numel() for p in eager.parameters()) + (256 << 20), max_memory,
                 f"validating {path.name}")
    session = ort_session(path, provider=provider)
    vocab = io.input("input_ids").high or 2
    checks: List[Check] = []
    for b in sorted(set(batch)):
        for length in sorted(set(seq)):
            rng = np.random.default_rng(length * 1000 + b)
            ids = rng.integers(0, vocab, size=(b, length)).astype(np.int64)
            mask = (np.arange(length)[None, :] >= (np.arange(b) * length // b)[:, None])
            mask = mask.astype(np.int64)  # (B, L), row r left-padded by r * L // B
            ours = generate(session, ids, mask, max_new_tokens=NEW_TOKENS)
            with torch.no_grad():
                theirs = eager.generate(  # type: ignore[operator]
                    torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    max_new_tokens=NEW_TOKENS, do_sample=False).numpy()
            checks.append(_same_tokens(f"generate.B={b}.L={length}", ours, theirs, length))
    return ValidationReport(
        artifact=str(path), kind="onnx", target="custom", dtype="float32", provider=provider,
        spec=None, spec_source="checkpoint", provenance=origin, rule="identical greedy tokens",
        checks=_checks(proto, eager, meta) + manifest_checks(path)
        + checks,
        reference=f"transformers generate (greedy, eager attention, float32) of "
                  f"{found.folder}, {NEW_TOKENS} new tokens on left-padded batches")


def _same_tokens(name: str, ours: np.ndarray, theirs: np.ndarray, prompt: int) -> Check:
    """A check that two generations agree token for token, naming the first difference."""
    expected = f"eager's {theirs.shape[1] - prompt} new tokens per row"
    if ours.shape == theirs.shape and np.array_equal(ours, theirs):
        return Check(name, expected, "identical", True)
    width = min(ours.shape[1], theirs.shape[1])
    diff = np.argwhere(ours[:, :width] != theirs[:, :width])
    if not len(diff):
        return Check(name, expected, f"{ours.shape[1] - prompt} tokens, eager "
                     f"{theirs.shape[1] - prompt}", False)
    row, col = (int(v) for v in diff[0])
    return Check(name, expected, f"row {row} differs at new token {col - prompt}: "
                 f"{ours[row, col]} vs eager's {theirs[row, col]}", False)


def exported_checkpoint(path: Path, meta: Mapping[str, str],
                     checkpoint: Optional[Path]) -> Tuple[Any, Any]:
    """(task, checkpoint) as recorded, the folder read and refused unless it is the exported one.

    Raises:
        ArtifactError: malformed metadata, or a config.json or weights that differ.
    """
    from flash_export.hf.export import read_checkpoint, recorded_checkpoint

    task, exported = recorded_checkpoint(meta, path)
    folder = Path(checkpoint) if checkpoint is not None else exported.folder
    found = read_checkpoint(folder)
    if found.config != exported.config:
        raise ArtifactError(f"{folder}/config.json is not the config {path.name} was exported "
                            "with")
    if found.weights != exported.weights:
        raise ArtifactError(f"{folder}'s weights ({_files(found.weights)}) are not the ones "
                            f"{path.name} was exported with ({_files(exported.weights)})")
    return task, found


def _files(weights: Dict[str, str]) -> str:
    return ", ".join(f"{name} {digest[:12]}" for name, digest in sorted(weights.items()))


def _checks(proto: Any, model: Any, meta: Mapping[str, str]) -> List[Check]:
    """One custom node per attention layer, each with the configuration's heads and chunk."""
    from onnx import helper

    from flash_export.artifacts.safety import all_nodes

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    nodes = [n for n in all_nodes(proto) if n.domain == DOMAIN and n.op_type == OP_NAME]
    layers = int(config.num_hidden_layers)
    checks = [Check("graph.FlashAttention_nodes", str(layers), str(len(nodes)),
                    len(nodes) == layers)]
    heads = int(config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for i, node in enumerate(nodes):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        want = {"num_heads": heads, "chunk_size": int(meta["chunk_size"])}
        if kv_heads != heads:
            want["kv_num_heads"] = kv_heads
        for name, value in want.items():
            checks.append(Check(f"graph.FlashAttention[{i}].{name}", str(value),
                                str(attrs.get(name)), attrs.get(name) == value))
    return checks

"""`bench` of an artifact exported from a transformers checkpoint: whole forwards, interleaved.

Backends: the artifact itself (``custom``: the ONNX graph in onnxruntime with our library;
``pt2``: the AOTInductor package), and the checkpoint's model in PyTorch three ways: ``eager``
and ``sdpa`` (transformers' own attention implementations) and ``native`` (swapped to our kernel,
`flash_export.hf.swap_attention`). Default: the artifact, eager and sdpa. Each (batch, length)
times every backend on the same inputs (token ids, an all-ones mask; pixels for images) with
`timing.time_interleaved`, as `bench` does for FlashAttention models. A with-past graph is
refused: its cost is the decode step (benchmarks/hf_llama.py times it). Peak memory is not
measured here.
"""

import copy
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np

from flash_export.bench.report import BenchReport, BenchRow, fill_stats
from flash_export.bench.timing import environment, time_interleaved
from flash_export.core.errors import ArtifactError, FlashExportError
from flash_export.core.feeds import make_feed

FLOPS = "2 x parameters x tokens: the weights' matmuls of one forward (attention's not counted)"
BACKENDS = ("eager", "sdpa", "native")  # beside the artifact's own


# long: its Args document BenchConfig's fields that apply; the body is 39 lines
def benchmark_checkpoint_export(path: Path, kind: str, meta: Mapping[str, str], config: Any,
                                progress: Callable[[int, int, str], None],
                                trust: bool = False,
                                expect_sha256: Optional[str] = None) -> Any:
    """Time a checkpoint export against its checkpoint's model in PyTorch (module docstring).

    Args:
        path: the `.onnx` or `.pt2` file.
        kind: "onnx" or "pt2".
        meta: its metadata, read as data.
        config: the BenchConfig (seqs, batches, backends, warmup, iters, repeats, block,
            threads; chunks, dtype and memory do not apply).
        progress: called as progress(done, total, label).
        trust: load a `.pt2` of unknown origin.
        expect_sha256: the file's SHA-256 as you know it.

    Returns:
        A BenchReport, one row per (backend, batch, length).

    Raises:
        ArtifactError: a with-past graph, or a folder that is not the exported one.
        FlashExportError: a backend this file cannot be timed with.
    """
    import torch

    from flash_export.check.hf_validate import exported_checkpoint
    from flash_export.hf.export import load_model

    task, found = exported_checkpoint(path, meta, None)
    if task.with_past:
        raise ArtifactError(f"{path} is a with-past graph: its cost is the decode step, which "
                            "benchmarks/hf_llama.py times; bench times whole forwards")
    own = "custom" if kind == "onnx" else "pt2"
    wanted = list(config.backends) if config.backends else [own, "eager", "sdpa"]
    unknown = [b for b in wanted if b not in (own, *BACKENDS)]
    if unknown:
        raise FlashExportError(f"backends {unknown} do not apply to {path.name}; choose from "
                               f"{[own, *BACKENDS]}")
    torch.set_num_threads(config.threads)
    eager = load_model(found, task)
    io = _io(meta, path)
    runs = {own: _artifact(path, kind, config.threads, trust, expect_sha256)} \
        if own in wanted else {}
    runs.update(_models(eager, task, wanted))
    text = eager.config.get_text_config()
    report = BenchReport(config=config, spec={
        "embed": text.hidden_size, "heads": text.num_attention_heads,
        "causal": task.name.startswith("text-generation"),
        "model": f"{meta.get('hf_model_class')} from {found.folder} ({task.name})"},
        artifact=str(path), environment=environment(config.threads), flops_formula=FLOPS,
        method=f"whole forwards, timed as bench times any model (timing.time_interleaved: "
               f"{config.warmup} warm-up calls, {config.iters} blocks x {config.repeats}); "
               "peak memory not measured")
    seqs = config.seqs if "seq" in io.dynamic else config.seqs[:1]
    shapes = [io.clamp({"batch": b, "seq": s}) for b in config.batches for s in seqs]
    total = len(shapes) * config.repeats * config.iters
    params = sum(p.numel() for p in eager.parameters())
    for sizes in shapes:
        report.rows += _time_shape(runs, kind, io, sizes, config, params,
                                   lambda label: progress(len(report.rows), total, label))
    return report


def _models(eager: Any, task: Any, wanted: List[str]) -> Dict[str, Any]:
    """The checkpoint's model in PyTorch, each way `wanted` names (eager, sdpa, native)."""
    from flash_export.hf.export import TaskOutput
    from flash_export.hf.swap import swap_attention

    models: Dict[str, Any] = {}
    if "eager" in wanted:
        models["eager"] = TaskOutput(eager, task).eval()
    if "sdpa" in wanted:
        sdpa = copy.deepcopy(eager)
        sdpa.set_attn_implementation("sdpa")
        models["sdpa"] = TaskOutput(sdpa, task).eval()
    if "native" in wanted:
        models["native"] = TaskOutput(swap_attention(copy.deepcopy(eager)), task).eval()
    return models


def _time_shape(runs: Dict[str, Any], kind: str, io: Any, sizes: Dict[str, int], config: Any,
                params: int, step: Callable[[str], None]) -> List[Any]:
    """One row per backend at `sizes`, every backend timed on the same inputs, interleaved."""
    import torch

    feed = make_feed(io, sizes, seed=0, padded=False)
    tensors = {n: torch.from_numpy(a) for n, a in feed.items()}
    runners = {name: _artifact_runner(run, kind, feed, tensors) if name in ("custom", "pt2")
               else _torch_runner(run, tensors) for name, run in runs.items()}
    length = sizes.get("seq", 1)
    label = f"timing B={sizes['batch']} L={length}"
    timed = time_interleaved(runners, warmup=config.warmup, iters=config.iters,
                             repeats=config.repeats, block=config.block,
                             on_step=lambda: step(label))
    rows = []
    for name in runs:
        row = BenchRow(name, "cpu", None, sizes["batch"], length, length)
        if name in timed.errors:
            row.status, row.error = "error", timed.errors[name]
        elif name in timed.samples:
            row.block = timed.blocks.get(name)
            fill_stats(row, timed.samples[name], 2.0 * params * sizes["batch"] * length)
        rows.append(row)
    return rows


def _io(meta: Mapping[str, str], path: Path) -> Any:
    from flash_export.core.io_spec import IOSpec

    try:
        return IOSpec.from_json(meta["io_spec"])
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"{path}: no readable io_spec in its metadata") from exc


def _artifact(path: Path, kind: str, threads: int, trust: bool,
              expect_sha256: Optional[str]) -> Any:
    if kind == "onnx":
        from flash_export.runtime.sessions import ort_session

        return ort_session(path, threads=threads)
    from flash_export.export.pt2 import load_pt2

    return load_pt2(path, trust=trust, expect_sha256=expect_sha256)[0]


def _torch_runner(model: Any, inputs: Dict[str, Any]) -> Callable[[], None]:
    import torch

    def run() -> None:
        with torch.no_grad():
            model(**inputs)

    return run


def _artifact_runner(program: Any, kind: str, feed: Dict[str, np.ndarray],
                     tensors: Dict[str, Any]) -> Callable[[], None]:
    if kind != "onnx":
        return _torch_runner(program, tensors)
    outputs: List[str] = [o.name for o in program.get_outputs()]

    def run() -> None:
        program.run(outputs, feed)

    return run

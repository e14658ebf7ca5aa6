"""A Hugging Face Llama on our kernel against transformers' own ONNX exporter, one run (issue 27).

A small Llama with random weights (4 layers, hidden 256, 8 query / 2 key-value heads, head dim
32, MLP 688, vocabulary 1000) is saved with ``save_pretrained`` to a folder (no downloads) and
exported four ways:

- ``ours``: ``flash_export.hf.export.export_hf_onnx(task="text-generation")``, the whole forward,
  one ``com.flash_export::FlashAttention`` node per layer; ``ours_past``: the same for
  ``text-generation-with-past`` (one graph, the KV cache in and out; prefill is past 0);
- ``tf``: transformers' ``OnnxExporter`` (``OnnxConfig(dynamic=True)``): ``export`` for the whole
  forward, ``export_for_generation``'s ``decode`` component for a decode step;
- ``tf_fused``: the same with ``ort_fusions="cpu"``, which emits onnxruntime's
  ``com.microsoft::GroupQueryAttention`` per layer.

Every graph runs in onnxruntime through `flash_export.runtime.create_session` with the same
options (--threads intra-op threads, 1 inter-op, idle threads not spinning), all sessions created
up front, all outputs fetched (what a generation loop fetches). Calls: the whole forward at 256
and 1024 tokens (batch 1, no padding) and one decode step (1 new token) at past 256, 1024 and
4096 (batch 1), each graph's cache inputs built under its own names from one seeded cache. Before
timing, every graph's logits are compared with ours at one shape of each call.

The vocabulary is 1000, not Llama's 32000: at hidden 256, a 32000-word output projection holds 3x
the weights of all four layers and would be most of the prefill time (every position's logits
are computed), so the bench would time one MatMul both sides share; at 1000 it holds 8% of the
weights, near a real Llama's share (2-4%).

    python benchmarks/hf_llama.py                   # the issue's shapes, 2 threads (~6 min)
    python benchmarks/hf_llama.py --quick           # a smoke run: tiny model, short shapes
    python benchmarks/hf_llama.py --workdir /tmp/hf # keep the exports: a rerun takes ~1 min

Timing (`flash_export.bench.timing.time_blocks`): per repetition the graphs run in a freshly
shuffled order, each a block of back-to-back calls after one untimed call. Reported per shape:
our median time, and per other graph the median and interquartile range of the per-repetition
ratios other / ours (> 1: ours faster); the load average before and after each shape.
"""

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

# (layers, hidden, heads, kv_heads, intermediate, vocab)
FULL = (4, 256, 8, 2, 688, 1000)
QUICK = (2, 64, 4, 2, 96, 128)
PREFILL = (256, 1024)
PAST = (256, 1024, 4096)
QUICK_PREFILL, QUICK_PAST = (32,), (64,)
SIZE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "vocab_size", "max_position_embeddings")
LONGEST = 8192  # max_position_embeddings: past 4096 + 1 fits
CHECK_LENGTH = 64  # prefill length and decode past of the logits check
# A past input's name, ours (past_key_values.N.key) or transformers' (input.past_key_values.
# layers.N.keys): the layer and which tensor.
PAST_NAME = re.compile(r"past_key_values\.(?:layers\.)?(\d+)\.(key|value)s?$")
# Per call, the graphs timed, ours (the ratios' base) first.
GRAPHS = {"prefill": ("ours", "ours_past", "tf", "tf_fused"),
          "decode": ("ours_past", "tf", "tf_fused")}
COLUMNS = ("ours_past", "tf", "tf_fused")  # the table's ratio columns


def checkpoint(folder: Path, sizes: Tuple[int, ...]) -> Path:
    """A random-weight Llama saved with save_pretrained into `folder`/llama (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, kv_heads, intermediate, vocab = sizes
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=LONGEST)
    path = folder / "llama"
    if (path / "config.json").is_file():
        saved = json.loads((path / "config.json").read_text())
        if all(saved.get(k) == getattr(config, k) for k in SIZE_KEYS):
            return path  # the same model, from an earlier run with this --workdir
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def export_all(folder: Path, model_dir: Path) -> Dict[str, Path]:
    """Every graph's .onnx path, by role: ours, ours_past, tf/tf_fused (whole), *_decode."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.exporters import OnnxConfig, OnnxExporter

    from flash_export.hf.export import export_hf_onnx

    paths = {"ours": folder / "ours.onnx", "ours_past": folder / "ours_past.onnx"}
    for name, task in (("ours", "text-generation"), ("ours_past", "text-generation-with-past")):
        if not paths[name].is_file():
            with timed(f"export {name}"):
                export_hf_onnx(model_dir, paths[name], task=task)
    # transformers' exporter as a user calls it: the model as from_pretrained loads it, its
    # default use_cache (with use_cache=False, ort_fusions="cpu" fuses no attention: the graph
    # keeps its Softmax), a padded sample so the mask input stays.
    for name in ("tf", "tf_fused"):
        paths[name] = folder / name / "model.onnx"
        paths[f"{name}_decode"] = folder / f"{name}_gen" / "decode.onnx"
    if all(p.is_file() for p in paths.values()):
        return paths
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 17),
                        generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, :5] = 0
    sample = {"input_ids": ids, "attention_mask": mask}
    for name, fusions in (("tf", None), ("tf_fused", "cpu")):
        config = OnnxConfig(dynamic=True, ort_fusions=fusions)
        if not paths[name].is_file():
            with timed(f"export {name} (export)"):
                OnnxExporter().export(model, sample, config).save_pretrained(paths[name].parent)
        if not paths[f"{name}_decode"].is_file():
            with timed(f"export {name} (export_for_generation)"):
                OnnxExporter().export_for_generation(model, sample, config).save_pretrained(
                    paths[f"{name}_decode"].parent)
    return paths


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    """Say on stderr how long the block took; the exporter's progress lines go there too."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        yield
    print(f"# {what}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def contents(path: Path) -> str:
    """How the graph computes attention: its attention-node and Softmax counts."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    ops = [(n.domain or "ai.onnx", n.op_type) for n in graph.node]
    counted = {"FlashAttention": sum(op == "FlashAttention" and d == "com.flash_export"
                                     for d, op in ops)}
    for op in ("GroupQueryAttention", "MultiHeadAttention", "Softmax"):
        counted[op] = sum(o == op for _, o in ops)
    return ", ".join(f"{op} {n}" for op, n in counted.items()) + f" ({len(ops)} nodes)"


def sessions(paths: Dict[str, Path], threads: int) -> Dict[str, Any]:
    """One session per graph, all with the same options."""
    from flash_export.runtime import create_session

    return {name: create_session(path, intra_op_num_threads=threads, inter_op_num_threads=1,
                                 log_severity_level=3,
                                 config_entries={"session.intra_op.allow_spinning": "0"})
            for name, path in paths.items()}


def feed(session: Any, call: str, length: int, vocab: int,
         cache: List[np.ndarray]) -> Dict[str, Any]:
    """Inputs for `session` under its own names: `length` prompt tokens (prefill) or one new
    token after a past of `length` (decode); `cache[2 * layer + (0 key, 1 value)]` is the past,
    each (1, Hkv, length, D)."""
    rng = np.random.default_rng(length)
    new = length if call == "prefill" else 1
    past = 0 if call == "prefill" else length
    out: Dict[str, Any] = {}
    for spec in session.get_inputs():
        match = PAST_NAME.search(spec.name)
        if match:
            layer, kind = int(match.group(1)), match.group(2)
            tensor = cache[2 * layer + (kind == "value")]  # (1, Hkv, length, D)
            out[spec.name] = tensor[:, :, :past]
        elif spec.name == "input_ids":
            out[spec.name] = rng.integers(0, vocab, (1, new), dtype=np.int64)
        elif spec.name == "attention_mask":
            out[spec.name] = np.ones((1, past + new), np.int64)
        elif spec.name == "position_ids":
            out[spec.name] = np.arange(past, past + new, dtype=np.int64)[None]
        else:
            raise SystemExit(f"{spec.name}: an input this benchmark does not know how to feed")
    return out


def logits_of(session: Any, inputs: Dict[str, Any]) -> np.ndarray:
    names = [o.name for o in session.get_outputs()]
    return session.run(["logits"], inputs)[0] if "logits" in names else session.run(None, inputs)[0]


def spread(ratios: List[float]) -> str:
    """'median [q1, q3]' of per-repetition ratios."""
    if len(ratios) < 2:
        return f"{ratios[0]:.2f}" if ratios else "n/a"
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return f"{statistics.median(ratios):.2f} [{q1:.2f}, {q3:.2f}]"


def load(minutes: int = 1) -> str:
    """The load average over the last minute, or the 1/5/15-minute triple (`minutes` 15)."""
    values = os.getloadavg()
    return "/".join(f"{x:.2f}" for x in (values if minutes == 15 else values[:1]))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=21,
                        help="shuffled repetitions per shape (default 21)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: a 2-layer hidden-64 model, prefill 32, past 64")
    parser.add_argument("--workdir", default=None,
                        help="folder for the checkpoint and the exports, reused when they exist "
                             "(default: a temporary folder, removed)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    sizes = QUICK if args.quick else FULL
    prefill, past = (QUICK_PREFILL, QUICK_PAST) if args.quick else (PREFILL, PAST)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(args.workdir or temporary)
        folder.mkdir(parents=True, exist_ok=True)
        return run(args, argv, folder, sizes, prefill, past)


def run(args: argparse.Namespace, argv: List[str], folder: Path, sizes: Tuple[int, ...],
        prefill: Tuple[int, ...], past: Tuple[int, ...]) -> int:
    from flash_export.bench.timing import environment, time_blocks

    layers, hidden, heads, kv_heads, intermediate, vocab = sizes
    head_dim = hidden // heads
    model_dir = checkpoint(folder, sizes)
    paths = export_all(folder, model_dir)
    env = environment(args.threads)
    print(f"# hf_llama: {env['date']} {env['host']} cpus={env['cpu_count']} "
          f"threads={args.threads} repeats={args.repeats} float32; onnxruntime "
          f"{env['onnxruntime']}, torch {env['torch']}, flash_export {env['flash_export']}")
    print(f"# command: python benchmarks/hf_llama.py {' '.join(argv)}".rstrip())
    print(f"# model: Llama, {layers} layers, hidden {hidden}, heads {heads}/{kv_heads} "
          f"(head dim {head_dim}), MLP {intermediate}, vocab {vocab}, random weights")
    print("# graphs (attention nodes / Softmax nodes):")
    for name, path in paths.items():
        print(f"#   {name}: {contents(path)}")
    runs = sessions(paths, args.threads)  # every session up front
    rng = np.random.default_rng(0)
    longest = max(*past, CHECK_LENGTH)
    cache = [rng.standard_normal((1, kv_heads, longest, head_dim), dtype=np.float32)
             for _ in range(2 * layers)]  # per layer key then value: (1, Hkv, P, D)

    def session_for(call: str, role: str) -> Any:
        return runs[f"{role}_decode"] if call == "decode" and role.startswith("tf") else runs[role]

    print(f"# logits against ours (max abs diff), prefill at {CHECK_LENGTH} tokens, decode at "
          f"past {CHECK_LENGTH}:")
    for call, base in (("prefill", "ours"), ("decode", "ours_past")):
        ref = logits_of(runs[base], feed(runs[base], call, CHECK_LENGTH, vocab, cache))
        diffs = []
        for role in GRAPHS[call]:
            if role == base:
                continue
            session = session_for(call, role)
            got = logits_of(session, feed(session, call, CHECK_LENGTH, vocab, cache))
            diffs.append(f"{role} {np.abs(got - ref).max():.1e}")
        print(f"#   {call} (vs {base}, largest |logit| {np.abs(ref).max():.2f}): "
              + ", ".join(diffs))

    print("ratios: other graph's time / ours (median [IQR] of per-repetition ratios; > 1: ours "
          "faster); ours = text-generation for prefill, text-generation-with-past for decode")
    print(f"# load average (1/5/15 min) before timing: {load(15)}")
    header = ["call", "tokens", "past", "ours ms", *COLUMNS, "load before / after"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    shapes = [("prefill", n) for n in prefill] + [("decode", p) for p in past]
    for call, n in shapes:
        base = GRAPHS[call][0]
        graphs = {role: session_for(call, role) for role in GRAPHS[call]}
        feeds = {role: feed(s, call, n, vocab, cache) for role, s in graphs.items()}
        runners = {role: (lambda s=s, f=feeds[role]: s.run(None, f)) for role, s in graphs.items()}
        before = load()
        samples, errors = time_blocks(runners, repeats=args.repeats, seed=n)
        ours = samples.get(base, [])
        cells = []
        for role in COLUMNS:
            if role not in graphs or role == base:
                cells.append("-")
                continue
            pairs = zip(samples.get(role, []), ours)
            cells.append(spread([a / b for a, b in pairs]))
        ms = statistics.median(ours) * 1e3 if ours else float("nan")
        tokens, p = (n, 0) if call == "prefill" else (1, n)
        print(f"| {call} | {tokens} | {p} | {ms:.2f} | " + " | ".join(cells)
              + f" | {before} / {load()} |", flush=True)
        for name, error in errors.items():
            print(f"  {name}: {error}", file=sys.stderr)
    print(f"# load average (1/5/15 min) after timing: {load(15)}")
    print("# optimum: not measured: optimum-onnx pins transformers < 4.58, not co-installable "
          "with transformers 5.23")
    return 0


if __name__ == "__main__":
    sys.exit(main())

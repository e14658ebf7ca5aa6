"""Grouped-query attention on the op's contract v2 against its anchors, decode and prefill, one run.

Each cell is one attention call at a model's head shape: query heads H, key/value heads H_kv, head
dim D (Llama-3-8B: 32/8, D = 128; a small model: 8/2, D = 64). Decode: one query row per sequence
(Lq = 1) against a cache of Lk keys, causal; prefill: Lq = Lk = L, causal, B = 1. Every backend
gets its natural layouts: the query as a projection gives it, (B, Lq, H*D); the cache head-major,
(B, H_kv, Lk, D); the output (B, Lq, H*D), ready for the output projection.

    python benchmarks/gqa_decode.py                        # the whole matrix, 2 threads
    python benchmarks/gqa_decode.py --quick                # a cell per kind (a minute)
    python benchmarks/gqa_decode.py --threads 1 --repeats 9

Backends (float32):
- ``node``: our com.flash_export::FlashAttention node (version 2: kv_num_heads, head-major key and
  value) in onnxruntime, on its intra-op pool of --threads;
- ``torch_op``: the same kernel through ``flash_export::attention.v2`` on torch's threads;
- ``repeat_v1``: what contract v1 forced: K/V repeated to H heads and merged to (B, Lk, H*D), then
  the v1 op (``flash_export::attention``), the repeat timed with it;
- ``sdpa``: PyTorch ``scaled_dot_product_attention(enable_gqa=True)`` on (B, H, Lq, D) and the
  head-major cache;
- ``ort_gqa``: onnxruntime's ``com.microsoft::GroupQueryAttention``. Decode: the new token's key
  and value plus a past cache of Lk - 1 (the op appends it and returns the present cache, a copy
  of the cache per call, as a graph without a shared past/present buffer runs it); prefill: no
  past. Left out (n/a) where this onnxruntime lacks it.

Timing (`flash_export.timing.time_blocks`): per repetition the backends run in a freshly shuffled
order, each a block of back-to-back calls after one untimed call; onnxruntime's idle threads do
not spin (they would take the cores from the backend timed next). Reported: our node's median
time and each backend's time over the node's (median of per-repetition ratios; > 1: our node is
faster). Then the sliding window: decode at Lk = 32768, window_size 4096 against no window.
"""

import argparse
import math
import statistics
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

Cell = Tuple[str, int, int, int, int, int, int]  # (kind, H, H_kv, D, B, Lq, Lk)
MODELS = {"llama3-8b": (32, 8, 128), "small": (8, 2, 64)}
BACKENDS = ("node", "torch_op", "repeat_v1", "sdpa", "ort_gqa")


def cells(quick: bool) -> List[Tuple[str, Cell]]:
    out = []
    for model, (h, hk, d) in MODELS.items():
        for b in (1, 8):
            for lk in (1024, 4096):
                out.append((model, ("decode", h, hk, d, b, 1, lk)))
        for n in (256, 1024):
            out.append((model, ("prefill", h, hk, d, 1, n, n)))
    if quick:
        keep = {("llama3-8b", "decode", 8, 1024), ("small", "decode", 1, 4096),
                ("llama3-8b", "prefill", 1, 256)}
        out = [(m, c) for m, c in out if (m, c[0], c[4], c[6]) in keep]
    return out


def _session(model: Any, threads: int, library: Optional[str]) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # GroupQueryAttention's present cache outgrows its inference
    # Idle intra-op threads spin-wait by default and would steal the 2 cores from whichever
    # backend runs next in the interleaved loop (flash_export.runtime does the same).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if library is not None:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _graph(nodes: List[Any], inputs: Dict[str, Tuple[int, List[int]]],
           outputs: Dict[str, int], domains: Dict[str, int]) -> Any:
    from onnx import helper

    graph = helper.make_graph(
        nodes, "cell", [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(n, t, None) for n, t in outputs.items()])
    opsets = [helper.make_opsetid(d, v) for d, v in {"": 18, **domains}.items()]
    return helper.make_model(graph, ir_version=10, opset_imports=opsets)


def runners(cell: Cell, threads: int, window: int = 0,
            only_node: bool = False) -> Dict[str, Callable[[], Any]]:
    """One callable per backend for `cell`, on its inputs (built once); `only_node`: our node."""
    import torch
    from onnx import TensorProto, helper

    from flash_export.core.contract import DOMAIN, DOMAIN_VERSION, OP_NAME
    from flash_export.nn.torch_op import register
    from flash_export.runtime import library_path

    register()
    kind, h, hk, d, b, lq, lk = cell
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, lq, h * d, generator=g)  # (B, Lq, H*D)
    k = torch.randn(b, hk, lk, d, generator=g)  # (B, H_kv, Lk, D): the cache
    v = torch.randn(b, hk, lk, d, generator=g)
    scale = 1.0 / math.sqrt(d)
    f = TensorProto.FLOAT
    attrs: Dict[str, Any] = dict(num_heads=h, kv_num_heads=hk, causal=1, scale=scale)
    if window:
        attrs["window_size"] = window
    node = _session(_graph([helper.make_node(OP_NAME, ["q", "k", "v"], ["o"], domain=DOMAIN,
                                             **attrs)],
                           {"q": (f, list(q.shape)), "k": (f, list(k.shape)),
                            "v": (f, list(v.shape))}, {"o": f}, {DOMAIN: DOMAIN_VERSION}),
                    threads, str(library_path()))
    feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
    out: Dict[str, Callable[[], Any]] = {"node": lambda: node.run(None, feed)}
    if only_node:
        return out
    out["torch_op"] = lambda: torch.ops.flash_export.attention.v2(
        q, k, v, num_heads=h, kv_num_heads=hk, causal=True, scale=scale)
    qh = q.view(b, lq, h, d).transpose(1, 2)  # (B, H, Lq, D), a view

    def repeat_v1() -> Any:
        # (B, H_kv, Lk, D) -> (B, Lk, H*D): what a v1 caller had to build
        kr, vr = (x.repeat_interleave(h // hk, dim=1).transpose(1, 2).reshape(b, lk, h * d)
                  for x in (k, v))
        return torch.ops.flash_export.attention(q, kr, vr, None, h, 64, True, scale)

    def sdpa() -> Any:
        o = torch.nn.functional.scaled_dot_product_attention(
            qh, k, v, is_causal=kind == "prefill", scale=scale, enable_gqa=True)
        return o.transpose(1, 2).reshape(b, lq, h * d)  # (B, Lq, H*D)

    out["repeat_v1"], out["sdpa"] = repeat_v1, sdpa
    gqa = _ort_gqa(cell, q, k, v, scale, threads)
    if gqa is not None:
        out["ort_gqa"] = gqa
    return out


def _ort_gqa(cell: Cell, q: Any, k: Any, v: Any, scale: float,
             threads: int) -> Optional[Callable[[], Any]]:
    """onnxruntime's GroupQueryAttention on the cell, or None where it cannot run here."""
    from onnx import TensorProto, helper

    kind, h, hk, d, b, lq, lk = cell
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    if kind == "decode":  # the new token's key/value, and the past cache before it
        new_k = k[:, :, -1:].transpose(1, 2).reshape(b, 1, hk * d).numpy()
        new_v = v[:, :, -1:].transpose(1, 2).reshape(b, 1, hk * d).numpy()
        past = {"past_key": k[:, :, :-1].contiguous().numpy(),
                "past_value": v[:, :, :-1].contiguous().numpy()}
    else:
        new_k = k.transpose(1, 2).reshape(b, lk, hk * d).numpy()
        new_v = v.transpose(1, 2).reshape(b, lk, hk * d).numpy()
        past = {}
    feed = {"query": q.numpy(), "key": new_k, "value": new_v, **past,
            "seqlens_k": np.full(b, lk - 1, np.int32),
            "total_sequence_length": np.array(lk, np.int32)}
    names = ["query", "key", "value", "past_key" if past else "", "past_value" if past else "",
             "seqlens_k", "total_sequence_length"]
    inputs = {n: (i32 if x.dtype == np.int32 else f, list(x.shape)) for n, x in feed.items()}
    node = helper.make_node("GroupQueryAttention", names, ["o", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=h, kv_num_heads=hk, scale=scale)
    try:
        session = _session(_graph([node], inputs, {"o": f, "present_key": f,
                                                   "present_value": f}, {"com.microsoft": 1}),
                           threads, None)
        session.run(None, feed)
    except Exception as exc:  # an onnxruntime build without it: the cells say n/a
        print(f"  ort_gqa: n/a ({str(exc).splitlines()[0][:120]})", file=sys.stderr)
        return None
    return lambda: session.run(["o"], feed)


def _median_ratio(samples: Dict[str, List[float]], name: str, base: str = "node") -> float:
    pairs = list(zip(samples.get(name, []), samples.get(base, [])))
    return statistics.median(a / c for a, c in pairs) if pairs else float("nan")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads per backend (default 2)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="shuffled repetitions per cell (default 7)")
    parser.add_argument("--quick", action="store_true", help="three cells and the window check")
    parser.add_argument("--no-window", action="store_true", help="skip the sliding-window check")
    args = parser.parse_args(argv)

    import torch

    from flash_export.bench.timing import environment, time_blocks

    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    print(f"# gqa_decode: {env.get('date')} {env.get('host')} threads={args.threads} "
          f"repeats={args.repeats} float32; ratios: backend time / node time (> 1: node faster)")
    print("| model | call | B | Lq | Lk | node ms | " + " | ".join(BACKENDS[1:]) + " |")
    print("|---|---|---|---|---|---|" + "---|" * (len(BACKENDS) - 1))
    for model, cell in cells(args.quick):
        kind, _, _, _, b, lq, lk = cell
        with torch.inference_mode():
            samples, errors = time_blocks(runners(cell, args.threads), repeats=args.repeats,
                                          seed=lk + b)
        node_ms = statistics.median(samples["node"]) * 1e3 if samples.get("node") else math.nan
        ratios = [f"{_median_ratio(samples, n):.2f}" if samples.get(n) else "n/a"
                  for n in BACKENDS[1:]]
        print(f"| {model} | {kind} | {b} | {lq} | {lk} | {node_ms:.2f} | "
              + " | ".join(ratios) + " |", flush=True)
        for name, error in errors.items():
            print(f"  {name}: {error}", file=sys.stderr)
    if not args.no_window:
        cell: Cell = ("decode", 32, 8, 128, 1, 1, 32768)
        with torch.inference_mode():
            full = runners(cell, args.threads, only_node=True)["node"]
            windowed = runners(cell, args.threads, window=4096, only_node=True)["node"]
            samples, _ = time_blocks({"node": windowed, "full": full}, repeats=args.repeats)
        window_ms = statistics.median(samples["node"]) * 1e3
        print(f"\nsliding window, llama3-8b decode B=1 Lk=32768: no window / window_size 4096 = "
              f"{_median_ratio(samples, 'full'):.2f}x (window {window_ms:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

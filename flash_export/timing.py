"""Measurement machinery shared by `bench` and benchmarks/: interleaved timing, FLOPs, host facts.

Timing is interleaved: every iteration runs each backend once, in an order shuffled per iteration
(seeded, so a rerun repeats it), so machine noise hits all alike and no backend always runs right
after the same other one. Imports no torch.
"""

import datetime
import os
import platform
import random
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from flash_export.errors import summary

Runner = Callable[[], None]
FLOPS_FORMULA = ("summed over the FlashAttention calls of one forward (their shapes measured with "
                 "hooks): attention 4*B*H*Lq*Lk*D (QK^T and PV, dense: causal not halved) + "
                 "projections 4*B*E^2*(Lq+Lk); a model's other layers are not counted")


def attention_flops(batch: int, seq_q: int, seq_k: int, embed: int, heads: int,
                    projections: bool = True) -> float:
    """FLOPs of one FlashAttention layer (see FLOPS_FORMULA); attention only if not projections."""
    head_dim = embed // heads
    flops = 4.0 * batch * heads * seq_q * seq_k * head_dim
    if projections:
        flops += 4.0 * batch * embed * embed * (seq_q + seq_k)
    return flops


def environment(threads: int) -> Dict[str, Any]:
    """Versions, host and date, for the report header."""
    from importlib import metadata

    def version(name: str) -> str:
        for dist in (name, f"{name}-gpu"):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return "not installed"

    from flash_export._version import __version__

    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": platform.node(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "flash_export": __version__, "torch": version("torch"),
            "onnxruntime": version("onnxruntime"), "threads": threads}


def time_interleaved(runners: Dict[str, Runner], *, warmup: int, iters: int, repeats: int = 1,
                     on_step: Optional[Callable[[], None]] = None, seed: int = 0,
                     ) -> Tuple[Dict[str, List[List[float]]], Dict[str, str]]:
    """Time each runner `iters` times per repeat, each iteration in its own shuffled order.

    A fixed order would put every backend always right after the same one, whose leftovers
    (another runtime's threads still spinning, caches it filled) it would then always inherit.

    Returns:
        (samples, errors): samples[name][repeat] is a list of seconds; a runner that raises is
        dropped and its first error recorded in errors[name].
    """
    live = dict(runners)
    errors: Dict[str, str] = {}
    samples: Dict[str, List[List[float]]] = {n: [] for n in runners}
    order_rng = random.Random(seed)

    def call(name: str) -> Optional[float]:
        try:
            start = time.perf_counter()
            live[name]()
            return time.perf_counter() - start
        except Exception as exc:  # a backend that cannot run this shape fails alone
            errors[name] = summary(exc)
            del live[name]
            return None

    for _ in range(repeats):
        for _ in range(warmup):
            for name in list(live):
                call(name)
        for name in live:
            samples[name].append([])
        for _ in range(iters):
            order = list(live)
            order_rng.shuffle(order)
            for name in order:
                t = call(name)
                if t is not None:
                    samples[name][-1].append(t)
            if on_step:
                on_step()
    return samples, errors

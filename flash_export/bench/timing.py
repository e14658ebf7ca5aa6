"""Measurement machinery shared by `bench` and benchmarks/: timing, FLOPs, host facts.

Timing is interleaved in blocks: every iteration runs, for each backend in an order shuffled per
iteration (seeded, so a rerun repeats it), one untimed call and then a timed block of back-to-back
calls; a sample is the block's time over its size. Machine noise hits all alike, no backend always
runs right after the same other one, and no timed call pays for the previous backend's threads
still spinning. Imports no torch.
"""

import datetime
import os
import platform
import random
import time
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    NamedTuple,
    Optional,
    Tuple,
)

from flash_export.core.errors import summary

if TYPE_CHECKING:
    pass

Runner = Callable[[], None]
FLOPS_FORMULA = ("summed over the FlashAttention calls of one forward (their shapes measured with "
                 "hooks): attention 4*B*H*Lq*Lk*D (QK^T and PV, dense: causal not halved) + "
                 "projections 4*B*E^2*(Lq+Lk); a model's other layers are not counted")
BLOCK_TARGET_S = 0.02  # an auto-sized block lasts about this long
MAX_BLOCK = 64  # calls in an auto-sized block at most


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


class Timings(NamedTuple):
    """What `time_interleaved` measured: per-call seconds, the errors and each block's size."""

    samples: Dict[str, List[List[float]]]  # [name][repeat]: seconds per call, one per block
    errors: Dict[str, str]  # a runner that raised: its first error, one line
    blocks: Dict[str, int]  # calls per timed block, per runner that ran


# long: a public entry point whose docstring is half of it; the body is 35 lines
def time_interleaved(runners: Dict[str, Runner], *, warmup: int, iters: int, repeats: int = 1,
                     block: Optional[int] = None, target_s: float = BLOCK_TARGET_S,
                     max_block: int = MAX_BLOCK, on_step: Optional[Callable[[], None]] = None,
                     seed: int = 0) -> Timings:
    """Per-call seconds of each runner, from blocks of back-to-back calls, interleaved.

    A single call timed right after another runtime's call pays for that runtime's threads still
    spinning (PyTorch's OpenMP pool), which makes a short kernel look several times slower than
    it is and a long one relatively faster. So every sample here is one untimed call, then a block
    of calls of the same runner timed together (sample = block time / block size), and every
    iteration runs the runners' blocks in its own shuffled order (seeded: a rerun repeats it), so
    no runner always follows the same other one. Each repetition starts with `warmup` untimed
    calls per runner.

    Args:
        runners: name -> a call of one backend.
        warmup: untimed calls per runner at the start of each repetition.
        iters: timed samples (blocks) per runner and repetition.
        repeats: repetitions of warm-up + timed samples; blocks keep their size across them.
        block: calls per block, the same for every runner; None: sized once per runner, after
            the first repetition's warm-up, from the faster of two calls, so that a block lasts
            about `target_s` seconds (1 to `max_block` calls).
        target_s: how long an auto-sized block lasts, about.
        max_block: most calls in an auto-sized block.
        on_step: called after every iteration (all runners' blocks), for progress.
        seed: of the shuffled orders.

    Returns:
        Timings: samples[name][repeat] holds `iters` per-call times (block means); a runner that
        raises is dropped and its first error recorded in errors[name].
    """
    timer = _Timer(runners)
    live, calls = timer.live, timer.seconds
    samples: Dict[str, List[List[float]]] = {n: [] for n in runners}
    blocks: Dict[str, int] = {}
    order_rng = random.Random(seed)

    for _ in range(repeats):
        for _ in range(warmup):
            for name in list(live):
                calls(name, 1)
        for name in list(live):
            if name in blocks:
                continue
            if block is not None:
                blocks[name] = block
                continue
            first = calls(name, 1)
            second = calls(name, 1) if first is not None else None
            if first is not None and second is not None:
                fastest = max(min(first, second), 1e-7)
                blocks[name] = max(1, min(max_block, int(target_s / fastest)))
        for name in live:
            samples[name].append([])
        for _ in range(iters):
            order = list(live)
            order_rng.shuffle(order)
            for name in order:
                if calls(name, 1) is None:  # untimed: the caches and threads are this runner's
                    continue
                t = calls(name, blocks[name])
                if t is not None:
                    samples[name][-1].append(t / blocks[name])
            if on_step:
                on_step()
    return Timings(samples, timer.errors, {n: b for n, b in blocks.items() if n in live})


def time_blocks(runners: Dict[str, Runner], *, repeats: int, target_s: float = BLOCK_TARGET_S,
                max_block: int = MAX_BLOCK, seed: int = 0,
                ) -> Tuple[Dict[str, List[float]], Dict[str, str]]:
    """`time_interleaved` with no warm-up and auto-sized blocks, one sample per repetition.

    Returns:
        (samples, errors): samples[name][repeat] is seconds per call; a runner that raises is
        dropped and its first error recorded in errors[name].
    """
    timed = time_interleaved(runners, warmup=0, iters=repeats, target_s=target_s,
                             max_block=max_block, seed=seed)
    return {n: [t for rep in reps for t in rep] for n, reps in timed.samples.items()}, timed.errors


class _Timer:
    """Times runners by name; one that raises is dropped from `live`, its first error kept."""

    def __init__(self, runners: Dict[str, Runner]) -> None:
        self.live = dict(runners)
        self.errors: Dict[str, str] = {}

    def seconds(self, name: str, count: int = 1) -> Optional[float]:
        """Wall seconds of `count` back-to-back calls of runner `name`; None once it failed."""
        try:
            start = time.perf_counter()
            for _ in range(count):
                self.live[name]()
            return time.perf_counter() - start
        except Exception as exc:  # a backend that cannot run this shape fails alone
            self.errors[name] = summary(exc)
            del self.live[name]
            return None


# --------------------------------------------------------------------------- memory


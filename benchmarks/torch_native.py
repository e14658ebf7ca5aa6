"""The native operator in PyTorch against TorchScript and onnxruntime, side by side in one run.

Backends (whole model, projections included, float32, batch 1, `--threads` threads each):
`torchscript` (today's portable archive: the chunk loop), `native` (eager FlashAttention with
attention="native"), `torchscript-native`, `pt2` (the AOTInductor package, run through
`torch._inductor.aoti_load_package`) and `custom` (the ONNX custom-op graph in onnxruntime).

Each backend lives in its own worker process, as it would in a deployment: onnxruntime's and
torch's thread pools in one process slow each other down, which would measure the hosting, not
the backend. The parent drives the workers one at a time: every iteration visits the backends in
a freshly shuffled order, and each visit is a block of `--block` back-to-back calls after one
untimed call (the per-call mean of the block is one sample). Reported per backend and length:
the median sample, and the median over iterations of its sample divided by the reference
backend's sample in the same iteration (torchscript and custom).

    python benchmarks/torch_native.py --embed 128 --heads 8 --seq 256,1024 --threads 2

After every block the parent pauses `--settle-ms` (default 5) untimed. Longer pauses let this
virtual machine's idle cores sleep, which onnxruntime's pool (spinning off) pays for on its next
call (50 ms made the custom graph 1.5-1.8x slower here).

`--omp-wait-policy passive` starts the workers with OMP_WAIT_POLICY=PASSIVE: torch's OpenMP
threads then sleep at barriers instead of spinning, as onnxruntime's threads do here (spinning
off). On a machine shared with other work, spinning threads that lose their core make every torch
backend many times slower; the table says which setting it ran with.
"""

import argparse
import multiprocessing as mp
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

BACKENDS = ("torchscript", "native", "torchscript-native", "pt2", "custom")


def _worker(conn, job_kwargs: dict) -> None:
    from flash_export.bench.runners import Job, make_runner

    try:
        run = make_runner(Job(**job_kwargs))
        run()
        conn.send("ready")
    except Exception as exc:  # reported to the parent, which prints it as the row
        conn.send(f"error: {type(exc).__name__}: {exc}")
        return
    while True:
        count = conn.recv()
        if count is None:
            return
        run()  # one untimed call
        start = time.perf_counter()
        for _ in range(count):
            run()
        conn.send((time.perf_counter() - start) / count)


def export_all(spec, out: Path) -> Dict[str, str]:
    """The artifacts each file backend runs: torchscript, torchscript-native, pt2, custom."""
    from flash_export.export.onnx import export_onnx
    from flash_export.export.pt2 import export_pt2
    from flash_export.export.torchscript import export_torchscript

    model = spec.build()
    files = {"torchscript": out / "portable.pt", "torchscript-native": out / "native.pt",
             "pt2": out / "model.pt2", "custom": out / "custom.onnx"}
    export_torchscript(model, files["torchscript"], spec=spec)
    export_torchscript(model, files["torchscript-native"], spec=spec, attention="native")
    export_pt2(model, files["pt2"], spec=spec)
    export_onnx(model, files["custom"], target="custom", spec=spec)
    return {k: str(v) for k, v in files.items()}


def measure(spec, files: Dict[str, str], seq: int, threads: int, iters: int, block: int,
            settle: float = 0.005) -> Tuple[Dict[str, List[float]], Dict[str, str]]:
    """Per backend, one sample (seconds per call) per iteration; a string when it failed."""
    ctx = mp.get_context("spawn")
    workers = {}
    for backend in BACKENDS:
        parent, child = ctx.Pipe()
        job = dict(backend=backend, device="cpu", batch=1, seq_q=seq, seq_k=seq,
                   embed=spec.embed, threads=threads, dtype="float32", file=files.get(backend),
                   spec_json=spec.to_json())
        proc = ctx.Process(target=_worker, args=(child, job), daemon=True)
        proc.start()
        workers[backend] = (proc, parent)
    samples: Dict[str, List[float]] = {}
    failed: Dict[str, str] = {}
    for backend, (_, conn) in workers.items():
        status = conn.recv()
        if status != "ready":
            failed[backend] = status
        else:
            samples[backend] = []
    for _ in range(iters):
        order = list(samples)
        random.shuffle(order)
        for backend in order:
            conn = workers[backend][1]
            conn.send(block)
            samples[backend].append(conn.recv())
            time.sleep(settle)  # untimed: the last worker's threads stop spinning
    for proc, conn in workers.values():
        if proc.is_alive():
            conn.send(None)
        proc.join(timeout=10)
    return {**samples, **{b: [] for b in failed}}, failed


def main() -> None:
    """Run the comparison and print one table per (model, length)."""
    from flash_export.bench.timing import environment
    from flash_export.nn.spec import ModelSpec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embed", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--seq", default="256,1024")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=15, help="iterations (blocks per backend)")
    parser.add_argument("--block", type=int, default=5, help="timed calls per block")
    parser.add_argument("--settle-ms", type=float, default=5.0,
                        help="untimed pause after every block (default 5)")
    parser.add_argument("--omp-wait-policy", choices=["default", "passive"], default="default")
    args = parser.parse_args()
    if args.omp_wait_policy == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # the workers are spawned with it
    spec = ModelSpec(embed=args.embed, heads=args.heads, chunk=args.chunk)
    env = environment(args.threads)
    print(f"benchmarks/torch_native.py  {env['date']}  {platform.platform()}, "
          f"{env['cpu_count']} CPUs; torch {env['torch']}, onnxruntime {env['onnxruntime']}")
    print(f"model: embed {spec.embed}, heads {spec.heads}, chunk {spec.chunk}; batch 1, float32, "
          f"threads {args.threads}; {args.iters} iterations x blocks of {args.block} calls "
          "(+1 untimed), backends shuffled per iteration, one worker process each; "
          f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    with tempfile.TemporaryDirectory(prefix="torch_native_") as tmp:
        files = export_all(spec, Path(tmp))
        for seq in (int(s) for s in args.seq.split(",")):
            samples, failed = measure(spec, files, seq, args.threads, args.iters, args.block,
                                      args.settle_ms / 1e3)
            print(f"L = {seq}")
            print(f"  {'backend':<20}{'median ms':>10}{'vs torchscript':>16}{'vs custom':>11}")
            for backend in BACKENDS:
                if backend in failed:
                    print(f"  {backend:<20}{failed[backend]}")
                    continue
                mine = np.array(samples[backend])
                cells = [f"{np.median(mine) * 1e3:10.3f}"]
                for ref in ("torchscript", "custom"):
                    other = np.array(samples.get(ref) or [np.nan] * len(mine))
                    cells.append(f"{'x':>{8 if ref == 'custom' else 13}}"
                                 f"{np.median(mine / other):.2f}")
                print(f"  {backend:<20}" + "".join(cells))


if __name__ == "__main__":
    main()

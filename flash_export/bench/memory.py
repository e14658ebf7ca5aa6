"""Peak memory of one forward, measured in a fresh subprocess.

`python -m flash_export.bench.memory --memory-worker JOB_JSON` builds the job's runner, then
measures host RSS growth around one forward (the peak reset through /proc/self/clear_refs on
Linux, elsewhere getrusage maxrss); on CUDA, torch's peak allocation.
"""

import dataclasses
import json
import subprocess
import sys
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Optional,
    Sequence,
)

from flash_export.core.install import module_command

if TYPE_CHECKING:
    from flash_export.bench.runners import Job


def _rss_kb(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_memory_of_one_forward(job: "Job") -> Dict[str, Any]:
    """In this (fresh) process: build, then measure host RSS growth around one forward."""
    import resource

    from flash_export.bench.runners import TORCH_BACKENDS, make_runner

    cuda = job.device == "cuda"
    run = make_runner(job)
    torch_cuda = cuda and job.backend in TORCH_BACKENDS
    if torch_cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    method = "VmHWM after reset (/proc/self/clear_refs) - VmRSS before"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kb("VmRSS")
    except OSError:
        before = None
    if before is None:
        method = "getrusage maxrss delta"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    if method.startswith("VmHWM"):
        after = _rss_kb("VmHWM") or 0
    else:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: Dict[str, Any] = {"peak_rss_mb": max(after - before, 0) / 1024.0, "method": method}
    if torch_cuda:
        import torch

        out["peak_cuda_mb"] = (torch.cuda.max_memory_allocated() - cuda_before) / 2**20
    return out


def measure_memory(job: "Job", timeout: float = 600.0) -> Dict[str, Any]:
    """Peak memory of one forward of `job`, measured in a fresh subprocess.

    Returns:
        {"peak_rss_mb": float, "method": str, ["peak_cuda_mb": float]} or {"error": str}.
    """
    cmd = module_command("flash_export.bench.memory", "--memory-worker",
                         json.dumps(dataclasses.asdict(job)))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"memory worker timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"error": f"memory worker failed ({proc.returncode}): {tail}"[:300]}
    result: Dict[str, Any] = json.loads(lines[-1])
    return result


def _worker_main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] != "--memory-worker":
        print("usage: python -m flash_export.bench.memory --memory-worker JOB_JSON",
              file=sys.stderr)
        return 2
    from flash_export.bench.runners import Job

    job = Job(**json.loads(argv[1]))
    print(json.dumps(_peak_memory_of_one_forward(job)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))

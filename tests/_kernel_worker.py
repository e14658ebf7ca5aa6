"""A long-lived process that runs the native CPU kernel for the tests (numpy and ctypes only).

Started by `_kernel_cases.KernelWorker` with FLASH_EXPORT_CPU_ISA set: the kernel picks its
vector path once per process, and a kernel that crashes takes this process down, not pytest.
It reads pickled requests (a 8-byte length, then the pickle) on stdin and answers each the same
way on stdout. The first answer, unasked, is {"isa": the path the kernel took}.

A request holds clean q, k, v (B, L, E) arrays (bfloat16 as uint16 bits), which this process
copies into buffers of its own with `guard` poison elements after the end, and the heads listed
in `poison_heads` overwritten with `poison`: what a head's output must not depend on. The output
buffer has a guard too; the answer says whether the kernel wrote past the end of it.
"""

import os
import pickle
import struct
import sys

import numpy as np

from flash_export.runtime import library_path
from flash_export.runtime.native import NativeLibrary, Strided, attention_params, check

# A value's 16-bit pattern in bfloat16 (numpy has no bfloat16: those arrays hold the bits).
_BFLOAT16_BITS = {"nan": 0x7FC0, "inf": 0x7F80, "-inf": 0xFF80}
_OUT_GUARD = 64


def _poison_value(dtype: str, poison: str):
    return _BFLOAT16_BITS[poison] if dtype == "bfloat16" else float(poison)


def _guarded(x: np.ndarray, guard: int, fill) -> np.ndarray:
    """A copy of `x` at the front of a buffer whose `guard` trailing elements hold `fill`."""
    buffer = np.empty(x.size + guard, dtype=x.dtype)
    buffer[x.size:] = fill
    view = buffer[:x.size].reshape(x.shape)
    view[...] = x
    return view


def run(lib: NativeLibrary, request: dict) -> dict:
    dtype, heads = request["dtype"], request["heads"]
    poison = _poison_value(dtype, request["poison"])
    q, k, v = (_guarded(request[n], request["guard"], poison) for n in ("q", "k", "v"))
    head_dim = q.shape[2] // heads
    for h in request["poison_heads"]:
        for x in (q, k, v):
            x[:, :, h * head_dim:(h + 1) * head_dim] = poison
    out_fill = _BFLOAT16_BITS["nan"] if dtype == "bfloat16" else np.nan
    out_buffer = np.full(q.size + _OUT_GUARD, out_fill, dtype=q.dtype)
    out = out_buffer[:q.size].reshape(q.shape)
    mask = request["mask"]
    broadcast = None
    if mask is not None:
        broadcast = np.broadcast_to(mask, (q.shape[0], heads, q.shape[1], k.shape[1]))
    q_, k_, v_, out_ = (Strided.of(x, dtype=dtype) for x in (q, k, v, out))  # bfloat16: uint16
    params = attention_params(lib, q_, k_, v_, out_, heads, mask=None if broadcast is None else
                              Strided.of(broadcast), causal=request["causal"],
                              scale=request["scale"], chunk_size=request["chunk"])
    plan = lib.cpu_plan(params, request["threads"])
    check(lib.forward_cpu(params, request["threads"]), "flash_export_attention_forward_cpu")
    tail = out_buffer[q.size:]
    wrote_past_end = not (np.all(tail == out_fill) if dtype == "bfloat16"
                          else np.all(np.isnan(tail)))
    return {"out": out.copy(), "plan": plan, "wrote_past_end": bool(wrote_past_end)}


def _read(stream) -> object:
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


def _write(stream, value: object) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def main() -> None:
    lib = NativeLibrary(library_path())
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the answers
    _write(stdout, {"isa": lib.cpu_isa(), "pid": os.getpid()})
    while True:
        request = _read(stdin)
        if request is None:
            return
        try:
            answer = run(lib, request)
        except Exception as exc:  # the client reports it with the case
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        _write(stdout, answer)


if __name__ == "__main__":
    main()

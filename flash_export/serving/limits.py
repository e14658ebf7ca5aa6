"""What a server accepts at most: body bytes, batch, lengths and response size."""

from dataclasses import dataclass
from typing import Dict, Tuple

from flash_export.core.io_spec import IOSpec


@dataclass(frozen=True)
class Limits:
    """What one request may ask; each bound is checked before the work it protects.

    Attributes:
        max_body_bytes: the request body (JSON and binary together), by Content-Length and as
            read; 413 past it.
        max_batch: the batch dim of a request (the dynamic size named "batch").
        max_length: every other dynamic size (sequence lengths), also capped by the graph's own
            bounds.
        body_timeout_s: the whole body must arrive within this; 408 otherwise (a Content-Length
            larger than what is sent).
        max_response_bytes: the answer's body; 413 past it. Checked from the output shapes the
            IOSpec gives at the request's sizes before anything runs (JSON values counted at
            the most bytes one can take: 25 for a float, 21 for an INT64), and again from the
            computed outputs before encoding where a shape is only known after the run.
    """

    max_body_bytes: int = 16 * 2**20
    max_batch: int = 64
    max_length: int = 4096
    body_timeout_s: float = 10.0
    max_response_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024 or self.max_batch < 1 or self.max_length < 1 \
                or not self.body_timeout_s > 0 or self.max_response_bytes < 1024:
            raise ValueError(f"limits must be positive (body and response >= 1024 bytes), "
                             f"got {self}")


def mib(size: int) -> str:
    """A byte count in MiB, for messages."""
    return f"{size / 2**20:,.1f} MiB"


def size_bounds(io: IOSpec, limits: Limits) -> Dict[str, Tuple[int, int]]:
    """Each dynamic size's (min, max): the graph's own bounds capped by the limits."""
    out = {}
    for name, (low, high) in io.sizes.items():
        cap = limits.max_batch if name in (io.batch, "batch") else limits.max_length
        out[name] = (low, cap if high is None else min(high, cap))
    return out

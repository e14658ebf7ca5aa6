"""The tensor file format the C++ example reads and writes (see examples/cpp/main.cpp)."""

from pathlib import Path
from typing import Union

import numpy as np

MAGIC = b"FETENSOR"
_CODES = {np.dtype(np.float32): 0, np.dtype(np.bool_): 1, np.dtype(np.int64): 2}


def write_tensor(path: Union[str, Path], array: np.ndarray) -> None:
    """Write a float32, bool or int64 array: magic, int64 dtype code, rank, dims, data."""
    a = np.ascontiguousarray(array)
    if a.dtype not in _CODES:
        raise ValueError(f"tensor files hold float32, bool or int64, got {a.dtype}")
    header = np.array([_CODES[a.dtype], a.ndim, *a.shape], dtype="<i8")
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(header.tobytes())
        f.write(a.astype(a.dtype.newbyteorder("<")).tobytes())


def read_tensor(path: Union[str, Path]) -> np.ndarray:
    """Inverse of `write_tensor`."""
    data = Path(path).read_bytes()
    if data[:8] != MAGIC:
        raise ValueError(f"{path} is not a flash-export tensor file")
    code, rank = np.frombuffer(data, dtype="<i8", count=2, offset=8)
    dims = np.frombuffer(data, dtype="<i8", count=int(rank), offset=24)
    dtype = {0: np.float32, 1: np.bool_, 2: np.int64}[int(code)]
    offset = 24 + 8 * int(rank)
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(tuple(int(d) for d in dims))

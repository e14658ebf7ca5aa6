"""The Open Inference Protocol's wire encoding: strict JSON, tensors as JSON data or binary bytes.

Torch-free and model-free: `flash_export.serving.protocol` checks requests against a graph and uses
these to read and write the tensors. JSON cannot hold NaN or infinities: a JSON input holding one is
refused, and an output holding one is written as the string "NaN", "Infinity" or "-Infinity"
(numpy and JavaScript parse those spellings, so `tritonclient`'s ``as_numpy`` reads them back).
"""

import json
import math
from typing import Any, List, Optional, Tuple, Union

import numpy as np

from flash_export.core.errors import RequestError

# dtype name <-> the protocol's datatype names.
DATATYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64",
             "int32": "INT32", "bool": "BOOL"}
HEADER_LENGTH = "inference-header-content-length"  # HTTP headers are case-insensitive
_MAX_INT_DIGITS = 19  # int64's range; a longer JSON integer is refused before Python converts it
# Values per block when converting or encoding tensor data: each block is one C call holding the
# GIL for a few ms, so a thread decoding or encoding a large tensor lets the event loop run.
_BLOCK = 1 << 13
# The most bytes one value (and its comma) takes in a JSON answer: float64's longest repr
# ("-2.2250738585072014e-308"), "-9223372036854775808", "-2147483648", "false".
_JSON_VALUE_BYTES = {"float32": 25, "float16": 25, "float64": 25, "int64": 21, "int32": 12,
                     "bool": 6}


def byte_count(text: str, max_digits: int) -> Optional[int]:
    """An HTTP byte count (Content-Length, Inference-Header-Content-Length), or None if malformed.

    Only 1 to `max_digits` ASCII digits: `str.isdigit` also accepts superscripts ("²"), which
    `int` refuses, and other scripts' digits, which `int` reads.
    """
    text = text.strip()
    if not 1 <= len(text) <= max_digits or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def error_body(message: str) -> bytes:
    """The protocol's error answer, ``{"error": message}``, as bytes."""
    return json.dumps({"error": message}).encode()


def json_body(value: Any) -> bytes:
    """Strict JSON bytes (no NaN or Infinity: `allow_nan=False`)."""
    return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()


def from_binary(name: str, dtype: str, shape: Tuple[int, ...], chunk: memoryview) -> np.ndarray:
    """An input's bytes from the binary section (little-endian) as an array of `dtype`, `shape`.

    Raises:
        RequestError: 400 for BOOL bytes other than 0 and 1.
    """
    value = np.frombuffer(chunk, dtype=np.dtype(dtype).newbyteorder("<"))
    if dtype == "bool" and value.size and np.frombuffer(chunk, dtype=np.uint8).max() > 1:
        raise RequestError(400, f"input {name}: BOOL bytes must be 0 or 1")
    return value.astype(dtype).reshape(shape)  # native order, own copy


def to_binary(value: np.ndarray) -> bytes:
    """A tensor's bytes for the binary section: row-major, little-endian."""
    return np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()


def answer_bytes(dtype: str, count: int, binary: bool) -> int:
    """The most bytes `count` values of `dtype` take in an answer: binary, or as JSON data."""
    return count * (np.dtype(dtype).itemsize if binary else _JSON_VALUE_BYTES[dtype])


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (send finite numbers)")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits is out of range")
    return int(text)


def _float(text: str) -> float:
    # What json does itself, but in Python: the parser then gives up the GIL between numbers,
    # so a thread parsing a large body does not stall the event loop (~1.4x the parse time).
    return float(text)


def load_json(raw: Union[bytes, memoryview]) -> Any:
    """Strict JSON: no NaN/Infinity, no integers past int64's digits, bounded nesting."""
    try:
        return json.loads(bytes(raw), parse_constant=_reject_constant, parse_int=_bounded_int,
                          parse_float=_float)
    except RecursionError:
        raise RequestError(400, "the JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise RequestError(400, f"the body is not valid JSON: {str(exc)[:200]}") from None


def from_json_data(name: str, dtype: str, shape: Tuple[int, ...], data: Any) -> np.ndarray:
    """An input's JSON ``data`` (flat or nested, row-major) as an array of `dtype` and `shape`."""
    if not isinstance(data, list):
        raise RequestError(400, f"input {name}: data must be a list")
    kinds = {"bool": "b", "int64": "i", "int32": "i"}.get(dtype, "if")
    try:  # a block of rows at a time (see _BLOCK)
        blocks = [np.asarray(data[i:i + _BLOCK]) for i in range(0, max(len(data), 1), _BLOCK)]
        if len({b.shape[1:] for b in blocks}) > 1:
            raise ValueError("blocks of unequal rows")
    except (ValueError, TypeError):  # ragged nesting
        raise RequestError(400, f"input {name}: data is ragged (nested lists of unequal "
                                "lengths)") from None
    try:
        value = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    except TypeError:  # numbers in one block, strings in another
        raise RequestError(400, f"input {name}: data holds mixed values, expected "
                                f"{DATATYPES[dtype]} values") from None
    if value.size == 0 and math.prod(shape) == 0:
        return np.zeros(shape, dtype=dtype)
    if value.dtype.kind not in kinds:
        raise RequestError(400, f"input {name}: data holds {_kind_text(value.dtype)}, expected "
                                f"{DATATYPES[dtype]} values")
    if value.size != math.prod(shape):
        raise RequestError(400, f"input {name}: data holds {value.size} values, shape "
                                f"{list(shape)} needs {math.prod(shape)}")
    if dtype == "int32" and value.size and (value.min() < -2**31 or value.max() >= 2**31):
        raise RequestError(400, f"input {name}: values out of INT32's range")
    with np.errstate(over="ignore"):  # an overflow becomes an infinity, refused by the caller
        return value.astype(dtype).reshape(shape)


def _kind_text(dtype: np.dtype) -> str:
    return {"b": "booleans", "i": "integers", "u": "integers past int64", "f": "floats",
            "U": "strings", "O": "mixed values"}.get(dtype.kind, dtype.name)


def json_array(value: np.ndarray) -> bytes:
    """A tensor as a flat JSON array's bytes (`json_data`), encoded a block at a time."""
    flat = value.ravel()
    blocks = [json_body(json_data(flat[i:i + _BLOCK]))[1:-1]
              for i in range(0, flat.size, _BLOCK)]
    return b"[" + b",".join(blocks) + b"]"


def json_data(value: np.ndarray) -> List[Any]:
    """A tensor as a flat JSON list; non-finite floats as "NaN", "Infinity", "-Infinity"."""
    if value.dtype.kind != "f":
        return value.ravel().tolist()
    flat = value.astype(np.float64).ravel()  # (N,) float16/32 print as their exact float64
    data: List[Any] = flat.tolist()
    if not np.isfinite(flat).all():
        for i in np.flatnonzero(~np.isfinite(flat)).tolist():
            data[i] = "NaN" if math.isnan(data[i]) else ("Infinity" if data[i] > 0
                                                         else "-Infinity")
    return data


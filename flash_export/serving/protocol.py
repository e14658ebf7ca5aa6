"""The Open Inference Protocol (KServe v2 REST) for one exported graph. Imports no torch, no Ray.

The wire format Triton, KServe, Seldon and OpenVINO Model Server speak, so `tritonclient.http`
and KServe clients work unchanged against `flash-export serve`:

- ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``, ``GET /v2/models/{name}``
  (inputs and outputs with datatypes and shapes, -1 for a dynamic dim) and ``.../ready``;
- ``POST /v2/models/{name}/infer``: JSON tensors (``data`` flat in row-major order, or nested),
  and the binary tensor data extension (an ``Inference-Header-Content-Length`` header: the first
  that many bytes are the JSON header, the rest the inputs' raw little-endian bytes in order,
  each sized by its ``binary_data_size`` parameter). Outputs come back as binary data when the
  request asks (``binary_data`` on an output, or ``binary_data_output`` on the request).

Every request is checked against the graph's recorded IOSpec (names, datatypes, shapes, shared
dims, value ranges) and against `Limits` (body bytes, batch, every other dynamic size) before
anything runs; a bad one raises `RequestError` with the HTTP status to answer and one line for
the protocol's ``{"error": ...}`` body. Tensors are read and written by `flash_export.serving.wire`
(strict JSON: a non-finite input is refused, a non-finite output written as a string).

`flash_export.serving.batching.run_many` runs several checked requests, merging those whose shapes
differ only in the batch dim into one onnxruntime call (dynamic batching in
`flash_export.serving.ray_serve`), and only for a graph whose IOSpec declares where every input and
output holds the per-request batch (`IOSpec.batch_axes`); any other graph runs each request alone.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from flash_export._version import __version__
from flash_export.core.contract import ORT_TYPES
from flash_export.core.errors import RequestError, summary
from flash_export.core.feeds import check_feed, dim_error
from flash_export.core.io_spec import IOSpec
from flash_export.serving.limits import Limits, mib, size_bounds
from flash_export.serving.wire import (
    DATATYPES,
    HEADER_LENGTH,
    answer_bytes,
    byte_count,
    error_body,
    from_binary,
    from_json_data,
    json_array,
    json_body,
    load_json,
    to_binary,
)

__all__ = ["DATATYPES", "EXTENSIONS", "HEADER_LENGTH", "InferRequest", "OIPModel", "OutputSpec",
           "error_body", "json_body"]

EXTENSIONS = ("binary_tensor_data",)


@dataclass
class InferRequest:
    """A checked inference request.

    Attributes:
        id: the request's "id", echoed back (None when it had none).
        feed: input name -> array in the graph's dtype and shape.
        outputs: the outputs to answer, in order.
        binary: output name -> whether it goes back as binary data.
        sizes: the size of every dynamic name in the request (`feeds.check_feed`).
    """

    id: Optional[str]
    feed: Dict[str, np.ndarray]
    outputs: Tuple[str, ...]
    binary: Dict[str, bool]
    sizes: Dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSpec:
    """A graph output as the protocol describes it (dtype name, dims with -1 when dynamic)."""

    name: str
    dtype: str
    shape: Tuple[int, ...]


class OIPModel:
    """One graph behind the protocol: its metadata, request checks, runs and answers.

    Args:
        name: the model name in URLs.
        session: an onnxruntime session (see `flash_export.runtime.create_session`).
        io: the graph's IOSpec (`flash_export.runtime.session_io(session)`, which checks it
            against the graph).
        limits: request bounds.

    Attributes:
        batch_axes: tensor name -> the axis holding the per-request batch, for every input and
            output; None when requests must run one at a time (`IOSpec.batch_axes`).
    """

    def __init__(self, name: str, session: Any, io: IOSpec, limits: Limits = Limits()) -> None:
        self.name = name
        self.session = session
        self.io = io
        self.limits = limits
        self.outputs = tuple(_output_spec(o) for o in session.get_outputs())
        self.sizes = size_bounds(io, limits)
        self.batch_axes = io.batch_axes()

    # ------------------------------------------------------------------ metadata

    def metadata(self) -> Dict[str, Any]:
        """``GET /v2/models/{name}``: inputs and outputs with datatypes and shapes (-1: dynamic)."""
        return {"name": self.name, "versions": ["1"], "platform": "onnxruntime_onnx",
                "inputs": [{"name": t.name, "datatype": DATATYPES[t.dtype],
                            "shape": [d if isinstance(d, int) else -1 for d in t.dims]}
                           for t in self.io.inputs],
                "outputs": [{"name": o.name, "datatype": DATATYPES[o.dtype],
                             "shape": list(o.shape)} for o in self.outputs]}

    @staticmethod
    def server_metadata() -> Dict[str, Any]:
        """``GET /v2``: the server's name, version and protocol extensions."""
        return {"name": "flash-export", "version": __version__, "extensions": list(EXTENSIONS)}

    # ------------------------------------------------------------------ requests

    def parse(self, body: bytes, header_length: Optional[str] = None) -> InferRequest:
        """Check an infer request's body against the IOSpec and the limits, then decode it.

        Args:
            body: the whole HTTP body.
            header_length: the ``Inference-Header-Content-Length`` header, if sent.

        Raises:
            RequestError: 413 over the body limit, or for an answer the IOSpec's output shapes
                put over the response limit; 400 for anything malformed or out of bounds,
                naming the input, what it expected and what came.
        """
        if len(body) > self.limits.max_body_bytes:
            raise RequestError(413, f"the body is {len(body)} bytes, over the limit of "
                                    f"{self.limits.max_body_bytes}")
        split = len(body)
        if header_length is not None:
            count = byte_count(header_length, 12)
            if count is None or count > len(body):
                raise RequestError(400, f"Inference-Header-Content-Length "
                                        f"{header_length.strip()[:20]!r} is not a byte count "
                                        f"within the {len(body)}-byte body")
            split = count
        header = load_json(body[:split])
        if not isinstance(header, dict):
            raise RequestError(400, "the inference header must be a JSON object")
        unknown = sorted(set(header) - {"id", "parameters", "inputs", "outputs"})
        if unknown:
            raise RequestError(400, f"unknown request fields {unknown[:8]}")
        request_id = header.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise RequestError(400, "the request id must be a string")
        parameters = _parameters(header.get("parameters"), "the request")
        inputs = header.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise RequestError(400, "inputs must be a non-empty list of tensors")
        declared = self._declared(inputs)
        feed = self._decode(declared, memoryview(body)[split:])
        try:
            sizes = check_feed(self.io, feed)
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None
        outputs, binary = self._requested(header.get("outputs"), parameters)
        request = InferRequest(request_id, feed, outputs, binary, sizes)
        self._check_answer_size(request, {n: self.io.output_shape(n, sizes) for n in outputs})
        return request

    def _declared(self, inputs: List[Any]) -> List[Tuple[Dict[str, Any], Tuple[int, ...]]]:
        """Each input tensor with its shape, checked against the spec and limits before decoding.

        Shapes and names are bounded here so no data is converted for a request that would be
        refused anyway.
        """
        names = [t.name for t in self.io.inputs]
        seen: Dict[str, int] = {}
        sizes: Dict[str, int] = {}
        out: List[Tuple[Dict[str, Any], Tuple[int, ...]]] = []
        for tensor in inputs[:len(names) + 1]:
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
                raise RequestError(400, "each input is an object with a name, shape, datatype "
                                        "and data")
            name = tensor["name"]
            if name not in names:
                raise RequestError(400, f"unknown input {name[:64]!r}; inputs are {names}")
            if name in seen:
                raise RequestError(400, f"input {name} is given twice")
            extra = sorted(set(tensor) - {"name", "shape", "datatype", "parameters", "data"})
            if extra:
                raise RequestError(400, f"input {name}: unknown fields {extra[:8]}")
            spec = self.io.input(name)
            datatype = tensor.get("datatype")
            if datatype != DATATYPES[spec.dtype]:
                raise RequestError(400, f"input {name}: datatype {str(datatype)[:16]!r}, expected "
                                        f"{DATATYPES[spec.dtype]}")
            shape = tensor.get("shape")
            if not isinstance(shape, list) or len(shape) != len(spec.dims) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise RequestError(400, f"input {name}: shape {str(shape)[:80]} is not "
                                        f"{len(spec.dims)} sizes >= 0 "
                                        f"({', '.join(str(d) for d in spec.dims)})")
            for axis, (want, got) in enumerate(zip(spec.dims, shape)):
                error = dim_error(name, axis, want, got, self.sizes, sizes)
                if error:
                    raise RequestError(400, error)
            seen[name] = len(out)
            out.append((tensor, tuple(shape)))
        missing = [n for n in names if n not in seen]
        if missing or len(out) != len(names):
            raise RequestError(400, f"inputs are {names}; missing {missing}")
        return out

    def _decode(self, declared: List[Tuple[Dict[str, Any], Tuple[int, ...]]],
                binary: memoryview) -> Dict[str, np.ndarray]:
        """The arrays of the declared inputs, from JSON data or the binary section."""
        feed = {}
        offset = 0
        for tensor, shape in declared:
            spec = self.io.input(tensor["name"])
            params = _parameters(tensor.get("parameters"), f"input {spec.name}")
            count = math.prod(shape)
            if "binary_data_size" in params:
                if "data" in tensor:
                    raise RequestError(400, f"input {spec.name}: both data and binary_data_size")
                size = params["binary_data_size"]
                itemsize = np.dtype(spec.dtype).itemsize
                if not isinstance(size, int) or isinstance(size, bool) \
                        or size != count * itemsize:
                    raise RequestError(400, f"input {spec.name}: binary_data_size {size!r}, "
                                            f"expected {count * itemsize} for shape "
                                            f"{list(shape)}")
                if offset + size > len(binary):
                    raise RequestError(400, f"input {spec.name}: the binary section holds "
                                            f"{len(binary) - offset} more bytes, expected {size}")
                value = from_binary(spec.name, spec.dtype, shape,
                                    binary[offset:offset + size])
                offset += size
            elif "data" in tensor:
                value = from_json_data(spec.name, spec.dtype, shape, tensor["data"])
            else:
                raise RequestError(400, f"input {spec.name}: no data and no binary_data_size")
            if value.dtype.kind == "f" and value.size and not np.isfinite(value).all():
                raise RequestError(400, f"input {spec.name}: holds NaN or an infinity; inputs "
                                        "must be finite")
            feed[spec.name] = value
        if offset != len(binary):
            raise RequestError(400, f"the binary section is {len(binary)} bytes, the inputs "
                                    f"declare {offset}")
        return feed

    def _requested(self, outputs: Any, parameters: Dict[str, Any]
                   ) -> Tuple[Tuple[str, ...], Dict[str, bool]]:
        names = [o.name for o in self.outputs]
        default = parameters.get("binary_data_output", False)
        if not isinstance(default, bool):
            raise RequestError(400, "binary_data_output must be true or false")
        if outputs is None:
            return tuple(names), {n: default for n in names}
        if not isinstance(outputs, list) or not outputs or len(outputs) > len(names):
            raise RequestError(400, f"outputs must list some of {names}")
        chosen: Dict[str, bool] = {}
        for item in outputs:
            if not isinstance(item, dict) or item.get("name") not in names \
                    or set(item) - {"name", "parameters"}:
                raise RequestError(400, f"requested output {str(item)[:80]}: outputs are "
                                        f"{names}")
            flag = _parameters(item.get("parameters"), f"output {item['name']}").get(
                "binary_data", default)
            if not isinstance(flag, bool):
                raise RequestError(400, f"output {item['name']}: binary_data must be true or "
                                        "false")
            chosen[item["name"]] = flag
        return tuple(chosen), chosen

    # ------------------------------------------------------------------ runs and answers

    def run(self, feed: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run the graph on one checked feed: output name -> array.

        Raises:
            RequestError: 400 with onnxruntime's one-line reason (what the IOSpec cannot see).
        """
        try:
            results = self.session.run([o.name for o in self.outputs], dict(feed))
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise RequestError(400, f"the graph refused the request: {summary(exc)}") from None
        return {o.name: r for o, r in zip(self.outputs, results)}

    def answer(self, request: InferRequest, results: Mapping[str, np.ndarray]
               ) -> Tuple[Dict[str, str], bytes]:
        """The infer response: (extra HTTP headers, body).

        JSON outputs are flat in row-major order with non-finite floats as strings; binary ones
        follow the JSON header, whose length goes in Inference-Header-Content-Length. Encoded a
        block of values at a time, so a thread encoding a large answer lets others run.

        Raises:
            RequestError: 413 when the computed outputs put the answer over the response limit
                (shapes the IOSpec could not give before the run).
        """
        self._check_answer_size(request, {n: results[n].shape for n in request.outputs})
        tensors = []
        blobs = []
        for name in request.outputs:
            # (output's shape), rank 0 kept: ascontiguousarray would make a scalar (1,)
            value = np.asarray(results[name], order="C")
            head = json_body({"name": name, "datatype": _datatype(value.dtype),
                              "shape": list(value.shape)})[:-1]
            if request.binary[name]:
                raw = to_binary(value)
                tensors.append(head + b',"parameters":{"binary_data_size":%d}}' % len(raw))
                blobs.append(raw)
            else:
                tensors.append(head + b',"data":' + json_array(value) + b"}")
        reply: Dict[str, Any] = {"model_name": self.name, "model_version": "1"}
        if request.id is not None:
            reply["id"] = request.id
        header = json_body(reply)[:-1] + b',"outputs":[' + b",".join(tensors) + b"]}"
        if not blobs:
            return {"content-type": "application/json"}, header
        return ({"content-type": "application/octet-stream",
                 HEADER_LENGTH: str(len(header))}, header + b"".join(blobs))

    def _check_answer_size(self, request: InferRequest,
                           shapes: Mapping[str, Optional[Tuple[int, ...]]]) -> None:
        """413 when the outputs at `shapes` (None: not known yet) pass the response limit."""
        limit = self.limits.max_response_bytes
        total = 0
        parts = []
        for o in self.outputs:
            shape = shapes.get(o.name)
            if o.name not in request.binary or shape is None:
                continue
            count = math.prod(shape)
            binary = request.binary[o.name]
            size = answer_bytes(o.dtype, count, binary)
            total += size
            parts.append(f"{o.name} {list(shape)}: {count:,} values as "
                         f"{'binary' if binary else 'JSON'}")
        if total > limit:
            hint = "" if all(request.binary.values()) else "; binary outputs are smaller"
            raise RequestError(413, f"the answer would take up to {mib(total)} ("
                                    f"{'; '.join(parts)}), over the response limit of "
                                    f"{mib(limit)}: ask for fewer rows or tokens{hint}")


def _output_spec(arg: Any) -> OutputSpec:
    dtype = ORT_TYPES.get(arg.type)
    if dtype not in DATATYPES:
        raise RequestError(500, f"output {arg.name}: type {arg.type} has no protocol datatype")
    return OutputSpec(arg.name, dtype, tuple(d if isinstance(d, int) and d >= 0 else -1
                                             for d in arg.shape))


def _datatype(dtype: np.dtype) -> str:
    return DATATYPES[np.dtype(dtype).name]


def _parameters(value: Any, what: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(400, f"{what}: parameters must be a JSON object")
    return value

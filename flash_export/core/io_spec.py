"""What a model takes and gives: names, dtypes, dims and value ranges, recorded in every artifact.

An `IOSpec` declares a model's inputs in forward order (name, dtype, dims, and for integer inputs
the range of valid values, such as a vocabulary) and its outputs (names, and dims where known). A
dim is an int (static) or the name of a dynamic size ("batch", "seq", ...); inputs that share a
name share the size, and `IOSpec.sizes` bounds each name. An output dim may also be None: computed
by the graph (``2 * seq``, say), known only after a run. From it:

- the exporters declare dynamic dims to `torch.export` and name the graph's inputs and outputs;
- `validate` and `bench` generate valid inputs at any size (`core.feeds.make_feed`);
- a service checks a request before running it (`core.feeds.check_feed`), and bounds its answer
  (`IOSpec.output_shape`);
- a server joins concurrent requests into one run only along a declared per-request batch
  (`IOSpec.batch`, `IOSpec.batch_axes`): a dim called "batch" is just a dynamic size until the
  spec declares that its rows are independent requests.

Roles tell generated values apart: ``data`` (normal floats, or integers in [low, high)),
``padding`` (bool (batch, seq), True = a real token, or integers 0/1 as Hugging Face's
attention_mask: each row a random length >= 1), ``key_padding`` (the same with True = padding,
as PyTorch's key_padding_mask), ``attention`` (bool, True = may attend, about 25% blocked and
the first query row of the first batch entry fully blocked, a row that sees no key) and
``causal`` (a (seq, seq) causal mask as PyTorch's layers take it: True or -inf above the
diagonal, where a query may not look). Non-tensor arguments the model was exported with
(`is_causal=True`, say) are `IOSpec.constants`: the graph bakes them in, PyTorch calls pass them
again. A graph's own inputs give an IOSpec in `core.io_graph`. Imports neither torch nor onnx.
"""

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple, Union

Dim = Union[int, str]
OutDim = Union[int, str, None]  # an output's dim: static, an input size's name, or computed
DTYPES = ("float32", "float16", "float64", "int64", "int32", "bool")
ROLES = ("data", "padding", "key_padding", "attention", "causal")
Constant = Union[bool, int, float, str, None]
VALID_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# An input or output name: an identifier, or dotted ones (optimum's "past_key_values.0.key").
TENSOR_NAME = re.compile(r"^(?=.{1,64}\Z)[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*\Z")
_MAX_INPUTS = 64
_MAX_RANK = 8
_MAX_STATIC = 2**31 - 1


@dataclass(frozen=True)
class TensorSpec:
    """One input of a model.

    Attributes:
        name: the forward parameter's name (also the graph input's name).
        dtype: one of `DTYPES`.
        dims: one int (static) or size name (dynamic) per axis.
        low: integer inputs: the smallest valid value.
        high: integer inputs: one past the largest valid value (a vocabulary size).
        role: "data", "padding" or "attention" (see the module docstring).
    """

    name: str
    dtype: str
    dims: Tuple[Dim, ...]
    low: Optional[int] = None
    high: Optional[int] = None
    role: str = "data"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TENSOR_NAME.match(self.name):
            raise ValueError(f"input name {self.name!r} is not an identifier (or dotted ones) "
                             "of <= 64 characters")
        if self.dtype not in DTYPES:
            raise ValueError(f"input {self.name}: dtype {self.dtype!r} is not one of {DTYPES}")
        if self.role not in ROLES:
            raise ValueError(f"input {self.name}: role {self.role!r} is not one of {ROLES}")
        if not isinstance(self.dims, tuple) or len(self.dims) > _MAX_RANK:
            raise ValueError(f"input {self.name}: dims must be a tuple of at most {_MAX_RANK}")
        for d in self.dims:
            if isinstance(d, bool) or not (
                    (isinstance(d, int) and 0 <= d <= _MAX_STATIC)
                    or (isinstance(d, str) and VALID_NAME.match(d))):
                raise ValueError(f"input {self.name}: dim {d!r} is neither a size in "
                                 f"[0, 2**31) nor a size name")
        integer = self.dtype in ("int64", "int32")
        for bound in ("low", "high"):
            value = getattr(self, bound)
            if value is not None and (not integer or isinstance(value, bool)
                                      or not isinstance(value, int) or abs(value) > 2**62):
                raise ValueError(f"input {self.name}: {bound} is for integer inputs only, and "
                                 f"must be an int, got {value!r}")
        if integer and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError(f"input {self.name}: an integer input needs low < high (the range "
                             f"of valid values), got [{self.low}, {self.high})")
        if self.role not in ("data", "causal") and self.dtype != "bool" and not (
                self.role == "padding" and integer and (self.low, self.high) == (0, 2)):
            raise ValueError(f"input {self.name}: a {self.role} mask is bool (a padding mask "
                             f"also 0/1 integers, low 0, high 2), got {self.dtype}")
        if self.role == "causal" and (len(self.dims) != 2 or self.dims[0] != self.dims[1]):
            raise ValueError(f"input {self.name}: a causal mask is (seq, seq), got {self.dims}")
        if self.role in ("padding", "key_padding") and len(self.dims) != 2:
            raise ValueError(f"input {self.name}: a padding mask is (batch, seq), got {self.dims}")


@dataclass(frozen=True)
class IOSpec:
    """A model's inputs (in forward order), outputs and the bounds of its dynamic sizes.

    Attributes:
        inputs: one TensorSpec per forward argument the graph takes.
        outputs: the graph's output names, in the order the model returns them.
        sizes: size name -> (min, max); max None means unbounded. Every size name an input
            uses must be here.
        constants: non-tensor forward arguments (name -> bool, int, float, str or None) the
            graph was exported with.
        output_dims: output name -> its dims: an int (static), the name of an input size it
            equals, or None (computed by the graph; known after a run). The ONNX exporter
            records them from the graph's symbolic shapes; an output missing here has unknown
            dims (specs written before outputs had dims).
        batch: the size whose rows are independent requests, declared from the model (its
            layout, `batch_first`, a padding mask, or its own io_spec()): on the axis where an
            input or output has this name, row i of the answer depends on row i of the inputs
            only. None: nothing says so (a dim merely named "batch" is a dynamic size), and a
            server never joins two requests into one run.
    """

    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[str, ...] = ("output",)
    sizes: Dict[str, Tuple[int, Optional[int]]] = field(default_factory=dict)
    constants: Dict[str, Constant] = field(default_factory=dict)
    output_dims: Dict[str, Tuple[OutDim, ...]] = field(default_factory=dict)
    batch: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.inputs or len(self.inputs) > _MAX_INPUTS:
            raise ValueError(f"a model takes 1 to {_MAX_INPUTS} inputs, got {len(self.inputs)}")
        names = [t.name for t in self.inputs] + list(self.outputs)
        if len(set(names)) != len(names):
            raise ValueError(f"input and output names must be distinct, got {names}")
        if not self.outputs or not all(isinstance(o, str) and TENSOR_NAME.match(o)
                                       for o in self.outputs):
            raise ValueError(f"output names must be identifiers, got {self.outputs!r}")
        for name, value in self.constants.items():
            if not VALID_NAME.match(str(name)) or name in names or (
                    value is not None and not isinstance(value, (bool, int, float, str))):
                raise ValueError(f"constant {str(name)[:40]!r}: a distinct identifier with a "
                                 f"scalar value, got {value!r}")
        used = {d for t in self.inputs for d in t.dims if isinstance(d, str)}
        missing = sorted(used - set(self.sizes))
        if missing:
            raise ValueError(f"size names {missing} have no bounds in sizes")
        for name, bounds in self.sizes.items():
            low, high = bounds
            if (not VALID_NAME.match(name) or not isinstance(low, int) or low < 0
                    or (high is not None and (not isinstance(high, int) or high < low))):
                raise ValueError(f"size {name!r}: bounds must be (min >= 0, max >= min or "
                                 f"None), got {bounds!r}")
        for name, dims in self.output_dims.items():
            if name not in self.outputs:
                raise ValueError(f"output_dims names {str(name)[:64]!r}, which is not an output "
                                 f"of {list(self.outputs)}")
            if not isinstance(dims, tuple) or len(dims) > _MAX_RANK or not all(
                    d is None or (isinstance(d, int) and not isinstance(d, bool)
                                  and 0 <= d <= _MAX_STATIC) or (isinstance(d, str) and d in used)
                    for d in dims):
                raise ValueError(f"output {name}: dims must be at most {_MAX_RANK} of: a size in "
                                 f"[0, 2**31), an input size's name, or None; got "
                                 f"{str(dims)[:80]}")
        if self.batch is not None and self.batch not in used:
            raise ValueError(f"batch {str(self.batch)[:64]!r} is not a size any input uses")

    @property
    def dynamic(self) -> Tuple[str, ...]:
        """The size names, in order of first use."""
        seen: List[str] = []
        for t in self.inputs:
            for d in t.dims:
                if isinstance(d, str) and d not in seen:
                    seen.append(d)
        return tuple(seen)

    def input(self, name: str) -> TensorSpec:
        """The input called `name` (KeyError when there is none)."""
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def has_input(self, name: str) -> bool:
        """Whether the model takes an input called `name`."""
        return any(t.name == name for t in self.inputs)

    def clamp(self, sizes: Mapping[str, int]) -> Dict[str, int]:
        """`sizes` moved into each size's bounds (names the spec does not use dropped)."""
        out = {}
        for name in self.dynamic:
            low, high = self.sizes[name]
            value = max(int(sizes.get(name, low)), low)
            out[name] = value if high is None else min(value, high)
        return out

    def fixed(self, sizes: Mapping[str, int]) -> "IOSpec":
        """This spec with the named sizes pinned (min = max): what a static-shape export records.

        The names stay, so inputs still say which dims are the batch and the sequence.
        """
        return dataclasses.replace(self, sizes={
            k: (int(sizes[k]), int(sizes[k])) if k in sizes else v for k, v in self.sizes.items()})

    def is_static(self, name: str) -> bool:
        """Whether size `name` is pinned to one value."""
        low, high = self.sizes[name]
        return high is not None and low == high

    def shape(self, t: TensorSpec, sizes: Mapping[str, int]) -> Tuple[int, ...]:
        """The concrete shape of input `t` at `sizes`."""
        return tuple(d if isinstance(d, int) else int(sizes[d]) for d in t.dims)

    def output_shape(self, name: str, sizes: Mapping[str, int]) -> Optional[Tuple[int, ...]]:
        """Output `name`'s shape at `sizes` (a request's, from `check_feed`), before any run.

        None when the spec does not know it: no recorded dims, or a dim the graph computes.
        """
        shape = []
        for d in self.output_dims.get(name, (None,)):
            if d is None:
                return None
            shape.append(d if isinstance(d, int) else int(sizes[d]))
        return tuple(shape)

    def batch_axes(self) -> Optional[Dict[str, int]]:
        """Where each input and output holds the per-request batch: tensor name -> axis.

        None unless requests may be joined into one run: `batch` is declared and dynamic, and
        every input and every output (with known dims) has it on exactly one axis.
        """
        return self._batch_plan()[0]

    def unbatched_reason(self) -> Optional[str]:
        """Why `batch_axes` is None, in a few words (None when requests may be joined)."""
        return self._batch_plan()[1]

    def _batch_plan(self) -> Tuple[Optional[Dict[str, int]], Optional[str]]:
        batch = self.batch
        if batch is None:
            return None, "the model declares no per-request batch dim"
        if self.is_static(batch):
            return None, f"the batch ({batch}) is static"
        axes: Dict[str, int] = {}
        tensors = [(t.name, t.dims) for t in self.inputs] + [
            (name, self.output_dims.get(name)) for name in self.outputs]
        for name, dims in tensors:
            if dims is None:
                return None, f"output {name}'s dims are not recorded"
            where = [axis for axis, d in enumerate(dims) if d == batch]
            if len(where) != 1:
                return None, f"{name} has the batch ({batch}) on {len(where)} axes, not 1"
            axes[name] = where[0]
        return axes, None

    def to_json(self) -> str:
        """Serialise for artifact metadata."""
        return json.dumps({"inputs": [dataclasses.asdict(t) for t in self.inputs],
                           "outputs": list(self.outputs),
                           "sizes": {k: list(v) for k, v in self.sizes.items()},
                           "constants": self.constants,
                           "output_dims": {k: list(v) for k, v in self.output_dims.items()},
                           "batch": self.batch}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "IOSpec":
        """Inverse of `to_json`; every field is checked (the text may come from anywhere).

        A spec written before outputs had dims and before the batch was declared reads with
        no output dims and batch None: its requests are never joined.

        Raises:
            ValueError: malformed JSON (nested too deeply included), unknown keys, or a field of
                the wrong type or range.
        """
        try:
            data = json.loads(text)
        except RecursionError:
            raise ValueError("an io spec's JSON is nested too deeply") from None
        keys = {"inputs", "outputs", "sizes", "constants", "output_dims", "batch"}
        if not isinstance(data, dict) or set(data) - keys:
            raise ValueError(f"an io spec is a JSON object with {', '.join(sorted(keys))}")
        raw_inputs, outputs, sizes = data.get("inputs"), data.get("outputs"), data.get("sizes")
        constants = data.get("constants", {})
        raw_output_dims, batch = data.get("output_dims", {}), data.get("batch")
        if not isinstance(raw_inputs, list) or not isinstance(outputs, list) \
                or not isinstance(sizes, dict) or not isinstance(constants, dict) \
                or not isinstance(raw_output_dims, dict) \
                or not (batch is None or isinstance(batch, str)):
            raise ValueError("io spec inputs and outputs must be lists, sizes, constants and "
                             "output_dims objects, batch a size name or null")
        output_dims = {}
        for name, dims in list(raw_output_dims.items())[:_MAX_INPUTS + 1]:
            if not isinstance(dims, list):
                raise ValueError(f"output {str(name)[:40]!r}: dims must be a list")
            output_dims[name] = tuple(dims)
        inputs = []
        fields = {f.name for f in dataclasses.fields(TensorSpec)}
        for item in raw_inputs[:_MAX_INPUTS + 1]:
            if not isinstance(item, dict) or set(item) - fields \
                    or not isinstance(item.get("dims"), list):
                raise ValueError(f"io spec input {str(item)[:60]} is malformed")
            inputs.append(TensorSpec(**{**item, "dims": tuple(item["dims"])}))
        bounds = {}
        for name, pair in sizes.items():
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError(f"size {str(name)[:40]!r}: bounds must be [min, max]")
            bounds[name] = (pair[0], pair[1])
        return cls(tuple(inputs), tuple(outputs), bounds, dict(constants), output_dims, batch)


def attention_io(embed: int, *, mask: bool = False) -> IOSpec:
    """The attention contract: forward(values, keys, queries[, mask]) -> output (B, Lq, E)."""
    inputs = [TensorSpec("values", "float32", ("batch", "k_len", embed)),
              TensorSpec("keys", "float32", ("batch", "k_len", embed)),
              TensorSpec("queries", "float32", ("batch", "q_len", embed))]
    if mask:
        inputs.append(TensorSpec("mask", "bool", ("batch", 1, "q_len", "k_len"),
                                 role="attention"))
    return IOSpec(tuple(inputs), ("output",),
                  {"batch": (1, None), "q_len": (0, None), "k_len": (0, None)},
                  output_dims={"output": ("batch", "q_len", embed)}, batch="batch")


def with_float_dtype(io: IOSpec, dtype: str) -> IOSpec:
    """`io` with every floating-point input in `dtype` (an export's precision)."""
    return dataclasses.replace(io, inputs=tuple(
        dataclasses.replace(t, dtype=dtype) if t.dtype.startswith("float") else t
        for t in io.inputs))



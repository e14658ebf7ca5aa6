"""IOSpecs read off a graph's inputs and outputs (as onnx or onnxruntime describes them)."""

import dataclasses
import itertools
from typing import AbstractSet, Any, Dict, List, Optional, Sequence, Tuple

from flash_export.core.io_spec import DTYPES, VALID_NAME, Dim, IOSpec, OutDim, TensorSpec

# (name, dtype name or None, dims): one graph input as onnxruntime or onnx describes it; a dim is
# an int, a name, or None (unknown).
GraphInput = Tuple[str, Optional[str], Sequence[Any]]


def io_from_graph(inputs: Sequence[GraphInput]) -> IOSpec:
    """An IOSpec for a graph that records none, from its inputs alone.

    Named dims stay dynamic (unnamed ones get a name of their own); a rank-4 bool input is an
    attention mask and a rank-2 one a padding mask (True = attend, True = a real token); an
    integer input's valid values are unknown, so only 0 is generated.

    Raises:
        ValueError: an input of a dtype an IOSpec cannot describe.
    """
    specs = []
    sizes: Dict[str, Tuple[int, Optional[int]]] = {}
    named = {d for _, _, shape in inputs for d in shape
             if isinstance(d, str) and VALID_NAME.match(d)}
    for name, dtype, shape in inputs:
        if dtype not in DTYPES:
            raise ValueError(f"input {name}: element type {dtype or 'unknown'}")
        dims: List[Dim] = []
        for axis, d in enumerate(shape):
            if isinstance(d, int) and not isinstance(d, bool) and d >= 0:
                dims.append(d)
                continue
            symbol = d if isinstance(d, str) and d in named else _own_name(name, axis, named,
                                                                             sizes.keys())
            sizes.setdefault(symbol, (0 if symbol in ("q_len", "k_len") else 1, None))
            dims.append(symbol)
        role = "data"
        if dtype == "bool":
            role = "attention" if len(dims) == 4 else "padding" if len(dims) == 2 else "data"
        integer = dtype in ("int64", "int32")
        specs.append(TensorSpec(name, dtype, tuple(dims), 0 if integer else None,
                                1 if integer else None, role))
    return IOSpec(tuple(specs), ("output",), sizes)


def _own_name(name: str, axis: int, *taken: AbstractSet[str]) -> str:
    """A size name no other dim has, for the unnamed dim `axis` of input `name`.

    "NAME_dimAXIS", cut to the 64 characters a size name may have and numbered where another
    dim already has that name: two dims of one size name must be equal, and nothing says so.
    """
    suffixes = (f"_dim{axis}_{n}" if n else f"_dim{axis}" for n in itertools.count())
    return next(symbol for symbol in (name[:64 - len(suffix)] + suffix for suffix in suffixes)
                if not any(symbol in t for t in taken))


def graph_output_dims(io: IOSpec, dims: Sequence[Any]) -> Tuple[OutDim, ...]:
    """A graph output's dims as an IOSpec records them: an int, one of `io`'s size names, or None.

    Args:
        io: the spec whose size names the graph's symbolic dims may carry.
        dims: the graph's dims (an int, a symbolic name, or None), as in `GraphInput`.
    """
    named = set(io.dynamic)
    return tuple(d if isinstance(d, int) and not isinstance(d, bool) and d >= 0
                 else d if isinstance(d, str) and d in named else None for d in dims)


def with_graph_outputs(io: IOSpec, inputs: Sequence[GraphInput],
                       outputs: Sequence[GraphInput]) -> IOSpec:
    """`io` checked against its graph's symbolic dims, with output dims from the graph if unknown.

    The exporter names the graph's dynamic dims after the spec's sizes, inputs and outputs
    alike, so the graph confirms what the spec says: each recorded output dim (a static size, a
    size name) and the axis of every input and output that holds the declared batch. A spec
    recording no output dims (written before they were recorded) gets the graph's.

    Args:
        io: the recorded spec.
        inputs: the graph's inputs: (name, dtype name, dims) as in `GraphInput`.
        outputs: the graph's outputs, likewise.

    Raises:
        ValueError: one line naming the tensor and axis where spec and graph disagree.
    """
    graph = {name: list(dims) for name, _, dims in outputs}
    for name, dims in io.output_dims.items():
        held = graph.get(name)
        if held is None:
            raise ValueError(f"the io_spec gives dims for output {name!r}, the graph has no such "
                             "output")
        if len(held) != len(dims):
            raise ValueError(f"the io_spec says output {name} has rank {len(dims)}, the graph's "
                             f"has rank {len(held)}")
        for axis, (want, got) in enumerate(zip(dims, graph_output_dims(io, held))):
            pinned = isinstance(want, str) and io.is_static(want) and got == io.sizes[want][0]
            if want is not None and want != got and not pinned:
                raise ValueError(f"the io_spec says output {name} axis {axis} is {want}, the "
                                 f"graph's is {held[axis] if held[axis] is not None else '?'}")
    if not io.output_dims:
        io = dataclasses.replace(io, outputs=tuple(graph) or io.outputs, output_dims={
            name: graph_output_dims(io, dims) for name, dims in graph.items()})
    if io.batch is not None and not io.is_static(io.batch):
        shapes = {name: list(dims) for name, _, dims in inputs}
        for t in io.inputs:
            for axis, d in enumerate(t.dims):
                held = shapes.get(t.name, [])
                if d == io.batch and (axis >= len(held) or held[axis] != io.batch):
                    raise ValueError(f"the io_spec puts the batch ({io.batch}) on input "
                                     f"{t.name} axis {axis}, where the graph has no such dim")
    return io

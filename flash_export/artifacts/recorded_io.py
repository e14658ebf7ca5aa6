"""The IOSpec an artifact records, checked against the graph the file holds. Imports no torch."""

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

from flash_export.core.errors import ArtifactError
from flash_export.core.io_graph import GraphInput, io_from_graph, with_graph_outputs
from flash_export.core.io_spec import IOSpec, attention_io


def numel(dims: Any) -> int:
    """The number of elements of a tensor of static `dims`."""
    n = 1
    for d in dims:
        n *= int(d)
    return n


def recorded_io(meta: Mapping[str, str], path: "os.PathLike[str] | str",
                graph_inputs: Optional[Sequence[GraphInput]] = None,
                graph_outputs: Optional[Sequence[GraphInput]] = None) -> IOSpec:
    """The IOSpec an artifact records.

    A graph from before IOSpecs (or from elsewhere) is described by its own inputs
    (`graph_inputs`: name, dtype, dims); a TorchScript archive from before IOSpecs follows the
    attention contract. Neither declares a per-request batch. With `graph_outputs`, the
    recorded output dims and batch axes are checked against the graph's symbolic dims, and the
    graph's output dims fill in a spec that records none (`io_graph.with_graph_outputs`).

    Raises:
        ArtifactError: a malformed IOSpec, graph inputs it cannot describe, or a spec the
            graph contradicts.
    """
    text = meta.get("io_spec")
    if text is None:
        try:
            if graph_inputs is not None:
                io = io_from_graph(graph_inputs)
            else:
                io = dataclasses.replace(attention_io(int(meta.get("embed", "0")), mask=True),
                                         batch=None)
        except ValueError as exc:
            raise ArtifactError(f"{path}: records no io_spec, and its inputs do not make one: "
                                f"{exc}") from exc
    else:
        try:
            io = IOSpec.from_json(text)
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"{path}: bad io_spec metadata: {exc}") from exc
        if graph_inputs is not None:
            _check_io_matches_graph(io, graph_inputs, path)
    if graph_outputs is not None:
        try:
            io = with_graph_outputs(io, graph_inputs or [], graph_outputs)
        except ValueError as exc:
            raise ArtifactError(f"{path}: {exc}") from exc
    return io


def _check_io_matches_graph(io: IOSpec, graph_inputs: Sequence[GraphInput],
                            path: "os.PathLike[str] | str") -> None:
    """The recorded IOSpec describes the graph's inputs: names, dtypes, ranks, static sizes.

    Feeds are built from the IOSpec, so an edited one would feed the graph (and the reference)
    inputs the file never took. A size the IOSpec fixes must be fixed, to the same value, in the
    graph: a static 8000 where the graph's batch is symbolic would make every feed 8000 rows,
    past any memory estimate made from the batches asked for.

    Raises:
        ArtifactError: an input the graph lacks or does not declare, or disagrees on.
    """
    graph = {name: (dtype, tuple(shape)) for name, dtype, shape in graph_inputs}
    recorded_names = {t.name for t in io.inputs}
    for name in graph:
        if name not in recorded_names:
            raise ArtifactError(f"{path}: the graph takes input {name!r}, the io_spec does not")
    for t in io.inputs:
        if t.name not in graph:
            raise ArtifactError(f"{path}: the io_spec names input {t.name!r}, the graph has none")
        dtype, shape = graph[t.name]
        if dtype != t.dtype or len(shape) != len(t.dims):
            raise ArtifactError(f"{path}: the io_spec says {t.name} is {t.dtype} of rank "
                                f"{len(t.dims)}, the graph's is {dtype} of rank {len(shape)}")
        for axis, (want, held) in enumerate(zip(t.dims, shape)):
            if not isinstance(want, int):
                continue
            static = isinstance(held, int) and not isinstance(held, bool) and held >= 0
            if not static:
                raise ArtifactError(f"{path}: the io_spec says {t.name} has size {want} on axis "
                                    f"{axis}, the graph's is symbolic ({held or 'unnamed'}): "
                                    "the io_spec was edited")
            if want != held:
                raise ArtifactError(f"{path}: the io_spec says {t.name} has size {want} on axis "
                                    f"{axis}, the graph's has {held}")

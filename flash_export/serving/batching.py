"""Dynamic batching for the Open Inference Protocol: checked requests merged into one run.

`flash_export.serving.ray_serve` hands each replica's queued requests (Ray Serve's `serve.batch`) to
`run_many`. Requests are joined only along the per-request batch the graph's IOSpec declares,
on each input's and output's own axis (`IOSpec.batch_axes`: (L, B, E) layouts too); a graph that
declares none runs every request alone, so no answer ever holds another request's rows. Imports
no torch, no Ray.
"""

from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np

from flash_export.core.errors import RequestError
from flash_export.serving.protocol import OIPModel


def run_many(model: OIPModel, feeds: Sequence[Mapping[str, np.ndarray]]
             ) -> List[Union[Dict[str, np.ndarray], RequestError]]:
    """Run several checked feeds, merging along the declared batch those whose shapes allow.

    Feeds merge when the graph declares a per-request batch on every input and output
    (`OIPModel.batch_axes`) and their other dims match, up to `Limits.max_batch` rows per run;
    each input is joined and each output split on its own batch axis. A feed that fails gets
    its RequestError in its place; the others still run.
    """
    answers: List[Any] = [None] * len(feeds)
    for group in _groups(model, feeds):
        if len(group) > 1:
            merged = _run_merged(model, [feeds[i] for i in group])
            if merged is not None:
                for i, answer in zip(group, merged):
                    answers[i] = answer
                continue
        for i in group:
            try:
                answers[i] = model.run(feeds[i])
            except RequestError as exc:
                answers[i] = exc
    return answers


def _run_merged(model: OIPModel, feeds: Sequence[Mapping[str, np.ndarray]]
                ) -> Union[List[Dict[str, np.ndarray]], None]:
    """One run for `feeds` joined on their batch axes, split back per feed; None: run alone.

    None when the graph refuses the joined run (one at a time then finds which request it
    refuses) or returns an output whose batch axis does not hold the rows it was given.
    """
    axes = model.batch_axes
    assert axes is not None
    inputs = model.io.inputs
    first = inputs[0].name
    rows = [int(feed[first].shape[axes[first]]) for feed in feeds]
    merged = {t.name: np.concatenate([feed[t.name] for feed in feeds], axis=axes[t.name])
              for t in inputs}  # each input with sum(rows) on its batch axis
    try:
        results = model.run(merged)
    except RequestError:
        return None
    total = sum(rows)
    if any(r.ndim <= axes[n] or r.shape[axes[n]] != total for n, r in results.items()):
        return None  # a graph that breaks its own spec: never hand out rows that may mix
    answers = []
    start = 0
    for count in rows:
        answers.append({n: np.take(r, range(start, start + count), axis=axes[n])
                        for n, r in results.items()})
        start += count
    return answers


def _groups(model: OIPModel, feeds: Sequence[Mapping[str, np.ndarray]]) -> List[List[int]]:
    """Indices of `feeds` per run: same non-batch shapes, at most the batch limit's rows each."""
    io, axes = model.io, model.batch_axes
    if axes is None or io.batch is None:
        return [[i] for i in range(len(feeds))]
    high = model.sizes[io.batch][1]
    first = io.inputs[0].name
    open_groups: Dict[Any, Tuple[List[int], int]] = {}
    groups: List[List[int]] = []
    for i, feed in enumerate(feeds):
        key = tuple(_without(feed[t.name].shape, axes[t.name]) for t in io.inputs)
        rows = feed[first].shape[axes[first]]
        members, total = open_groups.get(key, ([], 0))
        if members and total + rows > high:
            groups.append(members)
            members, total = [], 0
        members.append(i)
        open_groups[key] = (members, total + rows)
    groups.extend(members for members, _ in open_groups.values())
    return groups


def _without(shape: Tuple[int, ...], axis: int) -> Tuple[int, ...]:
    return shape[:axis] + shape[axis + 1:]

"""Dynamic batching for the Open Inference Protocol: checked requests merged into one run.

`flash_export.serve` hands each replica's queued requests (Ray Serve's `serve.batch`) to
`run_many`. Imports no torch, no Ray.
"""

from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np

from flash_export.errors import RequestError
from flash_export.oip import OIPModel


def run_many(model: OIPModel, feeds: Sequence[Mapping[str, np.ndarray]]
             ) -> List[Union[Dict[str, np.ndarray], RequestError]]:
    """Run several checked feeds, merging along the batch dim those whose shapes allow.

    Feeds merge when the graph's inputs all lead with the same dynamic batch dim and every other
    dim matches, up to `Limits.max_batch` rows per run; each answer is sliced back out. A feed
    that fails gets its RequestError in its place; the others still run.
    """
    inputs = model.io.inputs
    answers: List[Any] = [None] * len(feeds)
    for group in _groups(model, feeds):
        if len(group) > 1:
            merged = {t.name: np.concatenate([feeds[i][t.name] for i in group])
                      for t in inputs}  # (sum of batches, ...)
            try:
                results = model.run(merged)
            except RequestError:
                pass  # one at a time below finds which request the graph refused
            else:
                start = 0
                for i in group:
                    rows = len(feeds[i][inputs[0].name])
                    answers[i] = {n: r[start:start + rows] for n, r in results.items()}
                    start += rows
                continue
        for i in group:
            try:
                answers[i] = model.run(feeds[i])
            except RequestError as exc:
                answers[i] = exc
    return answers


def _groups(model: OIPModel, feeds: Sequence[Mapping[str, np.ndarray]]) -> List[List[int]]:
    """Indices of `feeds` per run: same non-batch shapes, at most the batch limit's rows each."""
    io, batch = model.io, model.batch_name
    if batch is None or io.is_static(batch):
        return [[i] for i in range(len(feeds))]
    high = model.sizes[batch][1]
    open_groups: Dict[Any, Tuple[List[int], int]] = {}
    groups: List[List[int]] = []
    for i, feed in enumerate(feeds):
        key = tuple(feed[t.name].shape[1:] for t in io.inputs)
        rows = feed[io.inputs[0].name].shape[0]
        members, total = open_groups.get(key, ([], 0))
        if members and total + rows > high:
            groups.append(members)
            members, total = [], 0
        members.append(i)
        open_groups[key] = (members, total + rows)
    groups.extend(members for members, _ in open_groups.values())
    return groups

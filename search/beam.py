"""Beam search over column-wise splits, each candidate scored by a greedy grid placement.

A search state is a :data:`SplitState`: for each table (in input order) the widths of its
column shards, widest first. The start state splits nothing, except tables wider in
memory than the largest device, which are halved until they fit. Each step expands every
state in the beam: the candidates are the union of the ``top_k`` tables whose widest shard
is largest in memory and the ``top_k`` whose widest shard has the highest predicted
compute; a child halves one candidate's widest shard (when the half is a positive multiple
of 4). All new children are placed by one lockstep :func:`~neuroshard.search.greedy.place_many`
call, the ``width`` cheapest form the next beam, and the cheapest plan seen anywhere,
the unsplit start included, is returned.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Sequence

from neuroshard.search.greedy import Placement, place_many, to_plan
from neuroshard.search.scoring import Scorer, finish_plan
from neuroshard.types import (
    DIM_MULTIPLE,
    Cluster,
    CostEstimator,
    Plan,
    PlanInfeasibleError,
    TableSpec,
)

logger = logging.getLogger(__name__)

# Per table, in input order, its shard widths, widest first.
SplitState = tuple[tuple[int, ...], ...]

CANDIDATES_PER_KEY = 10  # tables taken by size and by predicted compute at each expansion


def halve(widths: tuple[int, ...]) -> tuple[int, ...] | None:
    """``widths`` with the widest shard halved, or None when the half is not a multiple of 4."""
    widest = widths[0]
    half = widest // 2
    if widest % 2 or half % DIM_MULTIPLE or half < DIM_MULTIPLE:
        return None
    return tuple(sorted(widths[1:] + (half, half), reverse=True))


def specs_of(tables: Sequence[TableSpec], state: SplitState) -> list[TableSpec]:
    """The column shards of ``state`` as narrowed specs, tables in order, widest first."""
    return [t.with_dim(w) for t, widths in zip(tables, state) for w in widths]


def initial_state(tables: Sequence[TableSpec], cluster: Cluster) -> SplitState:
    """No splits, except tables larger than the largest device, halved until they fit."""
    largest = max(cluster.memory_per_device_bytes)
    state = []
    for t in tables:
        widths: tuple[int, ...] | None = (t.dim,)
        while t.column_bytes(widths[0]) > largest:
            halved = halve(widths)
            if halved is None:
                raise PlanInfeasibleError(
                    f"table {t.name!r} does not fit any device even split into shards of "
                    f"width {widths[0]} ({t.column_bytes(widths[0])} bytes each); largest "
                    f"device memory {largest} bytes, total {cluster.total_memory_bytes} bytes"
                )
            widths = halved
        if len(widths) > 1:
            logger.info("table %r split into %d shards of width %d to fit device memory",
                        t.name, len(widths), widths[0])
        state.append(widths)
    return tuple(state)


def expand(state: SplitState, tables: Sequence[TableSpec], scorer: Scorer, *,
           top_k: int = CANDIDATES_PER_KEY) -> list[SplitState]:
    """Children of ``state``: one more split of a large or costly table each."""
    halved = {i: h for i, widths in enumerate(state) if (h := halve(widths)) is not None}
    if not halved:
        return []
    index = list(halved)
    widest = [tables[i].with_dim(state[i][0]) for i in index]
    compute = scorer.compute([(scorer.item(s),) for s in widest]).tolist()
    by_size = sorted(range(len(index)), key=lambda k: -widest[k].size_bytes)[:top_k]
    by_compute = sorted(range(len(index)), key=lambda k: -compute[k])[:top_k]
    chosen = sorted(index[k] for k in set(by_size) | set(by_compute))
    return [state[:i] + (halved[i],) + state[i + 1:] for i in chosen]


def beam_search(tables: Sequence[TableSpec], cluster: Cluster, estimator: CostEstimator, *,
                seed: int = 0, width: int = 3, max_splits: int = 10) -> Plan:
    """NeuroShard's search: beam over column splits, greedy grid placement of each.

    Deterministic; ``seed`` is accepted for the :class:`~neuroshard.types.Searcher` signature.
    """
    if width < 1 or max_splits < 0:
        raise ValueError(f"need width >= 1 and max_splits >= 0, got {width} and {max_splits}")
    started = time.perf_counter()
    scorer = Scorer(estimator)
    start = initial_state(tables, cluster)
    best_state = start
    best = place_many([specs_of(tables, start)], cluster, scorer)[0]
    best_ms = best.cost_ms if isinstance(best, Placement) else math.inf
    beam, seen = [start], {start}
    for step in range(max_splits):
        children = []
        for state in beam:
            for child in expand(state, tables, scorer):
                if child not in seen:
                    seen.add(child)
                    children.append(child)
        if not children:
            break
        results = place_many([specs_of(tables, c) for c in children], cluster, scorer)
        costs = [r.cost_ms if isinstance(r, Placement) else math.inf for r in results]
        ranked = sorted(range(len(children)), key=costs.__getitem__)
        beam = [children[k] for k in ranked[:width]]
        if costs[ranked[0]] < best_ms:
            best_state, best, best_ms = children[ranked[0]], results[ranked[0]], costs[ranked[0]]
        logger.debug("beam step %d: %d children, step best %.4f ms, overall best %.4f ms",
                     step + 1, len(children), costs[ranked[0]], best_ms)
    if isinstance(best, PlanInfeasibleError):
        raise best
    specs = specs_of(tables, best_state)
    plan = to_plan(tables, cluster, specs, best.devices)
    logger.debug("beam search: %d states scored, %d estimator compute calls, %d loads",
                 len(seen), scorer.compute_calls, scorer.loads_computed)
    return finish_plan(plan, estimator, searcher="neuroshard", started=started,
                       splits=len(specs) - len(tables), states_scored=len(seen),
                       scale=best.scale)

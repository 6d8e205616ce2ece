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

Narrowed shard specs are built once per (table, width) and reused by every state. With
``budget_s`` the beam places only the children the remaining time affords (see
:func:`beam_search`); for 1,000 tables on 128 devices a step of ~50 children costs several
seconds, so a budget bounds the search's time without touching the unsplit placement.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Sequence

from neuroshard.search.greedy import Placement, place_many, to_plan
from neuroshard.search.scoring import Scorer
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


def specs_of(tables: Sequence[TableSpec], state: SplitState,
             cache: dict[tuple[int, int], TableSpec] | None = None) -> list[TableSpec]:
    """The column shards of ``state`` as narrowed specs, tables in order, widest first.

    ``cache`` (table index, width) -> spec reuses the narrowed specs across states.
    """
    if cache is None:
        return [t.with_dim(w) for t, widths in zip(tables, state) for w in widths]
    out = []
    for i, (t, widths) in enumerate(zip(tables, state)):
        for w in widths:
            spec = cache.get((i, w))
            if spec is None:
                spec = cache[(i, w)] = t if w == t.dim else t.with_dim(w)
            out.append(spec)
    return out


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
           top_k: int = CANDIDATES_PER_KEY,
           cache: dict[tuple[int, int], TableSpec] | None = None) -> list[SplitState]:
    """Children of ``state``: one more split of a large or costly table each, in table order."""
    return [child for child, _ in _children(state, tables, scorer, top_k, cache)]


def _children(state: SplitState, tables: Sequence[TableSpec], scorer: Scorer, top_k: int,
              cache: dict[tuple[int, int], TableSpec] | None
              ) -> list[tuple[SplitState, float]]:
    """:func:`expand`'s children, each with the predicted compute (ms) of the shard it halves."""
    halved = {i: h for i, widths in enumerate(state) if (h := halve(widths)) is not None}
    if not halved:
        return []
    index = list(halved)
    cache = {} if cache is None else cache
    widest = []
    for i in index:
        spec = cache.get((i, state[i][0]))
        if spec is None:
            spec = cache[(i, state[i][0])] = tables[i].with_dim(state[i][0])
        widest.append(spec)
    compute = scorer.singles([scorer.item(s) for s in widest]).tolist()
    by_size = sorted(range(len(index)), key=lambda k: -widest[k].size_bytes)[:top_k]
    by_compute = sorted(range(len(index)), key=lambda k: -compute[k])[:top_k]
    chosen = sorted(set(by_size) | set(by_compute), key=index.__getitem__)
    return [(state[:index[k]] + (halved[index[k]],) + state[index[k] + 1:], compute[k])
            for k in chosen]


def affordable(candidates: Sequence[tuple[tuple, SplitState]], left_s: float,
               per_child_s: float) -> list[SplitState]:
    """The children that ``left_s`` seconds can place at ``per_child_s`` each: all of them
    in their given order when they fit, else the best by their priority keys (the first
    element of each pair: lower is more promising)."""
    fit = max(0, int(left_s / max(per_child_s, 1e-9))) if left_s > 0 else 0
    if fit >= len(candidates):
        return [child for _, child in candidates]
    return [child for _, child in sorted(candidates, key=lambda c: c[0])[:fit]]


def beam_search(tables: Sequence[TableSpec], cluster: Cluster, estimator: CostEstimator, *,
                seed: int = 0, width: int = 3, max_splits: int = 10,
                top_k: int = CANDIDATES_PER_KEY, budget_s: float | None = None) -> Plan:
    """NeuroShard's search: beam over column splits, greedy grid placement of each.

    ``budget_s`` (default None: no limit) bounds the search's own time. The unsplit
    placement is always computed; before each beam step the step's time is projected from
    the previous step's seconds per child, and when it would overrun the budget only the
    most promising children are placed (those of better-ranked beam states first, then
    those halving the costlier shard), or the search stops when not even one fits. The
    plan's ``meta["budget_cut"]`` counts the children so skipped. The result is then still
    the best plan seen, never worse than the unsplit greedy grid, but may be worse than
    the unbudgeted search's.

    Deterministic without a budget; ``seed`` is accepted for the
    :class:`~neuroshard.types.Searcher` signature.
    """
    if width < 1 or max_splits < 0:
        raise ValueError(f"need width >= 1 and max_splits >= 0, got {width} and {max_splits}")
    if budget_s is not None and budget_s <= 0:
        raise ValueError(f"budget_s must be positive, got {budget_s}")
    started = time.perf_counter()
    scorer = Scorer(estimator)
    cache: dict[tuple[int, int], TableSpec] = {}
    start = initial_state(tables, cluster)
    best_state = start
    best = place_many([specs_of(tables, start, cache)], cluster, scorer)[0]
    best_ms = best.cost_ms if isinstance(best, Placement) else math.inf
    per_child_s = time.perf_counter() - started
    beam, seen = [start], {start}
    skipped = steps = 0
    for step in range(max_splits):
        candidates = []  # (parent rank, -compute of the halved shard, order), child
        for rank, state in enumerate(beam):
            for child, compute_ms in _children(state, tables, scorer, top_k, cache):
                if child not in seen:
                    seen.add(child)
                    candidates.append(((rank, -compute_ms, len(candidates)), child))
        if not candidates:
            break
        children = [child for _, child in candidates]
        if budget_s is not None:
            left_s = budget_s - (time.perf_counter() - started)
            children = affordable(candidates, left_s, per_child_s)
            if len(children) < len(candidates):
                skipped += len(candidates) - len(children)
                logger.info("beam step %d: time budget %.1f s leaves room for %d of %d "
                            "children", step + 1, budget_s, len(children),
                            len(candidates))
            if not children:
                break
        step_started = time.perf_counter()
        results = place_many([specs_of(tables, c, cache) for c in children], cluster, scorer)
        per_child_s = (time.perf_counter() - step_started) / len(children)
        steps += 1
        costs = [r.cost_ms if isinstance(r, Placement) else math.inf for r in results]
        ranked = sorted(range(len(children)), key=costs.__getitem__)
        beam = [children[k] for k in ranked[:width]]
        if costs[ranked[0]] < best_ms:
            best_state, best, best_ms = children[ranked[0]], results[ranked[0]], costs[ranked[0]]
        logger.debug("beam step %d: %d children, step best %.4f ms, overall best %.4f ms",
                     step + 1, len(children), costs[ranked[0]], best_ms)
    if isinstance(best, PlanInfeasibleError):
        raise best
    specs = specs_of(tables, best_state, cache)
    plan = to_plan(tables, cluster, specs, best.devices)
    logger.debug("beam search: %d steps, %d states scored, %d compute evaluations, %d loads",
                 steps, len(seen) - skipped, scorer.compute_calls, scorer.loads_computed)
    meta = {"splits": len(specs) - len(tables), "states_scored": len(seen) - skipped,
            "beam_steps": steps, "scale": best.scale}
    if budget_s is not None:
        meta["budget_cut"] = skipped
    return replace(plan, meta=meta)

"""Beam search over the sharding space, each candidate scored by a greedy grid placement.

A search state is a :data:`~neuroshard.search.space.State`: for each table (in input
order) its :class:`~neuroshard.search.space.Layout` -- column widths (widest first) for a
table- or column-wise table, or row-wise, table-row-wise on a host, data-parallel; its
kernel and cache fraction. The start state (:meth:`Space.initial_state`) places every
table table-wise unless it does not fit a device (then the first layout that fits:
column halves, row blocks, a host's row blocks, then host-memory caching) or the tables
overfill HBM (the largest move to ``fused_uvm_caching``). Each step expands every state
in the beam: the candidates are the union of the ``top_k`` tables whose widest shard is
largest in memory and the ``top_k`` whose widest shard has the highest predicted compute;
a child halves one candidate's widest shard (when the half is a positive multiple of 4),
or moves it to row-wise or to table-row-wise, or (for the ``top_k`` tables that send the
most all-to-all bytes per byte of weights) makes it data-parallel, or raises a cached
table's cache fraction (:meth:`Space.moves`, within the constraints). All new children
are placed by one lockstep :func:`~neuroshard.search.greedy.place_many` call, the
``width`` cheapest form the next beam, and the cheapest plan seen anywhere, the start
included, is returned -- unless some member of the estimator (a neural ensemble's nets one
by one; the estimator alone otherwise) prices it less than ``margin`` (default
:data:`DEFAULT_MARGIN`) below the greedy grid's plan (the start placement; when that does
not pack, the cheapest state of the first step that placed one that packs, as
:func:`grid_search` finds it): a model's error on one plan's costliest device is a few
percent, so a smaller or disputed predicted gain is as likely a loss, and the greedy grid's
plan is kept (:func:`beats_start`).

Shards are interned once per (table, layout) and reused by every state. With
``budget_s`` the beam places only the children the remaining time affords (see
:func:`beam_search`); for 1,000 tables on 128 devices a step of ~50 children costs several
seconds, so a budget bounds the search's time without touching the start placement.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import cast

from neuroshard.search.greedy import Placement, place_many
from neuroshard.search.scoring import Scorer, member_costs
from neuroshard.search.space import COLUMNS, Layout, Space, State, halve
from neuroshard.types import (
    Cluster,
    Constraints,
    CostEstimator,
    Plan,
    PlanInfeasibleError,
    TableSpec,
)

logger = logging.getLogger(__name__)

# Per table, in input order, its layout (kept under its old name for callers).
SplitState = State

DEFAULT_CAP_S = 20.0  # the beam's time when no budget is given (1,000 tables x 128 devices)
CANDIDATES_PER_KEY = 10  # tables taken by size and by predicted compute at each expansion
BULK_SIZES = (2, 8, 32, 128, 512)  # tables a bulk move changes at once
# The share of the greedy grid's price a searched plan must undercut to replace it: the
# shipped models' errors on one plan's costliest device (bench/results/model_range*.md);
# the README's "Results" measure the choice.
DEFAULT_MARGIN = 0.03

__all__ = [
    "CANDIDATES_PER_KEY",
    "DEFAULT_CAP_S",
    "DEFAULT_MARGIN",
    "Layout",
    "SplitState",
    "affordable",
    "beam_candidates",
    "beam_search",
    "beats_start",
    "check_margin",
    "expand",
    "halve",
    "initial_state",
]


def initial_state(
    tables: Sequence[TableSpec], cluster: Cluster, constraints: Constraints | None = None
) -> State:
    """The start state: :meth:`Space.initial_state` (table-wise where a table fits)."""
    no_costs = cast(CostEstimator, _NoEstimator(cluster))
    return Space(tables, cluster, Scorer(no_costs), constraints).initial_state()


class _NoEstimator:
    """Stands in where a space is built only to lay tables out (nothing is priced)."""

    name = "none"

    def __init__(self, cluster: Cluster):
        self.batch_size = cluster.batch_size


def check_margin(margin: float) -> None:
    """``ValueError`` unless ``margin`` is a fraction in [0, 1)."""
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be a fraction in [0, 1), got {margin}")


def beats_start(costs: Sequence[float], start_costs: Sequence[float], margin: float) -> bool:
    """Whether a plan replaces the greedy grid's start placement: only when each estimator
    member's price of it (``costs``, :func:`~neuroshard.search.scoring.member_costs`) is at
    least a share ``margin`` below the same member's price of the start (``start_costs``)."""
    return all(c < s * (1.0 - margin) for c, s in zip(costs, start_costs, strict=True))


def _widest(space: Space, i: int, layout: Layout) -> TableSpec:
    t = space.tables[i]
    return (
        t.with_dim(layout.widths[0]) if layout.kind == COLUMNS and layout.widths[0] != t.dim else t
    )


def expand(
    state: State,
    tables: Sequence[TableSpec],
    scorer: Scorer,
    *,
    top_k: int = CANDIDATES_PER_KEY,
    space: Space | None = None,
    constraints: Constraints | None = None,
    bulk_moves: bool = True,
) -> list[State]:
    """Children of ``state``: one move of a large, costly or chatty table each (see the
    module doc), halvings first, each kind in table order. ``scorer`` needs a cluster
    unless ``space`` is given."""
    if space is None:
        cluster = scorer.cluster
        if cluster is None:
            raise ValueError("expand needs a space or a scorer with a cluster")
        space = Space(tables, cluster, scorer, constraints)
    return [child for child, _ in _children(state, space, top_k, bulk_moves)]


def _children(
    state: State, space: Space, top_k: int, bulk_moves: bool = True
) -> list[tuple[State, float]]:
    """:func:`expand`'s children, each with the predicted compute (ms) of the widest shard
    of the (first) table it moves: single moves, then with ``bulk_moves`` the same move
    for several tables at once; none that takes the devices' shard counts beyond what the
    estimator was trained on (:meth:`Space.within_range`)."""
    moves = {i: space.moves(state, i) for i in range(len(state))}
    movable = [i for i in range(len(state)) if moves[i]]
    if not movable:
        return []
    scorer = space.scorer
    widest = [_widest(space, i, state[i]) for i in movable]
    compute = dict(
        zip(movable, scorer.singles([scorer.item(s) for s in widest]).tolist(), strict=True)
    )
    size = dict(zip(movable, (s.size_bytes for s in widest), strict=True))
    out: list[tuple[State, float]] = []

    def pick(kind: str, ranked_by: Sequence[Mapping[int, float]], k: int) -> None:
        having = [i for i in movable if any(_kind_of(state[i], m) == kind for m in moves[i])]
        chosen: set[int] = set()
        for key in ranked_by:
            chosen |= set(sorted(having, key=lambda i: -key[i])[:k])
        for i in sorted(chosen):
            for m in moves[i]:
                if _kind_of(state[i], m) == kind:
                    out.append((state[:i] + (m,) + state[i + 1 :], compute[i]))

    def bulk(kind: str, key: Mapping[int, float]) -> None:
        """The move applied at once to the first ``k`` tables by ``key`` (descending), for
        ``k`` in :data:`BULK_SIZES`: one table at a time barely moves the busiest device of
        a large task; several together do (table-row-wise hosts spread as they go)."""
        ranked = sorted(
            (i for i in movable if any(_kind_of(state[i], m) == kind for m in moves[i])),
            key=lambda i: -key[i],
        )
        done = 0
        child = list(state)
        for k in BULK_SIZES:
            k = min(k, len(ranked))
            if k <= max(done, 1):
                continue
            for i in ranked[done:k]:
                options = [m for m in space.moves(tuple(child), i) if _kind_of(child[i], m) == kind]
                if options:
                    child[i] = options[0]
            done = k
            out.append((tuple(child), compute[ranked[0]]))

    pick("halve", (size, compute), top_k)
    pick("row_wise", (size, compute), max(1, top_k // 2))
    pick("table_row_wise", (size, compute), max(1, top_k // 2))
    share = {i: space.comm_share(i) for i in movable}
    pick("data_parallel", (share,), top_k)
    pick("cache", (size, compute), top_k)
    if bulk_moves:
        bulk("halve", compute)
        bulk("table_row_wise", size)
        bulk("data_parallel", share)
    return [(child, ms) for child, ms in out if space.within_range(state, child)]


def _kind_of(old: Layout, new: Layout) -> str:
    """Which move turns ``old`` into ``new``."""
    if new.kind == old.kind and new.kind == COLUMNS and new.widths != old.widths:
        return "halve"
    if new.kind != old.kind:
        return new.kind
    return "cache"


def affordable(
    candidates: Sequence[tuple[tuple, SplitState]], left_s: float, per_child_s: float
) -> list[SplitState]:
    """The children that ``left_s`` seconds can place at ``per_child_s`` each: all of them
    in their given order when they fit, else the best by their priority keys (the first
    element of each pair: lower is more promising)."""
    fit = max(0, int(left_s / max(per_child_s, 1e-9))) if left_s > 0 else 0
    if fit >= len(candidates):
        return [child for _, child in candidates]
    return [child for _, child in sorted(candidates, key=lambda c: c[0])[:fit]]


def _place_until(
    children: Sequence[State],
    space: Space,
    cluster: Cluster,
    scorer: Scorer,
    deadline: float | None,
    fixed_s: float,
    per_child_s: float,
) -> list[Placement | PlanInfeasibleError]:
    """The children's placements, in order: in one lockstep call when the projected step
    (``fixed_s`` plus ``per_child_s`` per child) takes at most half the time to
    ``deadline`` (or there is none); else in chunks of a quarter, each chunk's problems
    built only when it is placed, stopping before a chunk the time left cannot afford at
    the rate measured so far (building and placing). Each child's placement is the same
    either way (:func:`~neuroshard.search.greedy.place_many` places problems
    independently)."""
    now = time.perf_counter()
    if deadline is None or fixed_s + per_child_s * len(children) <= 0.5 * (deadline - now):
        return place_many([space.problem(c) for c in children], cluster, scorer)
    chunk = max(1, math.ceil(len(children) / 4))
    results: list[Placement | PlanInfeasibleError] = []
    rate_s = per_child_s
    while len(results) < len(children):
        part = children[len(results) : len(results) + chunk]
        if results and time.perf_counter() + fixed_s + rate_s * len(part) > deadline:
            break
        part_started = time.perf_counter()
        results += place_many([space.problem(c) for c in part], cluster, scorer)
        rate_s = max(rate_s, (time.perf_counter() - part_started) / len(part))
    return results


def beam_search(
    tables: Sequence[TableSpec],
    cluster: Cluster,
    estimator: CostEstimator,
    *,
    seed: int = 0,
    width: int = 3,
    max_splits: int = 10,
    top_k: int = CANDIDATES_PER_KEY,
    budget_s: float | None = None,
    constraints: Constraints | None = None,
    bulk_moves: bool = True,
    cap_s: float | None = DEFAULT_CAP_S,
    until_feasible: bool = False,
    margin: float = DEFAULT_MARGIN,
) -> Plan:
    """NeuroShard's search: beam over the sharding space, greedy grid placement of each.

    ``max_splits`` bounds the beam's steps (each step moves one table of a state: a split, a type or
    a cache fraction; with ``bulk_moves`` also several tables at once: the costliest halved, the
    largest to table-row-wise, the chattiest small ones to data-parallel; without, the column search
    is the paper's). ``constraints`` restrict each table's types, kernels and devices
    (:class:`~neuroshard.types.Constraints`); :class:`~neuroshard.types.ConstraintError` when they
    cannot hold. ``budget_s`` (default None: no limit) bounds the search's own time. The start
    placement is always computed (a warning says when it alone overruns the budget); before
    each beam step the step's time is projected (a fixed part, bounded by the start
    placement's time, plus the highest seconds per child seen), and
    when it would overrun the budget only the most promising children are placed (those of
    better-ranked beam states first, then those moving the costlier shard), or the search stops
    when not even one fits; a step near the limit is placed in chunks and stops between them
    (:func:`_place_until`). The plan's ``meta["budget_cut"]`` counts the children so skipped.
    The result is then still the best plan seen, never worse than the start placement, but may
    be worse than the unbudgeted search's. Without a budget, ``cap_s`` (default
    :data:`DEFAULT_CAP_S`; None: none) bounds the beam the same way, so that a large task returns
    in bounded time; a search the cap cuts says so in a warning and in ``meta["time_cap_cut"]``.
    ``until_feasible`` stops after the first step that places a state that packs. The cheapest
    plan seen is returned when it is priced at least ``margin`` below the greedy grid's plan by
    every member of ``estimator`` (:func:`beats_start`), the greedy grid's plan otherwise
    (``meta["kept_start"]`` says so; ``meta["start_ms"]`` and ``meta["start_member_ms"]`` give
    its prices either way). The greedy grid's plan is the start placement, or when that does
    not pack (``meta["start_packed"]`` False), the cheapest state of the first step that
    placed one that packs: :func:`grid_search`'s plan whenever the budget let that step be
    placed whole.

    Deterministic without a budget; ``seed`` is accepted for the
    :class:`~neuroshard.types.Searcher` signature.
    """
    return beam_candidates(
        tables,
        cluster,
        estimator,
        keep=1,
        seed=seed,
        width=width,
        max_splits=max_splits,
        top_k=top_k,
        budget_s=budget_s,
        constraints=constraints,
        bulk_moves=bulk_moves,
        cap_s=cap_s,
        until_feasible=until_feasible,
        margin=margin,
    )[0]


def beam_candidates(
    tables: Sequence[TableSpec],
    cluster: Cluster,
    estimator: CostEstimator,
    *,
    keep: int,
    seed: int = 0,
    width: int = 3,
    max_splits: int = 10,
    top_k: int = CANDIDATES_PER_KEY,
    budget_s: float | None = None,
    constraints: Constraints | None = None,
    bulk_moves: bool = True,
    cap_s: float | None = DEFAULT_CAP_S,
    until_feasible: bool = False,
    margin: float = DEFAULT_MARGIN,
) -> list[Plan]:
    """:func:`beam_search`'s ``keep`` cheapest distinct plans under ``estimator``, cheapest
    first (fewer when the search placed fewer states); the first is :func:`beam_search`'s
    plan, and with ``keep > 1`` the start placement (the greedy grid's plan) is always one
    of them, last if it would not have made the cut. For verification: a planner measures
    them on a backend and keeps the one measured cheapest. ``margin`` applies to ``keep=1``
    only (:func:`beam_search`); a verifier's measurements choose among several."""
    if width < 1 or max_splits < 0 or keep < 1:
        raise ValueError(
            f"need width >= 1, max_splits >= 0 and keep >= 1, got {width}, {max_splits}, {keep}"
        )
    check_margin(margin)
    for what, seconds in (("budget_s", budget_s), ("cap_s", cap_s)):
        if seconds is not None and seconds <= 0:
            raise ValueError(f"{what} must be positive, got {seconds}")
    limit_s = budget_s if budget_s is not None else cap_s
    started = time.perf_counter()
    scorer = Scorer(estimator, cluster=cluster)
    space = Space(tables, cluster, scorer, constraints)
    start = space.initial_state()
    first = place_many([space.problem(start)], cluster, scorer)[0]
    # The greedy grid's plan (the margin's reference, and always a candidate with keep > 1):
    # the start placement, or when that does not pack, the cheapest state of the first step
    # that placed one that packs -- what grid_search returns when that step was placed whole.
    start_entry: tuple[float, int, State, Placement] | None = None
    start_members: tuple[float, ...] = ()

    def set_reference(state: State, result: Placement, order: int) -> None:
        # Its price by each estimator member (for the margin) is taken now: the check of the
        # best plan at the end costs about as long again, which the limit keeps free.
        nonlocal start_entry, start_members, limit_s
        check_started = time.perf_counter()
        start_entry = (-result.cost_ms, order, state, result)
        start_members = member_costs(space.to_plan(state, result), estimator)
        if limit_s is not None and keep == 1:
            limit_s = max(limit_s - (time.perf_counter() - check_started), 1e-9)

    if isinstance(first, Placement):
        set_reference(start, first, 0)
    # The ``keep`` cheapest placed states: a max-heap on (-cost, -order), order breaking ties.
    kept: list[tuple[float, int, State, Placement]] = []
    placed = 0

    def consider(state: State, result: Placement | PlanInfeasibleError) -> float:
        nonlocal placed
        cost = result.cost_ms if isinstance(result, Placement) else math.inf
        if isinstance(result, Placement):
            entry = (-cost, -placed, state, result)
            if len(kept) < keep:
                heapq.heappush(kept, entry)
            elif entry[:2] > kept[0][:2]:
                heapq.heapreplace(kept, entry)
        placed += 1
        return cost

    consider(start, first)
    # A step costs a fixed part (expanding, one lockstep call) plus a part per child; the
    # start placement, a step of one child, bounds the fixed part.
    fixed_s = per_child_s = time.perf_counter() - started
    if budget_s is not None and fixed_s > budget_s:
        logger.warning(
            "the start placement alone took %.2f s, more than the search's time budget of "
            "%.2f s (it is always computed): no search step fits, and the plan returns at "
            "least %.2f s late",
            fixed_s,
            budget_s,
            fixed_s - budget_s,
        )
    beam, seen = [start], {start}
    skipped = steps = 0
    expand_s = 0.0  # the longest expansion of one beam state seen (1,000 tables: ~0.5 s)
    unexpanded = 0  # beam states the limit left unexpanded
    for step in range(max_splits):
        # (parent rank, -compute of the moved shard, order), child
        candidates: list[tuple[tuple[int, float, int], State]] = []
        for rank, state in enumerate(beam):
            elapsed_s = time.perf_counter() - started
            if (
                limit_s is not None
                and expand_s
                and elapsed_s + expand_s + fixed_s + per_child_s > limit_s
            ):
                unexpanded += len(beam) - rank  # no time to expand it and place a child
                break
            for child, compute_ms in _children(state, space, top_k, bulk_moves):
                if child not in seen:
                    seen.add(child)
                    candidates.append(((rank, -compute_ms, len(candidates)), child))
            expand_s = max(expand_s, time.perf_counter() - started - elapsed_s)
        if not candidates:
            break
        children = [child for _, child in candidates]
        if limit_s is not None:
            left_s = limit_s - (time.perf_counter() - started)
            children = affordable(candidates, left_s - fixed_s, per_child_s)
            if len(children) < len(candidates):
                skipped += len(candidates) - len(children)
                logger.info(
                    "beam step %d: time %s %.1f s leaves room for %d of %d children",
                    step + 1,
                    "budget" if budget_s is not None else "cap",
                    budget_s if budget_s is not None else cap_s,
                    len(children),
                    len(candidates),
                )
            if not children:
                break
        step_started = time.perf_counter()
        deadline = None if limit_s is None else started + limit_s
        results = _place_until(children, space, cluster, scorer, deadline, fixed_s, per_child_s)
        if len(results) < len(children):
            skipped += len(children) - len(results)
            logger.info(
                "beam step %d: the time limit stopped the step after %d of %d children",
                step + 1,
                len(results),
                len(children),
            )
            children = children[: len(results)]
        if not children:
            break
        step_s = time.perf_counter() - step_started
        per_child_s = max(per_child_s, max(step_s - fixed_s, step_s / 2) / len(children))
        steps += 1
        base = placed
        costs = [consider(child, r) for child, r in zip(children, results)]
        # until_feasible returns this step's cheapest packing state: the reference itself
        if start_entry is None and not until_feasible:
            packed = [k for k, c in enumerate(costs) if math.isfinite(c)]
            if packed:
                k = min(packed, key=lambda k: (costs[k], k))
                result = results[k]
                assert isinstance(result, Placement)
                set_reference(children[k], result, -(base + k))
        if until_feasible and kept:
            break
        ranked = sorted(range(len(children)), key=costs.__getitem__)
        beam = [children[k] for k in ranked[:width]]
        logger.debug(
            "beam step %d: %d children, step best %.4f ms, overall best %.4f ms",
            step + 1,
            len(children),
            costs[ranked[0]],
            -max(kept)[0] if kept else math.inf,
        )
    if not kept:
        assert isinstance(first, PlanInfeasibleError)
        raise first
    if (skipped or unexpanded) and budget_s is None:
        logger.warning(
            "the search stopped at its %.0f s time cap with %d candidate states unplaced and "
            "%d beam states unexpanded; give it a time budget to search longer",
            cap_s,
            skipped,
            unexpanded,
        )
    ordered = sorted(kept, reverse=True)  # cheapest first, earlier placed first on ties
    kept_start = False
    if keep == 1 and start_entry is not None and ordered[0][2] != start_entry[2]:
        best_members = member_costs(space.to_plan(ordered[0][2], ordered[0][3]), estimator)
        kept_start = not beats_start(best_members, start_members, margin)
        if kept_start:
            logger.info(
                "keeping the greedy grid's plan (%s ms): the search's best (%s ms) is not "
                "%.1f%% cheaper by every member",
                ", ".join(f"{x:.4f}" for x in start_members),
                ", ".join(f"{x:.4f}" for x in best_members),
                100 * margin,
            )
            ordered = [start_entry]
    if keep > 1 and start_entry is not None and all(e[2] != start_entry[2] for e in ordered):
        # The start (the greedy grid's plan) is always a candidate: a verifier then never
        # keeps a plan it prices above the greedy grid's.
        ordered = ordered[: keep - 1] + [start_entry]
    logger.debug(
        "beam search: %d steps, %d states scored, %d compute evaluations, %d loads",
        steps,
        len(seen) - skipped,
        scorer.compute_calls,
        scorer.loads_computed,
    )
    plans = []
    for _, _, state, result in ordered:
        types = Counter(layout.sharding_type() for layout in state)
        meta: dict[str, object] = {
            "splits": sum(len(x.widths) - 1 for x in state if x.kind == COLUMNS),
            "states_scored": len(seen) - skipped,
            "beam_steps": steps,
            "scale": result.scale,
            "sharding_types": dict(sorted(types.items())),
        }
        if start_entry is not None:
            meta["start_ms"] = start_entry[3].cost_ms
            meta["kept_start"] = kept_start
            if start_entry[2] != start:
                meta["start_packed"] = False
        if start_members:
            meta["start_member_ms"] = list(start_members)
        kernels = Counter(layout.kernel for layout in state)
        if set(kernels) != {"fused"}:
            meta["compute_kernels"] = dict(sorted(kernels.items()))
        if budget_s is not None:
            meta["budget_cut"] = skipped
        elif skipped or unexpanded:
            meta["time_cap_cut"] = skipped
        if unexpanded:
            meta["unexpanded_states"] = unexpanded
        plans.append(replace(space.to_plan(state, result), meta=meta))
    return plans


def grid_search(
    tables: Sequence[TableSpec],
    cluster: Cluster,
    estimator: CostEstimator,
    *,
    seed: int = 0,
    budget_s: float | None = None,
    constraints: Constraints | None = None,
) -> Plan:
    """The greedy grid alone, on the start state: every table table-wise where it fits a
    device (else the first layout that fits, see :meth:`Space.initial_state`), no beam.
    When the start state does not pack (each shard fits a device alone, not all of them
    together), the first state the beam places that packs, so that the greedy grid is
    infeasible only when the search is (``meta["start_packed"]`` False says so).

    Deterministic and fast; ``seed`` and ``budget_s`` are accepted for the
    :class:`~neuroshard.types.Searcher` signature.
    """
    try:
        plan = beam_search(
            tables, cluster, estimator, seed=seed, max_splits=0, constraints=constraints, cap_s=None
        )
    except PlanInfeasibleError as exc:
        logger.info("the greedy grid's start state does not pack (%s); searching on", exc)
        plan = beam_search(
            tables, cluster, estimator, seed=seed, constraints=constraints, until_feasible=True
        )
        return replace(
            plan,
            meta={
                "scale": plan.meta["scale"],
                "sharding_types": plan.meta["sharding_types"],
                "start_packed": False,
            },
        )
    return replace(
        plan, meta={"scale": plan.meta["scale"], "sharding_types": plan.meta["sharding_types"]}
    )

"""A slow reference search for small tasks: how far from the best plan is a searcher?

:func:`oracle_plan` searches with the estimator it is given as the cost -- in the benches
the simulated backend itself, not a learned model -- and spends far more evaluations
than a planner could afford. It has two parts:

1. **Exhaustive table-wise placement** when the task is small enough (at most
   ``exhaustive_limit`` placements to enumerate, e.g. 12 tables on 4 devices). Every table
   goes whole to one device. Device loads are subsets of the tables, so the estimator
   prices each of the ``2**n`` subsets that fit a device once, and every placement is then
   a lookup of its devices' subsets plus one batched comm call per chunk of placements.
   Placements that overflow a device's memory are pruned while enumerating. When every
   device has the same memory cap and the estimator's comm is permutation-equivariant
   over devices (checked on random inputs), devices are interchangeable and only one
   placement per relabelling is enumerated (table ``i`` goes to a device at most one
   above the highest used by tables ``0..i-1``): 700,075 placements instead of
   4**12 = 16.8M for 12 tables on 4 devices. The result is the exact table-wise optimum
   under the estimator. No compute lower bound prunes the search: an estimator's compute
   need not grow when a table is added, so such a bound would not be safe.
2. **Iterated local search with column splits**, from the table-wise optimum (or, when
   the task is too big to enumerate, the greedy grid), NeuroShard's beam search run on
   the same estimator, and any ``starts`` the caller passes (e.g. each searcher's plan,
   so the reference is never worse than the plans it judges). A step evaluates every
   neighbour of the current plan in one batch and takes the best: move one shard to
   another device, swap two shards on different devices, halve a shard (width a multiple
   of 4) and send one half elsewhere, or merge two shards of one table. Device loads are
   cached by :class:`~neuroshard.search.scoring.Scorer`, so a neighbour costs the
   estimator only the one or two device loads the move changed (plus its comm). At a local
   optimum the best plan so far is kicked by a few random moves and swaps (seeded), until
   ``max_evals`` plans have been scored.

So the oracle is exact among table-wise plans of small tasks and a strong heuristic
beyond; it is not a proof of optimality for column-wise plans. It is not in the searcher
registry: the conformance test runs every registered searcher on 30-table tasks, where
it would neither be exact nor fast. Use it from Python or ``bench/oracle_gap.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from neuroshard.feasibility import infeasibility
from neuroshard.search.beam import beam_search
from neuroshard.search.greedy import greedy_grid, to_plan
from neuroshard.search.scoring import LoadKey, Scorer
from neuroshard.types import (
    DIM_MULTIPLE,
    Cluster,
    Constraints,
    CostEstimator,
    Plan,
    PlanInfeasibleError,
    TableConstraint,
    TableSpec,
    embedding_bytes,
    io_buffer_bytes,
)

logger = logging.getLogger(__name__)

EXHAUSTIVE_LIMIT = 2_000_000  # placements enumerated at most (before memory pruning)
MAX_EVALS = 100_000  # plans scored by the local search
KICK_MOVES = 3  # random moves and swaps applied to escape a local optimum
_CHUNK = 200_000  # placements per batched comm call
_IMPROVES = 1e-12  # relative improvement that counts
_STALE_KICKS = 50  # kicks in a row that score nothing new end the search early

# A plan under local search: sorted (table index, shard width, device) triples.
ShardState = tuple[tuple[int, int, int], ...]


# --------------------------------------------------------------------------- counting


def _stirling2(n: int, k: int) -> int:
    """Ways to split ``n`` labelled items into ``k`` non-empty unlabelled groups."""
    row = [1] + [0] * k
    for i in range(1, n + 1):
        for j in range(min(i, k), 0, -1):
            row[j] = j * row[j] + row[j - 1]
        row[0] = 0
    return row[k]


def placement_count(num_tables: int, num_devices: int, symmetric: bool) -> int:
    """Table-wise placements to enumerate (before memory pruning)."""
    if symmetric:
        return sum(_stirling2(num_tables, k) for k in range(min(num_tables, num_devices) + 1))
    return num_devices**num_tables


def devices_interchangeable(
    cluster: Cluster, estimator: CostEstimator, *, seed: int = 0, trials: int = 8
) -> bool:
    """Whether relabelling devices cannot change a plan's cost: equal memory caps, and
    comm that permutes with the devices (probed on random dim sums and waits)."""
    caps = cluster.memory_per_device_bytes
    n = cluster.num_devices
    if len(set(caps)) > 1:
        return False
    if n == 1:
        return True
    rng = np.random.default_rng(seed)
    dims = rng.integers(0, 1024, size=(trials, n)).astype(float)
    waits = rng.uniform(0.0, 5.0, size=(trials, n))
    perm = rng.permutation(n)
    if np.array_equal(perm, np.arange(n)):
        perm = np.roll(perm, 1)
    for fn, args in ((estimator.bwd_comm_ms, (dims,)), (estimator.fwd_comm_ms, (dims, waits))):
        base = np.asarray(fn(*args), dtype=float)
        moved = np.asarray(fn(*(a[:, perm] for a in args)), dtype=float)
        if not np.allclose(moved, base[:, perm], rtol=1e-9, atol=1e-12):
            return False
    return True


# --------------------------------------------------------------------------- exhaustive


def _subset_sums(values: Sequence[int]) -> np.ndarray:
    """``out[mask]`` = sum of ``values[i]`` over the bits ``i`` of ``mask``."""
    out = np.zeros(1, dtype=np.int64)
    for v in values:
        out = np.concatenate((out, out + int(v)))
    return out


def _enumerate(sizes: Sequence[int], caps: Sequence[int], symmetric: bool) -> np.ndarray:
    """Every table-wise placement that fits memory, ``(count, num_tables)`` device ids."""
    num_devices = len(caps)
    rows = np.zeros((1, 0), dtype=np.int8)
    used = np.zeros((1, num_devices), dtype=np.int64)
    top = np.full(1, -1, dtype=np.int64)  # highest device used so far (symmetry breaking)
    cap = np.asarray(caps, dtype=np.int64)
    for size in sizes:
        parts = []
        for d in range(num_devices):
            ok = used[:, d] + size <= cap[d]
            if symmetric:
                ok &= d <= top + 1
            sel = np.flatnonzero(ok)
            if sel.size:
                grown_used = used[sel]
                grown_used[:, d] += size
                parts.append(
                    (
                        np.hstack((rows[sel], np.full((sel.size, 1), d, np.int8))),
                        grown_used,
                        np.maximum(top[sel], d),
                    )
                )
        if not parts:
            return np.zeros((0, len(sizes)), dtype=np.int8)
        rows = np.concatenate([p[0] for p in parts])
        used = np.concatenate([p[1] for p in parts])
        top = np.concatenate([p[2] for p in parts])
    return rows


def exhaustive_tablewise(
    tables: Sequence[TableSpec],
    cluster: Cluster,
    estimator: CostEstimator,
    *,
    symmetric: bool | None = None,
    limit: int = EXHAUSTIVE_LIMIT,
) -> tuple[tuple[int, ...], float, int]:
    """The cheapest table-wise placement: ``(device of each table, cost_ms, placements
    scored)``. Raises :class:`PlanInfeasibleError` when no table-wise placement fits and
    ``ValueError`` when there are more than ``limit`` placements to enumerate."""
    n, num_devices = len(tables), cluster.num_devices
    if symmetric is None:
        symmetric = devices_interchangeable(cluster, estimator)
    count = placement_count(n, num_devices, symmetric)
    if count > limit:
        raise ValueError(
            f"{count} table-wise placements of {n} tables on {num_devices} "
            f"devices exceed the limit of {limit}"
        )
    caps = cluster.memory_per_device_bytes
    error = infeasibility(tables, cluster)
    if error is not None:
        raise error
    sizes = [
        embedding_bytes(t.rows, t.dim, cluster.optimizer)
        + io_buffer_bytes(t, "table_wise", t.dim, cluster)
        for t in tables
    ]
    memory = _subset_sums(sizes)
    dims = _subset_sums([t.dim for t in tables])
    placements = _enumerate(sizes, caps, symmetric)
    if not len(placements):
        raise PlanInfeasibleError(
            f"no table-wise placement of {n} tables fits {num_devices} devices of {max(caps)} bytes"
        )
    # Compute of every subset that fits some device, one estimator call.
    compute = np.zeros(len(memory))
    fits = np.flatnonzero((memory <= max(caps)) & (np.arange(len(memory)) > 0))
    loads = [[tables[i] for i in range(n) if m >> i & 1] for m in fits.tolist()]
    compute[fits] = np.asarray(estimator.compute_ms(loads), dtype=float)

    bits = np.int64(1) << np.arange(n, dtype=np.int64)
    best_ms, best_row = math.inf, -1
    for lo in range(0, len(placements), _CHUNK):
        chunk = placements[lo : lo + _CHUNK]
        masks = np.stack([((chunk == d) * bits).sum(axis=1) for d in range(num_devices)], axis=1)
        device_compute = compute[masks]
        device_dims = dims[masks].astype(float)
        bwd = np.asarray(estimator.bwd_comm_ms(device_dims), dtype=float)
        ready = device_compute + bwd
        fwd = np.asarray(
            estimator.fwd_comm_ms(device_dims, ready - ready.min(axis=1, keepdims=True)),
            dtype=float,
        )
        cost = (device_compute + fwd + bwd).max(axis=1)
        k = int(cost.argmin())
        if cost[k] < best_ms:
            best_ms, best_row = float(cost[k]), lo + k
    logger.debug(
        "exhaustive table-wise: %d placements (%s), %d subsets priced, best %.4f ms",
        len(placements),
        "symmetric" if symmetric else "all labellings",
        len(fits),
        best_ms,
    )
    return tuple(int(d) for d in placements[best_row]), best_ms, len(placements)


# --------------------------------------------------------------------------- local search


class _LocalSearch:
    """Neighbourhoods and batched scoring of :data:`ShardState` plans."""

    def __init__(
        self,
        tables: Sequence[TableSpec],
        cluster: Cluster,
        scorer: Scorer,
        rng: np.random.Generator,
    ):
        self.tables, self.cluster, self.scorer, self.rng = tables, cluster, scorer, rng
        self.num_devices = cluster.num_devices
        self.caps = cluster.memory_per_device_bytes
        self._items: dict[tuple[int, int], int] = {}
        self.cost: dict[ShardState, float] = {}  # every plan scored so far
        self.evals = 0

    def item(self, table: int, width: int) -> int:
        found = self._items.get((table, width))
        if found is None:
            found = self._items[(table, width)] = self.scorer.item(
                self.tables[table].with_dim(width)
            )
        return found

    def memory(self, state: ShardState) -> list[int]:
        used = [0] * self.num_devices
        for t, w, d in state:
            used[d] += self.tables[t].column_bytes(w)
        return used

    def keys(self, state: ShardState) -> list[LoadKey]:
        per_device: list[list[int]] = [[] for _ in range(self.num_devices)]
        for t, w, d in state:
            per_device[d].append(self.item(t, w))
        return [tuple(sorted(items)) for items in per_device]

    def score(self, states: Sequence[ShardState]) -> list[float]:
        """Plan cost of each state; one batch for the ones not scored before."""
        new = list(dict.fromkeys(s for s in states if s not in self.cost))
        if new:
            values = self.scorer.score([self.keys(s) for s in new]).tolist()
            self.cost.update(zip(new, values, strict=True))
            self.evals += len(new)
        return [self.cost[s] for s in states]

    def neighbours(self, state: ShardState) -> list[ShardState]:
        """Every plan one move, swap, split or merge away that fits memory."""
        used = self.memory(state)
        caps, num_devices, tables = self.caps, self.num_devices, self.tables
        shards = list(state)
        out: set[ShardState] = set()

        def emit(new: list[tuple[int, int, int]]) -> None:
            out.add(tuple(sorted(new)))

        for k, (t, w, d) in enumerate(shards):
            size = tables[t].column_bytes(w)
            rest = shards[:k] + shards[k + 1 :]
            for e in range(num_devices):
                if e != d and used[e] + size <= caps[e]:
                    emit(rest + [(t, w, e)])  # move
            half = w // 2
            if w % 2 == 0 and half % DIM_MULTIPLE == 0 and half >= DIM_MULTIPLE:
                half_size = tables[t].column_bytes(half)
                for e in range(num_devices):
                    if e != d and used[e] + half_size <= caps[e]:
                        emit(rest + [(t, half, d), (t, half, e)])  # split
            for j in range(k + 1, len(shards)):
                u, v, f = shards[j]
                if u == t:  # merge two shards of one table onto either's device
                    others = [s for i, s in enumerate(shards) if i not in (k, j)]
                    for g, other_size in ((d, tables[u].column_bytes(v)), (f, size)):
                        if g == d and f == d or used[g] + other_size <= caps[g]:
                            emit(others + [(t, w + v, g)])
                if f != d and (u, v) != (t, w):  # swap
                    other_size = tables[u].column_bytes(v)
                    if (
                        used[d] - size + other_size <= caps[d]
                        and used[f] - other_size + size <= caps[f]
                    ):
                        emit(
                            [s for i, s in enumerate(shards) if i not in (k, j)]
                            + [(t, w, f), (u, v, d)]
                        )
        out.discard(state)
        return list(out)

    def descend(self, state: ShardState, max_evals: int) -> ShardState:
        """Steepest descent from ``state`` until a local optimum or the evaluation budget."""
        current_ms = self.score([state])[0]
        while self.evals < max_evals:
            candidates = self.neighbours(state)
            if not candidates:
                break
            costs = self.score(candidates)
            k = min(range(len(costs)), key=costs.__getitem__)
            if not costs[k] < current_ms * (1 - _IMPROVES):
                break
            state, current_ms = candidates[k], costs[k]
        return state

    def kick(self, state: ShardState, moves: int) -> ShardState:
        """``state`` after up to ``moves`` random memory-feasible moves or swaps."""
        shards = list(state)
        for _ in range(moves):
            used = self.memory(tuple(shards))
            k = int(self.rng.integers(len(shards)))
            t, w, d = shards[k]
            size = self.tables[t].column_bytes(w)
            if len(shards) > 1 and self.rng.random() < 0.5:
                j = int(self.rng.integers(len(shards)))
                u, v, f = shards[j]
                other = self.tables[u].column_bytes(v)
                if (
                    f != d
                    and used[d] - size + other <= self.caps[d]
                    and used[f] - other + size <= self.caps[f]
                ):
                    shards[k], shards[j] = (t, w, f), (u, v, d)
                continue
            e = int(self.rng.integers(self.num_devices))
            if e != d and used[e] + size <= self.caps[e]:
                shards[k] = (t, w, e)
        return tuple(sorted(shards))


# The oracle's space: whole-row column shards on the fused kernel.
_COLUMN_ONLY = Constraints(
    default=TableConstraint(
        sharding_types=("table_wise", "column_wise"), compute_kernels=("fused",)
    )
)


def _state_of(plan: Plan, index: dict[str, int]) -> ShardState | None:
    """The plan as a state of this search, or None when it uses more than whole-row column
    shards on the fused kernel (row blocks, replicas, caching: outside the oracle's space)."""
    if any(s.rows is not None or s.compute_kernel != "fused" for s in plan.shards) or any(
        plan.sharding_type_of(t.name) not in ("table_wise", "column_wise") for t in plan.tables
    ):
        logger.info("oracle: a start plan outside table- and column-wise placements is skipped")
        return None
    return tuple(sorted((index[s.table], s.width, s.device) for s in plan.shards))


def _plan_of(tables: Sequence[TableSpec], cluster: Cluster, state: ShardState) -> Plan:
    specs = [tables[t].with_dim(w) for t, w, _ in state]
    return to_plan(tables, cluster, specs, [d for _, _, d in state])


# --------------------------------------------------------------------------- the oracle


def oracle_plan(
    tables: Sequence[TableSpec],
    cluster: Cluster,
    estimator: CostEstimator,
    *,
    seed: int = 0,
    budget_s: float | None = None,
    max_evals: int = MAX_EVALS,
    exhaustive_limit: int = EXHAUSTIVE_LIMIT,
    starts: Sequence[Plan] = (),
    kick_moves: int = KICK_MOVES,
) -> Plan:
    """The best plan found by exhaustive table-wise placement (when at most
    ``exhaustive_limit`` placements) and iterated local search with column splits (up to
    ``max_evals`` plans scored), costed by ``estimator``. ``starts`` are extra plans of the
    same tables and cluster to search from. Seeded by ``seed``; see the module doc.
    ``budget_s`` is accepted for the :class:`~neuroshard.types.Searcher` signature:
    ``max_evals`` bounds the work.

    ``meta`` records ``exhaustive`` (whether the table-wise optimum is exact),
    ``tablewise_ms`` (its cost, or None), ``evals`` and ``starts``.
    """
    if max_evals < 0:
        raise ValueError(f"max_evals must be >= 0, got {max_evals}")
    tables = list(tables)
    index = {t.name: i for i, t in enumerate(tables)}
    rng = np.random.default_rng(seed)
    scorer = Scorer(estimator, cluster=cluster)  # prices as plan_cost does
    search = _LocalSearch(tables, cluster, scorer, rng)
    seeds: list[ShardState | None] = []

    tablewise_ms: float | None = None
    exhaustive = False
    enumerated = 0
    symmetric = devices_interchangeable(cluster, estimator, seed=seed)
    if (
        placement_count(len(tables), cluster.num_devices, symmetric) <= exhaustive_limit
        and infeasibility(tables, cluster) is None
    ):
        try:
            devices, tablewise_ms, enumerated = exhaustive_tablewise(
                tables, cluster, estimator, symmetric=symmetric, limit=exhaustive_limit
            )
            exhaustive = True
            seeds.append(
                tuple(
                    sorted(
                        (i, t.dim, d) for i, (t, d) in enumerate(zip(tables, devices, strict=True))
                    )
                )
            )
        except PlanInfeasibleError:
            pass  # no table-wise plan fits: splits are needed, the beam finds them
    if not exhaustive:
        try:
            seeds.append(_state_of(greedy_grid(tables, cluster, estimator), index))
        except PlanInfeasibleError:
            pass
    seeds.append(
        _state_of(beam_search(tables, cluster, estimator, constraints=_COLUMN_ONLY), index)
    )
    for plan in starts:
        if {t.name for t in plan.tables} != set(index) or plan.cluster != cluster:
            raise ValueError("start plans must be of the same tables and cluster")
        seeds.append(_state_of(plan, index))
    states = [seed for seed in dict.fromkeys(seeds) if seed is not None]

    search.score(states)
    best = min(states, key=search.cost.__getitem__)
    for state in states:
        state = search.descend(state, max_evals)
        if search.cost[state] < search.cost[best]:
            best = state
    kicks = stale = 0
    while search.evals < max_evals and stale < _STALE_KICKS:
        kicks += 1
        before = search.evals
        state = search.descend(search.kick(best, kick_moves), max_evals)
        stale = stale + 1 if search.evals == before else 0  # nothing new left nearby
        if search.cost[state] < search.cost[best] * (1 - _IMPROVES):
            best = state
            logger.debug("oracle kick %d: %.4f ms", kicks, search.cost[best])
    plan = _plan_of(tables, cluster, best)
    logger.info(
        "oracle: %d tables, %s table-wise optimum %s, %d local-search evals, "
        "%d kicks, best %.4f ms",
        len(tables),
        "exact" if exhaustive else "no",
        f"{tablewise_ms:.4f} ms" if tablewise_ms is not None else "-",
        search.evals,
        kicks,
        search.cost[best],
    )
    return replace(
        plan,
        meta={
            "exhaustive": exhaustive,
            "tablewise_ms": tablewise_ms,
            "placements_enumerated": enumerated,
            "evals": search.evals,
            "starts": len(states),
            "kicks": kicks,
        },
    )

"""Baseline searchers, table-wise: a seeded random placement and one key-driven greedy.

Memory is each table's weights, the cluster's optimizer state and (when the cluster counts
them) its I/O buffers against the devices' HBM budgets (after the reserve); the baselines
use no other sharding type or kernel.

The greedy sorts tables by a key, largest first, and puts each on the device with the
smallest running sum of that key among the devices with memory left for it. The keys are
those of the paper's baselines (:data:`KEYS`): ``dim``, ``size`` (rows x dim), ``lookup``
(dim x pooling factor) and ``size-lookup`` (dim x pooling factor x log10(rows)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from neuroshard.search.greedy import no_room, to_plan
from neuroshard.types import (
    Cluster,
    CostEstimator,
    Plan,
    PlanInfeasibleError,
    Searcher,
    TableSpec,
    UnknownNameError,
    embedding_bytes,
    io_buffer_bytes,
)

TableKey = Callable[[TableSpec], float]

KEYS: dict[str, TableKey] = {
    "dim": lambda t: float(t.dim),
    "size": lambda t: float(t.rows * t.dim),
    "lookup": lambda t: t.dim * t.pooling_factor,
    "size-lookup": lambda t: t.dim * t.pooling_factor * math.log10(t.rows),
}

RANDOM_ATTEMPTS = 100  # random placements tried before giving up on memory


def _footprint(t: TableSpec, cluster: Cluster) -> int:
    """A table-wise table's HBM footprint, as :meth:`Plan.memory_bytes` counts it."""
    return embedding_bytes(t.rows, t.dim, cluster.optimizer) + io_buffer_bytes(
        t, "table_wise", t.dim, cluster
    )


def _key_fn(key: str | TableKey) -> TableKey:
    if callable(key):
        return key
    if key not in KEYS:
        raise UnknownNameError(f"unknown greedy key {key!r}; valid: {', '.join(KEYS)}")
    return KEYS[key]


def greedy_baseline(
    tables: Sequence[TableSpec],
    cluster: Cluster,
    estimator: CostEstimator,
    *,
    key: str | TableKey,
    seed: int = 0,
    budget_s: float | None = None,
) -> Plan:
    """Greedy by ``key`` (a name in :data:`KEYS` or a function of a table).

    The estimator is unused; so are ``seed`` (the greedy is deterministic) and
    ``budget_s`` (it takes milliseconds).
    """
    key_fn = _key_fn(key)
    values = [key_fn(t) for t in tables]
    order = sorted(range(len(tables)), key=lambda i: -values[i])
    free = list(cluster.hbm_budget_bytes)
    load = [0.0] * cluster.num_devices
    devices = [-1] * len(tables)
    for i in order:
        need = _footprint(tables[i], cluster)
        fits = [d for d in range(cluster.num_devices) if free[d] >= need]
        if not fits:
            raise no_room(tables[i], free, need)
        d = min(fits, key=load.__getitem__)
        devices[i] = d
        free[d] -= need
        load[d] += values[i]
    return to_plan(tables, cluster, tables, devices)


def greedy_by(key: str | TableKey) -> Searcher:
    """The greedy baseline for ``key`` as a :class:`~neuroshard.types.Searcher`."""
    key_fn = _key_fn(key)

    def search(
        tables: Sequence[TableSpec],
        cluster: Cluster,
        estimator: CostEstimator,
        *,
        seed: int = 0,
        budget_s: float | None = None,
    ) -> Plan:
        return greedy_baseline(tables, cluster, estimator, key=key, seed=seed)

    search.__name__ = f"greedy_by_{key if isinstance(key, str) else key_fn.__name__}"
    return search


def random_plan(
    tables: Sequence[TableSpec],
    cluster: Cluster,
    estimator: CostEstimator,
    *,
    seed: int = 0,
    budget_s: float | None = None,
) -> Plan:
    """Each table on a device drawn uniformly among those with room for it, seeded.

    A draw that paints itself into a corner is retried (same random stream) up to
    :data:`RANDOM_ATTEMPTS` times before :class:`PlanInfeasibleError`.
    """
    error: PlanInfeasibleError | None = None
    rng = np.random.default_rng(seed)
    for _ in range(RANDOM_ATTEMPTS):
        free = list(cluster.hbm_budget_bytes)
        devices = []
        for t in tables:
            need = _footprint(t, cluster)
            fits = [d for d in range(cluster.num_devices) if free[d] >= need]
            if not fits:
                error = no_room(t, free, need)
                break
            d = fits[int(rng.integers(len(fits)))]
            free[d] -= need
            devices.append(d)
        else:
            return to_plan(tables, cluster, tables, devices)
    raise PlanInfeasibleError(f"{error} (after {RANDOM_ATTEMPTS} random attempts)")

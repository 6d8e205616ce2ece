"""Baseline searchers, table-wise: a seeded random placement and one key-driven greedy.

The greedy sorts tables by a key, largest first, and puts each on the device with the
smallest running sum of that key among the devices with memory left for it. The keys are
those of the paper's baselines (:data:`KEYS`): ``dim``, ``size`` (rows x dim), ``lookup``
(dim x pooling factor) and ``size-lookup`` (dim x pooling factor x log10(rows)).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np

from neuroshard.search.greedy import check_fits, no_room, to_plan
from neuroshard.search.scoring import finish_plan
from neuroshard.types import (
    Cluster,
    CostEstimator,
    Plan,
    PlanInfeasibleError,
    Searcher,
    TableSpec,
    UnknownNameError,
)

TableKey = Callable[[TableSpec], float]

KEYS: dict[str, TableKey] = {
    "dim": lambda t: float(t.dim),
    "size": lambda t: float(t.rows * t.dim),
    "lookup": lambda t: t.dim * t.pooling_factor,
    "size-lookup": lambda t: t.dim * t.pooling_factor * math.log10(t.rows),
}

RANDOM_ATTEMPTS = 100  # random placements tried before giving up on memory


def _key_fn(key: str | TableKey) -> TableKey:
    if callable(key):
        return key
    if key not in KEYS:
        raise UnknownNameError(f"unknown greedy key {key!r}; valid: {', '.join(KEYS)}")
    return KEYS[key]


def greedy_baseline(tables: Sequence[TableSpec], cluster: Cluster, estimator: CostEstimator, *,
                    key: str | TableKey, seed: int = 0) -> Plan:
    """Greedy by ``key`` (a name in :data:`KEYS` or a function of a table).

    The estimator only scores the result; ``seed`` is unused (the greedy is deterministic).
    """
    started = time.perf_counter()
    key_fn = _key_fn(key)
    error = check_fits(tables, cluster)
    if error is not None:
        raise error
    values = [key_fn(t) for t in tables]
    order = sorted(range(len(tables)), key=lambda i: -values[i])
    free = list(cluster.memory_per_device_bytes)
    load = [0.0] * cluster.num_devices
    devices = [-1] * len(tables)
    for i in order:
        need = tables[i].size_bytes
        fits = [d for d in range(cluster.num_devices) if free[d] >= need]
        if not fits:
            raise no_room(tables[i], free)
        d = min(fits, key=load.__getitem__)
        devices[i] = d
        free[d] -= need
        load[d] += values[i]
    plan = to_plan(tables, cluster, tables, devices)
    name = key if isinstance(key, str) else getattr(key, "__name__", "custom")
    return finish_plan(plan, estimator, searcher=name, started=started)


def greedy_by(key: str | TableKey) -> Searcher:
    """The greedy baseline for ``key`` as a :class:`~neuroshard.types.Searcher`."""
    key_fn = _key_fn(key)

    def search(tables: Sequence[TableSpec], cluster: Cluster, estimator: CostEstimator, *,
               seed: int = 0) -> Plan:
        return greedy_baseline(tables, cluster, estimator, key=key, seed=seed)

    search.__name__ = f"greedy_by_{key if isinstance(key, str) else key_fn.__name__}"
    return search


def random_plan(tables: Sequence[TableSpec], cluster: Cluster, estimator: CostEstimator, *,
                seed: int = 0) -> Plan:
    """Each table on a device drawn uniformly among those with room for it, seeded.

    A draw that paints itself into a corner is retried (same random stream) up to
    :data:`RANDOM_ATTEMPTS` times before :class:`PlanInfeasibleError`.
    """
    started = time.perf_counter()
    error = check_fits(tables, cluster)
    if error is not None:
        raise error
    rng = np.random.default_rng(seed)
    for _ in range(RANDOM_ATTEMPTS):
        free = list(cluster.memory_per_device_bytes)
        devices = []
        for t in tables:
            fits = [d for d in range(cluster.num_devices) if free[d] >= t.size_bytes]
            if not fits:
                error = no_room(t, free)
                break
            d = fits[int(rng.integers(len(fits)))]
            free[d] -= t.size_bytes
            devices.append(d)
        else:
            plan = to_plan(tables, cluster, tables, devices)
            return finish_plan(plan, estimator, searcher="random", started=started)
    raise PlanInfeasibleError(f"{error} (after {RANDOM_ATTEMPTS} random attempts)")

"""Plan costs: the one formula, for one finished plan and for batches of candidates.

A plan's cost under a :class:`~neuroshard.types.CostEstimator` is, per device,

* compute -- the estimator's fused compute of the device's shards (0 for an empty device),
* backward comm -- ``bwd_comm_ms`` of the per-device dim sums,
* forward comm -- ``fwd_comm_ms`` of the dim sums and each device's wait, where the wait
  is its compute + backward comm minus the smallest across devices,

and the plan cost is the max over devices of their sum. :func:`plan_cost` computes it for
one :class:`~neuroshard.types.Plan`; it serves the search (with a learned model) and
``neuroshard evaluate`` (with a hardware backend) alike.

:class:`Scorer` computes the same numbers for many candidate assignments at once, as the
searches need: a device's load is an opaque hashable :data:`LoadKey`, compute is cached
per key, and a batch of candidates costs one ``compute_ms`` call over its uncached loads
plus one ``bwd_comm_ms`` and one ``fwd_comm_ms`` call over its stacked dim-sum rows.
Searchers only build keys (:meth:`Scorer.item`, :meth:`Scorer.add`) and ask for costs, so
faster scoring (rescoring only changed devices, an additive per-shard model) stays here.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_right
from dataclasses import replace
from typing import Iterable, Sequence

import numpy as np

from neuroshard.types import CostEstimator, DeviceCost, Plan, PlanCost, TableSpec

logger = logging.getLogger(__name__)

# A device's load: the sorted item ids (see Scorer.item) of its shards, repeats allowed.
LoadKey = tuple[int, ...]
EMPTY_LOAD: LoadKey = ()


def _comm_ms(estimator: CostEstimator, compute_ms: np.ndarray,
             dim_sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Backward and forward comm, each ``(batch, num_devices)``, for stacked plans."""
    bwd = np.asarray(estimator.bwd_comm_ms(dim_sums), dtype=float)
    ready_ms = compute_ms + bwd
    waits_ms = ready_ms - ready_ms.min(axis=1, keepdims=True)
    fwd = np.asarray(estimator.fwd_comm_ms(dim_sums, waits_ms), dtype=float)
    return bwd, fwd


def plan_cost(plan: Plan, estimator: CostEstimator) -> PlanCost:
    """Per-device compute, comm and memory of ``plan`` under ``estimator``."""
    loads = plan.device_loads()
    busy = [i for i, load in enumerate(loads) if load]
    compute = np.zeros(len(loads))
    if busy:
        compute[busy] = np.asarray(estimator.compute_ms([loads[i] for i in busy]), dtype=float)
    dim_sums = np.asarray([plan.dim_sums()], dtype=float)
    bwd, fwd = _comm_ms(estimator, compute[None], dim_sums)
    return PlanCost(
        model=estimator.name,
        devices=tuple(
            DeviceCost(compute_ms=float(c), fwd_comm_ms=float(f), bwd_comm_ms=float(b),
                       memory_bytes=int(m))
            for c, f, b, m in zip(compute, fwd[0], bwd[0], plan.memory_bytes())
        ),
    )


def finish_plan(plan: Plan, estimator: CostEstimator, *, searcher: str, started: float,
                **meta) -> Plan:
    """``plan`` with its :func:`plan_cost` and ``meta`` (searcher name, search seconds, extras).

    ``started`` is a :func:`time.perf_counter` reading taken when the search began.
    """
    cost = plan_cost(plan, estimator)
    seconds = time.perf_counter() - started
    return replace(plan, cost=cost,
                   meta={**meta, "searcher": searcher, "search_seconds": seconds})


class Scorer:
    """Batched, cached costs of candidate assignments under one estimator.

    An *item* is a column shard's compute view (a :class:`TableSpec` narrowed to the
    shard's width), interned to a small int by :meth:`item`. A device load is a
    :data:`LoadKey`, built from :data:`EMPTY_LOAD` with :meth:`add`. An *assignment* is one
    candidate plan: a sequence of ``num_devices`` load keys.
    """

    def __init__(self, estimator: CostEstimator):
        self.estimator = estimator
        self._ids: dict[tuple[str, int], int] = {}
        self._specs: list[TableSpec] = []
        self._widths: list[int] = []
        self._compute_ms: dict[LoadKey, float] = {EMPTY_LOAD: 0.0}
        self.compute_calls = 0  # estimator.compute_ms calls made
        self.loads_computed = 0  # loads sent to the estimator (cache misses)

    # -- items and keys

    def item(self, spec: TableSpec) -> int:
        """The id of the shard ``spec`` (table name and width identify it)."""
        ident = (spec.name, spec.dim)
        found = self._ids.get(ident)
        if found is None:
            found = self._ids[ident] = len(self._specs)
            self._specs.append(spec)
            self._widths.append(spec.dim)
        return found

    def spec(self, item: int) -> TableSpec:
        return self._specs[item]

    @staticmethod
    def add(key: LoadKey, item: int) -> LoadKey:
        """``key`` with one more shard ``item``."""
        i = bisect_right(key, item)
        return key[:i] + (item,) + key[i:]

    def key(self, specs: Iterable[TableSpec]) -> LoadKey:
        """The load key of a device holding ``specs``."""
        return tuple(sorted(self.item(s) for s in specs))

    def dim_sum(self, key: LoadKey) -> int:
        widths = self._widths
        return sum(widths[i] for i in key)

    # -- costs

    def compute(self, keys: Sequence[LoadKey]) -> np.ndarray:
        """Fused compute (ms) of each load; one estimator call for all uncached loads."""
        cache = self._compute_ms
        missing = list(dict.fromkeys(k for k in keys if k not in cache))
        if missing:
            specs = self._specs
            values = self.estimator.compute_ms([[specs[i] for i in k] for k in missing])
            self.compute_calls += 1
            self.loads_computed += len(missing)
            cache.update(zip(missing, np.asarray(values, dtype=float).tolist()))
        return np.fromiter((cache[k] for k in keys), dtype=float, count=len(keys))

    def device_costs(self, assignments: Sequence[Sequence[LoadKey]]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Compute, backward comm and forward comm, each ``(len(assignments), num_devices)``."""
        num_devices = len(assignments[0])
        flat = [k for a in assignments for k in a]
        compute = self.compute(flat).reshape(len(assignments), num_devices)
        dim_sums = np.fromiter((self.dim_sum(k) for k in flat), dtype=float,
                               count=len(flat)).reshape(compute.shape)
        bwd, fwd = _comm_ms(self.estimator, compute, dim_sums)
        return compute, bwd, fwd

    def score(self, assignments: Sequence[Sequence[LoadKey]]) -> np.ndarray:
        """Plan cost (max over devices, ms) of each candidate assignment."""
        if not assignments:
            return np.zeros(0)
        compute, bwd, fwd = self.device_costs(assignments)
        return (compute + fwd + bwd).max(axis=1)  # DeviceCost.total_ms order

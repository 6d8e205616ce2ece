"""The library entry points: plan tables, evaluate a plan.

``Planner(cost_model=None, searcher=None)`` falls back to the shipped pre-trained model
for the cluster's device count (:func:`neuroshard.models.resolve_cost_model`) and to the
``neuroshard`` searcher (beam + greedy grid).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from neuroshard.models import resolve_cost_model
from neuroshard.types import (
    Cluster,
    CostEstimator,
    Plan,
    PlanCost,
    PlanInfeasibleError,
    TableSpec,
    UsageError,
)

log = logging.getLogger(__name__)

DEFAULT_SEARCHER = "neuroshard"

# The option through which each budget-aware searcher bounds its own time.
_BUDGET_OPTION = {"neuroshard": "time_budget_s", "surco": "time_limit_s"}


def check_fits(tables: Sequence[TableSpec], cluster: Cluster) -> None:
    """Fail fast, naming the culprits, when no plan can exist at all."""
    largest_device = max(cluster.memory_per_device_bytes)
    # Column-wise splitting can spread a table over devices, but each shard is >= 4 columns.
    for t in tables:
        narrowest = t.column_bytes(4)
        if narrowest > largest_device:
            raise PlanInfeasibleError(
                f"table {t.name!r} needs {t.size_bytes} bytes and even a 4-column shard "
                f"({narrowest} bytes) exceeds the largest device ({largest_device} bytes)")
    total = sum(t.size_bytes for t in tables)
    if total > cluster.total_memory_bytes:
        biggest = sorted(tables, key=lambda t: -t.size_bytes)[:3]
        raise PlanInfeasibleError(
            f"tables need {total} bytes in total but the {cluster.num_devices} devices have "
            f"{cluster.total_memory_bytes} bytes (largest: "
            + ", ".join(f"{t.name!r} {t.size_bytes}" for t in biggest) + ")")


def plan_tables(tables: Sequence[TableSpec], cluster: Cluster, estimator: CostEstimator | None = None,
                searcher: str = DEFAULT_SEARCHER, *, seed: int = 0,
                time_budget_s: float | None = None) -> Plan:
    """Plan ``tables`` on ``cluster``: the one call behind ``neuroshard plan`` and the planners.

    ``time_budget_s`` bounds the time of the searchers that can trade time for quality
    (``neuroshard``, ``surco``); the others are fast and ignore it.
    """
    from neuroshard.search import get_searcher

    if time_budget_s is not None and not time_budget_s > 0:
        raise UsageError(f"time budget must be positive, got {time_budget_s}")
    check_fits(tables, cluster)
    estimator = estimator or resolve_cost_model(num_devices=cluster.num_devices,
                                                batch_size=cluster.batch_size)
    options = {}
    if time_budget_s is not None and searcher in _BUDGET_OPTION:
        options[_BUDGET_OPTION[searcher]] = time_budget_s
    search = get_searcher(searcher, **options)
    start = time.perf_counter()
    plan = search(list(tables), cluster, estimator, seed=seed)
    seconds = time.perf_counter() - start
    log.info("searcher %s planned %d tables on %d devices in %.3f s", searcher, len(tables),
             cluster.num_devices, seconds)
    meta: dict[str, Any] = {**plan.meta, "searcher": searcher, "search_seconds": round(seconds, 4)}
    return Plan(plan.tables, plan.shards, plan.cluster, plan.cost, meta)


def evaluate_plan(plan: Plan, estimator: CostEstimator) -> PlanCost:
    """The plan's per-device cost under ``estimator`` (a backend or a model)."""
    from neuroshard.search.scoring import plan_cost

    return plan_cost(plan, estimator)


class Planner:
    """Constructor-injected planner: ``Planner().plan(tables, cluster)``."""

    def __init__(self, cost_model: CostEstimator | None = None, searcher: str = DEFAULT_SEARCHER,
                 seed: int = 0, time_budget_s: float | None = None):
        self.cost_model = cost_model
        self.searcher = searcher
        self.seed = seed
        self.time_budget_s = time_budget_s

    def plan(self, tables: Sequence[TableSpec], cluster: Cluster) -> Plan:
        return plan_tables(tables, cluster, self.cost_model, self.searcher, seed=self.seed,
                           time_budget_s=self.time_budget_s)

"""The library entry points: plan tables, evaluate a plan.

``Planner(cost_model=None, searcher="neuroshard", budget_s=None)`` falls back to the
shipped pre-trained model for the cluster (:func:`neuroshard.models.resolve_cost_model`)
and to the ``neuroshard`` searcher (beam + greedy grid).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from neuroshard.feasibility import check_fits
from neuroshard.models import resolve_cost_model
from neuroshard.search import DEFAULT_SEARCHER, get_searcher
from neuroshard.search.scoring import plan_cost
from neuroshard.types import (
    Cluster,
    CostEstimator,
    Plan,
    PlanCost,
    Searcher,
    TableSpec,
    UsageError,
)

log = logging.getLogger(__name__)


def evaluate_plan(plan: Plan, estimator: CostEstimator) -> PlanCost:
    """The plan's per-device cost under ``estimator`` (a backend or a model)."""
    return plan_cost(plan, estimator)


class Planner:
    """Plans tables on a cluster: the one path behind ``neuroshard plan``, the TorchRec
    planner and the benches.

    ``cost_model`` prices candidates: an estimator, or a function of the cluster that
    returns one (called after the cheap checks), default the shipped model for the
    cluster (:func:`neuroshard.models.resolve_cost_model`); ``searcher`` is a
    registered name or any :class:`~neuroshard.types.Searcher`; ``budget_s`` bounds the
    search's time (the same for every searcher). The planner checks feasibility once,
    then times, prices and labels the searcher's plain plan once.
    """

    def __init__(
        self,
        cost_model: CostEstimator | Callable[[Cluster], CostEstimator] | None = None,
        searcher: Searcher | str = DEFAULT_SEARCHER,
        budget_s: float | None = None,
        seed: int = 0,
    ):
        if budget_s is not None and not (budget_s > 0 and math.isfinite(budget_s)):
            raise UsageError(
                f"time budget must be a positive, finite number of seconds, got {budget_s}"
            )
        self.cost_model = cost_model
        self.searcher = searcher
        self.budget_s = budget_s
        self.seed = seed

    @property
    def searcher_name(self) -> str:
        if isinstance(self.searcher, str):
            return self.searcher
        return getattr(self.searcher, "__name__", type(self.searcher).__name__)

    def estimator_for(self, cluster: Cluster) -> CostEstimator:
        """The cost model plans on ``cluster`` are priced with."""
        if self.cost_model is None:
            return resolve_cost_model(
                num_devices=cluster.num_devices, batch_size=cluster.batch_size
            )
        if isinstance(self.cost_model, CostEstimator):
            return self.cost_model
        return self.cost_model(cluster)

    def plan(self, tables: Sequence[TableSpec], cluster: Cluster) -> Plan:
        """The searcher's plan of ``tables`` on ``cluster``, with its cost under the cost
        model and ``meta["searcher"]`` / ``meta["search_seconds"]``. Raises
        :class:`~neuroshard.types.PlanInfeasibleError` naming the tables when no plan can fit."""
        search = get_searcher(self.searcher) if isinstance(self.searcher, str) else self.searcher
        check_fits(tables, cluster)
        estimator = self.estimator_for(cluster)
        start = time.perf_counter()
        budget = {} if self.budget_s is None else {"budget_s": self.budget_s}
        plan = search(list(tables), cluster, estimator, seed=self.seed, **budget)
        seconds = time.perf_counter() - start
        log.info(
            "searcher %s planned %d tables on %d devices in %.3f s",
            self.searcher_name,
            len(tables),
            cluster.num_devices,
            seconds,
        )
        meta: dict[str, Any] = {
            **plan.meta,
            "searcher": self.searcher_name,
            "search_seconds": round(seconds, 4),
        }
        return replace(plan, cost=plan_cost(plan, estimator), meta=meta)

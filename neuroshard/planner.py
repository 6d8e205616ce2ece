"""The library entry points: plan tables, evaluate a plan.

``Planner(cost_model=None, searcher="neuroshard", budget_s=None)`` falls back to the
shipped pre-trained model for the cluster (:func:`neuroshard.models.resolve_cost_model`)
and to the ``neuroshard`` searcher (beam + greedy grid).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from neuroshard.feasibility import check_constraints, check_fits
from neuroshard.models import resolve_cost_model
from neuroshard.plan_io import validate_plan
from neuroshard.search import DEFAULT_SEARCHER, get_candidate_searcher, get_searcher
from neuroshard.search.scoring import plan_cost
from neuroshard.types import (
    DEFAULT_RESERVE_FRACTION,
    OPTIMIZERS,
    BackendError,
    Cluster,
    ConstraintError,
    Constraints,
    CostEstimator,
    Plan,
    PlanCost,
    Searcher,
    TableSpec,
    UsageError,
)

log = logging.getLogger(__name__)

DEFAULT_TOP = 5  # candidates a verification measures


def _takes(search: Searcher, keyword: str) -> bool:
    """Whether the searcher accepts ``keyword`` (or any keyword)."""
    try:
        params = inspect.signature(search).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


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

    Memory as a training job has it: ``reserve`` is the share of every device's HBM kept
    for what is not embeddings (default :data:`~neuroshard.types.DEFAULT_RESERVE_FRACTION`,
    TorchRec's 15%; None: the cluster's own ``hbm_reserve_fraction``); ``optimizer``
    (None: the cluster's) adds its state to every shard; ``io_buffers`` (default True, as
    TorchRec's storage estimate; None: the cluster's) adds each shard's input and output
    buffers (:func:`~neuroshard.types.io_buffer_bytes`). Searchers see a cluster whose
    ``memory_per_device_bytes`` are already the budgets after the reserve, so every
    searcher keeps it; the plan comes back on the cluster with its reserve recorded.
    ``constraints`` (:class:`~neuroshard.types.Constraints`) go to searchers that take
    them (``neuroshard``, ``greedy-grid``); another searcher given constraints is refused
    with :class:`~neuroshard.types.ConstraintError`, and every plan is checked against
    them.

    Verification: with ``verify`` (an estimator, typically a backend that measures or
    simulates, or a function of the cluster that returns one) the searcher keeps its
    ``top`` (default :data:`DEFAULT_TOP`; given without ``verify``: a
    :class:`~neuroshard.types.UsageError`) cheapest plans under the cost model
    (:func:`~neuroshard.search.get_candidate_searcher`), ``verify`` prices each, and the
    plan priced cheapest there wins: what the cost model got wrong among close candidates,
    the measurement settles. ``meta["verify"]`` records both prices of every candidate and
    the winner's rank.
    """

    def __init__(
        self,
        cost_model: CostEstimator | Callable[[Cluster], CostEstimator] | None = None,
        searcher: Searcher | str = DEFAULT_SEARCHER,
        budget_s: float | None = None,
        seed: int = 0,
        *,
        reserve: float | None = DEFAULT_RESERVE_FRACTION,
        optimizer: str | None = None,
        io_buffers: bool | None = True,
        constraints: Constraints | None = None,
        verify: CostEstimator | Callable[[Cluster], CostEstimator] | None = None,
        top: int | None = None,
    ):
        if budget_s is not None and not (budget_s > 0 and math.isfinite(budget_s)):
            raise UsageError(
                f"time budget must be a positive, finite number of seconds, got {budget_s}"
            )
        if reserve is not None and not (0.0 <= reserve < 1.0):
            raise UsageError(f"reserve must be a fraction in [0, 1), got {reserve}")
        if optimizer is not None and optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        self.cost_model = cost_model
        self.searcher = searcher
        self.budget_s = budget_s
        self.seed = seed
        self.reserve = reserve
        self.optimizer = optimizer
        self.io_buffers = io_buffers
        self.constraints = constraints
        if top is not None and verify is None:
            raise UsageError("top (candidates to verify) goes with verify")
        top = DEFAULT_TOP if top is None else top
        if top < 1:
            raise UsageError(f"top must be at least 1 candidate, got {top}")
        if verify is not None and not isinstance(searcher, str):
            raise UsageError("verification needs a registered searcher name, e.g. 'neuroshard'")
        if verify is not None:
            assert isinstance(searcher, str)
            get_candidate_searcher(searcher)  # refuses a searcher that keeps one plan, now
        self.verify = verify
        self.top = top

    def cluster_for(self, cluster: Cluster) -> Cluster:
        """``cluster`` with this planner's reserve, optimizer and I/O buffers."""
        changes: dict[str, Any] = {}
        if self.reserve is not None:
            changes["hbm_reserve_fraction"] = self.reserve
        if self.optimizer is not None:
            changes["optimizer"] = self.optimizer
        if self.io_buffers is not None:
            changes["io_buffers"] = self.io_buffers
        return replace(cluster, **changes) if changes else cluster

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
        cluster = self.cluster_for(cluster)
        options: dict[str, Any] = {} if self.budget_s is None else {"budget_s": self.budget_s}
        if self.constraints is not None:
            self.constraints.check(tables, cluster)
            if not _takes(search, "constraints"):
                raise ConstraintError(
                    f"searcher {self.searcher_name!r} does not take constraints; use "
                    "'neuroshard' or 'greedy-grid'"
                )
            options["constraints"] = self.constraints
        check_fits(tables, cluster, self.constraints)
        estimator = self.estimator_for(cluster)
        # Searchers see the budgets after the reserve as their caps.
        seen = replace(
            cluster, memory_per_device_bytes=cluster.hbm_budget_bytes, hbm_reserve_fraction=0.0
        )
        start = time.perf_counter()
        if self.verify is None:
            plan = search(list(tables), seen, estimator, seed=self.seed, **options)
            candidates = [plan]
        else:
            keep = get_candidate_searcher(self.searcher_name)
            candidates = keep(
                list(tables), seen, estimator, keep=self.top, seed=self.seed, **options
            )
        seconds = time.perf_counter() - start
        candidates = [replace(p, cluster=cluster) for p in candidates]
        for p in candidates:
            validate_plan(p)
            check_constraints(p, self.constraints)
        log.info(
            "searcher %s planned %d tables on %d devices in %.3f s",
            self.searcher_name,
            len(tables),
            cluster.num_devices,
            seconds,
        )
        meta: dict[str, Any] = {"searcher": self.searcher_name, "search_seconds": round(seconds, 4)}
        if self.verify is None:
            plan, cost = candidates[0], plan_cost(candidates[0], estimator)
        else:
            plan, cost, meta["verify"] = self._verified(candidates, cluster, estimator)
        return replace(plan, cost=cost, meta={**plan.meta, **meta})

    def _verified(
        self, candidates: Sequence[Plan], cluster: Cluster, estimator: CostEstimator
    ) -> tuple[Plan, PlanCost, dict[str, Any]]:
        """The candidate ``verify`` prices cheapest (the earlier on a tie), its cost under
        the cost model, and the record."""
        assert self.verify is not None
        verifier = self.verify if isinstance(self.verify, CostEstimator) else self.verify(cluster)
        start = time.perf_counter()
        model_costs = [plan_cost(p, estimator) for p in candidates]
        verified_ms = [plan_cost(p, verifier).max_ms for p in candidates]
        bad = [i for i, ms in enumerate(verified_ms) if not math.isfinite(ms)]
        if bad:
            raise BackendError(
                f"verification on {verifier.name} gave no finite cost for candidate(s) "
                f"{', '.join(str(i + 1) for i in bad)} of {len(candidates)}"
            )
        chosen = min(range(len(candidates)), key=verified_ms.__getitem__)
        log.info(
            "verified %d candidates on %s in %.3f s: rank %d wins (%.4f ms there, %.4f ms "
            "for the model's first)",
            len(candidates),
            verifier.name,
            time.perf_counter() - start,
            chosen + 1,
            verified_ms[chosen],
            verified_ms[0],
        )
        record = {
            "backend": verifier.name,
            "candidates": len(candidates),
            "model_ms": [round(c.max_ms, 6) for c in model_costs],
            "verified_ms": [round(ms, 6) for ms in verified_ms],
            "chosen_rank": chosen + 1,
            "verify_seconds": round(time.perf_counter() - start, 4),
        }
        return candidates[chosen], model_costs[chosen], record

"""Searchers by name, imported lazily.

``get_searcher("neuroshard")`` returns a :class:`~neuroshard.types.Searcher`
``(tables, cluster, estimator, *, seed=0) -> Plan``. Every plan it returns carries
``cost = plan_cost(plan, estimator)`` and ``meta["searcher"]`` / ``meta["search_seconds"]``.

* ``neuroshard`` (default) -- beam search over column splits, greedy grid placement
  (:mod:`neuroshard.search.beam`);
* ``greedy-grid`` -- the greedy grid alone, table-wise (:mod:`neuroshard.search.greedy`);
* baselines (:data:`BASELINES`, :mod:`neuroshard.search.baselines`): ``random`` and the
  greedy by ``dim``, ``size``, ``lookup`` or ``size-lookup``.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

from neuroshard.search.scoring import Scorer, plan_cost
from neuroshard.types import Cluster, CostEstimator, Plan, TableSpec, UnknownNameError

# name -> ("module:function", keyword arguments bound at lookup)
_REGISTRY: dict[str, tuple[str, Mapping[str, Any]]] = {
    "neuroshard": ("neuroshard.search.polish:neuroshard_search", {}),
    "greedy-grid": ("neuroshard.search.greedy:greedy_grid", {}),
    "random": ("neuroshard.search.baselines:random_plan", {}),
    "dim": ("neuroshard.search.baselines:greedy_baseline", {"key": "dim"}),
    "size": ("neuroshard.search.baselines:greedy_baseline", {"key": "size"}),
    "lookup": ("neuroshard.search.baselines:greedy_baseline", {"key": "lookup"}),
    "size-lookup": ("neuroshard.search.baselines:greedy_baseline", {"key": "size-lookup"}),
    "torchrec": ("neuroshard.search.torchrec_baseline:torchrec_plan", {}),
    "surco": ("neuroshard.search.surco:surco_plan", {}),
}

DEFAULT_SEARCHER = "neuroshard"
BASELINES: tuple[str, ...] = ("random", "dim", "size", "lookup", "size-lookup")


def searcher_names() -> list[str]:
    return sorted(_REGISTRY)


class NamedSearcher:
    """A registered search function with its bound options, timed and labelled per call."""

    def __init__(self, name: str, function: Callable[..., Plan], options: Mapping[str, Any]):
        self.name = name
        self.function = function
        self.options = dict(options)

    def __call__(self, tables: Sequence[TableSpec], cluster: Cluster,
                 estimator: CostEstimator, *, seed: int = 0) -> Plan:
        started = time.perf_counter()
        plan = self.function(tables, cluster, estimator, seed=seed, **self.options)
        if plan.cost is None:
            plan = plan.with_cost(plan_cost(plan, estimator))
        seconds = time.perf_counter() - started
        return replace(plan, meta={**plan.meta, "searcher": self.name, "search_seconds": seconds})

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"NamedSearcher({self.name!r}{options})"


def get_searcher(name: str = DEFAULT_SEARCHER, **options: Any) -> NamedSearcher:
    """The searcher registered as ``name``; ``options`` override its keyword defaults
    (e.g. ``get_searcher("neuroshard", width=5)``)."""
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown searcher {name!r}; valid: {', '.join(searcher_names())}")
    target, bound = _REGISTRY[name]
    module, attr = target.split(":")
    function = getattr(importlib.import_module(module), attr)
    return NamedSearcher(name, function, {**bound, **options})


__all__ = [
    "BASELINES", "DEFAULT_SEARCHER", "NamedSearcher", "Scorer", "get_searcher", "plan_cost",
    "searcher_names",
]

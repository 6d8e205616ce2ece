"""Searchers by name, imported lazily.

``get_searcher("neuroshard")`` returns a :class:`~neuroshard.types.Searcher`
``(tables, cluster, estimator, *, seed=0, budget_s=None) -> Plan``: a plain plan, which
the planner (:class:`neuroshard.planner.Planner`) prices and labels.

* ``neuroshard`` (default) -- beam search over the sharding space (column splits, row-wise,
  table-row-wise, data-parallel, host-memory caching), greedy grid placement
  (:mod:`neuroshard.search.beam`); takes ``constraints``;
* ``greedy-grid`` -- the greedy grid alone on the start layout: table-wise wherever a
  table fits a device (:func:`neuroshard.search.beam.grid_search`); takes ``constraints``;
* baselines (:data:`BASELINES`, :mod:`neuroshard.search.baselines`): ``random`` and the
  greedy by ``dim``, ``size``, ``lookup`` or ``size-lookup``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from neuroshard.search.scoring import Scorer, plan_cost
from neuroshard.types import Plan, Searcher, UnknownNameError

# name -> ("module:function", keyword arguments bound at lookup)
_REGISTRY: dict[str, tuple[str, Mapping[str, Any]]] = {
    "neuroshard": ("neuroshard.search.polish:neuroshard_search", {}),
    "greedy-grid": ("neuroshard.search.beam:grid_search", {}),
    "random": ("neuroshard.search.baselines:random_plan", {}),
    "dim": ("neuroshard.search.baselines:greedy_baseline", {"key": "dim"}),
    "size": ("neuroshard.search.baselines:greedy_baseline", {"key": "size"}),
    "lookup": ("neuroshard.search.baselines:greedy_baseline", {"key": "lookup"}),
    "size-lookup": ("neuroshard.search.baselines:greedy_baseline", {"key": "size-lookup"}),
    "torchrec": ("neuroshard.search.torchrec_baseline:torchrec_plan", {}),
    "surco": ("neuroshard.search.surco:surco_plan", {}),
}

# name -> "module:function" returning the searcher's ``keep`` cheapest plans, cheapest first
_CANDIDATES: dict[str, str] = {"neuroshard": "neuroshard.search.beam:beam_candidates"}

DEFAULT_SEARCHER = "neuroshard"
BASELINES: tuple[str, ...] = ("random", "dim", "size", "lookup", "size-lookup")


def searcher_names() -> list[str]:
    return sorted(_REGISTRY)


def get_searcher(name: str = DEFAULT_SEARCHER, **options: Any) -> Searcher:
    """The searcher registered as ``name`` with its bound options; ``options`` override
    its keyword defaults (e.g. ``get_searcher("neuroshard", width=5)``). It returns a plain
    plan: :class:`neuroshard.planner.Planner` checks feasibility, times, prices and labels."""
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown searcher {name!r}; valid: {', '.join(searcher_names())}")
    target, bound = _REGISTRY[name]
    module, attr = target.split(":")
    function = getattr(importlib.import_module(module), attr)
    searcher = functools.partial(function, **{**bound, **options})
    searcher.__name__ = name  # type: ignore[attr-defined]
    return searcher


def plan_shaped_searchers() -> list[Searcher]:
    """The searches whose plans' device loads pretraining measures (plan-shaped samples):
    the beam returning the plan it prices cheapest (``margin=0``: the loads a model error
    would lure it to, even where the default margin would keep the greedy grid's plan) and
    the greedy grid."""
    return [get_searcher("neuroshard", margin=0.0), get_searcher("greedy-grid")]


def get_candidate_searcher(name: str, **options: Any) -> Callable[..., list[Plan]]:
    """For verification: ``name``'s search returning its ``keep`` cheapest distinct plans
    (``(tables, cluster, estimator, *, keep, seed=0, budget_s=None, constraints=None)``),
    cheapest first. For ``neuroshard`` that is the beam alone: a budget goes to it whole,
    with no SurCo polish. :class:`UnknownNameError` for a searcher that keeps one plan."""
    if name not in _CANDIDATES:
        raise UnknownNameError(
            f"searcher {name!r} keeps a single plan, so there is nothing to verify; "
            f"searchers that keep candidates: {', '.join(sorted(_CANDIDATES))}"
        )
    module, attr = _CANDIDATES[name].split(":")
    function = getattr(importlib.import_module(module), attr)
    return functools.partial(function, **options)


__all__ = [
    "BASELINES",
    "DEFAULT_SEARCHER",
    "Scorer",
    "get_candidate_searcher",
    "get_searcher",
    "plan_cost",
    "plan_shaped_searchers",
    "searcher_names",
]

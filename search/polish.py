"""NeuroShard's default search: the beam, then, when time allows, a SurCo polish.

Without a time budget this is exactly :func:`~neuroshard.search.beam.beam_search`. With
``budget_s``, the beam gets ``1 - polish_fraction`` of it and SurCo
(:func:`~neuroshard.search.surco.surco_plan`) spends the rest re-placing the beam's own
column shards, starting from the beam's plan; the cheaper of the two under the estimator
wins, so the result is never worse than the beam's, and it replaces the greedy grid's plan
only when every member of the estimator prices it ``margin`` below it, as the beam's own
does (:func:`~neuroshard.search.beam.beats_start`). How much the polish gains is
measured in ``bench/results/surco_d4.md`` (``beam+surco``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from neuroshard.search.beam import DEFAULT_MARGIN, beam_search, beats_start
from neuroshard.search.scoring import member_costs, plan_cost
from neuroshard.types import Cluster, CostEstimator, Plan, TableSpec

logger = logging.getLogger(__name__)

MIN_POLISH_S = 0.5  # below this SurCo's solver cannot do useful work
# SurCo's time outside its solver (the greedy start, the surrogate's fits over every shard
# and device, the model build) per shard x device pair, as measured at 1,000 tables on 128
# devices on the 2-core CPU and rounded up (the README's "Time budgets").
SURCO_S_PER_PAIR = 1e-4


def neuroshard_search(
    tables: Sequence[TableSpec],
    cluster: Cluster,
    estimator: CostEstimator,
    *,
    seed: int = 0,
    budget_s: float | None = None,
    polish_fraction: float = 0.5,
    margin: float = DEFAULT_MARGIN,
    **beam_options: Any,
) -> Plan:
    """The beam; with ``budget_s``, ``1 - polish_fraction`` of it for the beam and the rest
    for a SurCo polish of the beam's shards, keeping the plan ``estimator`` prices lower.
    SurCo's solver gets what is left once its fits (projected at :data:`SURCO_S_PER_PAIR`
    per shard and device) are paid for; no polish, and the whole budget to the beam, when
    the solver would get less time than the fits or than :data:`MIN_POLISH_S`. ``margin``:
    how much cheaper than the greedy grid's plan a searched plan must be priced to replace it
    (:func:`~neuroshard.search.beam.beam_search`)."""
    if budget_s is None:
        return beam_search(tables, cluster, estimator, seed=seed, margin=margin, **beam_options)
    started = time.perf_counter()
    # The polish's fits grow with shards x devices: on a large task the whole budget goes
    # to the beam unless the polish's solver would get at least as long as its fits.
    fits_s = len(tables) * cluster.num_devices * SURCO_S_PER_PAIR
    polish = budget_s * polish_fraction >= max(MIN_POLISH_S + fits_s, 2 * fits_s)
    beam = beam_search(
        tables,
        cluster,
        estimator,
        seed=seed,
        budget_s=budget_s * (1 - polish_fraction) if polish else budget_s,
        margin=margin,
        **beam_options,
    )
    overhead_s = len(beam.shards) * cluster.num_devices * SURCO_S_PER_PAIR
    left_s = budget_s - (time.perf_counter() - started) - overhead_s
    if not polish or left_s < MIN_POLISH_S:
        logger.info(
            "no SurCo polish: %.1f s of the budget left after its projected %.1f s of fits",
            left_s,
            overhead_s,
        )
        return beam
    if beam_options.get("constraints") is not None or any(
        s.rows is not None or s.sharding_type is not None or s.compute_kernel != "fused"
        for s in beam.shards
    ):
        return beam  # SurCo re-places fused table- and column-wise shards, unconstrained
    from neuroshard.search.surco import surco_plan

    splits = {t.name: tuple(s.width for s in beam.shards_of(t.name)) for t in beam.tables}
    polished = surco_plan(
        tables, cluster, estimator, seed=seed, splits=splits, budget_s=left_s * 0.8
    )
    beam_ms = plan_cost(beam, estimator).max_ms
    polished_ms = plan_cost(polished, estimator).max_ms
    logger.info("SurCo polish: %.4f ms -> %.4f ms in %.2f s", beam_ms, polished_ms, left_s)
    start_members = beam.meta.get("start_member_ms")
    better = polished_ms < beam_ms and (
        start_members is None
        or beats_start(member_costs(polished, estimator), start_members, margin)
    )
    best = polished if better else beam
    return replace(
        best,
        meta={
            **beam.meta,
            "polish": {
                "beam_ms": beam_ms,
                "surco_ms": polished_ms,
                "kept": "surco" if best is polished else "beam",
            },
        },
    )

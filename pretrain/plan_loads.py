"""Plan-shaped compute samples: the device loads a search proposes under a model.

A model trained on random loads is least accurate where a search takes it: the search
seeks the loads it prices cheapest, and those are where its errors are (on real hardware
the beam split nearly every table into column shards and piled them onto devices, loads
random sampling seldom draws; `bench/results/plan_shaped_cpu.md`). Pre-training can
measure those loads too: plan tasks of training tables with the model just trained, with
the beam and the greedy grid, take each plan's device loads, measure them and train
again on all samples (search-guided augmentation, as DAgger does for policies).
:func:`plan_load_samples` draws them; :class:`~neuroshard.pretrain.pipeline.PretrainConfig`
``plan_rounds`` runs the loop. The searchers are passed in (pretraining does not import
the search package; the CLI gives it the beam and the greedy grid).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from neuroshard.pretrain.augment import ComputeSample
from neuroshard.types import Cluster, CostEstimator, PlanInfeasibleError, Searcher, TableSpec

logger = logging.getLogger(__name__)

__all__ = ["plan_load_samples"]


def plan_load_samples(
    estimator: CostEstimator,
    tables: Sequence[TableSpec],
    tasks: int,
    rng: np.random.Generator,
    *,
    searchers: Sequence[Searcher],
    num_devices: int,
    memory_bytes: int | None = None,
    batch_size: int,
    min_tables: int = 10,
    max_tables: int = 60,
    start_index: int = 0,
    fill: float | None = None,
    devices_per_host: int | None = None,
) -> list[ComputeSample]:
    """The distinct device loads of the plans ``searchers`` make under ``estimator`` for
    ``tasks`` tasks of ``min_tables``..``max_tables`` distinct ``tables`` (all of them
    when there are fewer than ``min_tables``) on
    ``num_devices`` devices (hosts of ``devices_per_host``; None: one host) at
    ``batch_size``, each device with ``memory_bytes`` of HBM, or (``fill``) the task's
    table bytes / devices / ``fill``; sample indices from ``start_index``. Tasks no
    searcher can plan are skipped (logged)."""
    if tasks < 0 or not 1 <= min_tables <= max_tables:
        raise ValueError(
            f"need tasks >= 0 and 1 <= min_tables <= max_tables, got {tasks}, "
            f"{min_tables}, {max_tables}"
        )
    if (memory_bytes is None) == (fill is None) or (fill is not None and not 0 < fill <= 1):
        raise ValueError(f"give memory_bytes or a fill in (0, 1], got {memory_bytes}, {fill}")
    out: list[ComputeSample] = []
    seen: set[tuple[TableSpec, ...]] = set()
    for task in range(tasks):
        k = int(rng.integers(min(min_tables, len(tables)), min(max_tables, len(tables)) + 1))
        drawn = [tables[int(j)] for j in rng.choice(len(tables), size=k, replace=False)]
        memory = memory_bytes
        if fill is not None:
            memory = int(sum(t.size_bytes for t in drawn) / num_devices / fill) + 1
        cluster = Cluster.uniform(
            num_devices, int(memory or 0), batch_size, devices_per_host=devices_per_host or 0
        )
        for search in searchers:
            try:
                plan = search(drawn, cluster, estimator, seed=task)
            except PlanInfeasibleError as exc:
                logger.info("plan-shaped samples: task %d skipped (%s)", task, exc)
                continue
            for load in plan.device_loads():
                key = tuple(sorted(load, key=lambda t: (t.name, t.dim, t.rows)))
                if load and key not in seen:
                    seen.add(key)
                    out.append(ComputeSample(start_index + len(out), tuple(load)))
    return out

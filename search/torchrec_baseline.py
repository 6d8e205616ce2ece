"""TorchRec's own planner as a baseline searcher.

:func:`torchrec_plan` runs TorchRec 1.9's ``EmbeddingShardingPlanner`` (its grid, greedy
and uniform proposers with the greedy-by-perf partitioner) on our tables and converts its
answer back to a :class:`~neuroshard.types.Plan`, scored by our estimator like every
other searcher's. The set-up mirrors our problem:

* an ``EmbeddingBagCollection`` on the meta device, one feature per table, so nothing is
  allocated;
* a topology of ``cluster.num_devices`` devices with ``compute_device="cuda"`` and each
  device's memory cap as its HBM (TorchRec only enforces HBM on accelerators; planning
  with meta tensors works on CPU-only torch), no storage reserved for the dense part;
* per table, ``ParameterConstraints`` with our pooling factor, the fused kernel, and the
  sharding types our plan format holds: ``table_wise`` and ``column_wise``;
* TorchRec's batch size is per rank: ``cluster.batch_size // num_devices``.

TorchRec's storage estimate adds input/output buffers to the weights, so its plans are a
little more conservative on memory than ours. ``cost_source="neuroshard"`` swaps
TorchRec's analytic perf estimator for :class:`~neuroshard.torchrec_adapter.NeuroShardEstimator`
over ``estimator``, i.e. TorchRec's search driven by our costs.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import replace
from typing import Sequence

from neuroshard.types import Cluster, CostEstimator, Plan, PlanInfeasibleError, TableSpec

logger = logging.getLogger(__name__)

SHARDING_TYPES = ("table_wise", "column_wise")
COST_SOURCES = ("torchrec", "neuroshard")


def _one_line(message: str, limit: int = 600) -> str:
    """TorchRec's multi-line no-plan report as one line: the reason, the storage needed
    vs available, and the last partition error without its perf breakdown."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return "no reason given"
    parts = [lines[0].rstrip(".")]
    for line in lines:
        if line.startswith(("Global storage available", "Global storage requirement")):
            line = line.rstrip(", ")
            while line.count(")") > line.count("("):
                line = line[:-1]
            parts.append(line)
    if "Last planner error:" in message:
        last = message.split("Last planner error:", 1)[1]
        parts.append("last error: " + re.sub(r"perf: Perf\([^)]*\), ", "", last))
    text = re.sub(r"\s+", " ", "; ".join(parts)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def torchrec_plan(tables: Sequence[TableSpec], cluster: Cluster, estimator: CostEstimator,
                  *, seed: int = 0, budget_s: float | None = None,
                  cost_source: str = "torchrec",
                  compute_device: str = "cuda") -> Plan:
    """TorchRec's plan for ``tables`` on ``cluster``, costed by ``estimator``.

    ``seed`` and ``budget_s`` are accepted for the searcher interface; TorchRec's planner
    is deterministic and has no time bound.
    ``cost_source`` picks the per-shard costs TorchRec searches with: its own analytic
    model (``"torchrec"``) or ``estimator`` through ``NeuroShardEstimator``
    (``"neuroshard"``). ``compute_device="cpu"`` plans against DDR caps instead of HBM.

    Raises :class:`PlanInfeasibleError` (TorchRec's reason, one line) when TorchRec finds
    no plan.
    """
    if cost_source not in COST_SOURCES:
        raise ValueError(f"cost_source must be one of {COST_SOURCES}, got {cost_source!r}")
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
    from torchrec.distributed.planner.storage_reservations import (
        FixedPercentageStorageReservation,
    )
    from torchrec.distributed.planner.types import ParameterConstraints, PlannerError

    from neuroshard.plan_io import validate_plan
    from neuroshard.torchrec_adapter import (
        NeuroShardEstimator,
        cluster_topology,
        from_sharding_plan,
        meta_ebc,
    )

    started = time.perf_counter()
    ebc = meta_ebc(tables)
    topology = cluster_topology(cluster, compute_device)
    constraints = {
        t.name: ParameterConstraints(sharding_types=list(SHARDING_TYPES),
                                     compute_kernels=["fused"],
                                     pooling_factors=[float(t.pooling_factor)])
        for t in tables
    }
    batch_size = max(1, cluster.batch_size // cluster.num_devices)
    enumerator = None
    if cost_source == "neuroshard":
        enumerator = EmbeddingEnumerator(
            topology=topology, batch_size=batch_size, constraints=constraints,
            estimator=[
                NeuroShardEstimator(topology, constraints, estimator,
                                    table_stats={t.name: t for t in tables},
                                    batch_size=batch_size),
                EmbeddingStorageEstimator(topology=topology, constraints=constraints),
            ],
        )
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, enumerator=enumerator,
        constraints=constraints, storage_reservation=FixedPercentageStorageReservation(0.0),
        stats=[], debug=False,
    )
    try:
        sharding_plan = planner.plan(ebc, [EmbeddingBagCollectionSharder()])
    except PlannerError as err:
        largest = sorted(tables, key=lambda t: -t.size_bytes)[:3]
        raise PlanInfeasibleError(
            f"TorchRec found no plan for {len(tables)} tables needing "
            f"{sum(t.size_bytes for t in tables)} bytes of weights (largest: "
            + ", ".join(f"{t.name!r} {t.size_bytes} bytes" for t in largest)
            + f") on {cluster.num_devices} devices of at most {max(cluster.memory_per_device_bytes)} bytes; "
            f"TorchRec also budgets I/O buffers: {_one_line(str(err))}"
        ) from None
    plan = from_sharding_plan(sharding_plan, ebc, tables=tables, cluster=cluster)
    validate_plan(plan)
    seconds = time.perf_counter() - started
    logger.info("torchrec (%s costs) planned %d tables on %d devices in %.2f s",
                cost_source, len(tables), cluster.num_devices, seconds)
    return replace(plan, meta={"cost_source": cost_source})

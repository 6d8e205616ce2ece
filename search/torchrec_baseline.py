"""TorchRec's own planner as a baseline searcher.

:func:`torchrec_plan` runs TorchRec 1.9's ``EmbeddingShardingPlanner`` (its grid, greedy
and uniform proposers with the greedy-by-perf partitioner) on our tables and converts its
answer back to a :class:`~neuroshard.types.Plan`, scored by our estimator like every
other searcher's. The set-up mirrors our problem:

* an ``EmbeddingBagCollection`` on the meta device, one feature per table, so nothing is
  allocated;
* the cluster's topology (:func:`~neuroshard.torchrec_adapter.cluster_topology`):
  ``local_world_size`` = its devices per host, its intra- and inter-host bandwidths when
  it gives them, ``compute_device="cuda"`` with each device's memory cap as its HBM
  (TorchRec only enforces HBM on accelerators; planning with meta tensors works on
  CPU-only torch) and its host memory as DDR; the cluster's HBM reserve as TorchRec's
  storage reservation (the planner hands searchers caps already net of it: 0 then);
* per table, ``ParameterConstraints`` with our pooling factor and all the sharding types
  our plan format holds (:data:`SHARDING_TYPES`: table-, column-, row-, table-row-wise and
  data-parallel) and kernels (:data:`COMPUTE_KERNELS`: ``fused``, ``fused_uvm_caching``,
  and ``dense``, the one TorchRec's data-parallel tables run on), narrowed by the
  ``constraints`` given (types and kernels; TorchRec has no device pins or co-location,
  so those are refused with :class:`~neuroshard.types.ConstraintError`);
* the cluster's optimizer as the sharder's fused optimizer, so TorchRec's storage
  estimate counts its state;
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
from collections.abc import Sequence
from dataclasses import replace

from neuroshard.types import (
    Cluster,
    ConstraintError,
    Constraints,
    CostEstimator,
    Plan,
    PlanInfeasibleError,
    TableSpec,
)

logger = logging.getLogger(__name__)

SHARDING_TYPES = ("table_wise", "column_wise", "row_wise", "table_row_wise", "data_parallel")
COMPUTE_KERNELS = ("fused", "fused_uvm_caching", "dense")
_OPTIMIZERS = {"sgd": "EXACT_SGD", "rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD", "adam": "ADAM"}
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


def torchrec_plan(
    tables: Sequence[TableSpec],
    cluster: Cluster,
    estimator: CostEstimator,
    *,
    seed: int = 0,
    budget_s: float | None = None,
    cost_source: str = "torchrec",
    compute_device: str = "cuda",
    constraints: Constraints | None = None,
) -> Plan:
    """TorchRec's plan for ``tables`` on ``cluster``, costed by ``estimator``.

    ``seed`` and ``budget_s`` are accepted for the searcher interface; TorchRec's planner
    is deterministic and has no time bound.
    ``cost_source`` picks the per-shard costs TorchRec searches with: its own analytic
    model (``"torchrec"``) or ``estimator`` through ``NeuroShardEstimator``
    (``"neuroshard"``). ``compute_device="cpu"`` plans against DDR caps instead of HBM.

    Raises :class:`PlanInfeasibleError` (TorchRec's reason, one line) when TorchRec finds
    no plan, :class:`~neuroshard.types.ConstraintError` for a device or host pin or a
    co-location (TorchRec's planner has neither).
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
    from torchrec.distributed.types import CacheParams

    from neuroshard.plan_io import validate_plan
    from neuroshard.torchrec_adapter import (
        NeuroShardEstimator,
        cluster_topology,
        from_sharding_plan,
        meta_ebc,
    )

    started = time.perf_counter()
    rules = constraints or Constraints()
    if rules.colocate:
        raise ConstraintError(
            f"TorchRec's planner cannot co-locate tables {[list(g) for g in rules.colocate]}"
        )
    ebc = meta_ebc(tables)
    topology = cluster_topology(cluster, compute_device)
    param_constraints = {}
    for t in tables:
        rule = rules.of(t.name)
        if rule.devices or rule.hosts:
            raise ConstraintError(
                f"table {t.name!r}: TorchRec's planner cannot pin a table to devices or hosts"
            )
        kinds = [k for k in SHARDING_TYPES if rule.allows_type(k)]
        kernels = [
            k
            for k in COMPUTE_KERNELS
            if rule.allows_kernel(k)
            and (k != "fused_uvm_caching" or min(cluster.host_budget_bytes) > 0)
        ]
        cache = {}
        if rule.cache_fraction is not None:
            cache["cache_params"] = CacheParams(load_factor=rule.cache_fraction)
        param_constraints[t.name] = ParameterConstraints(
            sharding_types=kinds,
            compute_kernels=kernels,
            pooling_factors=[float(t.pooling_factor)],
            **cache,
        )
    batch_size = max(1, cluster.batch_size // cluster.num_devices)
    enumerator = None
    if cost_source == "neuroshard":
        enumerator = EmbeddingEnumerator(
            topology=topology,
            batch_size=batch_size,
            constraints=param_constraints,
            estimator=[
                NeuroShardEstimator(
                    topology,
                    param_constraints,
                    estimator,
                    table_stats={t.name: t for t in tables},
                    batch_size=batch_size,
                ),
                EmbeddingStorageEstimator(topology=topology, constraints=param_constraints),
            ],
        )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        enumerator=enumerator,
        constraints=param_constraints,
        storage_reservation=FixedPercentageStorageReservation(cluster.hbm_reserve_fraction),
        stats=[],
        debug=False,
    )
    fused_params = None
    if cluster.optimizer != "sgd":
        from fbgemm_gpu.split_embedding_configs import EmbOptimType

        fused_params = {"optimizer": getattr(EmbOptimType, _OPTIMIZERS[cluster.optimizer])}
    try:
        sharding_plan = planner.plan(ebc, [EmbeddingBagCollectionSharder(fused_params)])
    except PlannerError as err:
        largest = sorted(tables, key=lambda t: -t.size_bytes)[:3]
        raise PlanInfeasibleError(
            f"TorchRec found no plan for {len(tables)} tables needing "
            f"{sum(t.size_bytes for t in tables)} bytes of weights (largest: "
            + ", ".join(f"{t.name!r} {t.size_bytes} bytes" for t in largest)
            + f") on {cluster.num_devices} devices of at most "
            f"{max(cluster.memory_per_device_bytes)} bytes; "
            f"TorchRec also budgets I/O buffers: {_one_line(str(err))}"
        ) from None
    plan = from_sharding_plan(sharding_plan, ebc, tables=tables, cluster=cluster)
    validate_plan(plan)
    seconds = time.perf_counter() - started
    logger.info(
        "torchrec (%s costs) planned %d tables on %d devices in %.2f s",
        cost_source,
        len(tables),
        cluster.num_devices,
        seconds,
    )
    return replace(plan, meta={"cost_source": cost_source})

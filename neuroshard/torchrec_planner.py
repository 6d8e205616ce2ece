"""NeuroShard as a TorchRec ``ShardingPlanner``.

Hand :class:`NeuroShardPlanner` to ``DistributedModelParallel(plan=planner.collective_plan(
model, sharders))`` instead of TorchRec's ``EmbeddingShardingPlanner``. It reads the
model's tables (:func:`~neuroshard.torchrec_adapter.table_specs`), plans them with
:class:`~neuroshard.planner.Planner` and converts the plan
(:func:`~neuroshard.torchrec_adapter.to_sharding_plan`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch.distributed as dist
from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingPlanner
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from neuroshard.models import resolve_cost_model
from neuroshard.planner import Planner
from neuroshard.torchrec_adapter import (
    TableStats,
    load_table_stats,
    table_specs,
    to_sharding_plan,
    topology_cluster,
)
from neuroshard.types import DEFAULT_BATCH_SIZE, CostEstimator, NeuroShardError, Plan, Searcher

logger = logging.getLogger(__name__)


class NeuroShardPlanner(ShardingPlanner):
    """A TorchRec ``ShardingPlanner`` that plans with NeuroShard.

    Args:
        topology: the devices; memory caps are HBM (``compute_device`` cuda) or DDR (cpu).
        table_stats: per-table pooling factors and reuse histograms (see
            :func:`load_table_stats`); tables without statistics fall back to
            ``constraints``' pooling factors, then 1.0.
        searcher: a registered searcher name or any :class:`~neuroshard.types.Searcher`.
        estimator: the cost model; default the shipped one for this device count and
            batch size (:func:`neuroshard.models.resolve_cost_model`).
        batch_size: global batch size the costs are for.
        constraints: TorchRec parameter constraints, read for pooling factors only.
        memory_headroom: fraction of each device's memory to leave unplanned.
        seed: passed to callable searchers.

    After :meth:`plan`, ``last_plan`` holds the NeuroShard :class:`Plan` (with its cost).
    """

    def __init__(self, topology: Topology, *,
                 table_stats: TableStats | str | Path | None = None,
                 searcher: str | Searcher = "neuroshard",
                 estimator: CostEstimator | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE,
                 constraints: Mapping[str, ParameterConstraints] | None = None,
                 memory_headroom: float = 0.0,
                 seed: int = 0) -> None:
        self.topology = topology
        self.table_stats = load_table_stats(table_stats)
        self.searcher = searcher
        self.estimator = estimator
        self.batch_size = batch_size
        self.constraints = dict(constraints or {})
        self.memory_headroom = memory_headroom
        self.seed = seed
        self.cluster = topology_cluster(topology, batch_size, memory_headroom)
        self.last_plan: Plan | None = None

    def _estimator(self) -> CostEstimator:
        if self.estimator is None:
            self.estimator = resolve_cost_model(num_devices=self.cluster.num_devices,
                                                batch_size=self.batch_size)
        return self.estimator

    def plan(self, module: nn.Module,
             sharders: Sequence[ModuleSharder[nn.Module]] | None = None) -> ShardingPlan:
        if sharders and not any(
            issubclass(s.module_type, EmbeddingBagCollection) for s in sharders
        ):
            raise NeuroShardError(
                "none of the sharders shards an EmbeddingBagCollection; NeuroShard plans "
                "EBC tables only"
            )
        tables = table_specs(module, self.table_stats, self.constraints)
        plan = Planner(self._estimator(), self.searcher, seed=self.seed).plan(tables,
                                                                              self.cluster)
        self.last_plan = plan
        if plan.cost is not None:
            logger.info("NeuroShard plan for %d tables on %d devices: %.3f ms by %s",
                        len(tables), self.cluster.num_devices, plan.cost.max_ms,
                        plan.cost.model)
        return to_sharding_plan(
            plan, module, device_type="cpu" if self.topology.compute_device == "cpu" else "cuda",
            local_world_size=self.topology.local_world_size,
        )

    def collective_plan(self, module: nn.Module,
                        sharders: Sequence[ModuleSharder[nn.Module]] | None = None,
                        pg: "dist.ProcessGroup | None" = None) -> ShardingPlan:
        """Plan on rank 0 of ``pg`` (default: the world) and broadcast to every rank."""
        if not dist.is_initialized():
            raise NeuroShardError("collective_plan needs an initialized process group; "
                                  "use plan() in a single process")
        group = pg if pg is not None else dist.group.WORLD
        box: list[ShardingPlan | None] = [None]
        if dist.get_rank(group) == 0:
            box[0] = self.plan(module, sharders)
        if dist.get_world_size(group) > 1:
            dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        if box[0] is None:
            raise NeuroShardError("rank 0 sent no sharding plan")
        return box[0]

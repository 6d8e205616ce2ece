"""NeuroShard: embedding-table sharding for DLRMs with pre-trained neural cost models."""

from neuroshard.types import (
    Cluster,
    CostEstimator,
    DeviceCost,
    HardwareBackend,
    ModelMismatchError,
    NeuroShardError,
    Plan,
    PlanCost,
    PlanInfeasibleError,
    Searcher,
    Shard,
    TableSpec,
    TableSpecError,
)

__version__ = "0.1.0"

__all__ = [
    "Cluster",
    "CostEstimator",
    "DeviceCost",
    "HardwareBackend",
    "ModelMismatchError",
    "NeuroShardError",
    "Plan",
    "PlanCost",
    "PlanInfeasibleError",
    "Searcher",
    "Shard",
    "TableSpec",
    "TableSpecError",
]

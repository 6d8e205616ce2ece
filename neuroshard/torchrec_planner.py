"""NeuroShard as a TorchRec ``ShardingPlanner``.

Hand :class:`NeuroShardPlanner` to ``DistributedModelParallel(plan=planner.collective_plan(
model, sharders))`` instead of TorchRec's ``EmbeddingShardingPlanner``. It plans every
table of every ``EmbeddingBagCollection`` and ``EmbeddingCollection`` in the model, at any
depth (:func:`~neuroshard.torchrec_adapter.table_specs`), with
:class:`~neuroshard.planner.Planner`, under the model's ``ParameterConstraints`` and
NeuroShard's own placement :class:`~neuroshard.types.Constraints`, and converts the plan
(:func:`~neuroshard.torchrec_adapter.to_sharding_plan`).

A constraint is honoured or refused, never overridden in silence: what the planner cannot
place raises :class:`~neuroshard.types.ConstraintError` naming the table and the
constraint, and every constrained table gets a log line saying how it was placed.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingPlanner

from neuroshard.models.registry import resolve_cost_model
from neuroshard.planner import Planner
from neuroshard.search import get_searcher
from neuroshard.torchrec_adapter import (
    ModuleTable,
    TableStats,
    bind_batch_size,
    embedding_modules,
    load_table_stats,
    module_tables,
    table_spec,
    to_sharding_plan,
    topology_cluster,
)
from neuroshard.types import (
    COMPUTE_KERNELS,
    DEFAULT_RESERVE_FRACTION,
    SHARDING_TYPES,
    ConstraintError,
    Constraints,
    CostEstimator,
    NeuroShardError,
    Plan,
    Searcher,
    TableConstraint,
)

logger = logging.getLogger(__name__)

# TorchRec's sharding types and kernels by the name NeuroShard plans them under. TorchRec's
# table_column_wise (column shards placed table-wise) is a column-wise plan to us; its
# grid_shard, fused_uvm (no HBM cache) and key-value / virtual-table kernels have no
# counterpart and are refused when nothing else is allowed.
TORCHREC_TYPES = {
    "table_wise": "table_wise",
    "column_wise": "column_wise",
    "table_column_wise": "column_wise",
    "row_wise": "row_wise",
    "table_row_wise": "table_row_wise",
    "data_parallel": "data_parallel",
}
TORCHREC_KERNELS = {k: k for k in ("fused", "fused_uvm_caching", "dense")}

# ParameterConstraints fields that only configure the kernel: copied into the table's
# ParameterSharding as TorchRec's own planner does.
_PASSED_THROUGH = (
    "cache_params",
    "enforce_hbm",
    "stochastic_rounding",
    "bounds_check_mode",
    "output_dtype",
)


@dataclasses.dataclass(frozen=True)
class TableRules:
    """What one table may be, merged from the sharders, ``ParameterConstraints`` and
    NeuroShard's constraints: the (sharding type, kernel) pairs allowed (NeuroShard
    names), the constraint handed to the planner and ``min_partition``."""

    table: ModuleTable
    pairs: frozenset[tuple[str, str]]
    constraint: TableConstraint
    min_partition: int | None = None
    asked: str = ""  # the user's constraint, as the log line and errors quote it


def _describe(pc: ParameterConstraints | None, own: TableConstraint | None) -> str:
    parts = []
    if pc is not None:
        for name in (
            "sharding_types",
            "compute_kernels",
            "min_partition",
            "cache_params",
            "enforce_hbm",
        ):
            value = getattr(pc, name)
            if value is not None:
                parts.append(f"{name}={value!r}")
    if own is not None:
        for name in ("sharding_types", "compute_kernels", "devices", "hosts", "cache_fraction"):
            value = getattr(own, name)
            if value not in ((), None):
                parts.append(f"{name}={list(value) if isinstance(value, tuple) else value!r}")
    return ", ".join(parts)


def _offered(
    table: ModuleTable,
    module: nn.Module,
    sharders: Sequence[ModuleSharder[Any]],
    compute_device: str,
) -> set[tuple[str, str]]:
    """TorchRec (type, kernel) pairs the sharder for ``module`` offers on the device."""
    for sharder in sharders:
        if isinstance(module, sharder.module_type):
            return {
                (t, k)
                for t in sharder.sharding_types(compute_device)
                for k in sharder.compute_kernels(t, compute_device)
            }
    raise NeuroShardError(
        f"no sharder for the {type(module).__name__} at {table.path!r} (table "
        f"{table.key!r}); pass one for it (e.g. torchrec's "
        f"{type(module).__name__}Sharder()), or DMP would leave the module unsharded"
    )


def table_rules(
    table: ModuleTable,
    module: nn.Module,
    sharders: Sequence[ModuleSharder[Any]],
    compute_device: str,
    pc: ParameterConstraints | None,
    own: TableConstraint | None,
) -> TableRules:
    """The rules of one table; :class:`ConstraintError` naming the table and the
    constraint when the constraints, the sharder and NeuroShard leave nothing allowed or
    ask for what NeuroShard cannot place."""
    asked = _describe(pc, own)
    where = f"table {table.key!r}" + (f" ({asked})" if asked else "")
    if pc is not None:
        if pc.key_value_params is not None or pc.use_virtual_table:
            raise ConstraintError(
                f"{where}: key-value and virtual tables are not placed by "
                "NeuroShard; plan this table with TorchRec's planner"
            )
        if pc.device_group is not None and pc.device_group != compute_device:
            raise ConstraintError(
                f"{where}: device_group={pc.device_group!r}, the topology's "
                f"devices are {compute_device!r}"
            )
    offered = _offered(table, module, sharders, compute_device)
    pairs = set(offered)
    if pc is not None and pc.sharding_types:
        pairs = {(t, k) for t, k in pairs if t in pc.sharding_types}
        if not pairs:
            raise ConstraintError(
                f"{where}: the {type(module).__name__} sharder offers sharding types "
                f"{sorted({t for t, _ in offered})} on {compute_device}"
            )
    if pc is not None and pc.compute_kernels:
        pairs = {(t, k) for t, k in pairs if k in pc.compute_kernels}
        if not pairs:
            raise ConstraintError(
                f"{where}: the sharder offers no such kernel for the allowed sharding types "
                f"on {compute_device} (it offers {sorted({k for _, k in offered})})"
            )
    ours = {
        (TORCHREC_TYPES[t], TORCHREC_KERNELS[k])
        for t, k in pairs
        if t in TORCHREC_TYPES and k in TORCHREC_KERNELS
    }
    if own is not None:
        ours = {(t, k) for t, k in ours if own.allows_type(t) and own.allows_kernel(k)}
    if not ours:
        raise ConstraintError(
            f"{where}: NeuroShard places sharding types {sorted(set(TORCHREC_TYPES))} with "
            f"kernels {sorted(TORCHREC_KERNELS)} (and dense only data-parallel, as TorchRec); "
            f"these constraints allow only {sorted(pairs)}. Drop or widen the constraint, or "
            "plan this table with TorchRec's planner"
        )
    dropped = {(t, k) for t, k in pairs if t not in TORCHREC_TYPES or k not in TORCHREC_KERNELS}
    if dropped and asked:
        logger.info(
            "%s: NeuroShard does not place %s; choosing among %s",
            where,
            sorted(dropped),
            sorted(ours),
        )
    types = tuple(sorted({t for t, _ in ours}))
    kernels = tuple(sorted({k for _, k in ours}))
    cache_fraction = own.cache_fraction if own is not None else None
    if cache_fraction is None and pc is not None and pc.cache_params is not None:
        cache_fraction = pc.cache_params.load_factor
    constraint = TableConstraint(
        sharding_types=() if set(types) == set(SHARDING_TYPES) else types,
        compute_kernels=() if set(kernels) == set(COMPUTE_KERNELS) else kernels,
        devices=own.devices if own is not None else (),
        hosts=own.hosts if own is not None else (),
        cache_fraction=cache_fraction,
    )
    return TableRules(
        table, frozenset(ours), constraint, pc.min_partition if pc is not None else None, asked
    )


def check_plan(plan: Plan, rules: Mapping[str, TableRules]) -> None:
    """Raise :class:`ConstraintError` naming the table and the constraint for every way
    ``plan`` breaks ``rules``; log how each constrained table was placed."""
    for name, rule in rules.items():
        shards = plan.shards_of(name)
        kind = plan.sharding_type_of(name)
        kernels = {s.compute_kernel for s in shards}
        devices = sorted({s.device for s in shards})
        where = f"table {name!r}" + (f" ({rule.asked})" if rule.asked else "")
        # TorchRec runs every data-parallel replica on its dense kernel, whatever ours says
        pairs = {(kind, "dense" if kind == "data_parallel" else k) for k in kernels}
        bad = sorted(pairs - rule.pairs)
        if bad:
            raise ConstraintError(f"{where}: planned as {bad}, allowed {sorted(rule.pairs)}")
        allowed = rule.constraint.allowed_devices(plan.cluster)
        off = [d for d in devices if d not in allowed]
        if off:
            raise ConstraintError(f"{where}: planned on devices {off}, allowed {list(allowed)}")
        if rule.min_partition and kind == "column_wise":
            narrow = [s.width for s in shards if s.width < rule.min_partition]
            if narrow:
                raise ConstraintError(
                    f"{where}: the plan splits it into column shards {narrow} wide, narrower "
                    f"than min_partition={rule.min_partition} (NeuroShard's searchers do not "
                    "take min_partition: allow table_wise only, or drop min_partition)"
                )
        if rule.asked:
            logger.info(
                "%s honoured: %s, kernel %s, on devices %s",
                where,
                kind,
                "/".join(sorted(kernels)),
                devices,
            )


class NeuroShardPlanner(ShardingPlanner):
    """A TorchRec ``ShardingPlanner`` that plans with NeuroShard.

    Args:
        topology: the devices; memory caps are HBM (``compute_device`` cuda) or DDR (cpu),
            ``local_world_size`` devices per host.
        batch_size: TorchRec's batch size, per rank (None: the cost model's own batch);
            the costs are for ``batch_size * world_size`` samples.
        constraints: TorchRec ``ParameterConstraints`` by table name (or ``path.name``):
            sharding types, compute kernels, per-feature pooling factors (with
            ``num_poolings`` and ``batch_sizes``), ``min_partition``, cache and kernel
            parameters. See :func:`table_rules` for what is refused.
        placement: NeuroShard's own constraints by table key (device or host pins, types,
            kernels, cache fraction) and tables that must share a device.
        table_stats: per-table pooling factors (or per-feature ones) and reuse histograms
            (see :func:`~neuroshard.torchrec_adapter.load_table_stats`); they win over
            ``constraints``' pooling factors.
        searcher: a registered searcher name or any :class:`~neuroshard.types.Searcher`.
        estimator: the cost model; default the shipped one measured on the topology's
            compute device, nearest its world size
            (:func:`neuroshard.models.registry.resolve_cost_model`). It must cover the
            global batch asked (:func:`~neuroshard.torchrec_adapter.bind_batch_size`).
        reserve: fraction of each device's memory kept for what is not embeddings
            (default :data:`~neuroshard.types.DEFAULT_RESERVE_FRACTION`, TorchRec's 15%).
        io_buffers: count each shard's input and output buffers in its memory, as
            TorchRec's storage estimate does (default True;
            :func:`~neuroshard.types.io_buffer_bytes`).
        budget_s: seconds the search may take (None: the searcher's own pace).
        seed: passed to the searcher.

    After :meth:`plan`, ``last_plan`` holds the NeuroShard :class:`Plan` (with its cost).
    """

    def __init__(
        self,
        topology: Topology,
        *,
        batch_size: int | None = None,
        constraints: Mapping[str, ParameterConstraints] | None = None,
        placement: Constraints | None = None,
        table_stats: TableStats | str | Path | None = None,
        searcher: str | Searcher = "neuroshard",
        estimator: CostEstimator | None = None,
        reserve: float = DEFAULT_RESERVE_FRACTION,
        io_buffers: bool = True,
        budget_s: float | None = None,
        seed: int = 0,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise NeuroShardError(f"batch_size must be a positive per-rank batch, got {batch_size}")
        if not 0.0 <= reserve < 1.0:
            raise NeuroShardError(f"reserve must be a fraction in [0, 1), got {reserve}")
        self.topology = topology
        self.batch_size = batch_size
        self.constraints = dict(constraints or {})
        self.placement = placement or Constraints()
        self.table_stats = load_table_stats(table_stats)
        self.searcher = searcher
        self.estimator = estimator
        self.reserve = reserve
        self.io_buffers = io_buffers
        self.budget_s = budget_s
        self.seed = seed
        self.last_plan: Plan | None = None

    @property
    def compute_device(self) -> str:
        return str(self.topology.compute_device)

    def cost_model(self) -> CostEstimator:
        """The estimator plans are priced with, checked against the batch asked."""
        if self.estimator is None:
            self.estimator = resolve_cost_model(
                num_devices=self.topology.world_size, compute_device=self.compute_device
            )
        return bind_batch_size(self.estimator, self.batch_size, self.topology.world_size)

    def plan(
        self, module: nn.Module, sharders: Sequence[ModuleSharder[nn.Module]] | None = None
    ) -> ShardingPlan:
        """The ShardingPlan of every embedding table in ``module`` (``sharders``: default
        TorchRec's, as ``DistributedModelParallel`` uses)."""
        if not sharders:
            from torchrec.distributed.sharding_plan import get_default_sharders

            sharders = get_default_sharders()
        estimator = self.cost_model()
        world = self.topology.world_size
        cluster = topology_cluster(self.topology, int(estimator.batch_size))
        modules = embedding_modules(module)
        tables = module_tables(module)
        specs, rules = [], {}
        for key, table in tables.items():
            pc = self.constraints.get(key, self.constraints.get(table.name))
            specs.append(
                table_spec(
                    table,
                    self.table_stats.get(key, self.table_stats.get(table.name)),
                    pc,
                    per_rank_batch_size=cluster.per_rank_batch_size,
                )
            )
            own = self.placement.tables.get(key)
            rules[key] = table_rules(
                table, modules[table.path], sharders, self.compute_device, pc, own
            )
        _unknown_keys(self.constraints, tables, "ParameterConstraints")
        _unknown_keys(self.placement.tables, tables, "placement constraints", by_name=False)
        constraints = Constraints(
            tables={k: r.constraint for k, r in rules.items() if r.constraint != TableConstraint()},
            colocate=self.placement.colocate,
        )
        constraints.check(specs, cluster)
        search = get_searcher(self.searcher) if isinstance(self.searcher, str) else self.searcher
        if not _takes_constraints(search):  # checked after, by check_plan
            logger.info(
                "searcher %s takes no constraints: its plan is checked against them",
                getattr(search, "__name__", type(search).__name__),
            )
        planner = Planner(
            estimator,
            self.searcher,
            budget_s=self.budget_s,
            seed=self.seed,
            reserve=self.reserve,
            io_buffers=self.io_buffers,
            constraints=constraints if _takes_constraints(search) else None,
        )
        plan = planner.plan(specs, cluster)
        check_plan(plan, rules)
        for group in constraints.colocate:
            devices = sorted({s.device for name in group for s in plan.shards_of(name)})
            if len(devices) != 1:
                raise ConstraintError(
                    f"tables {list(group)} must share a device; planned on devices {devices}"
                )
            logger.info("tables %s co-located on device %d, as asked", list(group), devices[0])
        self.last_plan = plan
        if plan.cost is not None:
            logger.info(
                "NeuroShard plan for %d tables in %d modules on %d devices: %.3f ms by %s",
                len(specs),
                len(modules),
                world,
                plan.cost.max_ms,
                plan.cost.model,
            )
        sharding_plan = to_sharding_plan(
            plan,
            module,
            device_type="cpu" if self.compute_device == "cpu" else "cuda",
            local_world_size=self.topology.local_world_size,
        )
        return _pass_through(sharding_plan, tables, self.constraints)

    def collective_plan(
        self,
        module: nn.Module,
        sharders: Sequence[ModuleSharder[nn.Module]] | None = None,
        pg: dist.ProcessGroup | None = None,
    ) -> ShardingPlan:
        """Plan on rank 0 of ``pg`` (default: the world) and broadcast to every rank."""
        if not dist.is_initialized():
            raise NeuroShardError(
                "collective_plan needs an initialized process group; use plan() in a single process"
            )
        group = pg if pg is not None else dist.group.WORLD
        box: list[ShardingPlan | None] = [None]
        if dist.get_rank(group) == 0:
            box[0] = self.plan(module, sharders)
        if dist.get_world_size(group) > 1:
            src = dist.get_global_rank(group, 0)  # type: ignore[arg-type]  # WORLD when None
            dist.broadcast_object_list(box, src=src, group=group)
        if box[0] is None:
            raise NeuroShardError("rank 0 sent no sharding plan")
        return box[0]


def _takes_constraints(search: Searcher) -> bool:
    """Whether ``search`` accepts a ``constraints`` keyword."""
    try:
        params = inspect.signature(search).parameters
    except (TypeError, ValueError):
        return False
    return "constraints" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _unknown_keys(
    given: Mapping[str, Any], tables: Mapping[str, ModuleTable], what: str, *, by_name: bool = True
) -> None:
    known = set(tables) | ({t.name for t in tables.values()} if by_name else set())
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConstraintError(
            f"{what} name tables the model does not have: "
            f"{', '.join(map(repr, unknown))} (its tables: "
            f"{', '.join(map(repr, tables))})"
        )


def _pass_through(
    sharding_plan: ShardingPlan,
    tables: Mapping[str, ModuleTable],
    constraints: Mapping[str, ParameterConstraints],
) -> ShardingPlan:
    """Copy each constraint's kernel settings (:data:`_PASSED_THROUGH`) into its table's
    ParameterSharding, as TorchRec's planner does."""
    for key, table in tables.items():
        pc = constraints.get(key, constraints.get(table.name))
        if pc is None:
            continue
        module_plan: Any = sharding_plan.plan[table.path]
        ps = module_plan[table.name]
        module_plan[table.name] = dataclasses.replace(
            ps, **{f: getattr(pc, f) for f in _PASSED_THROUGH if getattr(pc, f) is not None}
        )
    return sharding_plan

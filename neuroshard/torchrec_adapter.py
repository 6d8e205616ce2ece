"""NeuroShard inside TorchRec: plan conversion and a shard estimator.

Bridges between :class:`~neuroshard.types.Plan` and TorchRec 1.9 (the drop-in planner,
:class:`~neuroshard.torchrec_planner.NeuroShardPlanner`, builds on them):

* :func:`to_sharding_plan` / :func:`from_sharding_plan` convert between our plan (column
  shards on devices) and TorchRec's :class:`~torchrec.distributed.types.ShardingPlan`
  (per-module, per-table :class:`~torchrec.distributed.types.ParameterSharding`), so a
  NeuroShard plan runs under ``DistributedModelParallel`` and a TorchRec plan can be
  scored by our cost models and backends.
* :class:`NeuroShardEstimator` is a TorchRec ``ShardEstimator`` backed by any NeuroShard
  :class:`~neuroshard.types.CostEstimator`, so TorchRec's own proposers and partitioner
  can search with our learned costs.

Our plan format holds table-wise and column-wise placements only; TorchRec plans that
split rows (``row_wise``, ``table_row_wise``, ``grid_shard``) or replicate
(``data_parallel``) are refused with a :class:`~neuroshard.types.PlanFormatError`.

TorchRec facts this module relies on (TorchRec 1.9.2): ``compute_kernel="fused"`` must be
set explicitly; uneven column widths need hand-built ``ShardMetadata``; every column
shard is a multiple of 4 wide; several shards of one table may share a rank; the i-th
entry of ``ranks`` goes with the i-th ``ShardMetadata``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from neuroshard.models import resolve_cost_model
from neuroshard.types import (
    BYTES_PER_FLOAT,
    DEFAULT_BATCH_SIZE,
    DIM_MULTIPLE,
    DLRM_REUSE_HIST,
    Cluster,
    CostEstimator,
    NeuroShardError,
    Plan,
    PlanFormatError,
    Shard,
    TableSpec,
    TableSpecError,
)

try:
    import torch
    from torch import nn
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
    from torchrec.distributed.planner.types import (
        ParameterConstraints,
        Perf,
        ShardEstimator,
        ShardingOption,
        Topology,
    )
    from torchrec.distributed.types import (
        EmbeddingModuleShardingPlan,
        ParameterSharding,
        ShardingPlan,
        ShardingType,
    )
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "neuroshard.torchrec_adapter needs torch and torchrec: "
        "pip install 'neuroshard[torchrec]'"
    ) from err

logger = logging.getLogger(__name__)

TableStats = Mapping[str, Union[TableSpec, Mapping[str, Any]]]

FUSED_KERNEL = "fused"

# Sharding types whose shards are whole-row column ranges, i.e. expressible as our plan.
_COLUMN_TYPES = {
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
}

# Share of a shard's fused forward+backward compute attributed to the forward pass when
# our single compute number is split into TorchRec's Perf fields. 1/3 forward, 2/3
# backward mirrors TorchRec's own convention (backward = 2x forward,
# BWD_COMPUTE_MULTIPLIER); only the sum matters to TorchRec's partitioner and proposers.
FWD_COMPUTE_SHARE = 1.0 / 3.0


# --------------------------------------------------------------------------- module tables


def embedding_bag_collections(module: nn.Module) -> dict[str, EmbeddingBagCollection]:
    """Every :class:`EmbeddingBagCollection` in ``module`` by its fully qualified path.

    The module itself, when it is an EBC, has the path ``""``.
    """
    return {
        path: sub for path, sub in module.named_modules()
        if isinstance(sub, EmbeddingBagCollection)
    }


def _module_tables(module: nn.Module) -> dict[str, tuple[str, EmbeddingBagConfig]]:
    """Table name -> (EBC path, config), in module order; table names must be unique."""
    found: dict[str, tuple[str, EmbeddingBagConfig]] = {}
    for path, ebc in embedding_bag_collections(module).items():
        for config in ebc.embedding_bag_configs():
            if config.name in found:
                raise TableSpecError(
                    f"appears in two EmbeddingBagCollections ({found[config.name][0]!r} and "
                    f"{path!r}); NeuroShard plans need unique table names",
                    table=config.name,
                )
            found[config.name] = (path, config)
    if not found:
        raise NeuroShardError(
            f"{type(module).__name__} holds no EmbeddingBagCollection to shard"
        )
    return found


def _rows(config: EmbeddingBagConfig) -> int:
    return int(config.num_embeddings)


def _check_shape(spec: TableSpec, config: EmbeddingBagConfig, what: str) -> None:
    if spec.dim != config.embedding_dim:
        raise TableSpecError(
            f"{what} says dim {spec.dim}, the module's table is {config.embedding_dim} wide",
            table=spec.name, field_name="dim",
        )
    if spec.rows != _rows(config):
        raise TableSpecError(
            f"{what} says {spec.rows} rows, the module's table has {_rows(config)}",
            table=spec.name, field_name="rows",
        )


def _check_columns(name: str, dim: int, shards: Sequence[Shard]) -> None:
    """Shards sorted by start must tile ``[0, dim)`` exactly once."""
    edges = [0] + [s.end for s in shards]
    if any(s.start != edge or s.end <= s.start for s, edge in zip(shards, edges)) \
            or edges[-1] != dim:
        raise PlanFormatError(
            f"table {name!r}: shards {[(x.start, x.end) for x in shards]} do not cover "
            f"columns [0, {dim}) exactly once"
        )


# --------------------------------------------------------------------------- conversion


def _placement(rank: int, device_type: str, local_world_size: int) -> str:
    """TorchRec's placement string: ``rank:R/cpu`` or ``rank:R/cuda:L`` (L = local index)."""
    if device_type == "cpu":
        return f"rank:{rank}/cpu"
    return f"rank:{rank}/{device_type}:{rank % local_world_size}"


def to_sharding_plan(plan: Plan, module: nn.Module, *, device_type: str = "cpu",
                     compute_kernel: str = FUSED_KERNEL,
                     local_world_size: int | None = None) -> ShardingPlan:
    """TorchRec :class:`ShardingPlan` placing ``module``'s tables as ``plan`` says.

    Tables are matched by name across every :class:`EmbeddingBagCollection` in
    ``module``; each becomes a ``table_wise`` :class:`ParameterSharding` (one shard over
    all columns) or a ``column_wise`` one (one ``ShardMetadata`` per column shard, in
    column order, uneven widths and repeated ranks allowed). ``local_world_size`` (devices
    per host, default all) only shapes ``cuda`` placements (``rank:R/cuda:R % local``).

    Raises :class:`TableSpecError` when the module and the plan disagree on which tables
    exist or on their shapes, :class:`PlanFormatError` when shards do not tile a table's
    columns or a column shard is not a multiple of 4 wide.
    """
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    local = local_world_size or plan.cluster.num_devices
    module_tables = _module_tables(module)
    plan_names = [t.name for t in plan.tables]
    missing = [n for n in module_tables if n not in set(plan_names)]
    extra = [n for n in plan_names if n not in module_tables]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"module tables missing from the plan: {', '.join(missing)}")
        if extra:
            parts.append(f"plan tables not in the module: {', '.join(extra)}")
        raise TableSpecError("; ".join(parts))

    modules: dict[str, EmbeddingModuleShardingPlan] = {}
    for spec in plan.tables:
        path, config = module_tables[spec.name]
        _check_shape(spec, config, "the plan")
        shards = plan.shards_of(spec.name)
        _check_columns(spec.name, spec.dim, shards)
        for s in shards:
            if not 0 <= s.device < plan.cluster.num_devices:
                raise PlanFormatError(
                    f"table {spec.name!r}: shard on device {s.device}, the plan has "
                    f"{plan.cluster.num_devices} devices"
                )
        rows = _rows(config)
        if len(shards) == 1:
            sharding_type = ShardingType.TABLE_WISE.value
        else:
            sharding_type = ShardingType.COLUMN_WISE.value
            odd = [s for s in shards if s.width % DIM_MULTIPLE]
            if odd:
                raise PlanFormatError(
                    f"table {spec.name!r}: column shards {[(s.start, s.end) for s in odd]} are "
                    f"not a multiple of {DIM_MULTIPLE} wide (TorchRec's fused kernel needs it)"
                )
        metadata = [
            ShardMetadata(
                shard_offsets=[0, s.start],
                shard_sizes=[rows, s.width],
                placement=_placement(s.device, device_type, local),
            )
            for s in shards
        ]
        modules.setdefault(path, EmbeddingModuleShardingPlan())[spec.name] = ParameterSharding(
            sharding_type=sharding_type,
            compute_kernel=compute_kernel,
            ranks=[s.device for s in shards],
            sharding_spec=EnumerableShardingSpec(metadata),
        )
    return ShardingPlan(plan=dict(modules))


def meta_ebc(tables: Sequence[TableSpec]) -> EmbeddingBagCollection:
    """An :class:`EmbeddingBagCollection` with ``tables``' shapes on the meta device (no memory)."""
    return EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=t.name, num_embeddings=t.rows, embedding_dim=t.dim,
                                   feature_names=[f"{t.name}__feature"]) for t in tables],
        device=torch.device("meta"),
    )


def save_sharding_plan(plan: Plan, path: str | Path, *, module_path: str = "",
                       device_type: str = "cpu") -> ShardingPlan:
    """Write ``plan`` as a TorchRec :class:`ShardingPlan` with ``torch.save``.

    Without the user's model, the plan is keyed for one EmbeddingBagCollection at
    ``module_path`` ("" when the EBC is the model itself) holding every table. Load it
    with ``torch.load(path, weights_only=False)``: a ShardingPlan is a pickled object.
    """
    sharding_plan = to_sharding_plan(plan, meta_ebc(plan.tables), device_type=device_type)
    if module_path:
        sharding_plan = ShardingPlan({module_path: sharding_plan.plan[""]})
    try:
        torch.save(sharding_plan, path)
    except OSError as e:
        raise NeuroShardError(f"{path}: cannot write: {e.strerror or e}") from None
    return sharding_plan


def from_sharding_plan(sharding_plan: ShardingPlan, module: nn.Module,
                       tables: Sequence[TableSpec] | None = None,
                       cluster: Cluster | None = None) -> Plan:
    """Our :class:`Plan` for a TorchRec ``ShardingPlan`` of ``module``'s tables.

    ``tables`` supplies pooling factors and reuse histograms (and the table order); a
    table not in it gets pooling factor 1.0 and the dataset-wide histogram. Without
    ``cluster``, the plan gets ``highest rank + 1`` devices, each capped at the plan's
    largest per-device footprint (feasible by construction) -- pass the real cluster to
    check memory. Shards come out in table order, then column order, so a round trip
    ``from_sharding_plan(to_sharding_plan(p, m), m, p.tables, p.cluster) == p`` holds
    for plans listed that way.

    Raises :class:`PlanFormatError` for row-splitting or replicated sharding types,
    which our column/table-only format cannot express, and :class:`TableSpecError` when
    the plan, ``tables`` and the module disagree.
    """
    module_tables = _module_tables(module)
    given = {t.name: t for t in tables or ()}
    shards: dict[str, list[Shard]] = {}
    for path, module_plan in sharding_plan.plan.items():
        if not isinstance(module_plan, Mapping):
            raise PlanFormatError(
                f"module {path!r}: {type(module_plan).__name__} is not an embedding module plan"
            )
        for name, ps in module_plan.items():
            if name not in module_tables:
                raise TableSpecError(f"module {path!r} of the sharding plan has it, "
                                     "the module does not", table=name)
            shards[name] = _shards_of(name, module_tables[name][1], ps)

    unplanned = [n for n in given if n not in shards]
    if unplanned:
        raise TableSpecError(f"tables with no entry in the sharding plan: {', '.join(unplanned)}")
    order = list(given) if tables is not None else [n for n in module_tables if n in shards]
    order += [n for n in module_tables if n in shards and n not in order]

    specs = []
    for name in order:
        config = module_tables[name][1]
        if name in given:
            _check_shape(given[name], config, "the table list")
            specs.append(given[name])
        else:
            specs.append(TableSpec(name=name, rows=_rows(config), dim=config.embedding_dim))
    all_shards = tuple(s for name in order for s in shards[name])

    num_devices = max(s.device for s in all_shards) + 1
    if cluster is None:
        mem = [0] * num_devices
        for s in all_shards:
            mem[s.device] += _rows(module_tables[s.table][1]) * s.width * BYTES_PER_FLOAT
        cluster = Cluster.uniform(num_devices, max(mem), DEFAULT_BATCH_SIZE)
    elif num_devices > cluster.num_devices:
        raise PlanFormatError(
            f"the sharding plan uses rank {num_devices - 1}, the cluster has "
            f"{cluster.num_devices} devices"
        )
    return Plan(tables=tuple(specs), shards=all_shards, cluster=cluster,
                meta={"source": "torchrec.ShardingPlan"})


def _shards_of(name: str, config: EmbeddingBagConfig, ps: ParameterSharding) -> list[Shard]:
    if ps.sharding_type not in _COLUMN_TYPES:
        raise PlanFormatError(
            f"table {name!r} is {ps.sharding_type}; NeuroShard plans hold table-wise and "
            "column-wise placements only (no row splits, no replication)"
        )
    rows, dim = _rows(config), int(config.embedding_dim)
    spec = ps.sharding_spec
    if spec is None:
        if ps.sharding_type != ShardingType.TABLE_WISE.value or not ps.ranks:
            raise PlanFormatError(f"table {name!r}: {ps.sharding_type} without a sharding spec")
        return [Shard(name, 0, dim, int(ps.ranks[0]))]
    if not isinstance(spec, EnumerableShardingSpec):
        raise PlanFormatError(
            f"table {name!r}: sharding spec {type(spec).__name__} is not enumerable"
        )
    out = []
    for i, md in enumerate(spec.shards):
        row_off, col_off = (int(x) for x in md.shard_offsets)
        n_rows, width = (int(x) for x in md.shard_sizes)
        if row_off != 0 or n_rows != rows:
            raise PlanFormatError(
                f"table {name!r}: shard {i} holds rows [{row_off}, {row_off + n_rows}) of "
                f"{rows}; NeuroShard plans split columns only"
            )
        rank = md.placement.rank() if md.placement is not None else None
        if rank is None:
            if not ps.ranks or i >= len(ps.ranks):
                raise PlanFormatError(f"table {name!r}: shard {i} has no rank")
            rank = ps.ranks[i]
        out.append(Shard(name, col_off, col_off + width, int(rank)))
    out.sort(key=lambda s: s.start)
    _check_columns(name, dim, out)
    return out


@torch.no_grad()
def copy_unsharded_weights(sharded: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy full (unsharded) tensors of ``state_dict`` into ``sharded``'s local shards.

    Needed on CPU: TorchRec 1.9.2's ``DistributedModelParallel`` copies an unsharded
    module's weights into its shards only when that module is on an accelerator, so a CPU
    model starts from fresh random shards; and ``load_state_dict`` with full tensors
    fails when one rank holds two column shards of a table with different widths. Keys
    are ``sharded.state_dict()``'s; each local shard receives its slice of the full
    tensor (the shards are views of the fused kernel's weights). Returns the keys of
    ``sharded`` that ``state_dict`` lacks.
    """
    missing = []
    for key, target in sharded.state_dict().items():
        if key not in state_dict:
            missing.append(key)
            continue
        full = state_dict[key]
        if hasattr(target, "local_shards"):
            for shard in target.local_shards():
                r0, c0 = shard.metadata.shard_offsets
                nr, nc = shard.metadata.shard_sizes
                shard.tensor.copy_(full[r0:r0 + nr, c0:c0 + nc])
        else:
            target.copy_(full)
    return missing


# --------------------------------------------------------------------------- table stats


def load_table_stats(source: TableStats | str | Path | None) -> dict[str, dict[str, Any]]:
    """Per-table ``pooling_factor`` / ``reuse_hist`` (and ``rows`` / ``dim`` when known).

    ``source`` is a mapping from table name to a :class:`TableSpec` or a dict with some
    of those keys, or the path of a table config (a profiler's ``tables.json``; any
    format :func:`neuroshard.tables.load_tables` reads).
    """
    if source is None:
        return {}
    if isinstance(source, (str, Path)):
        from neuroshard.tables import load_tables

        source = {t.name: t for t in load_tables(source)}
    out = {}
    for name, entry in source.items():
        if isinstance(entry, TableSpec):
            out[name] = {"pooling_factor": entry.pooling_factor,
                         "reuse_hist": tuple(entry.reuse_hist),
                         "rows": entry.rows, "dim": entry.dim}
        else:
            out[name] = _stats_entry(name, entry, None)
    return out


def _stats_entry(name: str, entry: Any, source: str | None) -> dict[str, Any]:
    """The keys ``entry`` gives, validated by :meth:`TableSpec.from_record` (a shape it
    lacks is filled with a placeholder for the check and left out of the result)."""
    if not isinstance(entry, Mapping):
        raise TableSpecError(f"expected an object, got {type(entry).__name__}",
                             source=source, table=name)
    record: dict[str, Any] = {**entry, "name": name}
    for key, alias, placeholder in (("rows", "num_embeddings", 1),
                                    ("dim", "embedding_dim", DIM_MULTIPLE)):
        if key not in record and alias not in record:
            record[key] = placeholder
    spec = TableSpec.from_record(record, source=source or "table statistics")
    stats: dict[str, Any] = {}
    if "pooling_factor" in entry or "features" in entry:
        stats["pooling_factor"] = spec.pooling_factor
    if entry.get("reuse_hist") is not None:
        stats["reuse_hist"] = spec.reuse_hist
    for key, alias in (("rows", "num_embeddings"), ("dim", "embedding_dim")):
        if key in entry or alias in entry:
            stats[key] = getattr(spec, key)
    return stats


def table_specs(module: nn.Module, table_stats: TableStats | str | Path | None = None,
                constraints: Mapping[str, ParameterConstraints] | None = None) -> list[TableSpec]:
    """A :class:`TableSpec` per table of ``module``'s EBCs, in module order.

    Shapes come from the module. Pooling factor: ``table_stats``, else the sum of the
    table's ``ParameterConstraints.pooling_factors`` (one per feature), else 1.0. Reuse
    histogram: ``table_stats``, else the dataset-wide default.
    """
    stats = load_table_stats(table_stats)
    specs = []
    for name, (_, config) in _module_tables(module).items():
        entry = stats.get(name, {})
        for key, actual in (("rows", _rows(config)), ("dim", int(config.embedding_dim))):
            if key in entry and entry[key] != actual:
                logger.warning("table %r: statistics say %s=%d, the module has %d; using the "
                               "module's", name, key, entry[key], actual)
        record: dict[str, Any] = {"name": name, "rows": _rows(config),
                                  "dim": int(config.embedding_dim)}
        if "pooling_factor" in entry:
            record["pooling_factor"] = entry["pooling_factor"]
        elif constraints and name in constraints and constraints[name].pooling_factors:
            record["pooling_factor"] = float(sum(constraints[name].pooling_factors))
        if "reuse_hist" in entry:
            record["reuse_hist"] = entry["reuse_hist"]
        specs.append(TableSpec.from_record(record, source="table statistics"))
    unused = sorted(set(stats) - {s.name for s in specs})
    if unused:
        logger.info("statistics for tables not in the module ignored: %s", ", ".join(unused))
    return specs


# --------------------------------------------------------------------------- topology


def topology_cluster(topology: Topology, batch_size: int = DEFAULT_BATCH_SIZE,
                     memory_headroom: float = 0.0) -> Cluster:
    """Our :class:`Cluster` for a TorchRec topology: HBM caps on accelerators, DDR on CPU.

    ``memory_headroom`` is the fraction of each device's memory kept free for the dense
    model, buffers and the like; ``batch_size`` is the global batch our cost model sees.
    """
    if not 0.0 <= memory_headroom < 1.0:
        raise ValueError(f"memory_headroom must be in [0, 1), got {memory_headroom}")
    use_hbm = topology.compute_device != "cpu"
    caps = tuple(
        int((d.storage.hbm if use_hbm else d.storage.ddr) * (1.0 - memory_headroom))
        for d in topology.devices
    )
    return Cluster(topology.world_size, caps, batch_size)


def cluster_topology(cluster: Cluster, compute_device: str = "cuda") -> Topology:
    """A TorchRec topology (one host) for ``cluster``: its memory caps as HBM on ``cuda``
    (TorchRec enforces HBM only on accelerators; planning on the meta device needs no
    GPU) or as DDR on ``cpu``."""
    from torchrec.distributed.planner.types import (
        CustomTopologyData,
        KernelConfig,
        TopologyFactory,
        TrainerConfig,
    )

    if compute_device not in ("cpu", "cuda"):
        raise ValueError(f"compute_device must be 'cpu' or 'cuda', got {compute_device!r}")
    caps = [int(c) for c in cluster.memory_per_device_bytes]
    key = "hbm_cap" if compute_device == "cuda" else "ddr_cap"
    trainer = TrainerConfig(
        world_size=cluster.num_devices,
        local_world_size=cluster.num_devices,
        **{f"{key}_bytes": max(caps)},
        additional_params={"custom_topology_data":
                           CustomTopologyData({key: caps}, cluster.num_devices)},
    )
    return TopologyFactory.create_topology(
        trainer_config=trainer, kernel_config=KernelConfig(compute_device=compute_device))


def _default_estimator(num_devices: int, batch_size: int) -> CostEstimator:
    return resolve_cost_model(num_devices=num_devices, batch_size=batch_size)


# --------------------------------------------------------------------------- estimator


class NeuroShardEstimator(ShardEstimator):
    """TorchRec ``ShardEstimator`` whose per-shard :class:`Perf` comes from a NeuroShard model.

    For every shard of every sharding option:

    * compute: our fused forward+backward estimate of the shard alone (a table as many
      rows as the shard and as wide), split :data:`FWD_COMPUTE_SHARE` (1/3) into
      ``fwd_compute`` and the rest (2/3) into ``bwd_compute``;
    * communication: ``fwd_comms`` / ``bwd_comms`` are our forward / backward all-to-all
      estimates for a ``world_size``-device row whose first device carries the shard's
      width and the others nothing, minus the same for an all-zero row -- the shard's
      marginal share, so that summing shards on a device (what TorchRec's partitioner
      does) does not count the collective's fixed cost once per shard.

    The pooling factor is ``table_stats``' when given, else the sum of the option's
    per-feature input lengths (TorchRec's pooling factors). Row-splitting types are
    approximated: a shard with a fraction f of the rows gets f of the lookups;
    ``data_parallel`` gets 1/world_size of them and no all-to-all. Restrict sharding
    types to ``table_wise`` / ``column_wise`` for costs our models were trained on.
    """

    def __init__(self, topology: Topology,
                 constraints: Mapping[str, ParameterConstraints] | None = None,
                 estimator: CostEstimator | None = None, *,
                 table_stats: TableStats | str | Path | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.topology = topology
        self.constraints = constraints
        self.world_size = topology.world_size
        self.estimator = estimator or _default_estimator(topology.world_size, batch_size)
        self.table_stats = load_table_stats(table_stats)
        self._warned: set[str] = set()

    def _shard_table(self, option: ShardingOption, size: Sequence[int]) -> TableSpec:
        stats = self.table_stats.get(option.name, {})
        pf = stats.get("pooling_factor")
        if pf is None:
            pf = float(sum(option.input_lengths)) or 1.0
        full_rows = int(option.tensor.shape[0])
        rows, width = int(size[0]), int(size[1])
        if option.sharding_type == ShardingType.DATA_PARALLEL.value:
            pf = pf / self.world_size
        elif rows < full_rows:
            pf = pf * rows / max(full_rows, 1)
        if option.sharding_type not in _COLUMN_TYPES and option.sharding_type not in self._warned:
            self._warned.add(option.sharding_type)
            logger.info("NeuroShardEstimator: %s shards are approximated (models are trained "
                        "on table- and column-wise placements)", option.sharding_type)
        return TableSpec(name=option.name, rows=max(rows, 1), dim=width,
                         pooling_factor=max(pf, 1e-6),
                         reuse_hist=tuple(stats.get("reuse_hist", DLRM_REUSE_HIST)))

    def estimate(self, sharding_options: list[ShardingOption],
                 sharder_data_map: Any = None, sharder_map: Any = None) -> None:
        """Set ``shard.perf`` on every shard of ``sharding_options``, in place, in one batch."""
        pieces = [(o, sh, self._shard_table(o, sh.size))
                  for o in sharding_options for sh in o.shards]
        if not pieces:
            return
        compute = np.asarray(self.estimator.compute_ms([[t] for _, _, t in pieces]), dtype=float)
        dims = np.zeros((len(pieces) + 1, self.world_size))
        dims[:-1, 0] = [t.dim for _, _, t in pieces]  # last row: the all-zero baseline
        bwd = np.asarray(self.estimator.bwd_comm_ms(dims), dtype=float)[:, 0]
        fwd = np.asarray(self.estimator.fwd_comm_ms(dims, np.zeros_like(dims)), dtype=float)[:, 0]
        bwd = np.maximum(bwd[:-1] - bwd[-1], 0.0)
        fwd = np.maximum(fwd[:-1] - fwd[-1], 0.0)
        for i, (option, shard, _) in enumerate(pieces):
            no_comm = option.sharding_type == ShardingType.DATA_PARALLEL.value
            shard.perf = Perf(
                fwd_compute=float(compute[i] * FWD_COMPUTE_SHARE),
                fwd_comms=0.0 if no_comm else float(fwd[i]),
                bwd_compute=float(compute[i] * (1.0 - FWD_COMPUTE_SHARE)),
                bwd_comms=0.0 if no_comm else float(bwd[i]),
            )


__all__ = [
    "FWD_COMPUTE_SHARE", "NeuroShardEstimator", "cluster_topology",
    "copy_unsharded_weights", "embedding_bag_collections", "from_sharding_plan",
    "load_table_stats", "table_specs", "to_sharding_plan", "topology_cluster",
]

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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from neuroshard.atomic import atomic_write
from neuroshard.models.registry import resolve_cost_model
from neuroshard.traffic import output_values
from neuroshard.types import (
    BYTES_PER_FLOAT,
    DEFAULT_BATCH_SIZE,
    DIM_MULTIPLE,
    DLRM_REUSE_HIST,
    Cluster,
    ComputeKernel,
    CostEstimator,
    ModelMismatchError,
    NeuroShardError,
    Plan,
    PlanFormatError,
    Shard,
    TableSpec,
    TableSpecError,
)
from neuroshard.types import ShardingType as ShardingTypeName

try:
    import torch
    from torch import nn
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
    from torchrec.distributed.planner.constants import UVM_CACHING_RATIO
    from torchrec.distributed.planner.types import (
        ParameterConstraints,
        Perf,
        ShardEstimator,
        ShardingOption,
        Topology,
    )
    from torchrec.distributed.types import (
        CacheParams,
        EmbeddingModuleShardingPlan,
        ParameterSharding,
        ShardingPlan,
        ShardingType,
    )
    from torchrec.modules.embedding_configs import BaseEmbeddingConfig, EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "neuroshard.torchrec_adapter needs torch and torchrec: pip install 'neuroshard[torchrec]'"
    ) from err

logger = logging.getLogger(__name__)

TableStats = Mapping[str, TableSpec | Mapping[str, Any]]

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


def embedding_modules(
    module: nn.Module,
) -> dict[str, EmbeddingBagCollection | EmbeddingCollection]:
    """Every :class:`EmbeddingBagCollection` and :class:`EmbeddingCollection` in ``module``,
    at any depth, by fully qualified path (``""`` when ``module`` is one itself)."""
    return {
        path: sub
        for path, sub in module.named_modules()
        if isinstance(sub, (EmbeddingBagCollection, EmbeddingCollection))
    }


def embedding_bag_collections(module: nn.Module) -> dict[str, EmbeddingBagCollection]:
    """Every :class:`EmbeddingBagCollection` in ``module`` by its fully qualified path.

    The module itself, when it is an EBC, has the path ``""``.
    """
    return {
        path: sub
        for path, sub in embedding_modules(module).items()
        if isinstance(sub, EmbeddingBagCollection)
    }


@dataclass(frozen=True)
class ModuleTable:
    """One table of a model's embedding modules.

    ``key`` is its name in NeuroShard plans: the table's own name, or ``path.name`` when
    another module of the model has a table of that name. ``pooled`` is False for the
    sequence tables of an :class:`EmbeddingCollection`; ``weighted`` says the EBC takes
    per-id weights.
    """

    key: str
    path: str
    config: BaseEmbeddingConfig
    pooled: bool = True
    weighted: bool = False

    @property
    def name(self) -> str:
        return str(self.config.name)


def qualified_name(path: str, name: str) -> str:
    """A table's name qualified by its module's path (``name`` itself at the root)."""
    return f"{path}.{name}" if path else name


def module_tables(module: nn.Module) -> dict[str, ModuleTable]:
    """Every table of ``module``'s embedding modules by :attr:`ModuleTable.key`, in module
    order. A name two modules share is keyed by module path (``sparse.ebc.t0``)."""
    found: list[ModuleTable] = []
    for path, sub in embedding_modules(module).items():
        if isinstance(sub, EmbeddingBagCollection):
            configs: Sequence[BaseEmbeddingConfig] = sub.embedding_bag_configs()
            pooled, weighted = True, bool(sub.is_weighted())
        else:
            configs, pooled, weighted = sub.embedding_configs(), False, False
        for config in configs:
            found.append(ModuleTable(str(config.name), path, config, pooled, weighted))
    if not found:
        raise NeuroShardError(
            f"{type(module).__name__} holds no EmbeddingBagCollection or EmbeddingCollection "
            "to shard"
        )
    counts: dict[str, int] = {}
    for t in found:
        counts[t.name] = counts.get(t.name, 0) + 1
    out: dict[str, ModuleTable] = {}
    for t in found:
        key = t.name if counts[t.name] == 1 else qualified_name(t.path, t.name)
        if key in out:
            raise TableSpecError(
                f"two tables of the model are both called {key!r} (modules {out[key].path!r} "
                f"and {t.path!r})",
                table=key,
            )
        out[key] = ModuleTable(key, t.path, t.config, t.pooled, t.weighted)
    return out


def _module_tables(module: nn.Module) -> dict[str, tuple[str, BaseEmbeddingConfig]]:
    """Table key -> (module path, config); see :func:`module_tables`."""
    return {key: (t.path, t.config) for key, t in module_tables(module).items()}


def find_table(tables: Mapping[str, ModuleTable], spec: TableSpec) -> ModuleTable | None:
    """The module table ``spec`` names: by key, or by ``spec.module`` and the table's own
    name (a plan made before names were qualified); None when there is none."""
    found = tables.get(spec.name)
    if found is not None and (not spec.module or found.path == spec.module):
        return found
    if spec.module:
        for t in tables.values():
            if t.path == spec.module and spec.name in (t.name, t.key):
                return t
    return None


def match_tables(specs: Sequence[TableSpec], module: nn.Module) -> dict[str, ModuleTable]:
    """The module table of each spec, by spec name (:func:`find_table`).

    Raises :class:`TableSpecError` listing the module's tables the specs lack and the
    specs the module lacks (with a module path the model does not have named as such).
    """
    tables = module_tables(module)
    matched = {spec.name: find_table(tables, spec) for spec in specs}
    covered = {t.key for t in matched.values() if t is not None}
    missing = [k for k in tables if k not in covered]
    extra = [
        f"{spec.name} ({_unmatched_module(tables, spec)})"
        for spec in specs
        if matched[spec.name] is None
    ]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"module tables missing from the plan: {', '.join(missing)}")
        if extra:
            parts.append(f"plan tables not in the module: {', '.join(extra)}")
        raise TableSpecError("; ".join(parts))
    return {name: t for name, t in matched.items() if t is not None}


def _unmatched_module(tables: Mapping[str, ModuleTable], spec: TableSpec) -> str:
    """Why ``spec`` matches no table: its module path is not an embedding module of the
    model, or that module has no such table."""
    paths = sorted({t.path for t in tables.values()})
    if spec.module and spec.module not in paths:
        return (
            f"module path {spec.module!r} is not an embedding module of the model "
            f"(its embedding modules: {', '.join(repr(p) for p in paths)})"
        )
    return "not a table of the model"


def _rows(config: BaseEmbeddingConfig) -> int:
    return int(config.num_embeddings)


def _check_shape(spec: TableSpec, config: BaseEmbeddingConfig, what: str) -> None:
    if spec.dim != config.embedding_dim:
        raise TableSpecError(
            f"{what} says dim {spec.dim}, the module's table is {config.embedding_dim} wide",
            table=spec.name,
            field_name="dim",
        )
    if spec.rows != _rows(config):
        raise TableSpecError(
            f"{what} says {spec.rows} rows, the module's table has {_rows(config)}",
            table=spec.name,
            field_name="rows",
        )


def _check_columns(name: str, dim: int, shards: Sequence[Shard]) -> None:
    """Shards sorted by start must tile ``[0, dim)`` exactly once."""
    edges = [0] + [s.end for s in shards]
    if (
        any(s.start != edge or s.end <= s.start for s, edge in zip(shards, edges))
        or edges[-1] != dim
    ):
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


_ROW_TYPES = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)


def _row_group(
    spec: TableSpec, shards: Sequence[Shard], sharding_type: str, cluster: Cluster
) -> list[int]:
    """The ranks TorchRec spreads a row-wise (every rank) or table-row-wise (the ranks of
    one host) table over."""
    if sharding_type == ShardingType.ROW_WISE.value:
        return list(range(cluster.num_devices))
    hosts = {cluster.host_of(s.device) for s in shards}
    if len(hosts) != 1:
        raise PlanFormatError(
            f"table {spec.name!r}: table_row_wise shards on hosts "
            f"{sorted(hosts)}, TorchRec keeps them on one"
        )
    return list(cluster.devices_of_host(hosts.pop()))


def _row_sharding(
    spec: TableSpec,
    shards: Sequence[Shard],
    sharding_type: str,
    cluster: Cluster,
    device_type: str,
    local: int,
    compute_kernel: str | None,
) -> ParameterSharding:
    """TorchRec's :class:`ParameterSharding` of a row-wise or table-row-wise table: one
    ``ShardMetadata`` per rank of its group with the row offset and count of its block
    (0 rows for ranks past the last block), as ``torchrec.distributed.sharding_plan``'s
    ``row_wise()`` / ``table_row_wise(host)`` build them. TorchRec routes an id to the
    block ``id // ceil(rows / ranks)``, so the blocks must be those, on the group's ranks
    in order; other row splits are a :class:`PlanFormatError`."""
    group = _row_group(spec, shards, sharding_type, cluster)
    block = -(-spec.rows // len(group))
    want = [
        (r, (lo, min(lo + block, spec.rows)))
        for r, lo in zip(group, range(0, spec.rows, block), strict=False)
    ]
    have = [(s.device, s.rows or (0, spec.rows)) for s in shards]
    if any((s.start, s.end) != (0, spec.dim) for s in shards) or have != want:
        raise PlanFormatError(
            f"table {spec.name!r}: {sharding_type} blocks {have} are not TorchRec's "
            f"({want}: ceil(rows / {len(group)}) rows per rank of the group, in order)"
        )
    metadata, offset = [], 0
    for r in group:
        count = next((hi - lo for d, (lo, hi) in have if d == r), 0)
        metadata.append(
            ShardMetadata(
                shard_offsets=[offset, 0],
                shard_sizes=[count, spec.dim],
                placement=_placement(r, device_type, local),
            )
        )
        offset += count
    kernels = {s.compute_kernel for s in shards}
    if compute_kernel is None and len(kernels) > 1:
        raise PlanFormatError(f"table {spec.name!r}: shards on kernels {sorted(kernels)}")
    kernel = compute_kernel or kernels.pop()
    fractions = {s.cache_fraction for s in shards} - {None}
    cache = (
        CacheParams(load_factor=fractions.pop())
        if kernel == "fused_uvm_caching" and len(fractions) == 1
        else None
    )
    return ParameterSharding(
        sharding_type=sharding_type,
        compute_kernel=kernel,
        ranks=group,
        sharding_spec=EnumerableShardingSpec(metadata),
        cache_params=cache,
    )


def to_sharding_plan(
    plan: Plan,
    module: nn.Module,
    *,
    device_type: str = "cpu",
    compute_kernel: str | None = None,
    local_world_size: int | None = None,
) -> ShardingPlan:
    """TorchRec :class:`ShardingPlan` placing ``module``'s tables as ``plan`` says.

    Tables are matched across every :class:`EmbeddingBagCollection` and
    :class:`EmbeddingCollection` in ``module`` by key (:func:`module_tables`), or by
    module path and name; each becomes a ``table_wise`` :class:`ParameterSharding` (one
    shard over all columns) or a ``column_wise`` one (one ``ShardMetadata`` per column
    shard, in column order, uneven widths and repeated ranks allowed), or a
    ``data_parallel`` one (a replica on every rank, TorchRec's dense kernel).
    ``local_world_size``
    (devices per host, default all) only shapes ``cuda`` placements (``rank:R/cuda:R %
    local``). The kernel is each table's shards' own (``fused_uvm_caching`` with its cache
    fraction as ``CacheParams(load_factor=...)``) unless ``compute_kernel`` overrides it.

    Raises :class:`TableSpecError` when the module and the plan disagree on which tables
    exist or on their shapes, :class:`PlanFormatError` when shards do not tile a table's
    columns or a column shard is not a multiple of 4 wide.
    """
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    local = local_world_size or plan.cluster.num_devices
    matched = match_tables(plan.tables, module)
    modules: dict[str, EmbeddingModuleShardingPlan] = {}
    for spec in plan.tables:
        found = matched[spec.name]
        path, config = found.path, found.config
        _check_shape(spec, config, "the plan")
        shards = plan.shards_of(spec.name)
        sharding_type = plan.sharding_type_of(spec.name)
        if sharding_type == ShardingType.DATA_PARALLEL.value:
            ranks = sorted(s.device for s in shards)
            if ranks != list(range(plan.cluster.num_devices)) or any(
                s.rows is not None or (s.start, s.end) != (0, spec.dim) for s in shards
            ):
                raise PlanFormatError(
                    f"table {spec.name!r}: data_parallel needs one full "
                    f"replica on each of the {plan.cluster.num_devices} "
                    f"devices, the plan has {len(shards)} shards"
                )
            # TorchRec replicates on its dense kernel, with no sharding spec
            modules.setdefault(path, EmbeddingModuleShardingPlan())[found.name] = ParameterSharding(
                sharding_type=sharding_type, compute_kernel="dense", ranks=ranks
            )
            continue
        if sharding_type in _ROW_TYPES:
            modules.setdefault(path, EmbeddingModuleShardingPlan())[found.name] = _row_sharding(
                spec, shards, sharding_type, plan.cluster, device_type, local, compute_kernel
            )
            continue
        if sharding_type not in (ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value):
            raise PlanFormatError(
                f"table {spec.name!r}: {sharding_type} plans are not exported to TorchRec yet"
            )
        _check_columns(spec.name, spec.dim, shards)
        for s in shards:
            if not 0 <= s.device < plan.cluster.num_devices:
                raise PlanFormatError(
                    f"table {spec.name!r}: shard on device {s.device}, the plan has "
                    f"{plan.cluster.num_devices} devices"
                )
        rows = _rows(config)
        if sharding_type == ShardingType.TABLE_WISE.value and len(shards) > 1:
            raise PlanFormatError(f"table {spec.name!r}: table_wise with {len(shards)} shards")
        if len(shards) > 1:
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
        kernels = {s.compute_kernel for s in shards}
        if compute_kernel is None and len(kernels) > 1:
            raise PlanFormatError(f"table {spec.name!r}: shards on kernels {sorted(kernels)}")
        kernel = compute_kernel or kernels.pop()
        fractions = {s.cache_fraction for s in shards} - {None}
        cache = (
            CacheParams(load_factor=fractions.pop())
            if kernel == "fused_uvm_caching" and len(fractions) == 1
            else None
        )
        modules.setdefault(path, EmbeddingModuleShardingPlan())[found.name] = ParameterSharding(
            sharding_type=sharding_type,
            compute_kernel=kernel,
            ranks=[s.device for s in shards],
            sharding_spec=EnumerableShardingSpec(metadata),
            cache_params=cache,
        )
    return ShardingPlan(plan=dict(modules))


def meta_ebc(tables: Sequence[TableSpec]) -> EmbeddingBagCollection:
    """An :class:`EmbeddingBagCollection` with ``tables``' shapes on the meta device (no memory)."""
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=t.name,
                num_embeddings=t.rows,
                embedding_dim=t.dim,
                feature_names=[f"{t.name}__feature"],
            )
            for t in tables
        ],
        device=torch.device("meta"),
    )


def torchrec_name_problem(name: str) -> str | None:
    """Why TorchRec cannot hold a table named ``name`` (its key in an
    ``nn.ModuleDict``), or None: empty, a ``.`` (a module path separator), a path
    separator or space, or a name the ModuleDict already has (``training``, ``keys``...)."""
    if not name:
        return "is empty"
    if any(c in name for c in "/\\") or any(c.isspace() for c in name):
        return "has a path separator or a space"
    if "." in name:
        return "has a '.' (TorchRec module keys cannot; put the path in 'module')"
    if hasattr(nn.ModuleDict(), name):
        return "is an attribute name of torch's ModuleDict"
    return None


def check_torchrec_names(tables: Sequence[TableSpec], module_path: str = "") -> None:
    """:class:`TableSpecError` naming every table TorchRec cannot hold under its name
    (:func:`torchrec_name_problem`; a table whose ``module`` prefixes its name is judged by
    the rest), before anything is planned or written."""
    bad = []
    for t in tables:
        path = t.module or module_path
        local = t.name.removeprefix(f"{path}.") if path and t.module == path else t.name
        problem = torchrec_name_problem(local)
        if problem is not None:
            bad.append(f"{t.name!r} {problem}")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise TableSpecError(
            "table names TorchRec cannot use: "
            + "; ".join(bad[:3])
            + more
            + "; rename them to export a TorchRec plan"
        )


def meta_model(tables: Sequence[TableSpec], module_path: str = "") -> nn.Module:
    """A stand-in for the user's model on the meta device (no memory): an
    EmbeddingBagCollection at each table's ``module`` path (``module_path`` for tables
    without one) holding those tables' shapes under their own names. Its sharding plan is
    keyed as the real model's would be (the sharding of a sequence table is the same)."""
    by_path: dict[str, list[TableSpec]] = {}
    for t in tables:
        by_path.setdefault(t.module or module_path, []).append(t)
    for path in by_path:
        if path and not all(part.isidentifier() for part in path.split(".")):
            raise PlanFormatError(
                f"module path {path!r} is not a dotted attribute path "
                "(like sparse_arch.embedding_bag_collection)"
            )

    def local(path: str, t: TableSpec) -> TableSpec:
        short = t.name.removeprefix(f"{path}.") if path and t.module == path else t.name
        return replace(t, name=short)

    if list(by_path) == [""]:
        return meta_ebc(tables)
    if "" in by_path:
        raise PlanFormatError(
            "some tables have a module path and some none: pass "
            "--module-path or the model (--model-factory)"
        )
    root = nn.Module()
    for path in sorted(by_path, key=lambda p: p.count(".")):
        *parents, leaf = path.split(".")
        holder = root
        for part in parents:
            if not hasattr(holder, part):
                holder.add_module(part, nn.Module())
            holder = getattr(holder, part)
            if isinstance(holder, EmbeddingBagCollection):
                raise PlanFormatError(
                    f"module path {path!r} lies inside another embedding module of the plan"
                )
        holder.add_module(leaf, meta_ebc([local(path, t) for t in by_path[path]]))
    return root


def save_sharding_plan(
    plan: Plan,
    path: str | Path,
    *,
    module_path: str = "",
    device_type: str = "cpu",
    model: nn.Module | None = None,
    local_world_size: int | None = None,
) -> ShardingPlan:
    """Write ``plan`` as a TorchRec :class:`ShardingPlan` with ``torch.save``.

    Keyed for ``model`` when given (module paths resolved against it, see
    :func:`to_sharding_plan`); otherwise each table goes under its own ``module`` path, or
    ``module_path`` ("" when the EBC is the model itself) when it has none. The file is a
    pickle: prefer :func:`load_sharding_plan`, which builds the same ShardingPlan from the
    plan JSON with no unpickling (a ShardingPlan holds dict subclasses that
    ``torch.load(weights_only=True)`` refuses, so this file needs ``weights_only=False``).
    """
    if model is None:
        check_torchrec_names(plan.tables, module_path)
    target = model if model is not None else meta_model(plan.tables, module_path)
    sharding_plan = to_sharding_plan(
        plan, target, device_type=device_type, local_world_size=local_world_size
    )
    try:
        atomic_write(path, lambda tmp: torch.save(sharding_plan, tmp))
    except OSError as e:
        raise NeuroShardError(f"{path}: cannot write: {e.strerror or e}") from None
    return sharding_plan


def model_from_factory(target: str) -> nn.Module:
    """The model ``pkg.module:function`` builds (the user's own factory, called with no
    arguments), to key a sharding plan by its module paths."""
    import importlib

    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise NeuroShardError(f"model factory {target!r}: expected pkg.module:function")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise NeuroShardError(
            f"model factory {target!r}: cannot import {module_name!r}: {e}"
        ) from None
    except AttributeError:
        raise NeuroShardError(
            f"model factory {target!r}: {module_name!r} has no {attr!r}"
        ) from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise NeuroShardError(
            f"model factory {target!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def load_sharding_plan(
    path: str | Path,
    model: nn.Module,
    *,
    device_type: str | None = None,
    local_world_size: int | None = None,
) -> ShardingPlan:
    """The TorchRec :class:`ShardingPlan` of the plan JSON at ``path`` for ``model``, built
    here from the JSON (no unpickling).

    Tables are matched to ``model``'s embedding modules by key, or by their ``module``
    path and name (:func:`to_sharding_plan`, which names a module path the model lacks).
    ``device_type`` is ``cpu`` or ``cuda`` (default: ``cuda`` when a GPU is available,
    else ``cpu``); ``local_world_size`` defaults to the plan's devices per host.
    """
    from neuroshard.plan_io import read_plan

    plan = read_plan(path)
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return to_sharding_plan(
        plan,
        model,
        device_type=device_type,
        local_world_size=local_world_size or plan.cluster.devices_per_host,
    )


def from_sharding_plan(
    sharding_plan: ShardingPlan,
    module: nn.Module,
    tables: Sequence[TableSpec] | None = None,
    cluster: Cluster | None = None,
) -> Plan:
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
    mtables = module_tables(module)
    by_place = {(t.path, t.name): t for t in mtables.values()}
    given: dict[str, TableSpec] = {}
    for spec in tables or ():
        found = find_table(mtables, spec)
        if found is None:
            raise TableSpecError(_unmatched_module(mtables, spec), table=spec.name)
        given[found.key] = spec
    shards: dict[str, list[Shard]] = {}
    for path, module_plan in sharding_plan.plan.items():
        if not isinstance(module_plan, Mapping):
            raise PlanFormatError(
                f"module {path!r}: {type(module_plan).__name__} is not an embedding module plan"
            )
        for name, ps in module_plan.items():
            found = by_place.get((path, name))
            if found is None:
                raise TableSpecError(
                    f"module {path!r} of the sharding plan has it, the module does not", table=name
                )
            shards[found.key] = _shards_of(found.key, found.config, ps)

    unplanned = [given[k].name for k in given if k not in shards]
    if unplanned:
        raise TableSpecError(f"tables with no entry in the sharding plan: {', '.join(unplanned)}")
    order = list(given) if tables is not None else [k for k in mtables if k in shards]
    order += [k for k in mtables if k in shards and k not in order]

    specs = []
    for key in order:
        found = mtables[key]
        if key in given:
            _check_shape(given[key], found.config, "the table list")
            spec = given[key]
            specs.append(spec if spec.name == key else replace(spec, name=key, module=found.path))
        else:
            specs.append(default_spec(found))
    all_shards = tuple(s for key in order for s in shards[key])

    num_devices = max(s.device for s in all_shards) + 1
    if cluster is None:
        mem = [0] * num_devices
        for s in all_shards:
            mem[s.device] += _rows(mtables[s.table].config) * s.width * BYTES_PER_FLOAT
        cluster = Cluster.uniform(num_devices, max(mem), DEFAULT_BATCH_SIZE)
    elif num_devices > cluster.num_devices:
        raise PlanFormatError(
            f"the sharding plan uses rank {num_devices - 1}, the cluster has "
            f"{cluster.num_devices} devices"
        )
    return Plan(
        tables=tuple(specs),
        shards=all_shards,
        cluster=cluster,
        meta={"source": "torchrec.ShardingPlan"},
    )


_KERNELS: dict[str, ComputeKernel] = {
    "fused": "fused",
    "fused_uvm_caching": "fused_uvm_caching",
    "dense": "dense",
}


def _shards_of(name: str, config: BaseEmbeddingConfig, ps: ParameterSharding) -> list[Shard]:
    rows, dim = _rows(config), int(config.embedding_dim)
    kernel = _KERNELS.get(str(ps.compute_kernel))
    if kernel is None:
        raise PlanFormatError(
            f"table {name!r}: compute kernel {ps.compute_kernel!r} has no "
            f"NeuroShard counterpart ({', '.join(_KERNELS)})"
        )
    fraction = None
    if kernel == "fused_uvm_caching":
        load = getattr(ps.cache_params, "load_factor", None) if ps.cache_params else None
        fraction = float(load) if load else UVM_CACHING_RATIO
    if ps.sharding_type == ShardingType.DATA_PARALLEL.value:
        if not ps.ranks:
            raise PlanFormatError(f"table {name!r}: data_parallel without ranks")
        return [
            Shard(name, 0, dim, int(r), None, "data_parallel", kernel, fraction) for r in ps.ranks
        ]
    if ps.sharding_type in _ROW_TYPES:
        return _row_shards_of(name, rows, dim, ps, kernel, fraction)
    if ps.sharding_type not in _COLUMN_TYPES:
        raise PlanFormatError(
            f"table {name!r} is {ps.sharding_type}; NeuroShard plans hold table-wise, "
            "column-wise, row-wise, table-row-wise and data-parallel placements"
        )
    if kernel != "fused" or ps.sharding_type == ShardingType.TABLE_COLUMN_WISE.value:
        out = _shards_of(name, config, _as_fused_cw(ps))
        kind: ShardingTypeName | None = None
        if ps.sharding_type == ShardingType.TABLE_COLUMN_WISE.value and len(out) > 1:
            kind = "column_wise"
        return [
            replace(s, sharding_type=kind, compute_kernel=kernel, cache_fraction=fraction)
            for s in out
        ]
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


def _as_fused_cw(ps: ParameterSharding) -> ParameterSharding:
    """``ps`` as a fused table- or column-wise sharding (for reading its shards)."""
    kind = (
        ShardingType.COLUMN_WISE.value
        if ps.sharding_type != ShardingType.TABLE_WISE.value
        else ps.sharding_type
    )
    return ParameterSharding(
        sharding_type=kind, compute_kernel="fused", ranks=ps.ranks, sharding_spec=ps.sharding_spec
    )


def _row_shards_of(
    name: str,
    rows: int,
    dim: int,
    ps: ParameterSharding,
    kernel: ComputeKernel,
    fraction: float | None,
) -> list[Shard]:
    """The row blocks of a row-wise or table-row-wise ``ps`` (empty blocks left out)."""
    spec = ps.sharding_spec
    if not isinstance(spec, EnumerableShardingSpec):
        raise PlanFormatError(
            f"table {name!r}: {ps.sharding_type} needs an enumerable sharding spec"
        )
    out = []
    for i, md in enumerate(spec.shards):
        row_off, col_off = (int(x) for x in md.shard_offsets)
        n_rows, width = (int(x) for x in md.shard_sizes)
        if n_rows == 0:
            continue
        if col_off != 0 or width != dim:
            raise PlanFormatError(
                f"table {name!r}: {ps.sharding_type} shard {i} holds "
                f"columns [{col_off}, {col_off + width}) of {dim}"
            )
        rank = md.placement.rank() if md.placement is not None else None
        if rank is None:
            if not ps.ranks or i >= len(ps.ranks):
                raise PlanFormatError(f"table {name!r}: shard {i} has no rank")
            rank = ps.ranks[i]
        block = None if (row_off, n_rows) == (0, rows) else (row_off, row_off + n_rows)
        kind = cast(ShardingTypeName, ps.sharding_type)  # one of _ROW_TYPES
        out.append(Shard(name, 0, dim, int(rank), block, kind, kernel, fraction))
    out.sort(key=lambda s: s.rows[0] if s.rows else 0)
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
                shard.tensor.copy_(full[r0 : r0 + nr, c0 : c0 + nc])
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
            out[name] = {
                "pooling_factor": entry.pooling_factor,
                "reuse_hist": tuple(entry.reuse_hist),
                "rows": entry.rows,
                "dim": entry.dim,
            }
            if entry.features:
                out[name]["features"] = entry.features
        else:
            out[name] = _stats_entry(name, entry, None)
    return out


def _stats_entry(name: str, entry: Any, source: str | None) -> dict[str, Any]:
    """The keys ``entry`` gives, validated by :meth:`TableSpec.from_record` (a shape it
    lacks is filled with a placeholder for the check and left out of the result)."""
    if not isinstance(entry, Mapping):
        raise TableSpecError(
            f"expected an object, got {type(entry).__name__}", source=source, table=name
        )
    record: dict[str, Any] = {**entry, "name": name}
    for key, alias, placeholder in (
        ("rows", "num_embeddings", 1),
        ("dim", "embedding_dim", DIM_MULTIPLE),
    ):
        if key not in record and alias not in record:
            record[key] = placeholder
    spec = TableSpec.from_record(record, source=source or "table statistics")
    stats: dict[str, Any] = {}
    if "pooling_factor" in entry or "features" in entry:
        stats["pooling_factor"] = spec.pooling_factor
    if spec.features:
        stats["features"] = spec.features
    if entry.get("reuse_hist") is not None:
        stats["reuse_hist"] = spec.reuse_hist
    for key, alias in (("rows", "num_embeddings"), ("dim", "embedding_dim")):
        if key in entry or alias in entry:
            stats[key] = getattr(spec, key)
    return stats


def _lookup(mapping: Mapping[str, Any] | None, table: ModuleTable) -> Any:
    """``mapping``'s entry for ``table``: by key, else by the table's own name."""
    if not mapping:
        return None
    found = mapping.get(table.key)
    return found if found is not None else mapping.get(table.name)


def _constraint_pooling(
    table: ModuleTable, pc: ParameterConstraints, per_rank_batch_size: int | None
) -> list[float] | None:
    """Per-feature ids per sample from TorchRec's ``pooling_factors`` (x ``num_poolings``,
    x ``batch_sizes`` / per-rank batch), or None when the constraint leaves them default."""
    names = list(table.config.feature_names) or [table.name]
    given = [float(x) for x in (pc.pooling_factors or [])]
    if not given or (given == ParameterConstraints().pooling_factors and len(names) > 1):
        return None
    if len(given) != len(names):  # TorchRec sums whatever list it is given
        logger.info(
            "table %r: %d pooling factors for %d features; their sum %.4g is spread "
            "evenly over the features",
            table.key,
            len(given),
            len(names),
            sum(given),
        )
        given = [sum(given) / len(names)] * len(names)
    for what, factors in (("num_poolings", pc.num_poolings), ("batch_sizes", pc.batch_sizes)):
        if not factors:
            continue
        if len(factors) != len(names):
            raise TableSpecError(
                f"ParameterConstraints.{what} has {len(factors)} entries for {len(names)} features",
                table=table.key,
                field_name=what,
            )
        if what == "batch_sizes":
            if per_rank_batch_size is None:
                logger.warning(
                    "table %r: ParameterConstraints.batch_sizes ignored: no batch "
                    "size to compare them with",
                    table.key,
                )
                continue
            factors = [b / per_rank_batch_size for b in factors]
        given = [g * float(f) for g, f in zip(given, factors, strict=True)]
    return given


def table_spec(
    table: ModuleTable,
    stats: Mapping[str, Any] | None = None,
    constraint: ParameterConstraints | None = None,
    *,
    per_rank_batch_size: int | None = None,
) -> TableSpec:
    """The :class:`TableSpec` of one module table, named by its key.

    Shape, module path, ``pooled`` (False for sequence tables) and feature names come from
    the module; features are ``weighted`` when the EBC or the constraint says so. Ids per
    sample, per feature: ``stats``' features, else the constraint's ``pooling_factors``
    (see :func:`_constraint_pooling`), else 1.0 each; the table's pooling factor is their
    sum, or ``stats``' table-level one (spread evenly over the features).
    """
    stats = stats or {}
    config = table.config
    for key, actual in (("rows", _rows(config)), ("dim", int(config.embedding_dim))):
        if key in stats and stats[key] != actual:
            logger.warning(
                "table %r: statistics say %s=%d, the module has %d; using the module's",
                table.key,
                key,
                stats[key],
                actual,
            )
    names = list(config.feature_names) or [table.name]
    weighted = table.weighted or bool(constraint is not None and constraint.is_weighted)
    given = {f.name: f.pooling_factor for f in stats.get("features", ())}
    if given and set(given) == set(names):
        pooling = [given[n] for n in names]
    elif "pooling_factor" in stats:
        if given:
            logger.warning(
                "table %r: statistics name features %s, the module %s; using the "
                "table's pooling factor",
                table.key,
                sorted(given),
                names,
            )
        pooling = [float(stats["pooling_factor"]) / len(names)] * len(names)
    else:
        from_constraint = (
            None
            if constraint is None
            else _constraint_pooling(table, constraint, per_rank_batch_size)
        )
        pooling = from_constraint or [1.0] * len(names)
    record: dict[str, Any] = {
        "name": table.key,
        "rows": _rows(config),
        "dim": int(config.embedding_dim),
        "features": [
            {"name": n, "pooling_factor": pf, "weighted": weighted}
            for n, pf in zip(names, pooling, strict=True)
        ],
        "pooled": table.pooled,
        "module": table.path,
    }
    if "pooling_factor" in stats and not (given and set(given) == set(names)):
        record["pooling_factor"] = float(stats["pooling_factor"])  # exact, not re-summed
    if "reuse_hist" in stats:
        record["reuse_hist"] = stats["reuse_hist"]
    return TableSpec.from_record(record, source="table statistics")


def default_spec(table: ModuleTable) -> TableSpec:
    """:func:`table_spec` without statistics or constraints (1.0 id per feature)."""
    return table_spec(table)


def table_specs(
    module: nn.Module,
    table_stats: TableStats | str | Path | None = None,
    constraints: Mapping[str, ParameterConstraints] | None = None,
    *,
    per_rank_batch_size: int | None = None,
) -> list[TableSpec]:
    """A :class:`TableSpec` per table of ``module``'s EBCs and ECs, in module order, named
    by key (:func:`module_tables`); see :func:`table_spec`. Statistics and constraints are
    found by key, else by the table's own name (TorchRec's constraints use that)."""
    stats = load_table_stats(table_stats)
    tables = module_tables(module)
    specs = [
        table_spec(
            t, _lookup(stats, t), _lookup(constraints, t), per_rank_batch_size=per_rank_batch_size
        )
        for t in tables.values()
    ]
    used = {k for t in tables.values() for k in (t.key, t.name)}
    unused = sorted(set(stats) - used)
    if unused:
        logger.info("statistics for tables not in the module ignored: %s", ", ".join(unused))
    return specs


# --------------------------------------------------------------------------- topology


def topology_cluster(
    topology: Topology, batch_size: int = DEFAULT_BATCH_SIZE, memory_headroom: float = 0.0
) -> Cluster:
    """Our :class:`Cluster` for a TorchRec topology: HBM caps on accelerators (with each
    device's DDR as its host memory), DDR caps on CPU; ``local_world_size`` devices per
    host.

    ``memory_headroom`` is the fraction of each device's memory left out of the caps (the
    planner keeps its reserve as :attr:`Cluster.hbm_reserve_fraction` instead);
    ``batch_size`` is the global batch our cost model sees (TorchRec's per-rank batch
    times ``world_size``).
    """
    if not 0.0 <= memory_headroom < 1.0:
        raise ValueError(f"memory_headroom must be in [0, 1), got {memory_headroom}")
    use_hbm = topology.compute_device != "cpu"
    caps = tuple(
        int((d.storage.hbm if use_hbm else d.storage.ddr) * (1.0 - memory_headroom))
        for d in topology.devices
    )
    host = tuple(int(d.storage.ddr) for d in topology.devices) if use_hbm else ()
    local = int(topology.local_world_size or topology.world_size)
    if topology.world_size % local:
        local = topology.world_size
    return Cluster(
        topology.world_size,
        caps,
        batch_size,
        devices_per_host=local,
        host_memory_per_device_bytes=host,
    )


def cluster_topology(cluster: Cluster, compute_device: str = "cuda") -> Topology:
    """A TorchRec topology for ``cluster`` (``devices_per_host`` as its local world
    size): its memory caps as HBM on ``cuda`` (TorchRec enforces HBM only on
    accelerators; planning on the meta device needs no GPU), with the host memory as DDR
    when the cluster has any, or as DDR on ``cpu``; the cluster's intra- and inter-host
    bandwidths where it gives them."""
    from torchrec.distributed.planner.types import (
        CustomTopologyData,
        HardwareConfig,
        KernelConfig,
        TopologyFactory,
        TrainerConfig,
    )

    if compute_device not in ("cpu", "cuda"):
        raise ValueError(f"compute_device must be 'cpu' or 'cuda', got {compute_device!r}")
    caps = [int(c) for c in cluster.memory_per_device_bytes]
    key = "hbm_cap" if compute_device == "cuda" else "ddr_cap"
    custom = {key: caps}
    host = [int(c) for c in cluster.host_memory_per_device_bytes]
    if compute_device == "cuda" and any(host):  # else TorchRec's default DDR
        custom["ddr_cap"] = host
    trainer = TrainerConfig(
        world_size=cluster.num_devices,
        local_world_size=cluster.devices_per_host,
        **{f"{k}_bytes": max(v) for k, v in custom.items()},
        additional_params={"custom_topology_data": CustomTopologyData(custom, cluster.num_devices)},
    )
    bandwidths = {
        k: v
        for k, v in (
            ("intra_host_bw", cluster.intra_host_bw_bytes_per_ms),
            ("inter_host_bw", cluster.inter_host_bw_bytes_per_ms),
        )
        if v is not None
    }
    if not bandwidths:
        return TopologyFactory.create_topology(
            trainer_config=trainer, kernel_config=KernelConfig(compute_device=compute_device)
        )
    # the cluster's bandwidths (bytes per ms, TorchRec's unit too) instead of TorchRec's
    return TopologyFactory.create_topology(
        trainer_config=trainer,
        hardware_config=HardwareConfig(**bandwidths),
        kernel_config=KernelConfig(
            compute_device=compute_device, use_hardware_based_bandwidth=True
        ),
    )


def bind_batch_size(
    estimator: CostEstimator, per_rank_batch_size: int | None, world_size: int
) -> CostEstimator:
    """``estimator`` at the global batch TorchRec's per-rank ``batch_size`` makes on
    ``world_size`` ranks (None: the model's own batch).

    A model that takes the batch as an input (``batch_input`` in its ``meta.json``) is
    bound to any batch inside its training range; any other model prices the one batch it
    was trained at. Outside what the model covers, :class:`ModelMismatchError` says which
    batches it covers, global and per rank -- planning another batch with it would give
    the same cost at any batch.
    """
    from neuroshard.models.base import batch_range

    trained = int(estimator.batch_size)
    if per_rank_batch_size is None:
        return estimator
    asked = int(per_rank_batch_size) * world_size
    if asked == trained or per_rank_batch_size == trained // world_size:
        return estimator  # TorchRec's per-rank batch is the global one floored
    name = getattr(estimator, "name", type(estimator).__name__)
    covered = batch_range(getattr(estimator, "meta_", {}))
    if covered is not None:
        low, high = covered
        if low <= asked <= high:
            return estimator.for_batch(asked)  # type: ignore[attr-defined]
        span = (
            f"global batches {int(low):,} to {int(high):,} (batch_size "
            f"{math.ceil(low / world_size)} to {int(high // world_size)} per rank here)"
        )
    else:
        per_rank = (
            f"batch_size={trained // world_size} per rank"
            if trained % world_size == 0
            else f"no whole per-rank batch at {world_size} ranks"
        )
        span = f"a global batch of {trained:,} only ({per_rank} here)"
    raise ModelMismatchError(
        f"batch_size={per_rank_batch_size} is per rank (TorchRec's convention): a global "
        f"batch of {asked:,} on {world_size} ranks, but the cost model {name!r} covers "
        f"{span}. Pass such a batch_size, or None to plan at the model's batch, or a model "
        f"trained at yours (neuroshard pretrain --batch-size {asked})"
    )


# --------------------------------------------------------------------------- estimator

# TorchRec's wirings of a ShardEstimator, shown by the errors below.
ESTIMATOR_WIRING = (
    "EmbeddingShardingPlanner(topology, batch_size=B, enumerator=EmbeddingEnumerator("
    "topology, batch_size=B, estimator=[NeuroShardEstimator(topology, batch_size=B), "
    "EmbeddingStorageEstimator(topology)]))"
)


class NeuroShardEstimator(ShardEstimator):
    """TorchRec ``ShardEstimator`` whose per-shard :class:`Perf` comes from a NeuroShard model.

    Wire it into TorchRec's enumerator beside a storage estimator (see the README)::

        EmbeddingShardingPlanner(topology, batch_size=B, enumerator=EmbeddingEnumerator(
            topology, batch_size=B, estimator=[NeuroShardEstimator(topology, batch_size=B),
                                               EmbeddingStorageEstimator(topology)]))

    Alone in the list it also fills in each shard's storage with TorchRec's
    ``EmbeddingStorageEstimator``. It is not a ``PerfModel``: passed as
    ``performance_model=`` it raises a :class:`NeuroShardError` saying so.

    For every shard of every sharding option:

    * compute: our fused forward+backward estimate of the shard alone (a table as many
      rows as the shard and as wide), plus what its kernel adds. ``fused_uvm_caching``:
      the rows its HBM cache misses, fetched and written back over the host link
      (:func:`neuroshard.traffic.uvm_host_bytes`, the planner's own cache model, hottest
      rows cached; cache share from ``cache_params.load_factor``, else TorchRec's default)
      at the topology's ``hbm_to_ddr_mem_bw``. ``fused_uvm`` (no cache) and ``dense``:
      the bytes read forward and read and written backward (3x the looked-up rows'
      bytes, TorchRec's backward = 2x forward) over TorchRec's bandwidth for the kernel
      (``kernel_bw_lookup`` with the topology's bandwidths) less the same over HBM's.
      Split :data:`FWD_COMPUTE_SHARE` (1/3) into ``fwd_compute`` and the rest (2/3) into
      ``bwd_compute``;
    * communication: ``fwd_comms`` / ``bwd_comms`` are our forward / backward all-to-all
      estimates for a ``world_size``-device row whose first device carries the shard's
      output width (the width; per id for sequence tables) and the others nothing, minus
      the same for an all-zero row -- the shard's marginal share, so that summing shards on
      a device (what TorchRec's partitioner does) does not count the collective's fixed
      cost once per shard.

    ``batch_size`` is TorchRec's, per rank: the model (default: the shipped one measured
    on the topology's compute device) must cover ``batch_size * world_size``, and so must
    the options' own batch (:func:`bind_batch_size`). The pooling factor is
    ``table_stats``' when given, else the sum of the option's per-feature input lengths
    (TorchRec's pooling factors). Row-splitting types are approximated: a shard with a
    fraction f of the rows gets f of the lookups; ``data_parallel`` gets 1/world_size of
    them and no all-to-all.
    """

    def __init__(
        self,
        topology: Topology,
        constraints: Mapping[str, ParameterConstraints] | None = None,
        estimator: CostEstimator | None = None,
        *,
        table_stats: TableStats | str | Path | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.topology = topology
        self.constraints = constraints
        self.world_size = topology.world_size
        self.estimator = bind_batch_size(
            estimator
            or resolve_cost_model(
                num_devices=topology.world_size, compute_device=str(topology.compute_device)
            ),
            batch_size,
            self.world_size,
        )
        self.batch_size = int(self.estimator.batch_size)
        self.table_stats = load_table_stats(table_stats)
        self._warned: set[str] = set()

    def rate(self, *_: Any, **__: Any) -> float:
        raise NeuroShardError(
            "NeuroShardEstimator is a ShardEstimator, not a PerfModel: pass it to the "
            f"enumerator, not as performance_model=: {ESTIMATOR_WIRING}"
        )

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
            logger.info(
                "NeuroShardEstimator: %s shards are approximated (models are trained "
                "on table- and column-wise placements)",
                option.sharding_type,
            )
        return TableSpec(
            name=option.name,
            rows=max(rows, 1),
            dim=width,
            pooling_factor=max(pf, 1e-6),
            reuse_hist=tuple(stats.get("reuse_hist", DLRM_REUSE_HIST)),
            pooled=option.is_pooled is not False,
        )

    def _kernel_extra_ms(self, option: ShardingOption, table: TableSpec) -> float:
        """Extra ms of ``option``'s kernel over fused HBM lookups for the shard ``table``."""
        kernel = option.compute_kernel
        if kernel == FUSED_KERNEL:
            return 0.0
        from torchrec.distributed.planner.constants import UVM_CACHING_RATIO, kernel_bw_lookup

        topo = self.topology
        if kernel == "fused_uvm_caching":
            from neuroshard.traffic import uvm_host_bytes

            fraction = option.cache_load_factor
            moved = uvm_host_bytes(
                table, UVM_CACHING_RATIO if fraction is None else fraction, self.batch_size
            )
            return moved / topo.hbm_to_ddr_mem_bw
        device = str(topo.compute_device)
        bws = [
            kernel_bw_lookup(device, k, topo.hbm_mem_bw, topo.ddr_mem_bw, topo.hbm_to_ddr_mem_bw)
            for k in (kernel, FUSED_KERNEL)
        ]
        if bws[0] is None or bws[1] is None:
            raise NeuroShardError(
                f"table {option.name!r}: NeuroShardEstimator has no bandwidth for kernel "
                f"{kernel!r} on {device!r}; restrict compute_kernels in its constraints"
            )
        moved = 3.0 * self.batch_size * table.pooling_factor * table.dim * BYTES_PER_FLOAT
        return max(moved * (1.0 / bws[0] - 1.0 / bws[1]), 0.0)

    def estimate(
        self,
        sharding_options: list[ShardingOption],
        sharder_data_map: Any = None,
        sharder_map: Any = None,
    ) -> None:
        """Set ``shard.perf`` on every shard of ``sharding_options``, in place, in one batch
        (and ``shard.storage`` where no storage estimator has, see the class doc)."""
        for option in sharding_options:  # TorchRec's own batch must be the one priced
            if (
                option.batch_size * self.world_size != self.batch_size
                and option.batch_size != self.batch_size // self.world_size
            ):
                bind_batch_size(self.estimator, option.batch_size, self.world_size)
                raise ModelMismatchError(
                    f"TorchRec's batch_size={option.batch_size} per rank, the estimator was "
                    f"built for {self.batch_size // self.world_size}: pass the same batch_size "
                    "to NeuroShardEstimator, the enumerator and the planner"
                )
        pieces = [
            (o, sh, self._shard_table(o, sh.size)) for o in sharding_options for sh in o.shards
        ]
        if not pieces:
            return
        compute = np.asarray(self.estimator.compute_ms([[t] for _, _, t in pieces]), dtype=float)
        compute += [self._kernel_extra_ms(o, t) for o, _, t in pieces]
        dims = np.zeros((len(pieces) + 1, self.world_size))
        dims[:-1, 0] = [output_values(t, t.dim) for _, _, t in pieces]  # last row: zero
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
        self._fill_storage(sharding_options, sharder_data_map)

    def _fill_storage(self, options: list[ShardingOption], sharder_data_map: Any) -> None:
        """TorchRec's storage estimate for options no storage estimator has seen (a
        storage estimator later in the enumerator's list overwrites it)."""
        bare = [o for o in options if any(sh.storage is None for sh in o.shards)]
        if not bare:
            return
        if sharder_data_map is None:
            raise NeuroShardError(
                "NeuroShardEstimator prices speed, not storage, and was called without "
                f"TorchRec's sharder data to size the shards: {ESTIMATOR_WIRING}"
            )
        from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator

        EmbeddingStorageEstimator(self.topology, dict(self.constraints or {})).estimate(
            bare, sharder_data_map
        )


__all__ = [
    "ESTIMATOR_WIRING",
    "FWD_COMPUTE_SHARE",
    "ModuleTable",
    "NeuroShardEstimator",
    "bind_batch_size",
    "cluster_topology",
    "copy_unsharded_weights",
    "default_spec",
    "embedding_bag_collections",
    "embedding_modules",
    "find_table",
    "match_tables",
    "from_sharding_plan",
    "load_sharding_plan",
    "load_table_stats",
    "meta_model",
    "model_from_factory",
    "module_tables",
    "qualified_name",
    "save_sharding_plan",
    "table_spec",
    "table_specs",
    "to_sharding_plan",
    "topology_cluster",
]

"""NeuroShard's vocabulary: specs, plans, costs and the interfaces of the pluggable parts.

Every other module imports its nouns from here. Specs are frozen dataclasses validated
once at the boundary (file loading, CLI parsing) and trusted afterwards.

Units are in the names: ``*_bytes``, ``*_ms``. Embedding weights are FP32 (4 bytes).

Pluggable parts, each a small protocol with implementations behind a registry:

* :class:`CostEstimator` -- anything that gives the three costs of a sharding plan's
  pieces: fused embedding compute of one device's shards, and the backward and forward
  all-to-all per device. Learned cost models and hardware backends both implement it,
  so one scoring function (:func:`neuroshard.search.scoring.plan_cost`) serves the
  search (with a model) and ``evaluate`` (with a backend).
* :class:`HardwareBackend` -- a :class:`CostEstimator` that measures (or, for ``sim``,
  simulates) one sample at a time and reports where it ran.
* :class:`Searcher` -- tables + cluster + estimator -> :class:`Plan`.
"""

from __future__ import annotations

import difflib
import math
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import (
    Any,
    Literal,
    NamedTuple,
    Protocol,
    get_args,
    runtime_checkable,
)

import numpy as np

BYTES_PER_FLOAT = 4
NUM_HIST_BINS = 17
DIM_MULTIPLE = 4
DEFAULT_BATCH_SIZE = 65_536
MAX_ROWS = 1 << 40  # a trillion rows: anything above is a unit mistake, not a table
MAX_DIM = 65_536
MAX_POOLING_FACTOR = 1e6
MAX_BATCH_SIZE = 1 << 40  # global batch; anything above is a unit mistake
MAX_NAME_LENGTH = 256
HIST_TOLERANCE = 1e-3  # a reuse histogram may sum to 1 +- this; it is renormalised

ShardingType = Literal["table_wise", "column_wise", "row_wise", "table_row_wise", "data_parallel"]
ComputeKernel = Literal["fused", "fused_uvm_caching", "dense"]
SHARDING_TYPES: tuple[str, ...] = get_args(ShardingType)
COMPUTE_KERNELS: tuple[str, ...] = get_args(ComputeKernel)
Optimizer = Literal["sgd", "rowwise_adagrad", "adam"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
# Share of each device's HBM kept for what is not embeddings (the dense part, buffers,
# activations) unless told otherwise: TorchRec's HeuristicalStorageReservation default.
DEFAULT_RESERVE_FRACTION = 0.15

# Access-count bin edges of the reuse histogram: (0,1], (1,2], (2,4], ..., (16384,32768],
# and above 32768 -- 17 bins (shared/REFERENCE.md).
HIST_UPPER_EDGES: tuple[float, ...] = tuple(float(2**k) for k in range(16)) + (math.inf,)

# Dataset-wide fraction of unique indices per access-count bin, public DLRM data
# (shared/REFERENCE.md): the ten bins published with non-zero figures.
DLRM_PUBLISHED_UNIQUE_FRACTIONS: tuple[float, ...] = (
    0.473, 0.152, 0.139, 0.112, 0.072, 0.032, 0.011, 0.005, 0.002, 0.001,
)  # fmt: skip
# The histogram used by default: the tail bins the reference rounds to 0.000 get a small
# mass so the histogram sums to 1.
DLRM_REUSE_HIST: tuple[float, ...] = DLRM_PUBLISHED_UNIQUE_FRACTIONS + (
    0.0004, 0.0002, 0.0001, 0.00005, 0.00003, 0.00001, 0.00001,
)  # fmt: skip
_s = sum(DLRM_REUSE_HIST)
DLRM_REUSE_HIST = tuple(x / _s for x in DLRM_REUSE_HIST)
del _s

FEATURE_NAMES: tuple[str, ...] = tuple(f"reuse_{i}" for i in range(NUM_HIST_BINS)) + (
    "dim",
    "pooling_factor",
    "rows",
)


# --------------------------------------------------------------------------- errors


class NeuroShardError(Exception):
    """Base of every error NeuroShard raises on purpose; the CLI prints it as one line."""


class TableSpecError(NeuroShardError, ValueError):
    """A table config is wrong. The message names the file, the table and the field."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        table: str | None = None,
        field_name: str | None = None,
    ):
        where = ", ".join(
            part
            for part in (
                source and f"{source}",
                table is not None and f"table {table!r}" or "",
                field_name and f"field {field_name!r}",
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.source, self.table, self.field_name = source, table, field_name


class PlanFormatError(NeuroShardError, ValueError):
    """A plan file or plan object breaks the ``neuroshard.plan`` (v1 or v2) contract."""


class PlanInfeasibleError(NeuroShardError):
    """No plan fits the memory caps. Names the tables and the bytes needed vs available."""


class ConstraintError(PlanInfeasibleError):
    """A placement constraint cannot hold, or asks for what the planner cannot place
    (yet). Names the table and the constraint."""


class ModelMismatchError(NeuroShardError):
    """A cost model was trained for another backend, batch size or feature schema."""


class ModelFileError(NeuroShardError):
    """A model directory is missing, truncated or tampered with."""


class InvalidCostError(ModelMismatchError):
    """A cost model (or backend) gave a cost that is not a finite, non-negative number of
    ms, or nothing for a device that holds shards: the model is broken or asked far from
    what it was trained on. Names the device and the value."""


class BackendError(NeuroShardError):
    """A hardware backend cannot run here (missing library, device) or a measurement failed."""


class RayClusterError(NeuroShardError):
    """The Ray cluster at an ``--address`` cannot be reached, refuses this client's token,
    has no node on this machine, or cannot start a worker. Names the address and what to
    check."""


class UsageError(NeuroShardError, ValueError):
    """A command-line option or argument has a value the library cannot use."""


class UnknownNameError(NeuroShardError, ValueError):
    """A registry was asked for a name it does not have; the message lists valid names."""


class FolderBusyError(UsageError):
    """Another run holds an output folder's lock; names the folder and the holder's pid."""


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class FeatureSpec:
    """One input feature of a table: its name, mean ids per sample, and whether it carries
    per-id weights (TorchRec's weighted features)."""

    name: str
    pooling_factor: float = 1.0
    weighted: bool = False


_TABLE_FIELDS = (
    "name",
    "rows",
    "dim",
    "pooling_factor",
    "reuse_hist",
    "features",
    "pooled",
    "module",
)
_ALIASES = {"num_embeddings": "rows", "embedding_dim": "dim"}


@dataclass(frozen=True)
class TableSpec:
    """One embedding table: its shape and access statistics for one batch.

    ``pooling_factor`` is the table's mean ids per sample, summed over its features.
    ``features`` empty means one feature named after the table (see :attr:`feature_list`).
    ``pooled`` is False for sequence tables (TorchRec ``EmbeddingCollection``), whose
    outputs are one vector per id. ``module`` is the path of the TorchRec module that
    holds the table ("" when unknown).
    """

    name: str
    rows: int
    dim: int
    pooling_factor: float = 1.0
    reuse_hist: tuple[float, ...] = DLRM_REUSE_HIST
    features: tuple[FeatureSpec, ...] = ()
    pooled: bool = True
    module: str = ""

    @classmethod
    def from_record(
        cls,
        record: Mapping[str, Any],
        *,
        source: str = "<tables>",
        index: int = 0,
        extra: Sequence[str] = (),
    ) -> TableSpec:
        """Validate one table record (a dict from JSON, CSV, YAML, the pool or TorchRec).

        The one validation every loader uses. Keys in ``extra`` are ignored (the caller
        reads them); any other unknown key is an error that suggests the nearest known one.
        Every problem raises :class:`TableSpecError` naming the source, table and field.
        """
        return _table_from_record(record, index, source, frozenset(extra))

    @property
    def feature_list(self) -> tuple[FeatureSpec, ...]:
        return self.features or (FeatureSpec(self.name, self.pooling_factor),)

    @property
    def size_bytes(self) -> int:
        return self.rows * self.dim * BYTES_PER_FLOAT

    def column_bytes(self, width: int) -> int:
        """Memory of a column shard ``width`` wide."""
        return self.rows * width * BYTES_PER_FLOAT

    def with_dim(self, dim: int) -> TableSpec:
        """The same table at another width: a column shard's compute view, or an augmented copy."""
        return replace(self, dim=dim)

    def shard_view(self, rows: tuple[int, int] | None, width: int) -> TableSpec:
        """The compute view of a shard: ``width`` columns of the rows ``[start, end)``
        (None: all rows). A row block takes its share of the ids in proportion to its rows."""
        if rows is None or (rows[0] == 0 and rows[1] == self.rows):
            return self.with_dim(width)
        count = rows[1] - rows[0]
        return replace(
            self, rows=count, dim=width, pooling_factor=self.pooling_factor * count / self.rows
        )

    def feature_vector(self) -> tuple[float, ...]:
        """Raw feature vector in :data:`FEATURE_NAMES` order (17 reuse bins, dim, pooling, rows)."""
        return (*self.reuse_hist, float(self.dim), float(self.pooling_factor), float(self.rows))

    def to_record(self) -> dict[str, Any]:
        """The table as a config record (``from_record`` reads it back to an equal spec)."""
        record: dict[str, Any] = {
            "name": self.name,
            "rows": self.rows,
            "dim": self.dim,
            "pooling_factor": self.pooling_factor,
            "reuse_hist": list(self.reuse_hist),
        }
        if self.features:
            record["features"] = [_feature_record(f) for f in self.features]
        if not self.pooled:
            record["pooled"] = False
        if self.module:
            record["module"] = self.module
        return record


def optimizer_state_bytes(rows: int, width: int, optimizer: str = "sgd") -> int:
    """Optimizer state of a block of ``rows`` x ``width`` weights: none for SGD, one float
    per row for row-wise Adagrad, two floats per element (first and second moments) for
    Adam (TorchRec's storage estimate counts the same)."""
    if optimizer == "sgd":
        return 0
    if optimizer == "rowwise_adagrad":
        return rows * BYTES_PER_FLOAT
    if optimizer == "adam":
        return 2 * rows * width * BYTES_PER_FLOAT
    raise UnknownNameError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")


def embedding_bytes(rows: int, width: int, optimizer: str = "sgd") -> int:
    """Footprint of a block of ``rows`` x ``width`` FP32 weights with its optimizer state."""
    return rows * width * BYTES_PER_FLOAT + optimizer_state_bytes(rows, width, optimizer)


def _feature_record(f: FeatureSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": f.name, "pooling_factor": f.pooling_factor}
    if f.weighted:
        out["weighted"] = True
    return out


@dataclass(frozen=True)
class Cluster:
    """The devices to shard onto, as a topology of hosts.

    ``num_devices`` devices in hosts of ``devices_per_host`` (device ``d`` is on host
    ``d // devices_per_host``; default: one host). Per device: the HBM cap
    ``memory_per_device_bytes`` (before any reserve) and the host memory (DDR) it may use,
    ``host_memory_per_device_bytes`` (default none). Bandwidths per direction, in bytes
    per ms, inside a host and across hosts (None: the cost backend's profile decides).
    ``batch_size`` is global; TorchRec's per-rank batch is :attr:`per_rank_batch_size`.

    Training settings that size the embeddings' footprint: ``hbm_reserve_fraction`` of
    every device's HBM is kept for what is not embeddings (default 0 here; the planner
    sets :data:`DEFAULT_RESERVE_FRACTION` unless told otherwise), so the HBM left to
    shards is :attr:`hbm_budget_bytes`; ``optimizer`` (``sgd``, ``rowwise_adagrad``,
    ``adam``) adds its state to each shard (:func:`embedding_bytes`); ``io_buffers`` adds
    each shard's input and output buffers as TorchRec's storage estimate counts them
    (:func:`io_buffer_bytes`; default off here, on in the planner).
    """

    num_devices: int
    memory_per_device_bytes: tuple[int, ...]
    batch_size: int = DEFAULT_BATCH_SIZE
    devices_per_host: int = 0
    host_memory_per_device_bytes: tuple[int, ...] = ()
    intra_host_bw_bytes_per_ms: float | None = None
    inter_host_bw_bytes_per_ms: float | None = None
    hbm_reserve_fraction: float = 0.0
    optimizer: str = "sgd"
    io_buffers: bool = False

    def __post_init__(self) -> None:
        if self.num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {self.num_devices}")
        if len(self.memory_per_device_bytes) != self.num_devices:
            raise ValueError(
                f"memory_per_device_bytes has {len(self.memory_per_device_bytes)} entries "
                f"for {self.num_devices} devices"
            )
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(
                f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got {self.batch_size}"
            )
        if not self.devices_per_host:
            object.__setattr__(self, "devices_per_host", self.num_devices)
        if self.devices_per_host < 1 or self.num_devices % self.devices_per_host:
            raise ValueError(
                f"devices_per_host must divide num_devices ({self.num_devices}), "
                f"got {self.devices_per_host}"
            )
        if not self.host_memory_per_device_bytes:
            object.__setattr__(self, "host_memory_per_device_bytes", (0,) * self.num_devices)
        if len(self.host_memory_per_device_bytes) != self.num_devices:
            raise ValueError(
                f"host_memory_per_device_bytes has {len(self.host_memory_per_device_bytes)} "
                f"entries for {self.num_devices} devices"
            )
        if min(self.memory_per_device_bytes) < 0 or min(self.host_memory_per_device_bytes) < 0:
            raise ValueError("memory caps must be >= 0 bytes")
        for bw in (self.intra_host_bw_bytes_per_ms, self.inter_host_bw_bytes_per_ms):
            if bw is not None and not (bw > 0 and math.isfinite(bw)):
                raise ValueError(f"bandwidths must be positive and finite, got {bw}")
        if not 0.0 <= self.hbm_reserve_fraction < 1.0:
            raise ValueError(
                f"hbm_reserve_fraction must be in [0, 1), got {self.hbm_reserve_fraction}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )

    @classmethod
    def uniform(
        cls,
        num_devices: int,
        memory_bytes: int,
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        devices_per_host: int = 0,
        host_memory_bytes: int = 0,
        **options: Any,
    ) -> Cluster:
        """``num_devices`` alike devices of ``memory_bytes`` HBM (and ``host_memory_bytes``);
        ``options`` are the other fields (bandwidths, reserve, optimizer)."""
        return cls(
            num_devices,
            (int(memory_bytes),) * num_devices,
            batch_size,
            devices_per_host,
            (int(host_memory_bytes),) * num_devices,
            **options,
        )

    @property
    def num_hosts(self) -> int:
        return self.num_devices // self.devices_per_host

    def host_of(self, device: int) -> int:
        return device // self.devices_per_host

    def devices_of_host(self, host: int) -> range:
        return range(host * self.devices_per_host, (host + 1) * self.devices_per_host)

    @property
    def per_rank_batch_size(self) -> int:
        """TorchRec's ``batch_size``: the global batch divided over the ranks."""
        return self.batch_size // self.num_devices

    @property
    def total_memory_bytes(self) -> int:
        return sum(self.memory_per_device_bytes)

    @property
    def hbm_budget_bytes(self) -> tuple[int, ...]:
        """Per device, the HBM left to embeddings: the cap less the reserve."""
        keep = 1.0 - self.hbm_reserve_fraction
        return tuple(int(c * keep) for c in self.memory_per_device_bytes)

    @property
    def host_budget_bytes(self) -> tuple[int, ...]:
        """Per device, the host memory left to embeddings (no reserve is taken from it)."""
        return self.host_memory_per_device_bytes


@dataclass(frozen=True)
class Shard:
    """A block of one table on one device: columns ``[start, end)`` and rows ``rows``
    (half-open; None: every row), with the table's sharding type and compute kernel.

    ``sharding_type`` None means inferred: ``table_wise`` when the table is one shard,
    else ``column_wise`` (see :meth:`Plan.sharding_type_of`). ``cache_fraction`` is the
    share of the shard's rows that ``fused_uvm_caching`` keeps in HBM (the rest lives in
    host memory).
    """

    table: str
    start: int
    end: int
    device: int
    rows: tuple[int, int] | None = None
    sharding_type: ShardingType | None = None
    compute_kernel: ComputeKernel = "fused"
    cache_fraction: float | None = None

    @property
    def width(self) -> int:
        return self.end - self.start

    def row_count(self, table: TableSpec) -> int:
        return table.rows if self.rows is None else self.rows[1] - self.rows[0]

    def hbm_bytes(self, table: TableSpec, optimizer: str = "sgd") -> int:
        """Weights and ``optimizer`` state this shard keeps in HBM (the cached share for
        ``fused_uvm_caching``)."""
        return shard_hbm_bytes(
            self.row_count(table), self.width, self.compute_kernel, self.cache_fraction, optimizer
        )

    def host_bytes(self, table: TableSpec, optimizer: str = "sgd") -> int:
        """Weights and ``optimizer`` state this shard keeps in host memory (all of them for
        ``fused_uvm_caching``, none otherwise)."""
        return shard_host_bytes(self.row_count(table), self.width, self.compute_kernel, optimizer)


def shard_hbm_bytes(
    rows: int,
    width: int,
    kernel: str = "fused",
    cache_fraction: float | None = None,
    optimizer: str = "sgd",
) -> int:
    """HBM footprint of a ``rows`` x ``width`` shard on ``kernel``: weights and optimizer
    state, or for ``fused_uvm_caching`` the ``cache_fraction`` of them that its HBM cache
    holds (TorchRec's storage estimate scales both by its caching ratio too)."""
    full = embedding_bytes(rows, width, optimizer)
    if kernel == "fused_uvm_caching":
        return math.ceil(full * (cache_fraction or 0.0))
    return full


def shard_host_bytes(rows: int, width: int, kernel: str = "fused", optimizer: str = "sgd") -> int:
    """Host-memory footprint of a shard: all of it for ``fused_uvm_caching``, else none."""
    if kernel == "fused_uvm_caching":
        return embedding_bytes(rows, width, optimizer)
    return 0


ID_BYTES = 8  # TorchRec's input_data_type_size: int64 ids
OUTPUT_VALUE_BYTES = 4  # TorchRec's output_data_type_size: FP32 values


def io_buffer_bytes(table: TableSpec, sharding_type: str, width: int, cluster: Cluster) -> int:
    """HBM one shard of ``table`` keeps for its input ids and its output values in a
    training step, as TorchRec's storage estimate counts them (``calculate_shard_storages``
    with no pipeline: input + output size); 0 unless ``cluster.io_buffers``.

    With ``b`` the per-rank batch, ``W`` the world size, ``L`` the devices per host, ``P``
    the sum of the features' pooling factors and ``O`` the sum of ``min(1, pooling)`` (of
    ``P`` for a sequence table): ids ``P b W x 8`` bytes for table- and column-wise shards,
    ``P b x 8`` for row-wise ones and data-parallel replicas, ``P b W / L x 8`` for
    table-row-wise ones; values ``O b W x width x 4`` for every sharded type (``width`` the
    shard's columns: the table's dim for row blocks) and ``O b x dim x 4`` for a replica.
    """
    if not cluster.io_buffers:
        return 0
    b = cluster.per_rank_batch_size
    world, local = cluster.num_devices, cluster.devices_per_host
    pooling = sum(f.pooling_factor for f in table.feature_list)
    outputs = (
        sum(min(1.0, f.pooling_factor) for f in table.feature_list) if table.pooled else pooling
    )
    ids = pooling * b
    if sharding_type in ("table_wise", "column_wise"):
        ids *= world
    elif sharding_type == "table_row_wise":
        ids *= world / local
    elif sharding_type not in ("row_wise", "data_parallel"):
        raise ValueError(f"unknown sharding type {sharding_type!r}")
    values = outputs * b * width * (1 if sharding_type == "data_parallel" else world)
    return math.ceil(ids * ID_BYTES) + math.ceil(values * OUTPUT_VALUE_BYTES)


def inferred_sharding_type(shards: Sequence[Shard]) -> ShardingType:
    """The type of a table's whole-row shards that name none: ``table_wise`` for one shard,
    ``column_wise`` for several (how column-wise searchers build plans and v1 files read)."""
    return "table_wise" if len(shards) == 1 else "column_wise"


@dataclass(frozen=True)
class DeviceCost:
    compute_ms: float
    fwd_comm_ms: float
    bwd_comm_ms: float
    memory_bytes: int

    @property
    def total_ms(self) -> float:
        return self.compute_ms + self.fwd_comm_ms + self.bwd_comm_ms


@dataclass(frozen=True)
class PlanCost:
    """Per-device costs of a plan by one estimator (a model id or a backend name)."""

    model: str
    devices: tuple[DeviceCost, ...]

    @property
    def max_ms(self) -> float:
        """Plan cost: max over devices of compute + backward comm + forward comm."""
        return max(d.total_ms for d in self.devices)

    def check(self, plan: Plan) -> PlanCost:
        """``self`` if every cost is a finite number of ms, none negative, and every device
        holding shards has a positive compute cost; :class:`InvalidCostError` naming the
        first bad device and value otherwise (never print such a cost as an answer)."""
        busy = {s.device for s in plan.shards}
        for i, d in enumerate(self.devices):
            for what, ms in (
                ("compute", d.compute_ms),
                ("forward comm", d.fwd_comm_ms),
                ("backward comm", d.bwd_comm_ms),
            ):
                if not math.isfinite(ms) or ms < 0:
                    raise InvalidCostError(
                        f"{self.model} gave device {i} a {what} cost of "
                        f"{ms} ms, not a finite non-negative number"
                    )
            if i in busy and not d.compute_ms > 0:
                raise InvalidCostError(
                    f"{self.model} gave device {i} a compute cost of "
                    f"{d.compute_ms} ms for its shards (not positive)"
                )
        if not self.max_ms > 0:
            raise InvalidCostError(f"{self.model} gave the plan a cost of {self.max_ms} ms")
        return self


@dataclass(frozen=True)
class Plan:
    """A sharding plan: every table's shards and their devices, plus optional cost.

    A shard whose ``sharding_type`` is None has the type :meth:`sharding_type_of` infers
    from the table's shards (the form column-wise searchers build and files are read to).
    """

    tables: tuple[TableSpec, ...]
    shards: tuple[Shard, ...]
    cluster: Cluster
    cost: PlanCost | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def sharding_type_of(self, name: str) -> ShardingType:
        """Table ``name``'s sharding type: its shards' own, else ``table_wise`` for one
        shard spanning the table and ``column_wise`` for several."""
        shards = self.shards_of(name)
        given = {s.sharding_type for s in shards} - {None}
        if given:
            return given.pop()  # type: ignore[return-value]
        return inferred_sharding_type(shards)

    @cached_property
    def _tables_by_name(self) -> dict[str, TableSpec]:
        return {t.name: t for t in self.tables}

    @cached_property
    def _shards_by_table(self) -> dict[str, tuple[Shard, ...]]:
        """Each table's shards in row, column, device order, grouped once per plan."""
        grouped: dict[str, list[Shard]] = {}
        for s in self.shards:
            grouped.setdefault(s.table, []).append(s)
        return {
            name: tuple(
                sorted(group, key=lambda s: (s.rows[0] if s.rows else 0, s.start, s.device))
            )
            for name, group in grouped.items()
        }

    def table(self, name: str) -> TableSpec:
        return self._tables_by_name[name]

    def shards_of(self, name: str) -> tuple[Shard, ...]:
        return self._shards_by_table.get(name, ())

    def device_loads(self) -> list[list[TableSpec]]:
        """For each device, the compute view of its shards (see :meth:`TableSpec.shard_view`;
        a ``data_parallel`` replica looks up the ids of its device's share of the batch
        only, ``1 / num_devices`` of them)."""
        by_name = {t.name: t for t in self.tables}
        replicated = {s.table for s in self.shards if s.sharding_type == "data_parallel"}
        loads: list[list[TableSpec]] = [[] for _ in range(self.cluster.num_devices)]
        for s in self.shards:
            table = by_name[s.table]
            if s.table in replicated:
                view = replace(
                    table, pooling_factor=table.pooling_factor / self.cluster.num_devices
                )
            else:
                view = table.shard_view(s.rows, s.width)
            loads[s.device].append(view)
        return loads

    def memory_bytes(self) -> list[int]:
        """HBM per device: weights and optimizer state (the cluster's optimizer), and the
        shards' I/O buffers when the cluster counts them (:func:`io_buffer_bytes`)."""
        mem = [0] * self.cluster.num_devices
        for s in self.shards:
            table = self.table(s.table)
            mem[s.device] += s.hbm_bytes(table, self.cluster.optimizer)
            if self.cluster.io_buffers:
                kind = s.sharding_type or self.sharding_type_of(s.table)
                mem[s.device] += io_buffer_bytes(table, kind, s.width, self.cluster)
        return mem

    def host_memory_bytes(self) -> list[int]:
        """Weights and optimizer state in host memory per device (``fused_uvm_caching``)."""
        mem = [0] * self.cluster.num_devices
        for s in self.shards:
            mem[s.device] += s.host_bytes(self.table(s.table), self.cluster.optimizer)
        return mem

    def dim_sums(self) -> list[int]:
        sums = [0] * self.cluster.num_devices
        for s in self.shards:
            sums[s.device] += s.width
        return sums

    def with_cost(self, cost: PlanCost) -> Plan:
        return replace(self, cost=cost)


@dataclass(frozen=True)
class TableConstraint:
    """What one table's placement must respect; an empty field leaves the planner free.

    ``sharding_types`` and ``compute_kernels``: those allowed; ``devices``: the devices
    its shards may sit on (a pin); ``hosts``: the hosts they may sit on;
    ``cache_fraction``: the share of rows a ``fused_uvm_caching`` HBM cache holds (None:
    the planner picks).
    """

    sharding_types: tuple[str, ...] = ()
    compute_kernels: tuple[str, ...] = ()
    devices: tuple[int, ...] = ()
    hosts: tuple[int, ...] = ()
    cache_fraction: float | None = None

    def allows_type(self, sharding_type: str) -> bool:
        return not self.sharding_types or sharding_type in self.sharding_types

    def allows_kernel(self, kernel: str) -> bool:
        return not self.compute_kernels or kernel in self.compute_kernels

    def allowed_devices(self, cluster: Cluster) -> tuple[int, ...]:
        """The devices this table's shards may sit on, pins and host pins together."""
        devices = self.devices or tuple(range(cluster.num_devices))
        if self.hosts:
            devices = tuple(d for d in devices if cluster.host_of(d) in self.hosts)
        return devices


NO_CONSTRAINT = TableConstraint()


@dataclass(frozen=True)
class Constraints:
    """Placement constraints of a planning task: per table by name (``tables``), and
    groups of tables that must share a device (``colocate``: every table of a group is
    placed table-wise, all on one device), and ``default`` for every table not named
    (e.g. only table- and column-wise types for all). :meth:`check` refuses, with
    :class:`ConstraintError`, what no plan could honour on its face."""

    tables: Mapping[str, TableConstraint] = field(default_factory=dict, hash=False)
    colocate: tuple[tuple[str, ...], ...] = ()
    default: TableConstraint = NO_CONSTRAINT  # for every table ``tables`` does not name

    def of(self, name: str) -> TableConstraint:
        return self.tables.get(name, self.default)

    def check(self, tables: Sequence[TableSpec], cluster: Cluster) -> None:
        """Raise :class:`ConstraintError` naming the table and the constraint when a
        constraint names an unknown table, type, kernel, device or host, allows no
        device, or contradicts another (co-location needs table-wise placement)."""
        names = {t.name for t in tables}
        for name, c in [*self.tables.items(), (None, self.default)]:
            where = "every table" if name is None else f"table {name!r}"
            if name is not None and name not in names:
                raise ConstraintError(f"{where}: constrained but not in the task")
            bad = [x for x in c.sharding_types if x not in SHARDING_TYPES]
            if bad:
                raise ConstraintError(
                    f"{where}: unknown sharding types {bad}; valid: {', '.join(SHARDING_TYPES)}"
                )
            bad = [x for x in c.compute_kernels if x not in COMPUTE_KERNELS]
            if bad:
                raise ConstraintError(
                    f"{where}: unknown compute kernels {bad}; valid: {', '.join(COMPUTE_KERNELS)}"
                )
            bad_devices = [d for d in c.devices if not 0 <= d < cluster.num_devices]
            if bad_devices:
                raise ConstraintError(
                    f"{where}: pinned to devices {bad_devices}, the cluster has "
                    f"{cluster.num_devices}"
                )
            bad_hosts = [h for h in c.hosts if not 0 <= h < cluster.num_hosts]
            if bad_hosts:
                raise ConstraintError(
                    f"{where}: pinned to hosts {bad_hosts}, the cluster has {cluster.num_hosts}"
                )
            if not c.allowed_devices(cluster):
                raise ConstraintError(
                    f"{where}: devices {list(c.devices)} and hosts {list(c.hosts)} leave no device"
                )
            if c.cache_fraction is not None and not 0.0 < c.cache_fraction <= 1.0:
                raise ConstraintError(
                    f"{where}: cache_fraction must be in (0, 1], got {c.cache_fraction}"
                )
        seen: dict[str, int] = {}
        for i, group in enumerate(self.colocate):
            for name in group:
                if name not in names:
                    raise ConstraintError(
                        f"co-location group {list(group)}: table {name!r} is not in the task"
                    )
                if name in seen:
                    raise ConstraintError(f"table {name!r} is in two co-location groups")
                seen[name] = i
                if not self.of(name).allows_type("table_wise"):
                    raise ConstraintError(
                        f"table {name!r}: co-located tables are placed table-wise, but its "
                        f"sharding types are {list(self.of(name).sharding_types)}"
                    )


# --------------------------------------------------------------------------- validation


def _table_from_record(
    record: Mapping[str, Any], index: int, source: str, extra: frozenset[str]
) -> TableSpec:
    if not isinstance(record, Mapping):
        raise TableSpecError(
            f"entry {index} is {type(record).__name__}, expected an object", source=source
        )
    label = _label(record, index)
    values: dict[str, Any] = {}
    for key, value in record.items():
        key = str(key)
        if key in extra:
            continue
        canon = _ALIASES.get(key, key)
        if canon not in _TABLE_FIELDS:
            near = difflib.get_close_matches(canon, [*_TABLE_FIELDS, *_ALIASES, *extra], n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise TableSpecError(f"unknown field{hint}", source=source, table=label, field_name=key)
        if canon in values:
            raise TableSpecError(
                f"given twice (as {key!r} and its alias)",
                source=source,
                table=label,
                field_name=canon,
            )
        values[canon] = value
    for required in ("name", "rows", "dim"):
        if required not in values:
            raise TableSpecError("missing", source=source, table=label, field_name=required)
    name = values["name"]
    if not isinstance(name, str) or not name.strip():
        raise TableSpecError(
            "must be a non-empty string", source=source, table=label, field_name="name"
        )
    _check_name(name, source, name, "name")
    rows = _integer(values["rows"], source, name, "rows")
    dim = _integer(values["dim"], source, name, "dim")
    if not 0 < rows <= MAX_ROWS:
        raise TableSpecError(
            f"must be between 1 and {MAX_ROWS}, got {rows}",
            source=source,
            table=name,
            field_name="rows",
        )
    if dim <= 0 or dim % DIM_MULTIPLE:
        raise TableSpecError(
            f"must be a positive multiple of {DIM_MULTIPLE}, got {dim}",
            source=source,
            table=name,
            field_name="dim",
        )
    if dim > MAX_DIM:
        raise TableSpecError(
            f"must be at most {MAX_DIM}, got {dim}", source=source, table=name, field_name="dim"
        )
    features = _features(values.get("features"), source, name)
    if "pooling_factor" in values:
        pooling = _pooling(values["pooling_factor"], source, name, "pooling_factor")
        if features and not math.isclose(
            pooling, sum(f.pooling_factor for f in features), rel_tol=1e-6
        ):
            raise TableSpecError(
                f"is {pooling} but its features' pooling factors sum to "
                f"{sum(f.pooling_factor for f in features)}",
                source=source,
                table=name,
                field_name="pooling_factor",
            )
    else:
        pooling = sum(f.pooling_factor for f in features) if features else 1.0
    if features == (FeatureSpec(name, pooling),):
        features = ()  # the default single feature: one canonical form
    hist = values.get("reuse_hist")
    reuse_hist = DLRM_REUSE_HIST if hist is None else _histogram(hist, source, name)
    pooled = values.get("pooled", True)
    if not isinstance(pooled, bool):
        raise TableSpecError(
            f"must be true or false, got {pooled!r}", source=source, table=name, field_name="pooled"
        )
    module = values.get("module", "")
    if not isinstance(module, str):
        raise TableSpecError(
            f"must be a string, got {module!r}", source=source, table=name, field_name="module"
        )
    return TableSpec(
        name=name,
        rows=rows,
        dim=dim,
        pooling_factor=pooling,
        reuse_hist=reuse_hist,
        features=features,
        pooled=pooled,
        module=module,
    )


_LINE_BREAKING = ("Cc", "Zl", "Zp", "Cs")  # control characters, line breaks, lone surrogates


def _check_name(name: str, source: str, table: str, field_name: str) -> None:
    """Names go into files, logs and one-line errors: no control characters, line breaks
    or lone surrogates, no surrounding spaces, at most :data:`MAX_NAME_LENGTH` characters.
    Export formats add their own rules (TorchRec's: ``check_torchrec_names``)."""
    if len(name) > MAX_NAME_LENGTH:
        raise TableSpecError(
            f"longer than {MAX_NAME_LENGTH} characters",
            source=source,
            table=table[:40] + "...",
            field_name=field_name,
        )
    if name != name.strip() or any(unicodedata.category(c) in _LINE_BREAKING for c in name):
        raise TableSpecError(
            f"{name!r} has control characters or surrounding spaces",
            source=source,
            table=table,
            field_name=field_name,
        )


def _label(record: Mapping[str, Any], index: int) -> str:
    name = record.get("name")
    return name if isinstance(name, str) and name.strip() else f"#{index}"


def _number(value: Any, source: str, table: str, field_name: str) -> float:
    if isinstance(value, bool):
        raise TableSpecError(
            f"must be a number, got {value!r}", source=source, table=table, field_name=field_name
        )
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise TableSpecError(
            f"must be a number, got {value!r}", source=source, table=table, field_name=field_name
        ) from None
    if not math.isfinite(number):
        raise TableSpecError(
            f"must be finite, got {value!r}", source=source, table=table, field_name=field_name
        )
    return number


def _integer(value: Any, source: str, table: str, field_name: str) -> int:
    number = _number(value, source, table, field_name)
    if number != int(number):
        raise TableSpecError(
            f"must be a whole number, got {value!r}",
            source=source,
            table=table,
            field_name=field_name,
        )
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # exact, even past 2**53
    return int(number)


def _pooling(value: Any, source: str, table: str, field_name: str) -> float:
    pooling = _number(value, source, table, field_name)
    if not 0 < pooling <= MAX_POOLING_FACTOR:
        raise TableSpecError(
            f"must be in (0, {MAX_POOLING_FACTOR:g}], got {pooling}",
            source=source,
            table=table,
            field_name=field_name,
        )
    return pooling


def _features(value: Any, source: str, table: str) -> tuple[FeatureSpec, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise TableSpecError(
            "must be a non-empty list of features",
            source=source,
            table=table,
            field_name="features",
        )
    out = []
    for i, f in enumerate(value):
        if isinstance(f, str):
            f = {"name": f}
        if not isinstance(f, Mapping) or not isinstance(f.get("name"), str) or not f["name"]:
            raise TableSpecError(
                f"feature {i} needs a non-empty 'name'",
                source=source,
                table=table,
                field_name="features",
            )
        _check_name(f["name"], source, table, "features")
        unknown = set(f) - {"name", "pooling_factor", "weighted"}
        if unknown:
            raise TableSpecError(
                f"feature {f['name']!r} has unknown keys {sorted(unknown)}",
                source=source,
                table=table,
                field_name="features",
            )
        weighted = f.get("weighted", False)
        if not isinstance(weighted, bool):
            raise TableSpecError(
                f"feature {f['name']!r}: 'weighted' must be true or false",
                source=source,
                table=table,
                field_name="features",
            )
        out.append(
            FeatureSpec(
                f["name"],
                _pooling(f.get("pooling_factor", 1.0), source, table, "features.pooling_factor"),
                weighted,
            )
        )
    if len({f.name for f in out}) != len(out):
        raise TableSpecError(
            "feature names repeat", source=source, table=table, field_name="features"
        )
    return tuple(out)


def _histogram(value: Any, source: str, table: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TableSpecError(
            f"must be a list of {NUM_HIST_BINS} fractions",
            source=source,
            table=table,
            field_name="reuse_hist",
        )
    if len(value) != NUM_HIST_BINS:
        raise TableSpecError(
            f"must have {NUM_HIST_BINS} bins, got {len(value)}",
            source=source,
            table=table,
            field_name="reuse_hist",
        )
    bins = [_number(v, source, table, "reuse_hist") for v in value]
    if any(b < 0 for b in bins):
        raise TableSpecError(
            "fractions must be >= 0", source=source, table=table, field_name="reuse_hist"
        )
    total = sum(bins)
    if abs(total - 1.0) > HIST_TOLERANCE:
        raise TableSpecError(
            f"fractions must sum to 1, got {total:.4f}",
            source=source,
            table=table,
            field_name="reuse_hist",
        )
    if abs(total - 1.0) <= 1e-9:
        return tuple(bins)  # already normalised: keep exact values so files round-trip
    return tuple(b / total for b in bins)


# --------------------------------------------------------------------------- interfaces


@dataclass(frozen=True)
class Traffic:
    """What plans move per device beyond the pooled all-to-all of their table- and
    column-wise shards (which :meth:`CostEstimator.fwd_comm_ms` and ``bwd_comm_ms`` price
    from dim sums). Each field is an array of shape ``(..., num_devices)``, one row per
    candidate plan, in bytes (or counts) per training iteration; :mod:`neuroshard.traffic`
    works them out per sharding type and documents each formula.

    ``fwd_*`` / ``bwd_*``: the forward and backward collectives of row-wise,
    table-row-wise and data-parallel tables: bytes on the busiest link of each level
    (``intra``: NVLink inside a host, ``inter``: the NIC across hosts), collective launches
    (``calls``) and synchronisation steps (``steps``: log2 of each group's size, summed).
    ``ids_*``: the input all-to-all of ids, the larger of send and receive per level.
    ``host_bytes``: what ``fused_uvm_caching`` shards fetch and write back over the host
    link (their cache misses).
    """

    fwd_intra_bytes: np.ndarray
    fwd_inter_bytes: np.ndarray
    bwd_intra_bytes: np.ndarray
    bwd_inter_bytes: np.ndarray
    fwd_calls: np.ndarray
    fwd_steps: np.ndarray
    bwd_calls: np.ndarray
    bwd_steps: np.ndarray
    ids_intra_bytes: np.ndarray
    ids_inter_bytes: np.ndarray
    host_bytes: np.ndarray


class ExtraCosts(NamedTuple):
    """The ms :class:`Traffic` costs per device, each ``(..., num_devices)``: forward and
    backward collectives, the input all-to-all (before overlap) and host-link transfers."""

    fwd_ms: np.ndarray
    bwd_ms: np.ndarray
    input_ms: np.ndarray
    host_ms: np.ndarray


@runtime_checkable
class CostEstimator(Protocol):
    """Costs of a plan's pieces, in ms, batched.

    ``loads`` is a batch of device loads; a load is the list of shards on one device, each
    shard given as a :class:`TableSpec` whose ``dim`` is the shard's width (and, for a row
    block, its rows and its share of the ids: :meth:`TableSpec.shard_view`).
    ``dim_sums`` and ``waits_ms`` are ``(batch, num_devices)`` arrays: per device, the sum
    of its table- and column-wise shard widths, and how long it reached the forward
    all-to-all after the first device did (its compute + backward comm minus the smallest
    across devices).

    Three optional methods, found with ``getattr``:

    * ``for_cluster(cluster) -> CostEstimator``: the estimator for that topology (the sim
      backend and the any-cluster neural models take the cluster's hosts and bandwidths);
    * ``extra_ms(traffic: Traffic) -> ExtraCosts``: prices what the other sharding types
      and kernels move. Without it, :func:`neuroshard.traffic.analytic_extra_ms` prices it
      from the cluster's bandwidths (or the defaults documented there);
    * ``members() -> list[CostEstimator]``: an ensemble's members, each pricing on its own;
      the search's margin asks all of them to agree
      (:func:`neuroshard.search.scoring.member_costs`). Without it, the estimator alone.
    """

    name: str
    batch_size: int

    def compute_ms(self, loads: Sequence[Sequence[TableSpec]]) -> np.ndarray:
        """Fused forward+backward of each load, shape ``(len(loads),)``."""
        ...

    def bwd_comm_ms(self, dim_sums: np.ndarray) -> np.ndarray:
        """Backward all-to-all per device, shape ``dim_sums.shape``."""
        ...

    def fwd_comm_ms(self, dim_sums: np.ndarray, waits_ms: np.ndarray) -> np.ndarray:
        """Forward all-to-all per device including the wait for stragglers, ``dim_sums.shape``."""
        ...


@dataclass(frozen=True)
class Timing:
    """One measured quantity: median of repeats and relative spread ((p75-p25)/median)."""

    median_ms: float
    spread: float = 0.0
    repeats: int = 1


@runtime_checkable
class HardwareBackend(Protocol):
    """Measures (or simulates) costs one sample at a time, and says where it ran."""

    name: str
    batch_size: int

    def measure_compute(self, load: Sequence[TableSpec]) -> Timing: ...

    def measure_comm(
        self, dim_sums: Sequence[int], waits_ms: Sequence[float]
    ) -> tuple[list[Timing], list[Timing]]:
        """Per-device (forward, backward) all-to-all timings for one plan."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """Processor or GPU name, core count, library versions, batch size, profile."""
        ...


@runtime_checkable
class Searcher(Protocol):
    """Chooses a plan for ``tables`` on ``cluster`` under ``estimator``'s costs.

    ``budget_s`` (None: the searcher's own pace) bounds the search's time; searchers that
    cannot trade time for quality finish well inside any budget and may ignore it. The
    planner checks feasibility before, and times, prices and labels the plan after.
    """

    def __call__(
        self,
        tables: Sequence[TableSpec],
        cluster: Cluster,
        estimator: CostEstimator,
        *,
        seed: int = 0,
        budget_s: float | None = None,
    ) -> Plan: ...

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

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

BYTES_PER_FLOAT = 4
NUM_HIST_BINS = 17
DIM_MULTIPLE = 4
DEFAULT_BATCH_SIZE = 65_536

# Access-count bin edges of the reuse histogram: (0,1], (1,2], (2,4], ..., (16384,32768],
# and above 32768 -- 17 bins (shared/REFERENCE.md).
HIST_UPPER_EDGES: tuple[float, ...] = tuple(float(2**k) for k in range(16)) + (math.inf,)

# Dataset-wide fraction of unique indices per access-count bin, public DLRM data
# (shared/REFERENCE.md); the tail bins the reference rounds to 0.000 get a small mass so
# the histogram sums to 1.
DLRM_REUSE_HIST: tuple[float, ...] = (
    0.473, 0.152, 0.139, 0.112, 0.072, 0.032, 0.011, 0.005, 0.002, 0.001,
    0.0004, 0.0002, 0.0001, 0.00005, 0.00003, 0.00001, 0.00001,
)
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

    def __init__(self, message: str, *, source: str | None = None, table: str | None = None,
                 field_name: str | None = None):
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
    """A plan file or plan object breaks the ``neuroshard.plan/v1`` contract."""


class PlanInfeasibleError(NeuroShardError):
    """No plan fits the memory caps. Names the tables and the bytes needed vs available."""


class ModelMismatchError(NeuroShardError):
    """A cost model was trained for another backend, batch size or feature schema."""


class ModelFileError(NeuroShardError):
    """A model directory is missing, truncated or tampered with."""


class BackendError(NeuroShardError):
    """A hardware backend cannot run here (missing library, device) or a measurement failed."""


class UsageError(NeuroShardError, ValueError):
    """A command-line option or argument has a value the library cannot use."""


class UnknownNameError(NeuroShardError, ValueError):
    """A registry was asked for a name it does not have; the message lists valid names."""


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class TableSpec:
    """One embedding table: its shape and access statistics for one batch."""

    name: str
    rows: int
    dim: int
    pooling_factor: float = 1.0
    reuse_hist: tuple[float, ...] = DLRM_REUSE_HIST

    @property
    def size_bytes(self) -> int:
        return self.rows * self.dim * BYTES_PER_FLOAT

    def column_bytes(self, width: int) -> int:
        """Memory of a column shard ``width`` wide."""
        return self.rows * width * BYTES_PER_FLOAT

    def with_dim(self, dim: int) -> "TableSpec":
        """The same table at another width: a column shard's compute view, or an augmented copy."""
        return replace(self, dim=dim)

    def features(self) -> tuple[float, ...]:
        """Raw feature vector in :data:`FEATURE_NAMES` order (17 reuse bins, dim, pooling, rows)."""
        return (*self.reuse_hist, float(self.dim), float(self.pooling_factor), float(self.rows))


@dataclass(frozen=True)
class Cluster:
    """Devices to shard onto: count, memory cap of each, and the global batch size."""

    num_devices: int
    memory_per_device_bytes: tuple[int, ...]
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {self.num_devices}")
        if len(self.memory_per_device_bytes) != self.num_devices:
            raise ValueError(
                f"memory_per_device_bytes has {len(self.memory_per_device_bytes)} entries "
                f"for {self.num_devices} devices"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def uniform(cls, num_devices: int, memory_bytes: int,
                batch_size: int = DEFAULT_BATCH_SIZE) -> "Cluster":
        return cls(num_devices, (int(memory_bytes),) * num_devices, batch_size)

    @property
    def total_memory_bytes(self) -> int:
        return sum(self.memory_per_device_bytes)


@dataclass(frozen=True)
class Shard:
    """A half-open column range ``[start, end)`` of one table, placed on one device."""

    table: str
    start: int
    end: int
    device: int

    @property
    def width(self) -> int:
        return self.end - self.start


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


@dataclass(frozen=True)
class Plan:
    """A sharding plan: every table's column shards and their devices, plus optional cost."""

    tables: tuple[TableSpec, ...]
    shards: tuple[Shard, ...]
    cluster: Cluster
    cost: PlanCost | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def shards_of(self, name: str) -> tuple[Shard, ...]:
        return tuple(sorted((s for s in self.shards if s.table == name), key=lambda s: s.start))

    def device_loads(self) -> list[list[TableSpec]]:
        """For each device, the compute view of its shards (tables narrowed to shard width)."""
        by_name = {t.name: t for t in self.tables}
        loads: list[list[TableSpec]] = [[] for _ in range(self.cluster.num_devices)]
        for s in self.shards:
            loads[s.device].append(by_name[s.table].with_dim(s.width))
        return loads

    def memory_bytes(self) -> list[int]:
        by_name = {t.name: t for t in self.tables}
        mem = [0] * self.cluster.num_devices
        for s in self.shards:
            mem[s.device] += by_name[s.table].column_bytes(s.width)
        return mem

    def dim_sums(self) -> list[int]:
        sums = [0] * self.cluster.num_devices
        for s in self.shards:
            sums[s.device] += s.width
        return sums

    def with_cost(self, cost: PlanCost) -> "Plan":
        return replace(self, cost=cost)


# --------------------------------------------------------------------------- interfaces


@runtime_checkable
class CostEstimator(Protocol):
    """Costs of a plan's pieces, in ms, batched.

    ``loads`` is a batch of device loads; a load is the list of shards on one device, each
    shard given as a :class:`TableSpec` whose ``dim`` is the shard's width.
    ``dim_sums`` and ``waits_ms`` are ``(batch, num_devices)`` arrays: per device, the sum
    of its shard widths, and how long it reached the forward all-to-all after the first
    device did (its compute + backward comm minus the smallest across devices).
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

    def measure_compute(self, load: Sequence[TableSpec]) -> Timing:
        ...

    def measure_comm(self, dim_sums: Sequence[int],
                     waits_ms: Sequence[float]) -> tuple[list[Timing], list[Timing]]:
        """Per-device (forward, backward) all-to-all timings for one plan."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """Processor or GPU name, core count, library versions, batch size, profile."""
        ...


@runtime_checkable
class Searcher(Protocol):
    """Chooses a plan for ``tables`` on ``cluster`` under ``estimator``'s costs."""

    def __call__(self, tables: Sequence[TableSpec], cluster: Cluster,
                 estimator: CostEstimator, *, seed: int = 0) -> Plan:
        ...

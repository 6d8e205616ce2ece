"""Training samples for the cost models: augmented tables, compute loads, comm tasks.

* :func:`augment_tables` copies every table at its dim halved again and again while the
  half stays a multiple of 4 (128 -> 128, 64, 32, 16, 8, 4): the widths column shards get.
* :func:`shrink_tables` adds copies of tables with ``rows / f`` and every access count
  times ``f``: the same lookups on a smaller table, its reuse histogram moved ``log2 f``
  bins hotter. Small, hot tables are rare in a pool of a few hundred, and a model that
  never saw one extrapolates badly on it (measured on the held-out half of the pool).
* :func:`sample_compute_loads` draws device loads: 1 to ``max_tables`` distinct augmented
  tables whose total size fits the memory cap.
* :func:`sample_comm_tasks` draws sharding plans of random tasks: 10 to 60 tables, a few
  column splits like the search makes, placed on devices by a Dirichlet-weighted choice
  whose concentration is itself random (balanced and skewed plans both appear), giving
  per-device dim sums, plus random per-device waits.

Samples are frozen dataclasses with a stable ``key`` (a hash of their content and index),
so a collection that stops can resume where it left off.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from neuroshard.types import DIM_MULTIPLE, TableSpec

GB = 1 << 30
DEFAULT_MEMORY_CAP_BYTES = 4 * GB

MIN_ROWS = 100  # the public data's floor (rows = max index + 1, at least 100)

__all__ = [
    "CommSample",
    "ComputeSample",
    "augment_tables",
    "sample_comm_tasks",
    "sample_compute_loads",
    "shrink_tables",
    "shift_reuse_hist",
]


def _digest(payload: object) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _table_payload(t: TableSpec) -> list:
    return [
        t.name,
        t.rows,
        t.dim,
        round(float(t.pooling_factor), 9),
        [round(float(x), 9) for x in t.reuse_hist],
    ]


@dataclass(frozen=True)
class ComputeSample:
    """One device load to time: the tables (at their augmented dims) on one device."""

    index: int
    tables: tuple[TableSpec, ...]

    @cached_property
    def key(self) -> str:
        return "c" + _digest([self.index, [_table_payload(t) for t in self.tables]])

    @property
    def size_bytes(self) -> int:
        return sum(t.size_bytes for t in self.tables)


@dataclass(frozen=True)
class CommSample:
    """One plan's all-to-all to time: per-device dim sums and waits (ms)."""

    index: int
    dim_sums: tuple[int, ...]
    waits_ms: tuple[float, ...]
    num_tables: int = 0  # shards in the task the dim sums came from; informative only

    @cached_property
    def key(self) -> str:
        return "m" + _digest(
            [self.index, list(self.dim_sums), [round(w, 9) for w in self.waits_ms]]
        )

    @property
    def num_devices(self) -> int:
        return len(self.dim_sums)


def halvings(dim: int) -> list[int]:
    dims = [dim]
    while dim % 2 == 0 and (dim // 2) % DIM_MULTIPLE == 0:
        dim //= 2
        dims.append(dim)
    return dims


def augment_tables(tables: Sequence[TableSpec]) -> list[TableSpec]:
    """Every table at its own dim and at each halving whose result is a multiple of 4.

    Copies keep the table's name (the pool a row came from stays recognisable): a 128-dim
    table gives 128, 64, 32, 16, 8, 4; a 100-dim table gives only 100 (50 is not a
    multiple of 4).
    """
    return [t.with_dim(d) for t in tables for d in halvings(t.dim)]


def shift_reuse_hist(hist: Sequence[float], bins: int) -> tuple[float, ...]:
    """A reuse histogram with every access count multiplied by ``2**bins``: bin ``j``'s
    mass moves to bin ``j + bins``; what would pass the last bin stays in it."""
    h = np.asarray(hist, dtype=np.float64)
    out = np.zeros_like(h)
    last = len(h) - 1
    for j, mass in enumerate(h):
        out[min(j + bins, last)] += mass
    return tuple(float(x) for x in out)


def shrink_tables(
    tables: Sequence[TableSpec],
    rng: np.random.Generator,
    *,
    factors: Sequence[int] = (4, 16, 64),
    copies: int = 1,
    min_rows: int = MIN_ROWS,
) -> list[TableSpec]:
    """``copies`` hotter copies of each table: ``rows // f`` rows (``f`` drawn from
    ``factors``, powers of 2) and the reuse histogram shifted ``log2 f`` bins hotter, the
    pooling factor and dim unchanged. Named ``"<name>@rows/<f>"``; a copy that would have
    fewer than ``min_rows`` rows is left out. Returns only the copies."""
    bad = [f for f in factors if f < 2 or f & (f - 1)]
    if bad:
        raise ValueError(f"shrink factors must be powers of 2 >= 2, got {bad}")
    out = []
    for t in tables:
        for f in rng.choice(np.asarray(factors), size=copies, replace=copies > len(factors)):
            f = int(f)
            if t.rows // f < min_rows:
                continue
            out.append(
                TableSpec(
                    name=f"{t.name}@rows/{f}",
                    rows=t.rows // f,
                    dim=t.dim,
                    pooling_factor=t.pooling_factor,
                    reuse_hist=shift_reuse_hist(t.reuse_hist, f.bit_length() - 1),
                )
            )
    return out


def sample_compute_loads(
    tables: Sequence[TableSpec],
    n: int,
    rng: np.random.Generator,
    *,
    max_tables: int = 15,
    min_tables: int = 1,
    memory_cap_bytes: int = DEFAULT_MEMORY_CAP_BYTES,
    start_index: int = 0,
) -> list[ComputeSample]:
    """``n`` loads of ``min_tables``..``max_tables`` distinct entries of ``tables``.

    Pass augmented tables (:func:`augment_tables`). Each load draws its table count
    uniformly, then adds tables in random order while their total size stays within
    ``memory_cap_bytes``; a load can come out smaller than drawn when the cap binds,
    never empty. Tables larger than the cap on their own are never drawn.
    """
    if not 1 <= min_tables <= max_tables:
        raise ValueError(f"need 1 <= min_tables <= max_tables, got {min_tables}, {max_tables}")
    fitting = [t for t in tables if t.size_bytes <= memory_cap_bytes]
    if not fitting:
        raise ValueError(f"no table fits in memory_cap_bytes={memory_cap_bytes}")
    sizes = np.array([t.size_bytes for t in fitting], dtype=np.int64)
    out = []
    for i in range(n):
        want = int(rng.integers(min_tables, max_tables + 1))
        order = rng.permutation(len(fitting))
        chosen: list[int] = []
        used = 0
        for j in order:
            if used + sizes[j] <= memory_cap_bytes:
                chosen.append(int(j))
                used += int(sizes[j])
                if len(chosen) == want:
                    break
        out.append(ComputeSample(start_index + i, tuple(fitting[j] for j in chosen)))
    return out


def _split_dims(dims: list[int], splits: int, rng: np.random.Generator) -> list[int]:
    """Halve ``splits`` random shards (each half a multiple of 4), as a column split does."""
    dims = list(dims)
    for _ in range(splits):
        can = [i for i, d in enumerate(dims) if d % 2 == 0 and (d // 2) % DIM_MULTIPLE == 0]
        if not can:
            break
        i = can[int(rng.integers(len(can)))]
        dims[i] //= 2
        dims.append(dims[i])
    return dims


def sample_comm_tasks(
    tables: Sequence[TableSpec],
    n: int,
    rng: np.random.Generator,
    num_devices: int | Sequence[int],
    *,
    min_tables: int = 10,
    max_tables: int = 60,
    max_splits: int = 10,
    wait_range_ms: tuple[float, float] = (1.0, 20.0),
    zero_wait_fraction: float = 0.2,
    concentration_log10_range: tuple[float, float] = (-1.0, 2.0),
    start_index: int = 0,
) -> list[CommSample]:
    """``n`` random plans' per-device dim sums and waits.

    Each sample: a task of ``min_tables``..``max_tables`` distinct tables (fewer when the
    pool is smaller); up to ``max_splits`` column splits; shards placed on devices drawn
    from Dirichlet weights with concentration ``10**U(range)`` (small: skewed, large:
    balanced); waits uniform in ``wait_range_ms`` per device, or all zero for a
    ``zero_wait_fraction`` of samples. ``num_devices`` may be a sequence of device
    counts, one drawn per sample.
    """
    if not tables:
        raise ValueError("sample_comm_tasks needs at least one table")
    counts = [num_devices] if isinstance(num_devices, (int, np.integer)) else list(num_devices)
    if not counts or min(counts) < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    dims_pool = np.array([t.dim for t in tables], dtype=np.int64)
    lo_t = min(min_tables, len(tables))
    hi_t = min(max_tables, len(tables))
    out = []
    for i in range(n):
        n_dev = int(counts[int(rng.integers(len(counts)))])
        k = int(rng.integers(lo_t, hi_t + 1))
        dims = [int(d) for d in dims_pool[rng.choice(len(tables), size=k, replace=False)]]
        dims = _split_dims(dims, int(rng.integers(0, max_splits + 1)), rng)
        alpha = 10.0 ** rng.uniform(*concentration_log10_range)
        weights = rng.dirichlet(np.full(n_dev, alpha))
        weights = weights / weights.sum()
        devices = rng.choice(n_dev, size=len(dims), p=weights)
        dim_sums = np.bincount(devices, weights=dims, minlength=n_dev).astype(np.int64)
        if rng.random() < zero_wait_fraction:
            waits = np.zeros(n_dev)
        else:
            waits = np.round(rng.uniform(*wait_range_ms, size=n_dev), 6)
        out.append(
            CommSample(
                start_index + i,
                tuple(int(x) for x in dim_sums),
                tuple(float(w) for w in waits),
                num_tables=len(dims),
            )
        )
    return out

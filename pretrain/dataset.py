"""Read collected Parquet back into arrays for training, and split it.

:func:`load_compute` and :func:`load_comm` read every part file under a directory (as
written by :mod:`neuroshard.pretrain.collect`), order rows by key so the result does not
depend on how the collection was chunked or resumed, and optionally keep only a given
set of keys. :func:`split_random` splits 80/10/10 by a seeded permutation;
:func:`split_by_tables` holds out the rows whose tables all come from a named pool.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Collection, Iterable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from neuroshard.features import NUM_FEATURES, pad_loads, transform_raw
from neuroshard.pretrain.collect import DatasetError, SCHEMAS, _read_part, part_files

logger = logging.getLogger(__name__)

__all__ = [
    "CommData", "ComputeData", "Split", "load_comm", "load_compute", "sample_keys",
    "split_by_tables", "split_random",
]


class Split(NamedTuple):
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _hash_arrays(keys: np.ndarray, *arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update("\n".join(keys.tolist()).encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class ComputeData:
    """Compute samples: ragged tables per row (``offsets``) and one label per row."""

    keys: np.ndarray  # (n,) str
    offsets: np.ndarray  # (n + 1,) int64: row i's tables are features[offsets[i]:offsets[i+1]]
    features: np.ndarray  # (total tables, 20) float64, raw
    table_names: np.ndarray  # (total tables,) str
    label_ms: np.ndarray  # (n,)
    spread: np.ndarray  # (n,)
    fingerprint: str  # backend fingerprint (JSON) of the rows

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_tables(self) -> np.ndarray:
        return np.diff(self.offsets)

    def names_of(self, i: int) -> list[str]:
        return self.table_names[self.offsets[i]: self.offsets[i + 1]].tolist()

    def subset(self, idx: Iterable[int]) -> "ComputeData":
        idx = np.asarray(list(idx) if not isinstance(idx, np.ndarray) else idx, dtype=np.int64)
        counts = np.diff(self.offsets)[idx]
        starts = self.offsets[:-1][idx]
        take = (np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
                + np.arange(counts.sum()))
        return ComputeData(self.keys[idx], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                           self.features[take], self.table_names[take], self.label_ms[idx],
                           self.spread[idx], self.fingerprint)

    def padded(self, max_tables: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Transformed features ``(n, maxT, 20)`` float32 and mask ``(n, maxT)``."""
        feats = transform_raw(self.features)
        return pad_loads([feats[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])],
                         max_tables)

    def data_hash(self) -> str:
        return _hash_arrays(self.keys, self.label_ms)


@dataclass(frozen=True, eq=False)
class CommData:
    """Comm samples padded to the largest device count; ``mask`` marks real devices."""

    keys: np.ndarray  # (n,) str
    num_devices: np.ndarray  # (n,) int
    dim_sums: np.ndarray  # (n, maxN) float64
    waits_ms: np.ndarray  # (n, maxN)
    fwd_ms: np.ndarray  # (n, maxN)
    bwd_ms: np.ndarray  # (n, maxN)
    mask: np.ndarray  # (n, maxN) bool
    fingerprint: str
    num_tables: np.ndarray | None = None  # (n,) shards in the plan each sample came from

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx: Iterable[int]) -> "CommData":
        idx = np.asarray(list(idx) if not isinstance(idx, np.ndarray) else idx, dtype=np.int64)
        width = int(self.num_devices[idx].max()) if len(idx) else 1
        return CommData(self.keys[idx], self.num_devices[idx],
                        *(a[idx, :width] for a in (self.dim_sums, self.waits_ms, self.fwd_ms,
                                                   self.bwd_ms, self.mask)),
                        fingerprint=self.fingerprint,
                        num_tables=None if self.num_tables is None else self.num_tables[idx])

    def data_hash(self) -> str:
        return _hash_arrays(self.keys, self.fwd_ms[self.mask], self.bwd_ms[self.mask])


def _read_dir(data_dir: str | os.PathLike, kind: str,
              keys: Collection[str] | None) -> pa.Table:
    parts = part_files(data_dir)
    if not parts:
        raise DatasetError(f"{data_dir}: no part files ({kind} data not collected?)")
    schema = SCHEMAS[kind]
    tables = []
    for p in parts:
        t = _read_part(p)
        missing = [n for n in schema.names if n not in t.column_names]
        if missing:
            raise DatasetError(f"{p}: not {kind} data (missing columns {missing})")
        tables.append(t.select(schema.names).cast(schema))
    table = pa.concat_tables(tables)
    if keys is not None:
        table = table.filter(pc.is_in(table.column("key"), value_set=pa.array(sorted(keys),
                                                                              pa.string())))
    table = table.take(pc.sort_indices(table, [("key", "ascending")]))
    key_arr = np.asarray(table.column("key").to_pylist(), dtype=object)
    if len(key_arr) > 1:
        dup = key_arr[1:] == key_arr[:-1]
        if dup.any():
            logger.warning("%s: %d duplicate keys, keeping the first of each", data_dir,
                           int(dup.sum()))
            table = table.filter(pa.array(np.concatenate([[True], ~dup])))
    if keys is not None and table.num_rows < len(keys):
        logger.warning("%s: %d of %d requested keys not on disk", data_dir,
                       len(keys) - table.num_rows, len(keys))
    fps = set(pc.unique(table.column("fingerprint")).to_pylist())
    if len(fps) > 1:
        raise DatasetError(f"{data_dir}: rows from {len(fps)} different backend fingerprints")
    return table


def _list_offsets(col: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0], arr.flatten()


def _first_fingerprint(table: pa.Table) -> str:
    return table.column("fingerprint")[0].as_py() if table.num_rows else "{}"


def sample_keys(data_dir: str | os.PathLike) -> dict[int, str]:
    """Sample index -> key of every row under ``data_dir`` (compute or comm). Raises
    :class:`DatasetError` when one index has two keys (rows of runs with other seeds)."""
    parts = part_files(data_dir)
    if not parts:
        raise DatasetError(f"{data_dir}: no part files")
    out: dict[int, str] = {}
    for p in parts:
        t = _read_part(p)
        if "index" not in t.column_names or "key" not in t.column_names:
            raise DatasetError(f"{p}: no index and key columns")
        for index, key in zip(t.column("index").to_pylist(), t.column("key").to_pylist()):
            if out.setdefault(index, key) != key:
                raise DatasetError(f"{p}: sample index {index} has two keys, {out[index]} "
                                   f"and {key} (runs with other seeds in one directory?)")
    return out


def load_compute(data_dir: str | os.PathLike,
                 keys: Collection[str] | None = None) -> ComputeData:
    """Compute rows under ``data_dir`` (only ``keys`` when given), ordered by key."""
    t = _read_dir(data_dir, "compute", keys)
    offsets, per_table = _list_offsets(t.column("features"))
    inner_offsets, values = _list_offsets(pa.chunked_array([per_table]))
    if np.any(np.diff(inner_offsets) != NUM_FEATURES):
        raise DatasetError(f"{data_dir}: a table has other than {NUM_FEATURES} features")
    name_offsets, names = _list_offsets(t.column("table_names"))
    if not np.array_equal(name_offsets, offsets):
        raise DatasetError(f"{data_dir}: table_names and features disagree in length")
    return ComputeData(
        keys=np.asarray(t.column("key").to_pylist(), dtype=object),
        offsets=offsets,
        features=values.to_numpy(zero_copy_only=False).reshape(-1, NUM_FEATURES).astype(np.float64),
        table_names=np.asarray(names.to_pylist(), dtype=object),
        label_ms=t.column("label_ms").to_numpy().astype(np.float64),
        spread=t.column("spread").to_numpy().astype(np.float64),
        fingerprint=_first_fingerprint(t),
    )


def _padded(col: pa.ChunkedArray, counts: np.ndarray, width: int) -> np.ndarray:
    offsets, values = _list_offsets(col)
    if not np.array_equal(np.diff(offsets), counts):
        raise DatasetError(f"comm row lists disagree with num_devices in column {col}")
    flat = values.to_numpy(zero_copy_only=False).astype(np.float64)
    out = np.zeros((len(counts), width))
    mask = np.arange(width)[None, :] < counts[:, None]
    out[mask] = flat
    return out


def load_comm(data_dir: str | os.PathLike, keys: Collection[str] | None = None) -> CommData:
    """Comm rows under ``data_dir`` (only ``keys`` when given), ordered by key."""
    t = _read_dir(data_dir, "comm", keys)
    counts = t.column("num_devices").to_numpy().astype(np.int64)
    width = int(counts.max()) if len(counts) else 1
    mask = np.arange(width)[None, :] < counts[:, None]
    return CommData(
        keys=np.asarray(t.column("key").to_pylist(), dtype=object),
        num_devices=counts,
        dim_sums=_padded(t.column("dim_sums"), counts, width),
        waits_ms=_padded(t.column("waits_ms"), counts, width),
        fwd_ms=_padded(t.column("fwd_ms"), counts, width),
        bwd_ms=_padded(t.column("bwd_ms"), counts, width),
        mask=mask,
        fingerprint=_first_fingerprint(t),
        num_tables=t.column("num_tables").to_numpy().astype(np.int64),
    )


def split_random(n: int, seed: int = 0,
                 fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> Split:
    """Train/val/test indices from a seeded permutation of ``range(n)``."""
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1: {fractions}")
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return Split(np.sort(perm[:n_train]), np.sort(perm[n_train:n_train + n_val]),
                 np.sort(perm[n_train + n_val:]))


def split_by_tables(data: ComputeData, test_names: Collection[str], seed: int = 0,
                    val_fraction: float = 0.1) -> Split:
    """Rows whose tables all lie in ``test_names`` are the test set.

    Rows with no table in ``test_names`` are split into train and validation by a seeded
    permutation; rows mixing both pools are dropped, so no test table is seen in training.
    """
    names = set(test_names)
    in_test = np.fromiter((n in names for n in data.table_names), dtype=bool,
                          count=len(data.table_names))
    cum = np.concatenate([[0], np.cumsum(in_test, dtype=np.int64)])
    n_in = cum[data.offsets[1:]] - cum[data.offsets[:-1]]
    counts = data.num_tables
    test = np.flatnonzero((n_in == counts) & (counts > 0))
    rest = np.flatnonzero(n_in == 0)
    dropped = len(data) - len(test) - len(rest)
    if dropped:
        logger.info("split_by_tables: dropped %d rows mixing both pools", dropped)
    perm = np.random.default_rng(seed).permutation(rest)
    n_val = int(round(val_fraction * len(rest)))
    return Split(np.sort(perm[n_val:]), np.sort(perm[:n_val]), test)


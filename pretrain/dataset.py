"""Read collected Parquet back into arrays for training.

:func:`load_compute` and :func:`load_comm` read every part file under a directory (as
written by :mod:`neuroshard.pretrain.collect`), order rows by key so the result does not
depend on how the collection was chunked or resumed, and optionally keep only a given
set of keys. They return the core's :class:`~neuroshard.samples.ComputeData` and
:class:`~neuroshard.samples.CommData`, which the models fit on and which
:mod:`neuroshard.samples` splits.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from neuroshard.features import NUM_FEATURES
from neuroshard.pretrain.collect import SCHEMAS, DatasetError, part_files, read_part
from neuroshard.samples import CommData, ComputeData

logger = logging.getLogger(__name__)

__all__ = ["load_comm", "load_compute", "sample_keys"]


def _read_dir(data_dir: str | os.PathLike, kind: str, keys: Collection[str] | None) -> pa.Table:
    parts = part_files(data_dir)
    if not parts:
        raise DatasetError(f"{data_dir}: no part files ({kind} data not collected?)")
    schema = SCHEMAS[kind]
    tables = []
    for p in parts:
        t = read_part(p)
        missing = [n for n in schema.names if n not in t.column_names]
        if missing:
            raise DatasetError(f"{p}: not {kind} data (missing columns {missing})")
        tables.append(t.select(schema.names).cast(schema))
    table = pa.concat_tables(tables)
    if keys is not None:
        table = table.filter(
            pc.is_in(table.column("key"), value_set=pa.array(sorted(keys), pa.string()))
        )
    table = table.take(pc.sort_indices(table, [("key", "ascending")]))
    key_arr = np.asarray(table.column("key").to_pylist(), dtype=object)
    if len(key_arr) > 1:
        dup = key_arr[1:] == key_arr[:-1]
        if dup.any():
            logger.warning(
                "%s: %d duplicate keys, keeping the first of each", data_dir, int(dup.sum())
            )
            table = table.filter(pa.array(np.concatenate([[True], ~dup])))
    if keys is not None and table.num_rows < len(keys):
        logger.warning(
            "%s: %d of %d requested keys not on disk",
            data_dir,
            len(keys) - table.num_rows,
            len(keys),
        )
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
        t = read_part(p)
        if "index" not in t.column_names or "key" not in t.column_names:
            raise DatasetError(f"{p}: no index and key columns")
        for index, key in zip(
            t.column("index").to_pylist(), t.column("key").to_pylist(), strict=True
        ):
            if out.setdefault(index, key) != key:
                raise DatasetError(
                    f"{p}: sample index {index} has two keys, {out[index]} "
                    f"and {key} (runs with other seeds in one directory?)"
                )
    return out


def load_compute(data_dir: str | os.PathLike, keys: Collection[str] | None = None) -> ComputeData:
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

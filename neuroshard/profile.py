"""Table profiler: table specs from real lookup data.

Users rarely know their tables' pooling factors or reuse (TorchRec issue #2416). Give
:func:`profile_tables` a file of real lookups and it returns one
:class:`~neuroshard.types.TableSpec` per table:

* ``rows`` -- the given row count, else max index + 1 (at least 100);
* ``pooling_factor`` -- mean bag length: lookups / bags;
* ``reuse_hist`` -- fraction of distinct indices whose access count in a batch falls in
  each bin of :data:`~neuroshard.types.HIST_UPPER_EDGES`. With ``batch_size`` the samples
  are cut into consecutive batches of that many and the counts taken per batch (so the
  histogram means "per batch of ``batch_size``", as the planner's batch); without it the
  whole file is one batch.
* ``dim`` -- lookups do not carry it: ``dims`` gives it per table (or one int for all),
  default 128.

Input formats, chosen by content (Parquet by suffix ``.parquet`` / ``.pq``):

1. a TorchRec ``KeyedJaggedTensor`` saved with ``torch.save`` -- one table per key;
2. a dict ``{table_name: {"indices": tensor, "offsets": tensor}}`` saved with
   ``torch.save`` (``offsets`` has one entry per bag plus the final end; ``"lengths"`` may
   replace ``"offsets"``);
3. a Parquet file with columns ``table``, ``sample`` (bag id within the batch) and ``id``
   (the row looked up), one row per lookup. Bags with no lookups do not appear in it, so
   the number of bags is the number of distinct ``sample`` values in the whole file.

The specs are validated as any table config is (:func:`~neuroshard.tables.tables_from_records`:
names unique, printable and non-empty, rows and dims in range), so what ``profile``
writes, ``plan`` reads. Table keys that are not strings (say the integer ``5``) become
their text (``"5"``); two keys with one text are an error.

``torch.save`` files are read with ``torch.load(weights_only=True)``: no code in the file
runs. For KeyedJaggedTensors, torchrec's ``KeyedJaggedTensor`` and ``JaggedTensor`` are
allowed as safe classes for that one load (restored from their attributes, no code run).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from neuroshard.indices import access_counts, histogram_of_counts
from neuroshard.paths import input_problem
from neuroshard.types import MAX_ROWS, NUM_HIST_BINS, TableSpec, TableSpecError

logger = logging.getLogger(__name__)

DEFAULT_DIM = 128
MIN_ROWS = 100
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_COLUMNS = ("table", "sample", "id")
_TORCHREC_JT = "torchrec.sparse.jagged_tensor."


@dataclass(frozen=True)
class Lookups:
    """One table's lookups for a run of bags: bag ``b`` is ``indices[offsets[b]:offsets[b+1]]``."""

    name: str
    indices: np.ndarray  # int64
    offsets: np.ndarray  # int64, len = bags + 1


def profile_tables(
    input_path: str | os.PathLike,
    batch_size: int | None = None,
    *,
    dims: int | Mapping[str, int] = DEFAULT_DIM,
    rows: Mapping[str, int] | None = None,
) -> list[TableSpec]:
    """Table specs (rows, pooling factor, reuse histogram, dim) measured from lookup data."""
    source = os.fspath(input_path)
    if batch_size is not None and batch_size < 1:
        raise TableSpecError(f"batch_size must be >= 1, got {batch_size}", source=source)
    tables = list(read_lookups(source))
    if not tables:
        raise TableSpecError("no tables in the file", source=source)
    specs = []
    for t in tables:
        dim = dims if isinstance(dims, int) else dims.get(t.name, DEFAULT_DIM)
        given_rows = None if rows is None else rows.get(t.name)
        specs.append(_spec(t, source, batch_size, int(dim), given_rows))
    from neuroshard.tables import tables_from_records

    # the one validation every table config gets: what profile writes, plan reads
    checked = tables_from_records([s.to_record() for s in specs], source=source)
    logger.info("profiled %d tables from %s", len(checked), source)
    return checked


def read_lookups(path: str | os.PathLike) -> Iterator[Lookups]:
    """Each table's lookups from a file in one of the three formats (validated)."""
    source = os.fspath(path)
    problem = input_problem(source)
    if problem is not None:
        raise TableSpecError(problem, source=source)
    if source.lower().endswith(PARQUET_SUFFIXES):
        yield from _read_parquet(source)
        return
    obj = _torch_load(source)
    if _is_kjt(obj):
        yield from _from_kjt(obj, source)
    elif isinstance(obj, Mapping):
        yield from _from_dict(obj, source)
    else:
        raise TableSpecError(
            f"expected a KeyedJaggedTensor or a dict of tables, got {type(obj).__name__}",
            source=source,
        )


# --------------------------------------------------------------------------- statistics


def _spec(
    t: Lookups, source: str, batch_size: int | None, dim: int, given_rows: int | None
) -> TableSpec:
    bags = len(t.offsets) - 1
    if bags < 1:
        raise TableSpecError("no bags", source=source, table=t.name)
    if dim < 1:
        raise TableSpecError(
            f"dim must be >= 1, got {dim}", source=source, table=t.name, field_name="dim"
        )
    top = int(t.indices.max()) if t.indices.size else -1
    if top >= MAX_ROWS:
        raise TableSpecError(
            f"index {top} is beyond {MAX_ROWS} rows (a unit or id mistake?)",
            source=source,
            table=t.name,
            field_name="rows",
        )
    if given_rows is not None:
        if top >= given_rows:
            raise TableSpecError(
                f"index {top} out of range for {given_rows} rows",
                source=source,
                table=t.name,
                field_name="rows",
            )
        n_rows = int(given_rows)
    else:
        n_rows = max(top + 1, MIN_ROWS)
    if t.indices.size == 0:
        logger.warning(
            "%s: table %r has no lookups; reuse histogram set to all-singletons", source, t.name
        )
        hist = np.zeros(NUM_HIST_BINS)
        hist[0] = 1.0
    else:
        hist = _batched_histogram(t, batch_size or bags)
    return TableSpec(
        name=t.name,
        rows=n_rows,
        dim=dim,
        pooling_factor=float(t.indices.size / bags),
        reuse_hist=tuple(float(x) for x in hist),
    )


def _batched_histogram(t: Lookups, batch_size: int) -> np.ndarray:
    """Reuse histogram pooled over consecutive batches of ``batch_size`` bags."""
    bags = len(t.offsets) - 1
    counts = []
    for start in range(0, bags, batch_size):
        stop = min(start + batch_size, bags)
        chunk = t.indices[t.offsets[start] : t.offsets[stop]]
        if chunk.size:
            counts.append(access_counts(chunk))
    return histogram_of_counts(np.concatenate(counts))


# --------------------------------------------------------------------------- validation


def _as_int64(values: Any, source: str, table: str, field_name: str) -> np.ndarray:
    try:
        if hasattr(values, "detach"):  # a torch tensor
            values = values.detach().cpu().numpy()
        arr = np.asarray(values)
    except Exception as exc:
        raise TableSpecError(
            f"cannot read as an array: {exc}", source=source, table=table, field_name=field_name
        ) from exc
    if arr.ndim != 1:
        raise TableSpecError(
            f"must be one-dimensional, got shape {arr.shape}",
            source=source,
            table=table,
            field_name=field_name,
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0)):
            raise TableSpecError(
                f"must hold integers, got {arr.dtype}",
                source=source,
                table=table,
                field_name=field_name,
            )
    return arr.astype(np.int64, copy=False)


def _checked(name: str, indices: np.ndarray, offsets: np.ndarray, source: str) -> Lookups:
    if offsets.size < 2:
        raise TableSpecError(
            "needs at least one bag (two offsets)", source=source, table=name, field_name="offsets"
        )
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise TableSpecError(
            "must start at 0 and never decrease", source=source, table=name, field_name="offsets"
        )
    if offsets[-1] != indices.size:
        raise TableSpecError(
            f"ends at {offsets[-1]} but there are {indices.size} indices",
            source=source,
            table=name,
            field_name="offsets",
        )
    if indices.size and indices.min() < 0:
        raise TableSpecError(
            f"negative index {int(indices.min())}", source=source, table=name, field_name="indices"
        )
    return Lookups(name, indices, offsets)


# --------------------------------------------------------------------------- readers


def _torch_load(source: str) -> Any:
    """``torch.load(weights_only=True)``; torchrec's jagged tensors are allowed (and torchrec
    imported) only when the file holds them."""
    import torch

    safe: list[type] = []
    try:
        wanted = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception:  # not a torch.save zip file; torch.load below says why
        wanted = []
    if any(name.startswith(_TORCHREC_JT) for name in wanted):
        try:
            from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor
        except Exception as exc:
            raise TableSpecError(
                f"holds a KeyedJaggedTensor but torchrec cannot be imported: {exc}", source=source
            ) from exc
        safe = [KeyedJaggedTensor, JaggedTensor]
    try:
        with torch.serialization.safe_globals(safe):  # type: ignore[arg-type]
            return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, disallowed classes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TableSpecError(
            "not a lookup file NeuroShard can read safely (expected a KeyedJaggedTensor or "
            f"a dict of {{'indices', 'offsets'}} saved with torch.save, or a .parquet "
            f"file): {first}",
            source=source,
        ) from exc


def _is_kjt(obj: Any) -> bool:
    cls = type(obj)
    return cls.__module__.startswith("torchrec.") and cls.__name__ == "KeyedJaggedTensor"


def _from_kjt(kjt: Any, source: str) -> Iterator[Lookups]:
    try:
        per_key = kjt.to_dict()
    except Exception as exc:
        raise TableSpecError(f"inconsistent KeyedJaggedTensor: {exc}", source=source) from exc
    for name, jt in per_key.items():
        indices = _as_int64(jt.values(), source, name, "values")
        offsets = _as_int64(jt.offsets(), source, name, "offsets")
        yield _checked(str(name), indices, offsets, source)


def _from_dict(obj: Mapping, source: str) -> Iterator[Lookups]:
    for name, entry in obj.items():
        if (
            not isinstance(entry, Mapping)
            or "indices" not in entry
            or not ("offsets" in entry or "lengths" in entry)
        ):
            raise TableSpecError(
                "expected a dict with 'indices' and 'offsets' (or 'lengths')",
                source=source,
                table=str(name),
            )
        indices = _as_int64(entry["indices"], source, str(name), "indices")
        if "offsets" in entry:
            offsets = _as_int64(entry["offsets"], source, str(name), "offsets")
        else:
            lengths = _as_int64(entry["lengths"], source, str(name), "lengths")
            if lengths.size and lengths.min() < 0:
                raise TableSpecError(
                    "negative bag length", source=source, table=str(name), field_name="lengths"
                )
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        yield _checked(str(name), indices, offsets, source)


def _read_parquet(source: str) -> Iterator[Lookups]:
    import pyarrow.parquet as pq

    try:
        frame = pq.read_table(source).to_pandas()
    except Exception as exc:
        raise TableSpecError(f"cannot read Parquet: {exc}", source=source) from exc
    missing = [c for c in PARQUET_COLUMNS if c not in frame.columns]
    if missing:
        raise TableSpecError(
            f"missing column(s) {', '.join(missing)}; need {', '.join(PARQUET_COLUMNS)}",
            source=source,
        )
    if len(frame) == 0:
        raise TableSpecError("no rows", source=source)
    if frame[list(PARQUET_COLUMNS)].isna().any().any():
        raise TableSpecError("missing values in table/sample/id", source=source)
    for column in ("table", "sample"):
        bad = frame[column].map(
            lambda v: not isinstance(v, (str, int, np.integer)) or isinstance(v, bool)
        )
        if bad.any():
            value = frame[column][bad].iloc[0]
            raise TableSpecError(
                f"column {column!r} must hold strings or integers, got "
                f"{type(value).__name__} {value!r:.40}",
                source=source,
            )
    ids = _as_int64(frame["id"].to_numpy(), source, "*", "id")
    # Bags are (table, sample); every table has one bag per distinct sample of the file.
    _, sample_rank = np.unique(frame["sample"].to_numpy(), return_inverse=True)
    bags = int(sample_rank.max()) + 1
    table_codes, table_names = frame["table"].factorize(sort=False)
    order = np.lexsort((np.arange(len(frame)), sample_rank, table_codes))  # stable by bag
    codes_sorted = table_codes[order]
    bounds = np.searchsorted(codes_sorted, np.arange(len(table_names) + 1))
    for code, name in enumerate(table_names):
        rows_of = order[bounds[code] : bounds[code + 1]]
        lengths = np.bincount(sample_rank[rows_of], minlength=bags)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        yield _checked(str(name), ids[rows_of], offsets, source)

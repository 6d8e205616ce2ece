"""Run training samples through a hardware backend, writing Parquet as it goes.

Layout: ``out_dir/part-<first index>-<hash of keys>.parquet``, one file per chunk of
samples, each written to a temporary file in ``out_dir`` and renamed into place, so a
part is either complete or absent. A rerun reads the keys already present and measures
only the rest: a collection that stops (crash, Ctrl-C, lost machine) resumes without
losing or duplicating rows.

Rows (``kind="compute"``): ``key``, ``index``, ``num_tables``, ``table_names``,
``features`` (one list of the 20 raw :data:`~neuroshard.features.FEATURE_NAMES` values per
table), ``label_ms``, ``spread``, ``repeats``, ``fingerprint`` (backend fingerprint, JSON).
Rows (``kind="comm"``): ``key``, ``index``, ``num_devices``, ``num_tables``, ``dim_sums``,
``waits_ms``, ``fwd_ms``, ``bwd_ms``, ``fwd_spread``, ``bwd_spread``, ``fingerprint``.

:func:`collect_chunk` is a pure function (samples + backend or :class:`BackendSpec` ->
rows) so a distributed runner (a Ray task) can call it in a worker and hand the rows
back to :func:`write_part`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from neuroshard.features import FEATURE_NAMES, FEATURE_SCHEMA, raw_features
from neuroshard.fingerprint import Fingerprint
from neuroshard.pretrain.augment import CommSample, ComputeSample
from neuroshard.types import HardwareBackend, NeuroShardError

logger = logging.getLogger(__name__)

Kind = Literal["compute", "comm"]
PART_GLOB = "part-*.parquet"

__all__ = [
    "BackendSpec",
    "CollectResult",
    "DatasetError",
    "check_fingerprint",
    "collect",
    "collect_chunk",
    "existing_keys",
    "part_files",
    "pending_samples",
    "read_part",
    "write_part",
]


class DatasetError(NeuroShardError):
    """Collected data is unreadable, or mixes backends. The message names the file."""


SCHEMAS: dict[str, pa.Schema] = {
    "compute": pa.schema(
        [
            ("key", pa.string()),
            ("index", pa.int64()),
            ("num_tables", pa.int32()),
            ("table_names", pa.list_(pa.string())),
            ("features", pa.list_(pa.list_(pa.float64()))),
            ("label_ms", pa.float64()),
            ("spread", pa.float64()),
            ("repeats", pa.int32()),
            ("fingerprint", pa.string()),
        ]
    ),
    "comm": pa.schema(
        [
            ("key", pa.string()),
            ("index", pa.int64()),
            ("num_devices", pa.int32()),
            ("num_tables", pa.int32()),
            ("dim_sums", pa.list_(pa.int64())),
            ("waits_ms", pa.list_(pa.float64())),
            ("fwd_ms", pa.list_(pa.float64())),
            ("bwd_ms", pa.list_(pa.float64())),
            ("fwd_spread", pa.list_(pa.float64())),
            ("bwd_spread", pa.list_(pa.float64())),
            ("fingerprint", pa.string()),
        ]
    ),
}


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class BackendSpec:
    """A backend by name and keyword arguments, rebuildable in another process.

    ``name`` is a registered backend (``"sim"``) or an import path ``"module:factory"``.
    """

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> HardwareBackend:
        if ":" in self.name:
            module, attr = self.name.split(":", 1)
            return getattr(importlib.import_module(module), attr)(**dict(self.kwargs))
        from neuroshard.backends import get_backend

        return get_backend(self.name, **dict(self.kwargs))


def resolve_backend(backend: HardwareBackend | BackendSpec | str) -> HardwareBackend:
    if isinstance(backend, str):
        backend = BackendSpec(backend)
    if isinstance(backend, BackendSpec):
        return backend.build()
    return backend


def fingerprint_json(backend: HardwareBackend) -> str:
    return json.dumps(backend.fingerprint(), sort_keys=True, default=str)


# --------------------------------------------------------------------------- measuring


def _compute_row(sample: ComputeSample, backend: HardwareBackend, fp: str) -> dict:
    timing = backend.measure_compute(list(sample.tables))
    return {
        "key": sample.key,
        "index": sample.index,
        "num_tables": len(sample.tables),
        "table_names": [t.name for t in sample.tables],
        "features": raw_features(sample.tables).tolist(),
        "label_ms": float(timing.median_ms),
        "spread": float(timing.spread),
        "repeats": int(timing.repeats),
        "fingerprint": fp,
    }


def _comm_row(sample: CommSample, backend: HardwareBackend, fp: str) -> dict:
    fwd, bwd = backend.measure_comm(list(sample.dim_sums), list(sample.waits_ms))
    return {
        "key": sample.key,
        "index": sample.index,
        "num_devices": sample.num_devices,
        "num_tables": sample.num_tables,
        "dim_sums": list(sample.dim_sums),
        "waits_ms": list(sample.waits_ms),
        "fwd_ms": [float(t.median_ms) for t in fwd],
        "bwd_ms": [float(t.median_ms) for t in bwd],
        "fwd_spread": [float(t.spread) for t in fwd],
        "bwd_spread": [float(t.spread) for t in bwd],
        "fingerprint": fp,
    }


def _check_kind(samples: Sequence[Any], kind: str) -> None:
    if kind not in SCHEMAS:
        raise ValueError(f"kind must be 'compute' or 'comm', got {kind!r}")
    cls = ComputeSample if kind == "compute" else CommSample
    bad = next((s for s in samples if not isinstance(s, cls)), None)
    if bad is not None:
        raise TypeError(f"kind={kind!r} needs {cls.__name__} samples, got {type(bad).__name__}")


def collect_chunk(
    samples: Sequence[ComputeSample | CommSample],
    backend: HardwareBackend | BackendSpec | str,
    kind: Kind = "compute",
    on_sample: Callable[[], None] | None = None,
) -> list[dict]:
    """Measure ``samples`` on ``backend`` and return their rows (nothing is written).

    ``backend`` may be a spec, rebuilt here: that is what a worker process receives.
    """
    _check_kind(samples, kind)
    be = resolve_backend(backend)
    fp = fingerprint_json(be)
    make_row = _compute_row if kind == "compute" else _comm_row
    rows = []
    for s in samples:
        rows.append(make_row(s, be, fp))  # type: ignore[arg-type]
        if on_sample is not None:
            on_sample()
    return rows


# --------------------------------------------------------------------------- files


def part_files(out_dir: str | os.PathLike) -> list[Path]:
    """The complete part files under ``out_dir``, sorted by name."""
    d = Path(out_dir)
    return sorted(d.glob(PART_GLOB)) if d.is_dir() else []


def read_part(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One part file (only ``columns`` when given); :class:`DatasetError` naming it when
    it cannot be read."""
    try:
        return pq.read_table(path, columns=columns)
    except Exception as exc:  # noqa: BLE001 -- any unreadable part is the same problem
        raise DatasetError(f"{path}: unreadable part file ({exc})") from exc


def existing_keys(out_dir: str | os.PathLike) -> set[str]:
    """Keys of every row already written under ``out_dir``."""
    keys: set[str] = set()
    for path in part_files(out_dir):
        keys.update(read_part(path, ["key"]).column("key").to_pylist())
    return keys


def _existing_fingerprint(out_dir: Path) -> tuple[Path, str] | None:
    for path in part_files(out_dir):
        col = read_part(path, ["fingerprint"]).column("fingerprint")
        if len(col):
            return path, col[0].as_py()
    return None


def _fingerprint_diff(on_disk: str, now: str) -> str:
    try:
        lines = Fingerprint.of(on_disk).describe_diff(now, labels=("on disk", "now"))
    except ValueError:  # not a JSON object: show both as they are
        return f"{on_disk} != {now}"
    return "; ".join(lines)


def check_fingerprint(out_dir: str | os.PathLike, fingerprint: str, backend_name: str) -> None:
    """Raise :class:`DatasetError` if ``out_dir`` holds rows of another backend."""
    prior = _existing_fingerprint(Path(out_dir))
    if prior is not None and prior[1] != fingerprint:
        raise DatasetError(
            f"{prior[0]}: rows come from another backend than {backend_name!r}: "
            f"{_fingerprint_diff(prior[1], fingerprint)}; collect into another directory"
        )


def pending_samples(samples: Sequence[Any], done: set[str]) -> list[Any]:
    """``samples`` whose keys are not in ``done``, first occurrence of each key only."""
    pending: list[Any] = []
    seen: set[str] = set()
    for s in samples:
        if s.key not in done and s.key not in seen:
            pending.append(s)
            seen.add(s.key)
    return pending


def start_collection(
    samples: Sequence[Any], out_dir: str | os.PathLike, kind: Kind, chunk_size: int
) -> tuple[Path, list[Any], int]:
    """Checks shared by every collector; returns the output folder (created), the samples
    still to measure and how many are already on disk."""
    _check_kind(samples, kind)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pending = pending_samples(samples, existing_keys(out))
    return out, pending, len(samples) - len(pending)


def write_part(rows: Sequence[dict], out_dir: str | os.PathLike, kind: Kind) -> Path:
    """Write ``rows`` as one part file, atomically (temporary file, then rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(rows), schema=SCHEMAS[kind])
    table = table.replace_schema_metadata(
        {
            "neuroshard.kind": kind,
            "neuroshard.feature_schema": FEATURE_SCHEMA,
            "neuroshard.feature_names": json.dumps(list(FEATURE_NAMES)),
        }
    )
    keys = "\n".join(r["key"] for r in rows)
    first = min((int(r["index"]) for r in rows), default=0)
    final = out / f"part-{first:09d}-{hashlib.sha256(keys.encode()).hexdigest()[:12]}.parquet"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=out)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class CollectResult:
    out_dir: Path
    measured: int  # rows written by this call
    skipped: int  # samples whose rows were already on disk
    total: int  # samples asked for
    failed: int = 0  # samples left unmeasured after their chunk failed every retry


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _Bar:
    """A rich progress bar (rate, ETA), or nothing when disabled."""

    def __init__(self, enabled: bool, description: str, total: int, completed: int):
        self._progress = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task):  # noqa: ANN001 -- rich's Task
                speed = task.speed
                return Text(f"{speed:.1f}/s" if speed else "-/s")

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self._task = self._progress.add_task(description, total=total, completed=completed)

    def __enter__(self) -> _Bar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)


def collect(
    samples: Sequence[ComputeSample | CommSample],
    backend: HardwareBackend | BackendSpec | str,
    out_dir: str | os.PathLike,
    *,
    kind: Kind = "compute",
    chunk_size: int = 128,
    progress: bool = True,
    description: str | None = None,
) -> CollectResult:
    """Measure every sample not yet under ``out_dir`` and write its rows there.

    Writes one part file per ``chunk_size`` samples as it goes; a rerun with the same
    samples skips the keys already present. Refuses to add rows from a backend whose
    fingerprint differs from the one on disk (:class:`DatasetError`).
    """
    out, pending, skipped = start_collection(samples, out_dir, kind, chunk_size)
    logger.info(
        "collect %s into %s: %d samples, %d on disk, %d to measure",
        kind,
        out,
        len(samples),
        skipped,
        len(pending),
    )
    if not pending:
        return CollectResult(out, 0, skipped, len(samples))

    be = resolve_backend(backend)
    check_fingerprint(out, fingerprint_json(be), be.name)
    measured = 0
    with _Bar(progress, description or f"{kind} samples", len(samples), skipped) as bar:
        for chunk in _chunks(pending, chunk_size):
            rows = collect_chunk(chunk, be, kind, on_sample=bar.advance)
            path = write_part(rows, out, kind)
            measured += len(rows)
            logger.debug("wrote %s (%d rows)", path.name, len(rows))
    return CollectResult(out, measured, skipped, len(samples))

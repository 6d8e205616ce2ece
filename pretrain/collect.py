"""Run training samples through a hardware backend, writing Parquet as it goes.

Layout: ``out_dir/part-<first index>-<hash of keys>.parquet``, one file per chunk of
samples, each written to a uniquely named temporary file in ``out_dir`` and renamed into
place, so a part is either complete or absent. A rerun reads the keys already present and
measures only the rest: a collection that stops (crash, Ctrl-C, lost machine) resumes
without losing or duplicating rows.

A folder's settings are fixed by its first run: ``out_dir/collection.json`` records the
sample kind and the backend (name and fingerprint: profile, batch size, noise, seed...);
a later run with any other setting is refused (:class:`DatasetError` naming both), even
when it has nothing left to measure. One run at a time writes into a folder
(:func:`~neuroshard.paths.folder_lock`).

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
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from neuroshard.atomic import atomic_write, write_text_atomic
from neuroshard.features import FEATURE_NAMES, FEATURE_SCHEMA, raw_features
from neuroshard.fingerprint import Fingerprint
from neuroshard.paths import folder_lock
from neuroshard.pretrain.augment import CommSample, ComputeSample
from neuroshard.types import HardwareBackend, NeuroShardError

logger = logging.getLogger(__name__)

Kind = Literal["compute", "comm"]
PART_GLOB = "part-*.parquet"

__all__ = [
    "BackendSpec",
    "CollectResult",
    "DatasetError",
    "SETTINGS_FILE",
    "check_fingerprint",
    "claim_folder",
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


SETTINGS_FILE = "collection.json"
# Fingerprint keys that say when or where, not what was measured: left out of settings.
_UNSETTLED_KEYS = ("hostname", "created", "time")


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

    ``name`` is a registered backend (``"sim"``, or a plug-in's entry point name: see
    :mod:`neuroshard.backends`); a string is never imported. A program may pass its own
    ``factory`` (a module-level callable, so that it pickles for a Ray worker), which
    ``build`` calls with ``kwargs`` instead of looking ``name`` up.
    """

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    factory: Callable[..., HardwareBackend] | None = None

    def build(self) -> HardwareBackend:
        if self.factory is not None:
            return self.factory(**dict(self.kwargs))
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
    reseed = getattr(be, "reseed", None)  # a simulated backend's noise follows the sample
    rows = []
    for s in samples:
        if callable(reseed):
            reseed(s.key)
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


def folder_settings(kind: str, backend: HardwareBackend) -> dict[str, Any]:
    """What a collection folder fixes on its first run: the sample kind, the backend's
    name and its fingerprint (less when and where it ran)."""
    fp = {
        k: v for k, v in json.loads(fingerprint_json(backend)).items() if k not in _UNSETTLED_KEYS
    }
    return {"kind": kind, "backend": backend.name, "fingerprint": fp}


def _settings_of_parts(out: Path) -> dict[str, Any] | None:
    """The settings a folder written before ``collection.json`` existed implies."""
    for path in part_files(out):
        table = read_part(path, ["fingerprint"])
        kind = (table.schema.metadata or {}).get(b"neuroshard.kind", b"").decode() or None
        settings: dict[str, Any] = {"kind": kind} if kind else {}
        if len(table):
            try:
                fp = Fingerprint.of(table.column("fingerprint")[0].as_py()).as_dict()
            except ValueError:
                fp = None
            if fp is not None:
                settings["fingerprint"] = {k: v for k, v in fp.items() if k not in _UNSETTLED_KEYS}
        return settings or None
    return None


def claim_folder(
    out_dir: str | os.PathLike, settings: Mapping[str, Any], *, file_name: str = SETTINGS_FILE
) -> None:
    """Record ``settings`` as ``out_dir``'s on its first run; on a later run, refuse any
    that differ from the recorded ones (:class:`DatasetError` naming both). Settings the
    record lacks are added to it; ones a run does not give are not compared."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / file_name
    recorded: dict[str, Any] | None = None
    if path.exists():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise DatasetError(
                f"{path}: unreadable ({exc}); it records the settings of this folder's first run"
            ) from None
        if not isinstance(recorded, dict):
            raise DatasetError(f"{path}: not a JSON object")
    elif file_name == SETTINGS_FILE:
        recorded = _settings_of_parts(out)
    diffs = []
    for key, value in settings.items():
        if recorded is not None and key in recorded and recorded[key] != value:
            diffs.extend(_setting_diff(key, recorded[key], value))
    diffs.sort(key=lambda line: line.split(" ", 1)[0].count("."))  # plain settings first
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise DatasetError(
            f"{out}: its first run used other settings ({path.name}): "
            + "; ".join(diffs[:3])
            + more
            + ". Use another folder, or the "
            "first run's settings"
        )
    merged = {
        **(recorded or {}),
        **{k: v for k, v in settings.items() if recorded is None or k not in recorded},
    }
    if not path.exists() or merged != recorded:
        write_text_atomic(path, json.dumps(merged, indent=1, sort_keys=True, default=str) + "\n")


def _setting_diff(key: str, before: Any, now: Any) -> list[str]:
    """The differing leaves of two settings, ``key.sub`` first run vs this run."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [
            line
            for k in sorted({*before, *now}, key=str)
            if before.get(k) != now.get(k)
            for line in _setting_diff(f"{key}.{k}", before.get(k), now.get(k))
        ]
    return [f"{key} {_short(before)} (first run) vs {_short(now)} (this run)"]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    return atomic_write(final, lambda tmp: pq.write_table(table, tmp))


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
    samples skips the keys already present. Refuses a folder another run is writing into
    (:class:`~neuroshard.types.FolderBusyError`) and one whose first run had another kind
    or backend, or whose rows come from a backend with another fingerprint
    (:class:`DatasetError`), whether or not anything is left to measure.
    """
    _check_kind(samples, kind)
    with folder_lock(out_dir):
        be = resolve_backend(backend)
        claim_folder(out_dir, folder_settings(kind, be))
        check_fingerprint(out_dir, fingerprint_json(be), be.name)
        return _collect(samples, be, Path(out_dir), kind, chunk_size, progress, description)


def _collect(
    samples: Sequence[ComputeSample | CommSample],
    be: HardwareBackend,
    out_dir: Path,
    kind: Kind,
    chunk_size: int,
    progress: bool,
    description: str | None,
) -> CollectResult:
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
    measured = 0
    with _Bar(progress, description or f"{kind} samples", len(samples), skipped) as bar:
        for chunk in _chunks(pending, chunk_size):
            rows = collect_chunk(chunk, be, kind, on_sample=bar.advance)
            path = write_part(rows, out, kind)
            measured += len(rows)
            logger.debug("wrote %s (%d rows)", path.name, len(rows))
    return CollectResult(out, measured, skipped, len(samples))

"""What every learned model shares: its directory on disk, and the cost-model base class.

A model directory holds the model's weight files and ``meta.json``: its ``kind`` (the
registry name that loads it), the feature schema, and for cost models the backend and
its fingerprint, batch size, training-data hash, sample counts and metrics. ``meta.json``
records the sha256 of every weight file; every file is written to a uniquely named
temporary file and renamed into place (:mod:`neuroshard.atomic`), so a directory is never
half written, and a changed file, or one ``meta.json`` records no checksum for, is refused
on load (:func:`checked_file`).

A cost model also records the ranges of its training inputs (``training_ranges``: tables
per device, rows, dims, pooling factors, device counts, batch size), so that a plan far
outside them can be reported (:meth:`CostModelBase.out_of_range`).

:class:`CostModelBase` is the part of a learned :class:`~neuroshard.types.CostEstimator`
that does not depend on how it predicts: fit-time provenance, the comm entry points,
scoring against held-out data (:mod:`neuroshard.models.metrics`) and the ``meta.json``
bookkeeping.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuroshard.atomic import atomic_write, write_text_atomic
from neuroshard.features import FEATURE_NAMES, FEATURE_SCHEMA
from neuroshard.fingerprint import VOLATILE_KEYS, Fingerprint
from neuroshard.models.metrics import comm_breakdown, compute_breakdown, regression_metrics
from neuroshard.samples import CommData, ComputeData, Split, split_random
from neuroshard.types import HardwareBackend, ModelFileError, ModelMismatchError, Plan

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
TARGET_TRANSFORM = "log(ms + eps_ms), standardised"

__all__ = [
    "META_FILE",
    "TARGET_TRANSFORM",
    "CostModelBase",
    "atomic_write",
    "batch_range",
    "check_compatible",
    "checked_file",
    "read_meta",
    "sha256",
    "since_first",
    "straggler_wait",
    "write_meta",
    "RANGE_NAMES",
]

# What ``training_ranges`` records, and how each range reads in a message.
RANGE_NAMES = {
    "tables_per_device": "tables per device",
    "rows": "rows per shard",
    "dim": "shard width (dim)",
    "pooling_factor": "pooling factor",
    "devices": "devices",
    "devices_per_host": "devices per host",
    "batch_size": "batch size",
}


# --------------------------------------------------------------------------- files


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_meta(out: Path, meta: Mapping[str, Any], files: Sequence[str]) -> Path:
    """Write ``meta`` with the sha256 of each of ``files`` (names in ``out``) as
    ``out/meta.json``, atomically; returns ``out``."""
    doc = {**meta, "files": {f: sha256(out / f) for f in files}}
    write_text_atomic(out / META_FILE, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return out


def read_meta(model_dir: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of a model directory; :class:`ModelFileError` naming the file if bad."""
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise ModelFileError(f"{path}: missing (not a model directory?)")
    try:
        meta = json.loads(path.read_text(), object_pairs_hook=_unique_keys(path))
    except ModelFileError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelFileError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("kind"), str):
        raise ModelFileError(f"{path}: no 'kind' string entry")
    for key in (
        "backend_fingerprint",
        "files",
        "architecture",
        "normalisation",
        "metrics",
        "sample_counts",
        "provenance",
        "training_ranges",
    ):
        if key in meta and not isinstance(meta[key], dict):
            raise ModelFileError(f"{path}: entry {key!r} is not an object")
    for key in ("backend", "name"):  # a feature_schema of any value is a mismatch
        if key in meta and not isinstance(meta[key], str):
            raise ModelFileError(f"{path}: entry {key!r} is not a string: {meta[key]!r}")
    if "batch_size" in meta and not _is_int(meta["batch_size"], low=1):
        raise ModelFileError(
            f"{path}: entry 'batch_size' is not a positive integer: {meta['batch_size']!r}"
        )
    if "num_devices" in meta and not _is_int(meta["num_devices"], low=0):
        raise ModelFileError(
            f"{path}: entry 'num_devices' is not an integer >= 0: {meta['num_devices']!r}"
        )
    if "files" in meta and not all(isinstance(v, str) for v in meta["files"].values()):
        raise ModelFileError(f"{path}: entry 'files' holds a checksum that is not a string")
    _check_ranges(meta.get("training_ranges", {}), path)
    return meta


def _unique_keys(path: Path) -> Callable[[list[tuple[str, object]]], dict[str, object]]:
    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in pairs:
            if key in out:
                raise ModelFileError(f"{path}: key {key!r} given twice in one object")
            out[key] = value
        return out

    return hook


def _is_int(value: object, *, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_ranges(ranges: Mapping[str, object], path: Path) -> None:
    for key, value in ranges.items():
        ok = (
            key in RANGE_NAMES
            and isinstance(value, list)
            and len(value) == 2
            and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in value
            )
            and value[0] <= value[1]
        )
        if not ok:
            raise ModelFileError(
                f"{path}: entry 'training_ranges.{key}' is not a known [low, high] range: {value!r}"
            )


def checked_file(model_dir: Path, fname: str, checksums: Mapping[str, Any]) -> Path:
    """``model_dir / fname``; :class:`ModelFileError` if it is missing, ``meta.json``
    records no checksum for it, or its checksum differs from the recorded one."""
    path = model_dir / fname
    if not path.is_file():
        raise ModelFileError(f"{path}: missing")
    if not isinstance(checksums, Mapping) or fname not in checksums:
        raise ModelFileError(
            f"{path}: {META_FILE} records no checksum for it (entry 'files'); a model "
            "directory must list every weight file with its sha256"
        )
    if sha256(path) != checksums[fname]:
        raise ModelFileError(
            f"{path}: checksum differs from {META_FILE} (truncated, replaced or tampered with)"
        )
    return path


def check_compatible(
    meta: Mapping[str, Any],
    *,
    batch_size: int | None = None,
    backend: str | HardwareBackend | Mapping[str, Any] | None = None,
    feature_schema: str = FEATURE_SCHEMA,
    kind: str | None = None,
) -> None:
    """Raise :class:`ModelMismatchError` listing every way ``meta`` differs from the ask.

    ``backend`` is a name (compared with the model's backend name), a backend object
    (name and fingerprint) or a fingerprint dict. Fingerprint keys in
    :data:`~neuroshard.fingerprint.VOLATILE_KEYS` (noise level, seeds) are not compared.
    """
    diffs = []
    if kind is not None and meta.get("kind") != kind:
        diffs.append(f"cost model {meta.get('kind')!r} (model) vs {kind!r} (asked)")
    if meta.get("feature_schema") != feature_schema:
        diffs.append(
            f"feature schema {meta.get('feature_schema')!r} (model) vs "
            f"{feature_schema!r} (this NeuroShard)"
        )
    if batch_size is not None and meta.get("batch_size") != batch_size:
        trained = batch_range(meta)
        if trained is None:
            diffs.append(f"batch size {meta.get('batch_size')} (model) vs {batch_size} (asked)")
        elif not trained[0] <= batch_size <= trained[1]:
            diffs.append(
                f"batch size {batch_size} (asked) outside the model's training range "
                f"[{trained[0]:g}, {trained[1]:g}]"
            )
    fingerprint: Mapping[str, Any] | None = None
    if isinstance(backend, str):
        if meta.get("backend") != backend:
            diffs.append(f"backend {meta.get('backend')!r} (model) vs {backend!r} (asked)")
    elif isinstance(backend, Mapping):
        fingerprint = backend
    elif backend is not None:
        if meta.get("backend") != backend.name:
            diffs.append(f"backend {meta.get('backend')!r} (model) vs {backend.name!r} (asked)")
        fingerprint = backend.fingerprint()
    if fingerprint is not None:
        trained_on = Fingerprint.of(meta.get("backend_fingerprint", {}))
        diffs.extend(
            "fingerprint " + line
            for line in trained_on.describe_diff(
                fingerprint, ignore=VOLATILE_KEYS, labels=("model", "asked")
            )
        )
    if diffs:
        raise ModelMismatchError(
            f"model {meta.get('name', '?')} does not match: " + "; ".join(diffs)
        )


def batch_range(meta: Mapping[str, Any]) -> tuple[float, float] | None:
    """The batch sizes a model takes as an input (``batch_input`` in ``meta.json``): its
    training range; None for a model of one batch size."""
    if not meta.get("batch_input"):
        return None
    low, high = (meta.get("training_ranges") or {}).get("batch_size", (None, None))
    if low is None:
        return None
    return float(low), float(high)


# --------------------------------------------------------------------------- comm helpers


def since_first(waits_ms: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each device's wait minus the earliest real device's (0 on padding)."""
    lowest = np.where(mask, waits_ms, np.inf).min(axis=-1, keepdims=True)
    lowest = np.where(np.isfinite(lowest), lowest, 0.0)
    return np.where(mask, waits_ms - lowest, 0.0)


def straggler_wait(waits_ms: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``max_j waits_j - waits_d`` over real devices (0 on padding)."""
    highest = np.where(mask, waits_ms, -np.inf).max(axis=-1, keepdims=True)
    highest = np.where(np.isfinite(highest), highest, 0.0)
    return np.where(mask, highest - waits_ms, 0.0)


# --------------------------------------------------------------------------- the base


class CostModelBase:
    """What every learned cost model shares: fit-time provenance and bookkeeping,
    the comm entry points and scoring, and the ``meta.json`` and checksum handling.

    A subclass sets ``kind`` and ``_fitted_attr`` (the attribute :meth:`fit` sets last)
    and provides ``_comm(which, dim_sums, waits_ms, mask)``,
    ``_predict_compute_data(data)`` (compute ms of every load of collected data) and
    ``meta()`` (starting from :meth:`_base_meta`).
    """

    kind = "base"
    _fitted_attr = "fitted_"
    batch_size: int | None
    seed: int
    eps_ms: float
    meta_: dict[str, Any]  # meta.json of a loaded model

    @property
    def fitted_batch_size(self) -> int:
        """The DLRM batch size the model's costs are for (set by fit or load)."""
        if self.batch_size is None:
            raise RuntimeError(
                f"{type(self).__name__} has no batch size: call fit() or load_cost_model()"
            )
        return self.batch_size

    @property
    def name(self) -> str:
        h = getattr(self, "data_hash_", None) or "unfitted"
        return f"{self.kind}-{getattr(self, 'backend_', 'unknown')}-{h[:8]}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, batch_size={self.batch_size})"

    def _check_fitted(self) -> None:
        if not hasattr(self, self._fitted_attr):
            raise RuntimeError(
                f"{type(self).__name__} is not fitted: call fit() or load_cost_model()"
            )

    # ------------------------------------------------------------- fitting

    def _begin_fit(
        self,
        compute: ComputeData,
        comm: CommData,
        *,
        compute_split: Split | None,
        comm_split: Split | None,
        backend_name: str | None,
        num_devices: int | None,
    ) -> tuple[Split, Split]:
        """Record the backend, its fingerprint, the batch size and the device count from
        the data; return the compute and comm splits (80/10/10 seeded by ``seed``)."""
        fp = Fingerprint.of(compute.fingerprint)
        if Fingerprint.of(comm.fingerprint) != fp:
            logger.warning("compute and comm data come from different backend fingerprints")
        fields = fp.as_dict()
        self.backend_ = backend_name or str(
            fields.get("backend") or fields.get("name") or "unknown"
        )
        self.backend_fingerprint_ = fields
        if self.batch_size is None:
            if "batch_size" not in fields:
                raise ValueError("batch_size not given and not in the data's fingerprint")
            self.batch_size = int(fields["batch_size"])
        elif "batch_size" in fields and int(fields["batch_size"]) != self.batch_size:
            raise ModelMismatchError(
                f"batch_size={self.batch_size} but the data was collected "
                f"at batch size {fields['batch_size']}"
            )
        self.num_devices_ = int(num_devices or np.bincount(comm.num_devices).argmax())
        self.training_ranges_ = training_ranges(compute, comm, self.batch_size)
        cs = compute_split or split_random(len(compute), self.seed)
        ms = comm_split or split_random(len(comm), self.seed + 1)
        return cs, ms

    def _end_fit(self, compute: ComputeData, comm: CommData, cs: Split, ms: Split) -> None:
        """Record the data hash, sample counts and validation/test metrics."""
        self.data_hash_ = hashlib.sha256(
            (compute.data_hash() + comm.data_hash()).encode()
        ).hexdigest()[:16]
        self.sample_counts_ = {
            "compute": {
                "total": len(compute),
                "train": len(cs.train),
                "val": len(cs.val),
                "test": len(cs.test),
            },
            "comm": {
                "total": len(comm),
                "train": len(ms.train),
                "val": len(ms.val),
                "test": len(ms.test),
            },
        }
        self.metrics_ = {
            "compute": {
                "val": self.score_compute(compute.subset(cs.val)),
                "test": self.score_compute(compute.subset(cs.test)),
            },
            **{k: {"test": v} for k, v in self.score_comm(comm.subset(ms.test)).items()},
        }

    # ------------------------------------------------------------- predicting

    def _comm(
        self,
        which: str,
        dim_sums: np.ndarray,
        waits_ms: np.ndarray | None,
        mask: np.ndarray | None = None,
    ) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _predict_compute_data(self, data: ComputeData) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def _comm_batch(
        dim_sums: np.ndarray, waits_ms: np.ndarray | None, mask: np.ndarray | None
    ) -> tuple[np.ndarray, Any, np.ndarray, bool]:
        """``(dim_sums, waits_ms, mask, squeeze)`` as a batch of rows (one row added to a
        1-d ask, ``squeeze`` then true), the mask all-true when not given."""
        d = np.asarray(dim_sums, dtype=np.float64)
        squeeze = d.ndim == 1
        if squeeze:
            d = d[None]
            waits_ms = None if waits_ms is None else np.asarray(waits_ms)[None]
        if mask is None:
            mask = np.ones(d.shape, dtype=bool)
        return d, waits_ms, mask, squeeze

    def bwd_comm_ms(self, dim_sums: np.ndarray) -> np.ndarray:
        """Backward all-to-all ms per device, shape ``dim_sums.shape`` (any device count)."""
        return self._comm("bwd", dim_sums, None)

    def fwd_comm_ms(self, dim_sums: np.ndarray, waits_ms: np.ndarray) -> np.ndarray:
        """Forward all-to-all ms per device including the wait, shape ``dim_sums.shape``."""
        return self._comm("fwd", dim_sums, waits_ms)

    # ------------------------------------------------------------- scoring

    def score_compute(self, data: ComputeData) -> dict[str, Any]:
        """MAPE, Spearman and log-MSE of compute predictions on ``data``, overall and
        by tables per load and load size
        (:func:`~neuroshard.models.metrics.compute_breakdown`)."""
        self._check_fitted()
        if not len(data):
            return regression_metrics(np.zeros(0), np.zeros(0))
        pred = self._predict_compute_data(data)
        return {
            **regression_metrics(pred, data.label_ms, self.eps_ms),
            **compute_breakdown(pred, data, self.eps_ms),
        }

    def score_comm(self, data: CommData) -> dict[str, dict[str, Any]]:
        """Metrics of forward and backward comm predictions over every real device,
        overall and by device count and dim sum
        (:func:`~neuroshard.models.metrics.comm_breakdown`).

        ``fwd_comm_less_wait`` scores the forward time less the straggler wait, the part
        a model has to learn (the wait itself is given)."""
        if not len(data):
            empty = regression_metrics(np.zeros(0), np.zeros(0))
            return {"fwd_comm": empty, "fwd_comm_less_wait": empty, "bwd_comm": empty}
        m = data.mask
        fwd = self._comm("fwd", data.dim_sums, data.waits_ms, m)
        bwd = self._comm("bwd", data.dim_sums, None, m)
        wait = straggler_wait(data.waits_ms, m)

        def scored(pred: np.ndarray, true: np.ndarray) -> dict[str, Any]:
            return {
                **regression_metrics(pred[m], true[m], self.eps_ms),
                **comm_breakdown(
                    pred, true, data.num_devices, data.dim_sums, m, data.num_tables, self.eps_ms
                ),
            }

        return {
            "fwd_comm": scored(fwd, data.fwd_ms),
            "fwd_comm_less_wait": regression_metrics(
                (fwd - wait)[m], (data.fwd_ms - wait)[m], self.eps_ms
            ),
            "bwd_comm": scored(bwd, data.bwd_ms),
        }

    # ------------------------------------------------------------- files

    def meta(self) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def _base_meta(self) -> dict[str, Any]:
        """The ``meta.json`` entries every kind writes (a subclass adds its own)."""
        self._check_fitted()
        return {
            "kind": self.kind,
            "name": self.name,
            "feature_schema": FEATURE_SCHEMA,
            "feature_names": list(FEATURE_NAMES),
            "backend": self.backend_,
            "backend_fingerprint": self.backend_fingerprint_,
            "batch_size": self.batch_size,
            "num_devices": self.num_devices_,
            "training_data_hash": self.data_hash_,
            "sample_counts": self.sample_counts_,
            "metrics": self.metrics_,
            "training": getattr(self, "training_summary_", {}),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "provenance": getattr(self, "provenance_", {}),
            "training_ranges": getattr(self, "training_ranges_", {}),
        }

    def _write_meta(self, out: Path, files: Sequence[str]) -> Path:
        """Write ``meta.json`` (with the checksums of ``files``) atomically into ``out``."""
        write_meta(out, self.meta(), files)
        logger.info("saved %s to %s", self.name, out)
        return out

    def _load_base_meta(self, meta: Mapping[str, Any]) -> None:
        """Set the fitted attributes every kind records from ``meta``."""
        self.backend_ = str(meta["backend"])
        self.backend_fingerprint_ = dict(meta.get("backend_fingerprint", {}))
        self.num_devices_ = int(meta.get("num_devices", 0))
        self.data_hash_ = str(meta.get("training_data_hash", ""))
        self.sample_counts_ = meta.get("sample_counts", {})
        self.metrics_ = meta.get("metrics", {})
        self.training_summary_ = meta.get("training", {})
        self.provenance_ = meta.get("provenance", {})
        self.training_ranges_ = meta_ranges(meta)

    # ------------------------------------------------------------- ranges

    def out_of_range(self, plan: Plan) -> list[str]:
        """One line for each way ``plan`` lies outside the inputs this model was trained
        on (tables per device, rows, shard widths, pooling factors, devices, devices per host,
        batch size);
        empty when it lies inside every known range. Predictions out there are
        extrapolations: report them (``--strict`` refuses them)."""
        ranges = getattr(self, "training_ranges_", {})
        loads = [load for load in plan.device_loads() if load]
        seen: dict[str, list[float]] = {
            "tables_per_device": [len(load) for load in loads],
            "rows": [t.rows for load in loads for t in load],
            "dim": [t.dim for load in loads for t in load],
            "pooling_factor": [t.pooling_factor for load in loads for t in load],
            "devices": [plan.cluster.num_devices],
            "devices_per_host": [plan.cluster.devices_per_host],
            "batch_size": [plan.cluster.batch_size],
        }
        lines = []
        sequence = sorted({t.name for t in plan.tables if not t.pooled})
        if sequence:  # every model here was trained on pooled (EmbeddingBag) tables only
            lines.append(
                f"sequence tables ({', '.join(sequence[:5])}"
                f"{', ...' if len(sequence) > 5 else ''}) outside the model's training range "
                "(pooled tables only): their compute is priced as if pooled"
            )
        for key, values in seen.items():
            if key not in ranges or not values:
                continue
            low, high = ranges[key]
            below, above = min(values), max(values)
            if below < low or above > high:
                got = f"{below:g}" if below == above else f"{below:g} to {above:g}"
                lines.append(
                    f"{RANGE_NAMES[key]} {got} outside the model's training range "
                    f"[{low:g}, {high:g}]"
                )
        return lines


def training_ranges(compute: ComputeData, comm: CommData, batch_size: int) -> dict[str, list]:
    """The ``[low, high]`` of every input a model fits on (see :data:`RANGE_NAMES`)."""
    ranges: dict[str, list] = {"batch_size": [int(batch_size), int(batch_size)]}
    counts = np.diff(compute.offsets)
    feats = np.asarray(compute.features, dtype=np.float64).reshape(-1, len(FEATURE_NAMES))
    if len(counts) and len(feats):
        ranges["tables_per_device"] = [int(counts.min()), int(counts.max())]
        for key in ("rows", "dim", "pooling_factor"):
            column = feats[:, FEATURE_NAMES.index(key)]
            ranges[key] = [float(column.min()), float(column.max())]
    if len(comm):
        devices = np.asarray(comm.num_devices)
        ranges["devices"] = [int(devices.min()), int(devices.max())]
    return ranges


def meta_ranges(meta: Mapping[str, Any]) -> dict[str, list]:
    """The training ranges ``meta.json`` records; for a model saved before they were
    recorded, what its provenance tells (tables per device up to ``max_tables``, the comm
    device counts, the batch size). Ranges it cannot tell stay unknown (absent)."""
    if meta.get("training_ranges"):
        return {k: list(v) for k, v in meta["training_ranges"].items()}
    ranges: dict[str, list] = {}
    prov = meta.get("provenance") or {}
    if _is_int(prov.get("max_tables"), low=1):
        ranges["tables_per_device"] = [1, prov["max_tables"]]
    counts = prov.get("comm_device_counts")
    if isinstance(counts, list) and counts and all(_is_int(c, low=1) for c in counts):
        ranges["devices"] = [min(counts), max(counts)]
    elif _is_int(meta.get("num_devices"), low=1):
        ranges["devices"] = [meta["num_devices"], meta["num_devices"]]
    if _is_int(meta.get("batch_size"), low=1):
        ranges["batch_size"] = [meta["batch_size"], meta["batch_size"]]
    return ranges

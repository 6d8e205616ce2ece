"""How far a cost model's predictions are from measurements: numpy only.

* :func:`regression_metrics` -- MAPE, Spearman rank correlation and MSE of ``log(ms)``.
* :func:`compute_breakdown` splits compute error by tables per device load and by the
  load's size in bytes; :func:`comm_breakdown` splits comm error by device count, by the
  device's dim sum (the bytes it sends) and by the shards in the sample's plan.
* :func:`noise_floor` compares two measurements of the same samples (a retest). A model
  cannot beat the noise of the measurement it is scored against: with independent,
  symmetric noise on both runs, a model that knew every sample's true cost would score
  the retest's MAPE divided by sqrt(2), reported as ``floor_mape``. The fidelity bar of a
  model is its held-out MAPE against ``floor_mape``.
* :func:`report_tables` lays a model's recorded metrics (and its scores on other pretrain
  runs' held-out loads, each with that run's floor) out as plain text tables for
  ``neuroshard model-report``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from neuroshard.types import NUM_HIST_BINS

if TYPE_CHECKING:  # pragma: no cover
    from neuroshard.samples import ComputeData

__all__ = [
    "DIM_SUM_BUCKETS",
    "MIN_BUCKET",
    "SIZE_BUCKETS",
    "TABLE_BUCKETS",
    "TextTable",
    "bucket_order",
    "comm_breakdown",
    "compute_breakdown",
    "load_bytes",
    "noise_floor",
    "regression_metrics",
    "report_header",
    "report_summary",
    "report_tables",
]

_DIM, _ROWS = NUM_HIST_BINS, NUM_HIST_BINS + 2
_MiB = 1 << 20

# (label, low, high): low <= value < high
TABLE_BUCKETS = (
    ("1", 1, 2),
    ("2-5", 2, 6),
    ("6-10", 6, 11),
    ("11-20", 11, 21),
    ("21-40", 21, 41),
    (">40", 41, np.inf),
)
SIZE_BUCKETS = (
    ("<64MiB", 0, 64 * _MiB),
    ("64MiB-512MiB", 64 * _MiB, 512 * _MiB),
    ("512MiB-2GiB", 512 * _MiB, 2048 * _MiB),
    (">=2GiB", 2048 * _MiB, np.inf),
)
DIM_SUM_BUCKETS = (
    ("<256", 0, 256),
    ("256-1023", 256, 1024),
    ("1024-4095", 1024, 4096),
    (">=4096", 4096, np.inf),
)
_BUCKETS_OF = {"by_tables": TABLE_BUCKETS, "by_size": SIZE_BUCKETS, "by_dim_sum": DIM_SUM_BUCKETS}

MIN_BUCKET = 5  # a bucket with fewer samples is left out: too few to rank or average


# --------------------------------------------------------------------------- metrics


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.concatenate([[0], np.flatnonzero(xs[1:] != xs[:-1]) + 1])
    ends = np.append(starts[1:], len(x))
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson's on average ranks); nan when either side is
    constant or there are fewer than two values."""
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(_average_ranks(a), _average_ranks(b))[0, 1])


def regression_metrics(
    pred_ms: np.ndarray, true_ms: np.ndarray, eps_ms: float = 1e-3
) -> dict[str, float]:
    """MAPE (fraction), Spearman rank correlation and MSE of ``log(ms + eps)``."""
    pred = np.asarray(pred_ms, dtype=float).ravel()
    true = np.asarray(true_ms, dtype=float).ravel()
    if len(true) == 0:
        return {"n": 0, "mape": float("nan"), "spearman": float("nan"), "mse_log": float("nan")}
    mape = float(np.mean(np.abs(pred - true) / np.maximum(np.abs(true), eps_ms)))
    mse_log = float(
        np.mean((np.log(np.maximum(pred, 0) + eps_ms) - np.log(np.maximum(true, 0) + eps_ms)) ** 2)
    )
    return {"n": int(len(true)), "mape": mape, "spearman": spearman(pred, true), "mse_log": mse_log}


def noise_floor(
    first_ms: np.ndarray, second_ms: np.ndarray, eps_ms: float = 1e-3
) -> dict[str, float]:
    """Retest metrics of two measurements of the same samples, and ``floor_mape``.

    The retest MAPE is taken both ways and averaged, so neither run is privileged."""
    a = np.asarray(first_ms, dtype=float).ravel()
    b = np.asarray(second_ms, dtype=float).ravel()
    m = regression_metrics(b, a, eps_ms)
    if len(a):
        m["mape"] = 0.5 * (m["mape"] + regression_metrics(a, b, eps_ms)["mape"])
    m["floor_mape"] = m["mape"] / np.sqrt(2.0) if len(a) else float("nan")
    return m


# --------------------------------------------------------------------------- breakdowns


def bucket_order(by: str, label: str) -> tuple[float, str]:
    """Sort key that lists a breakdown's buckets from small to large (JSON sorts them by
    name); device counts sort as numbers."""
    for i, (name, _, _) in enumerate(_BUCKETS_OF.get(by, ())):
        if name == label:
            return (i, label)
    return (float(label), label) if label.isdigit() else (np.inf, label)


def _bucketed(
    pred: np.ndarray,
    true: np.ndarray,
    value: np.ndarray,
    buckets: Sequence[tuple[str, float, float]],
    eps_ms: float,
) -> dict[str, dict[str, float]]:
    out = {}
    for label, lo, hi in buckets:
        sel = (value >= lo) & (value < hi)
        if sel.sum() >= MIN_BUCKET:
            out[label] = regression_metrics(pred[sel], true[sel], eps_ms)
    return out


def load_bytes(data: ComputeData) -> np.ndarray:
    """Each load's weight bytes (fp32): the sum of rows x dim x 4 over its tables."""
    per_table = data.features[:, _ROWS] * data.features[:, _DIM] * 4.0
    sums = np.zeros(len(data))
    busy = np.diff(data.offsets) > 0
    if len(per_table):
        sums[busy] = np.add.reduceat(per_table, data.offsets[:-1][busy])
    return sums


def compute_breakdown(
    pred_ms: np.ndarray, data: ComputeData, eps_ms: float = 1e-3
) -> dict[str, Any]:
    """Compute metrics ``by_tables`` (tables per load) and ``by_size`` (load bytes)."""
    pred, true = np.asarray(pred_ms, dtype=float), data.label_ms
    return {
        "by_tables": _bucketed(pred, true, data.num_tables, TABLE_BUCKETS, eps_ms),
        "by_size": _bucketed(pred, true, load_bytes(data), SIZE_BUCKETS, eps_ms),
    }


def comm_breakdown(
    pred_ms: np.ndarray,
    true_ms: np.ndarray,
    num_devices: np.ndarray,
    dim_sums: np.ndarray,
    mask: np.ndarray,
    num_tables: np.ndarray | None = None,
    eps_ms: float = 1e-3,
) -> dict[str, Any]:
    """Per-device comm metrics ``by_devices`` (the plan's device count), ``by_dim_sum``
    (the device's summed embedding dims) and, given the shards of each sample's plan,
    ``by_tables``. Arrays are ``(n, maxN)`` with ``mask``; counts are ``(n,)``."""

    def per_device(per_sample: np.ndarray) -> np.ndarray:
        return np.broadcast_to(np.asarray(per_sample)[:, None], mask.shape)[mask]

    devices = per_device(num_devices)
    pred, true = np.asarray(pred_ms)[mask], np.asarray(true_ms)[mask]
    out = {
        "by_devices": {
            str(n): regression_metrics(pred[devices == n], true[devices == n], eps_ms)
            for n in np.unique(devices)
            if (devices == n).sum() >= MIN_BUCKET
        },
        "by_dim_sum": _bucketed(pred, true, np.asarray(dim_sums)[mask], DIM_SUM_BUCKETS, eps_ms),
    }
    if num_tables is not None:
        out["by_tables"] = _bucketed(pred, true, per_device(num_tables), TABLE_BUCKETS, eps_ms)
    return out


# --------------------------------------------------------------------------- the report

_SUMMARY_KEYS = ("name", "kind", "backend", "batch_size", "num_devices", "sample_counts", "metrics")
_BREAKDOWNS = (
    ("compute", "test_pool"),
    ("compute", "test"),
    ("bwd_comm", "test"),
    ("fwd_comm", "test"),
)


@dataclass(frozen=True)
class TextTable:
    """A table of already formatted cells (a CLI renders it as it likes)."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


def report_summary(
    meta: Mapping[str, Any], sessions: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """A model's provenance and metrics from its ``meta.json``, with scored sessions
    (the JSON form of ``model-report``)."""
    return {**{k: meta.get(k) for k in _SUMMARY_KEYS}, "sessions": list(sessions)}


def report_header(meta: Mapping[str, Any]) -> str:
    """One line naming the model, its kind, backend, batch size, devices and schema."""
    return (
        f"{meta.get('name')} ({meta.get('kind')}), backend {meta.get('backend')}, "
        f"batch {meta.get('batch_size')}, {meta.get('num_devices')} devices, "
        f"schema {meta.get('feature_schema')}"
    )


def _pct(x: float) -> str:
    return f"{x:.2%}"


def report_tables(
    meta: Mapping[str, Any], sessions: Sequence[Mapping[str, Any]] = ()
) -> list[TextTable]:
    """The held-out error of every part and split beside the noise floor (and each
    scored session beside its own floor), then the breakdowns by bucket."""
    metrics = dict(meta.get("metrics") or {})
    floors = metrics.pop("noise_floor", {})
    rows: list[tuple[str, ...]] = []
    for part, splits in sorted(metrics.items()):
        floor = (floors.get(part) or {}).get("floor_mape")
        for split, m in sorted(splits.items()):
            if isinstance(m, dict) and "mape" in m:
                rows.append(
                    (
                        part,
                        split,
                        str(m.get("n", "")),
                        f"{m.get('mse_log', math.nan):.4f}",
                        _pct(m["mape"]),
                        f"{m.get('spearman', math.nan):.4f}",
                        _pct(floor) if floor is not None else "",
                        f"{m['mape'] / floor:.2f}" if floor else "",
                    )
                )
    for session in sessions:
        m, floor = session["compute"], (session["noise_floor"] or {}).get("floor_mape")
        rows.append(
            (
                "compute",
                Path(session["data"]).name,
                str(m["n"]),
                f"{m['mse_log']:.4f}",
                _pct(m["mape"]),
                f"{m['spearman']:.4f}",
                _pct(floor) if floor else "",
                f"{m['mape'] / floor:.2f}" if floor else "",
            )
        )
    tables = [
        TextTable(
            "held-out error",
            ("model", "split", "n", "MSE(log)", "MAPE", "Spearman", "floor", "/floor"),
            tuple(rows),
        )
    ]
    for part, split in _BREAKDOWNS:
        m = (metrics.get(part) or {}).get(split) or {}
        groups = {k: v for k, v in m.items() if k.startswith("by_") and v}
        if not groups:
            continue
        rows = [
            (
                by[3:],
                bucket,
                str(b.get("n", "")),
                _pct(b["mape"]),
                f"{b.get('spearman', math.nan):.4f}",
            )
            for by, buckets in groups.items()
            for bucket, b in sorted(buckets.items(), key=lambda kv: bucket_order(by, kv[0]))
        ]
        tables.append(
            TextTable(
                f"{part} {split} by bucket",
                ("by", "bucket", "samples", "MAPE", "Spearman"),
                tuple(rows),
            )
        )
    return tables

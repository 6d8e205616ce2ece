"""How far a cost model is from measurements, broken down, and how far measurements are
from themselves (the noise floor).

* :func:`compute_breakdown` splits compute error by tables per device load and by the
  load's size in bytes; :func:`comm_breakdown` splits comm error by device count, by
  the device's dim sum (the bytes it sends) and by the shards in the sample's plan.
* :func:`noise_floor` compares two measurements of the same samples (a retest). A model
  cannot beat the noise of the measurement it is scored against: with independent,
  symmetric noise on both runs, a model that knew every sample's true cost would score
  the retest's MAPE divided by sqrt(2), reported as ``floor_mape``. The fidelity bar of a
  model is its held-out MAPE against ``floor_mape``.
* :func:`session_fidelity` scores a model on another ``pretrain`` run's held-out loads
  beside that run's floor (:func:`session_noise_floor`): the same loads measured in
  another session, or with retests taken at other times.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from neuroshard.pretrain.train import regression_metrics
from neuroshard.types import NUM_HIST_BINS

if TYPE_CHECKING:  # pragma: no cover
    from neuroshard.pretrain.dataset import ComputeData

__all__ = ["DIM_SUM_BUCKETS", "SIZE_BUCKETS", "TABLE_BUCKETS", "bucket_order", "comm_breakdown",
           "compute_breakdown", "noise_floor", "RETEST_INDEX_OFFSET", "session_fidelity",
           "session_noise_floor"]

# Added to a sample's index for its retest: same content, another key.
RETEST_INDEX_OFFSET = 1 << 40

_DIM, _ROWS = NUM_HIST_BINS, NUM_HIST_BINS + 2
_MiB = 1 << 20

# (label, low, high): low <= value < high
TABLE_BUCKETS = (("1", 1, 2), ("2-5", 2, 6), ("6-10", 6, 11), ("11-20", 11, 21),
                 ("21-40", 21, 41), (">40", 41, np.inf))
SIZE_BUCKETS = (("<64MiB", 0, 64 * _MiB), ("64MiB-512MiB", 64 * _MiB, 512 * _MiB),
                ("512MiB-2GiB", 512 * _MiB, 2048 * _MiB), (">=2GiB", 2048 * _MiB, np.inf))
DIM_SUM_BUCKETS = (("<256", 0, 256), ("256-1023", 256, 1024), ("1024-4095", 1024, 4096),
                   (">=4096", 4096, np.inf))


_BUCKETS_OF = {"by_tables": TABLE_BUCKETS, "by_size": SIZE_BUCKETS, "by_dim_sum": DIM_SUM_BUCKETS}


def bucket_order(by: str, label: str) -> tuple[float, str]:
    """Sort key that lists a breakdown's buckets from small to large (JSON sorts them by
    name); device counts sort as numbers."""
    for i, (name, _, _) in enumerate(_BUCKETS_OF.get(by, ())):
        if name == label:
            return (i, label)
    return (float(label), label) if label.isdigit() else (np.inf, label)


MIN_BUCKET = 5  # a bucket with fewer samples is left out: too few to rank or average


def _bucketed(pred: np.ndarray, true: np.ndarray, value: np.ndarray, buckets,
              eps_ms: float) -> dict[str, dict[str, float]]:
    out = {}
    for label, lo, hi in buckets:
        sel = (value >= lo) & (value < hi)
        if sel.sum() >= MIN_BUCKET:
            out[label] = regression_metrics(pred[sel], true[sel], eps_ms)
    return out


def load_bytes(data: "ComputeData") -> np.ndarray:
    """Each load's weight bytes (fp32): the sum of rows x dim x 4 over its tables."""
    per_table = data.features[:, _ROWS] * data.features[:, _DIM] * 4.0
    sums = np.zeros(len(data))
    busy = np.diff(data.offsets) > 0
    if len(per_table):
        sums[busy] = np.add.reduceat(per_table, data.offsets[:-1][busy])
    return sums


def compute_breakdown(pred_ms: np.ndarray, data: "ComputeData",
                      eps_ms: float = 1e-3) -> dict[str, Any]:
    """Compute metrics ``by_tables`` (tables per load) and ``by_size`` (load bytes)."""
    pred, true = np.asarray(pred_ms, dtype=float), data.label_ms
    return {"by_tables": _bucketed(pred, true, data.num_tables, TABLE_BUCKETS, eps_ms),
            "by_size": _bucketed(pred, true, load_bytes(data), SIZE_BUCKETS, eps_ms)}


def comm_breakdown(pred_ms: np.ndarray, true_ms: np.ndarray, num_devices: np.ndarray,
                   dim_sums: np.ndarray, mask: np.ndarray, num_tables: np.ndarray | None = None,
                   eps_ms: float = 1e-3) -> dict[str, Any]:
    """Per-device comm metrics ``by_devices`` (the plan's device count), ``by_dim_sum``
    (the device's summed embedding dims) and, given the shards of each sample's plan,
    ``by_tables``. Arrays are ``(n, maxN)`` with ``mask``; counts are ``(n,)``."""
    def per_device(per_sample: np.ndarray) -> np.ndarray:
        return np.broadcast_to(np.asarray(per_sample)[:, None], mask.shape)[mask]

    devices = per_device(num_devices)
    pred, true = np.asarray(pred_ms)[mask], np.asarray(true_ms)[mask]
    out = {"by_devices": {str(n): regression_metrics(pred[devices == n], true[devices == n],
                                                     eps_ms)
                          for n in np.unique(devices) if (devices == n).sum() >= MIN_BUCKET},
           "by_dim_sum": _bucketed(pred, true, np.asarray(dim_sums)[mask], DIM_SUM_BUCKETS,
                                   eps_ms)}
    if num_tables is not None:
        out["by_tables"] = _bucketed(pred, true, per_device(num_tables), TABLE_BUCKETS, eps_ms)
    return out


def noise_floor(first_ms: np.ndarray, second_ms: np.ndarray,
                eps_ms: float = 1e-3) -> dict[str, float]:
    """Retest metrics of two measurements of the same samples, and ``floor_mape``.

    The retest MAPE is taken both ways and averaged, so neither run is privileged."""
    a = np.asarray(first_ms, dtype=float).ravel()
    b = np.asarray(second_ms, dtype=float).ravel()
    m = regression_metrics(b, a, eps_ms)
    if len(a):
        m["mape"] = 0.5 * (m["mape"] + regression_metrics(a, b, eps_ms)["mape"])
    m["floor_mape"] = m["mape"] / np.sqrt(2.0) if len(a) else float("nan")
    return m


def session_noise_floor(data_dir: str | os.PathLike,
                        held: "ComputeData | None" = None) -> dict[str, float] | None:
    """Noise floor of the held-out compute samples a ``pretrain`` run measured twice
    (``compute_holdout`` against ``compute_retest`` under its ``data/`` directory, paired
    by sample index); ``None`` when it has no retests. ``held``: the ``compute_holdout``
    rows when already loaded."""
    from neuroshard.pretrain.collect import part_files
    from neuroshard.pretrain.dataset import load_compute, sample_keys

    d = Path(data_dir)
    if not part_files(d / "compute_retest"):
        return None
    first, again = sample_keys(d / "compute_holdout"), sample_keys(d / "compute_retest")
    pairs = [(first[i - RETEST_INDEX_OFFSET], key) for i, key in sorted(again.items())
             if i - RETEST_INDEX_OFFSET in first]
    a = held if held is not None else load_compute(d / "compute_holdout")
    b = load_compute(d / "compute_retest")
    a_ms, b_ms = dict(zip(a.keys, a.label_ms)), dict(zip(b.keys, b.label_ms))
    return noise_floor(np.array([a_ms[k] for k, _ in pairs]),
                       np.array([b_ms[k] for _, k in pairs]))


def session_fidelity(model_dir: str | os.PathLike,
                     data_dir: str | os.PathLike) -> dict[str, Any]:
    """The compute error of the model in ``model_dir`` on the held-out loads of a
    ``pretrain`` run's ``data/`` directory, with breakdowns, beside that run's noise floor.

    Raises :class:`~neuroshard.types.ModelMismatchError` when the data were measured on
    another backend or batch size than the model's, and
    :class:`~neuroshard.pretrain.collect.DatasetError` when there are no held-out loads.
    """
    from neuroshard.costmodel import load_cost_model
    from neuroshard.pretrain.dataset import load_compute

    d = Path(data_dir)
    held = load_compute(d / "compute_holdout")
    model = load_cost_model(model_dir, backend=json.loads(held.fingerprint))
    return {"data": str(d), "compute": model.score_compute(held),
            "noise_floor": session_noise_floor(d, held)}

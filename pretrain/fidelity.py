"""How far a cost model is from another ``pretrain`` run's measurements, and how far
that run's measurements are from themselves (its noise floor).

The metrics themselves (:func:`~neuroshard.models.metrics.regression_metrics`, the
breakdowns, :func:`~neuroshard.models.metrics.noise_floor`) are numpy functions of
:mod:`neuroshard.models.metrics`; this module reads a run's Parquet to feed them.

* :func:`session_noise_floor` pairs a run's held-out compute samples with their retests;
  :func:`session_comm_noise_floors` its comm samples with theirs.
* :func:`session_fidelity` scores a model on another ``pretrain`` run's held-out loads
  beside that run's floor: the same loads measured in another session, or with retests
  taken at other times.
* :func:`model_report` is ``neuroshard model-report``: a model's ``meta.json`` with the
  sessions it was scored on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuroshard.models import load_cost_model, read_meta
from neuroshard.models.metrics import noise_floor
from neuroshard.pretrain.collect import part_files
from neuroshard.pretrain.dataset import load_comm, load_compute, sample_keys
from neuroshard.samples import ComputeData

__all__ = [
    "RETEST_INDEX_OFFSET",
    "model_report",
    "session_comm_noise_floors",
    "session_fidelity",
    "session_noise_floor",
]

# Added to a sample's index for its retest: same content, another key.
RETEST_INDEX_OFFSET = 1 << 40


def _retest_pairs(first_dir: Path, again_dir: Path) -> list[tuple[str, str]]:
    """(first key, retest key) of every retest in ``again_dir`` whose original is in
    ``first_dir``, paired by sample index (:data:`RETEST_INDEX_OFFSET`)."""
    first, again = sample_keys(first_dir), sample_keys(again_dir)
    return [
        (first[i - RETEST_INDEX_OFFSET], key)
        for i, key in sorted(again.items())
        if i - RETEST_INDEX_OFFSET in first
    ]


def session_noise_floor(
    data_dir: str | os.PathLike, held: ComputeData | None = None
) -> dict[str, float] | None:
    """Noise floor of the held-out compute samples a ``pretrain`` run measured twice
    (``compute_holdout`` against ``compute_retest`` under its ``data/`` directory, paired
    by sample index); ``None`` when it has no retests. ``held``: the ``compute_holdout``
    rows when already loaded."""
    d = Path(data_dir)
    if not part_files(d / "compute_retest"):
        return None
    pairs = _retest_pairs(d / "compute_holdout", d / "compute_retest")
    a = held if held is not None else load_compute(d / "compute_holdout")
    b = load_compute(d / "compute_retest")
    a_ms = dict(zip(a.keys, a.label_ms, strict=True))
    b_ms = dict(zip(b.keys, b.label_ms, strict=True))
    return noise_floor(np.array([a_ms[k] for k, _ in pairs]), np.array([b_ms[k] for _, k in pairs]))


def session_comm_noise_floors(data_dir: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Noise floors of the comm samples a ``pretrain`` run measured twice (``comm``
    against ``comm_retest``, paired by sample index, every device of each): ``fwd_comm``
    and ``bwd_comm``, or nothing when it has no comm retests."""
    d = Path(data_dir)
    if not part_files(d / "comm_retest"):
        return {}
    pairs = _retest_pairs(d / "comm", d / "comm_retest")
    a = load_comm(d / "comm", {k for k, _ in pairs})
    b = load_comm(d / "comm_retest", {k for _, k in pairs})
    row_a = {k: i for i, k in enumerate(a.keys.tolist())}
    row_b = {k: i for i, k in enumerate(b.keys.tolist())}
    out = {}
    for which in ("fwd", "bwd"):
        x, y = getattr(a, f"{which}_ms"), getattr(b, f"{which}_ms")
        first_ms = [x[row_a[k]][a.mask[row_a[k]]] for k, _ in pairs]
        again_ms = [y[row_b[k]][b.mask[row_b[k]]] for _, k in pairs]
        out[f"{which}_comm"] = noise_floor(np.concatenate(first_ms), np.concatenate(again_ms))
    return out


def session_fidelity(model_dir: str | os.PathLike, data_dir: str | os.PathLike) -> dict[str, Any]:
    """The compute error of the model in ``model_dir`` on the held-out loads of a
    ``pretrain`` run's ``data/`` directory, with breakdowns, beside that run's noise floor.

    Raises :class:`~neuroshard.types.ModelMismatchError` when the data were measured on
    another backend or batch size than the model's, and
    :class:`~neuroshard.pretrain.collect.DatasetError` when there are no held-out loads.
    """
    d = Path(data_dir)
    held = load_compute(d / "compute_holdout")
    model: Any = load_cost_model(model_dir, backend=json.loads(held.fingerprint))
    return {
        "data": str(d),
        "compute": model.score_compute(held),
        "noise_floor": session_noise_floor(d, held),
    }


Report = tuple[dict[str, Any], list[dict[str, Any]]]


def model_report(
    model_dir: str | os.PathLike, data_dirs: Sequence[str | os.PathLike] = ()
) -> Report:
    """A model's ``meta.json`` and its :func:`session_fidelity` on each of ``data_dirs``
    (lay them out with :func:`~neuroshard.models.metrics.report_tables` or
    :func:`~neuroshard.models.metrics.report_summary`)."""
    meta = read_meta(model_dir)
    return meta, [session_fidelity(model_dir, d) for d in data_dirs]

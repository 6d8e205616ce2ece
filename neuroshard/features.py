"""The table feature schema the cost models read, and the transforms into model inputs.

A table (or a column shard of one, given as a :class:`~neuroshard.types.TableSpec` whose
``dim`` is the shard width) is 20 raw numbers in :data:`FEATURE_NAMES` order: 17 reuse
histogram bins, ``dim``, ``pooling_factor``, ``rows``. Collected data stores the raw
numbers; models read the transformed ones, so the transform can change with
:data:`FEATURE_SCHEMA` without collecting again.

Transform (schema ``table20/v1``): reuse bins as they are, ``log2(dim)``,
``log1p(pooling_factor)``, ``log10(rows)``.

Models that take the batch as an input (:data:`RANGE_INPUTS`) add
:data:`NUM_BATCH_FEATURES` columns per shard that scale with the global batch ``B``
(:func:`batch_features`): ``log10(B)``, ``log10(1 + lookups)`` with lookups ``B x pooling``,
``log10(1 + unique rows)`` with unique rows ``min(rows, lookups / mean accesses per
unique index)`` (the reuse histogram's mean, :data:`neuroshard.traffic.BIN_ACCESS_COUNTS`),
and ``log10(1 + pooled output bytes)``, ``B x dim x 4``. The raw features and their
schema stay the same: the batch is a property of the sample, not of the table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from neuroshard.traffic import BIN_ACCESS_COUNTS
from neuroshard.types import BYTES_PER_FLOAT, FEATURE_NAMES, NUM_HIST_BINS, TableSpec

FEATURE_SCHEMA = "table20/v1"
NUM_FEATURES = len(FEATURE_NAMES)
RANGE_INPUTS = "table20+batch4/v1"
NUM_BATCH_FEATURES = 4

_DIM, _POOLING, _ROWS = NUM_HIST_BINS, NUM_HIST_BINS + 1, NUM_HIST_BINS + 2

__all__ = [
    "NUM_BATCH_FEATURES",
    "RANGE_INPUTS",
    "batch_features",
    "FEATURE_NAMES",
    "FEATURE_SCHEMA",
    "NUM_FEATURES",
    "pad_loads",
    "raw_features",
    "table_features",
    "transform_raw",
]


def raw_features(tables: Sequence[TableSpec]) -> np.ndarray:
    """Raw features of ``tables``, shape ``(len(tables), 20)``, float64."""
    out = np.empty((len(tables), NUM_FEATURES), dtype=np.float64)
    if len(tables):  # same order as TableSpec.feature_vector(), built column-block-wise for speed
        out[:, :NUM_HIST_BINS] = [t.reuse_hist for t in tables]
        out[:, NUM_HIST_BINS:] = [(t.dim, t.pooling_factor, t.rows) for t in tables]
    return out


def transform_raw(raw: np.ndarray) -> np.ndarray:
    """Model-ready float32 features from raw ones (any leading shape, last axis 20)."""
    raw = np.asarray(raw, dtype=np.float64)
    if raw.shape[-1] != NUM_FEATURES:
        raise ValueError(f"expected {NUM_FEATURES} raw features on the last axis, got {raw.shape}")
    out = raw.copy()
    out[..., _DIM] = np.log2(np.maximum(raw[..., _DIM], 1.0))
    out[..., _POOLING] = np.log1p(np.maximum(raw[..., _POOLING], 0.0))
    out[..., _ROWS] = np.log10(np.maximum(raw[..., _ROWS], 1.0))
    return out.astype(np.float32)


def batch_features(raw: np.ndarray, batch_size: float | np.ndarray) -> np.ndarray:
    """The batch-scaled columns of raw feature rows ``(n, 20)`` at global batch
    ``batch_size`` (one number, or one per row): ``(n, 4)`` float32 (module doc)."""
    raw = np.asarray(raw, dtype=np.float64).reshape(-1, NUM_FEATURES)
    batch = np.broadcast_to(np.asarray(batch_size, dtype=np.float64), (len(raw),))
    hist = raw[:, :NUM_HIST_BINS]
    mass = hist.sum(axis=1)
    a_bar = np.where(mass > 0, hist @ BIN_ACCESS_COUNTS / np.where(mass > 0, mass, 1.0), 1.0)
    lookups = batch * np.maximum(raw[:, _POOLING], 0.0)
    unique = np.minimum(np.maximum(raw[:, _ROWS], 1.0), lookups / np.maximum(a_bar, 1.0))
    out_bytes = batch * np.maximum(raw[:, _DIM], 1.0) * BYTES_PER_FLOAT
    cols = (
        np.log10(np.maximum(batch, 1.0)),
        np.log10(1.0 + lookups),
        np.log10(1.0 + unique),
        np.log10(1.0 + out_bytes),
    )
    return np.stack(cols, axis=-1).astype(np.float32)


def table_features(tables: Sequence[TableSpec]) -> np.ndarray:
    """Model-ready features of ``tables``, shape ``(len(tables), 20)``, float32."""
    return transform_raw(raw_features(tables))


def pad_loads(
    loads: Sequence[np.ndarray] | Sequence[Sequence[TableSpec]], max_tables: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pad a batch of loads into ``(B, maxT, F)`` float32 features and a ``(B, maxT)`` mask.

    Each load is either a sequence of :class:`TableSpec` (transformed here) or an array of
    already transformed features ``(T_i, F)``. Padding rows are zero and masked out
    (``mask`` is True for real tables). ``maxT`` is the longest load, at least 1, or
    ``max_tables`` when given (a longer load is an error).
    """
    feats = [
        np.asarray(load, dtype=np.float32).reshape(-1, NUM_FEATURES)
        if isinstance(load, np.ndarray)
        else table_features(load)
        for load in loads
    ]
    longest = max((len(f) for f in feats), default=0)
    width = max(longest, 1) if max_tables is None else max_tables
    if longest > width:
        raise ValueError(f"a load has {longest} tables, more than max_tables={width}")
    out = np.zeros((len(feats), width, NUM_FEATURES), dtype=np.float32)
    mask = np.zeros((len(feats), width), dtype=bool)
    for i, f in enumerate(feats):
        out[i, : len(f)] = f
        mask[i, : len(f)] = True
    return out, mask

"""The measured samples cost models fit on, as plain arrays, and how they are split.

:class:`ComputeData` holds device loads (ragged tables per row, one label per row) and
:class:`CommData` per-device comm times padded to the largest device count. Reading them
from collected Parquet is :mod:`neuroshard.pretrain.dataset`'s job; the models only need
these containers. :func:`split_random` splits 80/10/10 by a seeded permutation;
:func:`split_by_tables` holds out the rows whose tables all come from a named pool.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from neuroshard.features import pad_loads, transform_raw

logger = logging.getLogger(__name__)

__all__ = ["CommData", "ComputeData", "Split", "split_by_tables", "split_random"]


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


def _indices(idx: Iterable[int]) -> np.ndarray:
    return np.asarray(list(idx) if not isinstance(idx, np.ndarray) else idx, dtype=np.int64)


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
        return self.table_names[self.offsets[i] : self.offsets[i + 1]].tolist()

    def subset(self, idx: Iterable[int]) -> ComputeData:
        idx = _indices(idx)
        counts = np.diff(self.offsets)[idx]
        starts = self.offsets[:-1][idx]
        take = np.repeat(
            starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts
        ) + np.arange(counts.sum())
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return ComputeData(
            self.keys[idx],
            offsets,
            self.features[take],
            self.table_names[take],
            self.label_ms[idx],
            self.spread[idx],
            self.fingerprint,
        )

    def concat(self, other: ComputeData) -> ComputeData:
        """``self``'s rows, then ``other``'s (both measured on one backend, no key in
        both: a sample's key names it, and the models key per-sample batches by it)."""
        if other.fingerprint != self.fingerprint:
            raise ValueError("cannot join compute samples of two backends (fingerprints differ)")
        repeated = np.intersect1d(self.keys, other.keys)
        if repeated.size:
            raise ValueError(
                f"cannot join compute samples: sample keys repeat ({repeated.size}, e.g. "
                f"{str(repeated[0])!r})"
            )
        return ComputeData(
            np.concatenate([self.keys, other.keys]),
            np.concatenate([self.offsets[:-1], other.offsets + self.offsets[-1]]).astype(np.int64),
            np.concatenate([self.features, other.features]),
            np.concatenate([self.table_names, other.table_names]),
            np.concatenate([self.label_ms, other.label_ms]),
            np.concatenate([self.spread, other.spread]),
            self.fingerprint,
        )

    def padded(self, max_tables: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Transformed features ``(n, maxT, 20)`` float32 and mask ``(n, maxT)``."""
        feats = transform_raw(self.features)
        return pad_loads([feats[a:b] for a, b in itertools.pairwise(self.offsets)], max_tables)

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

    def subset(self, idx: Iterable[int]) -> CommData:
        idx = _indices(idx)
        width = int(self.num_devices[idx].max()) if len(idx) else 1
        return CommData(
            self.keys[idx],
            self.num_devices[idx],
            self.dim_sums[idx, :width],
            self.waits_ms[idx, :width],
            self.fwd_ms[idx, :width],
            self.bwd_ms[idx, :width],
            self.mask[idx, :width],
            fingerprint=self.fingerprint,
            num_tables=None if self.num_tables is None else self.num_tables[idx],
        )

    def data_hash(self) -> str:
        return _hash_arrays(self.keys, self.fwd_ms[self.mask], self.bwd_ms[self.mask])


def split_random(
    n: int, seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> Split:
    """Train/val/test indices from a seeded permutation of ``range(n)``."""
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1: {fractions}")
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return Split(
        np.sort(perm[:n_train]),
        np.sort(perm[n_train : n_train + n_val]),
        np.sort(perm[n_train + n_val :]),
    )


def split_by_tables(
    data: ComputeData, test_names: Collection[str], seed: int = 0, val_fraction: float = 0.1
) -> Split:
    """Rows whose tables all lie in ``test_names`` are the test set.

    Rows with no table in ``test_names`` are split into train and validation by a seeded
    permutation; rows mixing both pools are dropped, so no test table is seen in training.
    """
    names = set(test_names)
    in_test = np.fromiter(
        (n in names for n in data.table_names), dtype=bool, count=len(data.table_names)
    )
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

"""Synthetic index streams reproduce a table's pooling factor and reuse histogram."""

from __future__ import annotations

import time

import numpy as np
import pytest

from neuroshard.indices import bin_count_range, generate_batch, reuse_histogram
from neuroshard.types import DLRM_REUSE_HIST, HIST_UPPER_EDGES, NUM_HIST_BINS

from factories import make_table

# Tolerances: the recomputed histogram is within L1 distance 0.05 of the spec and the
# pooling factor within 2%, for batches big enough to hold the histogram's tail.
HIST_L1_TOL = 0.05
POOLING_REL_TOL = 0.02

SKEWED = np.zeros(NUM_HIST_BINS)
SKEWED[[0, 3, 6, 9]] = [0.2, 0.3, 0.4, 0.1]


@pytest.mark.parametrize(
    "rows,pooling,hist",
    [
        (10_000_000, 30.0, DLRM_REUSE_HIST),
        (1_000_000, 10.0, DLRM_REUSE_HIST),
        (200_000, 1.0, DLRM_REUSE_HIST),
        (5_000_000, 3.5, tuple(SKEWED)),
    ],
)
def test_reproduces_pooling_and_histogram(rows, pooling, hist):
    spec = make_table(rows=rows, pooling_factor=pooling, reuse_hist=hist)
    indices, offsets = generate_batch(spec, 65_536, rng=1)
    assert indices.dtype == np.int64 and offsets.dtype == np.int64
    assert abs(len(indices) / 65_536 - pooling) <= POOLING_REL_TOL * pooling
    l1 = np.abs(reuse_histogram(indices) - np.asarray(hist)).sum()
    assert l1 < HIST_L1_TOL, l1


def test_batch_shape_and_range():
    spec = make_table(rows=5_000, pooling_factor=7.3)
    indices, offsets = generate_batch(spec, 1_000, rng=0)
    assert offsets.shape == (1_001,) and offsets[0] == 0 and offsets[-1] == len(indices)
    assert np.all(np.diff(offsets) >= 0)
    assert len(indices) == round(1_000 * 7.3)
    assert indices.min() >= 0 and indices.max() < 5_000
    lengths = np.diff(offsets)
    assert lengths.std() > 1.0  # bags vary in length (Poisson), not all equal


def test_same_seed_same_batch_other_seed_other_batch():
    spec = make_table(rows=100_000, pooling_factor=5)
    a, _ = generate_batch(spec, 512, rng=3)
    b, _ = generate_batch(spec, 512, rng=3)
    c, _ = generate_batch(spec, 512, rng=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_fast_at_full_batch():
    spec = make_table(rows=10_000_000, pooling_factor=30)
    started = time.perf_counter()
    generate_batch(spec, 65_536, rng=0)
    # about 0.3 s on one shared core; the bound leaves room for a loaded machine
    assert time.perf_counter() - started < 2.0


def test_small_table_keeps_pooling_and_uses_every_row():
    spec = make_table(rows=300, pooling_factor=20)
    indices, offsets = generate_batch(spec, 1_024, rng=0)
    assert len(indices) == 20 * 1_024
    assert len(np.unique(indices)) == 300
    assert reuse_histogram(indices)[0] == 0.0  # every row is hot: nothing is used once


def test_zero_pooling_gives_empty_bags():
    indices, offsets = generate_batch(make_table(pooling_factor=0.0), 64, rng=0)
    assert len(indices) == 0 and np.all(offsets == 0)


def test_reuse_histogram_bins_follow_edges():
    # counts 1, 2, 3, 4, 5 -> bins 0, 1, 2, 2, 3
    indices = np.repeat(np.arange(5), [1, 2, 3, 4, 5])
    hist = reuse_histogram(indices)
    assert hist.shape == (NUM_HIST_BINS,)
    assert np.allclose(hist[:4], [0.2, 0.2, 0.4, 0.2]) and hist[4:].sum() == 0
    top = int(HIST_UPPER_EDGES[-2])  # 32768 is the last closed edge
    assert reuse_histogram(np.zeros(top, dtype=np.int64))[-2] == 1.0
    assert reuse_histogram(np.zeros(top + 1, dtype=np.int64))[-1] == 1.0
    assert reuse_histogram(np.array([], dtype=np.int64)).sum() == 0.0
    # large ids take the sort path instead of bincount
    assert np.allclose(reuse_histogram(np.array([10**12, 10**12, 7])), reuse_histogram([1, 1, 7]))


def test_bin_count_ranges_tile_the_integers():
    previous_hi = 0
    for k in range(NUM_HIST_BINS):
        lo, hi = bin_count_range(k)
        assert lo == previous_hi + 1 and hi >= lo
        previous_hi = hi

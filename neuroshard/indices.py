"""Synthetic lookup streams that reproduce a table's pooling factor and reuse histogram.

A :class:`~neuroshard.types.TableSpec` summarises one table's lookups in one batch by
three numbers and a histogram: ``rows``, ``pooling_factor`` (mean bag length) and
``reuse_hist`` (fraction of the batch's unique rows whose access count falls in each bin
of :data:`~neuroshard.types.HIST_UPPER_EDGES`). :func:`generate_batch` turns that summary
back into concrete ``(indices, offsets)`` for a fused embedding kernel, so a hardware
backend can time a table it has only the statistics of.

How a batch is built (all vectorised numpy, about 0.1 s for 65,536 bags of 30):

1. **Lookups.** ``L = round(batch_size * pooling_factor)``.
2. **Bag lengths.** Poisson with mean ``pooling_factor``, then nudged by single lookups
   so they sum to exactly ``L``. (Real bag lengths are often more spread out; the fused
   CPU kernel's cost follows total lookups far more than the spread.)
3. **Access counts.** Within a bin ``(lo, hi]`` counts are integers drawn with
   probability proportional to ``1/c`` -- a power law, which reproduces the public DLRM
   data's per-bin share of lookups (REFERENCE.md) to within a few percent. The open last
   bin is taken as ``(32768, 65536]``. The number of unique rows ``U`` solves
   ``U * sum_k hist_k * mean_count_k = L`` (refined for rounding of per-bin counts),
   clamped to ``rows``; counts are drawn by stratified sampling of each bin's law and then
   adjusted inside their bins until they sum to ``L``.
4. **Rows.** Each unique gets a distinct random row id in ``[0, rows)``; ids are
   repeated by their counts, shuffled and cut into bags.

When the table is too small for the histogram (``U > rows``), every row is used and the
counts are scaled up to reach ``L``: the pooling factor is kept, the histogram shifts to
higher bins. When a batch is too small to hold a bin's fraction (a 0.001 tail with 40
unique rows), that bin is empty and the others absorb its lookups.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from neuroshard.types import HIST_UPPER_EDGES, NUM_HIST_BINS, TableSpec

logger = logging.getLogger(__name__)

# Upper count of the open last bin ``(32768, inf)`` when generating.
LAST_BIN_MAX_COUNT = 2 * 32768


def bin_count_range(k: int) -> tuple[int, int]:
    """Smallest and largest integer access count of histogram bin ``k`` (inclusive)."""
    if k == 0:
        return 1, 1
    lo = int(HIST_UPPER_EDGES[k - 1]) + 1
    hi = LAST_BIN_MAX_COUNT if k == NUM_HIST_BINS - 1 else int(HIST_UPPER_EDGES[k])
    return lo, hi


@functools.cache
def _bin_law(k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Counts of bin ``k``, their cumulative probabilities (p ~ 1/c), and the mean count."""
    lo, hi = bin_count_range(k)
    counts = np.arange(lo, hi + 1, dtype=np.int64)
    weights = 1.0 / counts
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    mean = float(len(counts) / weights.sum())  # sum(c * 1/c) / sum(1/c)
    return counts, cdf, mean


def _bin_means() -> np.ndarray:
    return np.array([_bin_law(k)[2] for k in range(NUM_HIST_BINS)])


def _largest_remainder(total: int, fractions: np.ndarray) -> np.ndarray:
    """Integers proportional to ``fractions`` that sum to ``total``."""
    raw = fractions * total
    out = np.floor(raw).astype(np.int64)
    short = total - int(out.sum())
    if short > 0:
        order = np.argsort(-(raw - out), kind="stable")
        out[order[:short]] += 1
    return out


def _uniques_per_bin(lookups: int, rows: int, hist: np.ndarray) -> np.ndarray:
    """Number of unique rows in each bin so that expected lookups are ``lookups``."""
    means = _bin_means()
    unique = lookups / float(hist @ means)
    per_bin = np.zeros(NUM_HIST_BINS, dtype=np.int64)
    for _ in range(4):  # fixed point: rounding empties tail bins, more uniques make up for it
        u = int(min(max(round(unique), 1), rows, lookups))
        per_bin = _largest_remainder(u, hist)
        expected = float(per_bin @ means)
        if expected <= 0 or abs(expected - lookups) <= 0.002 * lookups:
            break
        unique *= lookups / expected
    return per_bin


def _draw_counts(per_bin: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Access counts of each unique row (stratified draws of each bin's law), and bins."""
    counts, bins = [], []
    for k, n in enumerate(per_bin):
        if n == 0:
            continue
        values, cdf, _ = _bin_law(k)
        q = (np.arange(n) + rng.random(n)) / n
        idx = np.minimum(np.searchsorted(cdf, q, side="left"), len(values) - 1)
        counts.append(values[idx])
        bins.append(np.full(n, k, dtype=np.int64))
    return np.concatenate(counts), np.concatenate(bins)


def _spread(
    counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, diff: int, rng: np.random.Generator
) -> int:
    """Add ``diff`` (or remove, if negative) to ``counts`` keeping each in ``[lo, hi]``,
    spread at random in proportion to the room each has left; returns what did not fit."""
    for _ in range(64):
        if diff == 0:
            break
        room = (hi - counts) if diff > 0 else (counts - lo)
        total_room = int(room.sum())
        if total_room == 0:
            break
        step = np.minimum(rng.multinomial(min(abs(diff), total_room), room / total_room), room)
        moved = int(step.sum())
        if diff > 0:
            counts += step
            diff -= moved
        else:
            counts -= step
            diff += moved
    return diff


def _fit_total(
    counts: np.ndarray, bins: np.ndarray, lookups: int, rng: np.random.Generator
) -> np.ndarray:
    """Adjust counts, inside their bins where possible, so they sum to ``lookups``."""
    ranges = np.array([bin_count_range(k) for k in range(NUM_HIST_BINS)])
    diff = _spread(counts, ranges[bins, 0], ranges[bins, 1], lookups - int(counts.sum()), rng)
    if diff != 0:
        # The bins cannot hold the lookups (table too small for its histogram, or a tiny
        # batch): leave the bins, keep every count >= 1.
        ones = np.ones_like(counts)
        diff = _spread(counts, ones, ones * max(lookups, 1), diff, rng)
    if diff != 0:
        raise RuntimeError(f"could not place {diff} lookups")  # unreachable: U <= L
    return counts


def _distinct_rows(n: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct random row ids in ``[0, rows)``, in random order."""
    if n > rows // 2:
        return rng.permutation(rows)[:n]
    picked = np.empty(0, dtype=np.int64)
    while len(picked) < n:
        extra = int((n - len(picked)) * 1.2) + 16
        picked = np.unique(np.concatenate([picked, rng.integers(0, rows, size=extra)]))
    rng.shuffle(picked)
    return picked[:n]


def bag_lengths(
    batch_size: int, lookups: int, pooling_factor: float, rng: np.random.Generator
) -> np.ndarray:
    """Poisson bag lengths with mean ``pooling_factor`` that sum to exactly ``lookups``."""
    lengths = rng.poisson(pooling_factor, size=batch_size).astype(np.int64)
    diff = lookups - int(lengths.sum())
    if diff > 0:
        lengths += np.bincount(rng.integers(0, batch_size, size=diff), minlength=batch_size)
    elif diff < 0:
        owners = np.repeat(np.arange(batch_size), lengths)
        drop = rng.choice(len(owners), size=-diff, replace=False)
        lengths -= np.bincount(owners[drop], minlength=batch_size)
    return lengths


def generate_batch(
    spec: TableSpec, batch_size: int, rng: np.random.Generator | int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One batch of lookups into ``spec``: ``(indices, offsets)``, both int64.

    ``offsets`` has ``batch_size + 1`` entries; bag ``b`` is
    ``indices[offsets[b]:offsets[b + 1]]``. Indices are in ``[0, spec.rows)``.
    """
    rng = np.random.default_rng(rng)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if spec.rows < 1:
        raise ValueError(f"table {spec.name!r} has {spec.rows} rows")
    lookups = int(round(batch_size * spec.pooling_factor))
    lengths = bag_lengths(batch_size, lookups, spec.pooling_factor, rng)
    offsets = np.zeros(batch_size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if lookups == 0:
        return np.empty(0, dtype=np.int64), offsets

    hist = np.asarray(spec.reuse_hist, dtype=float)
    if hist.shape != (NUM_HIST_BINS,) or hist.min() < 0 or hist.sum() <= 0:
        raise ValueError(
            f"table {spec.name!r}: reuse_hist must be {NUM_HIST_BINS} "
            f"non-negative fractions, got {spec.reuse_hist!r}"
        )
    hist = hist / hist.sum()
    per_bin = _uniques_per_bin(lookups, spec.rows, hist)
    counts, bins = _draw_counts(per_bin, rng)
    counts = _fit_total(counts, bins, lookups, rng)
    if int(per_bin.sum()) == spec.rows and counts.max() > bin_count_range(NUM_HIST_BINS - 1)[0]:
        logger.debug(
            "table %r: %d rows too few for its histogram at %d lookups",
            spec.name,
            spec.rows,
            lookups,
        )

    row_ids = _distinct_rows(len(counts), spec.rows, rng)
    indices = np.repeat(row_ids, counts)
    rng.shuffle(indices)
    return indices, offsets


def access_counts(indices: np.ndarray) -> np.ndarray:
    """How often each distinct index occurs (order unspecified)."""
    indices = np.asarray(indices)
    if indices.size == 0:
        return np.empty(0, dtype=np.int64)
    top = int(indices.max())
    if int(indices.min()) >= 0 and top < 4 * indices.size + 1024:
        counts = np.bincount(indices, minlength=0)
        return counts[counts > 0]
    return np.unique(indices, return_counts=True)[1]


def histogram_of_counts(counts: np.ndarray) -> np.ndarray:
    """17 fractions: share of distinct indices whose access count falls in each bin."""
    counts = np.asarray(counts)
    if counts.size == 0:
        return np.zeros(NUM_HIST_BINS)
    bins = np.clip(np.ceil(np.log2(counts)).astype(np.int64), 0, NUM_HIST_BINS - 1)
    return np.bincount(bins, minlength=NUM_HIST_BINS) / counts.size


def reuse_histogram(indices: np.ndarray) -> np.ndarray:
    """Reuse histogram of one batch's indices (all zeros when there are none)."""
    return histogram_of_counts(access_counts(indices))

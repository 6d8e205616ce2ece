"""A synthetic pool of 856 embedding tables shaped like the public DLRM data.

The public DLRM embedding data (facebookresearch/dlrm_datasets) has 856 tables, but the
per-table spreads of rows and pooling factors are not published, and we do not ship the
traces. This module draws a stand-in pool whose *published* aggregates match the data
(shared/REFERENCE.md) and whose unpublished spreads follow the assumptions below. Every
number here is an assumption of this module unless marked "dataset".

Distributions (one ``numpy.random.default_rng(seed)``, drawn in this order)
--------------------------------------------------------------------------
* **rows** -- log-normal, median :data:`ROWS_MEDIAN` (200,000), log-space sigma
  :data:`ROWS_SIGMA` (1.4), rounded and clipped to ``[100, 4,000,000]``. The floor is the
  dataset's (rows = max index + 1, at least 100). The ceiling keeps the biggest table at
  2.0 GB at dim 128, so every table fits a 4 GB device table-wise. For the default pool
  (seed 0) 60 random tables total 9.8 / 13.7 / 18.0 GB at dim 128 (5th / 50th / 95th
  percentile).
* **dim** -- 128 for every table (the largest width; augmentation halves it later).
* **pooling factor** -- log-normal, log-space sigma :data:`POOLING_SIGMA` (1.0), clipped to
  ``[0.5, 300]``, then rescaled (with re-clipping, a few fixed-point steps) so that the
  pool's mean is the dataset's 15.8 lookups per table per sample, and rounded to 4
  decimals.
* **access skew** -- a table's rows are looked up with Zipf-Mandelbrot probabilities
  ``q_r ~ (r + k)**-s`` over ranks ``r = 1..rows``. The exponent ``s`` is normal
  (mean :data:`ZIPF_MEAN` 0.9, sd :data:`ZIPF_SD` 0.15, clipped to ``[0.05, 2.5]``); the
  offset ``k + 1`` is log-uniform on ``[1, 1000]``, flattening the hottest few ranks.
  These four numbers, with the rows median and sigma, were chosen by a small random
  search (not part of the library) so that the pool-wide histograms below land near the
  dataset's and the pool's accesses per unique index come out near the dataset's 6.9.
* **reuse histogram** -- with ``L = 65,536 x pooling`` lookups, row ``r`` is accessed
  ``Poisson(c_r)`` times, ``c_r = L q_r`` (independent lookups). Its probability of being
  touched, ``1 - exp(-c_r)``, is its weight as a unique index; a touched row falls in the
  bin of its realised count among the 17 bins of
  :data:`neuroshard.types.HIST_UPPER_EDGES` ((0,1], (1,2], (2,4], ..., above 32768). Rows
  with ``c_r >= 48`` are binned by ``c_r`` itself, where the Poisson spread is narrow. The
  dataset's histogram counts realised accesses, so spreading cool rows over the bins of
  their realised counts matters: binning by the expectation alone overfills (1,2] and
  starves (0,1]. Expectations are summed over about 400 log-spaced groups of ranks
  (every rank separately near the head), not row by row: the 856 tables take under a
  second. A table's histogram is rounded to 6 decimals and renormalised so JSON
  round-trips it stably.

:func:`pool_reuse_hist` weights each table's histogram by its expected unique indices
(and its lookup split by its lookups) to give pool-wide figures comparable with the
dataset's; the ``distributions`` block of ``pool.json`` records them beside the targets.
For the default pool, the fraction of unique indices in (0,1], (1,2], (2,4], (4,8], (8,16]
is 0.462, 0.182, 0.149, 0.098, 0.056 against the dataset's 0.473, 0.152, 0.139, 0.112,
0.072: each of the ten published bins is within 0.031, the worst being (1,2]. Known
misfit: the lookup split is flatter than the dataset's (too few lookups at counts 4..32,
too many above 32768). Accesses per unique index: 6.73 against the dataset's 6.91.

Train/test split: a fixed seeded permutation splits the pool into disjoint halves
(DreamShard's protocol: test tables are never seen in training).
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuroshard.types import (
    DEFAULT_BATCH_SIZE,
    DLRM_PUBLISHED_UNIQUE_FRACTIONS,
    HIST_UPPER_EDGES,
    NUM_HIST_BINS,
    TableSpec,
    TableSpecError,
)

logger = logging.getLogger(__name__)

POOL_FORMAT = "neuroshard.pool/v1"
POOL_SIZE = 856  # dataset: number of tables
POOL_DIM = 128
MEAN_POOLING = 15.8  # dataset: mean pooling factor per table per sample
DEFAULT_SEED = 0
DEFAULT_TEST_FRACTION = 0.5

ROWS_MEDIAN = 200_000.0
ROWS_SIGMA = 1.4
ROWS_MIN, ROWS_MAX = 100, 4_000_000
POOLING_SIGMA = 1.0
POOLING_MIN, POOLING_MAX = 0.5, 300.0
ZIPF_MEAN = 0.9
ZIPF_SD = 0.15
ZIPF_MIN, ZIPF_MAX = 0.05, 2.5
OFFSET_MIN, OFFSET_MAX = 1.0, 1000.0  # log-uniform range of (k + 1)

_RANK_GROUPS = 400
_POISSON_BELOW = 48.0  # expected count under which realised counts are spread (Poisson)
_K = np.arange(1, 161, dtype=float)  # realised access counts considered for cool rows
_LOG_K_FACTORIAL = np.array([math.lgamma(k + 1.0) for k in _K])
_K_BIN = np.searchsorted(np.asarray(HIST_UPPER_EDGES[:-1]), _K, side="left")

# dataset: fraction of unique indices per access-count bin, the ten bins published with
# non-zero figures (the rest round to 0.000).
DATASET_UNIQUE_FRACTIONS: tuple[float, ...] = DLRM_PUBLISHED_UNIQUE_FRACTIONS
# dataset: fraction of all lookups by the access count of their index, 17 bins.
DATASET_LOOKUP_FRACTIONS: tuple[float, ...] = (
    0.069,
    0.044,
    0.068,
    0.101,
    0.121,
    0.104,
    0.073,
    0.058,
    0.052,
    0.050,
    0.049,
    0.048,
    0.048,
    0.043,
    0.031,
    0.023,
    0.019,
)
DATASET_ACCESSES_PER_UNIQUE = 887_017_990 / 128_435_723  # dataset: 6.9

SPLITS = ("all", "train", "test")
_TABLE_KEYS = ("name", "rows", "dim", "pooling_factor", "reuse_hist")


@dataclass(frozen=True)
class ReuseProfile:
    """Expected access statistics of one table in one batch under the Zipf model."""

    hist: tuple[float, ...]  # fraction of unique indices per access-count bin
    unique: float  # expected number of distinct rows touched
    lookups: float  # batch_size x pooling factor
    lookup_fractions: tuple[float, ...]  # fraction of lookups per bin of their row's count


def _rank_groups(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer rank edges ``[a, b)`` covering ``1..rows``: single ranks at the head, then
    log-spaced groups. Returns (starts, ends)."""
    edges = np.unique(np.round(np.logspace(0.0, math.log10(rows + 1), _RANK_GROUPS)))
    edges = edges.astype(np.int64)
    edges[0], edges[-1] = 1, rows + 1
    edges = np.unique(edges)
    return edges[:-1], edges[1:]


def power_integral(lo: np.ndarray, hi: np.ndarray, s: float, offset: float = 0.0) -> np.ndarray:
    """Integral of ``(r + offset)**-s`` over ``[lo, hi]`` (a rank group's mass, midpoint rule;
    ``s`` = 0 is uniform): a Zipf-Mandelbrot distribution, group by group, for
    :func:`profile_from_masses`."""
    lo, hi = lo + offset, hi + offset
    if abs(1.0 - s) < 1e-9:
        return np.log(hi / lo)
    return (hi ** (1.0 - s) - lo ** (1.0 - s)) / (1.0 - s)


def _bin_index(counts: np.ndarray) -> np.ndarray:
    """Access-count bin of each expected count: (0,1] -> 0, (1,2] -> 1, (2,4] -> 2, ..."""
    edges = np.asarray(HIST_UPPER_EDGES[:-1])
    return np.searchsorted(edges, counts, side="left")


def reuse_profile(
    rows: int,
    pooling_factor: float,
    exponent: float,
    offset: float = 0.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ReuseProfile:
    """Expected reuse histogram, unique rows and lookup split of one table whose rows are
    looked up ``batch_size x pooling_factor`` times, row ``r`` with probability
    proportional to ``(r + offset)**-exponent``."""
    lo, hi = _rank_groups(int(rows))
    mass = power_integral(lo - 0.5, hi - 0.5, exponent, offset)
    return profile_from_masses(lo, hi, mass, batch_size * pooling_factor)


def rank_groups(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer rank edges ``[a, b)`` covering ``1..rows`` (single ranks at the head, then
    about 400 log-spaced groups): the groups :func:`profile_from_masses` takes masses of."""
    return _rank_groups(int(rows))


def profile_from_masses(
    lo: np.ndarray, hi: np.ndarray, mass: np.ndarray, lookups: float
) -> ReuseProfile:
    """The :class:`ReuseProfile` of ``lookups`` independent lookups that fall in the rank
    group ``[lo[i], hi[i])`` with probability proportional to ``mass[i]``, spread evenly
    over its rows (any access distribution, given group by group)."""
    mass = np.asarray(mass, dtype=float)
    size = (hi - lo).astype(float)
    count = lookups * mass / mass.sum() / size  # expected accesses of each row in the group
    unique_by_bin = np.zeros(NUM_HIST_BINS)
    lookups_by_bin = np.zeros(NUM_HIST_BINS)
    # Cool groups: realised counts are Poisson(count); spread each group over the bins of k.
    cool = count < _POISSON_BELOW
    if cool.any():
        c = count[cool][:, None]
        pmf = np.exp(_K * np.log(c) - c - _LOG_K_FACTORIAL)  # P(k accesses), k = 1..160
        rows_k = (pmf * size[cool][:, None]).sum(axis=0)  # expected rows with k accesses
        unique_by_bin += np.bincount(_K_BIN, weights=rows_k, minlength=NUM_HIST_BINS)
        lookups_by_bin += np.bincount(_K_BIN, weights=rows_k * _K, minlength=NUM_HIST_BINS)
    # Hot groups: binned by their expected count (Poisson is narrow there).
    hot = ~cool
    bins = _bin_index(count[hot])
    unique_by_bin += np.bincount(
        bins, weights=-np.expm1(-count[hot]) * size[hot], minlength=NUM_HIST_BINS
    )
    lookups_by_bin += np.bincount(bins, weights=count[hot] * size[hot], minlength=NUM_HIST_BINS)
    unique = float(unique_by_bin.sum())
    return ReuseProfile(
        hist=_clean_hist(unique_by_bin / unique),
        unique=unique,
        lookups=float(lookups),
        lookup_fractions=tuple(float(x) for x in lookups_by_bin / lookups_by_bin.sum()),
    )


def _clean_hist(hist: Sequence[float] | np.ndarray) -> tuple[float, ...]:
    """Round to 6 decimals and renormalise by moving the rounding residue into the largest
    bin, so the fractions stay short, sum to 1 and survive a JSON round trip unchanged."""
    h = np.round(np.asarray(hist, dtype=float) / float(np.sum(hist)), 6)
    top = int(np.argmax(h))
    h[top] = round(1.0 - (h.sum() - h[top]), 6)
    return tuple(float(x) for x in h)


def _pooling_factors(rng: np.random.Generator, n: int) -> np.ndarray:
    raw = rng.lognormal(0.0, POOLING_SIGMA, size=n)
    pooling = raw * (MEAN_POOLING / raw.mean())
    for _ in range(50):  # rescale until the clipped draws have the dataset mean
        clipped = np.clip(pooling, POOLING_MIN, POOLING_MAX)
        if abs(clipped.mean() - MEAN_POOLING) < 1e-9:
            break
        pooling = pooling * (MEAN_POOLING / clipped.mean())
    return np.clip(pooling, POOLING_MIN, POOLING_MAX)


def _generate(n: int, seed: int, batch_size: int) -> tuple[list[TableSpec], list[ReuseProfile]]:
    rng = np.random.default_rng(seed)
    rows = np.clip(
        np.round(rng.lognormal(math.log(ROWS_MEDIAN), ROWS_SIGMA, size=n)), ROWS_MIN, ROWS_MAX
    ).astype(np.int64)
    pooling = _pooling_factors(rng, n)
    exponents = np.clip(rng.normal(ZIPF_MEAN, ZIPF_SD, size=n), ZIPF_MIN, ZIPF_MAX)
    offsets = np.exp(rng.uniform(math.log(OFFSET_MIN), math.log(OFFSET_MAX), size=n)) - 1.0
    width = max(3, len(str(n - 1)))
    tables, profiles = [], []
    for i in range(n):
        pf = round(float(pooling[i]), 4)
        prof = reuse_profile(int(rows[i]), pf, float(exponents[i]), float(offsets[i]), batch_size)
        profiles.append(prof)
        tables.append(
            TableSpec(
                name=f"dlrm_{i:0{width}d}",
                rows=int(rows[i]),
                dim=POOL_DIM,
                pooling_factor=pf,
                reuse_hist=prof.hist,
            )
        )
    return tables, profiles


def generate_pool(n: int = POOL_SIZE, seed: int = DEFAULT_SEED) -> list[TableSpec]:
    """Draw ``n`` tables named ``dlrm_000``... under the distributions in the module doc."""
    tables, _ = _generate(n, seed, DEFAULT_BATCH_SIZE)
    return tables


def generate_pool_with_profiles(
    n: int = POOL_SIZE,
    seed: int = DEFAULT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[list[TableSpec], list[ReuseProfile]]:
    """:func:`generate_pool` plus each table's expected unique rows and lookup split."""
    return _generate(n, seed, batch_size)


def pool_reuse_hist(profiles: Sequence[ReuseProfile]) -> tuple[np.ndarray, np.ndarray]:
    """Pool-wide (fraction of unique indices per bin, fraction of lookups per bin).

    Unique fractions weight each table's histogram by its expected unique indices; lookup
    fractions weight each table's lookup split by its lookups."""
    unique = np.array([p.unique for p in profiles])
    lookups = np.array([p.lookups for p in profiles])
    uniq_frac = unique @ np.array([p.hist for p in profiles]) / unique.sum()
    look_frac = lookups @ np.array([p.lookup_fractions for p in profiles]) / lookups.sum()
    return uniq_frac, look_frac


def split_pool(
    tables: Sequence[TableSpec],
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = DEFAULT_SEED,
) -> tuple[list[TableSpec], list[TableSpec]]:
    """Disjoint (train, test) parts by a seeded permutation; each keeps the pool's order."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = int(round(len(tables) * test_fraction))
    test_idx = {int(i) for i in np.random.default_rng(seed).permutation(len(tables))[:n_test]}
    train = [t for i, t in enumerate(tables) if i not in test_idx]
    test = [t for i, t in enumerate(tables) if i in test_idx]
    return train, test


# --------------------------------------------------------------------------- files


def default_pool_path() -> Path:
    """Where the shipped pool lives: ``neuroshard/data/tables/pool.json`` in the package."""
    return Path(str(importlib.resources.files("neuroshard.data") / "tables" / "pool.json"))


def distributions(profiles: Sequence[ReuseProfile] | None = None) -> dict[str, Any]:
    """The human-readable assumptions recorded in ``pool.json`` (and, given the tables'
    profiles, the pool-wide figures they produce next to the dataset's)."""
    out: dict[str, Any] = {
        "source": "synthetic stand-in for the public DLRM embedding data "
        "(facebookresearch/dlrm_datasets); see neuroshard.pretrain.pool",
        "batch_size": DEFAULT_BATCH_SIZE,
        "rows": f"lognormal(median={ROWS_MEDIAN:g}, sigma={ROWS_SIGMA}), rounded, "
        f"clipped to [{ROWS_MIN}, {ROWS_MAX}]",
        "dim": f"{POOL_DIM} for every table",
        "pooling_factor": f"lognormal(sigma={POOLING_SIGMA}) clipped to [{POOLING_MIN}, "
        f"{POOLING_MAX}], rescaled to mean {MEAN_POOLING} (dataset)",
        "access": f"Zipf-Mandelbrot q_r ~ (r + k)^-s; s ~ normal({ZIPF_MEAN}, {ZIPF_SD}) "
        f"clipped to [{ZIPF_MIN}, {ZIPF_MAX}]; k + 1 ~ log-uniform[{OFFSET_MIN:g}, "
        f"{OFFSET_MAX:g}]",
        "reuse_hist": "fraction of expected unique rows per access-count bin "
        "(0,1],(1,2],(2,4],...,>32768; counts Poisson(65536 x pooling x q_r) "
        f"below an expected {_POISSON_BELOW:g}, the expectation above",
        "split": "seeded permutation, disjoint train/test",
    }
    if profiles:
        uniq, look = pool_reuse_hist(profiles)
        total_unique = sum(p.unique for p in profiles)
        total_lookups = sum(p.lookups for p in profiles)
        out["pool_unique_fractions"] = [round(float(x), 4) for x in uniq]
        out["dataset_unique_fractions"] = list(DATASET_UNIQUE_FRACTIONS)
        out["pool_lookup_fractions"] = [round(float(x), 4) for x in look]
        out["dataset_lookup_fractions"] = list(DATASET_LOOKUP_FRACTIONS)
        out["pool_accesses_per_unique"] = round(total_lookups / total_unique, 3)
        out["dataset_accesses_per_unique"] = round(DATASET_ACCESSES_PER_UNIQUE, 3)
    return out


def _table_dict(t: TableSpec) -> dict[str, Any]:
    return {
        "name": t.name,
        "rows": t.rows,
        "dim": t.dim,
        "pooling_factor": t.pooling_factor,
        "reuse_hist": list(t.reuse_hist),
    }


def save_pool(
    path: str | Path,
    train: Sequence[TableSpec],
    test: Sequence[TableSpec],
    *,
    seed: int = DEFAULT_SEED,
    distributions_info: dict[str, Any] | None = None,
) -> Path:
    """Write a ``neuroshard.pool/v1`` file: one table per line, so diffs stay readable."""
    path = Path(path)
    dists = distributions_info if distributions_info is not None else distributions()
    info = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in dists.items())
    parts = [
        f'{{\n "format": {json.dumps(POOL_FORMAT)},\n "seed": {int(seed)},\n'
        f' "distributions": {{\n{info}\n }}'
    ]
    for key, tables in (("train", train), ("test", test)):
        rows = ",\n".join("  " + json.dumps(_table_dict(t)) for t in tables)
        parts.append(f',\n "{key}": [\n{rows}\n ]')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts) + "\n}\n")
    logger.info("wrote %d train + %d test tables to %s", len(train), len(test), path)
    return path


def _parse_table(raw: Any, source: str, index: int) -> TableSpec:
    """One pool record: every field of :data:`_TABLE_KEYS` present, validated as any table."""
    if isinstance(raw, dict):
        missing = [k for k in _TABLE_KEYS if k not in raw]
        if missing:
            raise TableSpecError(
                "missing", source=source, table=str(raw.get("name", index)), field_name=missing[0]
            )
    return TableSpec.from_record(raw, source=source, index=index)


def load_pool(split: str = "all", path: str | Path | None = None) -> list[TableSpec]:
    """Tables of the shipped pool (or of the pool file at ``path``): ``"train"``,
    ``"test"``, or ``"all"`` (both, in name order)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if path is None:
        resource = importlib.resources.files("neuroshard.data") / "tables" / "pool.json"
        source, text = "neuroshard.data/tables/pool.json", resource.read_text()
    else:
        source, text = str(path), Path(path).read_text()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TableSpecError(f"not valid JSON: {exc}", source=source) from exc
    if not isinstance(doc, dict) or doc.get("format") != POOL_FORMAT:
        raise TableSpecError(f"expected format {POOL_FORMAT!r}", source=source)
    parts = ("train", "test") if split == "all" else (split,)
    tables: list[TableSpec] = []
    for part in parts:
        raw = doc.get(part)
        if not isinstance(raw, list):
            raise TableSpecError(f"missing list {part!r}", source=source)
        tables.extend(_parse_table(r, source, i) for i, r in enumerate(raw))
    if split == "all":
        tables.sort(key=lambda t: t.name)
    return tables


def write_default_pool(path: str | Path | None = None) -> Path:
    """Regenerate the shipped pool (856 tables, seed 0, half for test) and write it."""
    tables, profiles = generate_pool_with_profiles(POOL_SIZE, DEFAULT_SEED)
    train, test = split_pool(tables, DEFAULT_TEST_FRACTION, DEFAULT_SEED)
    return save_pool(
        path if path is not None else default_pool_path(),
        train,
        test,
        seed=DEFAULT_SEED,
        distributions_info=distributions(profiles),
    )

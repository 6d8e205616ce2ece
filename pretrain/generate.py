"""Training data for range models: generated tables, loads of any size, any batch, any cluster.

The pool (:mod:`neuroshard.pretrain.pool`-style, :mod:`pretrain.pool`) holds 856 tables of
one family at dim 128. Users bring others. This module draws:

* **Generated tables** (:func:`generate_tables`): rows log-uniform on ``[1e2, 1e10]``,
  dims multiples of 4 up to 1,024 (half powers of two, half any multiple of 4,
  log-uniform), pooling factors log-uniform on ``[1, 500]``, and a reuse histogram
  (at batch 65,536, the pool's convention) from an access distribution of the family:

  - ``zipf`` (trained on): Zipf-Mandelbrot ``(r + k)**-s`` with a per-table exponent
    ``s ~ U(0.2, 1.8)`` and offset ``k + 1`` log-uniform on ``[1, 1000]``;
  - ``mixture`` (trained on): two Zipf-Mandelbrot components, a steep head
    (``s ~ U(0.6, 2.5)``) taking a share ``U(0, 1)`` of the lookups and a flat tail
    (``s ~ U(0, 0.8)``; 0 is uniform), each with a log-uniform offset: hot heads over flat
    bodies, near-uniform tables and everything between, which one Zipf cannot shape;
  - ``piecewise`` (trained on): any popularity curve that falls with rank, as a
    piecewise power law over log rank: 1 to 4 segments at uniform log-rank breakpoints,
    each with its own exponent ``U(0, 3)`` (0 is flat), and at each breakpoint, with
    probability 1/2, a drop of the density by ``10**U(0, 6)``: flat heads over cliffs,
    curves that steepen or flatten, cut-off tails, uniform access: drawn to cover the
    shapes users bring (written after ``heldout``'s error was seen by kind, so not blind
    to it, but from a generator of its own);
  - ``heldout`` (never trained on): one of a hot set (a fraction ``10**U(-5, -1)`` of the
    rows takes ``U(0.5, 0.99)`` of the lookups, the rest uniform), uniform access, or a
    stretched exponential ``exp(-(r / c)**b)`` with ``c`` a log-uniform fraction of the
    rows and ``b ~ U(0.3, 1)``.

* **Compute loads** (:func:`sample_range_loads`): 1 to 15 shards (a third of loads, as
  the paper's) or log-uniform 16 to ``max_shards`` (what plans of hundreds to thousands
  of tables put on a device), each a shard of a table: a column width from its halvings,
  and a row block when the table alone would take more than its share of the memory
  cap, as row-wise plans make. Each load has a global batch, log-uniform on
  ``[512, 262144]`` (on a grid of :data:`BATCH_GRID_POINTS` values so the sim prices
  loads of one batch together).

* **Comm samples** (:func:`sample_cluster_comm`): clusters of 1 to 8 devices per host
  and 2 to 256 devices, bandwidths the profile's (half the samples) or scaled by
  ``2**U(-2, 1)`` each, a global batch log-uniform on ``[512, 262144]``, and a random
  plan's per-device dim sums (tables drawn from the given pool, placed by Dirichlet
  weights as :func:`pretrain.augment.sample_comm_tasks` does) and waits.

:func:`label_compute` and :func:`label_comm` time them on a :class:`SimBackend` bound to
each sample's batch and cluster; :func:`save_data` / :func:`load_data` keep them in one
``.npz`` each, so a training run that dies loses nothing collected.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from neuroshard.backends.sim import SimBackend
from neuroshard.features import raw_features
from neuroshard.pretrain.augment import halvings
from neuroshard.pretrain.pool import power_integral, profile_from_masses, rank_groups, reuse_profile
from neuroshard.samples import CommData, ComputeData
from neuroshard.types import DIM_MULTIPLE, Cluster, CostEstimator, Searcher, TableSpec

logger = logging.getLogger(__name__)

FAMILIES = ("zipf", "heldout", "mixture", "piecewise")
ROWS_RANGE = (1e2, 1e10)
MAX_DIM = 1024
POOLING_RANGE = (1.0, 500.0)
BATCH_RANGE = (512, 262_144)
BATCH_GRID_POINTS = 64
HIST_BATCH = 65_536  # reuse histograms are stated at this batch (the pool's convention)

__all__ = [
    "BATCH_RANGE",
    "FAMILIES",
    "RangeConfig",
    "batch_grid",
    "generate_tables",
    "label_comm",
    "label_compute",
    "load_data",
    "range_plan_loads",
    "sample_cluster_comm",
    "sample_range_loads",
    "save_data",
]


def _log_uniform(rng: np.random.Generator, low: float, high: float, size: int | None = None):
    return np.exp(rng.uniform(math.log(low), math.log(high), size=size))


def _dims(rng: np.random.Generator, n: int) -> np.ndarray:
    pow2 = 2 ** rng.integers(2, 11, size=n)  # 4 .. 1024
    anyw = np.round(_log_uniform(rng, 1.0, MAX_DIM / DIM_MULTIPLE, n)).astype(np.int64)
    anyw = np.clip(anyw, 1, MAX_DIM // DIM_MULTIPLE) * DIM_MULTIPLE
    return np.where(rng.random(n) < 0.5, pow2, anyw).astype(np.int64)


def _heldout_masses(
    rng: np.random.Generator, rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    lo, hi = rank_groups(rows)
    a, b = lo.astype(float), hi.astype(float)  # ranks [a, b)
    kind = ("hotset", "uniform", "stretched")[int(rng.integers(3))]
    if kind == "uniform":
        return lo, hi, b - a, kind
    if kind == "hotset":
        hot_rows = max(1.0, rows * 10 ** rng.uniform(-5, -1))
        share = rng.uniform(0.5, 0.99)
        inside = np.clip(np.minimum(b, hot_rows + 1) - a, 0.0, None)
        outside = (b - a) - inside
        cold = max(rows - hot_rows, 1.0)
        return lo, hi, inside * share / hot_rows + outside * (1 - share) / cold, kind
    scale = max(1.0, rows * 10 ** rng.uniform(-6, -0.5))
    power = rng.uniform(0.3, 1.0)
    mid = np.sqrt(a * np.maximum(b - 1, a))
    mass = (b - a) * np.exp(-((mid / scale) ** power)) + 1e-300
    return lo, hi, mass, kind


def _mixture_masses(
    rng: np.random.Generator, rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo, hi = rank_groups(rows)
    a, b = lo - 0.5, hi - 0.5
    head = power_integral(a, b, rng.uniform(0.6, 2.5), _log_uniform(rng, 1.0, 1000.0) - 1.0)
    tail = power_integral(a, b, rng.uniform(0.0, 0.8), _log_uniform(rng, 1.0, 1000.0) - 1.0)
    share = rng.uniform(0.0, 1.0)
    return lo, hi, share * head / head.sum() + (1.0 - share) * tail / tail.sum()


def _piecewise_masses(
    rng: np.random.Generator, rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo, hi = rank_groups(rows)
    a, b = lo.astype(float), hi.astype(float)
    u = np.log10(np.sqrt(a * np.maximum(b - 1, a)))  # each group's mid log rank
    top = math.log10(max(rows, 2))
    cuts = np.sort(rng.uniform(0.0, top, size=int(rng.integers(0, 4))))
    slopes = rng.uniform(0.0, 3.0, size=len(cuts) + 1)
    drops = np.where(rng.random(len(cuts)) < 0.5, rng.uniform(0.0, 6.0, size=len(cuts)), 0.0)
    # log10 density: -slope x log rank within a segment, continuous but for the drops
    edges = np.concatenate([[0.0], cuts])
    seg = np.searchsorted(cuts, u, side="right")
    start = np.concatenate([[0.0], np.cumsum(-slopes[:-1] * np.diff(edges) - drops)])
    log_density = start[seg] - slopes[seg] * (u - edges[seg])
    mass = (b - a) * 10.0 ** (log_density - log_density.max()) + 1e-300
    return lo, hi, mass


# The families drawn as masses over rank ranges (zipf goes through reuse_profile).
_MASSES = {
    "mixture": _mixture_masses,
    "piecewise": _piecewise_masses,
    "heldout": lambda rng, rows: _heldout_masses(rng, rows)[:3],
}


def generate_tables(n: int, seed: int, family: str = "zipf") -> list[TableSpec]:
    """``n`` tables of ``family`` (:data:`FAMILIES`; module doc), named
    ``gen_<family>_<i>``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    rng = np.random.default_rng([seed, FAMILIES.index(family)])
    rows = np.round(_log_uniform(rng, *ROWS_RANGE, n)).astype(np.int64)
    dims = _dims(rng, n)
    pooling = np.round(_log_uniform(rng, *POOLING_RANGE, n), 4)
    out = []
    for i in range(n):
        if family == "zipf":
            s = rng.uniform(0.2, 1.8)
            offset = _log_uniform(rng, 1.0, 1000.0) - 1.0
            prof = reuse_profile(int(rows[i]), float(pooling[i]), s, offset, HIST_BATCH)
        else:
            lo, hi, mass = _MASSES[family](rng, int(rows[i]))
            prof = profile_from_masses(lo, hi, mass, HIST_BATCH * float(pooling[i]))
        out.append(
            TableSpec(
                name=f"gen_{family}_{i:05d}",
                rows=int(rows[i]),
                dim=int(dims[i]),
                pooling_factor=float(pooling[i]),
                reuse_hist=prof.hist,
            )
        )
    return out


def batch_grid(points: int = BATCH_GRID_POINTS) -> np.ndarray:
    """Global batches log-spaced over :data:`BATCH_RANGE` (integers)."""
    return np.unique(np.round(np.geomspace(*BATCH_RANGE, points)).astype(np.int64))


@dataclass(frozen=True)
class RangeConfig:
    """How a range model's data is drawn (module doc)."""

    max_shards: int = 400
    small_fraction: float = 1 / 3  # loads of 1 to 15 shards
    memory_cap_bytes: int = 80 * 10**9
    single_fraction: float = 0.05  # loads of one shard
    max_devices: int = 256
    max_per_host: int = 8
    profile_bw_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.single_fraction <= self.small_fraction <= 1.0:
            raise ValueError(
                "need 0 <= single_fraction <= small_fraction <= 1, got "
                f"{self.single_fraction} and {self.small_fraction}"
            )


def _shard(t: TableSpec, rng: np.random.Generator, share_bytes: float) -> TableSpec:
    width = int(rng.choice(halvings(t.dim)))
    view = t.with_dim(width)
    if view.size_bytes > share_bytes:
        rows = max(100, int(share_bytes * rng.uniform(0.2, 1.0) / (width * 4)))
        rows = min(rows, t.rows)
        start = int(rng.integers(0, t.rows - rows + 1))
        view = t.shard_view((start, start + rows), width)
    return view


def sample_range_loads(
    sources: Sequence[Sequence[TableSpec]],
    n: int,
    rng: np.random.Generator,
    config: RangeConfig = RangeConfig(),
) -> tuple[list[list[TableSpec]], np.ndarray]:
    """``n`` loads (lists of shard views) and their global batches. Each shard's table
    comes from one of ``sources`` (picked uniformly), so a small pool weighs as much as a
    big generated family."""
    grid = batch_grid()
    loads, batches = [], np.empty(n, dtype=np.int64)
    for i in range(n):
        u = rng.random()
        if u < config.single_fraction:
            k = 1
        elif u < config.small_fraction:
            k = int(rng.integers(1, 16))
        else:
            k = int(round(_log_uniform(rng, 16, config.max_shards)))
        share = config.memory_cap_bytes / max(k, 1) * rng.uniform(0.5, 2.0)
        load: list[TableSpec] = []
        used = 0
        for _ in range(3 * k):
            src = sources[int(rng.integers(len(sources)))]
            view = _shard(src[int(rng.integers(len(src)))], rng, share)
            if used + view.size_bytes <= config.memory_cap_bytes:
                load.append(view)
                used += view.size_bytes
                if len(load) == k:
                    break
        if not load:  # the cap bound every draw: one small row block
            src = sources[0]
            load.append(_shard(src[0], rng, config.memory_cap_bytes / 2))
        loads.append(load)
        batches[i] = grid[int(rng.integers(len(grid)))]
    return loads, batches


def label_compute(
    loads: Sequence[Sequence[TableSpec]],
    batches: np.ndarray,
    *,
    profile: str = "h100",
    noise: float = 0.0,
    seed: int = 0,
    prefix: str = "r",
) -> ComputeData:
    """Sim compute labels of ``loads``, each at its own batch, as :class:`ComputeData`."""
    labels = np.empty(len(loads))
    for j, b in enumerate(np.unique(batches)):
        idx = np.flatnonzero(batches == b)
        sim = SimBackend(profile, int(b), noise=noise, seed=seed * 1000 + j)
        labels[idx] = sim.compute_ms([loads[int(i)] for i in idx])
    counts = np.array([len(ld) for ld in loads], dtype=np.int64)
    flat = [t for ld in loads for t in ld]
    return ComputeData(
        keys=np.array([f"{prefix}{seed}-{i}" for i in range(len(loads))]),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        features=raw_features(flat),
        table_names=np.array([t.name for t in flat]),
        label_ms=labels,
        spread=np.full(len(loads), noise),
        fingerprint=_fingerprint(profile, noise),
    )


def _fingerprint(profile: str, noise: float) -> str:
    fp = SimBackend(profile, noise=noise).fingerprint()
    fp.pop("batch_size")  # a range model's data spans batches
    fp["batch_size_range"] = list(BATCH_RANGE)
    return json.dumps(fp, sort_keys=True)


def sample_cluster_comm(
    dims_pool: Sequence[int],
    n: int,
    rng: np.random.Generator,
    *,
    profile: str = "h100",
    config: RangeConfig = RangeConfig(),
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """``n`` random plans on random clusters: per-device dim sums, waits (ms), contexts
    ``(n, 4)`` (batch, devices per host, intra- and inter-host bytes/ms) and shard counts."""
    prof = SimBackend(profile).profile
    dim_choices = np.asarray(dims_pool, dtype=np.int64)
    sums, waits, ctx, shards = [], [], np.empty((n, 4)), np.empty(n, dtype=np.int64)
    for i in range(n):
        per_host = int(rng.integers(1, config.max_per_host + 1))
        hosts = int(round(_log_uniform(rng, 1, max(config.max_devices // per_host, 1) + 0.99)))
        hosts = max(hosts, 2 if per_host == 1 else 1)
        n_dev = per_host * min(hosts, config.max_devices // per_host)
        k = int(round(_log_uniform(rng, max(2, n_dev // 2), 12 * n_dev)))
        dims = dim_choices[rng.integers(len(dim_choices), size=k)]
        alpha = 10.0 ** rng.uniform(-1.0, 2.0)
        weights = rng.dirichlet(np.full(n_dev, alpha))
        devices = rng.choice(n_dev, size=k, p=weights / weights.sum())
        sums.append(np.bincount(devices, weights=dims, minlength=n_dev).astype(float))
        waits.append(
            np.zeros(n_dev)
            if rng.random() < 0.2
            else np.round(rng.uniform(1.0, 20.0, size=n_dev), 6)
        )
        intra, inter = prof.nvlink_bytes_per_ms, prof.inter_host_bytes_per_ms
        if rng.random() >= config.profile_bw_fraction:
            intra *= 2 ** rng.uniform(-2, 1)
            inter *= 2 ** rng.uniform(-2, 1)
        ctx[i] = (round(float(_log_uniform(rng, *BATCH_RANGE))), per_host, intra, inter)
        shards[i] = k
    return sums, waits, ctx, shards


def label_comm(
    sums: Sequence[np.ndarray],
    waits: Sequence[np.ndarray],
    ctx: np.ndarray,
    shards: np.ndarray,
    *,
    profile: str = "h100",
    noise: float = 0.0,
    seed: int = 0,
    prefix: str = "q",
) -> CommData:
    """Sim forward and backward all-to-all of each sample on its cluster, as
    :class:`CommData` (padded to the largest device count)."""
    n = len(sums)
    width = max(len(s) for s in sums)
    out = {k: np.zeros((n, width)) for k in ("d", "w", "f", "b")}
    mask = np.zeros((n, width), dtype=bool)
    for i, (d, w, c) in enumerate(zip(sums, waits, ctx, strict=True)):
        m = len(d)
        cluster = Cluster.uniform(
            m,
            10**12,
            int(c[0]),
            devices_per_host=int(c[1]),
            intra_host_bw_bytes_per_ms=float(c[2]),
            inter_host_bw_bytes_per_ms=float(c[3]),
        )
        sim = SimBackend(profile, int(c[0]), noise=noise, seed=seed * 100_003 + i)
        sim = sim.for_cluster(cluster)
        out["d"][i, :m], out["w"][i, :m] = d, w
        out["f"][i, :m] = sim.fwd_comm_ms(d[None], w[None])[0]
        out["b"][i, :m] = sim.bwd_comm_ms(d[None])[0]
        mask[i, :m] = True
    return CommData(
        keys=np.array([f"{prefix}{seed}-{i}" for i in range(n)]),
        num_devices=mask.sum(axis=1),
        dim_sums=out["d"],
        waits_ms=out["w"],
        fwd_ms=out["f"],
        bwd_ms=out["b"],
        mask=mask,
        fingerprint=_fingerprint(profile, noise),
        num_tables=np.asarray(shards),
    )


def save_data(
    path: str | Path, compute: ComputeData, batches: np.ndarray, comm: CommData, ctx: np.ndarray
) -> Path:
    """Both data sets and their batches/contexts in one ``.npz`` (written, then renamed)."""
    return _save_npz(
        path,
        **_compute_arrays(compute, batches),
        m_keys=comm.keys,
        m_dims=comm.dim_sums,
        m_waits=comm.waits_ms,
        m_fwd=comm.fwd_ms,
        m_bwd=comm.bwd_ms,
        m_mask=comm.mask,
        m_shards=comm.num_tables if comm.num_tables is not None else np.zeros(0),
        m_ctx=ctx,
    )


def _save_npz(path: str | Path, **arrays: Any) -> Path:
    """``arrays`` in one compressed ``.npz`` at ``path``, written to a ``.part`` file and
    renamed, so a run that dies never leaves a half-written file under the real name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


def _join(
    a: tuple[ComputeData, np.ndarray], b: tuple[ComputeData, np.ndarray]
) -> tuple[ComputeData, np.ndarray]:
    """Two (samples, batches) pairs as one (:meth:`ComputeData.concat`: keys must not repeat)."""
    return a[0].concat(b[0]), np.concatenate([a[1], b[1]])


def _compute_arrays(compute: ComputeData, batches: np.ndarray) -> dict[str, Any]:
    return {
        "c_keys": compute.keys,
        "c_offsets": compute.offsets,
        "c_features": compute.features,
        "c_names": compute.table_names,
        "c_label": compute.label_ms,
        "c_spread": compute.spread,
        "c_batch": batches,
        "fingerprint": np.array(compute.fingerprint),
    }


def _load_compute(z: Any) -> tuple[ComputeData, np.ndarray]:
    compute = ComputeData(
        z["c_keys"],
        z["c_offsets"],
        z["c_features"],
        z["c_names"],
        z["c_label"],
        z["c_spread"],
        str(z["fingerprint"]),
    )
    return compute, z["c_batch"]


def _sources(
    rng: np.random.Generator, generated_tables: int, seed: int, families: Sequence[str]
) -> tuple[list[TableSpec], list[list[TableSpec]]]:
    """The training sources: the pool's train half (augmented, plus shrunk copies drawn
    with ``rng``) and ``generated_tables`` of each family."""
    from neuroshard.pretrain.augment import augment_tables, shrink_tables
    from neuroshard.pretrain.pool import load_pool

    train = load_pool("train")
    pool = augment_tables(train) + augment_tables(shrink_tables(train, rng))
    return pool, [generate_tables(generated_tables, seed, f) for f in families]


def _extra_family_loads(
    path: Path,
    families: Sequence[str],
    n: int,
    generated_tables: int,
    seed: int,
    profile: str,
    noise: float,
    config: RangeConfig,
) -> tuple[ComputeData, np.ndarray]:
    """``n`` loads of the generated tables of ``families`` (train_range_model's
    ``extra_loads``), drawn into ``path`` once (with the families' names) and read back
    after; a file of another count or other families is refused."""
    if path.exists():
        z = np.load(path, allow_pickle=False)
        data, batches = _load_compute(z)
        held = tuple(str(f) for f in z["families"]) if "families" in z else ("unrecorded",)
        if len(data) != n or held != tuple(families):
            raise ValueError(
                f"{path} holds {len(data)} loads of {', '.join(held)}, not {n} of "
                f"{', '.join(families)}: remove it to draw them again"
            )
        return data, batches
    rng = np.random.default_rng([seed, 7])
    gens = [generate_tables(generated_tables, seed, f) for f in families]
    small = n // 2
    loads, batches = sample_range_loads(
        gens, small, rng, replace(config, single_fraction=0.1, small_fraction=1.0)
    )
    more, more_batches = sample_range_loads(gens, n - small, rng, config)
    loads += more
    batches = np.concatenate([batches, more_batches])
    data = label_compute(loads, batches, profile=profile, noise=noise, seed=seed + 3, prefix="x")
    _save_npz(path, families=np.array(list(families)), **_compute_arrays(data, batches))
    return data, batches


def range_plan_loads(
    estimator: CostEstimator,
    tables: Sequence[TableSpec],
    tasks: int,
    rng: np.random.Generator,
    searchers: Sequence[Searcher],
    *,
    table_range: tuple[int, int] = (30, 300),
    device_range: tuple[int, int] = (8, 64),
) -> tuple[list[list[TableSpec]], np.ndarray]:
    """Device loads (and their global batches) of the plans ``searchers`` make under
    ``estimator`` on ``tasks`` random tasks: log-uniform ``table_range`` tables of
    ``tables`` on a power of two of ``device_range`` devices in hosts of 8, a batch of
    :func:`batch_grid`, HBM for a fill of ``U(0.3, 0.7)`` of the task's tables
    (:func:`~neuroshard.pretrain.plan_loads.plan_load_samples`)."""
    from neuroshard.pretrain.plan_loads import plan_load_samples

    grid = batch_grid()
    lo, hi = (int(math.log2(d)) for d in device_range)
    loads: list[list[TableSpec]] = []
    batches: list[int] = []
    for _ in range(tasks):
        k = int(round(_log_uniform(rng, *table_range)))
        devices = 2 ** int(rng.integers(lo, hi + 1))
        batch = int(grid[int(rng.integers(len(grid)))])
        drawn = plan_load_samples(
            estimator, tables, 1, rng, searchers=searchers, num_devices=devices,
            batch_size=batch, min_tables=k, max_tables=k, fill=float(rng.uniform(0.3, 0.7)),
            devices_per_host=min(8, devices),
        )  # fmt: skip
        loads += [list(x.tables) for x in drawn]
        batches += [batch] * len(drawn)
    return loads, np.asarray(batches, dtype=np.int64)


def load_data(path: str | Path) -> tuple[ComputeData, np.ndarray, CommData, np.ndarray]:
    """What :func:`save_data` wrote."""
    z = np.load(path, allow_pickle=False)
    compute, batches = _load_compute(z)
    comm = CommData(
        z["m_keys"],
        z["m_mask"].sum(axis=1),
        z["m_dims"],
        z["m_waits"],
        z["m_fwd"],
        z["m_bwd"],
        z["m_mask"],
        compute.fingerprint,
        z["m_shards"],
    )
    return compute, batches, comm, z["m_ctx"]


def _specs_of(data: ComputeData, i: int) -> list[TableSpec]:
    rows = data.features[data.offsets[i] : data.offsets[i + 1]]
    return [
        TableSpec(
            name=f"s{j}",
            rows=max(int(round(r[-1])), 1),
            dim=int(r[-3]),
            pooling_factor=float(r[-2]),
            reuse_hist=tuple(float(x) for x in r[:-3]),
        )
        for j, r in enumerate(rows)
    ]


def noise_floors(
    compute: ComputeData,
    batches: np.ndarray,
    comm: CommData,
    ctx: np.ndarray,
    *,
    seed: int = 0,
    profile: str = "h100",
) -> dict[str, dict[str, float]]:
    """The MAPE of the noise-free sim against the labels on the test split (the split
    :func:`neuroshard.samples.split_random` gives a model fitted with ``seed``): the best
    any model can score there (``floor_mape``), for compute and both comms."""
    from neuroshard.samples import split_random

    test = split_random(len(compute), seed).test
    sub = compute.subset(test)
    truth = label_compute(
        [_specs_of(sub, i) for i in range(len(sub))], batches[test], profile=profile
    ).label_ms
    out = {
        "compute": {
            "floor_mape": float(
                np.mean(np.abs(truth - sub.label_ms) / np.maximum(sub.label_ms, 1e-3))
            ),
            "n": int(len(sub)),
        }
    }
    mtest = split_random(len(comm), seed + 1).test
    msub = comm.subset(mtest)
    m = msub.mask
    sums = [msub.dim_sums[i, m[i]] for i in range(len(msub))]
    waits = [msub.waits_ms[i, m[i]] for i in range(len(msub))]
    clean = label_comm(
        sums, waits, ctx[mtest], np.zeros(len(msub), dtype=np.int64), profile=profile
    )
    for which, label, true in (
        ("fwd_comm", msub.fwd_ms, clean.fwd_ms),
        ("bwd_comm", msub.bwd_ms, clean.bwd_ms),
    ):
        t, lab = true[:, : m.shape[1]][m], label[m]
        out[which] = {
            "floor_mape": float(np.mean(np.abs(t - lab) / np.maximum(lab, 1e-3))),
            "n": int(m.sum()),
        }
    return out


def train_range_model(
    out: str | Path,
    *,
    profile: str = "h100",
    compute_samples: int = 16_000,
    comm_samples: int = 4_000,
    generated_tables: int = 3_000,
    noise: float = 0.03,
    seed: int = 0,
    members: int = 3,
    conservative_k: float = 1.0,
    compute_seconds: float = 900.0,
    comm_seconds: float = 240.0,
    num_threads: int = 1,
    init_from: str | Path | None = None,
    lr: float = 1e-3,
    pool_weight: int = 1,
    families: Sequence[str] = ("zipf",),
    config: RangeConfig = RangeConfig(),
    plan_tasks: int = 0,
    plan_searchers: Sequence[Searcher] = (),
    earlier_plans: Sequence[str | Path] = (),
    small_loads: int = 0,
    extra_families: Sequence[str] = (),
    extra_loads: int = 0,
    max_epochs: int = 400,
) -> Path:
    """Draw (or reuse) the data in ``out/data.npz``, train a range
    :class:`~neuroshard.models.neural.NeuralCostModel` (checkpoints in ``out/ckpt``) and
    save it in ``out/model``. Sources: the pool's train half (augmented, plus hotter
    shrunk copies) and ``generated_tables`` of each of ``families`` (never ``heldout``);
    ``config`` sets the load sizes (:class:`RangeConfig`). ``init_from`` (a
    model directory) warm-starts the nets from its weights (a longer training in steps).
    ``pool_weight`` repeats the pool among the sources: a shard comes from the pool with
    probability ``pool_weight / (pool_weight + 1)``. ``plan_tasks`` > 0 adds plan-shaped
    loads (``out/plans.npz``, :func:`range_plan_loads`): the device loads of the plans
    ``plan_searchers`` make under the ``init_from`` model on that many tasks.
    ``small_loads`` > 0 adds that many loads of 1 to 15 shards, half of them single shards
    (``out/small.npz``, drawn from the same sources): a shard costs the same to train on
    in any load, so small loads teach the per-shard net for a few percent of an epoch's
    time. ``extra_loads`` > 0 adds that many loads (``out/extra.npz``) whose shards all
    come from ``generated_tables`` of each of ``extra_families``: half of them of 1 to 15
    shards (a tenth single), half as ``config`` draws. It brings a family into a step that
    reuses data drawn without it. ``max_epochs`` caps each net's epochs beside its time
    budget."""
    from neuroshard.models.neural import NeuralCostModel
    from neuroshard.models.training import file_checkpointed
    from neuroshard.pretrain.pool import load_pool

    trainable = ", ".join(f for f in FAMILIES if f != "heldout")
    for name, given in (("families", families), ("extra_families", extra_families)):
        if "heldout" in given or not set(given) <= set(FAMILIES):
            raise ValueError(f"{name} {tuple(given)!r}: trainable ones are {trainable}")
    if extra_loads < 0 or bool(extra_loads) != bool(extra_families):
        raise ValueError("extra_loads (> 0) and extra_families go together")
    if small_loads < 0:
        raise ValueError(f"small_loads must be >= 0, got {small_loads}")
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    if plan_tasks and (init_from is None or not plan_searchers):
        raise ValueError("plan_tasks needs init_from (the model to plan with) and plan_searchers")
    for path in earlier_plans:
        if not Path(path).is_file():
            raise ValueError(f"earlier_plans: {path} is not a file")
    earlier: tuple[ComputeData, np.ndarray] | None = None  # joined now: a repeat fails fast
    for path in earlier_plans:
        data = _load_compute(np.load(path, allow_pickle=False))
        try:
            earlier = data if earlier is None else _join(earlier, data)
        except ValueError as e:
            raise ValueError(f"earlier_plans: {path}: {e}") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / "data.npz"
    drawn_sources: tuple[list[TableSpec], list[list[TableSpec]]] | None = None
    if data_path.exists():
        compute, batches, comm, ctx = load_data(data_path)
        logger.info("reusing %s", data_path)
    else:
        rng = np.random.default_rng(seed)
        drawn_sources = _sources(rng, generated_tables, seed, families)
        pool, gens = drawn_sources
        sources = [pool] * pool_weight + gens
        loads, batches = sample_range_loads(sources, compute_samples, rng, config)
        compute = label_compute(loads, batches, profile=profile, noise=noise, seed=seed)
        dims = [t.dim for t in pool] + [t.dim for g in gens for t in g]
        sums, waits, ctx, shards = sample_cluster_comm(dims, comm_samples, rng, profile=profile)
        comm = label_comm(sums, waits, ctx, shards, profile=profile, noise=noise, seed=seed)
        save_data(data_path, compute, batches, comm, ctx)
        logger.info(
            "drew %d compute and %d comm samples into %s", len(compute), len(comm), data_path
        )
    small = 0
    if small_loads:
        small_path = out / "small.npz"
        if small_path.exists():
            extra, extra_batches = _load_compute(np.load(small_path, allow_pickle=False))
            if len(extra) != small_loads:
                raise ValueError(
                    f"{small_path} holds {len(extra)} small loads, not {small_loads}: remove "
                    "it to draw them again"
                )
        else:
            # the sources drawn above, or the same again (their rng is fresh from ``seed``)
            pool, gens = drawn_sources or _sources(
                np.random.default_rng(seed), generated_tables, seed, families
            )
            sloads, extra_batches = sample_range_loads(
                [pool] * pool_weight + gens,
                small_loads,
                np.random.default_rng([seed, 6]),
                replace(config, single_fraction=0.5, small_fraction=1.0),
            )
            extra = label_compute(
                sloads, extra_batches, profile=profile, noise=noise, seed=seed + 2, prefix="sm"
            )
            _save_npz(small_path, **_compute_arrays(extra, extra_batches))
        small = len(extra)
        compute, batches = _join((compute, batches), (extra, extra_batches))
        logger.info("%d small loads added", small)
    if extra_loads:
        extra, extra_batches = _extra_family_loads(
            out / "extra.npz",
            extra_families,
            extra_loads,
            generated_tables,
            seed,
            profile,
            noise,
            config,
        )
        compute, batches = _join((compute, batches), (extra, extra_batches))
        logger.info("%d loads of %s added", len(extra), ", ".join(extra_families))
    model = NeuralCostModel(
        batch_size=HIST_BATCH,
        range_inputs=True,
        compute_members=members,
        conservative_k=conservative_k,
        lr=lr,
        max_epochs=max_epochs,
        patience=25,
        lr_decay_patience=8,
        seed=seed,
        num_threads=num_threads,
        max_seconds_per_net=compute_seconds,
    )
    trainer = file_checkpointed(out / "ckpt")
    comm_budget = comm_seconds

    def timed(net, tr, va, config, label):  # comm nets get their own budget
        from dataclasses import replace as _replace

        if label != "compute":
            config = _replace(config, max_seconds=comm_budget)
        return trainer(net, tr, va, config, label)

    start = None
    if init_from is not None:
        from neuroshard.models import load_cost_model

        start = cast(NeuralCostModel, load_cost_model(init_from))
    plans = 0
    if plan_tasks and start is not None:
        plans_path = out / "plans.npz"
        if plans_path.exists():
            z = np.load(plans_path, allow_pickle=False)
            if int(z["plan_tasks"]) != plan_tasks:
                raise ValueError(
                    f"{plans_path} holds the loads of {int(z['plan_tasks'])} plan tasks, not "
                    f"{plan_tasks}: remove it to draw them again"
                )
            extra, extra_batches = _load_compute(z)
        else:
            ploads, extra_batches = range_plan_loads(
                cast(CostEstimator, start),
                load_pool("train"),
                plan_tasks,
                np.random.default_rng([seed, 5, *([len(earlier_plans)] if earlier_plans else [])]),
                plan_searchers,
            )
            prefix = f"p{len(earlier_plans)}s" if earlier_plans else "p"  # keys unique per step
            extra = label_compute(
                ploads, extra_batches, profile=profile, noise=noise, seed=seed + 1, prefix=prefix
            )
            _save_npz(
                plans_path, plan_tasks=np.array(plan_tasks), **_compute_arrays(extra, extra_batches)
            )
        plans = len(extra)
        compute, batches = _join((compute, batches), (extra, extra_batches))
        logger.info("%d plan-shaped loads of %d tasks added", plans, plan_tasks)
    if earlier is not None:
        plans += len(earlier[0])
        compute, batches = _join((compute, batches), earlier)
        logger.info(
            "%d plan-shaped loads of %d earlier steps added", len(earlier[0]), len(earlier_plans)
        )
    model.fit(
        compute,
        comm,
        backend_name="sim",
        trainer=timed,
        compute_batch=batches,
        comm_context=ctx,
        init_from=start,
    )
    model.metrics_["noise_floor"] = noise_floors(
        compute, batches, comm, ctx, seed=seed, profile=profile
    )
    model.provenance_ = {
        "generator": "neuroshard.pretrain.generate.train_range_model",
        "profile": profile,
        "compute_samples": compute_samples,
        "comm_samples": comm_samples,
        "generated_tables": generated_tables,
        "noise": noise,
        "seed": seed,
        "sources": ["pool train half (augmented, shrunk copies)"]
        + [f"generated {f} family" for f in families]
        + [f"generated {f} family (extra loads)" for f in extra_families],
        "extra_families": list(extra_families),
        # data.npz drawn by an earlier call (a step): its tables and loads are that call's
        "data_reused": drawn_sources is None,
        "single_fraction": config.single_fraction,
        "small_fraction": config.small_fraction,
        "batch_range": list(BATCH_RANGE),
        "max_shards": config.max_shards,
        "max_devices": config.max_devices,
        "warm_start": None if start is None else start.name,
        "lr": lr,
        "pool_weight": pool_weight,
        "compute_seconds": compute_seconds,
        "comm_seconds": comm_seconds,
        "plan_tasks": plan_tasks,
        "plan_loads": plans,
        "earlier_plan_files": len(earlier_plans),
        "small_loads": small,
        "extra_loads": extra_loads,
        "max_epochs": max_epochs,
    }
    return model.save(out / "model")


if __name__ == "__main__":  # pragma: no cover - a long run, driven by hand
    import argparse

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ap = argparse.ArgumentParser(description=train_range_model.__doc__)
    ap.add_argument("out")
    ap.add_argument("--profile", default="h100")
    ap.add_argument("--compute-samples", type=int, default=16_000)
    ap.add_argument("--comm-samples", type=int, default=4_000)
    ap.add_argument(
        "--generated-tables", type=int, default=3_000, help="tables drawn per generated family"
    )
    ap.add_argument("--compute-seconds", type=float, default=900.0)
    ap.add_argument("--comm-seconds", type=float, default=240.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-from", default=None)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pool-weight", type=int, default=1)
    ap.add_argument("--families", default="zipf", help="comma-separated: zipf, mixture, piecewise")
    ap.add_argument("--single-fraction", type=float, default=RangeConfig.single_fraction)
    ap.add_argument("--small-fraction", type=float, default=RangeConfig.small_fraction)
    ap.add_argument("--small-loads", type=int, default=0)
    ap.add_argument("--extra-families", default="", help="comma-separated, for --extra-loads")
    ap.add_argument("--extra-loads", type=int, default=0)
    ap.add_argument("--max-epochs", type=int, default=400)
    a = ap.parse_args()
    train_range_model(
        a.out,
        profile=a.profile,
        compute_samples=a.compute_samples,
        comm_samples=a.comm_samples,
        generated_tables=a.generated_tables,
        compute_seconds=a.compute_seconds,
        comm_seconds=a.comm_seconds,
        seed=a.seed,
        init_from=a.init_from,
        lr=a.lr,
        pool_weight=a.pool_weight,
        families=tuple(a.families.split(",")),
        config=RangeConfig(single_fraction=a.single_fraction, small_fraction=a.small_fraction),
        small_loads=a.small_loads,
        extra_families=tuple(f for f in a.extra_families.split(",") if f),
        extra_loads=a.extra_loads,
        max_epochs=a.max_epochs,
    )

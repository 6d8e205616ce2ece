"""Plan costs: the one formula, for one finished plan and for batches of candidates.

A plan's cost under a :class:`~neuroshard.types.CostEstimator` is, per device,

* compute -- the estimator's fused compute of the device's shards (0 for an empty device),
* backward comm -- ``bwd_comm_ms`` of the per-device dim sums,
* forward comm -- ``fwd_comm_ms`` of the dim sums and each device's wait, where the wait
  is its compute + backward comm minus the smallest across devices,

and the plan cost is the max over devices of their sum. :func:`plan_cost` computes it for
one :class:`~neuroshard.types.Plan`; it serves the search (with a learned model) and
``neuroshard evaluate`` (with a hardware backend) alike.

:class:`Scorer` computes the same numbers for many candidate assignments at once, as the
searches need: a device's load is an opaque hashable :data:`LoadKey`, compute is cached
per key, and a batch of candidates costs one ``compute_ms`` call over its uncached loads
plus one ``bwd_comm_ms`` and one ``fwd_comm_ms`` call over its stacked dim-sum rows.
Searchers only build keys (:meth:`Scorer.item`, :meth:`Scorer.add`) and ask for costs, so
faster scoring stays here. Because compute is cached per load, a candidate that differs
from plans already scored in one or two devices (a move or a swap) costs the estimator
only those devices' new loads, plus its comm.

**Additive estimators.** When the estimator exposes ``shard_embeddings(specs) -> (n, E)``
and ``compute_from_embeddings(summed, counts) -> (B,)`` (the neural model: a device's
compute is a head applied to the sum of its shards' embeddings), the scorer is
:attr:`Scorer.additive`: it embeds each item once (:meth:`Scorer.embeddings`), computes a
load as the head of its summed embeddings, and lets a search keep per-device embedding
sums in its own arrays and price "device + shard" for many devices and candidates with
one :meth:`Scorer.compute_sums` call -- no load keys at all. Sums are formed in a
different order than the estimator's own ``compute_ms`` would use, so values can differ
from it in the last float32 bits.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from typing import Iterable, Sequence

import numpy as np

from neuroshard.types import CostEstimator, DeviceCost, Plan, PlanCost, TableSpec

logger = logging.getLogger(__name__)

# A device's load: the sorted item ids (see Scorer.item) of its shards, repeats allowed.
LoadKey = tuple[int, ...]
EMPTY_LOAD: LoadKey = ()


def _comm_ms(estimator: CostEstimator, compute_ms: np.ndarray,
             dim_sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Backward and forward comm, each ``(batch, num_devices)``, for stacked plans."""
    bwd = np.asarray(estimator.bwd_comm_ms(dim_sums), dtype=float)
    ready_ms = compute_ms + bwd
    waits_ms = ready_ms - ready_ms.min(axis=1, keepdims=True)
    fwd = np.asarray(estimator.fwd_comm_ms(dim_sums, waits_ms), dtype=float)
    return bwd, fwd


def plan_cost(plan: Plan, estimator: CostEstimator) -> PlanCost:
    """Per-device compute, comm and memory of ``plan`` under ``estimator``."""
    loads = plan.device_loads()
    busy = [i for i, load in enumerate(loads) if load]
    compute = np.zeros(len(loads))
    if busy:
        compute[busy] = np.asarray(estimator.compute_ms([loads[i] for i in busy]), dtype=float)
    dim_sums = np.asarray([plan.dim_sums()], dtype=float)
    bwd, fwd = _comm_ms(estimator, compute[None], dim_sums)
    return PlanCost(
        model=estimator.name,
        devices=tuple(
            DeviceCost(compute_ms=float(c), fwd_comm_ms=float(f), bwd_comm_ms=float(b),
                       memory_bytes=int(m))
            for c, f, b, m in zip(compute, fwd[0], bwd[0], plan.memory_bytes())
        ),
    )


def is_additive(estimator: CostEstimator) -> bool:
    """Whether ``estimator`` prices a load as a head of summed per-shard embeddings."""
    return (callable(getattr(estimator, "shard_embeddings", None))
            and callable(getattr(estimator, "compute_from_embeddings", None)))


class Scorer:
    """Batched, cached costs of candidate assignments under one estimator.

    An *item* is a column shard's compute view (a :class:`TableSpec` narrowed to the
    shard's width), interned to a small int by :meth:`item`. A device load is a
    :data:`LoadKey`, built from :data:`EMPTY_LOAD` with :meth:`add`. An *assignment* is one
    candidate plan: a sequence of ``num_devices`` load keys.

    ``additive=None`` detects an additive estimator (:func:`is_additive`); ``False``
    forces the generic path (the estimator's ``compute_ms`` on whole loads).
    """

    def __init__(self, estimator: CostEstimator, *, additive: bool | None = None):
        self.estimator = estimator
        self.additive = is_additive(estimator) if additive is None else bool(additive)
        if self.additive and not is_additive(estimator):
            raise ValueError(f"estimator {getattr(estimator, 'name', estimator)!r} has no "
                             "shard_embeddings / compute_from_embeddings")
        self._ids: dict[tuple[str, int], int] = {}
        self._specs: list[TableSpec] = []
        self._widths: list[int] = []
        self._bytes: list[int] = []
        self._compute_ms: dict[LoadKey, float] = {EMPTY_LOAD: 0.0}
        self._emb: np.ndarray | None = None  # (capacity, E) float32, rows of embedded items
        self._embedded = 0  # items 0 .. _embedded-1 have rows in _emb
        self._single_ms = np.zeros(0)  # per item, its compute alone (NaN: not yet priced)
        self.compute_calls = 0  # compute evaluations (estimator calls or head calls) made
        self.loads_computed = 0  # loads priced (cache misses)

    # -- items and keys

    def item(self, spec: TableSpec) -> int:
        """The id of the shard ``spec`` (table name and width identify it)."""
        ident = (spec.name, spec.dim)
        found = self._ids.get(ident)
        if found is None:
            found = self._ids[ident] = len(self._specs)
            self._specs.append(spec)
            self._widths.append(spec.dim)
            self._bytes.append(spec.size_bytes)
        return found

    @property
    def num_items(self) -> int:
        return len(self._specs)

    def widths(self) -> np.ndarray:
        """Width (columns) of every item so far, indexed by item id."""
        return np.asarray(self._widths, dtype=np.int64)

    def sizes_bytes(self) -> np.ndarray:
        """Memory (bytes) of every item so far, indexed by item id."""
        return np.asarray(self._bytes, dtype=np.int64)

    def spec(self, item: int) -> TableSpec:
        return self._specs[item]

    @staticmethod
    def add(key: LoadKey, item: int) -> LoadKey:
        """``key`` with one more shard ``item``."""
        i = bisect_right(key, item)
        return key[:i] + (item,) + key[i:]

    def key(self, specs: Iterable[TableSpec]) -> LoadKey:
        """The load key of a device holding ``specs``."""
        return tuple(sorted(self.item(s) for s in specs))

    def dim_sum(self, key: LoadKey) -> int:
        widths = self._widths
        return sum(widths[i] for i in key)

    # -- additive estimators

    def embeddings(self) -> np.ndarray:
        """``(num_items, E)`` float32 embeddings of every item so far, by item id (additive
        estimators only); new items are embedded in one estimator call."""
        if not self.additive:
            raise TypeError("embeddings need an additive estimator (see is_additive)")
        n = len(self._specs)
        if self._embedded < n:
            new = np.asarray(self.estimator.shard_embeddings(self._specs[self._embedded:n]),
                             dtype=np.float32)
            if self._emb is None:
                self._emb = np.empty((max(64, 2 * n), new.shape[1]), dtype=np.float32)
            elif self._emb.shape[0] < n:
                grown = np.empty((2 * n, self._emb.shape[1]), dtype=np.float32)
                grown[:self._embedded] = self._emb[:self._embedded]
                self._emb = grown
            self._emb[self._embedded:n] = new
            self._embedded = n
        if self._emb is None:
            return np.zeros((0, 0), dtype=np.float32)
        return self._emb[:n]

    def compute_sums(self, summed: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
        """Compute (ms) of devices given their summed shard embeddings ``(B, E)``; rows
        whose ``counts`` are 0 (empty devices) cost 0. Additive estimators only."""
        if not len(summed):
            return np.zeros(0)
        self.compute_calls += 1
        self.loads_computed += len(summed)
        out = self.estimator.compute_from_embeddings(summed, counts)
        return np.asarray(out, dtype=float).reshape(-1)

    # -- costs

    def compute(self, keys: Sequence[LoadKey]) -> np.ndarray:
        """Fused compute (ms) of each load; one estimator call for all uncached loads."""
        cache = self._compute_ms
        missing = list(dict.fromkeys(k for k in keys if k not in cache))
        if missing:
            if self.additive:
                values = self._compute_additive(missing)
            else:
                specs = self._specs
                values = self.estimator.compute_ms([[specs[i] for i in k] for k in missing])
                self.compute_calls += 1
                self.loads_computed += len(missing)
            cache.update(zip(missing, np.asarray(values, dtype=float).tolist()))
        return np.fromiter((cache[k] for k in keys), dtype=float, count=len(keys))

    def _compute_additive(self, keys: Sequence[LoadKey]) -> np.ndarray:
        emb = self.embeddings()
        counts = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
        flat = np.fromiter((i for k in keys for i in k), dtype=np.int64, count=int(counts.sum()))
        summed = np.zeros((len(keys), emb.shape[1]), dtype=np.float32)
        busy = counts > 0
        if busy.any():
            starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
            summed[busy] = np.add.reduceat(emb[flat], starts[busy], axis=0)
        return self.compute_sums(summed, counts)

    def singles(self, items: Sequence[int]) -> np.ndarray:
        """Compute (ms) of each item alone on a device, cached per item."""
        if not self.additive:
            return self.compute([(i,) for i in items])
        n = len(self._specs)
        if len(self._single_ms) < n:
            self._single_ms = np.concatenate(
                (self._single_ms, np.full(n - len(self._single_ms), np.nan)))
        wanted = np.asarray(items, dtype=np.int64)
        missing = np.unique(wanted[np.isnan(self._single_ms[wanted])])
        if missing.size:
            self._single_ms[missing] = self.compute_sums(self.embeddings()[missing],
                                                         np.ones(missing.size))
        return self._single_ms[wanted]

    def comm(self, compute_ms: np.ndarray, dim_sums: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
        """Backward and forward comm, each ``(batch, num_devices)``, of stacked plans with
        per-device ``compute_ms`` and ``dim_sums``."""
        return _comm_ms(self.estimator, np.asarray(compute_ms, dtype=float),
                        np.asarray(dim_sums, dtype=float))

    def plan_ms(self, compute_ms: np.ndarray, dim_sums: np.ndarray) -> np.ndarray:
        """Plan cost (max over devices, ms) of stacked plans, ``(batch,)``."""
        compute_ms = np.asarray(compute_ms, dtype=float)
        if not len(compute_ms):
            return np.zeros(0)
        bwd, fwd = self.comm(compute_ms, dim_sums)
        return (compute_ms + fwd + bwd).max(axis=1)  # DeviceCost.total_ms order

    def device_costs(self, assignments: Sequence[Sequence[LoadKey]]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Compute, backward comm and forward comm, each ``(len(assignments), num_devices)``."""
        num_devices = len(assignments[0])
        flat = [k for a in assignments for k in a]
        compute = self.compute(flat).reshape(len(assignments), num_devices)
        dim_sums = np.fromiter((self.dim_sum(k) for k in flat), dtype=float,
                               count=len(flat)).reshape(compute.shape)
        bwd, fwd = _comm_ms(self.estimator, compute, dim_sums)
        return compute, bwd, fwd

    def score(self, assignments: Sequence[Sequence[LoadKey]]) -> np.ndarray:
        """Plan cost (max over devices, ms) of each candidate assignment."""
        if not assignments:
            return np.zeros(0)
        compute, bwd, fwd = self.device_costs(assignments)
        return (compute + fwd + bwd).max(axis=1)  # DeviceCost.total_ms order


class WithoutEmbeddings:
    """``estimator`` with its per-shard embedding methods hidden, so the search takes the
    generic cached-load path: for benchmarking that path and for equivalence tests."""

    def __init__(self, estimator: CostEstimator):
        self.inner, self.name, self.batch_size = estimator, estimator.name, estimator.batch_size

    def compute_ms(self, loads):
        return self.inner.compute_ms(loads)

    def bwd_comm_ms(self, dim_sums):
        return self.inner.bwd_comm_ms(dim_sums)

    def fwd_comm_ms(self, dim_sums, waits_ms):
        return self.inner.fwd_comm_ms(dim_sums, waits_ms)

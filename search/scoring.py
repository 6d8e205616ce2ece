"""Plan costs: the one formula, for one finished plan and for batches of candidates.

A plan's cost under a :class:`~neuroshard.types.CostEstimator` is, per device,

* compute -- the estimator's fused compute of the device's shards (0 for an empty device),
* backward comm -- ``bwd_comm_ms`` of the per-device dim sums,
* forward comm -- ``fwd_comm_ms`` of the dim sums and each device's wait, where the wait
  is its compute + backward comm minus the smallest across devices,

and the plan cost is the max over devices of their sum. :func:`plan_cost` computes it for
one :class:`~neuroshard.types.Plan`; it serves the search (with a learned model) and
``neuroshard evaluate`` (with a hardware backend) alike.

**The whole sharding space.** Dim sums count the table- and column-wise shards only (the
pooled all-to-all the estimators price, as the learned models were trained). What the
other types and kernels move (:mod:`neuroshard.traffic`: row-wise and table-row-wise
reduce-scatters and all-gathers, the cross-host all-to-all, the data-parallel
all-reduce, the input all-to-all of ids, ``fused_uvm_caching`` misses over the host
link) is priced by the estimator's ``extra_ms`` when it has one (the sim backend), else
analytically from the cluster's bandwidths (:func:`neuroshard.traffic.analytic_extra_ms`),
and enters the same formula:

* compute += host-link ms (cache misses are fetched by the kernel);
* backward comm += the backward collectives; the waits include them;
* forward comm = the estimator's forward all-to-all with the wait for stragglers (when
  no device has a table- or column-wise shard, the wait alone: every device meets the
  others at its first collective) + the forward collectives;
* the input all-to-all overlaps the previous iteration (TorchRec's pipelined training):
  only what outlasts the device's compute + comm is added, to its forward comm.

An estimator with ``for_cluster(cluster)`` is bound to the plan's cluster first (the sim
takes its hosts and bandwidths). On a cluster of several hosts the pooled all-to-all is
never priced below the NIC's time for its inter-host part (:func:`nic_floor`): a learned
all-to-all measured on one host would otherwise see NVLink everywhere. For a plan of table-
and column-wise ``fused`` shards every extra term is 0 on one host (its input all-to-all
hides behind the compute), so such plans cost exactly what they did before these types
existed.

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
import math
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, cast

import numpy as np

from neuroshard.traffic import (
    ALLTOALL_TYPES,
    DEFAULT_SPEEDS,
    NUM_FIXED,
    LinkSpeeds,
    analytic_extra_ms,
    finish,
    nic_alltoall_ms,
    output_values,
    plan_traffic,
)
from neuroshard.types import (
    BYTES_PER_FLOAT,
    Cluster,
    CostEstimator,
    DeviceCost,
    ExtraCosts,
    Plan,
    PlanCost,
    TableSpec,
    Traffic,
    embedding_bytes,
    io_buffer_bytes,
)

logger = logging.getLogger(__name__)

# A device's load: the sorted item ids (see Scorer.item) of its shards, repeats allowed.
LoadKey = tuple[int, ...]
EMPTY_LOAD: LoadKey = ()


def _comm_ms(
    estimator: CostEstimator, compute_ms: np.ndarray, dim_sums: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Backward and forward comm, each ``(batch, num_devices)``, for stacked plans."""
    bwd = np.asarray(estimator.bwd_comm_ms(dim_sums), dtype=float)
    ready_ms = compute_ms + bwd
    waits_ms = ready_ms - ready_ms.min(axis=1, keepdims=True)
    fwd = np.asarray(estimator.fwd_comm_ms(dim_sums, waits_ms), dtype=float)
    return bwd, fwd


ExtraPricer = Callable[[Traffic], ExtraCosts]


def bind(estimator: CostEstimator, cluster: Cluster) -> tuple[CostEstimator, ExtraPricer]:
    """``estimator`` for ``cluster`` (its ``for_cluster`` when it has one) and the price of
    extra traffic: its ``extra_ms``, else the analytic price at the cluster's bandwidths,
    else at :func:`link_speeds`'."""
    for_cluster = getattr(estimator, "for_cluster", None)
    bound = for_cluster(cluster) if callable(for_cluster) else estimator
    extra = getattr(bound, "extra_ms", None)
    if callable(extra):
        return bound, extra
    speeds = link_speeds(bound, cluster)
    return bound, lambda traffic: analytic_extra_ms(traffic, cluster, speeds)


# Per-device dim sums of the two uniform all-to-alls that calibrate a measured model's link.
CALIBRATION_DIMS = (256.0, 2048.0)


def link_speeds(estimator: CostEstimator, cluster: Cluster) -> LinkSpeeds:
    """The link speeds extra traffic (row-wise, table-row-wise and data-parallel
    collectives, the input ids' all-to-all) is priced at for ``estimator``.

    A model learned on measured hardware (``backend_`` other than ``sim``: gloo on CPUs, a
    GPU) was timed on links whose speed the H100 defaults do not describe, so its own
    backward all-to-all calibrates them: the slope of its price between two uniform
    all-to-alls (:data:`CALIBRATION_DIMS` columns per device) over the bytes each device
    then sends gives the bytes per ms of every link. The sim and its models keep the
    default (H100) speeds, the sim's own. The cluster's bandwidths, where it gives them,
    win either way."""
    speeds = DEFAULT_SPEEDS
    backend = getattr(estimator, "backend_", "sim")
    if backend != "sim" and cluster.num_devices > 1:
        n = cluster.num_devices
        dims = np.asarray([[d] * n for d in CALIBRATION_DIMS], dtype=float)
        ms = np.asarray(estimator.bwd_comm_ms(dims), dtype=float).mean(axis=1)
        per_dim = cluster.batch_size * BYTES_PER_FLOAT * (n - 1) / n  # bytes sent per column
        slope = (ms[1] - ms[0]) / (CALIBRATION_DIMS[1] - CALIBRATION_DIMS[0])
        if math.isfinite(slope) and slope > 0:
            rate = per_dim / slope
            speeds = replace(speeds, intra_bytes_per_ms=rate, inter_bytes_per_ms=rate)
        else:
            logger.warning(
                "%s's all-to-all gives no positive slope to calibrate its links with: "
                "extra traffic priced at the default (H100) speeds",
                getattr(estimator, "name", estimator),
            )
    return speeds.for_cluster(cluster)


def nic_floor(
    estimator: CostEstimator, cluster: Cluster
) -> Callable[[np.ndarray], np.ndarray] | None:
    """On a cluster of several hosts, the NIC's floor under the estimator's pooled
    all-to-all (:func:`neuroshard.traffic.nic_alltoall_ms`); on one host None. A model
    whose all-to-all was measured on one host would otherwise price traffic across hosts
    at NVLink speed; an estimator that knows the hosts (the sim) already costs at least
    this much, so the floor leaves it alone."""
    if cluster.num_hosts == 1:
        return None
    return lambda dim_sums: nic_alltoall_ms(dim_sums, cluster)


def device_costs(
    estimator: CostEstimator,
    compute_ms: np.ndarray,
    dim_sums: np.ndarray,
    extra: ExtraCosts | None,
    floor: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute, backward and forward comm ``(batch, num_devices)`` of stacked plans with
    per-device estimator compute, all-to-all dim sums and extra costs (the module doc's
    formula; ``extra`` None: the all-to-all alone). ``floor``: per device, a time its
    all-to-all cannot beat (:func:`nic_floor`); what the estimator's backward all-to-all
    falls short of it is added to both directions."""
    if extra is None:
        bwd, fwd = _comm_ms(estimator, compute_ms, dim_sums)
        return compute_ms, bwd, fwd
    compute_ms = compute_ms + extra.host_ms
    a2a = (dim_sums > 0).any(axis=1)
    bwd = np.zeros(compute_ms.shape)
    if a2a.all():
        bwd = np.asarray(estimator.bwd_comm_ms(dim_sums), dtype=float)
    elif a2a.any():
        bwd[a2a] = np.asarray(estimator.bwd_comm_ms(dim_sums[a2a]), dtype=float)
    short = np.maximum(floor - bwd, 0.0) if floor is not None else 0.0
    bwd = bwd + short + extra.bwd_ms
    ready_ms = compute_ms + bwd
    waits_ms = ready_ms - ready_ms.min(axis=1, keepdims=True)
    if a2a.all():
        fwd = np.asarray(estimator.fwd_comm_ms(dim_sums, waits_ms), dtype=float)
    else:
        fwd = waits_ms.max(axis=1, keepdims=True) - waits_ms
        if a2a.any():
            fwd[a2a] = np.asarray(estimator.fwd_comm_ms(dim_sums[a2a], waits_ms[a2a]), dtype=float)
    fwd = fwd + short + extra.fwd_ms
    exposed = np.maximum(extra.input_ms - (compute_ms + fwd + bwd), 0.0)
    return compute_ms, bwd, fwd + exposed


def alltoall_dim_sums(plan: Plan) -> list[float]:
    """Per device, the values per sample its table- and column-wise shards send in the
    pooled all-to-all (:func:`neuroshard.traffic.output_values`)."""
    by_name = {t.name: t for t in plan.tables}
    kinds = {t.name: plan.sharding_type_of(t.name) for t in plan.tables}
    sums = [0.0] * plan.cluster.num_devices
    for s in plan.shards:
        if kinds[s.table] in ALLTOALL_TYPES:
            sums[s.device] += output_values(by_name[s.table], s.width)
    return sums


def plan_cost(plan: Plan, estimator: CostEstimator) -> PlanCost:
    """Per-device compute, comm and memory of ``plan`` under ``estimator``."""
    floor_of = nic_floor(estimator, plan.cluster)
    estimator, extra_ms = bind(estimator, plan.cluster)
    loads = plan.device_loads()
    busy = [i for i, load in enumerate(loads) if load]
    compute = np.zeros(len(loads))
    if busy:
        compute[busy] = np.asarray(estimator.compute_ms([loads[i] for i in busy]), dtype=float)
    dim_sums = np.asarray([alltoall_dim_sums(plan)], dtype=float)
    extra = extra_ms(plan_traffic(plan))
    floor = floor_of(dim_sums) if floor_of is not None else None
    compute, bwd, fwd = device_costs(estimator, compute[None], dim_sums, extra, floor)
    compute = compute[0]
    return PlanCost(
        model=estimator.name,
        devices=tuple(
            DeviceCost(
                compute_ms=float(c), fwd_comm_ms=float(f), bwd_comm_ms=float(b), memory_bytes=int(m)
            )
            for c, f, b, m in zip(compute, fwd[0], bwd[0], plan.memory_bytes(), strict=True)
        ),
    )


def member_costs(plan: Plan, estimator: CostEstimator) -> tuple[float, ...]:
    """``plan``'s cost (its costliest device) under each member of ``estimator`` (its
    optional ``members()``: a neural ensemble's nets one by one), or under ``estimator``
    alone."""
    members = getattr(estimator, "members", None)
    estimators = members() if callable(members) else [estimator]
    return tuple(plan_cost(plan, e).max_ms for e in estimators)


def is_additive(estimator: CostEstimator) -> bool:
    """Whether ``estimator`` prices a load as a head of summed per-shard embeddings."""
    return callable(getattr(estimator, "shard_embeddings", None)) and callable(
        getattr(estimator, "compute_from_embeddings", None)
    )


class Scorer:
    """Batched, cached costs of candidate assignments under one estimator.

    An *item* is a shard's compute view (a :class:`TableSpec` narrowed to the shard's
    width, and to its rows and their share of the ids for a row block), interned to a
    small int by :meth:`item`, with what it needs and moves: its HBM and host-memory
    footprint, the values per sample it sends in the pooled all-to-all (its width; 0 for
    the types that do not use it), the ids it receives and its host-link bytes. A device
    load is a :data:`LoadKey`, built from :data:`EMPTY_LOAD` with :meth:`add`. An
    *assignment* is one candidate plan: a sequence of ``num_devices`` load keys.

    ``cluster`` (None: the all-to-all alone, as before other types existed) binds the
    estimator to the topology and prices the extra traffic (:func:`bind`); an
    assignment's fixed traffic (its row-wise, table-row-wise and data-parallel
    collectives, :func:`neuroshard.traffic.fixed_traffic`) is passed to :meth:`score`.
    ``additive=None`` detects an additive estimator (:func:`is_additive`); ``False``
    forces the generic path (the estimator's ``compute_ms`` on whole loads).
    """

    def __init__(
        self,
        estimator: CostEstimator,
        *,
        additive: bool | None = None,
        cluster: Cluster | None = None,
    ):
        self.cluster = cluster
        self._extra: ExtraPricer | None = None
        self._floor: Callable[[np.ndarray], np.ndarray] | None = None
        if cluster is not None:
            self._floor = nic_floor(estimator, cluster)
            estimator, self._extra = bind(estimator, cluster)
        self.estimator = estimator
        self.additive = is_additive(estimator) if additive is None else bool(additive)
        if self.additive and not is_additive(estimator):
            raise ValueError(
                f"estimator {getattr(estimator, 'name', estimator)!r} has no "
                "shard_embeddings / compute_from_embeddings"
            )
        self.batch_size = cluster.batch_size if cluster is not None else estimator.batch_size
        self.optimizer = cluster.optimizer if cluster is not None else "sgd"
        self._ids: dict[tuple, int] = {}
        self._specs: list[TableSpec] = []
        self._widths: list[float] = []
        self._bytes: list[int] = []
        self._host_need: list[int] = []
        self._lookups: list[float] = []
        self._host_link: list[float] = []
        self._compute_ms: dict[LoadKey, float] = {EMPTY_LOAD: 0.0}
        self._emb: np.ndarray | None = None  # (capacity, E) float32, rows of embedded items
        self._embedded = 0  # items 0 .. _embedded-1 have rows in _emb
        self._single_ms = np.zeros(0)  # per item, its compute alone (NaN: not yet priced)
        self.compute_calls = 0  # compute evaluations (estimator calls or head calls) made
        self.loads_computed = 0  # loads priced (cache misses)

    # -- items and keys

    def item(
        self,
        spec: TableSpec,
        *,
        hbm_bytes: int | None = None,
        host_bytes: int = 0,
        alltoall: float | None = None,
        ids: float | None = None,
        host_link_bytes: float = 0.0,
    ) -> int:
        """The id of the shard whose compute view is ``spec``. By default a table- or
        column-wise ``fused`` shard: its weights, optimizer state and (when the bound
        cluster counts them) I/O buffers in HBM, its width in
        the all-to-all (:func:`~neuroshard.traffic.output_values`), the ids of its
        lookups, nothing over the host link; keywords say otherwise."""
        if hbm_bytes is None:
            hbm_bytes = embedding_bytes(spec.rows, spec.dim, self.optimizer)
            if self.cluster is not None:
                hbm_bytes += io_buffer_bytes(spec, "column_wise", spec.dim, self.cluster)
        if alltoall is None:
            alltoall = output_values(spec, spec.dim)
        if ids is None:
            ids = self.batch_size * spec.pooling_factor
        ident = (
            spec.name,
            spec.dim,
            spec.rows,
            spec.pooling_factor,
            hbm_bytes,
            host_bytes,
            alltoall,
            ids,
            host_link_bytes,
        )
        found = self._ids.get(ident)
        if found is None:
            found = self._ids[ident] = len(self._specs)
            self._specs.append(spec)
            self._widths.append(alltoall)
            self._bytes.append(hbm_bytes)
            self._host_need.append(host_bytes)
            self._lookups.append(ids)
            self._host_link.append(host_link_bytes)
        return found

    @property
    def num_items(self) -> int:
        return len(self._specs)

    def widths(self) -> np.ndarray:
        """Values per sample each item sends in the all-to-all (its width for a table- or
        column-wise shard of a pooled table), indexed by item id."""
        return np.asarray(self._widths, dtype=float)

    def sizes_bytes(self) -> np.ndarray:
        """HBM footprint (bytes) of every item so far, indexed by item id."""
        return np.asarray(self._bytes, dtype=np.int64)

    def host_sizes_bytes(self) -> np.ndarray:
        """Host-memory footprint (bytes) of every item so far, indexed by item id."""
        return np.asarray(self._host_need, dtype=np.int64)

    def lookups(self) -> np.ndarray:
        """Ids each item receives per iteration, indexed by item id."""
        return np.asarray(self._lookups, dtype=float)

    def host_link_bytes(self) -> np.ndarray:
        """Bytes each item moves over the host link per iteration, indexed by item id."""
        return np.asarray(self._host_link, dtype=float)

    def hbm_need(self, item: int) -> int:
        return self._bytes[item]

    def host_need(self, item: int) -> int:
        return self._host_need[item]

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

    def dim_sum(self, key: LoadKey) -> float:
        widths = self._widths
        return sum(widths[i] for i in key)

    def key_traffic(self, key: LoadKey) -> tuple[float, float]:
        """Ids received and host-link bytes of a device holding ``key``."""
        lookups, link = self._lookups, self._host_link
        return sum(lookups[i] for i in key), sum(link[i] for i in key)

    # -- additive estimators

    def embeddings(self) -> np.ndarray:
        """``(num_items, E)`` float32 embeddings of every item so far, by item id (additive
        estimators only); new items are embedded in one estimator call."""
        if not self.additive:
            raise TypeError("embeddings need an additive estimator (see is_additive)")
        n = len(self._specs)
        if self._embedded < n:
            new = np.asarray(
                cast(Any, self.estimator).shard_embeddings(self._specs[self._embedded : n]),
                dtype=np.float32,
            )
            if self._emb is None:
                self._emb = np.empty((max(64, 2 * n), new.shape[1]), dtype=np.float32)
            elif self._emb.shape[0] < n:
                grown = np.empty((2 * n, self._emb.shape[1]), dtype=np.float32)
                grown[: self._embedded] = self._emb[: self._embedded]
                self._emb = grown
            self._emb[self._embedded : n] = new
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
        out = cast(Any, self.estimator).compute_from_embeddings(summed, counts)
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
            cache.update(zip(missing, np.asarray(values, dtype=float).tolist(), strict=True))
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
                (self._single_ms, np.full(n - len(self._single_ms), np.nan))
            )
        wanted = np.asarray(items, dtype=np.int64)
        missing = np.unique(wanted[np.isnan(self._single_ms[wanted])])
        if missing.size:
            self._single_ms[missing] = self.compute_sums(
                self.embeddings()[missing], np.ones(missing.size)
            )
        return self._single_ms[wanted]

    def _extras(
        self,
        shape: tuple[int, int],
        lookups: np.ndarray | None,
        host_link: np.ndarray | None,
        fixed: np.ndarray | None,
    ) -> ExtraCosts | None:
        """The extra costs of stacked plans (None without a cluster)."""
        if self._extra is None or self.cluster is None:
            return None
        if fixed is None:
            fixed = np.zeros((shape[0], NUM_FIXED, shape[1]))
        fixed = np.broadcast_to(np.asarray(fixed, dtype=float), (shape[0], NUM_FIXED, shape[1]))
        lookups = np.zeros(shape) if lookups is None else np.asarray(lookups, dtype=float)
        host_link = np.zeros(shape) if host_link is None else np.asarray(host_link, dtype=float)
        return self._extra(finish(fixed, lookups, host_link, self.cluster))

    def costs(
        self,
        compute_ms: np.ndarray,
        dim_sums: np.ndarray,
        *,
        lookups: np.ndarray | None = None,
        host_link: np.ndarray | None = None,
        fixed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Compute (host-link time included), backward and forward comm, each ``(batch,
        num_devices)``, of stacked plans with per-device estimator compute, all-to-all
        dim sums, ids received and host-link bytes, and fixed traffic ``(batch or 1,
        NUM_FIXED, num_devices)`` (default none)."""
        compute_ms = np.asarray(compute_ms, dtype=float)
        dim_sums = np.asarray(dim_sums, dtype=float)
        extra = self._extras(compute_ms.shape, lookups, host_link, fixed)
        floor = self._floor(dim_sums) if self._floor is not None else None
        return device_costs(self.estimator, compute_ms, dim_sums, extra, floor)

    def comm(self, compute_ms: np.ndarray, dim_sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Backward and forward comm, each ``(batch, num_devices)``, of stacked plans with
        per-device ``compute_ms`` and ``dim_sums`` (no extra traffic)."""
        _, bwd, fwd = self.costs(compute_ms, dim_sums)
        return bwd, fwd

    def plan_ms(
        self,
        compute_ms: np.ndarray,
        dim_sums: np.ndarray,
        *,
        lookups: np.ndarray | None = None,
        host_link: np.ndarray | None = None,
        fixed: np.ndarray | None = None,
    ) -> np.ndarray:
        """Plan cost (max over devices, ms) of stacked plans, ``(batch,)`` (see :meth:`costs`)."""
        compute_ms = np.asarray(compute_ms, dtype=float)
        if not len(compute_ms):
            return np.zeros(0)
        compute_ms, bwd, fwd = self.costs(
            compute_ms, dim_sums, lookups=lookups, host_link=host_link, fixed=fixed
        )
        return (compute_ms + fwd + bwd).max(axis=1)  # DeviceCost.total_ms order

    def device_costs(
        self, assignments: Sequence[Sequence[LoadKey]], fixed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Compute, backward comm and forward comm, each ``(len(assignments), num_devices)``;
        ``fixed``: each assignment's fixed traffic (or one for all)."""
        num_devices = len(assignments[0])
        flat = [k for a in assignments for k in a]
        shape = (len(assignments), num_devices)
        compute = self.compute(flat).reshape(shape)
        dim_sums = np.fromiter(
            (self.dim_sum(k) for k in flat), dtype=float, count=len(flat)
        ).reshape(shape)
        lookups = host_link = None
        if self.cluster is not None:
            moved = np.asarray([self.key_traffic(k) for k in flat], dtype=float)
            lookups, host_link = moved[:, 0].reshape(shape), moved[:, 1].reshape(shape)
        return self.costs(compute, dim_sums, lookups=lookups, host_link=host_link, fixed=fixed)

    def score(
        self, assignments: Sequence[Sequence[LoadKey]], fixed: np.ndarray | None = None
    ) -> np.ndarray:
        """Plan cost (max over devices, ms) of each candidate assignment."""
        if not assignments:
            return np.zeros(0)
        compute, bwd, fwd = self.device_costs(assignments, fixed)
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

    def __getattr__(self, name: str):
        """The inner estimator's optional ``for_cluster`` (wrapped again) and ``extra_ms``."""
        if name == "for_cluster" and callable(getattr(self.inner, "for_cluster", None)):
            inner: Any = self.inner
            return lambda cluster: WithoutEmbeddings(inner.for_cluster(cluster))
        if name == "extra_ms" and callable(getattr(self.inner, "extra_ms", None)):
            return cast(Any, self.inner).extra_ms
        raise AttributeError(name)

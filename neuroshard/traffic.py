"""What each sharding type and kernel moves per device and iteration, and its analytic price.

The pooled all-to-all of table- and column-wise shards is priced by the cost estimator
from per-device dim sums (:class:`~neuroshard.types.CostEstimator`), as the learned
models were trained. Everything else a plan moves is worked out here as
:class:`~neuroshard.types.Traffic` (bytes and counts per device) and priced either by the
estimator's own ``extra_ms`` (the sim backend) or by :func:`analytic_extra_ms`. Nothing
here is a measurement.

Notation: global batch ``B`` (the cluster's), ``N`` devices in ``H`` hosts of ``G``;
a table of ``R`` rows; a shard ``w`` columns wide; ``o = w`` values per sample for a
pooled table, ``o = w p`` for a sequence table (one vector per id, ``p`` ids per sample);
4-byte floats, 8-byte ids. Collectives follow TorchRec 1.9's sharding implementations
(``torchrec/distributed/{tw,cw,rw,twrw,dp}_sharding.py``) and NCCL's ring algorithms,
whose bus-bandwidth accounting (``nccl-tests`` ``doc/PERFORMANCE.md``) gives the bytes
each device moves: ``(k-1)/k S`` for a reduce-scatter or all-gather of ``S`` bytes over
``k`` ranks, ``2 (k-1)/k S`` for an all-reduce. A ring spanning hosts runs at the NIC's
speed (its slowest link), so its bytes count as inter-host when ``H > 1``.

Per sharding type (forward / backward):

* ``table_wise``, ``column_wise``: the pooled all-to-all (the estimator's), nothing here.
* ``row_wise`` (row blocks; TorchRec spreads them over all ranks): each block holder
  pools the global batch over its rows; a reduce-scatter over the ``N`` ranks gives each
  rank its ``B / N`` samples: ``(N-1)/N B o 4`` bytes per device. Backward: an all-gather
  of the output gradient, the same bytes.
* ``table_row_wise`` (row blocks over the ``G`` devices of one host ``h``): a
  reduce-scatter inside ``h`` (NVLink), ``(G-1)/G B o 4`` bytes per device of ``h``, then
  an all-to-all across hosts among devices of the same local rank: a device of ``h``
  sends ``(H-1)/H B o 4 / G`` bytes, a device of another host receives ``B o 4 / N``.
  Backward: the all-to-all back, then an all-gather inside ``h``: the same bytes.
* ``data_parallel`` (a replica on every device): no forward exchange and no ids to
  route; backward, an all-reduce of the table's dense gradient, ``2 (N-1)/N R w 4``
  bytes per device.
* Input distribution (every type but data-parallel): each id goes to the shards holding
  its row (to every column shard of its row). Device ``d`` receives ``I_d`` ids per
  iteration (its shards' lookups), ``(G-1)/N`` of them from its host's other devices and
  ``(N-G)/N`` from other hosts; it sends ``1/N`` of every other device's ``I_e``, inside
  its host or across. Per level, the larger of send and receive, times 8 bytes.
  TorchRec's training pipeline (``TrainPipelineSparseDist``) runs the next batch's input
  distribution during this one, so only what outlasts the device's iteration is on the
  critical path (:func:`neuroshard.search.scoring.plan_cost`).
* ``fused_uvm_caching``: the shard lives in host memory with an HBM cache of
  ``C = cache_fraction x rows`` rows that keeps the hottest rows (an LFU cache in steady
  state). Per iteration the shard touches ``U = min(R, L / a_bar)`` unique rows (the sim
  backend's unique-row model: ``L`` lookups, ``a_bar`` the reuse histogram's mean accesses
  per unique row). Rows accessed more than once per batch (the histogram's bins above
  (0, 1]) are the same hot rows from batch to batch and fill the cache first; rows
  accessed once are drawn from the table's remaining rows, of which the rest of the cache
  holds its share. Each missed unique row is fetched over the host link and an evicted
  (updated, so dirty) row written back: ``2 x misses x w x 4`` bytes. Hits are served at
  HBM rates by the ordinary compute (the estimator's ``compute_ms`` of the shard).

Latency: each collective a device joins costs one kernel launch (``calls``) plus one
synchronisation step per doubling of its group (``steps``: ``log2`` of the group size).
TorchRec issues one collective per sharding type for all its tables, so the counts are
per type, not per table.

Analytic prices (:func:`analytic_extra_ms`, for estimators without ``extra_ms``): bytes over
``efficiency x`` bandwidth per level, summed over the collectives (they run one after
another); the input all-to-all takes the slower level (both run at once). Bandwidths: the
cluster's ``intra_host_bw_bytes_per_ms`` / ``inter_host_bw_bytes_per_ms`` when given,
else an H100 DGX node's (:data:`DEFAULT_SPEEDS`: NVLink 4 at 450 GB/s and a 400 Gb/s NDR
NIC at 50 GB/s per direction per GPU, PCIe 5.0 x16 at 63 GB/s per direction: NVIDIA's
H100 and DGX H100 datasheets, the PCI-SIG 5.0 specification); efficiency 0.75, 5 us per
launch and per synchronisation step, as the sim backend assumes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from neuroshard.types import (
    BYTES_PER_FLOAT,
    NUM_HIST_BINS,
    Cluster,
    ExtraCosts,
    TableSpec,
    Traffic,
)

if TYPE_CHECKING:
    from neuroshard.types import Plan

INDEX_BYTES = 8
GB_PER_S = 1e9 / 1e3  # bytes per ms in one GB/s

# Representative access count of each reuse-histogram bin: 1 for (0,1], 2 for (1,2], the
# geometric mid-point 2**(k-0.5) of (2**(k-1), 2**k] for the next bins, 2**16 for the last.
BIN_ACCESS_COUNTS: np.ndarray = np.array(
    [1.0, 2.0] + [2.0 ** (k - 0.5) for k in range(2, NUM_HIST_BINS - 1)] + [2.0**16]
)

# Rows of the fixed traffic array (see fixed_traffic): bytes, summed over tables ...
FWD_INTRA, FWD_INTER, BWD_INTRA, BWD_INTER, XH_SEND, XH_RECV = range(6)
# ... and whether the device joins a type's collective (max over tables, not summed).
RW_GROUP, TWRW_HOST, TWRW_CROSS, DP_GROUP = range(6, 10)
NUM_FIXED = 10
_FLAGS = slice(RW_GROUP, NUM_FIXED)

# Sharding types whose output goes through the estimator's pooled all-to-all.
ALLTOALL_TYPES = frozenset({"table_wise", "column_wise"})


def output_values(table: TableSpec, width: int) -> float:
    """Values per sample a shard ``width`` wide outputs: ``width`` pooled, ``width x p`` for a
    sequence table (one vector per id)."""
    return float(width) if table.pooled else width * table.pooling_factor


def zero_fixed(num_devices: int) -> np.ndarray:
    return np.zeros((NUM_FIXED, num_devices))


def fixed_traffic(
    table: TableSpec, sharding_type: str, devices: Sequence[int], cluster: Cluster
) -> np.ndarray:
    """``(NUM_FIXED, N)``: the collectives ``table`` placed as ``sharding_type`` on
    ``devices`` adds (zero for the all-to-all types, whose cost is the estimator's)."""
    n, g, h = cluster.num_devices, cluster.devices_per_host, cluster.num_hosts
    out = zero_fixed(n)
    if sharding_type in ALLTOALL_TYPES or n == 1:
        return out
    pooled_bytes = cluster.batch_size * output_values(table, table.dim) * BYTES_PER_FLOAT
    span_fwd, span_bwd = (FWD_INTER, BWD_INTER) if h > 1 else (FWD_INTRA, BWD_INTRA)
    if sharding_type == "row_wise":
        ring = (n - 1) / n * pooled_bytes
        out[span_fwd] += ring
        out[span_bwd] += ring
        out[RW_GROUP] = 1.0
    elif sharding_type == "table_row_wise":
        host = cluster.host_of(devices[0])
        local = np.asarray(cluster.devices_of_host(host))
        ring = (g - 1) / g * pooled_bytes
        out[FWD_INTRA, local] += ring
        out[BWD_INTRA, local] += ring
        out[TWRW_HOST, local] = 1.0
        if h > 1:
            out[XH_RECV] += pooled_bytes / n
            out[XH_RECV, local] -= pooled_bytes / n
            out[XH_SEND, local] += (h - 1) / h * pooled_bytes / g
            out[TWRW_CROSS] = 1.0
    elif sharding_type == "data_parallel":
        out[span_bwd] += 2 * (n - 1) / n * table.size_bytes
        out[DP_GROUP] = 1.0
    else:
        raise ValueError(f"unknown sharding type {sharding_type!r}")
    return out


def combine(parts: Sequence[np.ndarray], num_devices: int) -> np.ndarray:
    """The fixed traffic of several tables: bytes add up, group memberships do not."""
    out = zero_fixed(num_devices)
    for part in parts:
        out[: _FLAGS.start] += part[: _FLAGS.start]
        np.maximum(out[_FLAGS], part[_FLAGS], out=out[_FLAGS])
    return out


def finish(fixed: np.ndarray, ids: np.ndarray, host_bytes: np.ndarray, cluster: Cluster) -> Traffic:
    """:class:`Traffic` from the fixed traffic ``(..., NUM_FIXED, N)``, the ids each device
    receives ``(..., N)`` and its host-link bytes ``(..., N)``."""
    n, g, h = cluster.num_devices, cluster.devices_per_host, cluster.num_hosts
    fixed = np.asarray(fixed, dtype=float)
    ids = np.asarray(ids, dtype=float)
    xh = np.maximum(fixed[..., XH_SEND, :], fixed[..., XH_RECV, :])
    rw, host, cross, dp = (fixed[..., k, :] for k in (RW_GROUP, TWRW_HOST, TWRW_CROSS, DP_GROUP))
    log_n, log_g, log_h = math.log2(n), math.log2(g), math.log2(h)
    fwd_calls = rw + host + cross
    fwd_steps = rw * log_n + host * log_g + cross * log_h
    # Ids: received from the host's other devices and from other hosts; sent to them.
    host_sum = ids.reshape(*ids.shape[:-1], h, g).sum(axis=-1)
    host_sum = np.repeat(host_sum, g, axis=-1)
    total = ids.sum(axis=-1, keepdims=True)
    recv_intra, recv_inter = ids * (g - 1) / n, ids * (n - g) / n
    send_intra, send_inter = (host_sum - ids) / n, (total - host_sum) / n
    return Traffic(
        fwd_intra_bytes=fixed[..., FWD_INTRA, :],
        fwd_inter_bytes=fixed[..., FWD_INTER, :] + xh,
        bwd_intra_bytes=fixed[..., BWD_INTRA, :],
        bwd_inter_bytes=fixed[..., BWD_INTER, :] + xh,
        fwd_calls=fwd_calls,
        fwd_steps=fwd_steps,
        bwd_calls=fwd_calls + dp,
        bwd_steps=fwd_steps + dp * log_n,
        ids_intra_bytes=np.maximum(recv_intra, send_intra) * INDEX_BYTES,
        ids_inter_bytes=np.maximum(recv_inter, send_inter) * INDEX_BYTES,
        host_bytes=np.asarray(host_bytes, dtype=float),
    )


def unique_rows(view: TableSpec, batch_size: int) -> float:
    """Unique rows a shard (its compute view) touches per batch: ``min(R, L / a_bar)``."""
    hist = np.asarray(view.reuse_hist, dtype=float)
    a_bar = float(hist @ BIN_ACCESS_COUNTS) / max(float(hist.sum()), 1e-300)
    return min(float(view.rows), batch_size * view.pooling_factor / a_bar)


def uvm_miss_rows(view: TableSpec, cache_fraction: float, batch_size: int) -> float:
    """Unique rows per batch a ``fused_uvm_caching`` shard fetches from host memory, with
    ``cache_fraction`` of its rows cached in HBM, hottest first (see the module doc)."""
    touched = unique_rows(view, batch_size)
    hist = np.asarray(view.reuse_hist, dtype=float)
    hist = hist / max(float(hist.sum()), 1e-300)
    cache = cache_fraction * view.rows
    hot = touched * (1.0 - hist[0])  # reused within the batch: the same rows every batch
    cold = touched * hist[0]
    hot_missed = max(0.0, hot - cache)
    left = max(0.0, cache - hot)
    pool = max(view.rows - hot, cold, 1.0)
    cold_missed = cold * (1.0 - min(1.0, left / pool))
    return hot_missed + cold_missed


def uvm_host_bytes(view: TableSpec, cache_fraction: float, batch_size: int) -> float:
    """Bytes a ``fused_uvm_caching`` shard moves over the host link per iteration: each
    missed row fetched and an evicted row written back."""
    return 2.0 * uvm_miss_rows(view, cache_fraction, batch_size) * view.dim * BYTES_PER_FLOAT


def shard_ids(view: TableSpec, sharding_type: str, batch_size: int) -> float:
    """Ids a shard receives per iteration (none for a data-parallel replica)."""
    if sharding_type == "data_parallel":
        return 0.0
    return batch_size * view.pooling_factor


def plan_traffic(plan: Plan) -> Traffic:
    """What ``plan`` moves beyond the pooled all-to-all, as one row ``(1, N)``."""
    cluster = plan.cluster
    n, batch = cluster.num_devices, cluster.batch_size
    by_name = {t.name: t for t in plan.tables}
    kinds = {t.name: plan.sharding_type_of(t.name) for t in plan.tables}
    loads = plan.device_loads()
    ids, host = np.zeros(n), np.zeros(n)
    parts = []
    seen: set[str] = set()
    counts = [0] * n
    for s in plan.shards:
        kind = kinds[s.table]
        view = loads[s.device][counts[s.device]]
        counts[s.device] += 1
        ids[s.device] += shard_ids(view, kind, batch)
        if s.compute_kernel == "fused_uvm_caching":
            host[s.device] += uvm_host_bytes(view, s.cache_fraction or 0.0, batch)
        if kind not in ALLTOALL_TYPES and s.table not in seen:
            seen.add(s.table)
            devices = [x.device for x in plan.shards if x.table == s.table]
            parts.append(fixed_traffic(by_name[s.table], kind, devices, cluster))
    return finish(combine(parts, n)[None], ids[None], host[None], cluster)


@dataclass(frozen=True)
class LinkSpeeds:
    """Bandwidths per direction per device (bytes per ms) and the costs of a collective."""

    intra_bytes_per_ms: float
    inter_bytes_per_ms: float
    host_bytes_per_ms: float
    efficiency: float = 0.75
    host_efficiency: float = 0.75
    launch_ms: float = 0.005
    step_ms: float = 0.005

    def for_cluster(self, cluster: Cluster) -> LinkSpeeds:
        """These speeds with the cluster's own bandwidths where it gives them."""
        return replace(
            self,
            intra_bytes_per_ms=cluster.intra_host_bw_bytes_per_ms or self.intra_bytes_per_ms,
            inter_bytes_per_ms=cluster.inter_host_bw_bytes_per_ms or self.inter_bytes_per_ms,
        )


DEFAULT_SPEEDS = LinkSpeeds(
    intra_bytes_per_ms=450 * GB_PER_S,
    inter_bytes_per_ms=50 * GB_PER_S,
    host_bytes_per_ms=63 * GB_PER_S,
)


def price(traffic: Traffic, speeds: LinkSpeeds) -> ExtraCosts:
    """The ms ``traffic`` costs per device at ``speeds`` (the formulas in the module doc)."""
    intra = speeds.intra_bytes_per_ms * speeds.efficiency
    inter = speeds.inter_bytes_per_ms * speeds.efficiency
    fwd = (
        traffic.fwd_intra_bytes / intra
        + traffic.fwd_inter_bytes / inter
        + traffic.fwd_calls * speeds.launch_ms
        + traffic.fwd_steps * speeds.step_ms
    )
    bwd = (
        traffic.bwd_intra_bytes / intra
        + traffic.bwd_inter_bytes / inter
        + traffic.bwd_calls * speeds.launch_ms
        + traffic.bwd_steps * speeds.step_ms
    )
    inputs = np.maximum(traffic.ids_intra_bytes / intra, traffic.ids_inter_bytes / inter)
    host = traffic.host_bytes / (speeds.host_bytes_per_ms * speeds.host_efficiency)
    return ExtraCosts(fwd, bwd, inputs, host)


def nic_alltoall_ms(
    dim_sums: np.ndarray, cluster: Cluster, speeds: LinkSpeeds = DEFAULT_SPEEDS
) -> np.ndarray:
    """The inter-host part of the pooled all-to-all alone, per device ``(..., N)``: the
    larger of what a device sends to and receives from other hosts (``B / N`` samples of
    its peers' dim sums, 4 bytes a value) over ``efficiency x`` the NIC's bandwidth (the
    cluster's, else ``speeds``'); 0 on one host. A floor under an all-to-all model that
    was trained on one host (see :func:`neuroshard.search.scoring.device_costs`)."""
    dims = np.asarray(dim_sums, dtype=float)
    n, g, h = cluster.num_devices, cluster.devices_per_host, cluster.num_hosts
    if h == 1:
        return np.zeros(dims.shape)
    per_peer = cluster.batch_size / n * BYTES_PER_FLOAT * dims
    host_sum = np.repeat(per_peer.reshape(*dims.shape[:-1], h, g).sum(axis=-1), g, axis=-1)
    send = per_peer * (n - g)
    recv = per_peer.sum(axis=-1, keepdims=True) - host_sum
    bandwidth = speeds.for_cluster(cluster).inter_bytes_per_ms * speeds.efficiency
    return np.maximum(send, recv) / bandwidth


def analytic_extra_ms(
    traffic: Traffic, cluster: Cluster, speeds: LinkSpeeds = DEFAULT_SPEEDS
) -> ExtraCosts:
    """What ``traffic`` costs at the cluster's bandwidths (else ``speeds``'): the price
    of the extra traffic for estimators that have no ``extra_ms`` of their own."""
    return price(traffic, speeds.for_cluster(cluster))

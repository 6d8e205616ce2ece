"""``sim``: an analytic stand-in for a GPU that is not here.

**Nothing in this module is a measurement.** It is a hand-written model of what one GPU's
fused table-batched embedding forward+backward (FP32 weights, exact SGD row update, in
the style of fbgemm's ``SplitTableBatchedEmbeddingBagsCodegen``) and the forward and
backward all-to-all would cost, built from public hardware figures and the assumptions
listed below. It exists so that the whole pipeline (collecting samples, pre-training,
searching, evaluating) runs and is tested without the hardware; its absolute numbers
should not be quoted as GPU timings. Its purpose is to have the *structure* that makes real
costs hard to predict: costs that are not additive over tables and not a function of
dim x pooling alone.

Compute model (one device, one load = its column shards, all in ms)
-------------------------------------------------------------------
For a shard of width ``w``, ``R`` rows, pooling factor ``p``, reuse histogram ``h`` (17
fractions over the access-count bins of :data:`neuroshard.types.HIST_UPPER_EDGES`) and
batch ``B``:

* **Lookups** ``L = B p``. Each bin has a representative access count ``a_k``: 1 for
  (0,1], 2 for (1,2], the geometric mid-point ``2**(k-0.5)`` of (2**(k-1), 2**k] for the
  next bins, and 2**16 for "above 32768". The mean accesses per unique index is
  ``a_bar = sum_k h_k a_k``, and the **unique rows** are ``U = min(R, L / a_bar)``. When
  ``R`` caps ``U``, every row's count is scaled up by ``s = L / (a_bar U)`` so that the
  bins still account for all ``L`` lookups.
* **Row classes.** Bin ``k`` of a shard is a class of ``u_k = U h_k`` rows, each accessed
  ``heat_k = s a_k`` times (``n_k = u_k heat_k`` accesses).
* **Bytes per row.** HBM and L2 move 32-byte sectors, so a row costs
  ``row_bytes = ceil(4 w / 32) * 32`` bytes (a 4-wide row still reads 32 B).
* **Shared L2.** All shards on the device compete for ``l2_bytes x l2_usable_fraction``
  of cache. Classes of all shards are ranked by ``heat`` (hottest first; ties by narrower
  rows first) and fill the capacity with their footprint ``u_k x row_bytes``; the class at
  the boundary is cached in part. The first touch of every row comes from HBM; repeat
  accesses of a cached class are served by L2, the rest by HBM. So a hot table added to a
  device evicts the others' rows and slows them: costs are not additive.
* **Forward gather.** Bandwidth time
  ``pen(w) x (hbm_bytes / (hbm_bw x gather_efficiency) + l2_bytes / l2_bw)`` and row-rate
  time ``hbm_rows / hbm_row_rate + l2_rows / l2_row_rate``, each summed over the device's
  shards (one fused kernel keeps all tables in flight at once), then combined by a smooth
  maximum ``(x**4 + y**4)**0.25``. The row rates are the rows in flight
  (``sm_count x warps_per_sm x rows_in_flight_per_warp``) over the memory latency, so
  narrow tables are latency-bound. ``pen(w) = 1 + small_dim_penalty x (1 - min(w, 128) /
  128)`` echoes warps whose 32 lanes x 4 floats are under-used below 128 columns. The HBM
  terms (bytes and rows) are also scaled by ``1 + footprint_penalty x log2(1 + R x
  row_bytes / footprint_base_bytes)``: random rows spread over a bigger table find fewer
  open DRAM pages and miss the TLB more, so rows matter even when they leave ``U`` alone.
* **Forward streams** at ``hbm_bw x stream_efficiency``: the pooled output write
  ``B x sum(w) x 4`` bytes and the index read ``L x 8`` bytes. A sequence table
  (``pooled=False``, TorchRec's ``EmbeddingCollection``) writes one row per id, not per
  sample: its output (and output gradient) is ``L x w x 4`` bytes.
* **Backward gather of output gradients.** Each lookup reads its bag's gradient row
  (``row_bytes``) from the ``B x sum(w) x 4``-byte gradient of the device's pooled output.
  The fraction of that gradient that fits the usable L2 is read at L2 rates, the rest at
  HBM gather rates (wide devices spill it; another non-additive term).
* **Backward row update.** Exact SGD reads and writes each *unique* row once:
  ``2 U`` random rows of ``row_bytes`` at HBM gather rates, with the same row-rate limit,
  footprint scaling and smooth maximum as above.
* **Backward streams**: one read of the output gradient, the index read, and the index
  sort/dedup, ``sort_bytes_per_lookup`` bytes per lookup (8 radix passes over a 64-bit
  key with a 32-bit value, each reading and writing them: 8 x 2 x 12 = 192 B).
* **Overheads**: ``kernel_launch_ms x (fwd_kernels + bwd_kernels)`` (1 forward kernel;
  4 backward: linearise, sort, run-length encode, update) plus ``per_table_ms`` per shard.
* An **empty device** costs 0.

All-to-all model (per device, ms)
---------------------------------
With ``N`` devices and dim sums ``D``, device ``d`` holds the pooled outputs of the global
batch for its columns, ``B D_d 4`` bytes; it keeps ``1/N`` and sends ``B D_d 4 / N`` to each
peer, and receives ``B D_j 4 / N`` from each peer ``j``. Devices ``d // gpus_per_host`` share
a host. Transfers to peers on the same host use NVLink (``nvlink_bytes_per_ms`` per
direction), to peers on other hosts the per-GPU InfiniBand NIC; the two run at once, each
at ``alltoall_efficiency`` of its peak, and each takes ``max(send, recv) / bandwidth``
(sending and receiving use opposite directions of the link). Time = the slower of the
two + ``alpha_intra_ms`` per same-host peer + ``alpha_inter_ms`` per remote peer +
``sync_ms x log2(N)`` + one kernel launch. The backward all-to-all sends the gradients the
reverse way; ``max(send, recv)`` is symmetric, so it costs the same as the forward one
without the wait. The **forward** all-to-all of device ``d`` also includes waiting for the
stragglers, ``max_j waits_j - waits_d``, where ``waits`` says how late each device reached
the collective. One device has no all-to-all: 0 (plus its wait, which is 0).

Topology: called directly, the backend takes ``gpus_per_host`` from its profile (8). Plans
are priced through :meth:`SimBackend.for_cluster`, which takes the cluster's
``devices_per_host`` and, when the cluster gives them, its intra- and inter-host
bandwidths per direction, so the same dims cost more when a host boundary cuts the
all-to-all.

The other sharding types and kernels (:meth:`SimBackend.extra_ms`)
-------------------------------------------------------------------
Row-wise and table-row-wise reduce-scatters and all-gathers, the cross-host all-to-all
of table-row-wise tables, the data-parallel all-reduce, the input all-to-all of ids and
``fused_uvm_caching`` misses: their bytes per device are worked out, with their sources,
in :mod:`neuroshard.traffic`; the sim prices them with :func:`neuroshard.traffic.price`
on this profile's links: bytes over ``alltoall_efficiency`` x NVLink or NIC bandwidth per
direction (a ring that spans hosts runs at the NIC's speed), plus ``kernel_launch_ms`` per
collective and ``sync_ms`` per doubling of its group; host-link bytes over
``host_link_efficiency`` x the host link. A row block's compute is the compute of its
view (:meth:`~neuroshard.types.TableSpec.shard_view`): its rows, and lookups and unique
rows in proportion to its share of the ids; a data-parallel replica looks up
``1 / N`` of the table's ids; a ``fused_uvm_caching`` shard computes as in HBM (hits at
HBM rates) and its misses cross the host link.

Noise
-----
With ``noise = sigma > 0`` every transfer or compute time is multiplied by
``exp(sigma z)``, ``z`` standard normal from ``numpy.random.default_rng(seed)`` held by the
backend (successive calls differ; the sequence is reproducible from ``seed``). The
straggler wait is added after the noise. ``Timing.spread`` reports ``sigma`` (the
relative spread a real backend would report as ``(p75 - p25) / median``; for a lognormal
it is about ``1.35 sigma``, we report the level itself) and ``repeats = 1``. With
``noise = 0`` everything is deterministic.

Constants and their sources
---------------------------
Per profile (``v100`` = V100 SXM2, ``a100`` = A100 SXM4 40 GB, ``h100`` = H100 SXM5,
``h200`` = H200 SXM; ``gh200`` below):

* HBM bandwidth 900 GB/s, 1,555 GB/s, 3.35 TB/s, 4.8 TB/s; HBM capacity 32, 40, 80,
  141 GB; L2 size 6 MB, 40 MB, 50 MB; SM count 80, 108, 132, 132: NVIDIA's V100, A100,
  H100 and H200 datasheets and architecture whitepapers. H200 is H100's GH100 die with
  HBM3e: the same SMs and L2 design. Its L2 is taken as 60 MB, the size PyTorch reports
  (``torch.cuda.get_device_properties(0).L2_cache_size``) on the H200 this project
  measures on; its copy bandwidth measured there is about 4.3 TB/s, 0.9 of the 4.8 TB/s
  peak, in line with the stream efficiency below.
* L2 bandwidth (approximate; the least certain hardware figure here): 2.1 TB/s for V100,
  the order of the L2 throughput measured by Jia et al., "Dissecting the NVIDIA Volta GPU
  Architecture via Microbenchmarking" (arXiv 1804.06826, 2018); 5.0 TB/s for A100, V100's
  figure times the 2.3x L2 read bandwidth NVIDIA's A100 whitepaper claims over V100;
  7.0 TB/s for H100 and H200, an assumption (NVIDIA publishes no figure; third-party
  microbenchmarks such as Chips and Cheese's 2023 H100 article report several TB/s).
* NVLink per GPU 300, 600, 900, 900 GB/s bidirectional (NVLink 2, 3, 4, 4; NVIDIA
  datasheets), so 150, 300, 450, 450 GB/s per direction. Inter-host 100, 200, 400,
  400 Gb/s InfiniBand per GPU (EDR, HDR, NDR, NDR, as in DGX-class systems): 12.5, 25,
  50, 50 GB/s per direction. ``gpus_per_host = 8``.
* 64 resident warps per SM: CUDA's limit for compute capability 7.0, 8.0 and 9.0.
* Kernel launch ~5 us: the usual order of CUDA launch overhead.
* Host link per direction: PCIe 3.0, 4.0, 5.0, 5.0 x16 for V100, A100, H100, H200
  (15.75, 31.5, 63, 63 GB/s: 8, 16, 32 GT/s per lane with 128b/130b coding, PCI-SIG
  specifications). ``gh200`` (Grace Hopper superchip, 96 GB HBM3 at 4 TB/s, the H100's
  SMs and L2; NVIDIA's GH200 datasheet) reaches host memory over NVLink-C2C, 900 GB/s
  bidirectional, 450 GB/s per direction.

Modelling assumptions (same on every profile, not published figures): gather efficiency 0.5
of peak HBM for random rows, stream efficiency 0.85; host-link efficiency 0.75; usable L2
fraction 0.5 (A100 and H100 split L2 into two partitions, and the cache also holds indices,
outputs and gradients); 2 rows in flight per warp; loaded HBM latency 600 ns and L2 latency
250 ns; small-dim penalty 0.5; footprint penalty 0.05 per doubling over 32 MiB; 3 us per
table; 192 sort bytes per lookup; 8-byte indices; all-to-all efficiency 0.75; 2 us per
same-host peer, 6 us per remote peer, 5 us per log2(N) synchronisation step; smooth-max
power 4.

Reference figures (batch 65,536, noise 0, default DLRM reuse histogram)
-----------------------------------------------------------------------
==========================================  =========  =========  =========  =========
case                                        v100       a100       h100       h200
==========================================  =========  =========  =========  =========
1M rows x 128, pooling 10, compute (ms)     1.63       0.66       0.32       0.24
the same table at width 32 / 4 (ms)         0.58/0.27  0.25/0.17  0.14/0.10  0.12/0.09
5M rows x 128, pooling 50, compute (ms)     8.59       3.47       1.58       1.14
both tables on one device (ms)              10.54      4.93       2.30       1.64
all-to-all, 4 devices x 1000 columns (ms)   1.77       0.90       0.60       0.60
all-to-all, 8 devices x 500 columns (ms)    1.05       0.54       0.37       0.37
all-to-all, 16 devices x 500 columns (ms)   7.08       3.58       1.84       1.84
==========================================  =========  =========  =========  =========

The two tables together cost more than apart (shared L2); 16 devices span two hosts, so
their all-to-all is bound by InfiniBand. H200's all-to-alls equal H100's: same NVLink
and NIC.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from neuroshard.traffic import BIN_ACCESS_COUNTS, LinkSpeeds, price
from neuroshard.types import (
    BYTES_PER_FLOAT,
    DEFAULT_BATCH_SIZE,
    DLRM_REUSE_HIST,
    NUM_HIST_BINS,
    Cluster,
    ExtraCosts,
    TableSpec,
    Timing,
    Traffic,
    UnknownNameError,
)

logger = logging.getLogger(__name__)

GB_PER_S = 1e9 / 1e3  # bytes per ms in one GB/s
GBIT_PER_S = GB_PER_S / 8


@dataclass(frozen=True)
class SimProfile:
    """Constants of one simulated GPU (sources in the module doc). Bandwidths in bytes/ms."""

    name: str
    hbm_bytes_per_ms: float
    hbm_capacity_bytes: int
    l2_bytes: int
    l2_bytes_per_ms: float
    sm_count: int
    nvlink_bytes_per_ms: float  # per direction, per GPU
    inter_host_bytes_per_ms: float  # per direction, per GPU
    host_link_bytes_per_ms: float  # GPU <-> host memory, per direction
    gpus_per_host: int = 8
    warps_per_sm: int = 64
    kernel_launch_ms: float = 0.005
    # modelling assumptions
    hbm_latency_ns: float = 600.0
    l2_latency_ns: float = 250.0
    rows_in_flight_per_warp: float = 2.0
    gather_efficiency: float = 0.5
    stream_efficiency: float = 0.85
    l2_usable_fraction: float = 0.5
    sector_bytes: int = 32
    full_warp_width: int = 128
    small_dim_penalty: float = 0.5
    footprint_penalty: float = 0.05
    footprint_base_bytes: int = 32 * (1 << 20)
    per_table_ms: float = 0.003
    fwd_kernels: int = 1
    bwd_kernels: int = 4
    index_bytes: int = 8
    sort_bytes_per_lookup: float = 192.0
    alltoall_efficiency: float = 0.75
    host_link_efficiency: float = 0.75
    alpha_intra_ms: float = 0.002
    alpha_inter_ms: float = 0.006
    sync_ms: float = 0.005
    overlap_power: float = 4.0

    @property
    def hbm_rows_per_ms(self) -> float:
        """Random rows the GPU can have answered by HBM per ms (rows in flight / latency)."""
        return self._rows_in_flight() / (self.hbm_latency_ns * 1e-6)

    @property
    def l2_rows_per_ms(self) -> float:
        return self._rows_in_flight() / (self.l2_latency_ns * 1e-6)

    @property
    def l2_cache_usable_bytes(self) -> float:
        return self.l2_bytes * self.l2_usable_fraction

    def _rows_in_flight(self) -> float:
        return self.sm_count * self.warps_per_sm * self.rows_in_flight_per_warp


_MB = 1 << 20
PROFILES: dict[str, SimProfile] = {
    "v100": SimProfile(
        name="v100",
        hbm_bytes_per_ms=900 * GB_PER_S,
        hbm_capacity_bytes=32 * 10**9,
        l2_bytes=6 * _MB,
        l2_bytes_per_ms=2100 * GB_PER_S,
        sm_count=80,
        nvlink_bytes_per_ms=150 * GB_PER_S,
        inter_host_bytes_per_ms=100 * GBIT_PER_S,
        host_link_bytes_per_ms=15.75 * GB_PER_S,
    ),
    "a100": SimProfile(
        name="a100",
        hbm_bytes_per_ms=1555 * GB_PER_S,
        hbm_capacity_bytes=40 * 10**9,
        l2_bytes=40 * _MB,
        l2_bytes_per_ms=5000 * GB_PER_S,
        sm_count=108,
        nvlink_bytes_per_ms=300 * GB_PER_S,
        inter_host_bytes_per_ms=200 * GBIT_PER_S,
        host_link_bytes_per_ms=31.5 * GB_PER_S,
    ),
    "h100": SimProfile(
        name="h100",
        hbm_bytes_per_ms=3350 * GB_PER_S,
        hbm_capacity_bytes=80 * 10**9,
        l2_bytes=50 * _MB,
        l2_bytes_per_ms=7000 * GB_PER_S,
        sm_count=132,
        nvlink_bytes_per_ms=450 * GB_PER_S,
        inter_host_bytes_per_ms=400 * GBIT_PER_S,
        host_link_bytes_per_ms=63 * GB_PER_S,
    ),
    "h200": SimProfile(
        name="h200",
        hbm_bytes_per_ms=4800 * GB_PER_S,
        hbm_capacity_bytes=141 * 10**9,
        l2_bytes=60 * _MB,
        l2_bytes_per_ms=7000 * GB_PER_S,
        sm_count=132,
        nvlink_bytes_per_ms=450 * GB_PER_S,
        inter_host_bytes_per_ms=400 * GBIT_PER_S,
        host_link_bytes_per_ms=63 * GB_PER_S,
    ),
    "gh200": SimProfile(
        name="gh200",
        hbm_bytes_per_ms=4000 * GB_PER_S,
        hbm_capacity_bytes=96 * 10**9,
        l2_bytes=50 * _MB,
        l2_bytes_per_ms=7000 * GB_PER_S,
        sm_count=132,
        nvlink_bytes_per_ms=450 * GB_PER_S,
        inter_host_bytes_per_ms=400 * GBIT_PER_S,
        host_link_bytes_per_ms=450 * GB_PER_S,
    ),
}


def profile_names() -> list[str]:
    return sorted(PROFILES)


def get_profile(profile: str | SimProfile) -> SimProfile:
    if isinstance(profile, SimProfile):
        return profile
    if profile not in PROFILES:
        raise UnknownNameError(
            f"unknown sim profile {profile!r}; valid: {', '.join(profile_names())}"
        )
    return PROFILES[profile]


class _Shards:
    """The shards of a batch of loads as flat arrays (one entry per shard)."""

    __slots__ = ("load", "width", "rows", "pooling", "pooled", "hist", "num_loads")

    def __init__(self, loads: Sequence[Sequence[TableSpec]]):
        hist_index: dict[tuple[float, ...], int] = {}
        load_ids: list[int] = []
        width: list[int] = []
        rows: list[int] = []
        pooling: list[float] = []
        pooled: list[bool] = []
        hist_ids: list[int] = []
        for i, load in enumerate(loads):
            for t in load:
                load_ids.append(i)
                width.append(t.dim)
                rows.append(t.rows)
                pooling.append(t.pooling_factor)
                pooled.append(t.pooled)
                key = t.reuse_hist if isinstance(t.reuse_hist, tuple) else tuple(t.reuse_hist)
                hist_ids.append(hist_index.setdefault(key, len(hist_index)))
        self.num_loads = len(loads)
        self.load = np.asarray(load_ids, dtype=np.int64)
        self.width = np.asarray(width, dtype=float)
        self.rows = np.asarray(rows, dtype=float)
        self.pooling = np.asarray(pooling, dtype=float)
        self.pooled = np.asarray(pooled, dtype=bool)
        if hist_index:
            table = np.asarray(list(hist_index), dtype=float).reshape(-1, NUM_HIST_BINS)
            sums = table.sum(axis=1, keepdims=True)
            table = np.where(
                sums > 0, table / np.where(sums > 0, sums, 1.0), np.asarray(DLRM_REUSE_HIST)
            )
            self.hist = table[np.asarray(hist_ids, dtype=np.int64)]
        else:
            self.hist = np.zeros((0, NUM_HIST_BINS))

    def per_load(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self.load, weights=values, minlength=self.num_loads)


class SimBackend:
    """Simulated GPU: a :class:`~neuroshard.types.HardwareBackend` and a batched
    :class:`~neuroshard.types.CostEstimator` at once. See the module doc for the model."""

    name = "sim"

    def __init__(
        self,
        profile: str | SimProfile = "h100",
        batch_size: int = DEFAULT_BATCH_SIZE,
        noise: float = 0.0,
        seed: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.profile = get_profile(profile)
        self.batch_size = int(batch_size)
        self.noise = float(noise)
        self.seed = int(seed)
        self._rng = np.random.default_rng(seed)
        logger.debug("simulated backend %r (a model, not a measurement)", self)

    def __repr__(self) -> str:
        return (
            f"SimBackend(profile={self.profile.name!r}, batch_size={self.batch_size}, "
            f"noise={self.noise}, seed={self.seed})"
        )

    # ----------------------------------------------------------------- CostEstimator

    def compute_ms(self, loads: Sequence[Sequence[TableSpec]]) -> np.ndarray:
        """Fused forward+backward of each load, shape ``(len(loads),)``."""
        out = self._compute_ms(_Shards(loads))
        return self._noisy(out)

    def bwd_comm_ms(self, dim_sums: np.ndarray) -> np.ndarray:
        """Backward all-to-all per device, ``dim_sums.shape``."""
        return self._noisy(self._alltoall_ms(dim_sums))

    def fwd_comm_ms(self, dim_sums: np.ndarray, waits_ms: np.ndarray) -> np.ndarray:
        """Forward all-to-all per device plus the wait for stragglers, ``dim_sums.shape``."""
        base = self._noisy(self._alltoall_ms(dim_sums))
        waits = np.asarray(waits_ms, dtype=float).reshape(base.shape)
        return base + (waits.max(axis=-1, keepdims=True) - waits)

    def for_cluster(self, cluster: Cluster) -> SimBackend:
        """This backend on ``cluster``'s topology: its hosts (``devices_per_host``) and,
        where it gives them, its bandwidths per direction; the noise stream is shared."""
        profile = replace(
            self.profile,
            gpus_per_host=cluster.devices_per_host,
            nvlink_bytes_per_ms=cluster.intra_host_bw_bytes_per_ms
            or self.profile.nvlink_bytes_per_ms,
            inter_host_bytes_per_ms=cluster.inter_host_bw_bytes_per_ms
            or self.profile.inter_host_bytes_per_ms,
        )
        if profile == self.profile:
            return self
        bound = SimBackend(profile, self.batch_size, self.noise, self.seed)
        bound._rng = self._rng
        return bound

    def extra_ms(self, traffic: Traffic) -> ExtraCosts:
        """What the other sharding types and kernels move, priced on this profile's links
        (:func:`neuroshard.traffic.price` with its NVLink, NIC and host-link bandwidths,
        all-to-all efficiency, launch and synchronisation costs), with noise."""
        prof = self.profile
        speeds = LinkSpeeds(
            prof.nvlink_bytes_per_ms,
            prof.inter_host_bytes_per_ms,
            prof.host_link_bytes_per_ms,
            prof.alltoall_efficiency,
            prof.host_link_efficiency,
            prof.kernel_launch_ms,
            prof.sync_ms,
        )
        return ExtraCosts(
            *(self._noisy(np.asarray(x, dtype=float)) for x in price(traffic, speeds))
        )

    # ----------------------------------------------------------------- HardwareBackend

    def measure_compute(self, load: Sequence[TableSpec]) -> Timing:
        return Timing(float(self.compute_ms([load])[0]), self.noise, 1)

    def measure_comm(
        self, dim_sums: Sequence[int], waits_ms: Sequence[float]
    ) -> tuple[list[Timing], list[Timing]]:
        d = np.asarray([dim_sums], dtype=float)
        fwd = self.fwd_comm_ms(d, np.asarray([waits_ms], dtype=float))[0]
        bwd = self.bwd_comm_ms(d)[0]
        return (
            [Timing(float(x), self.noise, 1) for x in fwd],
            [Timing(float(x), self.noise, 1) for x in bwd],
        )

    def fingerprint(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "profile": self.profile.name,
            "constants": asdict(self.profile),
            "batch_size": self.batch_size,
            "noise": self.noise,
            "seed": self.seed,
            "simulated": True,
        }

    # ----------------------------------------------------------------- model

    def reseed(self, token: str) -> None:
        """Draw the next noise from a stream of (``seed``, ``token``): collection passes each
        sample's key, so a sample's noise does not depend on what was measured before it (a
        resumed collection draws what an uninterrupted one would)."""
        digest = hashlib.sha256(token.encode()).digest()
        self._rng = np.random.default_rng([self.seed, int.from_bytes(digest[:8], "little")])

    def _noisy(self, values: np.ndarray) -> np.ndarray:
        if self.noise <= 0.0:
            return values
        return values * np.exp(self.noise * self._rng.standard_normal(values.shape))

    def _smooth_max(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        p = self.profile.overlap_power
        scale = np.maximum(np.maximum(x, y), 1e-300)
        return scale * ((x / scale) ** p + (y / scale) ** p) ** (1.0 / p)

    def _compute_ms(self, sh: _Shards) -> np.ndarray:
        prof = self.profile
        out = np.zeros(sh.num_loads)
        if sh.load.size == 0:
            return out
        batch = float(self.batch_size)
        hbm_gather = prof.hbm_bytes_per_ms * prof.gather_efficiency
        hbm_stream = prof.hbm_bytes_per_ms * prof.stream_efficiency
        cache_bytes = prof.l2_cache_usable_bytes

        lookups = batch * sh.pooling  # (S,)
        a_bar = sh.hist @ BIN_ACCESS_COUNTS
        unique = np.minimum(sh.rows, lookups / a_bar)
        scale = np.divide(lookups, a_bar * unique, out=np.ones_like(lookups), where=unique > 0)
        row_bytes = np.ceil(sh.width * BYTES_PER_FLOAT / prof.sector_bytes) * prof.sector_bytes
        # Random rows over a bigger footprint find fewer open DRAM pages and more TLB misses.
        spread = 1.0 + prof.footprint_penalty * np.log2(
            1.0 + sh.rows * row_bytes / prof.footprint_base_bytes
        )
        penalty = 1.0 + prof.small_dim_penalty * (
            1.0 - np.minimum(sh.width, prof.full_warp_width) / prof.full_warp_width
        )

        # Row classes (shard, bin): rows, accesses per row, footprint.
        cls_rows = unique[:, None] * sh.hist  # (S, 17)
        heat = scale[:, None] * BIN_ACCESS_COUNTS[None, :]
        repeats = cls_rows * (heat - 1.0)  # accesses after the first touch
        footprint = cls_rows * row_bytes[:, None]
        cached = self._cached_fraction(
            sh, heat, footprint, cache_bytes, (row_bytes, sh.width, sh.rows)
        )
        l2_rows = (repeats * cached).sum(axis=1)
        hbm_rows = unique + (repeats * (1.0 - cached)).sum(axis=1)

        # Forward gather (bandwidth vs row rate, whole device), then streams.
        fwd_bw = sh.per_load(
            penalty * row_bytes * (spread * hbm_rows / hbm_gather + l2_rows / prof.l2_bytes_per_ms)
        )
        fwd_rate = sh.per_load(
            spread * hbm_rows / prof.hbm_rows_per_ms + l2_rows / prof.l2_rows_per_ms
        )
        # A pooled table writes one row per sample; a sequence table one row per id.
        out_bytes = np.where(sh.pooled, batch, lookups) * sh.width * BYTES_PER_FLOAT
        index_bytes = lookups * prof.index_bytes
        fwd = self._smooth_max(fwd_bw, fwd_rate) + sh.per_load(out_bytes + index_bytes) / hbm_stream

        # Backward: gradient-row gather (L2 share set by the device's gradient size),
        # unique-row SGD update, streams (gradient read, indices, sort).
        grad_bytes = sh.per_load(out_bytes)
        grad_cached = np.minimum(1.0, cache_bytes / np.maximum(grad_bytes, 1.0))[sh.load]
        g_l2, g_hbm = lookups * grad_cached, lookups * (1.0 - grad_cached)
        upd_rows = 2.0 * unique
        bwd_bw = sh.per_load(
            penalty
            * row_bytes
            * ((g_hbm + spread * upd_rows) / hbm_gather + g_l2 / prof.l2_bytes_per_ms)
        )
        bwd_rate = sh.per_load(
            (g_hbm + spread * upd_rows) / prof.hbm_rows_per_ms + g_l2 / prof.l2_rows_per_ms
        )
        bwd_stream = out_bytes + index_bytes + lookups * prof.sort_bytes_per_lookup
        bwd = self._smooth_max(bwd_bw, bwd_rate) + sh.per_load(bwd_stream) / hbm_stream

        count = np.bincount(sh.load, minlength=sh.num_loads)
        overhead = (
            prof.kernel_launch_ms * (prof.fwd_kernels + prof.bwd_kernels)
            + prof.per_table_ms * count
        )
        return np.where(count > 0, fwd + bwd + overhead, 0.0)

    @staticmethod
    def _cached_fraction(
        sh: _Shards,
        heat: np.ndarray,
        footprint: np.ndarray,
        cache_bytes: float,
        tie_keys: tuple[np.ndarray, ...],
    ) -> np.ndarray:
        """Fraction of each row class held in the device's shared L2: the classes of all
        shards on a device fill the cache hottest first. Ties in heat are broken by
        narrower rows, then by width and rows, so that classes left tied cost the same per
        miss and the device's total does not depend on the order of its shards."""
        n_bins = heat.shape[1]
        load = np.repeat(sh.load, n_bins)
        fp = footprint.ravel()
        keys = tuple(np.repeat(k, n_bins) for k in reversed(tie_keys))
        order = np.lexsort(keys + (-heat.ravel(), load))
        fp_sorted = fp[order]
        cum = np.cumsum(fp_sorted)
        load_sorted = load[order]
        # Footprint of hotter classes on the same device = cumsum before, minus the
        # cumsum at the start of this device's segment.
        starts = np.searchsorted(load_sorted, np.arange(sh.num_loads), side="left")
        seg_base = np.concatenate(([0.0], cum))[starts][load_sorted]
        before = cum - fp_sorted - seg_base
        frac_sorted = np.clip(
            np.divide(
                cache_bytes - before, fp_sorted, out=np.ones_like(fp_sorted), where=fp_sorted > 0
            ),
            0.0,
            1.0,
        )
        frac = np.empty_like(frac_sorted)
        frac[order] = frac_sorted
        return frac.reshape(heat.shape)

    def _alltoall_ms(self, dim_sums: np.ndarray) -> np.ndarray:
        prof = self.profile
        d = np.asarray(dim_sums, dtype=float)
        n = d.shape[-1]
        if n <= 1:
            return np.zeros(d.shape)
        host = np.arange(n) // prof.gpus_per_host
        same = host[:, None] == host[None, :]
        local = same & ~np.eye(n, dtype=bool)  # peers on the same host
        remote = ~same
        per_peer = self.batch_size / n * BYTES_PER_FLOAT * d  # bytes to each peer, (B, N)
        n_local, n_remote = local.sum(axis=1), remote.sum(axis=1)
        send_local, send_remote = per_peer * n_local, per_peer * n_remote
        recv_local, recv_remote = per_peer @ local.T, per_peer @ remote.T
        t_local = np.maximum(send_local, recv_local) / (
            prof.nvlink_bytes_per_ms * prof.alltoall_efficiency
        )
        t_remote = np.maximum(send_remote, recv_remote) / (
            prof.inter_host_bytes_per_ms * prof.alltoall_efficiency
        )
        latency = (
            prof.alpha_intra_ms * n_local
            + prof.alpha_inter_ms * n_remote
            + prof.sync_ms * math.log2(n)
            + prof.kernel_launch_ms
        )
        return np.maximum(t_local, t_remote) + latency

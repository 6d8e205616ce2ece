"""The neural cost model.

:class:`NeuralCostModel` implements :class:`~neuroshard.types.CostEstimator` with three
small nets:

* **compute** -- each shard's 20 features (:mod:`neuroshard.features`; reuse bins
  centred, the log-scaled dim, pooling and rows standardised)
  through a per-table MLP (20 -> 128 -> 32, ReLU), summed over the device's shards, then a
  head MLP (32 -> 64 -> 1). The sum makes a device's cost the head of a sum of cached
  per-shard embeddings: :meth:`~NeuralCostModel.shard_embeddings` and
  :meth:`~NeuralCostModel.compute_from_embeddings` expose that to the search.
* **backward comm** and **forward comm** -- permutation-equivariant over devices, so one
  model serves any device count: each device's input (its dim sum over a scale, ``1/N``,
  and for forward its wait minus the smallest wait over a scale) goes through a shared
  encoder; the mean and max of the encodings over devices form a context; a shared head
  maps ``[encoding, context]`` to that device's cost.

**Range inputs** (``range_inputs=True``, recorded as ``architecture.inputs`` =
:data:`~neuroshard.features.RANGE_INPUTS`): one model serves any batch and cluster.

* Compute: each shard also gets the batch-scaled columns of
  :func:`~neuroshard.features.batch_features` (lookups, unique rows and output bytes at
  the global batch ``B``).
* Comm: each device's inputs come from the traffic of the plan on the topology, not
  from one device count's pattern: with ``N`` devices, ``n_h`` of them on its host and
  ``b_d = B x dim_sum_d x 4`` bytes of pooled output, it sends ``b_d (n_h - 1) / N``
  inside its host and ``b_d (N - n_h) / N`` across hosts, and receives ``sum_j b_j / N``
  over its host peers and over remote devices. The larger of send and receive over each
  link's bandwidth gives two times (ms); their logs, ``log10(1 + b_d / 1e6)``,
  ``log2 N``, ``log2 n_h`` and ``log2(N / n_h)`` (and the wait gap for forward) are the
  device's inputs to the same permutation-equivariant nets.
* The batch and topology are bound with :meth:`NeuralCostModel.for_cluster` (the scoring
  path calls it for every plan) or :meth:`NeuralCostModel.for_batch`; unbound, the model
  prices ``batch_size`` on hosts of the profile's ``gpus_per_host`` at its bandwidths.

**Uncertainty.** With ``compute_members = K > 1`` the compute members' spread (standard
deviation of their predictions of ``log(ms + eps_ms)``) is each load's uncertainty
(:meth:`NeuralCostModel.compute_spread`); with ``conservative_k = k > 0`` a load is
priced at ``exp(mean + k x spread)`` in that log space, so a search that seeks loads the
members disagree on (far from the training data) pays for them. ``k`` is recorded in
meta.json; :meth:`NeuralCostModel.with_conservative` changes it on a loaded model.

Targets are ``log(ms + eps_ms)`` standardised (``eps_ms`` = 1e-3): MSE on a log scale
fits relative error, which is what MAPE and plan ranking care about. The forward comm
target is, by default (``fwd_target="residual"``), the forward time *minus the straggler
wait* ``max_j waits_j - waits_d``: the estimator contract says the forward all-to-all
includes that wait, so it is added back exactly rather than learned, and predictions stay
sane for waits longer than any seen in training. Inference runs in
numpy on the extracted weights, which is cheaper than torch for the small batches a
search sends.

A model directory holds ``compute.pt`` and ``comm.pt`` (state_dicts, loaded with
``weights_only=True``) and ``meta.json`` (kind, feature schema, backend and its
fingerprint, batch size, training-data hash, sample counts, metrics, normalisation
constants, file checksums) written through :mod:`neuroshard.models.base`; the registry
(:func:`neuroshard.models.load_cost_model`) loads it by its kind, ``"neural"``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from neuroshard.features import (
    NUM_BATCH_FEATURES,
    NUM_FEATURES,
    RANGE_INPUTS,
    batch_features,
    raw_features,
    transform_raw,
)
from neuroshard.models.base import (
    META_FILE,
    TARGET_TRANSFORM,
    CostModelBase,
    atomic_write,
    checked_file,
    read_meta,
    since_first,
    straggler_wait,
)
from neuroshard.samples import CommData, ComputeData, Split
from neuroshard.types import (
    BYTES_PER_FLOAT,
    NUM_HIST_BINS,
    Cluster,
    ModelFileError,
    ModelMismatchError,
    TableSpec,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from neuroshard.models.training import Dense, Ragged, TrainFn

COMPUTE_FILE = "compute.pt"
COMM_FILE = "comm.pt"
FWD_TARGETS = ("residual", "total")

logger = logging.getLogger(__name__)

TABLE_INPUTS = "table20"
RANGE_COMM_INPUTS = {"bwd": 6, "fwd": 7}
# A range model's compute head reads sign(s) log(1 + |s|) of the summed embeddings ``s``:
# loads of 1 to hundreds of shards span a 100x range of sums, and a cost that grows about
# linearly with the shards is then a gentle function of the head's input.
SQUASHED_SUM = "signed_log1p"
_T_FLOOR_MS = 1e-4  # added to link times before their log

__all__ = [
    "COMM_FILE",
    "COMPUTE_FILE",
    "FWD_TARGETS",
    "CommContext",
    "NeuralCostModel",
    "build_nets",
]


@dataclass(frozen=True)
class CommContext:
    """What a range model's comm (and compute) inputs need beyond the dim sums: the global
    batch, devices per host and the per-direction bandwidths (bytes/ms) in and across hosts."""

    batch_size: float
    devices_per_host: int
    intra_host_bytes_per_ms: float
    inter_host_bytes_per_ms: float

    def as_row(self) -> np.ndarray:
        return np.array(
            [
                self.batch_size,
                self.devices_per_host,
                self.intra_host_bytes_per_ms,
                self.inter_host_bytes_per_ms,
            ]
        )


def link_times_ms(dim_sums: np.ndarray, mask: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """Per device ``(B, N, 5)``: its all-to-all time inside and across hosts (the larger
    of send and receive over each link's bandwidth, ms), its output bytes, the devices
    on its host, and the device count. ``ctx`` is ``(B, 4)`` rows of
    :meth:`CommContext.as_row`; device ``d`` is on host ``d // devices_per_host``."""
    d = np.where(mask, np.asarray(dim_sums, dtype=np.float64), 0.0)
    b, n_max = d.shape
    ctx = np.broadcast_to(np.asarray(ctx, dtype=np.float64).reshape(-1, 4), (b, 4))
    batch, per_host = ctx[:, :1], np.maximum(ctx[:, 1:2].astype(np.int64), 1)
    n = mask.sum(axis=1, keepdims=True).clip(min=1).astype(np.float64)
    out_bytes = batch * BYTES_PER_FLOAT * d
    host = np.arange(n_max)[None, :] // per_host  # (B, N)
    flat = (np.arange(b)[:, None] * n_max + host).ravel()
    host_bytes = np.bincount(flat, weights=out_bytes.ravel(), minlength=b * n_max)
    host_devs = np.bincount(flat, weights=mask.ravel().astype(float), minlength=b * n_max)
    on_host = host_bytes[flat].reshape(b, n_max)
    n_h = np.maximum(host_devs[flat].reshape(b, n_max), 1.0)
    total = out_bytes.sum(axis=1, keepdims=True)
    intra = np.maximum(out_bytes * (n_h - 1.0), on_host - out_bytes) / n
    inter = np.maximum(out_bytes * (n - n_h), total - on_host) / n
    t_intra = intra / ctx[:, 2:3]
    t_inter = inter / ctx[:, 3:4]
    return np.stack([t_intra, t_inter, out_bytes, n_h, np.broadcast_to(n, d.shape)], axis=-1)


def build_nets(arch: Mapping[str, Any]) -> dict[str, torch.nn.Module]:
    """The three nets of an architecture description (as stored in meta.json)."""
    import torch
    from torch import nn

    from neuroshard.models.training import mlp

    squash = arch.get("head_input", "sum") == SQUASHED_SUM

    class ComputeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = mlp([arch["num_features"], *arch["table_hidden"], arch["embed_dim"]])
            self.head = mlp([arch["embed_dim"], *arch["head_hidden"], 1])

        def forward(self, x: torch.Tensor, row: torch.Tensor, num_rows: int) -> torch.Tensor:
            """``x`` (shards, F) of ``num_rows`` loads; ``row[i]`` is shard i's load."""
            emb = self.table(x)
            summed = emb.new_zeros(num_rows, emb.shape[-1]).index_add_(0, row, emb)
            if squash:
                summed = torch.sign(summed) * torch.log1p(summed.abs())
            return self.head(summed).squeeze(-1)

    class ComputeEnsemble(nn.Module):
        """Compute nets trained side by side from their own initialisations. In training
        each member answers for itself ``(B, members)``; in eval, their mean answers."""

        def __init__(self, members: int) -> None:
            super().__init__()
            self.members = nn.ModuleList(ComputeNet() for _ in range(members))

        def forward(self, x: torch.Tensor, row: torch.Tensor, num_rows: int) -> torch.Tensor:
            out = torch.stack([m(x, row, num_rows) for m in self.members], dim=-1)
            return out if self.training else out.mean(dim=-1)

    class CommNet(nn.Module):
        def __init__(self, num_inputs: int) -> None:
            super().__init__()
            enc = list(arch["comm_encoder"])
            self.encoder = mlp([num_inputs, *enc], final_relu=True)
            self.head = mlp([3 * enc[-1], *arch["comm_head"], 1])

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            m = mask.unsqueeze(-1).to(x.dtype)
            h = self.encoder(x) * m  # encodings are >= 0 (ReLU), so 0 is neutral for max
            mean = h.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
            ctx = torch.cat([mean, h.amax(dim=1)], dim=-1).unsqueeze(1).expand(-1, x.shape[1], -1)
            return self.head(torch.cat([h, ctx], dim=-1)).squeeze(-1)

    members = int(arch.get("compute_members", 1))
    compute = ComputeNet() if members == 1 else ComputeEnsemble(members)
    ranged = arch.get("inputs", TABLE_INPUTS) == RANGE_INPUTS
    fwd_in, bwd_in = (RANGE_COMM_INPUTS["fwd"], RANGE_COMM_INPUTS["bwd"]) if ranged else (3, 2)
    return {"compute": compute, "fwd": CommNet(fwd_in), "bwd": CommNet(bwd_in)}


def _batch_bucket(batch: np.ndarray) -> np.ndarray:
    """Each batch's bucket label: the power of 4 times 512 at or below it."""
    b = np.maximum(np.nan_to_num(np.asarray(batch, dtype=float), nan=512.0), 512.0)
    return (512 * 4 ** np.floor(np.log(b / 512) / np.log(4) + 1e-9)).astype(int).astype(str)


def _by_value(
    pred: np.ndarray, true: np.ndarray, labels: np.ndarray, eps_ms: float
) -> dict[str, dict[str, float]]:
    """Metrics per label (labels with at least ``MIN_BUCKET`` samples)."""
    from neuroshard.models.metrics import MIN_BUCKET, regression_metrics

    return {
        str(v): regression_metrics(pred[labels == v], true[labels == v], eps_ms)
        for v in np.unique(labels)
        if (labels == v).sum() >= MIN_BUCKET
    }


def _positive(value: Any, what: str) -> float:
    """A finite number > 0 from meta.json (``ValueError`` naming the entry otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be finite and positive, got {value!r}")
    return float(value)


def _widths(values: Any, what: str) -> list[int]:
    """Layer widths from meta.json: a list of positive integers."""
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    ):
        raise ValueError(f"architecture {what}: expected positive integers, got {values!r}")
    return list(values)


class NeuralCostModel(CostModelBase):
    """Neural :class:`~neuroshard.types.CostEstimator` (compute, backward and forward comm).

    Hyperparameters are set here; :meth:`fit` learns the attributes ending in ``_``.
    ``batch_size`` (the DLRM batch the costs are for) is taken from the training data's
    backend fingerprint when left ``None``.
    """

    kind = "neural"
    _fitted_attr = "nets_"

    def __init__(
        self,
        *,
        batch_size: int | None = None,
        table_hidden: Sequence[int] = (128,),
        embed_dim: int = 32,
        head_hidden: Sequence[int] = (64,),
        comm_encoder: Sequence[int] = (64, 64),
        comm_head: Sequence[int] = (64, 32, 16),
        lr: float = 1e-3,
        train_batch_size: int = 512,
        comm_train_batch_size: int = 128,
        max_epochs: int = 300,
        patience: int = 30,
        seed: int = 0,
        num_threads: int = 1,
        eps_ms: float = 1e-3,
        fwd_target: str = "residual",
        max_seconds_per_net: float | None = None,
        lr_decay_patience: int | None = None,
        compute_members: int = 1,
        range_inputs: bool = False,
        conservative_k: float = 0.0,
    ):
        if compute_members < 1:
            raise ValueError(f"compute_members must be >= 1, got {compute_members}")
        if not conservative_k >= 0.0:
            raise ValueError(f"conservative_k must be >= 0, got {conservative_k}")
        self.batch_size = batch_size
        self.table_hidden = tuple(table_hidden)
        self.embed_dim = embed_dim
        self.head_hidden = tuple(head_hidden)
        self.comm_encoder = tuple(comm_encoder)
        self.comm_head = tuple(comm_head)
        self.lr = lr
        self.train_batch_size = train_batch_size
        self.comm_train_batch_size = comm_train_batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.seed = seed
        self.num_threads = num_threads
        self.eps_ms = eps_ms
        self.fwd_target = fwd_target
        self.max_seconds_per_net = max_seconds_per_net
        self.lr_decay_patience = lr_decay_patience
        self.compute_members = int(compute_members)
        self.range_inputs = bool(range_inputs)
        self.conservative_k = float(conservative_k)
        self.context_: CommContext | None = None  # bound batch and topology (range inputs)
        self._row_batch: dict[str, float] = {}  # per-sample batch of data being fitted/scored
        self._row_context: dict[str, np.ndarray] = {}  # per-sample comm context, likewise
        self._ctx_rows: np.ndarray | None = None

    # ------------------------------------------------------------- description

    def _architecture(self) -> dict[str, Any]:
        return {
            "num_features": self.num_inputs,
            "inputs": RANGE_INPUTS if self.range_inputs else TABLE_INPUTS,
            "table_hidden": list(self.table_hidden),
            "embed_dim": self.embed_dim,
            "head_hidden": list(self.head_hidden),
            "comm_encoder": list(self.comm_encoder),
            "comm_head": list(self.comm_head),
            "compute_members": self.compute_members,
            "head_input": SQUASHED_SUM if self.range_inputs else "sum",
        }

    @property
    def num_inputs(self) -> int:
        """Inputs per shard of the compute net."""
        return NUM_FEATURES + (NUM_BATCH_FEATURES if self.range_inputs else 0)

    @property
    def embedding_width(self) -> int:
        """Columns of :meth:`shard_embeddings`: ``embed_dim`` per compute member."""
        return self.embed_dim * self.compute_members

    # ------------------------------------------------------------- inputs

    def _unscaled_inputs(self, raw: np.ndarray, batch: float | np.ndarray | None) -> np.ndarray:
        """Transformed features of raw rows, with the batch columns for a range model
        (``batch``: one number or one per row; None: the bound batch)."""
        x = transform_raw(raw)
        if not self.range_inputs:
            return x
        b = self.context.batch_size if batch is None else batch
        return np.concatenate([x, batch_features(raw, b)], axis=1)

    def _table_inputs(self, feats: np.ndarray) -> np.ndarray:
        """Standardised inputs from already transformed (and, for a range model,
        batch-extended) features."""
        return ((feats - self.feature_mean_) / self.feature_std_).astype(np.float32)

    def _raw_inputs(self, raw: np.ndarray, batch: float | np.ndarray | None = None) -> np.ndarray:
        x = self._unscaled_inputs(raw, batch)
        return ((x - self.feature_mean_) / self.feature_std_).astype(np.float32)

    # ------------------------------------------------------------- batch and topology

    def _default_context(self) -> CommContext:
        """The batch and topology an unbound model prices: its ``batch_size`` on hosts of
        the profile's ``gpus_per_host`` at the profile's bandwidths."""
        consts = dict(getattr(self, "backend_fingerprint_", {}).get("constants") or {})
        return CommContext(
            float(self.batch_size or 65536),
            int(consts.get("gpus_per_host", 8)),
            float(consts.get("nvlink_bytes_per_ms", 450e6)),
            float(consts.get("inter_host_bytes_per_ms", 50e6)),
        )

    @property
    def context(self) -> CommContext:
        """The batch and topology this model prices (bound, or the default)."""
        return self.context_ or self._default_context()

    def _bound(self, ctx: CommContext) -> NeuralCostModel:
        if ctx == self.context:
            return self
        self._warn_out_of_range(ctx)
        bound = copy.copy(self)
        bound.context_ = ctx
        bound.batch_size = int(round(ctx.batch_size))
        return bound

    def _warn_out_of_range(self, ctx: CommContext) -> None:
        low, high = getattr(self, "training_ranges_", {}).get("batch_size", (None, None))
        if low is not None and not low <= ctx.batch_size <= high:
            logger.warning(
                "model %s: batch size %g outside its training range [%g, %g]; "
                "its costs there are extrapolations",
                self.name,
                ctx.batch_size,
                low,
                high,
            )

    def for_batch(self, batch_size: int) -> NeuralCostModel:
        """This model at global batch ``batch_size`` (range inputs; otherwise the batch
        must be the model's own, :class:`ModelMismatchError` if not)."""
        if not self.range_inputs:
            if self.batch_size is not None and batch_size != self.batch_size:
                raise ModelMismatchError(
                    f"model {self.name} prices batch size {self.batch_size} only, not {batch_size}"
                )
            return self
        return self._bound(replace(self.context, batch_size=float(batch_size)))

    def for_cluster(self, cluster: Cluster) -> NeuralCostModel:
        """This model on ``cluster``: its batch, hosts and, where it gives them, its
        bandwidths (range inputs; a model without them is returned as it is)."""
        if not self.range_inputs:
            return self
        default = self._default_context()
        return self._bound(
            CommContext(
                float(cluster.batch_size),
                int(cluster.devices_per_host),
                float(cluster.intra_host_bw_bytes_per_ms or default.intra_host_bytes_per_ms),
                float(cluster.inter_host_bw_bytes_per_ms or default.inter_host_bytes_per_ms),
            )
        )

    def with_conservative(self, k: float) -> NeuralCostModel:
        """A copy that prices loads at ``mean + k x spread`` of its members (module doc)."""
        if not k >= 0.0:
            raise ValueError(f"conservative_k must be >= 0, got {k}")
        out = copy.copy(self)
        out.conservative_k = float(k)
        return out

    def members(self) -> list[NeuralCostModel]:
        """Each compute member as a model of its own (the comm nets, bindings and the rest
        shared; no conservative term): the search asks them all to agree before it trades
        the greedy grid's plan for one they price cheaper. One member: the model at k = 0."""
        self._check_fitted()
        if self.compute_members == 1:
            return [self.with_conservative(0.0)]
        out = []
        for table, head in zip(self.np_tables_, self.np_heads_, strict=True):
            member = self.with_conservative(0.0)
            member.np_tables_, member.np_heads_ = [table], [head]
            member.compute_members = 1
            out.append(member)
        return out

    def _comm_inputs(
        self,
        dim_sums: np.ndarray,
        waits_ms: np.ndarray | None,
        mask: np.ndarray | None = None,
        ctx: np.ndarray | None = None,
    ) -> np.ndarray:
        """Per-device inputs ``(B, N, F)``: dim sum / scale, 1/N, [wait gap / scale]; for
        range inputs the link times and counts of the module doc, [wait gap / scale]."""
        d = np.asarray(dim_sums, dtype=np.float64)
        if mask is None:
            mask = np.ones(d.shape, dtype=bool)
        if self.range_inputs:
            rows = self.context.as_row() if ctx is None else ctx
            lt = link_times_ms(d, mask, rows)
            n_h, n = lt[..., 3], lt[..., 4]
            cols = [
                np.log10(lt[..., 0] + _T_FLOOR_MS),
                np.log10(lt[..., 1] + _T_FLOOR_MS),
                np.log10(1.0 + lt[..., 2] / 1e6),
                np.log2(n),
                np.log2(n_h),
                np.log2(n / n_h),
            ]
            if waits_ms is not None:
                cols.append(
                    since_first(np.asarray(waits_ms, dtype=np.float64), mask) / self.wait_scale_
                )
            x = np.stack(cols, axis=-1)
            return np.where(mask[..., None], x, 0.0).astype(np.float32)
        n_dev = mask.sum(axis=-1, keepdims=True).clip(min=1)
        cols = [d / self.dim_scale_, np.broadcast_to(1.0 / n_dev, d.shape)]
        if waits_ms is not None:
            cols.append(
                since_first(np.asarray(waits_ms, dtype=np.float64), mask) / self.wait_scale_
            )
        x = np.stack(cols, axis=-1)
        return np.where(mask[..., None], x, 0.0).astype(np.float32)

    def _to_target(self, ms: np.ndarray, which: str) -> np.ndarray:
        mu, sd = self.target_stats_[which]
        return ((np.log(np.maximum(ms, 0.0) + self.eps_ms) - mu) / sd).astype(np.float32)

    def _from_target(self, y: np.ndarray, which: str) -> np.ndarray:
        mu, sd = self.target_stats_[which]
        return np.maximum(np.exp(np.asarray(y, dtype=np.float64) * sd + mu) - self.eps_ms, 0.0)

    # ------------------------------------------------------------- fitting

    def fit(
        self,
        compute: ComputeData,
        comm: CommData,
        *,
        compute_split: Split | None = None,
        comm_split: Split | None = None,
        backend_name: str | None = None,
        num_devices: int | None = None,
        trainer: TrainFn | None = None,
        compute_batch: np.ndarray | None = None,
        comm_context: np.ndarray | None = None,
        init_from: NeuralCostModel | None = None,
    ) -> NeuralCostModel:
        """Train the three nets on collected data and record test metrics in ``metrics_``.

        Splits default to 80/10/10 by a permutation seeded with ``seed``; the validation
        part picks the best epoch, the test part gives ``metrics_``. ``trainer`` trains
        each net (default :func:`~neuroshard.models.training.fit_net` in this process;
        :func:`~neuroshard.models.training.file_checkpointed` resumes from files, and the
        pretrain pipeline injects a distributed one on Ray Train).

        A range model (``range_inputs``) needs each compute row's global batch
        (``compute_batch``, ``(len(compute),)``) and each comm row's context
        (``comm_context``, ``(len(comm), 4)`` rows of :meth:`CommContext.as_row`); its
        ``batch_size`` (default 65,536) is then only the batch it prices unbound.
        ``init_from`` (a fitted model of the same architecture) warm-starts every net from
        its weights instead of a seeded initialisation.
        """
        import torch

        from neuroshard.models.training import TrainConfig, fit_net

        if self.fwd_target not in FWD_TARGETS:
            raise ValueError(f"fwd_target must be one of {FWD_TARGETS}, got {self.fwd_target!r}")

        if self.range_inputs:
            if compute_batch is None or comm_context is None:
                raise ValueError("range_inputs needs compute_batch and comm_context")
            self.set_sample_contexts(compute, compute_batch, comm, comm_context)
            if self.batch_size is None:
                self.batch_size = 65536
        cs, ms = self._begin_fit(
            compute,
            comm,
            compute_split=compute_split,
            comm_split=comm_split,
            backend_name=backend_name,
            num_devices=num_devices,
        )

        if self.range_inputs:
            batches = np.concatenate(
                [
                    np.asarray(compute_batch, dtype=float),
                    np.asarray(comm_context, dtype=float)[:, 0],
                ]
            )
            self.training_ranges_["batch_size"] = [float(batches.min()), float(batches.max())]
            per_host = np.asarray(comm_context, dtype=float)[:, 1]
            if len(per_host):
                self.training_ranges_["devices_per_host"] = [
                    int(per_host.min()),
                    int(per_host.max()),
                ]
        # normalisation from the training rows only
        tr_compute = compute.subset(cs.train)
        feats = self._unscaled_inputs(tr_compute.features, self._shard_batch(tr_compute))
        self.feature_mean_ = feats.mean(axis=0).astype(np.float64)
        # Only the log-scaled columns are scaled to unit variance. Reuse bins are fractions
        # already; dividing a bin that is almost always 0 by its tiny spread would blow up
        # a new table with mass there (seen on held-out pools), so they are centred only.
        std = feats.std(axis=0).astype(np.float64)
        std[:NUM_HIST_BINS] = 1.0
        self.feature_std_ = np.where(std > 1e-6, std, 1.0)
        tr_comm = comm.subset(ms.train)
        self.dim_scale_ = float(max(tr_comm.dim_sums[tr_comm.mask].mean(), 1.0))
        gaps = since_first(tr_comm.waits_ms, tr_comm.mask)
        self.wait_scale_ = float(max(gaps[tr_comm.mask].mean(), 1.0))
        self.target_stats_ = {}
        for which, y in (
            ("compute", tr_compute.label_ms),
            ("fwd", self._fwd_label(tr_comm)[tr_comm.mask]),
            ("bwd", tr_comm.bwd_ms[tr_comm.mask]),
        ):
            t = np.log(np.maximum(y, 0.0) + self.eps_ms)
            self.target_stats_[which] = (float(t.mean()), float(max(t.std(), 1e-6)))

        with torch.random.fork_rng():  # seeded initialisation, global RNG left alone
            torch.manual_seed(self.seed)
            self.nets_ = build_nets(self._architecture())
        if init_from is not None:
            init_from._check_fitted()
            if init_from._architecture() != self._architecture():
                raise ValueError(
                    "init_from has another architecture: "
                    f"{init_from._architecture()} vs {self._architecture()}"
                )
            for which, net in self.nets_.items():
                net.load_state_dict(init_from.nets_[which].state_dict())
        config = TrainConfig(
            lr=self.lr,
            batch_size=self.train_batch_size,
            max_epochs=self.max_epochs,
            patience=self.patience,
            seed=self.seed,
            num_threads=self.num_threads,
            max_seconds=self.max_seconds_per_net,
            lr_decay_patience=self.lr_decay_patience,
        )
        train_fn = trainer or fit_net
        self.training_ = {}
        self.training_["compute"] = train_fn(
            self.nets_["compute"],
            self._compute_tensors(compute.subset(cs.train)),
            self._compute_tensors(compute.subset(cs.val)),
            config,
            "compute",
        )
        # A few thousand comm samples give few steps per epoch at 512; smaller batches
        # reach the noise floor in the same number of epochs.
        comm_config = replace(config, batch_size=self.comm_train_batch_size)
        for which in ("bwd", "fwd"):
            self.training_[which] = train_fn(
                self.nets_[which],
                self._comm_tensors(comm.subset(ms.train), which),
                self._comm_tensors(comm.subset(ms.val), which),
                comm_config,
                f"{which} comm",
            )
        self._extract()

        self._end_fit(compute, comm, cs, ms)
        self.training_summary_ = {
            k: {
                "best_epoch": r.best_epoch,
                "epochs_run": r.epochs_run,
                "best_val_loss": r.best_val_loss,
                "seconds": round(r.seconds, 2),
            }
            for k, r in self.training_.items()
        }
        return self

    def set_sample_contexts(
        self,
        compute: ComputeData | None = None,
        compute_batch: np.ndarray | None = None,
        comm: CommData | None = None,
        comm_context: np.ndarray | None = None,
    ) -> None:
        """Remember each sample's batch (compute) and context (comm) by its key, so that
        fitting and scoring a range model on data of many batches and clusters price each
        row at its own (rows of an unknown key get the bound context)."""
        if compute is not None and compute_batch is not None:
            b = np.asarray(compute_batch, dtype=float).reshape(-1)
            if len(b) != len(compute):
                raise ValueError(f"compute_batch has {len(b)} rows, the data {len(compute)}")
            self._row_batch = dict(zip(compute.keys.tolist(), b.tolist(), strict=True))
        if comm is not None and comm_context is not None:
            c = np.asarray(comm_context, dtype=float).reshape(-1, 4)
            if len(c) != len(comm):
                raise ValueError(f"comm_context has {len(c)} rows, the data {len(comm)}")
            self._row_context = dict(zip(comm.keys.tolist(), c, strict=True))

    def _shard_batch(self, data: ComputeData) -> np.ndarray | None:
        """Each shard's batch for ``data`` (its row's), or None for the bound one."""
        if not self.range_inputs or not self._row_batch:
            return None
        default = self.context.batch_size
        per_row = np.array([self._row_batch.get(k, default) for k in data.keys.tolist()])
        return np.repeat(per_row, np.diff(data.offsets))

    def _comm_rows(self, data: CommData) -> np.ndarray | None:
        """Each comm row's context ``(n, 4)``, or None for the bound one."""
        if not self.range_inputs or not self._row_context:
            return None
        default = self.context.as_row()
        return np.stack([self._row_context.get(k, default) for k in data.keys.tolist()])

    def score_compute(self, data: ComputeData) -> dict[str, Any]:
        """:meth:`CostModelBase.score_compute`, and for a range model with known batches
        a breakdown ``by_batch`` (bucket = its lowest batch, buckets x4 apart)."""
        out = super().score_compute(data)
        if self.range_inputs and self._row_batch and len(data):
            batch = np.array([self._row_batch.get(k, np.nan) for k in data.keys.tolist()])
            pred = self._predict_compute_data(data)
            out["by_batch"] = _by_value(pred, data.label_ms, _batch_bucket(batch), self.eps_ms)
        return out

    def score_comm(self, data: CommData) -> dict[str, dict[str, Any]]:
        """:meth:`CostModelBase.score_comm`, each row at its own context when known, with
        breakdowns ``by_hosts``, ``by_devices_log2`` (bucket = the power of 2 at or
        below) and ``by_batch`` for a range model."""
        self._ctx_rows = self._comm_rows(data)
        try:
            out = super().score_comm(data)
            if self._ctx_rows is not None and len(data):
                m = data.mask
                ctx = self._ctx_rows
                hosts = np.ceil(data.num_devices / np.maximum(ctx[:, 1], 1))
                hosts = (2 ** np.floor(np.log2(np.maximum(hosts, 1)))).astype(int)  # 1, 2-3, ..
                keys = {
                    "by_hosts": hosts.astype(str),
                    "by_batch": _batch_bucket(ctx[:, 0]),
                    "by_devices_log2": (2 ** np.floor(np.log2(np.maximum(data.num_devices, 1))))
                    .astype(int)
                    .astype(str),
                }
                for which, true in (("fwd", data.fwd_ms), ("bwd", data.bwd_ms)):
                    pred = self._comm(
                        which, data.dim_sums, data.waits_ms if which == "fwd" else None, m
                    )
                    for by, per_sample in keys.items():
                        per_device = np.broadcast_to(per_sample[:, None], m.shape)[m]
                        out[f"{which}_comm"][by] = _by_value(
                            pred[m], true[m], per_device, self.eps_ms
                        )
            return out
        finally:
            self._ctx_rows = None

    def _fwd_label(self, comm: CommData) -> np.ndarray:
        """What the forward net learns: the time, or the time less the straggler wait."""
        if self.fwd_target == "total":
            return comm.fwd_ms
        return comm.fwd_ms - straggler_wait(comm.waits_ms, comm.mask)

    def _compute_tensors(self, data: ComputeData) -> Ragged:
        import torch

        from neuroshard.models.training import Ragged

        x = self._raw_inputs(data.features, self._shard_batch(data))
        return Ragged(
            torch.from_numpy(x),
            torch.from_numpy(data.offsets),
            torch.from_numpy(self._to_target(data.label_ms, "compute")),
        )

    def _comm_tensors(self, data: CommData, which: str) -> Dense:
        import torch

        from neuroshard.models.training import Dense

        x = self._comm_inputs(
            data.dim_sums,
            data.waits_ms if which == "fwd" else None,
            data.mask,
            self._comm_rows(data),
        )
        y = self._fwd_label(data) if which == "fwd" else data.bwd_ms
        y = np.where(data.mask, self._to_target(y, which), 0.0).astype(np.float32)
        mask = torch.from_numpy(data.mask.astype(np.float32))
        return Dense((torch.from_numpy(x), mask), torch.from_numpy(y), mask)

    def _extract(self) -> None:
        """Numpy copies of the weights for inference."""
        from neuroshard.models.training import NumpyMLP

        nets: dict[str, Any] = self.nets_
        compute = nets["compute"]
        members = list(compute.members) if hasattr(compute, "members") else [compute]
        self.np_tables_ = [NumpyMLP(m.table) for m in members]
        self.np_heads_ = [NumpyMLP(m.head) for m in members]
        self.np_comm_ = {
            w: (NumpyMLP(nets[w].encoder), NumpyMLP(nets[w].head)) for w in ("fwd", "bwd")
        }

    # ------------------------------------------------------------- inference

    def shard_embeddings(self, specs: Sequence[TableSpec]) -> np.ndarray:
        """Per-shard embeddings ``(len(specs), embedding_width)``: a device's compute is
        ``compute_from_embeddings`` of the sum of its shards' embeddings."""
        self._check_fitted()
        if not len(specs):
            return np.zeros((0, self.embedding_width), dtype=np.float32)
        return self._embed(self._raw_inputs(raw_features(specs)))

    def _embed(self, x: np.ndarray) -> np.ndarray:
        if len(self.np_tables_) == 1:
            return self.np_tables_[0](x)
        return np.concatenate([table(x) for table in self.np_tables_], axis=1)

    def compute_from_embeddings(
        self, summed: np.ndarray, counts: np.ndarray | None = None
    ) -> np.ndarray:
        """Compute ms from summed shard embeddings ``(B, embedding_width)``; rows whose
        ``counts`` (shards per device, optional) are 0 cost 0. Members are averaged in
        the log space they were trained in. With ``counts``, a load of more shards than
        the model was trained on (``training_ranges_["tables_per_device"]``) is priced
        linearly past the range: as ``count / max`` loads of ``max`` shards of its mean
        embedding, never from a sum the nets never saw (beyond it they can fall to 0)."""
        summed, factor = self._in_range(summed, counts)
        y, spread = self._member_stats(summed)
        if self.conservative_k > 0.0:
            y = y + self.conservative_k * spread
        out = self._from_target(y, "compute") * factor
        if counts is not None:
            out = np.where(np.asarray(counts).reshape(-1) > 0, out, 0.0)
        return out

    def _in_range(
        self, summed: np.ndarray, counts: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | float]:
        """``summed`` with loads past the trained shards per device scaled down to it,
        and the factor their price scales back up by (1 elsewhere)."""
        limit = (getattr(self, "training_ranges_", None) or {}).get("tables_per_device")
        if counts is None or not limit:
            return summed, 1.0
        factor = np.maximum(np.asarray(counts, dtype=np.float64).reshape(-1) / limit[1], 1.0)
        if not (factor > 1.0).any():
            return summed, 1.0
        scaled = np.asarray(summed, dtype=np.float32) / factor[:, None].astype(np.float32)
        return scaled, factor

    def _member_stats(self, summed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation over the compute members of their (standardised)
        log-space predictions from summed embeddings ``(B, embedding_width)``."""
        self._check_fitted()
        summed = np.asarray(summed, dtype=np.float32).reshape(-1, self.embedding_width)
        if self.range_inputs:
            summed = np.sign(summed) * np.log1p(np.abs(summed))
        e = self.embed_dim
        ys = np.stack(
            [head(summed[:, i * e : (i + 1) * e])[:, 0] for i, head in enumerate(self.np_heads_)],
            axis=1,
        ).astype(np.float64)
        return ys.mean(axis=1), ys.std(axis=1)

    def compute_spread(self, loads: Sequence[Sequence[TableSpec]]) -> np.ndarray:
        """Each load's uncertainty: the members' standard deviation of ``log(ms + eps_ms)``
        (0 for one member and for an empty load). ``exp(spread) - 1`` reads as a relative
        error."""
        counts = np.fromiter((len(load) for load in loads), dtype=np.int64, count=len(loads))
        if not counts.sum():
            return np.zeros(len(loads))
        emb = self.shard_embeddings([t for load in loads for t in load])
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        busy = counts > 0
        summed = np.zeros((len(counts), self.embedding_width), dtype=np.float32)
        summed[busy] = np.add.reduceat(emb, starts[busy], axis=0)
        _, spread = self._member_stats(self._in_range(summed, counts)[0])
        return np.where(busy, spread * self.target_stats_["compute"][1], 0.0)

    def compute_ms(self, loads: Sequence[Sequence[TableSpec]]) -> np.ndarray:
        """Fused forward+backward ms of each load; an empty load costs 0."""
        self._check_fitted()
        counts = np.fromiter((len(load) for load in loads), dtype=np.int64, count=len(loads))
        if not counts.sum():
            return np.zeros(len(loads))
        emb = self.shard_embeddings([t for load in loads for t in load])
        return self._compute_from_shards(emb, counts)

    def _compute_from_shards(self, emb: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Compute ms of loads whose shard embeddings ``emb`` lie load after load,
        ``counts[i]`` of them for load i."""
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        summed = np.zeros((len(counts), self.embedding_width), dtype=np.float32)
        busy = counts > 0
        summed[busy] = np.add.reduceat(emb, starts[busy], axis=0)
        return self.compute_from_embeddings(summed, counts)

    def _comm(
        self,
        which: str,
        dim_sums: np.ndarray,
        waits_ms: np.ndarray | None,
        mask: np.ndarray | None = None,
    ) -> np.ndarray:
        self._check_fitted()
        d, waits_ms, mask, squeeze = self._comm_batch(dim_sums, waits_ms, mask)
        x = self._comm_inputs(d, waits_ms, mask, self._ctx_rows)
        encoder, head = self.np_comm_[which]
        h = encoder(x) * mask[..., None]
        n = mask.sum(axis=1, keepdims=True).clip(min=1)
        ctx = np.concatenate([h.sum(axis=1) / n, h.max(axis=1)], axis=-1)
        ctx = np.broadcast_to(ctx[:, None, :], h.shape[:2] + ctx.shape[-1:])
        y = head(np.concatenate([h, ctx], axis=-1).astype(np.float32))[..., 0]
        out = self._from_target(y, which)
        if which == "fwd" and self.fwd_target == "residual":
            out = out + straggler_wait(np.asarray(waits_ms, dtype=np.float64), mask)
        out = np.where(mask, out, 0.0)
        return out[0] if squeeze else out

    # ------------------------------------------------------------- scoring

    def _predict_compute_data(self, data: ComputeData) -> np.ndarray:
        return self._compute_from_shards(
            self.shard_embeddings_raw(data.features, self._shard_batch(data)),
            np.diff(data.offsets),
        )

    def shard_embeddings_raw(
        self, raw: np.ndarray, batch: float | np.ndarray | None = None
    ) -> np.ndarray:
        """:meth:`shard_embeddings` from raw feature rows ``(n, 20)`` (collected data),
        at ``batch`` (one number or one per row; None: the bound batch)."""
        self._check_fitted()
        return self._embed(self._raw_inputs(raw, batch))

    # ------------------------------------------------------------- files

    def meta(self) -> dict[str, Any]:
        """What ``meta.json`` records (without the file checksums)."""
        return {
            **self._base_meta(),
            "target_transform": TARGET_TRANSFORM,
            "fwd_target": self.fwd_target,
            "batch_input": self.range_inputs,
            "conservative_k": self.conservative_k,
            "default_context": dict(
                zip(
                    (
                        "batch_size",
                        "devices_per_host",
                        "intra_host_bytes_per_ms",
                        "inter_host_bytes_per_ms",
                    ),
                    self._default_context().as_row().tolist(),
                    strict=True,
                )
            ),
            "normalisation": {
                "eps_ms": self.eps_ms,
                "feature_mean": self.feature_mean_.tolist(),
                "feature_std": self.feature_std_.tolist(),
                "target": {k: list(v) for k, v in self.target_stats_.items()},
                "dim_scale": self.dim_scale_,
                "wait_scale": self.wait_scale_,
            },
            "architecture": self._architecture(),
            "hyperparameters": {
                "lr": self.lr,
                "train_batch_size": self.train_batch_size,
                "comm_train_batch_size": self.comm_train_batch_size,
                "max_epochs": self.max_epochs,
                "patience": self.patience,
                "lr_decay_patience": self.lr_decay_patience,
                "seed": self.seed,
            },
        }

    def save(self, model_dir: str | os.PathLike) -> Path:
        """Write ``compute.pt``, ``comm.pt`` and ``meta.json`` into ``model_dir``."""
        import torch

        self._check_fitted()
        out = Path(model_dir)
        out.mkdir(parents=True, exist_ok=True)
        compute_state = self.nets_["compute"].state_dict()
        atomic_write(out / COMPUTE_FILE, lambda tmp: torch.save(compute_state, tmp))
        comm_state = {
            f"{w}.{k}": v for w in ("fwd", "bwd") for k, v in self.nets_[w].state_dict().items()
        }
        atomic_write(out / COMM_FILE, lambda tmp: torch.save(comm_state, tmp))
        return self._write_meta(out, (COMPUTE_FILE, COMM_FILE))

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike,
        meta: Mapping[str, Any] | None = None,
    ) -> NeuralCostModel:
        """A fitted model from ``model_dir`` (``meta`` if already read)."""
        import torch

        d = Path(model_dir)
        meta = dict(meta) if meta is not None else read_meta(d)
        try:
            arch = dict(meta["architecture"])
            for key in ("table_hidden", "head_hidden", "comm_encoder", "comm_head"):
                arch[key] = _widths(arch[key], key)
            arch["embed_dim"] = _widths([arch["embed_dim"]], "embed_dim")[0]
            arch["compute_members"] = _widths([arch.get("compute_members", 1)], "compute_members")[
                0
            ]
            norm = meta["normalisation"]
            hyper = meta.get("hyperparameters", {})
            model = cls(
                batch_size=int(meta["batch_size"]),
                table_hidden=arch["table_hidden"],
                embed_dim=arch["embed_dim"],
                head_hidden=arch["head_hidden"],
                comm_encoder=arch["comm_encoder"],
                comm_head=arch["comm_head"],
                compute_members=arch["compute_members"],
                range_inputs=arch.get("inputs", TABLE_INPUTS) == RANGE_INPUTS,
                conservative_k=float(meta.get("conservative_k", 0.0)),
                eps_ms=_positive(norm["eps_ms"], "eps_ms"),
                fwd_target=str(meta.get("fwd_target", "total")),
                **{
                    k: hyper[k]
                    for k in (
                        "lr",
                        "train_batch_size",
                        "comm_train_batch_size",
                        "max_epochs",
                        "patience",
                        "lr_decay_patience",
                        "seed",
                    )
                    if k in hyper
                },
            )
            if model.fwd_target not in FWD_TARGETS:
                raise ValueError(f"fwd_target {model.fwd_target!r} not in {FWD_TARGETS}")
            if arch.get("inputs", TABLE_INPUTS) not in (TABLE_INPUTS, RANGE_INPUTS):
                raise ValueError(f"inputs {arch['inputs']!r} not in {(TABLE_INPUTS, RANGE_INPUTS)}")
            expected_head = SQUASHED_SUM if model.range_inputs else "sum"
            if arch.get("head_input", "sum") != expected_head:
                raise ValueError(f"head_input {arch.get('head_input')!r} != {expected_head!r}")
            if int(arch["num_features"]) != model.num_inputs:
                raise ValueError(f"num_features {arch['num_features']} != {model.num_inputs}")
            model.feature_mean_ = np.asarray(norm["feature_mean"], dtype=np.float64)
            model.feature_std_ = np.asarray(norm["feature_std"], dtype=np.float64)
            width = (model.num_inputs,)
            if model.feature_mean_.shape != width or model.feature_std_.shape != width:
                raise ValueError("feature normalisation has the wrong length")
            target = norm["target"]
            model.target_stats_ = {
                k: (float(target[k][0]), float(target[k][1])) for k in ("compute", "fwd", "bwd")
            }
            if not all(np.isfinite(v).all() and v[1] > 0 for v in model.target_stats_.values()):
                raise ValueError("target normalisation is not finite and positive")
            model.dim_scale_ = _positive(norm["dim_scale"], "dim_scale")
            model.wait_scale_ = _positive(norm["wait_scale"], "wait_scale")
            model._load_base_meta(meta)
            nets = build_nets(arch)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
            raise ModelFileError(f"{d / META_FILE}: bad or missing entry ({exc!r})") from exc

        checksums = meta.get("files", {})
        states = {}
        for fname in (COMPUTE_FILE, COMM_FILE):
            path = checked_file(d, fname, checksums)
            try:
                states[fname] = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 -- any unreadable checkpoint is one error
                raise ModelFileError(f"{path}: unreadable checkpoint ({exc})") from exc
        try:
            nets["compute"].load_state_dict(states[COMPUTE_FILE])
        except Exception as exc:  # noqa: BLE001
            raise ModelFileError(
                f"{d / COMPUTE_FILE}: does not fit the architecture in {META_FILE} ({exc})"
            ) from exc
        comm_state = states[COMM_FILE]
        for w in ("fwd", "bwd"):
            try:
                nets[w].load_state_dict(
                    {k[len(w) + 1 :]: v for k, v in comm_state.items() if k.startswith(w + ".")}
                )
            except Exception as exc:  # noqa: BLE001
                raise ModelFileError(
                    f"{d / COMM_FILE}: {w} net does not fit the architecture in {META_FILE} ({exc})"
                ) from exc
        for net in nets.values():
            net.eval()
        model.nets_ = nets
        model._extract()
        model.meta_ = meta
        return model

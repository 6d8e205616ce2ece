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

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from neuroshard.features import NUM_FEATURES, table_features, transform_raw
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
from neuroshard.types import NUM_HIST_BINS, ModelFileError, TableSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from neuroshard.models.training import Dense, Ragged, TrainFn

COMPUTE_FILE = "compute.pt"
COMM_FILE = "comm.pt"
FWD_TARGETS = ("residual", "total")

__all__ = ["COMM_FILE", "COMPUTE_FILE", "FWD_TARGETS", "NeuralCostModel", "build_nets"]


def build_nets(arch: Mapping[str, Any]) -> dict[str, torch.nn.Module]:
    """The three nets of an architecture description (as stored in meta.json)."""
    import torch
    from torch import nn

    from neuroshard.models.training import mlp

    class ComputeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = mlp([arch["num_features"], *arch["table_hidden"], arch["embed_dim"]])
            self.head = mlp([arch["embed_dim"], *arch["head_hidden"], 1])

        def forward(self, x: torch.Tensor, row: torch.Tensor, num_rows: int) -> torch.Tensor:
            """``x`` (shards, F) of ``num_rows`` loads; ``row[i]`` is shard i's load."""
            emb = self.table(x)
            summed = emb.new_zeros(num_rows, emb.shape[-1]).index_add_(0, row, emb)
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
    return {"compute": compute, "fwd": CommNet(3), "bwd": CommNet(2)}


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
    ):
        if compute_members < 1:
            raise ValueError(f"compute_members must be >= 1, got {compute_members}")
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

    # ------------------------------------------------------------- description

    def _architecture(self) -> dict[str, Any]:
        return {
            "num_features": NUM_FEATURES,
            "table_hidden": list(self.table_hidden),
            "embed_dim": self.embed_dim,
            "head_hidden": list(self.head_hidden),
            "comm_encoder": list(self.comm_encoder),
            "comm_head": list(self.comm_head),
            "compute_members": self.compute_members,
        }

    @property
    def embedding_width(self) -> int:
        """Columns of :meth:`shard_embeddings`: ``embed_dim`` per compute member."""
        return self.embed_dim * self.compute_members

    # ------------------------------------------------------------- inputs

    def _table_inputs(self, feats: np.ndarray) -> np.ndarray:
        return ((feats - self.feature_mean_) / self.feature_std_).astype(np.float32)

    def _comm_inputs(
        self, dim_sums: np.ndarray, waits_ms: np.ndarray | None, mask: np.ndarray | None = None
    ) -> np.ndarray:
        """Per-device inputs ``(B, N, 2 or 3)``: dim sum / scale, 1/N, [wait gap / scale]."""
        d = np.asarray(dim_sums, dtype=np.float64)
        if mask is None:
            mask = np.ones(d.shape, dtype=bool)
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
    ) -> NeuralCostModel:
        """Train the three nets on collected data and record test metrics in ``metrics_``.

        Splits default to 80/10/10 by a permutation seeded with ``seed``; the validation
        part picks the best epoch, the test part gives ``metrics_``. ``trainer`` trains
        each net (default :func:`~neuroshard.models.training.fit_net` in this process;
        :func:`~neuroshard.models.training.file_checkpointed` resumes from files, and the
        pretrain pipeline injects a distributed one on Ray Train).
        """
        import torch

        from neuroshard.models.training import TrainConfig, fit_net

        if self.fwd_target not in FWD_TARGETS:
            raise ValueError(f"fwd_target must be one of {FWD_TARGETS}, got {self.fwd_target!r}")

        cs, ms = self._begin_fit(
            compute,
            comm,
            compute_split=compute_split,
            comm_split=comm_split,
            backend_name=backend_name,
            num_devices=num_devices,
        )

        # normalisation from the training rows only
        tr_compute = compute.subset(cs.train)
        feats = transform_raw(tr_compute.features)
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

    def _fwd_label(self, comm: CommData) -> np.ndarray:
        """What the forward net learns: the time, or the time less the straggler wait."""
        if self.fwd_target == "total":
            return comm.fwd_ms
        return comm.fwd_ms - straggler_wait(comm.waits_ms, comm.mask)

    def _compute_tensors(self, data: ComputeData) -> Ragged:
        import torch

        from neuroshard.models.training import Ragged

        x = self._table_inputs(transform_raw(data.features))
        return Ragged(
            torch.from_numpy(x),
            torch.from_numpy(data.offsets),
            torch.from_numpy(self._to_target(data.label_ms, "compute")),
        )

    def _comm_tensors(self, data: CommData, which: str) -> Dense:
        import torch

        from neuroshard.models.training import Dense

        x = self._comm_inputs(data.dim_sums, data.waits_ms if which == "fwd" else None, data.mask)
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
        return self._embed(self._table_inputs(table_features(specs)))

    def _embed(self, x: np.ndarray) -> np.ndarray:
        if len(self.np_tables_) == 1:
            return self.np_tables_[0](x)
        return np.concatenate([table(x) for table in self.np_tables_], axis=1)

    def compute_from_embeddings(
        self, summed: np.ndarray, counts: np.ndarray | None = None
    ) -> np.ndarray:
        """Compute ms from summed shard embeddings ``(B, embedding_width)``; rows whose
        ``counts`` (shards per device, optional) are 0 cost 0. Members are averaged in
        the log space they were trained in."""
        self._check_fitted()
        summed = np.asarray(summed, dtype=np.float32).reshape(-1, self.embedding_width)
        e = self.embed_dim
        y = sum(head(summed[:, i * e : (i + 1) * e])[:, 0] for i, head in enumerate(self.np_heads_))
        out = self._from_target(np.asarray(y) / len(self.np_heads_), "compute")
        if counts is not None:
            out = np.where(np.asarray(counts).reshape(-1) > 0, out, 0.0)
        return out

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
        x = self._comm_inputs(d, waits_ms, mask)
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
            self.shard_embeddings_raw(data.features), np.diff(data.offsets)
        )

    def shard_embeddings_raw(self, raw: np.ndarray) -> np.ndarray:
        """:meth:`shard_embeddings` from raw feature rows ``(n, 20)`` (collected data)."""
        self._check_fitted()
        return self._embed(self._table_inputs(transform_raw(raw)))

    # ------------------------------------------------------------- files

    def meta(self) -> dict[str, Any]:
        """What ``meta.json`` records (without the file checksums)."""
        return {
            **self._base_meta(),
            "target_transform": TARGET_TRANSFORM,
            "fwd_target": self.fwd_target,
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
                eps_ms=float(norm["eps_ms"]),
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
            if int(arch["num_features"]) != NUM_FEATURES:
                raise ValueError(f"num_features {arch['num_features']} != {NUM_FEATURES}")
            model.feature_mean_ = np.asarray(norm["feature_mean"], dtype=np.float64)
            model.feature_std_ = np.asarray(norm["feature_std"], dtype=np.float64)
            if model.feature_mean_.shape != (NUM_FEATURES,) or model.feature_std_.shape != (
                NUM_FEATURES,
            ):
                raise ValueError("feature normalisation has the wrong length")
            target = norm["target"]
            model.target_stats_ = {
                k: (float(target[k][0]), float(target[k][1])) for k in ("compute", "fwd", "bwd")
            }
            if not all(np.isfinite(v).all() and v[1] > 0 for v in model.target_stats_.values()):
                raise ValueError("target normalisation is not finite and positive")
            model.dim_scale_ = float(norm["dim_scale"])
            model.wait_scale_ = float(norm["wait_scale"])
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

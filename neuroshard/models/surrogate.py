"""The SurCo prior: a small net that predicts a surrogate's compute coefficients.

The SurCo search's ``"prior"`` variant needs, for every shard ``s`` and device ``d``,
``c[s, d]``: the change in ``d``'s compute when ``s`` joins or leaves it. The ``"zero"``
variant measures it by finite differences; the prior predicts it as a ratio to the
shard's single-shard compute, from :func:`pair_features` (the shard's features and what
else sits on ``d``).

:class:`SurrogatePrior` is a model like the cost models: hyperparameters in
``__init__``, :meth:`~SurrogatePrior.fit` on pairs, the shared MLP builder and training
loop (:mod:`neuroshard.models.training`, best validation epoch, early stopping), and a
checksummed model directory (``prior.pt`` and ``meta.json`` of kind ``"surco-prior"``,
:mod:`neuroshard.models.base`). The search package produces its training pairs (by
running the zero variant on training tasks) and calls :meth:`~SurrogatePrior.fit`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuroshard.features import FEATURE_SCHEMA, NUM_FEATURES, table_features
from neuroshard.models.base import (
    META_FILE,
    atomic_write,
    check_compatible,
    checked_file,
    read_meta,
    write_meta,
)
from neuroshard.types import ModelFileError, TableSpec

logger = logging.getLogger(__name__)

__all__ = ["KIND", "NUM_PAIR_FEATURES", "PRIOR_FILE", "SurrogatePrior", "pair_features"]

KIND = "surco-prior"
PRIOR_FILE = "prior.pt"
NUM_PAIR_FEATURES = 2 * NUM_FEATURES + 5
_GIB = float(1 << 30)


def pair_features(
    specs: Sequence[TableSpec],
    devices: np.ndarray,
    num_devices: int,
    single_ms: np.ndarray,
    features: np.ndarray | None = None,
) -> np.ndarray:
    """Inputs of :class:`SurrogatePrior`, ``(S * D, F)`` rows in ``(s, d)`` order.

    Per pair: the shard's 20 model features; the mean features of the *other* shards on
    device ``d``; ``log1p`` of their count, dim sum and GiB; whether ``s`` sits on ``d``;
    ``log`` of the shard's single-shard compute (ms). ``devices[s]`` is shard ``s``'s
    device, ``-1`` when not placed.
    """
    feats = table_features(specs) if features is None else features
    num_shards = len(specs)
    widths = np.asarray([s.dim for s in specs], dtype=float)
    gib = np.asarray([s.size_bytes for s in specs], dtype=float) / _GIB
    placed = devices >= 0
    sums = np.zeros((num_devices, feats.shape[1]))
    np.add.at(sums, devices[placed], feats[placed])
    count = np.bincount(devices[placed], minlength=num_devices).astype(float)
    dim = np.bincount(devices[placed], weights=widths[placed], minlength=num_devices)
    mem = np.bincount(devices[placed], weights=gib[placed], minlength=num_devices)
    on = (devices[:, None] == np.arange(num_devices)[None, :]).astype(float)  # (S, D)
    o_sums = sums[None, :, :] - on[:, :, None] * feats[:, None, :]
    o_count = count[None, :] - on
    o_mean = o_sums / np.maximum(o_count, 1.0)[:, :, None]
    o_dim = dim[None, :] - on * widths[:, None]
    o_mem = mem[None, :] - on * gib[:, None]
    own = np.broadcast_to(feats[:, None, :], (num_shards, num_devices, feats.shape[1]))
    single = np.broadcast_to(
        np.log(np.maximum(single_ms, 1e-9))[:, None], (num_shards, num_devices)
    )
    out = np.concatenate(
        [
            own,
            o_mean,
            np.log1p(o_count)[..., None],
            np.log1p(np.maximum(o_dim, 0.0))[..., None],
            np.log1p(np.maximum(o_mem, 0.0))[..., None],
            on[..., None],
            single[..., None],
        ],
        axis=-1,
    )
    return out.reshape(num_shards * num_devices, -1).astype(np.float32)


class SurrogatePrior:
    """A small MLP predicting ``c[s, d] / single_ms[s]`` from :func:`pair_features`.

    Hyperparameters in ``__init__``; :meth:`fit` learns the attributes ending in ``_``.
    """

    kind = KIND
    meta_: dict[str, Any]  # meta.json of a loaded prior

    def __init__(
        self,
        *,
        hidden: Sequence[int] = (64, 64),
        lr: float = 1e-3,
        max_epochs: int = 200,
        patience: int = 30,
        batch_size: int = 256,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_threads: int = 1,
    ):
        self.hidden = tuple(hidden)
        self.lr = lr
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_threads = num_threads

    def _hyperparameters(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "lr",
                "max_epochs",
                "patience",
                "batch_size",
                "val_fraction",
                "seed",
                "num_threads",
            )
        }

    def _net(self) -> Any:
        from torch import nn

        from neuroshard.models.training import mlp

        # Flatten: one prediction per row, shaped like the target
        return nn.Sequential(*mlp([NUM_PAIR_FEATURES, *self.hidden, 1]), nn.Flatten(0))

    def fit(self, X: np.ndarray, y: np.ndarray) -> SurrogatePrior:
        """Train on pair features ``X`` and ratios ``y`` (fitted ``c`` over single compute);
        the best epoch on a held-out ``val_fraction`` is kept."""
        import torch

        from neuroshard.models.training import Dense, TrainConfig, fit_net

        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.float32).reshape(-1)
        if X.ndim != 2 or X.shape[1] != NUM_PAIR_FEATURES or len(X) != len(y) or len(y) < 2:
            raise ValueError(
                f"need X (n, {NUM_PAIR_FEATURES}) and y (n,) with n >= 2, got "
                f"{X.shape} and {y.shape}"
            )
        order = np.random.default_rng(self.seed).permutation(len(y))
        n_val = max(1, int(round(self.val_fraction * len(y))))
        val = order[:n_val]
        train = order[n_val:] if len(y) > n_val else order  # tiny sets: train on all
        self.x_mean_ = X[train].mean(axis=0)
        std = X[train].std(axis=0)
        self.x_std_ = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        self.y_mean_ = float(y[train].mean())
        self.y_std_ = float(max(y[train].std(), 1e-6))
        xt = torch.from_numpy(((X - self.x_mean_) / self.x_std_).astype(np.float32))
        yt = torch.from_numpy(((y - self.y_mean_) / self.y_std_).astype(np.float32))
        with torch.random.fork_rng():  # seeded initialisation, global RNG left alone
            torch.manual_seed(self.seed)
            net = self._net()
        config = TrainConfig(
            lr=self.lr,
            batch_size=self.batch_size,
            max_epochs=self.max_epochs,
            patience=self.patience,
            seed=self.seed,
            num_threads=self.num_threads,
        )
        tr, va = torch.from_numpy(train), torch.from_numpy(val)
        result = fit_net(
            net, Dense((xt[tr],), yt[tr]), Dense((xt[va],), yt[va]), config, "surco prior"
        )
        self.net_ = net
        self.best_epoch_ = result.best_epoch
        self.val_mae_ = float(np.mean(np.abs(self.predict(X[val]) - y[val])))
        self.num_pairs_ = int(len(y))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted ratios ``c / single_ms`` for pair features ``X``."""
        import torch

        if not hasattr(self, "net_"):
            raise RuntimeError("SurrogatePrior is not fitted: call fit() or load()")
        x = torch.from_numpy(
            ((np.asarray(X, dtype=np.float32) - self.x_mean_) / self.x_std_).astype(np.float32)
        )
        with torch.no_grad():
            out = self.net_(x).numpy().astype(float)
        return out * self.y_std_ + self.y_mean_

    # ------------------------------------------------------------- files

    def meta(self, **extra: Any) -> dict[str, Any]:
        """What ``meta.json`` records (without the file checksums); ``extra`` (what it was
        trained for: estimator, device count, tasks) goes under ``provenance``."""
        return {
            "kind": self.kind,
            "feature_schema": FEATURE_SCHEMA,
            "num_pair_features": NUM_PAIR_FEATURES,
            "architecture": {"hidden": list(self.hidden)},
            "hyperparameters": self._hyperparameters(),
            "normalisation": {
                "x_mean": self.x_mean_.tolist(),
                "x_std": self.x_std_.tolist(),
                "y_mean": self.y_mean_,
                "y_std": self.y_std_,
            },
            "num_pairs": self.num_pairs_,
            "best_epoch": self.best_epoch_,
            "val_mae_ratio": self.val_mae_,
            "provenance": dict(extra),
        }

    def save(self, path: str | os.PathLike, **extra: Any) -> Path:
        """Write ``prior.pt`` (state_dict) and ``meta.json`` into the directory ``path``."""
        import torch

        if not hasattr(self, "net_"):
            raise RuntimeError("SurrogatePrior is not fitted: call fit() or load()")
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = self.net_.state_dict()
        atomic_write(out / PRIOR_FILE, lambda tmp: torch.save(state, tmp))
        write_meta(out, self.meta(**extra), (PRIOR_FILE,))
        logger.info(
            "saved surrogate prior (%d pairs, val MAE %.3f) to %s",
            self.num_pairs_,
            self.val_mae_,
            out,
        )
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> SurrogatePrior:
        """A fitted prior from the directory ``path`` (``meta`` if already read)."""
        import torch

        d = Path(path)
        meta = dict(meta) if meta is not None else read_meta(d)
        check_compatible(meta, kind=KIND)
        try:
            if meta.get("num_pair_features") != NUM_PAIR_FEATURES:
                raise ValueError(
                    f"num_pair_features {meta.get('num_pair_features')!r} != {NUM_PAIR_FEATURES}"
                )
            hyper = {
                k: v
                for k, v in dict(meta.get("hyperparameters", {})).items()
                if k in cls().__dict__
            }
            prior = cls(hidden=[int(h) for h in meta["architecture"]["hidden"]], **hyper)
            norm = meta["normalisation"]
            prior.x_mean_ = np.asarray(norm["x_mean"], dtype=np.float32)
            prior.x_std_ = np.asarray(norm["x_std"], dtype=np.float32)
            if prior.x_mean_.shape != (NUM_PAIR_FEATURES,) or prior.x_std_.shape != (
                NUM_PAIR_FEATURES,
            ):
                raise ValueError("feature normalisation has the wrong length")
            prior.y_mean_, prior.y_std_ = float(norm["y_mean"]), float(norm["y_std"])
            prior.num_pairs_ = int(meta.get("num_pairs", 0))
            prior.best_epoch_ = int(meta.get("best_epoch", -1))
            prior.val_mae_ = float(meta.get("val_mae_ratio", math.nan))
            net = prior._net()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelFileError(f"{d / META_FILE}: bad or missing entry ({exc!r})") from exc
        weights = checked_file(d, PRIOR_FILE, meta.get("files", {}))
        try:
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except Exception as exc:  # noqa: BLE001 -- any unreadable checkpoint is one error
            raise ModelFileError(f"{weights}: unreadable or wrong shape ({exc})") from exc
        prior.net_ = net.eval()
        prior.meta_ = meta
        return prior

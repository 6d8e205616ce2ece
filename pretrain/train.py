"""Training loops and metrics for the neural cost models.

One loop serves every net: Adam (lr 1e-3), minibatches of 512, MSE on the transformed
target (a mask leaves padding out of the loss), the state of the epoch with the lowest
validation loss kept, and early stopping after ``patience`` epochs without improvement.
Optionally the learning rate halves when validation stalls (``lr_decay_patience``).
Everything is seeded, and torch runs on a small, fixed number of threads.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["Dense", "Ragged", "TrainConfig", "TrainResult", "fit_net", "regression_metrics",
           "torch_threads"]


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-3
    batch_size: int = 512  # training minibatch, not the DLRM batch
    max_epochs: int = 200
    patience: int = 25  # epochs without a better validation loss before stopping
    weight_decay: float = 0.0
    # halve the learning rate after this many epochs without a better validation loss
    # (down to lr / 64); None keeps it constant
    lr_decay_patience: int | None = None
    seed: int = 0
    num_threads: int = 1
    max_seconds: float | None = None  # wall-clock budget for one net; None: no limit


@dataclass
class TrainResult:
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    seconds: float
    history: list[tuple[float, float]] = field(default_factory=list)  # (train, val) loss


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the old setting after."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


class Dense:
    """Rows of equally shaped tensors: ``net(*inputs[idx])`` predicts ``target[idx]``;
    ``weight`` (the target's shape, or None) masks padding out of the loss."""

    def __init__(self, inputs: Sequence[torch.Tensor], target: torch.Tensor,
                 weight: torch.Tensor | None = None):
        self.inputs, self.target, self.weight = tuple(inputs), target, weight

    def __len__(self) -> int:
        return len(self.target)

    def batch(self, idx: torch.Tensor | slice):
        return (tuple(x[idx] for x in self.inputs), self.target[idx],
                None if self.weight is None else self.weight[idx])


class Ragged:
    """Rows of varying numbers of items (a device load's tables) without padding.

    ``items`` is ``(total items, F)``; row ``i`` owns ``items[offsets[i]:offsets[i+1]]``.
    A batch calls ``net(items_of_the_batch, row_of_each_item, num_rows)``, so the net
    pays for real items only (padding to the longest load would multiply the work).
    """

    def __init__(self, items: torch.Tensor, offsets: torch.Tensor, target: torch.Tensor):
        self.items, self.target = items, target
        self.offsets = offsets.to(torch.int64)
        self.counts = self.offsets[1:] - self.offsets[:-1]

    def __len__(self) -> int:
        return len(self.target)

    def batch(self, idx: torch.Tensor | slice):
        if isinstance(idx, slice):
            idx = torch.arange(len(self))[idx]
        counts = self.counts[idx]
        starts = self.offsets[:-1][idx]
        total = int(counts.sum())
        first = torch.cumsum(counts, 0) - counts  # where each row starts in the batch
        take = torch.repeat_interleave(starts - first, counts) + torch.arange(total)
        row = torch.repeat_interleave(torch.arange(len(idx)), counts)
        return (self.items[take], row, len(idx)), self.target[idx], None


Batches = Dense | Ragged


def _as_batches(data: "Batches | tuple") -> Batches:
    return data if isinstance(data, (Dense, Ragged)) else Dense(*data)


def _masked_mse(pred: torch.Tensor, target: torch.Tensor,
                weight: torch.Tensor | None) -> torch.Tensor:
    err = (pred - target) ** 2
    if weight is None:
        return err.mean()
    return (err * weight).sum() / weight.sum().clamp(min=1.0)


def _loss_on(net: nn.Module, data: Batches, chunk: int = 8192) -> float:
    """Mean loss over a whole split, evaluated in chunks without gradients."""
    total, denom = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(data), chunk):
            inputs, target, weight = data.batch(slice(i, i + chunk))
            err = (net(*inputs) - target) ** 2
            if weight is None:
                total += float(err.sum())
                denom += err.numel()
            else:
                total += float((err * weight).sum())
                denom += float(weight.sum())
    return total / max(denom, 1.0)


def fit_net(net: nn.Module, train: "Batches | tuple", val: "Batches | tuple",
            config: TrainConfig = TrainConfig(), label: str = "net") -> TrainResult:
    """Train ``net`` in place and leave it holding its best-validation-epoch weights.

    ``train`` and ``val`` are :class:`Dense` or :class:`Ragged` data, or a tuple
    ``(inputs, target, weight)`` taken as :class:`Dense`.
    """
    train, val = _as_batches(train), _as_batches(val)
    n = len(train)
    if n == 0:
        raise ValueError(f"{label}: no training rows")
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    has_val = len(val) > 0
    sched = None
    if config.lr_decay_patience is not None:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=0.5, patience=config.lr_decay_patience, min_lr=config.lr / 64)
    best_state = copy.deepcopy(net.state_dict())
    best_loss, best_epoch = float("inf"), -1
    history: list[tuple[float, float]] = []
    start = time.perf_counter()
    epoch = 0
    with torch_threads(config.num_threads):
        for epoch in range(config.max_epochs):
            net.train()
            perm = torch.randperm(n, generator=gen)
            run, seen = 0.0, 0
            for i in range(0, n, config.batch_size):
                idx = perm[i: i + config.batch_size]
                inputs, target, weight = train.batch(idx)
                loss = _masked_mse(net(*inputs), target, weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                run += loss.item() * len(idx)
                seen += len(idx)
            net.eval()
            train_loss = run / seen
            val_loss = _loss_on(net, val) if has_val else train_loss
            history.append((train_loss, val_loss))
            if sched is not None:
                sched.step(val_loss)
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best_state = copy.deepcopy(net.state_dict())
            elif epoch - best_epoch >= config.patience:
                break
            if config.max_seconds is not None and time.perf_counter() - start > config.max_seconds:
                logger.info("%s: stopping at the %.0f s budget (epoch %d)", label,
                            config.max_seconds, epoch)
                break
    net.load_state_dict(best_state)
    net.eval()
    seconds = time.perf_counter() - start
    logger.info("%s: best epoch %d of %d, val loss %.5f, %.1f s", label, best_epoch,
                epoch + 1, best_loss, seconds)
    return TrainResult(best_epoch, best_loss, epoch + 1, seconds, history)


def regression_metrics(pred_ms: np.ndarray, true_ms: np.ndarray,
                       eps_ms: float = 1e-3) -> dict[str, float]:
    """MAPE (fraction), Spearman rank correlation and MSE of ``log(ms + eps)``."""
    pred = np.asarray(pred_ms, dtype=float).ravel()
    true = np.asarray(true_ms, dtype=float).ravel()
    if len(true) == 0:
        return {"n": 0, "mape": float("nan"), "spearman": float("nan"),
                "mse_log": float("nan")}
    mape = float(np.mean(np.abs(pred - true) / np.maximum(np.abs(true), eps_ms)))
    if len(true) > 1 and np.ptp(true) > 0 and np.ptp(pred) > 0:
        spearman = float(pd.Series(pred).rank().corr(pd.Series(true).rank()))
    else:
        spearman = float("nan")
    mse_log = float(np.mean((np.log(np.maximum(pred, 0) + eps_ms)
                             - np.log(np.maximum(true, 0) + eps_ms)) ** 2))
    return {"n": int(len(true)), "mape": mape, "spearman": spearman, "mse_log": mse_log}

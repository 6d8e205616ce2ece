"""The one training loop and the one MLP builder of every learned model.

One loop serves every net: Adam (lr 1e-3), minibatches of 512, MSE on the transformed
target (a mask leaves padding out of the loss), the state of the epoch with the lowest
validation loss kept, and early stopping after ``patience`` epochs without improvement.
Optionally the learning rate halves when validation stalls (``lr_decay_patience``).
Everything is seeded, and torch runs on a small, fixed number of threads.

Two things make the loop fit for long or distributed jobs:

* a :class:`Checkpointer` saves the whole training state every ``checkpoint_every``
  epochs, and a restarted :func:`fit_net` carries on from the last save, ending with the
  same weights an uninterrupted run would have (:class:`FileCheckpointer` keeps it in one
  file; the pretrain pipeline's Ray Train trainer keeps it in Ray Train's storage);
* when ``torch.distributed`` is initialised (Ray Train's workers), each rank computes the
  gradient on its share of every minibatch and the gradients are averaged across ranks
  before the step, so the ranks keep identical weights and take the same decisions.

A model trains its nets through a :class:`TrainFn` (:func:`fit_net` by default), so a
distributed trainer can be injected without the model knowing about it.

:func:`mlp` builds every stack of Linear and ReLU layers; :class:`NumpyMLP` is its
inference copy in numpy, cheaper than torch for the small batches a search sends.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from neuroshard.atomic import atomic_write
from neuroshard.types import ModelFileError

logger = logging.getLogger(__name__)

__all__ = [
    "Batches",
    "Checkpointer",
    "Dense",
    "FileCheckpointer",
    "NumpyMLP",
    "Ragged",
    "TrainConfig",
    "TrainFn",
    "TrainResult",
    "file_checkpointed",
    "fit_net",
    "mlp",
    "run_name",
    "torch_threads",
]


def mlp(sizes: Sequence[int], final_relu: bool = False) -> nn.Sequential:
    """Linear layers ``sizes[0] -> sizes[1] -> ... -> sizes[-1]`` with a ReLU between
    each two (and after the last when ``final_relu``)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class NumpyMLP:
    """Inference copy of an ``nn.Sequential`` of Linear/ReLU layers, in float32 numpy."""

    def __init__(self, seq: nn.Module):
        self.layers: list[tuple[np.ndarray, np.ndarray, bool]] = []
        mods = list(cast(nn.Sequential, seq))
        for i, mod in enumerate(mods):
            if isinstance(mod, nn.Linear):
                relu = i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU)
                self.layers.append(
                    (
                        mod.weight.detach().numpy().T.astype(np.float32).copy(),
                        mod.bias.detach().numpy().astype(np.float32).copy(),
                        relu,
                    )
                )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for w, b, relu in self.layers:
            x = x @ w + b
            if relu:
                np.maximum(x, 0.0, out=x)
        return x


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
    checkpoint_every: int = 1  # epochs between saves when fit_net is given a checkpointer


@dataclass
class TrainResult:
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    seconds: float
    history: list[tuple[float, float]] = field(default_factory=list)  # (train, val) loss
    resumed_after: int | None = None  # the checkpointed epoch this run carried on from


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

    def __init__(
        self,
        inputs: Sequence[torch.Tensor],
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
    ):
        self.inputs, self.target, self.weight = tuple(inputs), target, weight

    def __len__(self) -> int:
        return len(self.target)

    def batch(self, idx: torch.Tensor | slice):
        return (
            tuple(x[idx] for x in self.inputs),
            self.target[idx],
            None if self.weight is None else self.weight[idx],
        )


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


class Checkpointer(Protocol):
    """Where :func:`fit_net` keeps its training state between epochs."""

    def load(self) -> dict[str, Any] | None:
        """The last saved state, or None to start from scratch."""

    def save(self, state: dict[str, Any], *, epoch: int, val_loss: float) -> None:
        """Keep ``state`` (tensors, numbers, lists and dicts only) for :meth:`load`."""


class TrainFn(Protocol):
    """What a cost model calls to train one of its nets (:func:`fit_net` or a
    distributed stand-in with the same contract)."""

    def __call__(
        self, net: nn.Module, train: Batches, val: Batches, config: TrainConfig, label: str
    ) -> TrainResult: ...


class FileCheckpointer:
    """The state in one file, replaced atomically; read back with ``weights_only=True``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self) -> dict[str, Any] | None:
        """The saved state, None when there is none; :class:`ModelFileError` naming the
        file when it cannot be read (delete it to start that net afresh)."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 -- truncated, corrupt or not a checkpoint
            raise ModelFileError(
                f"{self.path}: unreadable training checkpoint "
                f"({type(exc).__name__}); delete it to train that net "
                "from the start"
            ) from exc
        if not isinstance(state, dict):
            raise ModelFileError(
                f"{self.path}: not a training checkpoint; delete it to "
                "train that net from the start"
            )
        return state

    def save(self, state: dict[str, Any], *, epoch: int, val_loss: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))  # a unique temp name


def _world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, or ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_gradients(params: Sequence[torch.Tensor], world: int) -> None:
    """All-reduce the gradients of ``params`` in one flat buffer and divide by ``world``."""
    import torch.distributed as dist

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def _any_rank(flag: bool, world: int) -> bool:
    """True on every rank when ``flag`` is true on any (so the ranks stop together)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _as_batches(data: Batches | tuple) -> Batches:
    return data if isinstance(data, (Dense, Ragged)) else Dense(*data)


def _masked_mse(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """Mean squared error; a ``pred`` with one more (last) dimension than ``target`` holds
    one prediction per ensemble member, each held to the same target."""
    if pred.dim() == target.dim() + 1:
        target = target.unsqueeze(-1)
        weight = None if weight is None else weight.unsqueeze(-1).expand_as(pred)
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


def fit_net(
    net: nn.Module,
    train: Batches | tuple,
    val: Batches | tuple,
    config: TrainConfig = TrainConfig(),
    label: str = "net",
    checkpointer: Checkpointer | None = None,
) -> TrainResult:
    """Train ``net`` in place and leave it holding its best-validation-epoch weights.

    ``train`` and ``val`` are :class:`Dense` or :class:`Ragged` data, or a tuple
    ``(inputs, target, weight)`` taken as :class:`Dense`. With a ``checkpointer`` the state
    is saved every ``config.checkpoint_every`` epochs and at the end, and a saved state is
    resumed from. Under ``torch.distributed`` every rank must call this with the same data
    and config; rank ``r`` of ``w`` trains on rows ``r::w`` of each minibatch.
    """
    train, val = _as_batches(train), _as_batches(val)
    n = len(train)
    if n == 0:
        raise ValueError(f"{label}: no training rows")
    rank, world = _world()
    params = [p for p in net.parameters() if p.requires_grad]
    if world > 1:
        import torch.distributed as dist

        for p in net.state_dict().values():  # every rank starts from rank 0's weights
            dist.broadcast(p, src=0)
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    has_val = len(val) > 0
    sched = None
    if config.lr_decay_patience is not None:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=0.5, patience=config.lr_decay_patience, min_lr=config.lr / 64
        )
    best_state = copy.deepcopy(net.state_dict())
    best_loss, best_epoch = float("inf"), -1
    history: list[tuple[float, float]] = []
    first_epoch, done, spent, resumed_after = 0, False, 0.0, None
    saved = checkpointer.load() if checkpointer is not None else None
    if saved is not None:
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["opt"])
        if sched is not None and saved.get("sched") is not None:
            sched.load_state_dict(saved["sched"])
        gen.set_state(saved["gen"])
        best_state = saved["best_state"]
        best_loss, best_epoch = float(saved["best_loss"]), int(saved["best_epoch"])
        history = [(float(a), float(b)) for a, b in saved["history"]]
        first_epoch, done = int(saved["epoch"]) + 1, bool(saved["done"])
        spent = float(saved["seconds"])
        resumed_after = first_epoch - 1
        logger.info(
            "%s: resuming after epoch %d (best %d, val loss %.5f)%s",
            label,
            first_epoch - 1,
            best_epoch,
            best_loss,
            ", already finished" if done else "",
        )

    def save(epoch: int, finished: bool) -> None:
        if checkpointer is None:
            return
        state = {
            "net": net.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict() if sched is not None else None,
            "gen": gen.get_state(),
            "best_state": best_state,
            "best_loss": best_loss,
            "best_epoch": best_epoch,
            "history": [list(h) for h in history],
            "epoch": epoch,
            "done": finished,
            "resumed_after": resumed_after,
            "seconds": spent + time.perf_counter() - start,
        }
        checkpointer.save(state, epoch=epoch, val_loss=history[-1][1] if history else best_loss)

    start = time.perf_counter()
    epoch = first_epoch - 1
    with torch_threads(config.num_threads):
        for epoch in range(first_epoch, 0 if done else config.max_epochs):
            net.train()
            perm = torch.randperm(n, generator=gen)
            run, seen = 0.0, 0
            for i in range(0, n, config.batch_size):
                idx = perm[i : i + config.batch_size][rank::world]
                opt.zero_grad(set_to_none=True)
                if len(idx):
                    inputs, target, weight = train.batch(idx)
                    loss = _masked_mse(net(*inputs), target, weight)
                    loss.backward()
                    run += loss.item() * len(idx)
                    seen += len(idx)
                if world > 1:
                    _average_gradients(params, world)
                opt.step()
            net.eval()
            train_loss = run / max(seen, 1)
            val_loss = _loss_on(net, val) if has_val else train_loss
            history.append((train_loss, val_loss))
            if sched is not None:
                sched.step(val_loss)
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best_state = copy.deepcopy(net.state_dict())
            elif epoch - best_epoch >= config.patience:
                break
            over = (
                config.max_seconds is not None
                and spent + time.perf_counter() - start > config.max_seconds
            )
            if _any_rank(over, world):
                logger.info(
                    "%s: stopping at the %.0f s budget (epoch %d)", label, config.max_seconds, epoch
                )
                break
            if (epoch + 1) % max(config.checkpoint_every, 1) == 0:
                save(epoch, False)
        if not done:
            save(epoch, True)
    net.load_state_dict(best_state)
    net.eval()
    seconds = spent + time.perf_counter() - start
    logger.info(
        "%s: best epoch %d of %d, val loss %.5f, %.1f s",
        label,
        best_epoch,
        epoch + 1,
        best_loss,
        seconds,
    )
    return TrainResult(best_epoch, best_loss, epoch + 1, seconds, history, resumed_after)


def _digest_tensors(h: hashlib._Hash, tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().numpy().tobytes())


def _batch_tensors(data: Batches) -> list[torch.Tensor]:
    if isinstance(data, Ragged):
        return [data.items, data.offsets, data.target]
    return [*data.inputs, data.target] + ([] if data.weight is None else [data.weight])


def run_name(net: nn.Module, train: Batches, val: Batches, config: TrainConfig, label: str) -> str:
    """``label-<hash>``: the same net (shapes and initial weights), data and config give
    the same name, so a restarted training finds its own checkpoints and no other's."""
    h = hashlib.sha256(repr(sorted(asdict(config).items())).encode())
    _digest_tensors(h, list(net.state_dict().values()))
    _digest_tensors(h, _batch_tensors(train) + _batch_tensors(val))
    safe = "".join(c if c.isalnum() else "-" for c in label)
    return f"{safe}-{h.hexdigest()[:16]}"


def file_checkpointed(checkpoint_dir: str | os.PathLike) -> TrainFn:
    """:func:`fit_net` saving every epoch to ``checkpoint_dir/<run_name>.pt``, so a
    restarted training of the same net on the same data resumes where it stopped."""
    root = Path(checkpoint_dir)

    def train(
        net: nn.Module, train: Batches, val: Batches, config: TrainConfig, label: str
    ) -> TrainResult:
        name = run_name(net, train, val, config, label)
        return fit_net(net, train, val, config, label, FileCheckpointer(root / f"{name}.pt"))

    return train

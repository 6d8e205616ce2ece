"""Data-parallel training of the cost-model nets on Ray Train, resumable from checkpoints.

:func:`ray_training` gives a :class:`~neuroshard.models.training.TrainFn`: each net is
trained by a :class:`ray.train.torch.TorchTrainer` whose workers run the same
:func:`~neuroshard.models.training.fit_net` as single-process training, on a gloo process
group, each on its share of every minibatch (see :mod:`neuroshard.models.training`). The
pipeline injects it into :meth:`~neuroshard.models.neural.NeuralCostModel.fit`.

Rank 0 reports the training state to Ray Train every ``checkpoint_every`` epochs. A run
is named after the net, its data and its config, under ``storage_dir``: starting the same
training again (after a crash, a kill or a lost node) finds the run's checkpoints there
and every worker resumes from the latest one. A finished run, started again, returns its
weights without training.

The embedded local cluster starts with one CPU per worker, as for collection
(:func:`~neuroshard.pretrain.ray_jobs.collect_ray`); ``address`` joins an existing cluster
(:func:`~neuroshard.pretrain.ray_jobs.connect_ray`). Ray Train's workers, wherever they
run, write and read the checkpoints under ``storage_dir`` themselves, so on a cluster of
several machines it must be storage every node reaches at the same path (a shared file
system) or a URI such as ``s3://bucket/prefix``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroshard.models.training import (
    Batches,
    TrainConfig,
    TrainFn,
    TrainResult,
    fit_net,
    run_name,
)

logger = logging.getLogger(__name__)

__all__ = ["ray_training", "storage_location"]

_STATE_FILE = "state.pt"


class _ReportCheckpointer:
    """fit_net's state as Ray Train checkpoints: every rank reports (Ray Train requires
    it), rank 0 attaches the state."""

    def __init__(self) -> None:
        import ray.train

        self._train = ray.train
        self._rank = ray.train.get_context().get_world_rank()

    def load(self) -> dict[str, Any] | None:
        ckpt = self._train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return torch.load(Path(d) / _STATE_FILE, map_location="cpu", weights_only=True)

    def save(self, state: dict[str, Any], *, epoch: int, val_loss: float) -> None:
        metrics = {"epoch": epoch, "val_loss": val_loss, "done": bool(state["done"])}
        if self._rank != 0:
            self._train.report(metrics, checkpoint=None)
            return
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / _STATE_FILE)
            self._train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def _worker_loop(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    logging.getLogger("neuroshard").setLevel(cfg["log_level"])
    fit_net(
        cfg["net"],
        cfg["train"],
        cfg["val"],
        cfg["config"],
        cfg["label"],
        checkpointer=_ReportCheckpointer(),
    )


@contextmanager
def ray_training(
    *,
    workers: int,
    storage_dir: str | os.PathLike,
    address: str | None = None,
    checkpoint_every: int = 10,
) -> Iterator[TrainFn]:
    """Yield a :class:`~neuroshard.models.training.TrainFn` that trains on ``workers`` Ray
    Train workers, saving every ``checkpoint_every`` epochs under ``storage_dir``.

    Ray is started (or joined at ``address``) once for every net trained in the block,
    unless it already runs (a pretrain's session), and shut down after it. A save goes
    through Ray Train's report and persistence, which take seconds, so saving every epoch
    would dominate small nets' training time.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    import ray

    from neuroshard.pretrain.ray_jobs import init_ray

    storage = storage_location(storage_dir)
    owned = init_ray(workers, address)
    try:
        yield partial(
            _train_on_ray, workers=workers, storage=storage, checkpoint_every=checkpoint_every
        )
    finally:
        if owned:
            ray.shutdown()


def storage_location(storage: str | os.PathLike) -> str:
    """Ray Train's ``storage_path`` for ``storage``: a URI (``scheme://...``) as given, a
    local or shared path made absolute (every node resolves it alike)."""
    text = os.fspath(storage)
    if "://" in text:
        return text
    return str(Path(text).expanduser().resolve())


def _train_on_ray(
    net: nn.Module,
    train: Batches,
    val: Batches,
    config: TrainConfig,
    label: str,
    *,
    workers: int,
    storage: str,
    checkpoint_every: int,
) -> TrainResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config = replace(config, checkpoint_every=checkpoint_every)
    name = run_name(net, train, val, config, label)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "net": net,
            "train": train,
            "val": val,
            "config": config,
            "label": label,
            "log_level": logging.getLogger("neuroshard").getEffectiveLevel(),
        },
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=2),
        ),
    )
    logger.info("%s: Ray Train on %d workers, run %s under %s", label, workers, name, storage)
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"{label}: Ray Train failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{label}: Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / _STATE_FILE, map_location="cpu", weights_only=True)
    if not state["done"]:
        raise RuntimeError(f"{label}: Ray Train's last checkpoint is not a finished run")
    net.load_state_dict(state["best_state"])
    net.eval()
    history = [(float(a), float(b)) for a, b in state["history"]]
    return TrainResult(
        int(state["best_epoch"]),
        float(state["best_loss"]),
        int(state["epoch"]) + 1,
        float(state["seconds"]),
        history,
        state["resumed_after"],
    )

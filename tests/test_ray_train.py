"""ray_training: data-parallel nets on Ray Train that match one process and survive kill -9.

The job of the kill test runs in its own session so that SIGKILL takes the driver and the
embedded Ray cluster down together, as a lost machine would; the rerun must carry on from
the checkpoint the killed run left in storage.
"""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray")

from neuroshard.models.training import Dense, TrainConfig, fit_net  # noqa: E402

from factories import kill_9_when, run_to_end, start_job  # noqa: E402

pytestmark = pytest.mark.slow

CONFIG = TrainConfig(batch_size=64, lr=1e-2, max_epochs=150, patience=150)


class Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.f = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.f(x).squeeze(-1)


def job_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.05 * torch.randn(600, generator=g)
    return Dense((x[:500],), y[:500]), Dense((x[500:],), y[500:])


def run_job(storage: str, result_file: str, checkpoint_every: int) -> None:
    """The training the subprocess and the rerun both start: 2 Ray Train workers."""
    from neuroshard.pretrain.ray_train import ray_training

    train, val = job_data()
    torch.manual_seed(0)
    net = Lin()
    with ray_training(workers=2, storage_dir=storage, checkpoint_every=checkpoint_every) as fit:
        res = fit(net, train, val, CONFIG, "lin")
    Path(result_file).write_text(
        json.dumps(
            {
                "best_val_loss": res.best_val_loss,
                "epochs_run": res.epochs_run,
                "resumed_after": res.resumed_after,
                "weights": [p.detach().reshape(-1).tolist() for p in net.parameters()],
            }
        )
    )


def _checkpoints(storage: Path) -> list[Path]:
    """Checkpoints Ray Train has registered (its snapshot file lists them)."""
    return sorted(storage.rglob("checkpoint_manager_snapshot.json")) if storage.exists() else []


def test_ray_training_resumes_after_kill_9_and_matches_one_process(tmp_path):
    storage, result = tmp_path / "train", tmp_path / "result.json"
    code = (
        "from test_ray_train import run_job\n"
        f"run_job({str(storage)!r}, {str(result)!r}, checkpoint_every=10)\n"
    )
    kill_9_when(
        start_job(code),
        lambda: bool(_checkpoints(storage)),
        timeout_s=240,
        poll_s=0.2,
        what="checkpoint",
    )
    assert not result.exists()

    rerun = run_to_end(code, timeout_s=480)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    got = json.loads(result.read_text())
    assert got["resumed_after"] is not None and got["resumed_after"] >= 9
    assert got["epochs_run"] == CONFIG.max_epochs

    train, val = job_data()
    torch.manual_seed(0)
    single = fit_net(Lin(), train, val, CONFIG)
    # two half batches averaged are the whole batch: the same descent, up to rounding
    assert got["best_val_loss"] == pytest.approx(single.best_val_loss, rel=1e-3)


def test_pretrain_with_workers_trains_on_ray_train(tmp_path):
    from neuroshard.models import read_meta
    from neuroshard.pretrain.pipeline import PretrainConfig, pretrain

    from factories import make_tables

    tables = make_tables(30, seed=4)
    model_dir = pretrain(
        PretrainConfig(
            tmp_path,
            backend="sim",
            backend_kwargs={"noise": 0.03},
            tables=tables[:20],
            holdout_tables=tables[20:],
            compute_samples=400,
            comm_samples=150,
            holdout_samples=100,
            retest_samples=20,
            max_tables=8,
            progress=False,
            workers=2,
            model_kwargs={"max_epochs": 12, "patience": 12, "train_batch_size": 64},
        )
    )
    meta = read_meta(model_dir)
    assert meta["training"]["compute"]["epochs_run"] == 12
    assert meta["metrics"]["compute"]["test_pool"]["n"] == 100
    runs = sorted(p.name for p in (tmp_path / "train").iterdir() if p.is_dir())
    assert [r.split("-")[0] for r in runs] == ["bwd", "compute", "fwd"]  # one Ray run per net


def test_storage_location_keeps_uris_and_makes_paths_absolute(tmp_path, monkeypatch):
    from neuroshard.pretrain.ray_train import storage_location

    monkeypatch.chdir(tmp_path)
    assert storage_location("s3://bucket/runs") == "s3://bucket/runs"
    assert storage_location("ckpt") == str((tmp_path / "ckpt").resolve())
    assert storage_location(tmp_path / "a" / ".." / "b") == str((tmp_path / "b").resolve())

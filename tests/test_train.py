import numpy as np
import pytest
import torch
from torch import nn

from neuroshard.models.metrics import regression_metrics
from neuroshard.models.training import (
    Dense,
    FileCheckpointer,
    TrainConfig,
    file_checkpointed,
    fit_net,
    torch_threads,
)


def _linear_problem(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    return x, y


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(3, 1)

    def forward(self, x):
        return self.f(x).squeeze(-1)


def _fit(seed=0, **cfg):
    x, y = _linear_problem()
    torch.manual_seed(seed)
    net = Lin()
    res = fit_net(
        net,
        ((x[:500],), y[:500], None),
        ((x[500:],), y[500:], None),
        TrainConfig(seed=seed, batch_size=64, lr=1e-2, **cfg),
    )
    return net, res


def test_fit_net_learns_and_keeps_best_epoch():
    net, res = _fit(max_epochs=60)
    assert res.best_val_loss < 1e-2
    vals = [v for _, v in res.history]
    assert res.best_val_loss == pytest.approx(min(vals))
    assert res.best_epoch == int(np.argmin(vals))


def test_patience_stops_early_and_restores_best():
    x, y = _linear_problem()
    torch.manual_seed(0)
    net = Lin()
    # validation targets unrelated to training: the best epoch comes early, then patience ends it
    res = fit_net(
        net,
        ((x[:500],), y[:500], None),
        ((x[500:],), -y[500:], None),
        TrainConfig(batch_size=64, lr=1e-2, max_epochs=200, patience=5),
    )
    assert res.epochs_run == res.best_epoch + 6 < 200
    with torch.no_grad():
        restored = float(((net(x[500:]) + y[500:]) ** 2).mean())
    assert restored == pytest.approx(res.best_val_loss, rel=1e-5)


def test_fit_net_is_seeded():
    a, _ = _fit(seed=3, max_epochs=5)
    b, _ = _fit(seed=3, max_epochs=5)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_masked_loss_ignores_padding():
    x = torch.randn(100, 4, 3)
    mask = torch.zeros(100, 4)
    mask[:, :2] = 1
    y = torch.where(mask.bool(), x.sum(-1), torch.full((100, 4), 1e6))

    class PerDevice(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(3, 1)

        def forward(self, x, m):
            return self.f(x).squeeze(-1)

    torch.manual_seed(0)
    net = PerDevice()
    res = fit_net(
        net,
        ((x, mask), y, mask),
        ((x, mask), y, mask),
        TrainConfig(lr=3e-2, batch_size=32, max_epochs=80),
    )
    assert res.best_val_loss < 1e-2  # the 1e6 padding targets would dominate otherwise


def test_regression_metrics():
    true = np.array([1.0, 2.0, 4.0, 8.0])
    m = regression_metrics(true, true)
    assert m["mape"] == 0 and m["spearman"] == pytest.approx(1.0) and m["n"] == 4
    m = regression_metrics(true * 1.1, true)
    assert m["mape"] == pytest.approx(0.1) and m["spearman"] == pytest.approx(1.0)
    assert regression_metrics(true[::-1], true)["spearman"] == pytest.approx(-1.0)
    assert regression_metrics(np.zeros(0), np.zeros(0))["n"] == 0


def test_torch_threads_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_ragged_batches_gather_each_rows_items():
    from neuroshard.models.training import Ragged

    items = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    data = Ragged(items, torch.tensor([0, 2, 3, 6]), torch.tensor([10.0, 20.0, 30.0]))
    (x, row, n), target, weight = data.batch(torch.tensor([2, 0]))
    assert n == 2 and weight is None
    assert x.tolist() == [[6, 7], [8, 9], [10, 11], [0, 1], [2, 3]]
    assert row.tolist() == [0, 0, 0, 1, 1]
    assert target.tolist() == [30.0, 10.0]
    (x, row, n), _, _ = data.batch(slice(1, 3))
    assert x.tolist() == [[4, 5], [6, 7], [8, 9], [10, 11]] and row.tolist() == [0, 1, 1, 1]


class _Interrupted(Exception):
    pass


class _DiesAfter:
    """A FileCheckpointer that raises once it has saved ``epoch`` (a killed job)."""

    def __init__(self, path, epoch):
        self.inner, self.epoch = FileCheckpointer(path), epoch

    def load(self):
        return self.inner.load()

    def save(self, state, *, epoch, val_loss):
        self.inner.save(state, epoch=epoch, val_loss=val_loss)
        if epoch >= self.epoch:
            raise _Interrupted


def _lin_data():
    x, y = _linear_problem()
    return Dense((x[:500],), y[:500]), Dense((x[500:],), y[500:])


def test_resumed_training_ends_where_an_uninterrupted_one_does(tmp_path):
    train, val = _lin_data()
    config = TrainConfig(
        batch_size=64, lr=1e-2, max_epochs=30, patience=30, lr_decay_patience=2, checkpoint_every=4
    )
    torch.manual_seed(0)
    whole = Lin()
    ref = fit_net(whole, train, val, config)

    torch.manual_seed(0)
    with pytest.raises(_Interrupted):
        fit_net(Lin(), train, val, config, checkpointer=_DiesAfter(tmp_path / "c.pt", 11))
    torch.manual_seed(1)  # a fresh process would start from other weights: the file wins
    resumed = Lin()
    res = fit_net(resumed, train, val, config, checkpointer=FileCheckpointer(tmp_path / "c.pt"))
    assert res.resumed_after == 11
    assert res.history == ref.history and res.best_epoch == ref.best_epoch
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)

    # a finished run started again returns the same weights without training
    again = Lin()
    res2 = fit_net(again, train, val, config, checkpointer=FileCheckpointer(tmp_path / "c.pt"))
    assert res2.history == ref.history and res2.resumed_after == config.max_epochs - 1
    for p, q in zip(whole.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)


def test_file_checkpointed_names_runs_by_data_and_config(tmp_path):
    train, val = _lin_data()
    fit = file_checkpointed(tmp_path)
    torch.manual_seed(0)
    fit(Lin(), train, val, TrainConfig(max_epochs=3), "compute")
    torch.manual_seed(0)
    fit(Lin(), train, val, TrainConfig(max_epochs=4), "compute")
    torch.manual_seed(0)
    fit(Lin(), val, val, TrainConfig(max_epochs=3), "compute")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and all(n.startswith("compute-") and n.endswith(".pt") for n in names)
    state = torch.load(tmp_path / names[0], weights_only=True)  # plain tensors and numbers
    assert state["done"] is True


def _rank_main(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        train, val = _lin_data()
        torch.manual_seed(rank)  # different initial weights: rank 0's are broadcast
        net = Lin()
        res = fit_net(
            net, train, val, TrainConfig(batch_size=64, lr=1e-2, max_epochs=25, patience=25)
        )
        torch.save({"state": net.state_dict(), "loss": res.best_val_loss}, f"{out}/{rank}.pt")
        # start both teardowns together: one full run had a rank abort in gloo's teardown
        # ("terminate called without an active exception") with its peer still running
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_agree_and_match_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k])
    train, val = _lin_data()
    torch.manual_seed(0)
    single = fit_net(
        Lin(), train, val, TrainConfig(batch_size=64, lr=1e-2, max_epochs=25, patience=25)
    )
    # each rank's half-batch mean, averaged, is the whole batch's mean: same descent
    assert r0["loss"] == pytest.approx(single.best_val_loss, rel=1e-3)

import numpy as np
import pytest
import torch
from torch import nn

from neuroshard.pretrain.train import TrainConfig, fit_net, regression_metrics, torch_threads


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
    res = fit_net(net, ((x[:500],), y[:500], None), ((x[500:],), y[500:], None),
                  TrainConfig(seed=seed, batch_size=64, lr=1e-2, **cfg))
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
    res = fit_net(net, ((x[:500],), y[:500], None), ((x[500:],), -y[500:], None),
                  TrainConfig(batch_size=64, lr=1e-2, max_epochs=200, patience=5))
    assert res.epochs_run == res.best_epoch + 6 < 200
    with torch.no_grad():
        restored = float(((net(x[500:]) + y[500:]) ** 2).mean())
    assert restored == pytest.approx(res.best_val_loss, rel=1e-5)


def test_fit_net_is_seeded():
    a, _ = _fit(seed=3, max_epochs=5)
    b, _ = _fit(seed=3, max_epochs=5)
    for p, q in zip(a.parameters(), b.parameters()):
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
    res = fit_net(net, ((x, mask), y, mask), ((x, mask), y, mask),
                  TrainConfig(lr=3e-2, batch_size=32, max_epochs=80))
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
    from neuroshard.pretrain.train import Ragged

    items = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    data = Ragged(items, torch.tensor([0, 2, 3, 6]), torch.tensor([10.0, 20.0, 30.0]))
    (x, row, n), target, weight = data.batch(torch.tensor([2, 0]))
    assert n == 2 and weight is None
    assert x.tolist() == [[6, 7], [8, 9], [10, 11], [0, 1], [2, 3]]
    assert row.tolist() == [0, 0, 0, 1, 1]
    assert target.tolist() == [30.0, 10.0]
    (x, row, n), _, _ = data.batch(slice(1, 3))
    assert x.tolist() == [[4, 5], [6, 7], [8, 9], [10, 11]] and row.tolist() == [0, 1, 1, 1]

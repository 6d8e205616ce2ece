"""Collectives of the other sharding types on the measured backends (issue 14): the
all-gather, all-reduce and reduce-scatter timed among gloo workers (reduce-scatter
emulated: gloo has none), NCCL's native reduce-scatter chosen on CUDA (checked on CPU
with a fake process group), and the measured speeds pricing a plan's other traffic."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from neuroshard.backends import BackendEstimator  # noqa: E402
from neuroshard.backends.comm import COLLECTIVES, CommTimer, run_collective  # noqa: E402
from neuroshard.traffic import finish, fixed_traffic, price  # noqa: E402
from neuroshard.types import Cluster, ExtraCosts, TableSpec  # noqa: E402


class FakeGroup:
    """Two ranks' worth of a process group, seen from rank 0: peers hold ``peer``."""

    def __init__(self, peer: float = 2.0):
        self.calls: list[str] = []
        self.peer = peer

    def all_gather_into_tensor(self, out, data):
        self.calls.append("all_gather_into_tensor")
        out.copy_(torch.cat([data, torch.full_like(data, self.peer)]))

    def all_reduce(self, data):
        self.calls.append("all_reduce")
        data.add_(self.peer)

    def reduce_scatter_tensor(self, out, data):
        self.calls.append("reduce_scatter_tensor")
        out.copy_(data.view(2, -1)[0] + self.peer)

    def all_to_all_single(self, out, data):
        self.calls.append("all_to_all_single")
        half = data.numel() // 2
        out[:half] = data[:half]  # our own chunk stays
        out[half:] = self.peer  # the peer's chunk for us


@pytest.mark.parametrize("native", [True, False])
def test_reduce_scatter_is_native_on_nccl_and_emulated_on_gloo(native):
    group = FakeGroup()
    data, out = torch.arange(4.0), torch.empty(2)
    run_collective(group, "reduce_scatter", data, out, 2, native)
    assert group.calls == (["reduce_scatter_tensor"] if native else ["all_to_all_single"])
    assert out.tolist() == [0.0 + 2.0, 1.0 + 2.0]  # our chunk plus the peer's


def test_all_gather_and_all_reduce_use_torch_collectives():
    group = FakeGroup()
    out = torch.empty(4)
    run_collective(group, "all_gather", torch.ones(2), out, 2, False)
    data = torch.ones(3)
    run_collective(group, "all_reduce", data, out, 2, False)
    assert group.calls == ["all_gather_into_tensor", "all_reduce"]
    assert out.tolist() == [1.0, 1.0, 2.0, 2.0] and data.tolist() == [3.0] * 3
    with pytest.raises(ValueError, match="all_gather"):
        run_collective(group, "broadcast", data, out, 2, False)


def test_gloo_collectives_are_timed_and_price_other_traffic():
    timer = CommTimer("cpu", batch_size=4096, warmups=1, repeats=3)
    try:
        pool = timer.pool(2)
        for kind in COLLECTIVES:
            timings = pool.measure_collective(kind, 1 << 20)
            assert len(timings) == 2 and all(t.median_ms > 0 for t in timings)
        speeds = timer.link_speeds(2, nbytes=4 << 20)
        assert speeds.intra_bytes_per_ms > 0 and speeds.launch_ms > 0
        assert timer.link_speeds(2) is speeds  # measured once
    finally:
        timer.close()
    cluster = Cluster.uniform(2, 1 << 30, 4096)
    small, big = (TableSpec("t", rows=rows, dim=64) for rows in (1_000, 100_000))
    costs = [
        price(
            finish(
                fixed_traffic(t, "data_parallel", [0, 1], cluster)[None],
                np.zeros((1, 2)),
                np.zeros((1, 2)),
                cluster,
            ),
            speeds,
        )
        for t in (small, big)
    ]
    assert (costs[1].bwd_ms > costs[0].bwd_ms).all() and (costs[0].bwd_ms > 0).all()


def test_backend_estimator_passes_on_a_backend_s_extra_ms():
    class Backend:
        name, batch_size = "fake", 4096

        def extra_ms(self, traffic):
            return ExtraCosts(*(np.ones(2),) * 4)

    assert isinstance(BackendEstimator(Backend()).extra_ms(None), ExtraCosts)
    assert not hasattr(
        BackendEstimator(type("B", (), {"name": "b", "batch_size": 1})()), "extra_ms"
    )

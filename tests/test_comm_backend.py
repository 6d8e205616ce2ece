"""All-to-all timings among gloo worker processes, with injected straggler waits."""

from __future__ import annotations

import math

import pytest

from neuroshard.backends.comm import CommPool, CommTimer, batch_slices
from neuroshard.backends.cpu import CpuBackend
from neuroshard.types import BackendError


@pytest.fixture(scope="module")
def pool2():
    with CommPool(2, batch_size=512, warmups=1, repeats=5) as pool:
        yield pool


def test_two_ranks_return_per_rank_timings(pool2):
    fwd, bwd = pool2.measure([64, 128], [0.0, 0.0])
    assert len(fwd) == len(bwd) == 2
    for t in fwd + bwd:
        assert t.median_ms > 0 and math.isfinite(t.spread) and t.spread >= 0
        assert t.repeats == 5


def test_early_rank_waits_for_straggler_in_forward_only(pool2):
    fwd, bwd = pool2.measure([64, 64], [0.0, 20.0])
    # rank 0 reaches the forward collective 20 ms before rank 1 and waits for it there
    assert fwd[0].median_ms - fwd[1].median_ms >= 15.0, fwd
    assert fwd[1].median_ms < 10.0, fwd
    # no wait is injected before the backward: no such gap
    assert abs(bwd[0].median_ms - bwd[1].median_ms) < 5.0, bwd


def test_rank_without_shards_still_takes_part(pool2):
    fwd, bwd = pool2.measure([0, 32], [0.0, 0.0])
    assert all(t.median_ms > 0 for t in fwd + bwd)


def test_bad_requests_raise_backend_error(pool2):
    with pytest.raises(BackendError, match="2 dim sums"):
        pool2.measure([8, 8, 8], [0, 0, 0])
    with pytest.raises(BackendError, match=">= 0"):
        pool2.measure([8, 8], [0, -1.0])
    assert pool2.alive  # validation happens before anything reaches the workers


def test_worker_failure_becomes_backend_error_and_stops_the_pool():
    pool = CommPool(2, batch_size=64, warmups=0, repeats=1)
    with pytest.raises(BackendError, match="rank"):
        pool.measure([10**13, 4], [0, 0])  # buffers no machine can allocate
    assert not pool.alive
    assert not any(p.is_alive() for p in pool._processes)
    with pytest.raises(BackendError, match="closed"):
        pool.measure([4, 4], [0, 0])


def test_four_ranks_through_the_backend():
    with CpuBackend(
        batch_size=1_002, warmups=0, repeats=1, comm_warmups=1, comm_repeats=3
    ) as backend:
        fwd, bwd = backend.measure_comm([32, 64, 0, 128], [0.0, 0.0, 0.0, 0.0])
        assert len(fwd) == len(bwd) == 4
        assert all(t.median_ms > 0 for t in fwd + bwd)
        pool = backend._comm.pool(4)
        assert backend._comm.pool(4) is pool  # started once, reused
    assert not pool.alive  # leaving the backend's context stops its workers
    assert not any(p.is_alive() for p in pool._processes)


def test_batch_slices_cover_the_batch():
    assert batch_slices(10, 4) == [3, 3, 2, 2]
    assert sum(batch_slices(65_536, 3)) == 65_536


class _FakePool:
    def __init__(self, num_ranks, **kwargs):
        self.alive = True

    def close(self):
        self.alive = False


def test_timer_keeps_one_pool_per_count_and_restarts_broken_ones(monkeypatch):
    import neuroshard.backends.comm as comm

    monkeypatch.setattr(comm, "CommPool", _FakePool)
    timer = CommTimer(batch_size=64)
    first = timer.pool(2)
    assert timer.pool(2) is first and timer.pool(3) is not first
    first.alive = False  # a worker died
    second, third = timer.pool(2), timer.pool(3)
    assert second is not first
    timer.close()
    assert not second.alive and not third.alive

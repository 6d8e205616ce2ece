"""Small factories and fakes of NeuroShard's interfaces, shared by the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from neuroshard.types import Cluster, TableSpec, Timing

GB = 1 << 30
TESTS_DIR = str(Path(__file__).parent)


def make_table(
    name: str = "t0", rows: int = 10_000, dim: int = 64, pooling_factor: float = 4.0, **kwargs
) -> TableSpec:
    return TableSpec(name=name, rows=rows, dim=dim, pooling_factor=pooling_factor, **kwargs)


def make_tables(n: int, seed: int = 0) -> list[TableSpec]:
    rng = np.random.default_rng(seed)
    return [
        make_table(
            f"t{i}",
            rows=int(rng.integers(1_000, 2_000_000)),
            dim=int(rng.choice([16, 32, 64, 128])),
            pooling_factor=float(rng.uniform(1, 30)),
        )
        for i in range(n)
    ]


def priced(plan, estimator):
    """A searcher's plain plan with its cost under ``estimator``, as the planner prices it."""
    from neuroshard.search.scoring import plan_cost

    return plan.with_cost(plan_cost(plan, estimator))


def make_cluster(num_devices: int = 4, memory_gb: float = 4.0, batch_size: int = 65_536) -> Cluster:
    return Cluster.uniform(num_devices, int(memory_gb * GB), batch_size)


class FakeEstimator:
    """A deterministic, cheap CostEstimator: compute grows with lookups x width with a
    per-table overhead and a superlinear crowding term; comm is linear in dim sums; the
    forward comm adds the wait for the slowest device."""

    name = "fake"

    def __init__(self, batch_size: int = 65_536):
        self.batch_size = batch_size
        self.compute_calls = 0

    def compute_ms(self, loads: Sequence[Sequence[TableSpec]]) -> np.ndarray:
        self.compute_calls += 1
        out = []
        for load in loads:
            work = sum(t.dim * t.pooling_factor * np.log10(t.rows + 10) for t in load) * 1e-4
            out.append(0.01 * len(load) + work + 0.05 * work**1.5 if load else 0.0)
        return np.asarray(out, dtype=float)

    def bwd_comm_ms(self, dim_sums: np.ndarray) -> np.ndarray:
        return 0.05 + 0.002 * np.asarray(dim_sums, dtype=float)

    def fwd_comm_ms(self, dim_sums: np.ndarray, waits_ms: np.ndarray) -> np.ndarray:
        waits = np.asarray(waits_ms, dtype=float)
        gap = waits.max(axis=-1, keepdims=True) - waits
        return 0.05 + 0.002 * np.asarray(dim_sums, dtype=float) + gap


def fake_plan_costs(plan) -> list[tuple[float, float, float]]:
    """Each device's (compute, backward comm, forward comm) ms of ``plan`` under
    :class:`FakeEstimator`, worked out shard by shard from the fake's formulas, without
    the library's cost code: the reference that plan costs are checked against."""
    import math

    n = plan.cluster.num_devices
    by_name = {t.name: t for t in plan.tables}
    work, shards, dims = [0.0] * n, [0] * n, [0] * n
    for s in plan.shards:
        t = by_name[s.table]
        work[s.device] += s.width * t.pooling_factor * math.log10(t.rows + 10) * 1e-4
        shards[s.device] += 1
        dims[s.device] += s.width
    compute = [0.01 * k + w + 0.05 * w**1.5 if k else 0.0 for k, w in zip(shards, work)]
    bwd = [0.05 + 0.002 * d for d in dims]
    ready = [c + b for c, b in zip(compute, bwd)]
    waits = [r - min(ready) for r in ready]
    fwd = [0.05 + 0.002 * d + max(waits) - w for d, w in zip(dims, waits)]
    return list(zip(compute, bwd, fwd))


def assert_fake_plan_cost(plan, cost=None) -> None:
    """``cost`` (default ``plan.cost``) is ``plan``'s cost under :class:`FakeEstimator`,
    device by device (:func:`fake_plan_costs`; float rounding aside, the sums are the
    same)."""
    import pytest

    cost = plan.cost if cost is None else cost
    assert cost is not None and cost.model == FakeEstimator.name
    expected = fake_plan_costs(plan)
    got = [x for d in cost.devices for x in (d.compute_ms, d.bwd_comm_ms, d.fwd_comm_ms)]
    assert got == pytest.approx([x for e in expected for x in e], rel=1e-12, abs=1e-15)
    assert cost.max_ms == pytest.approx(max(map(sum, expected)), rel=1e-12)


class FakeBackend:
    """A HardwareBackend over FakeEstimator, one sample at a time, with a fixed spread."""

    name = "fake"

    def __init__(self, batch_size: int = 65_536):
        self.batch_size = batch_size
        self._est = FakeEstimator(batch_size)

    def measure_compute(self, load: Sequence[TableSpec]) -> Timing:
        return Timing(float(self._est.compute_ms([load])[0]), 0.01, 3)

    def measure_comm(self, dim_sums, waits_ms):
        d = np.asarray([dim_sums], dtype=float)
        fwd = self._est.fwd_comm_ms(d, np.asarray([waits_ms], dtype=float))[0]
        bwd = self._est.bwd_comm_ms(d)[0]
        return [Timing(float(x), 0.01, 3) for x in fwd], [Timing(float(x), 0.01, 3) for x in bwd]

    def fingerprint(self) -> dict:
        return {"backend": "fake", "batch_size": self.batch_size}


def collect_fake_data(root, num_loads: int = 600, num_comm: int = 300):
    """Collected compute and comm data ``(ComputeData, CommData)`` from FakeBackend under
    ``root``: loads of augmented tables, comm tasks on 2 and 8 devices (fixed seeds)."""
    from neuroshard.pretrain.augment import augment_tables, sample_comm_tasks, sample_compute_loads
    from neuroshard.pretrain.collect import collect
    from neuroshard.pretrain.dataset import load_comm, load_compute

    tables = make_tables(30, seed=5)
    loads = sample_compute_loads(augment_tables(tables), num_loads, np.random.default_rng(0))
    tasks = sample_comm_tasks(tables, num_comm, np.random.default_rng(1), [2, 8])
    collect(loads, FakeBackend(), root / "compute", progress=False)
    collect(tasks, FakeBackend(), root / "comm", kind="comm", progress=False)
    return load_compute(root / "compute"), load_comm(root / "comm")


def make_mixed_loads() -> list[list[TableSpec]]:
    """Four device loads of 3, 0, 1 and 8 tables."""
    tables = make_tables(12, seed=9)
    return [tables[:3], [], tables[3:4], tables[4:12]]


def check_fitted_cost_model(model, cls, name_prefix: str) -> None:
    """The checks every learned cost model fitted on :func:`collect_fake_data` passes."""
    import pytest

    from neuroshard.types import CostEstimator

    assert isinstance(model, CostEstimator)
    assert model.batch_size == 65_536
    assert model.name.startswith(name_prefix)
    assert model.num_devices_ in (2, 8)
    assert set(model.metrics_) == {"compute", "fwd_comm", "fwd_comm_less_wait", "bwd_comm"}
    assert model.sample_counts_["compute"] == {"total": 600, "train": 480, "val": 60, "test": 60}
    with pytest.raises(RuntimeError, match="not fitted"):
        cls().compute_ms([[make_table()]])


def pythonpath_with_tests() -> str:
    """``PYTHONPATH`` with this folder first, so that subprocesses and Ray workers can
    import the test modules' fakes and jobs."""
    return os.pathsep.join([TESTS_DIR, *filter(None, [os.environ.get("PYTHONPATH")])])


def start_job(code: str) -> subprocess.Popen:
    """Run ``python -c code`` in its own session, with the tests importable, output
    discarded: a job :func:`kill_9_when` can take down with everything it started."""
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": pythonpath_with_tests()},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_to_end(code: str, timeout_s: float) -> subprocess.CompletedProcess:
    """Run ``python -c code`` to the end, with the tests importable; output captured."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": pythonpath_with_tests()},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def kill_9_when(
    proc: subprocess.Popen, ready: Callable[[], bool], *, timeout_s: float, poll_s: float, what: str
) -> None:
    """Wait until ``ready()`` while the job runs, then SIGKILL its whole session
    (:func:`kill_9_session`); fail if the job ends first or ``ready`` never holds."""
    try:
        deadline = time.monotonic() + timeout_s
        while not ready() and time.monotonic() < deadline:
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(poll_s)
        assert ready(), f"no {what} within {timeout_s:g} s"
        assert proc.poll() is None, "the job ended before it could be killed"
    finally:
        kill_9_session(proc)


def kill_9_session(proc: subprocess.Popen) -> None:
    """SIGKILL a ``Popen(..., start_new_session=True)`` job and everything in its session
    (Ray's processes included), then reap it: a job killed as an OOM killer or a lost
    node would kill it."""
    import signal

    def session_pids(sid: int) -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[3]) == sid:  # field 6 of stat: the session id
                    pids.append(int(d.name))
        return pids

    for kill in (
        lambda: os.kill(proc.pid, signal.SIGKILL),
        lambda: os.killpg(proc.pid, signal.SIGKILL),
    ):
        try:
            kill()
        except ProcessLookupError:
            pass
    proc.wait()
    for pid in session_pids(proc.pid):  # anything that left the group but not the session
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A TCP port free on the loopback now and not handed out before in this process: the
    OS may give a just-closed port again, and two users of one port (Ray's components, a
    gloo store and a lingering peer) collide."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def spawn_ranks(
    worker: Callable[..., None], world: int, args: tuple, *, timeout_s: float, what: str
) -> None:
    """Run ``worker(rank, world, port, *args)`` in ``world`` spawned processes on a fresh
    port and wait up to ``timeout_s``. A rank killed by SIGABRT is run again once, all
    ranks on a new port: torch's C++ aborted a rank of the DMP tests ("terminate called
    without an active exception", no Python error) twice in many full-suite runs on the
    2-core machine and never when run alone. A second abort, a Python error in a rank or
    the timeout fails the test."""
    import warnings

    import pytest
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessExitedException

    for attempt in range(2):
        ctx = mp.start_processes(
            worker,
            args=(world, free_port(), *args),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.terminate()
                    pytest.fail(f"{what} did not finish in {timeout_s:.0f} s")
            return
        except ProcessExitedException as e:
            if e.signal_name != "SIGABRT" or attempt:
                raise
            warnings.warn(
                f"{what}: rank {e.error_index} aborted; running all ranks again once", stacklevel=2
            )


@contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """A gloo process group on the loopback for one spawned test worker. On success the
    ranks meet at a barrier before tearing it down: a rank that destroyed the group while
    its peer was still in a collective (DDP's, for a data-parallel table) aborted once,
    on a loaded machine."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()

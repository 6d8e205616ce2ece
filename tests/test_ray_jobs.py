"""collect_ray: every key once over several workers, resume after a real kill -9, retries.

The fake backends below are built inside Ray workers from specs whose ``factory`` is the
class (pickled by reference), so the tests put this folder on the workers' ``PYTHONPATH``.
"""

import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("ray")

from neuroshard.backends.sim import SimBackend  # noqa: E402
from neuroshard.pretrain.augment import augment_tables, sample_compute_loads  # noqa: E402
from neuroshard.pretrain.collect import BackendSpec, part_files  # noqa: E402
from neuroshard.pretrain.ray_jobs import collect_ray  # noqa: E402

from factories import kill_9_when, make_tables, pythonpath_with_tests, start_job  # noqa: E402

pytestmark = pytest.mark.slow


class SlowSim(SimBackend):
    """The sim backend taking ``delay_s`` per sample, so a job lasts long enough to kill."""

    def __init__(self, delay_s: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.delay_s = delay_s

    def measure_compute(self, load):
        time.sleep(self.delay_s)
        return super().measure_compute(load)


class FlakyOnce(SimBackend):
    """Raises on its first measurement, like a worker whose first chunk hits a glitch."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def measure_compute(self, load):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("transient device error")
        return super().measure_compute(load)


class FailsOnTable(SimBackend):
    """Always raises on loads holding the table ``bad``: a sample no retry can measure."""

    def __init__(self, bad: str, **kwargs):
        super().__init__(**kwargs)
        self.bad = bad

    def measure_compute(self, load):
        if any(t.name == self.bad for t in load):
            raise RuntimeError(f"cannot measure table {self.bad}")
        return super().measure_compute(load)


class DiesOnce(SimBackend):
    """Kills its own process on its first measurement unless ``marker`` exists (creating
    it first): a worker lost mid-chunk, once in the whole job."""

    def __init__(self, marker: str, **kwargs):
        super().__init__(**kwargs)
        self.marker = Path(marker)

    def measure_compute(self, load):
        if not self.marker.exists():
            self.marker.touch()
            os._exit(1)
        return super().measure_compute(load)


def make_samples(n: int, seed: int = 0):
    tables = augment_tables(make_tables(30, seed=seed))
    return sample_compute_loads(tables, n, np.random.default_rng(seed), max_tables=6)


def kill_job_args():
    """The long job of the kill -9 test; the subprocess and the rerun both call this."""
    return make_samples(400, seed=7), BackendSpec(
        "test_ray_jobs:SlowSim", {"delay_s": 0.02}, SlowSim
    )


def disk_keys(out_dir) -> list[str]:
    return [
        k
        for p in part_files(out_dir)
        for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()
    ]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the tests that need this folder importable in workers."""
    import ray

    assert not ray.is_initialized()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", pythonpath_with_tests())
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            object_store_memory=128 << 20,
        )
    yield ray
    ray.shutdown()


def test_two_workers_write_every_key_once(tmp_path):
    import ray

    samples = make_samples(120)
    res = collect_ray(
        samples,
        BackendSpec("sim", {"batch_size": 4096}),
        tmp_path,
        kind="compute",
        workers=2,
        chunk_size=10,
        progress=False,
    )
    keys = disk_keys(tmp_path)
    assert sorted(keys) == sorted(s.key for s in samples)
    assert (res.measured, res.skipped, res.failed, res.total) == (120, 0, 0, 120)
    assert len(part_files(tmp_path)) == 12
    assert not ray.is_initialized()  # it started Ray, so it shut it down
    again = collect_ray(
        samples,
        BackendSpec("sim", {"batch_size": 4096}),
        tmp_path,
        kind="compute",
        workers=2,
        chunk_size=10,
        progress=False,
    )
    assert (again.measured, again.skipped) == (0, 120)


def test_resumes_after_kill_9(tmp_path, ray_cluster):
    out = tmp_path / "data"
    code = (
        "from test_ray_jobs import kill_job_args\n"
        "from neuroshard.pretrain.ray_jobs import collect_ray\n"
        "samples, spec = kill_job_args()\n"
        f"collect_ray(samples, spec, {str(out)!r}, kind='compute', workers=2, chunk_size=4,"
        " progress=False)\n"
    )
    kill_9_when(
        start_job(code),
        lambda: len(part_files(out)) >= 3,
        timeout_s=120,
        poll_s=0.05,
        what="3 part files",
    )
    samples, spec = kill_job_args()
    before = len(set(disk_keys(out)))
    assert 0 < before < len(samples)

    res = collect_ray(samples, spec, out, kind="compute", workers=2, chunk_size=4, progress=False)
    keys = disk_keys(out)
    assert len(keys) == len(set(keys)), "duplicated rows"
    assert set(keys) == {s.key for s in samples}, "missing rows"
    assert res.skipped == before and res.measured == len(samples) - before
    assert res.failed == 0


def test_failed_chunk_is_retried(tmp_path, ray_cluster, caplog):
    samples = make_samples(40, seed=3)
    with caplog.at_level(logging.WARNING, logger="neuroshard.pretrain.ray_jobs"):
        res = collect_ray(
            samples,
            BackendSpec("test_ray_jobs:FlakyOnce", {}, FlakyOnce),
            tmp_path,
            kind="compute",
            workers=2,
            chunk_size=5,
            max_retries=1,
            progress=False,
        )
    assert res.failed == 0 and res.measured == 40
    assert sorted(disk_keys(tmp_path)) == sorted(s.key for s in samples)
    assert "retrying" in caplog.text


def test_dead_worker_is_replaced_and_its_chunks_retried(tmp_path, ray_cluster, caplog):
    samples = make_samples(30, seed=5)
    spec = BackendSpec("test_ray_jobs:DiesOnce", {"marker": str(tmp_path / "died")}, DiesOnce)
    with caplog.at_level(logging.WARNING, logger="neuroshard.pretrain.ray_jobs"):
        res = collect_ray(
            samples,
            spec,
            tmp_path / "data",
            kind="compute",
            workers=2,
            chunk_size=5,
            progress=False,
        )
    assert (tmp_path / "died").exists()
    assert res.failed == 0 and res.measured == 30
    assert sorted(disk_keys(tmp_path / "data")) == sorted(s.key for s in samples)
    assert "died" in caplog.text


def test_chunk_failing_every_retry_is_reported_not_fatal(tmp_path, ray_cluster, caplog):
    samples = make_samples(40, seed=3)
    bad = samples[0].tables[0].name
    n_bad = sum(any(t.name == bad for t in s.tables) for s in samples)
    with caplog.at_level(logging.WARNING, logger="neuroshard.pretrain.ray_jobs"):
        res = collect_ray(
            samples,
            BackendSpec("test_ray_jobs:FailsOnTable", {"bad": bad}, FailsOnTable),
            tmp_path,
            kind="compute",
            workers=2,
            chunk_size=1,
            max_retries=2,
            progress=False,
        )
    assert res.failed == n_bad and res.measured == 40 - n_bad
    assert len(disk_keys(tmp_path)) == 40 - n_bad
    assert "giving up" in caplog.text


class BrokenBackend(SimBackend):
    """Cannot be built on the worker, like a cuda backend on a machine without a GPU."""

    def __init__(self, **kwargs):
        raise RuntimeError("no device here")


def test_more_workers_than_the_cluster_holds_still_finish(tmp_path, ray_cluster):
    """A worker the cluster has no room for never starts; the others do the job."""
    samples = make_samples(40, seed=11)
    res = collect_ray(
        samples,
        BackendSpec("sim", {"batch_size": 4096}),
        tmp_path,
        kind="compute",
        workers=3,
        chunk_size=5,
        progress=False,
    )
    assert (res.measured, res.failed) == (40, 0)
    assert sorted(disk_keys(tmp_path)) == sorted(s.key for s in samples)


def test_no_worker_can_start_is_a_cluster_error(tmp_path, ray_cluster):
    from neuroshard.types import RayClusterError

    samples = make_samples(10, seed=12)
    started = time.monotonic()
    with pytest.raises(RayClusterError, match="no Ray worker started within 2 s"):
        collect_ray(
            samples,
            BackendSpec("sim"),
            tmp_path,
            kind="compute",
            workers=1,
            gpus_per_worker=1,
            start_timeout_s=2,
            progress=False,
        )
    assert time.monotonic() - started < 30
    assert not disk_keys(tmp_path)


def test_backend_that_cannot_start_is_a_backend_error(tmp_path, ray_cluster):
    from neuroshard.types import BackendError

    with pytest.raises(BackendError, match="test_ray_jobs:BrokenBackend.*no device here"):
        collect_ray(
            make_samples(10, seed=13),
            BackendSpec("test_ray_jobs:BrokenBackend", {}, BrokenBackend),
            tmp_path,
            kind="compute",
            workers=2,
            progress=False,
        )


def test_bad_or_unreachable_address_fails_at_once(monkeypatch):
    import socket

    from neuroshard.pretrain.ray_jobs import connect_ray
    from neuroshard.types import RayClusterError, UsageError

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # this test sends no token
    for bad in ("ray://10.0.0.5:10001", "10.0.0.5", "10.0.0.5:http", "10.0.0.5:70000"):
        with pytest.raises(UsageError, match="HOST:PORT"):
            connect_ray(bad)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(
        RayClusterError, match=f"no Ray cluster answers at 127.0.0.1:{port}.*--node-ip-address"
    ):
        connect_ray(f"localhost:{port}")
    assert time.monotonic() - started < 10


def test_rejects_bad_arguments(tmp_path):
    samples = make_samples(3)
    with pytest.raises(ValueError, match="workers"):
        collect_ray(samples, BackendSpec("sim"), tmp_path, kind="compute", workers=0)
    with pytest.raises(TypeError, match="BackendSpec"):
        collect_ray(samples, "sim", tmp_path, kind="compute")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ComputeSample"):
        collect_ray(samples, BackendSpec("sim"), tmp_path, kind="comm")

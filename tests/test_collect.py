import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from neuroshard.features import raw_features
from neuroshard.pretrain.augment import augment_tables, sample_comm_tasks, sample_compute_loads
from neuroshard.pretrain.collect import (
    BackendSpec,
    DatasetError,
    collect,
    collect_chunk,
    existing_keys,
    part_files,
)
from neuroshard.pretrain.dataset import load_comm, load_compute, sample_keys
from neuroshard.samples import split_by_tables, split_random

from factories import FakeBackend, make_tables


@pytest.fixture
def compute_samples():
    tables = augment_tables(make_tables(20, seed=4))
    return sample_compute_loads(tables, 90, np.random.default_rng(0))


@pytest.fixture
def comm_samples():
    return sample_comm_tasks(make_tables(40), 50, np.random.default_rng(0), [2, 4])


class CrashingBackend(FakeBackend):
    """Fails on the n-th measurement, like a machine lost mid-chunk."""

    def __init__(self, fail_after: int):
        super().__init__()
        self.left = fail_after

    def measure_compute(self, load):
        if self.left == 0:
            raise RuntimeError("device lost")
        self.left -= 1
        return super().measure_compute(load)


def _all_rows(out_dir):
    return [r for p in part_files(out_dir) for r in pq.read_table(p).to_pylist()]


def test_collect_writes_parquet_rows(tmp_path, compute_samples):
    res = collect(compute_samples, FakeBackend(), tmp_path, chunk_size=32, progress=False)
    assert (res.measured, res.skipped, res.total) == (90, 0, 90)
    assert len(part_files(tmp_path)) == 3  # 32 + 32 + 26
    rows = {r["key"]: r for r in _all_rows(tmp_path)}
    assert set(rows) == {s.key for s in compute_samples}
    s = compute_samples[5]
    row = rows[s.key]
    assert row["num_tables"] == len(s.tables)
    assert row["table_names"] == [t.name for t in s.tables]
    np.testing.assert_allclose(row["features"], raw_features(s.tables))
    assert row["label_ms"] == pytest.approx(FakeBackend().measure_compute(s.tables).median_ms)
    assert row["spread"] == 0.01
    assert json.loads(row["fingerprint"]) == FakeBackend().fingerprint()
    assert not list(tmp_path.glob(".tmp-*"))


def test_resume_after_partial_run_no_loss_no_duplicates(tmp_path, compute_samples):
    collect(compute_samples[:40], FakeBackend(), tmp_path, chunk_size=16, progress=False)
    res = collect(compute_samples, FakeBackend(), tmp_path, chunk_size=16, progress=False)
    assert (res.measured, res.skipped) == (50, 40)
    keys = [r["key"] for r in _all_rows(tmp_path)]
    assert len(keys) == len(set(keys)) == 90
    assert set(keys) == {s.key for s in compute_samples}
    assert collect(compute_samples, FakeBackend(), tmp_path, progress=False).measured == 0


def test_crash_mid_chunk_keeps_whole_chunks_only(tmp_path, compute_samples):
    with pytest.raises(RuntimeError, match="device lost"):
        collect(
            compute_samples, CrashingBackend(fail_after=37), tmp_path, chunk_size=16, progress=False
        )
    assert len(existing_keys(tmp_path)) == 32  # two whole chunks, nothing partial
    assert not list(tmp_path.glob(".tmp-*"))
    res = collect(compute_samples, FakeBackend(), tmp_path, chunk_size=16, progress=False)
    assert (res.measured, res.skipped) == (58, 32)
    data = load_compute(tmp_path)
    assert len(data) == 90 and len(set(data.keys)) == 90


def test_other_backend_fingerprint_refused(tmp_path, compute_samples):
    collect(compute_samples[:10], FakeBackend(), tmp_path, progress=False)
    with pytest.raises(DatasetError, match="batch_size"):
        collect(compute_samples, FakeBackend(batch_size=1024), tmp_path, progress=False)


def test_collect_chunk_is_pure_and_takes_a_spec(compute_samples, tmp_path):
    spec = BackendSpec("fake", {"batch_size": 65_536}, factory=FakeBackend)
    rows = collect_chunk(compute_samples[:3], spec, "compute")
    assert [r["key"] for r in rows] == [s.key for s in compute_samples[:3]]
    assert not list(tmp_path.iterdir())
    with pytest.raises(TypeError):
        collect_chunk(compute_samples[:3], spec, "comm")


def test_comm_collection_and_padding(tmp_path, comm_samples):
    collect(comm_samples, FakeBackend(), tmp_path, kind="comm", chunk_size=20, progress=False)
    data = load_comm(tmp_path)
    assert len(data) == 50 and data.dim_sums.shape == (50, 4)
    by_key = {s.key: s for s in comm_samples}
    fake = FakeBackend()
    for i, key in enumerate(data.keys):
        s = by_key[key]
        n = s.num_devices
        assert data.num_devices[i] == n and data.mask[i].sum() == n
        np.testing.assert_array_equal(data.dim_sums[i, :n], s.dim_sums)
        fwd, bwd = fake.measure_comm(s.dim_sums, s.waits_ms)
        np.testing.assert_allclose(data.fwd_ms[i, :n], [t.median_ms for t in fwd])
        np.testing.assert_allclose(data.bwd_ms[i, :n], [t.median_ms for t in bwd])
        assert np.all(data.fwd_ms[i, n:] == 0)


def test_load_compute_roundtrip_subset_and_keys(tmp_path, compute_samples):
    collect(compute_samples, FakeBackend(), tmp_path, chunk_size=25, progress=False)
    data = load_compute(tmp_path)
    assert list(data.keys) == sorted(s.key for s in compute_samples)
    by_key = {s.key: s for s in compute_samples}
    sub = data.subset([3, 0, 7])
    for i, key in enumerate(sub.keys):
        np.testing.assert_allclose(
            sub.features[sub.offsets[i] : sub.offsets[i + 1]], raw_features(by_key[key].tables)
        )
        assert sub.names_of(i) == [t.name for t in by_key[key].tables]
    x, mask = data.padded()
    assert x.shape == (90, data.num_tables.max(), 20)
    assert mask.sum() == data.offsets[-1]
    wanted = {s.key for s in compute_samples[:10]}
    assert set(load_compute(tmp_path, wanted).keys) == wanted
    assert data.data_hash() == load_compute(tmp_path).data_hash()


def test_sample_keys_map_indices_and_refuse_two_runs_in_one_directory(tmp_path, compute_samples):
    collect(compute_samples, FakeBackend(), tmp_path, chunk_size=25, progress=False)
    assert sample_keys(tmp_path) == {s.index: s.key for s in compute_samples}
    other = sample_compute_loads(
        augment_tables(make_tables(20, seed=4)), 5, np.random.default_rng(1)
    )  # same indices, other loads
    collect(other, FakeBackend(), tmp_path, progress=False)
    with pytest.raises(DatasetError, match="two keys"):
        sample_keys(tmp_path)


def test_split_random_is_seeded_80_10_10():
    a = split_random(1000, seed=3)
    assert (len(a.train), len(a.val), len(a.test)) == (800, 100, 100)
    assert len(np.unique(np.concatenate(a))) == 1000
    b = split_random(1000, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a.test, split_random(1000, seed=4).test)


def test_split_by_tables_holds_out_a_pool(tmp_path, compute_samples):
    collect(compute_samples, FakeBackend(), tmp_path, progress=False)
    data = load_compute(tmp_path)
    test_names = {f"t{i}" for i in range(10)}
    split = split_by_tables(data, test_names, seed=0, val_fraction=0.2)
    for i in split.test:
        assert set(data.names_of(i)) <= test_names
    for i in np.concatenate([split.train, split.val]):
        assert not set(data.names_of(i)) & test_names
    mixed = [
        i
        for i in range(len(data))
        if set(data.names_of(i)) & test_names and set(data.names_of(i)) - test_names
    ]
    assert len(split.train) + len(split.val) + len(split.test) + len(mixed) == len(data)
    assert len(split.test) > 0

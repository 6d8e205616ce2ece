from dataclasses import replace

import numpy as np
import pytest

from neuroshard.backends.sim import SimBackend
from neuroshard.features import raw_features
from neuroshard.models import read_meta, shipped_models
from neuroshard.models.metrics import (
    MIN_BUCKET,
    comm_breakdown,
    compute_breakdown,
    load_bytes,
    noise_floor,
)
from neuroshard.pretrain.augment import augment_tables, sample_compute_loads
from neuroshard.pretrain.collect import collect
from neuroshard.pretrain.fidelity import (
    session_comm_noise_floors,
    session_fidelity,
    session_noise_floor,
)
from neuroshard.pretrain.pipeline import PretrainConfig, pretrain
from neuroshard.samples import ComputeData
from neuroshard.types import ModelMismatchError, Timing

from factories import FakeBackend, make_tables


def _data(loads, labels):
    feats = [raw_features(load) for load in loads]
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in feats])]).astype(np.int64)
    names = np.asarray([t.name for load in loads for t in load], dtype=object)
    return ComputeData(
        np.asarray([f"k{i}" for i in range(len(loads))], dtype=object),
        offsets,
        np.concatenate(feats),
        names,
        np.asarray(labels, dtype=float),
        np.zeros(len(loads)),
        "{}",
    )


def test_compute_breakdown_buckets_by_table_count_and_bytes():
    tables = make_tables(60, seed=3)
    loads = [tables[:1]] * 6 + [tables[:3]] * 7 + [tables[:30]] * 5 + [tables[:50]] * 2
    true = np.arange(1, len(loads) + 1, dtype=float)
    pred = true * np.where(np.arange(len(loads)) < 6, 1.5, 1.0)  # only 1-table loads are off
    out = compute_breakdown(pred, _data(loads, true))
    by_tables = out["by_tables"]
    assert set(by_tables) == {"1", "2-5", "21-40"}  # >40 has 2 loads, fewer than MIN_BUCKET
    assert by_tables["1"]["n"] == 6 and by_tables["1"]["mape"] == pytest.approx(0.5)
    assert by_tables["2-5"]["mape"] == 0 and by_tables["21-40"]["n"] == 5
    assert 2 < MIN_BUCKET
    expect = sum(t.rows * t.dim * 4 for t in tables[:3])
    assert load_bytes(_data([tables[:3]], [1.0]))[0] == pytest.approx(expect)
    assert sum(m["n"] for m in out["by_size"].values()) <= len(loads)


def test_comm_breakdown_by_device_count_and_dim_sum():
    mask = np.array([[True] * 4 + [False] * 4] * 5 + [[True] * 8] * 5)
    dims = np.where(mask, 512.0, 0.0)
    true = np.where(mask, 2.0, 0.0)
    pred = true * np.where(np.arange(10)[:, None] < 5, 1.0, 1.2)
    out = comm_breakdown(
        pred, true, np.array([4] * 5 + [8] * 5), dims, mask, num_tables=np.array([3] * 5 + [30] * 5)
    )
    assert out["by_devices"]["4"]["mape"] == 0 and out["by_devices"]["8"]["n"] == 40
    assert out["by_devices"]["8"]["mape"] == pytest.approx(0.2)
    assert set(out["by_dim_sum"]) == {"256-1023"}
    assert out["by_tables"]["2-5"]["n"] == 20
    assert out["by_tables"]["21-40"]["mape"] == pytest.approx(0.2)
    assert "by_tables" not in comm_breakdown(pred, true, np.array([4] * 10), dims, mask)


def test_noise_floor_of_a_fixed_ratio():
    a = np.full(50, 10.0)
    m = noise_floor(a, a * 1.1)
    assert m["mape"] == pytest.approx((0.1 + 0.1 / 1.1) / 2)
    assert m["floor_mape"] == pytest.approx(m["mape"] / np.sqrt(2))
    assert noise_floor(a, a)["floor_mape"] == 0


def test_noise_floor_recovers_the_sim_noise():
    loads = [
        s.tables
        for s in sample_compute_loads(
            augment_tables(make_tables(40, seed=5)), 400, np.random.default_rng(0), max_tables=10
        )
    ]
    first = SimBackend(noise=0.05, seed=1).compute_ms(loads)
    second = SimBackend(noise=0.05, seed=2).compute_ms(loads)
    # lognormal sigma 0.05: a noiseless predictor's MAPE is about 0.05 * sqrt(2/pi) = 0.040
    assert noise_floor(first, second)["floor_mape"] == pytest.approx(0.040, rel=0.2)


class _Jittery(FakeBackend):
    """FakeBackend whose compute timings change from call to call (-10%, 0, +10%, cycling)."""

    calls = 0

    def measure_compute(self, load):
        t = super().measure_compute(load)
        self.calls += 1
        return Timing(t.median_ms * (0.9, 1.0, 1.1)[self.calls % 3], t.spread, t.repeats)


def test_a_session_scores_as_its_own_pretrain_did(tmp_path):
    tables = make_tables(30, seed=11)
    held = [replace(t, name=f"held_{t.name}") for t in make_tables(15, seed=12)]
    model_dir = pretrain(
        PretrainConfig(
            tmp_path,
            backend=_Jittery(),
            tables=tables,
            holdout_tables=held,
            compute_samples=80,
            comm_samples=30,
            holdout_samples=40,
            retest_samples=12,
            chunk_size=9,
            rounds=2,
            progress=False,
            max_tables=10,
            model_kwargs={"max_epochs": 3},
        )
    )
    meta = read_meta(model_dir)
    floor = session_noise_floor(tmp_path / "data")
    assert floor["n"] == 12 and floor["floor_mape"] > 0
    assert floor == pytest.approx(meta["metrics"]["noise_floor"]["compute"])
    comm = session_comm_noise_floors(tmp_path / "data")  # the same pairs the pipeline took
    for which in ("fwd_comm", "bwd_comm"):
        assert comm[which] == pytest.approx(meta["metrics"]["noise_floor"][which])
        assert comm[which]["n"] > 12
    got = session_fidelity(model_dir, tmp_path / "data")
    assert got["compute"]["mape"] == pytest.approx(meta["metrics"]["compute"]["test_pool"]["mape"])
    assert got["noise_floor"] == floor


def test_a_session_from_other_hardware_is_refused(tmp_path):
    loads = sample_compute_loads(
        augment_tables(make_tables(5, seed=1)), 6, np.random.default_rng(0)
    )
    collect(loads, SimBackend(batch_size=4096), tmp_path / "compute_holdout", progress=False)
    assert session_noise_floor(tmp_path) is None  # no retests
    assert session_comm_noise_floors(tmp_path) == {}
    with pytest.raises(ModelMismatchError, match="batch_size"):
        session_fidelity(shipped_models()["sim-h100-d4"], tmp_path)

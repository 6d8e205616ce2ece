import hashlib
import json

import numpy as np
import pytest

pytest.importorskip("lightgbm")

from neuroshard.features import raw_features
from neuroshard.models import META_FILE, load_cost_model, model_kinds
from neuroshard.models.lightgbm import (
    BWD_COLUMNS,
    COMPUTE_COLUMNS,
    FWD_COLUMNS,
    MODEL_FILES,
    LightGBMCostModel,
    comm_features,
    load_features,
)
from neuroshard.models.metrics import regression_metrics
from neuroshard.types import ModelFileError

from factories import (
    FakeBackend,
    FakeEstimator,
    check_fitted_cost_model,
    collect_fake_data,
    make_mixed_loads,
    make_tables,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return collect_fake_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def model(data):
    return LightGBMCostModel(n_estimators=300, num_leaves=15, min_child_samples=5, seed=0).fit(
        *data
    )


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    return model.save(tmp_path_factory.mktemp("model") / "m")


def test_is_a_cost_estimator_with_fitted_attributes(model):
    check_fitted_cost_model(model, LightGBMCostModel, "lightgbm-fake-")


def test_predictions_correlate_with_the_fake_costs(model):
    tables = make_tables(40, seed=11)
    rng = np.random.default_rng(3)
    loads = [
        [tables[j] for j in rng.choice(40, size=int(rng.integers(1, 15)), replace=False)]
        for _ in range(200)
    ]
    truth = FakeEstimator().compute_ms(loads)
    m = regression_metrics(model.compute_ms(loads), truth)
    # The fake is exact (no noise), and fitting is seeded: every error here is the model's
    # own. At seed 0 it scores MAPE 3.5% / Spearman 0.997 on these loads and 2.5% / 0.999
    # on its test split; the bounds leave room for float differences between LightGBM
    # builds, not for noise.
    assert m["spearman"] > 0.99 and m["mape"] < 0.05
    assert model.metrics_["compute"]["test"]["spearman"] > 0.995
    assert model.metrics_["compute"]["test"]["mape"] < 0.035

    d = rng.integers(50, 2000, size=(50, 8)).astype(float)
    w = rng.uniform(0, 10, size=(50, 8))
    bwd, fwd = model.bwd_comm_ms(d), model.fwd_comm_ms(d, w)
    assert bwd.shape == fwd.shape == (50, 8)
    true_bwd = FakeEstimator().bwd_comm_ms(d)
    assert regression_metrics(bwd, true_bwd)["spearman"] > 0.97  # 0.980 at seed 0
    assert model.metrics_["fwd_comm"]["test"]["mape"] < 0.003  # 0.13% at seed 0
    assert model.metrics_["bwd_comm"]["test"]["mape"] < 0.007  # 0.46% at seed 0


def test_the_straggler_wait_is_added_exactly_not_learned(model):
    # One device waits W ms, the others none. Training waits were at most 20 ms, so every
    # tree splits the wait features below 20: at W = 1000 and W = 2000 the learned part
    # is the same, and the forward comm of each other device must grow by exactly the
    # 1000 ms it waits longer (a wait that were only learned would not grow at all).
    d = np.random.default_rng(4).integers(50, 2000, size=(5, 8)).astype(float)
    waits = np.zeros((5, 8))
    waits[:, 3] = 1000.0
    first = model.fwd_comm_ms(d, waits)
    waits[:, 3] = 2000.0
    second = model.fwd_comm_ms(d, waits)
    expected = np.full((5, 8), 1000.0)
    expected[:, 3] = 0.0  # the straggler itself waits for nobody
    np.testing.assert_allclose(second - first, expected, rtol=0, atol=1e-9)
    assert np.all(first[:, 3] > 0) and np.all(first[:, 3] < 50)


def test_empty_loads_and_single_device_vectors(model):
    pred = model.compute_ms(make_mixed_loads())
    assert pred.shape == (4,) and pred[1] == 0.0 and np.all(pred[[0, 2, 3]] > 0)
    assert model.compute_ms([[], []]).tolist() == [0.0, 0.0]
    one = model.fwd_comm_ms(np.array([100.0, 300.0]), np.array([0.0, 2.0]))
    assert one.shape == (2,)
    np.testing.assert_allclose(
        one, model.fwd_comm_ms(np.array([[100.0, 300.0]]), np.array([[0.0, 2.0]]))[0]
    )


def test_feature_builders_have_their_declared_widths():
    loads = make_mixed_loads()
    raw = raw_features([t for load in loads for t in load])
    offsets = np.cumsum([0] + [len(load) for load in loads])
    x = load_features(raw, offsets, 65_536)
    assert x.shape == (4, len(COMPUTE_COLUMNS)) and np.isfinite(x).all()
    assert x[1].tolist() == [0.0] * len(COMPUTE_COLUMNS)
    assert x[0, COMPUTE_COLUMNS.index("num_shards")] == 3
    assert x[0, COMPUTE_COLUMNS.index("dim_sum")] == sum(t.dim for t in loads[0])
    d = np.array([[10.0, 20, 30, 0]])
    mask = np.array([[True, True, True, False]])
    b = comm_features(d, None, mask)
    assert b.shape == (1, 4, len(BWD_COLUMNS))
    assert b[0, 0, BWD_COLUMNS.index("others_max")] == 30
    assert b[0, 2, BWD_COLUMNS.index("others_min")] == 10
    assert b[0, 1, BWD_COLUMNS.index("others_mean")] == 20
    assert comm_features(d, np.zeros((1, 4)), mask).shape == (1, 4, len(FWD_COLUMNS))


def test_save_load_round_trip_is_identical(model, model_dir):
    meta = json.loads((model_dir / META_FILE).read_text())
    assert meta["kind"] == "lightgbm"
    for key in (
        "feature_schema",
        "backend",
        "backend_fingerprint",
        "batch_size",
        "num_devices",
        "metrics",
        "training_data_hash",
        "sample_counts",
        "files",
    ):
        assert key in meta
    assert set(meta["files"]) == set(MODEL_FILES.values())
    loaded = LightGBMCostModel.load(model_dir)
    loads = make_mixed_loads()
    np.testing.assert_array_equal(loaded.compute_ms(loads), model.compute_ms(loads))
    d = np.array([[128.0, 640, 0, 256]])
    w = np.array([[3.0, 0, 7, 1]])
    np.testing.assert_array_equal(loaded.fwd_comm_ms(d, w), model.fwd_comm_ms(d, w))
    np.testing.assert_array_equal(loaded.bwd_comm_ms(d), model.bwd_comm_ms(d))
    assert loaded.name == model.name and loaded.metrics_ == model.metrics_


def test_load_cost_model_dispatches_on_kind(model_dir):
    assert "lightgbm" in model_kinds()
    loaded = load_cost_model(model_dir, batch_size=65_536, backend="fake")
    assert isinstance(loaded, LightGBMCostModel)


@pytest.mark.parametrize("damage", ["corrupt", "missing", "meta"])
def test_damaged_directory_raises_model_file_error_naming_the_file(model_dir, tmp_path, damage):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    target = d / MODEL_FILES["fwd"]
    if damage == "corrupt":
        # garbage of any kind, checksum matching or not, names the file
        target.write_text("tree\nnot a model\n")
        meta = json.loads((d / META_FILE).read_text())
        meta["files"][target.name] = hashlib.sha256(target.read_bytes()).hexdigest()
        (d / META_FILE).write_text(json.dumps(meta))
    elif damage == "missing":
        target.unlink()
    else:
        target = d / META_FILE
        target.write_text("{not json")
    with pytest.raises(ModelFileError, match=str(target.name)):
        load_cost_model(d)


def test_tampered_file_fails_its_checksum(model_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    path = d / MODEL_FILES["compute"]
    path.write_text(path.read_text()[:-200])
    with pytest.raises(ModelFileError, match="compute.lgb.txt: checksum"):
        load_cost_model(d)


def test_pretrain_pipeline_trains_and_saves_a_lightgbm_model(tmp_path):
    from dataclasses import replace

    from neuroshard.pretrain.pipeline import PretrainConfig, pretrain
    from neuroshard.types import UnknownNameError

    train = make_tables(30, seed=11)
    test = [replace(t, name=f"held_{t.name}") for t in make_tables(10, seed=12)]
    args = dict(
        backend=FakeBackend(),
        tables=train,
        holdout_tables=test,
        num_devices=4,
        compute_samples=500,
        comm_samples=200,
        holdout_samples=100,
        seed=0,
        chunk_size=500,
        progress=False,
        max_tables=15,
        model_kwargs={"n_estimators": 200, "num_leaves": 15},
    )
    model_dir = pretrain(PretrainConfig(tmp_path, cost_model="lightgbm", **args))
    assert {p.name for p in model_dir.iterdir()} == {*MODEL_FILES.values(), META_FILE}
    model = load_cost_model(model_dir, batch_size=65_536, backend="fake")
    assert isinstance(model, LightGBMCostModel)
    assert model.metrics_["compute"]["test_pool"]["n"] == 100
    with pytest.raises(UnknownNameError, match="lightgbm, neural"):
        pretrain(PretrainConfig(tmp_path / "x", cost_model="xgboost", **args))

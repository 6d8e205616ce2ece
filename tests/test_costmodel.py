import json

import numpy as np
import pytest
import torch

from neuroshard.models import META_FILE, check_compatible, load_cost_model, read_meta
from neuroshard.models.neural import COMM_FILE, COMPUTE_FILE, NeuralCostModel
from neuroshard.pretrain.augment import sample_comm_tasks
from neuroshard.types import ModelFileError, ModelMismatchError

from factories import (
    FakeBackend,
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
    return NeuralCostModel(max_epochs=40, patience=10, train_batch_size=64, seed=0).fit(*data)


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    return model.save(tmp_path_factory.mktemp("model") / "m")


def test_is_a_cost_estimator_with_fitted_attributes(model):
    check_fitted_cost_model(model, NeuralCostModel, "neural-fake-")


def test_compute_is_head_of_summed_shard_embeddings(model):
    loads = make_mixed_loads()
    pred = model.compute_ms(loads)
    assert pred.shape == (4,) and pred[1] == 0.0 and np.all(pred[[0, 2, 3]] > 0)
    emb = model.shard_embeddings([t for load in loads for t in load])
    assert emb.shape == (12, 32)
    sums = np.stack([emb[0:3].sum(0), np.zeros(32), emb[3:4].sum(0), emb[4:12].sum(0)])
    np.testing.assert_allclose(model.compute_from_embeddings(sums, [3, 0, 1, 8]), pred, rtol=1e-5)


def test_loads_past_the_trained_shards_per_device_are_priced_linearly(model):
    most = model.training_ranges_["tables_per_device"][1]
    tables = make_mixed_loads()[0]
    full = [tables[i % len(tables)] for i in range(most)]  # the trained maximum
    at_most, spread_at_most = model.compute_ms([full]), model.compute_spread([full])
    past = model.compute_ms([full * 3])  # three times as many: three times the price
    np.testing.assert_allclose(past, 3 * at_most, rtol=1e-5)
    np.testing.assert_allclose(model.compute_spread([full * 3]), spread_at_most, atol=1e-6)
    # within the range the nets answer as they are
    emb = model.shard_embeddings(full[:2])
    np.testing.assert_allclose(
        model.compute_ms([full[:2]]), model.compute_from_embeddings(emb.sum(0)[None]), rtol=1e-6
    )


def test_numpy_inference_matches_torch_nets(model):
    from neuroshard.features import table_features

    loads = [load for load in make_mixed_loads() if load]
    x = model._table_inputs(table_features([t for load in loads for t in load]))
    row = torch.repeat_interleave(torch.arange(len(loads)), torch.tensor([len(ld) for ld in loads]))
    with torch.inference_mode():
        y = model.nets_["compute"](torch.from_numpy(x), row, len(loads))
    np.testing.assert_allclose(
        model._from_target(y.numpy(), "compute"), model.compute_ms(loads), rtol=1e-4
    )
    d = np.array([[128.0, 640, 0, 256]])
    w = np.array([[3.0, 0, 7, 1]])
    xin = model._comm_inputs(d, w)
    with torch.inference_mode():
        y = model.nets_["fwd"](torch.from_numpy(xin), torch.ones(1, 4))
    straggler_wait = w.max() - w  # added to the learned part, not learned
    np.testing.assert_allclose(
        model._from_target(y.numpy(), "fwd") + straggler_wait, model.fwd_comm_ms(d, w), rtol=1e-4
    )


def test_save_load_roundtrip_identical_predictions(model, model_dir):
    loaded = load_cost_model(model_dir)
    assert isinstance(loaded, NeuralCostModel)
    loads = make_mixed_loads()
    np.testing.assert_array_equal(loaded.compute_ms(loads), model.compute_ms(loads))
    d = np.array([[128, 512, 0, 1024], [64, 64, 64, 64]])
    w = np.array([[0.0, 2.0, 5.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(loaded.bwd_comm_ms(d), model.bwd_comm_ms(d))
    np.testing.assert_array_equal(loaded.fwd_comm_ms(d, w), model.fwd_comm_ms(d, w))
    assert loaded.name == model.name and loaded.metrics_ == json.loads(json.dumps(model.metrics_))


def test_meta_records_provenance(model_dir):
    meta = read_meta(model_dir)
    assert meta["kind"] == "neural" and meta["feature_schema"] == "table20/v1"
    assert meta["backend"] == "fake" and meta["backend_fingerprint"]["batch_size"] == 65_536
    assert meta["batch_size"] == 65_536 and len(meta["training_data_hash"]) == 16
    assert meta["sample_counts"]["comm"]["total"] == 300
    assert meta["metrics"]["compute"]["test"]["n"] == 60
    assert "log" in meta["target_transform"]
    assert len(meta["normalisation"]["feature_mean"]) == 20
    assert set(meta["files"]) == {COMPUTE_FILE, COMM_FILE}


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_checkpoint_raises_model_file_error(model_dir, tmp_path):
    bad = _copy(model_dir, tmp_path / "bad")
    blob = (bad / COMPUTE_FILE).read_bytes()
    (bad / COMPUTE_FILE).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelFileError, match=COMPUTE_FILE):
        load_cost_model(bad)
    # without the checksum the checkpoint reader itself must fail the same way
    meta = json.loads((bad / META_FILE).read_text())
    del meta["files"]
    (bad / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=COMPUTE_FILE):
        load_cost_model(bad)


def test_missing_or_broken_files_raise_model_file_error(model_dir, tmp_path):
    with pytest.raises(ModelFileError, match=META_FILE):
        load_cost_model(tmp_path)
    d = _copy(model_dir, tmp_path / "nocomm")
    (d / COMM_FILE).unlink()
    with pytest.raises(ModelFileError, match=COMM_FILE):
        load_cost_model(d)
    d = _copy(model_dir, tmp_path / "badjson")
    (d / META_FILE).write_text("{not json")
    with pytest.raises(ModelFileError, match=META_FILE):
        load_cost_model(d)
    d = _copy(model_dir, tmp_path / "kind")
    meta = json.loads((d / META_FILE).read_text())
    meta["kind"] = "quantum"
    (d / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="quantum"):
        load_cost_model(d)


def test_mismatch_lists_what_differs(model_dir):
    meta = read_meta(model_dir)
    check_compatible(meta, batch_size=65_536, backend="fake")
    check_compatible(meta, backend=FakeBackend())
    with pytest.raises(ModelMismatchError, match="batch size 65536 .* 1024"):
        load_cost_model(model_dir, batch_size=1024)
    with pytest.raises(ModelMismatchError) as err:
        check_compatible(meta, batch_size=4096, backend="sim")
    assert "batch size" in str(err.value) and "backend 'fake'" in str(err.value)
    with pytest.raises(ModelMismatchError, match="fingerprint batch_size"):
        check_compatible(meta, backend=FakeBackend(batch_size=1024))
    with pytest.raises(ModelMismatchError, match="feature schema"):
        check_compatible({**meta, "feature_schema": "table21/v9"})


def test_comm_serves_other_device_counts_equivariantly(model, data):
    assert set(data[1].num_devices) == {2, 8}  # trained on 2 and 8 devices only
    rng = np.random.default_rng(0)
    for n in (1, 3, 4, 16):
        d = rng.integers(0, 2000, size=(5, n)).astype(float)
        w = rng.uniform(0, 20, size=(5, n))
        fwd, bwd = model.fwd_comm_ms(d, w), model.bwd_comm_ms(d)
        assert fwd.shape == bwd.shape == (5, n)
        assert np.all(np.isfinite(fwd)) and np.all(fwd > 0) and np.all(bwd > 0)
        perm = rng.permutation(n)
        np.testing.assert_allclose(
            model.fwd_comm_ms(d[:, perm], w[:, perm]), fwd[:, perm], rtol=1e-5
        )
        np.testing.assert_allclose(model.bwd_comm_ms(d[:, perm]), bwd[:, perm], rtol=1e-5)
    # a device count between the trained ones is predicted about as well as those
    tasks = sample_comm_tasks(make_tables(30, seed=5), 200, np.random.default_rng(7), 4)
    d4 = np.array([s.dim_sums for s in tasks], dtype=float)
    w4 = np.array([s.waits_ms for s in tasks])
    est = FakeBackend()._est
    assert np.mean(np.abs(model.bwd_comm_ms(d4) / est.bwd_comm_ms(d4) - 1)) < 0.25
    assert np.mean(np.abs(model.fwd_comm_ms(d4, w4) / est.fwd_comm_ms(d4, w4) - 1)) < 0.25


def test_fit_is_seeded(data):
    a = NeuralCostModel(max_epochs=3, seed=1).fit(*data)
    b = NeuralCostModel(max_epochs=3, seed=1).fit(*data)
    loads = make_mixed_loads()
    np.testing.assert_array_equal(a.compute_ms(loads), b.compute_ms(loads))
    with pytest.raises(ModelMismatchError):
        NeuralCostModel(batch_size=1024, max_epochs=1).fit(*data)


def test_an_ensemble_averages_its_members_in_log_space(data, tmp_path):
    from neuroshard.features import table_features

    ens = NeuralCostModel(
        max_epochs=15, patience=5, train_batch_size=64, seed=0, compute_members=3
    ).fit(*data)
    loads = [load for load in make_mixed_loads() if load]
    flat = [t for load in loads for t in load]
    assert ens.shard_embeddings(flat).shape == (len(flat), 3 * 32)
    x = torch.from_numpy(ens._table_inputs(table_features(flat)))
    row = torch.repeat_interleave(torch.arange(len(loads)), torch.tensor([len(ld) for ld in loads]))
    with torch.inference_mode():
        each = np.stack([m(x, row, len(loads)).numpy() for m in ens.nets_["compute"].members])
    assert np.ptp(each, axis=0).min() > 0  # members start apart and stay apart
    np.testing.assert_allclose(
        ens.compute_ms(loads), ens._from_target(each.mean(0), "compute"), rtol=1e-4
    )
    model_dir = ens.save(tmp_path / "m")
    assert read_meta(model_dir)["architecture"]["compute_members"] == 3
    again = load_cost_model(model_dir, batch_size=65_536, backend="fake")
    np.testing.assert_allclose(again.compute_ms(loads), ens.compute_ms(loads), rtol=1e-6)


def test_compute_members_must_be_positive():
    with pytest.raises(ValueError, match="compute_members"):
        NeuralCostModel(compute_members=0)

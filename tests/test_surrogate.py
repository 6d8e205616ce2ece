"""neuroshard/models/surrogate.py: the SurCo prior as a model (fit, checksummed directory,
registry loading)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neuroshard.models import META_FILE, load_cost_model, load_model, read_meta
from neuroshard.models.surrogate import (
    KIND,
    NUM_PAIR_FEATURES,
    PRIOR_FILE,
    SurrogatePrior,
    pair_features,
)
from neuroshard.types import ModelFileError, ModelMismatchError

from factories import make_tables


def _pairs(n=400, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, NUM_PAIR_FEATURES)).astype(np.float32)
    y = 0.5 * X[:, 0] - 0.25 * X[:, 3] + 1.0
    return X, y


@pytest.fixture(scope="module")
def prior():
    return SurrogatePrior(hidden=(16,), max_epochs=60, patience=10, batch_size=32, seed=0).fit(
        *_pairs()
    )


@pytest.fixture()
def prior_dir(prior, tmp_path):
    return prior.save(tmp_path / "prior", num_devices=4)


def test_fit_learns_and_keeps_the_best_epoch(prior):
    X, y = _pairs(200, seed=1)
    baseline = np.mean(np.abs(y - y.mean()))
    assert np.mean(np.abs(prior.predict(X) - y)) < 0.3 * baseline
    assert 0 <= prior.best_epoch_ < 60 and prior.num_pairs_ == 400
    again = SurrogatePrior(hidden=(16,), max_epochs=60, patience=10, batch_size=32, seed=0).fit(
        *_pairs()
    )
    assert np.array_equal(again.predict(X), prior.predict(X))  # seeded


def test_fit_refuses_bad_shapes():
    with pytest.raises(ValueError, match="need X"):
        SurrogatePrior().fit(np.zeros((5, 3)), np.zeros(5))


def test_directory_round_trip_through_the_registry(prior, prior_dir):
    assert {p.name for p in prior_dir.iterdir()} == {PRIOR_FILE, META_FILE}
    meta = read_meta(prior_dir)
    assert meta["kind"] == KIND and set(meta["files"]) == {PRIOR_FILE}
    assert meta["provenance"] == {"num_devices": 4}
    loaded = load_model(prior_dir, kind=KIND)
    assert isinstance(loaded, SurrogatePrior)
    X, _ = _pairs(20, seed=2)
    assert np.array_equal(loaded.predict(X), prior.predict(X))
    with pytest.raises(ModelFileError, match="not a cost model"):
        load_cost_model(prior_dir)
    with pytest.raises(ModelMismatchError, match="neural"):
        load_model(prior_dir, kind="neural")


def test_a_changed_weight_file_is_refused(prior_dir):
    path = prior_dir / PRIOR_FILE
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelFileError, match="checksum"):
        SurrogatePrior.load(prior_dir)


def test_bad_meta_is_a_model_file_error(prior_dir):
    meta = json.loads((prior_dir / META_FILE).read_text())
    meta["normalisation"]["x_mean"] = [0.0]
    (prior_dir / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="normalisation|wrong length"):
        SurrogatePrior.load(prior_dir)


def test_pair_features_shape_and_own_device_flag():
    specs = make_tables(5, seed=3)
    devices = np.array([0, 1, 1, -1, 0])
    x = pair_features(specs, devices, 2, np.ones(5))
    assert x.shape == (10, NUM_PAIR_FEATURES)
    on = x[:, -2].reshape(5, 2)
    assert on.tolist() == [[1, 0], [0, 1], [0, 1], [0, 0], [1, 0]]

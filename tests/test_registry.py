"""neuroshard/models/registry.py: model kinds, loading, and choosing a cost model."""

from __future__ import annotations

import pytest

from neuroshard.fingerprint import Fingerprint
from neuroshard.models import (
    cost_model_kinds,
    default_model_dir,
    model_class,
    model_kinds,
    resolve_cost_model,
    shipped_models,
)
from neuroshard.types import ModelFileError, ModelMismatchError, UnknownNameError


def test_kinds():
    assert cost_model_kinds() == ["lightgbm", "neural"]
    assert model_kinds() == ["lightgbm", "neural", "surco-prior"]
    assert model_class("neural").__name__ == "NeuralCostModel"
    with pytest.raises(UnknownNameError, match="lightgbm, neural"):
        model_class("xgboost")
    with pytest.raises(UnknownNameError):
        model_class("surco-prior")
    assert model_class("surco-prior", cost_model=False).__name__ == "SurrogatePrior"


def test_default_model_dir_picks_the_nearest_device_count():
    assert default_model_dir(8).name == "sim-h100"
    # a model that takes the cluster as an input is nearest inside its trained range
    # (2 to 256 devices) and, for the h100 profile, wins a tie with one trained at exactly
    # the device count
    assert default_model_dir(3).name == "sim-h100"
    assert default_model_dir(4).name == "sim-h100"
    assert default_model_dir(128).name == "sim-h100"
    assert default_model_dir(8, batch_size=4096).name == "sim-h100"  # d8 prices 65,536 only
    assert default_model_dir(4, kind="lightgbm").name == "sim-h100-d4-lightgbm"
    assert default_model_dir(4, backend="cpu").name == "cpu-b4096-d4"
    with pytest.raises(ModelFileError, match="abacus"):
        default_model_dir(4, backend="abacus")


def test_default_model_dir_keeps_to_one_hardware_profile():
    # sim-a100 sorts before sim-h100 and covers the same clusters: the profile decides
    for n in (3, 16, 128):
        assert default_model_dir(n).name == "sim-h100"
        assert default_model_dir(n, profile="a100").name == "sim-a100"
        assert default_model_dir(n, profile="h200").name == "sim-h200"
    assert default_model_dir(8, profile="h200").name == "sim-h200-d8"  # not ANY_CLUSTER_FIRST
    assert default_model_dir(4, backend="cpu", profile="a100").name == "cpu-b4096-d4"
    model = resolve_cost_model(num_devices=16, batch_size=4096, profile="a100")
    assert model.meta_["backend_fingerprint"]["profile"] == "a100"


def test_resolve_cost_model():
    model = resolve_cost_model(num_devices=4, batch_size=65_536)
    assert model.name.startswith("neural-sim")
    assert resolve_cost_model(num_devices=4, kind="lightgbm").name.startswith("lightgbm-sim")
    assert resolve_cost_model(num_devices=4, backend="cpu").batch_size == 4096
    d4 = shipped_models()["sim-h100-d4"]
    with pytest.raises(ModelMismatchError, match="batch size"):
        resolve_cost_model(d4, batch_size=1024)
    with pytest.raises(ModelMismatchError, match="cost model"):
        resolve_cost_model(d4, kind="lightgbm")
    assert resolve_cost_model(d4, kind="lightgbm", batch_size=1024, force=True).batch_size == 65_536
    with pytest.raises(UnknownNameError, match="xgboost"):
        resolve_cost_model(d4, kind="xgboost", force=True)
    with pytest.raises(ValueError, match="num_devices"):
        resolve_cost_model()


def test_fingerprint_diff_is_one_rule():
    a = Fingerprint.of({"backend": "sim", "batch_size": 4, "noise": 0.1, "gpu": None})
    assert a == Fingerprint.of('{"gpu": null, "noise": 0.1, "batch_size": 4, "backend": "sim"}')
    assert a.diff({"backend": "sim", "batch_size": 8, "extra": 1}, ignore={"noise"}) == [
        ("batch_size", 4, 8),
        ("extra", None, 1),
    ]
    assert a.describe_diff(
        {"backend": "cpu", "batch_size": 4, "noise": 0.1, "gpu": None}, labels=("model", "asked")
    ) == ["backend: 'sim' (model) vs 'cpu' (asked)"]
    assert Fingerprint.of(None).as_dict() == {}
    with pytest.raises(ValueError):
        Fingerprint.of("[1, 2]")

from dataclasses import replace

import pytest

from neuroshard.models import load_cost_model, read_meta
from neuroshard.pretrain.collect import part_files, read_part
from neuroshard.pretrain.pipeline import PretrainConfig, pretrain
from neuroshard.types import UsageError

from factories import FakeBackend, make_tables


def _pools():
    train = make_tables(40, seed=11)
    test = [replace(t, name=f"held_{t.name}") for t in make_tables(20, seed=12)]
    return train, test


def _run(out_dir, **kw):
    train, test = _pools()
    args = dict(
        backend=FakeBackend(),
        tables=train,
        holdout_tables=test,
        num_devices=4,
        compute_samples=1500,
        comm_samples=600,
        holdout_samples=300,
        retest_samples=50,
        seed=0,
        chunk_size=200,
        progress=False,
        max_tables=15,
        model_kwargs={"max_epochs": 100, "patience": 15, "train_batch_size": 64},
    )
    args.update(kw)
    return pretrain(PretrainConfig(out_dir, **args))


@pytest.mark.slow
def test_tiny_pretrain_end_to_end_and_resume(tmp_path):
    model_dir = _run(tmp_path)
    assert model_dir == tmp_path / "model"
    assert {p.name for p in model_dir.iterdir()} == {"compute.pt", "comm.pt", "meta.json"}
    meta = read_meta(model_dir)
    assert meta["sample_counts"]["compute"]["total"] == 1500
    assert meta["sample_counts"]["comm"]["total"] == 600
    assert meta["sample_counts"]["compute_holdout"] == 300
    assert meta["num_devices"] == 4 and meta["backend"] == "fake"
    held_out = meta["metrics"]["compute"]["test_pool"]
    assert held_out["n"] == 300
    # FakeBackend is exact (its noise floor is 0, asserted below) and training is seeded,
    # so these errors are the model's alone. At seed 0: held-out tables 15.5% MAPE,
    # Spearman 0.992; compute test split 5.9%; comm 1.5% backward, 0.85% forward. The
    # bounds leave room for float differences between torch builds, none for noise.
    assert held_out["mape"] < 0.2 and held_out["spearman"] > 0.985
    assert meta["metrics"]["compute"]["test"]["mape"] < 0.08
    assert meta["metrics"]["bwd_comm"]["test"]["mape"] < 0.02
    assert meta["metrics"]["fwd_comm"]["test"]["mape"] < 0.012
    # breakdowns cover the held-out loads; the fake backend is exact, so a retest pairs
    # each sample with itself and finds no noise
    assert sum(m["n"] for m in held_out["by_tables"].values()) <= 300
    assert set(meta["metrics"]["bwd_comm"]["test"]["by_devices"]) == {"4"}
    floor = meta["metrics"]["noise_floor"]
    assert floor["compute"]["n"] == 50 and floor["compute"]["floor_mape"] == 0
    assert floor["bwd_comm"]["n"] == 50 * 4 and floor["fwd_comm"]["mape"] == 0
    assert len(part_files(tmp_path / "data" / "compute_retest")) == 1
    model = load_cost_model(model_dir, batch_size=65_536, backend="fake")
    assert model.compute_ms([[]]).tolist() == [0.0]

    # a rerun measures nothing new and trains the same model on the same data
    parts = {p: p.stat().st_mtime_ns for p in part_files(tmp_path / "data" / "compute")}
    again = read_meta(_run(tmp_path))
    assert {p: p.stat().st_mtime_ns for p in part_files(tmp_path / "data" / "compute")} == parts
    assert again["training_data_hash"] == meta["training_data_hash"]
    assert again["metrics"] == meta["metrics"]


def test_pretrain_rejects_kwargs_for_a_backend_object(tmp_path):
    with pytest.raises(ValueError, match="backend_kwargs"):
        _run(tmp_path, backend_kwargs={"profile": "h100"})


class _RecordingBackend(FakeBackend):
    """Remembers what it measured, in order: ("compute", table names) or ("comm", dims)."""

    def __init__(self):
        super().__init__()
        self.log = []

    def measure_compute(self, load):
        self.log.append(("compute", tuple(t.name for t in load)))
        return super().measure_compute(load)

    def measure_comm(self, dim_sums, waits_ms):
        self.log.append(("comm", tuple(dim_sums)))
        return super().measure_comm(dim_sums, waits_ms)


def test_rounds_interleave_sets_and_retest_after_the_first_measurement(tmp_path):
    be = _RecordingBackend()
    meta = read_meta(
        _run(
            tmp_path / "r3",
            backend=be,
            rounds=3,
            compute_samples=60,
            comm_samples=30,
            holdout_samples=30,
            retest_samples=10,
            chunk_size=7,
            model_kwargs={"max_epochs": 2},
        )
    )
    compute = [names for what, names in be.log if what == "compute"]
    held = [i for i, names in enumerate(compute) if names[0].startswith("held_")]
    trained = [i for i, names in enumerate(compute) if not names[0].startswith("held_")]
    assert len(trained) == 60 and len(held) == 30 + 10
    assert held[0] < trained[-1]  # held-out loads measured between training loads
    assert sum(what == "comm" for what, _ in be.log) == 30 + 10
    assert [what for what, _ in be.log[:2]] == ["compute", "compute"]
    for i in held:  # every second measurement comes a round after the first
        names = compute[i]
        first = compute.index(names)
        if first != i:
            between = compute[first + 1 : i]
            assert sum(not n[0].startswith("held_") for n in between) >= 20
    # the same samples on disk as one round: rounds change the order, not the keys
    one = read_meta(
        _run(
            tmp_path / "r1",
            compute_samples=60,
            comm_samples=30,
            holdout_samples=30,
            retest_samples=10,
            model_kwargs={"max_epochs": 2},
        )
    )
    assert meta["training_data_hash"] == one["training_data_hash"]
    assert meta["metrics"]["noise_floor"]["compute"]["n"] == 10


def test_pretrain_rejects_zero_rounds(tmp_path):
    with pytest.raises(ValueError, match="rounds"):
        _run(tmp_path, rounds=0)


def test_samples_ray_gave_up_on_stop_the_run_and_a_rerun_measures_only_them(tmp_path, monkeypatch):
    from neuroshard.pretrain import pipeline
    from neuroshard.pretrain.collect import CollectResult, collect
    from neuroshard.types import BackendError

    def gives_up_on_seven_comm_samples(backend, spec, workers, address):
        # collect_ray's contract: chunks that fail every retry are left off the disk and
        # counted in CollectResult.failed
        def run(samples, out, **kw):
            lost = 7 if kw["description"] == "comm samples" else 0
            got = collect(samples[: len(samples) - lost], backend, out, **kw)
            return CollectResult(out, got.measured, got.skipped, len(samples), lost)

        return run

    sizes = dict(
        compute_samples=60,
        comm_samples=30,
        holdout_samples=30,
        retest_samples=10,
        model_kwargs={"max_epochs": 2},
    )
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_collector", gives_up_on_seven_comm_samples)
        with pytest.raises(BackendError) as err:
            _run(tmp_path, **sizes)
    message = str(err.value)
    assert message.startswith("7 samples were not measured")
    assert "7 of 30 comm samples" in message and "Rerun the same command" in message
    assert not (tmp_path / "model").exists() and not (tmp_path / "train").exists()

    be = _RecordingBackend()  # the rerun resumes: only the 7 missing samples are measured
    meta = read_meta(_run(tmp_path, backend=be, **sizes))
    assert [what for what, _ in be.log] == ["comm"] * 7
    assert meta["sample_counts"]["comm"]["total"] == 30


def test_plan_rounds_measure_the_searches_loads_and_train_on_them(tmp_path):
    from neuroshard.search import get_searcher

    model_dir = _run(
        tmp_path,
        compute_samples=400,
        comm_samples=200,
        holdout_samples=50,
        retest_samples=10,
        model_kwargs={"max_epochs": 5, "patience": 5, "train_batch_size": 64},
        plan_rounds=2,
        plan_tasks=2,
        plan_searchers=[get_searcher("greedy-grid")],
    )
    meta = read_meta(model_dir)
    plans = meta["sample_counts"]["compute_plans"]
    measured = sum(len(read_part(p)) for p in part_files(tmp_path / "data" / "compute_plans"))
    assert 2 <= plans <= measured <= 2 * 2 * 4  # rounds x tasks x devices, deduplicated
    assert meta["sample_counts"]["compute"]["total"] == 400 + plans
    assert meta["provenance"]["plan_rounds"] == 2 and meta["provenance"]["plan_tasks"] == 2


def test_plan_rounds_need_searchers(tmp_path):
    with pytest.raises(UsageError, match="plan_searchers"):
        PretrainConfig(tmp_path, plan_rounds=1)
    with pytest.raises(UsageError, match="plan_tasks"):
        PretrainConfig(tmp_path, plan_tasks=0)

"""Range models (issue 15): batch and topology as inputs, generated tables, loads of
hundreds of shards, ensemble spread and conservative prices."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neuroshard.backends.sim import SimBackend
from neuroshard.features import NUM_BATCH_FEATURES, batch_features, raw_features
from neuroshard.models import load_cost_model, resolve_cost_model
from neuroshard.models.neural import NeuralCostModel, link_times_ms
from neuroshard.pretrain import generate as gen
from neuroshard.types import Cluster, ModelMismatchError, Plan, Shard, TableSpec

GB = 10**9


def make_table(name="t", rows=100_000, dim=64, pooling=10.0) -> TableSpec:
    return TableSpec(name=name, rows=rows, dim=dim, pooling_factor=pooling)


# ---------------------------------------------------------------- features


def test_batch_features_scale_with_batch():
    raw = raw_features([make_table(), make_table("big", rows=10**9, dim=256, pooling=50)])
    small, large = batch_features(raw, 512), batch_features(raw, 262_144)
    assert small.shape == (2, NUM_BATCH_FEATURES)
    assert np.all(large[:, [0, 1, 3]] > small[:, [0, 1, 3]])
    assert np.all(large[:, 2] >= small[:, 2])  # unique rows grow until the rows cap them
    # a 100k-row table is capped by its rows at a large batch: log10(1 + 1e5)
    assert large[0, 2] == pytest.approx(np.log10(1 + 1e5), rel=1e-6)
    per_row = batch_features(raw, np.array([512, 262_144]))
    np.testing.assert_allclose(per_row, [small[0], large[1]])


def test_link_times_follow_the_hosts():
    d = np.array([[100.0, 100.0, 100.0, 100.0]])
    mask = np.ones_like(d, dtype=bool)
    one_host = link_times_ms(d, mask, [1000, 4, 1e6, 1e5])
    two_hosts = link_times_ms(d, mask, [1000, 2, 1e6, 1e5])
    out_bytes = 1000 * 4 * 100.0
    # one host: 3/4 of each device's output goes over NVLink, nothing across hosts
    np.testing.assert_allclose(one_host[0, :, 0], out_bytes * 3 / 4 / 1e6)
    np.testing.assert_allclose(one_host[0, :, 1], 0.0)
    # two hosts of two: 1/4 inside, 2/4 across
    np.testing.assert_allclose(two_hosts[0, :, 0], out_bytes / 4 / 1e6)
    np.testing.assert_allclose(two_hosts[0, :, 1], out_bytes * 2 / 4 / 1e5)
    np.testing.assert_allclose(two_hosts[0, :, 3], 2.0)  # devices on its host
    np.testing.assert_allclose(two_hosts[0, :, 4], 4.0)  # devices


# ---------------------------------------------------------------- generated tables


@pytest.mark.parametrize("family", gen.FAMILIES)
def test_generated_tables_cover_the_ranges(family):
    tables = gen.generate_tables(200, 3, family)
    rows = np.array([t.rows for t in tables])
    dims = np.array([t.dim for t in tables])
    pooling = np.array([t.pooling_factor for t in tables])
    assert rows.min() >= 100 and rows.max() <= 10**10 and rows.max() > 10**8
    assert np.all(dims % 4 == 0) and dims.max() <= 1024 and len(set(dims)) > 20
    assert pooling.min() >= 1.0 and pooling.max() <= 500.0
    for t in tables:
        assert sum(t.reuse_hist) == pytest.approx(1.0, abs=1e-5)
    assert gen.generate_tables(5, 3, family) == gen.generate_tables(5, 3, family)


def test_families_differ_and_unknown_family_is_refused():
    # a small table looked up far more often than it has rows has every row in the last
    # bin, whatever the distribution: compare the others
    a = {t.reuse_hist for t in gen.generate_tables(50, 0, "zipf") if max(t.reuse_hist) < 1}
    b = {t.reuse_hist for t in gen.generate_tables(50, 0, "heldout") if max(t.reuse_hist) < 1}
    assert len(a) > 20 and len(b) > 20 and not a & b
    with pytest.raises(ValueError, match="unknown family"):
        gen.generate_tables(1, 0, "nope")


def test_mixture_family_shapes_what_one_zipf_cannot():
    # near-uniform tables (most unique rows read once) and hot heads over flat bodies
    # (rows read once and rows read in the top bins, little between) both occur
    big = [t for t in gen.generate_tables(400, 2, "mixture") if t.rows > 10**8]
    once = [t.reuse_hist[0] for t in big]
    assert max(once) > 0.99
    hot_over_flat = [
        t
        for t in big
        if t.reuse_hist[0] > 0.5 and sum(t.reuse_hist[8:]) > 0 and t.reuse_hist[4] < 0.01
    ]
    assert hot_over_flat
    z = {t.reuse_hist for t in gen.generate_tables(50, 0, "zipf") if max(t.reuse_hist) < 1}
    m = {t.reuse_hist for t in gen.generate_tables(50, 0, "mixture") if max(t.reuse_hist) < 1}
    assert len(m) > 20 and not z & m


def test_piecewise_family_falls_with_rank_in_any_shape():
    tables = gen.generate_tables(400, 5, "piecewise")
    big = [t for t in tables if t.rows > 10**8]
    assert max(t.reuse_hist[0] for t in big) > 0.99  # flat: near-uniform access
    # a hot head over a cliff: rows read in the top bins, rows read once, a gap between
    assert any(
        t.reuse_hist[0] > 0.3 and sum(t.reuse_hist[9:]) > 0 and sum(t.reuse_hist[3:7]) < 0.02
        for t in big
    )
    others = {
        t.reuse_hist
        for f in ("zipf", "mixture", "heldout")
        for t in gen.generate_tables(50, 5, f)
        if max(t.reuse_hist) < 1
    }
    mine = {t.reuse_hist for t in tables[:50] if max(t.reuse_hist) < 1}
    assert len(mine) > 20 and not mine & others


def test_extra_loads_need_their_families(tmp_path):
    with pytest.raises(ValueError, match="extra_loads"):
        gen.train_range_model(tmp_path, extra_families=("piecewise",))
    with pytest.raises(ValueError, match="extra_loads"):
        gen.train_range_model(tmp_path, extra_loads=10)
    with pytest.raises(ValueError, match="extra_families .*trainable"):
        gen.train_range_model(tmp_path, extra_families=("heldout",), extra_loads=10)


def test_extra_loads_drawn_for_other_families_are_refused(model_dir):
    # the module's model drew 40 piecewise loads into extra.npz; asking for mixture ones
    # (or another count) must not reuse them silently
    with pytest.raises(ValueError, match="40 loads of piecewise, not 40 of mixture"):
        gen.train_range_model(model_dir.parent, extra_families=("mixture",), extra_loads=40)
    with pytest.raises(ValueError, match="not 41 of piecewise"):
        gen.train_range_model(model_dir.parent, extra_families=("piecewise",), extra_loads=41)


def test_range_config_fractions_are_checked_and_honoured():
    with pytest.raises(ValueError, match="single_fraction"):
        gen.RangeConfig(single_fraction=0.6, small_fraction=0.5)
    rng = np.random.default_rng(4)
    tables = gen.generate_tables(100, 1, "zipf")
    cfg = gen.RangeConfig(single_fraction=0.3, small_fraction=0.8)
    loads, _ = gen.sample_range_loads([tables], 1000, rng, cfg)
    sizes = np.array([len(load) for load in loads])
    assert 0.25 < np.mean(sizes == 1) < 0.4 and 0.75 < np.mean(sizes < 16) < 0.85


def test_the_heldout_family_is_never_trained_on(tmp_path):
    with pytest.raises(ValueError, match="trainable"):
        gen.train_range_model(tmp_path, families=("zipf", "heldout"))


def test_range_loads_hold_hundreds_of_shards_within_the_cap():
    rng = np.random.default_rng(0)
    tables = gen.generate_tables(300, 1, "zipf")
    cfg = gen.RangeConfig(memory_cap_bytes=80 * GB)
    loads, batches = gen.sample_range_loads([tables], 300, rng, cfg)
    sizes = [len(load) for load in loads]
    assert min(sizes) == 1 and max(sizes) > 100
    assert all(sum(t.size_bytes for t in load) <= cfg.memory_cap_bytes for load in loads)
    assert batches.min() >= gen.BATCH_RANGE[0] and batches.max() <= gen.BATCH_RANGE[1]
    assert len(set(batches.tolist())) > 20


def test_cluster_comm_labels_match_the_sim_on_that_cluster():
    rng = np.random.default_rng(1)
    sums, waits, ctx, shards = gen.sample_cluster_comm([128, 64, 32], 20, rng)
    data = gen.label_comm(sums, waits, ctx, shards)
    assert data.num_devices.min() >= 2 and data.num_devices.max() <= 256
    for i in range(3):
        n, per_host = len(sums[i]), int(ctx[i, 1])
        assert n % per_host == 0
        cluster = Cluster.uniform(
            n,
            GB,
            int(ctx[i, 0]),
            devices_per_host=per_host,
            intra_host_bw_bytes_per_ms=ctx[i, 2],
            inter_host_bw_bytes_per_ms=ctx[i, 3],
        )
        sim = SimBackend("h100", int(ctx[i, 0])).for_cluster(cluster)
        np.testing.assert_allclose(data.bwd_ms[i, :n], sim.bwd_comm_ms(sums[i][None])[0])


# ---------------------------------------------------------------- a small range model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("range")
    return gen.train_range_model(
        out,
        compute_samples=300,
        comm_samples=120,
        generated_tables=60,
        members=2,
        conservative_k=0.0,
        compute_seconds=4,
        comm_seconds=2,
        families=("zipf", "mixture"),
        extra_families=("piecewise",),
        extra_loads=40,
    )


@pytest.fixture(scope="module")
def model(model_dir) -> NeuralCostModel:
    return load_cost_model(model_dir)


def test_meta_records_the_ranges_and_inputs(model_dir):
    meta = json.loads((model_dir / "meta.json").read_text())
    assert meta["batch_input"] is True and meta["architecture"]["inputs"] == "table20+batch4/v1"
    assert meta["provenance"]["sources"][1:] == [
        "generated zipf family",
        "generated mixture family",
        "generated piecewise family (extra loads)",
    ]
    assert meta["provenance"]["extra_loads"] == 40
    assert meta["provenance"]["extra_families"] == ["piecewise"]
    assert meta["provenance"]["data_reused"] is False  # this call drew data.npz
    extra = np.load(model_dir.parent / "extra.npz")
    assert len(extra["c_keys"]) == 40 and all(
        n.startswith("gen_piecewise") for n in extra["c_names"]
    )
    assert meta["training_ranges"]["batch_size"] == [512.0, 262144.0]
    low, high = meta["training_ranges"]["devices"]
    assert low >= 2 and high > 16
    assert meta["training_ranges"]["tables_per_device"][1] > 100
    low, high = meta["training_ranges"]["devices_per_host"]
    assert 1 <= low < high <= 8  # the generated clusters' hosts
    floors = meta["metrics"]["noise_floor"]
    # labels carry lognormal noise of 0.03: the truth's MAPE against them is about 2.4%
    assert 0.015 < floors["compute"]["floor_mape"] < 0.035
    assert 0.015 < floors["bwd_comm"]["floor_mape"] < 0.035
    assert set(meta["metrics"]["compute"]["test"]["by_batch"]) <= {
        "512",
        "2048",
        "8192",
        "32768",
        "131072",
    }
    assert meta["metrics"]["bwd_comm"]["test"]["by_hosts"]


def test_batch_and_cluster_are_inputs(model):
    load = [[make_table("a"), make_table("b", rows=10**7, dim=128, pooling=30)]]
    small = model.for_batch(512).compute_ms(load)[0]
    large = model.for_batch(262_144).compute_ms(load)[0]
    assert large != small
    assert model.for_batch(65536) is model  # its own default batch: no copy
    d = np.array([[512.0] * 16])
    one_host = model.for_cluster(Cluster.uniform(16, GB, 65536)).bwd_comm_ms(d)
    two_hosts = model.for_cluster(Cluster.uniform(16, GB, 65536, devices_per_host=8))
    assert not np.allclose(one_host, two_hosts.bwd_comm_ms(d))


def test_hosts_larger_than_trained_on_are_out_of_range(model):
    low, high = model.training_ranges_["devices_per_host"]
    table = make_table("a")
    shards = (Shard("a", 0, table.dim, 0),)
    inside = Plan((table,), shards, Cluster.uniform(16, GB, 65536, devices_per_host=high))
    assert model.out_of_range(inside) == []
    one_host = Plan((table,), shards, Cluster.uniform(16, GB, 65536))
    assert model.out_of_range(one_host) == [
        f"devices per host 16 outside the model's training range [{low}, {high}]"
    ]


def test_save_load_keeps_predictions(model, model_dir, tmp_path):
    load = [[make_table("a", dim=36), make_table("b", rows=10**9, dim=512)]]
    bound = model.for_cluster(Cluster.uniform(32, GB, 4096, devices_per_host=8))
    again = load_cost_model(model.save(tmp_path / "m")).for_cluster(
        Cluster.uniform(32, GB, 4096, devices_per_host=8)
    )
    np.testing.assert_array_equal(bound.compute_ms(load), again.compute_ms(load))
    d = np.arange(32, dtype=float)[None] * 16
    np.testing.assert_array_equal(bound.fwd_comm_ms(d, d / 100), again.fwd_comm_ms(d, d / 100))


def test_spread_and_conservative_price(model):
    loads = [[make_table("a")], [make_table(f"t{i}", dim=4 * (i + 1)) for i in range(50)], []]
    spread = model.compute_spread(loads)
    assert spread[0] > 0 and spread[1] > 0 and spread[2] == 0
    base = model.compute_ms(loads)
    cautious = model.with_conservative(2.0).compute_ms(loads)
    np.testing.assert_allclose(
        cautious[:2], (base[:2] + 1e-3) * np.exp(2 * spread[:2]) - 1e-3, rtol=1e-4
    )
    assert cautious[2] == 0.0
    with pytest.raises(ValueError):
        model.with_conservative(-1.0)


def test_resolve_accepts_any_batch_in_range(model_dir):
    m = resolve_cost_model(model_dir, batch_size=4096)
    assert m.context.batch_size == 4096
    with pytest.raises(ModelMismatchError, match="outside the model's training range"):
        resolve_cost_model(model_dir, batch_size=300)
    forced = resolve_cost_model(model_dir, batch_size=300, force=True)
    assert forced.context.batch_size == 300


def test_one_batch_models_are_unchanged(model):
    old = NeuralCostModel(batch_size=65536)
    assert old.for_cluster(Cluster.uniform(4, GB)) is old
    with pytest.raises(ModelMismatchError):
        old.for_batch(4096)


def test_warm_start_begins_from_the_given_weights(model, model_dir, tmp_path):
    from neuroshard.pretrain.generate import load_data

    compute, batches, comm, ctx = load_data(model_dir.parent / "data.npz")
    extra, extra_batches = gen._load_compute(np.load(model_dir.parent / "extra.npz"))
    compute, batches = compute.concat(extra), np.concatenate([batches, extra_batches])
    again = NeuralCostModel(range_inputs=True, compute_members=2, max_epochs=0)  # same split
    again.fit(compute, comm, compute_batch=batches, comm_context=ctx, init_from=model)
    load = [[make_table("a"), make_table("b", dim=12)]]
    np.testing.assert_allclose(again.compute_ms(load), model.compute_ms(load), rtol=1e-5)
    with pytest.raises(ValueError, match="architecture"):
        NeuralCostModel(range_inputs=True, compute_members=1, max_epochs=0).fit(
            compute, comm, compute_batch=batches, comm_context=ctx, init_from=model
        )


def test_the_search_path_pays_the_conservative_price(model):
    """The scorer's additive path (summed shard embeddings through the head) prices a load
    as compute_ms does, spread included."""
    from neuroshard.search.scoring import plan_cost
    from neuroshard.types import Plan, Shard

    cautious = model.with_conservative(1.0)
    load = [make_table(f"t{i}", dim=8 * (i + 1)) for i in range(20)]
    emb = cautious.shard_embeddings(load).sum(axis=0, keepdims=True)
    np.testing.assert_allclose(
        cautious.compute_from_embeddings(emb, [20]), cautious.compute_ms([load]), rtol=1e-4
    )
    cluster = Cluster.uniform(2, 10 * GB, 4096)
    plan = Plan(tuple(load), tuple(Shard(t.name, 0, t.dim, 0) for t in load), cluster)
    assert (
        plan_cost(plan, cautious).devices[0].compute_ms
        > plan_cost(plan, model).devices[0].compute_ms
    )


def test_range_plan_loads_are_plans_device_loads_at_grid_batches(model):
    from neuroshard.search import get_searcher

    rng = np.random.default_rng(3)
    tables = gen.generate_tables(80, 4, "zipf")
    loads, batches = gen.range_plan_loads(
        model, tables, 3, rng, [get_searcher("greedy-grid")], table_range=(20, 40),
        device_range=(8, 16),
    )  # fmt: skip
    assert len(loads) == len(batches) and 3 <= len(loads) <= 3 * 16
    assert set(batches.tolist()) <= set(gen.batch_grid().tolist())
    assert all(load for load in loads)


def test_plan_tasks_add_labelled_plan_loads_and_are_reused(tmp_path, model_dir):
    from neuroshard.search import get_searcher

    args = dict(
        compute_samples=200, comm_samples=80, generated_tables=40, members=2,
        conservative_k=0.0, compute_seconds=2, comm_seconds=1, init_from=model_dir,
        plan_tasks=2, plan_searchers=[get_searcher("greedy-grid")],
    )  # fmt: skip
    meta = json.loads((gen.train_range_model(tmp_path, **args) / "meta.json").read_text())
    plans = meta["provenance"]["plan_loads"]
    assert plans > 0 and meta["sample_counts"]["compute"]["total"] == 200 + plans
    assert (tmp_path / "plans.npz").exists()
    again = json.loads((gen.train_range_model(tmp_path, **args) / "meta.json").read_text())
    assert again["provenance"]["plan_loads"] == plans
    with pytest.raises(ValueError, match="plans.npz holds the loads of 2 plan tasks, not 3"):
        gen.train_range_model(tmp_path, **{**args, "plan_tasks": 3})
    with pytest.raises(ValueError, match="init_from"):
        gen.train_range_model(tmp_path / "x", plan_tasks=2)
    # A next step keeps the earlier step's loads and plans new tasks under new keys.
    step = tmp_path / "step2"
    step.mkdir()
    (step / "data.npz").write_bytes((tmp_path / "data.npz").read_bytes())
    nxt = {**args, "earlier_plans": [tmp_path / "plans.npz"]}
    meta2 = json.loads((gen.train_range_model(step, **nxt) / "meta.json").read_text())
    z_old, z_new = (np.load(d / "plans.npz") for d in (tmp_path, step))
    assert meta2["provenance"]["plan_loads"] == plans + len(z_new["c_keys"])
    assert meta2["provenance"]["earlier_plan_files"] == 1
    assert meta2["provenance"]["data_reused"] is True  # the copied data.npz
    assert not set(z_old["c_keys"].tolist()) & set(z_new["c_keys"].tolist())
    with pytest.raises(ValueError, match="sample keys repeat"):
        gen.train_range_model(step, **{**nxt, "earlier_plans": [step / "plans.npz"]})
    with pytest.raises(ValueError, match="sample keys repeat"):  # refused before planning
        gen.train_range_model(
            tmp_path / "step3", **{**nxt, "earlier_plans": [step / "plans.npz"] * 2}
        )
    assert not (tmp_path / "step3").exists()
    with pytest.raises(ValueError, match="earlier_plans: .*missing.npz is not a file"):
        gen.train_range_model(step, **{**nxt, "earlier_plans": [tmp_path / "missing.npz"]})


def test_small_loads_are_drawn_once_half_single_and_counted(tmp_path):
    args = dict(
        compute_samples=150, comm_samples=60, generated_tables=30, members=1,
        conservative_k=0.0, compute_seconds=1, comm_seconds=1, small_loads=80, max_epochs=3,
    )  # fmt: skip
    meta = json.loads((gen.train_range_model(tmp_path, **args) / "meta.json").read_text())
    assert meta["provenance"]["small_loads"] == 80
    assert meta["hyperparameters"]["max_epochs"] == meta["provenance"]["max_epochs"] == 3
    assert meta["training"]["compute"]["epochs_run"] <= 3
    assert meta["sample_counts"]["compute"]["total"] == 150 + 80
    z = np.load(tmp_path / "small.npz")
    sizes = np.diff(z["c_offsets"])
    assert sizes.max() <= 15 and 0.3 < np.mean(sizes == 1) < 0.7
    assert all(k.startswith("sm") for k in z["c_keys"].tolist())
    drawn = (tmp_path / "small.npz").stat().st_mtime_ns
    again = json.loads((gen.train_range_model(tmp_path, **args) / "meta.json").read_text())
    assert (tmp_path / "small.npz").stat().st_mtime_ns == drawn  # read back, not drawn again
    assert again["training_data_hash"] == meta["training_data_hash"]
    with pytest.raises(ValueError, match="small.npz holds 80 small loads, not 90"):
        gen.train_range_model(tmp_path, **{**args, "small_loads": 90})
    with pytest.raises(ValueError, match="small_loads must be >= 0"):
        gen.train_range_model(tmp_path / "x", small_loads=-1)
    with pytest.raises(ValueError, match="max_epochs must be >= 1"):
        gen.train_range_model(tmp_path / "x", max_epochs=0)


def test_members_price_on_their_own_and_average_to_the_model():
    model = resolve_cost_model(num_devices=16, batch_size=4096)
    assert isinstance(model, NeuralCostModel) and model.compute_members == 3
    members = model.members()
    loads = [gen.generate_tables(4, 3)[:k] for k in (1, 2, 4)]
    each = np.stack([m.compute_ms(loads) for m in members])
    assert all(m.compute_members == 1 and m.conservative_k == 0.0 for m in members)
    assert members[0].batch_size == model.batch_size == 4096  # the binding is kept
    assert not np.allclose(each[0], each[1])  # members of their own
    eps = model.eps_ms
    mean = np.exp(np.log(each + eps).mean(axis=0)) - eps  # the members' mean in log space
    np.testing.assert_allclose(model.with_conservative(0.0).compute_ms(loads), mean, rtol=1e-5)
    lone = members[0].members()
    assert len(lone) == 1 and np.allclose(lone[0].compute_ms(loads), each[0])

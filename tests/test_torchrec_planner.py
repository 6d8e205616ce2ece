"""NeuroShardPlanner as a TorchRec user meets it (issue 16), one test per scenario.

Constraints honoured or refused by name, every embedding module planned (nested EBCs,
EmbeddingCollections, reused table names), per-feature pooling factors, TorchRec's per-rank
batch size, the model chosen by compute device, plan files that load without unpickling,
``plan --torchrec-out`` with module paths, the estimator's wirings and kernel costs, and
the storage reserve. DMP runs of these plans are in tests/test_torchrec_dmp.py.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchrec")

from torch import nn  # noqa: E402
from torchrec.distributed.embedding import EmbeddingCollectionSharder  # noqa: E402
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder  # noqa: E402
from torchrec.distributed.planner.types import (  # noqa: E402
    CacheParams,
    ParameterConstraints,
    Topology,
)
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig  # noqa: E402
from torchrec.modules.embedding_modules import (  # noqa: E402
    EmbeddingBagCollection,
    EmbeddingCollection,
)

from neuroshard.plan_io import write_plan  # noqa: E402
from neuroshard.torchrec_adapter import (  # noqa: E402
    NeuroShardEstimator,
    load_sharding_plan,
    table_specs,
    to_sharding_plan,
)
from neuroshard.torchrec_planner import NeuroShardPlanner  # noqa: E402
from neuroshard.types import (  # noqa: E402
    DEFAULT_RESERVE_FRACTION,
    ConstraintError,
    Constraints,
    ModelFileError,
    ModelMismatchError,
    NeuroShardError,
    Plan,
    PlanInfeasibleError,
    Shard,
    TableConstraint,
    TableSpecError,
)

from factories import FakeEstimator, make_cluster, make_table  # noqa: E402

META = torch.device("meta")
BOTH = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def ebc(specs, *, features=None, weighted=False, device=META) -> EmbeddingBagCollection:
    """An EBC of ``(name, rows, dim)``; ``features`` maps a name to its feature names."""
    features = features or {}
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=n, num_embeddings=r, embedding_dim=d, feature_names=features.get(n, [f"f_{n}"])
            )
            for n, r, d in specs
        ],
        is_weighted=weighted,
        device=device,
    )


def ec(specs, device=META) -> EmbeddingCollection:
    return EmbeddingCollection(
        tables=[
            EmbeddingConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=[f"s_{n}"])
            for n, r, d in specs
        ],
        device=device,
    )


class Model(nn.Module):
    """An EBC nested two deep (as in DLRM's sparse_arch), and optionally an EC whose table
    reuses an EBC table's name."""

    def __init__(self, tables, sequence=()):
        super().__init__()
        self.sparse_arch = nn.Module()
        self.sparse_arch.embedding_bag_collection = ebc(tables)
        if sequence:
            self.seq = ec(sequence)
        self.dense = nn.Linear(4, 4, device=META)


EIGHT = [(f"t{i}", 1000 * (i + 1), 64) for i in range(8)]
EBC_PATH = "sparse_arch.embedding_bag_collection"


def topology(n: int, device: str = "cpu", cap: int = 1 << 30, **kwargs) -> Topology:
    caps = {"ddr_cap": cap} if device == "cpu" else {"hbm_cap": cap}
    return Topology(world_size=n, compute_device=device, **caps, **kwargs)


def split_everything(tables, cluster, estimator, *, seed=0, budget_s=None):
    """A searcher that ignores constraints: every table in two column shards on 0 and 1."""
    shards = []
    for t in tables:
        half = t.dim // 2
        shards += [Shard(t.name, 0, half, 0), Shard(t.name, half, t.dim, 1 % cluster.num_devices)]
    return Plan(tuple(tables), tuple(shards), cluster)


def planner(n=2, device="cpu", **kwargs) -> NeuroShardPlanner:
    kwargs.setdefault("estimator", FakeEstimator())
    kwargs.setdefault("searcher", "greedy-grid")
    return NeuroShardPlanner(topology(n, device, kwargs.pop("cap", 1 << 30)), **kwargs)


# --------------------------------------------------------------------------- basics


def _stub_searcher(calls):
    def search(tables, cluster, estimator, *, seed=0, budget_s=None):
        calls.append((list(tables), cluster, estimator, seed))
        return Plan(
            tuple(tables),
            tuple(Shard(t.name, 0, t.dim, i % cluster.num_devices) for i, t in enumerate(tables)),
            cluster,
        )

    return search


def test_planner_builds_tables_and_cluster_from_module_and_topology():
    model = nn.Module()
    model.sparse = nn.Module()
    model.sparse.ebc = ebc([("t0", 100, 8), ("t1", 200, 16), ("t2", 300, 24)])
    model.user_ebc = ebc([("t3", 400, 32)])
    hist = tuple([1.0] + [0.0] * 16)
    calls = []
    est = FakeEstimator()
    p = NeuroShardPlanner(
        topology(2, "cpu", cap=123_456_789),
        searcher=_stub_searcher(calls),
        estimator=est,
        table_stats={
            "t0": {"pooling_factor": 9.0, "reuse_hist": hist},
            "t1": make_table("t1", pooling_factor=4.0),
        },
        constraints={"t2": ParameterConstraints(pooling_factors=[5.0])},
        batch_size=32_768,
        seed=7,
    )
    sp = p.plan(model, [EmbeddingBagCollectionSharder()])
    ((seen, cluster, used, seed),) = calls
    assert [(t.name, t.module, t.rows, t.dim, t.pooling_factor) for t in seen] == [
        ("t0", "sparse.ebc", 100, 8, 9.0),
        ("t1", "sparse.ebc", 200, 16, 4.0),
        ("t2", "sparse.ebc", 300, 24, 5.0),
        ("t3", "user_ebc", 400, 32, 1.0),
    ]
    assert seen[0].reuse_hist == hist
    # searchers see each device's budget after the 15% reserve; the plan keeps the caps
    assert cluster.memory_per_device_bytes == (int(123_456_789 * 0.85),) * 2
    assert cluster.batch_size == 65_536
    plan_cluster = p.last_plan.cluster
    assert plan_cluster.memory_per_device_bytes == (123_456_789, 123_456_789)
    assert plan_cluster.hbm_reserve_fraction == 0.15
    assert used is est and seed == 7
    assert sp.plan["sparse.ebc"]["t1"].ranks == [1]
    assert sp.plan["user_ebc"]["t3"].ranks == [1]
    assert p.last_plan is not None and len(p.last_plan.tables) == 4


def test_planner_reads_a_table_file_and_uses_hbm_on_cuda(tmp_path):
    path = tmp_path / "tables.json"
    path.write_text(
        json.dumps(
            [
                {"name": "a", "rows": 50, "dim": 16, "pooling_factor": 11.0},
                {"name": "b", "rows": 60, "dim": 32, "pooling_factor": 3.0},
            ]
        )
    )
    calls = []
    p = NeuroShardPlanner(
        topology(2, "cuda", cap=64 << 20),  # weights and I/O buffers at 32,768 per rank
        table_stats=path,
        searcher=_stub_searcher(calls),
        estimator=FakeEstimator(),
    )
    sp = p.plan(ebc([("a", 50, 16), ("b", 60, 32)]), [EmbeddingBagCollectionSharder()])
    assert [t.pooling_factor for t in calls[0][0]] == [11.0, 3.0]
    assert p.last_plan.cluster.memory_per_device_bytes == (64 << 20, 64 << 20)
    assert p.last_plan.cluster.io_buffers
    assert str(sp.plan[""]["b"].sharding_spec.shards[0].placement) == "rank:1/cuda:1"


def test_planner_with_a_registered_searcher_round_trips():
    from neuroshard.torchrec_adapter import from_sharding_plan

    model = ebc([(f"t{i}", 1000, 32) for i in range(6)])
    p = planner(2)
    sp = p.plan(model, [EmbeddingBagCollectionSharder()])
    plan = p.last_plan
    assert plan.cost is not None and plan.meta["searcher"] == "greedy-grid"
    assert from_sharding_plan(sp, model, plan.tables, plan.cluster).shards == tuple(
        s for t in plan.tables for s in plan.shards_of(t.name)
    )


def test_collective_plan_needs_a_process_group():
    with pytest.raises(NeuroShardError, match="process group"):
        planner(2).collective_plan(Model(EIGHT), BOTH)


# --------------------------------------------------------------------------- constraints


def test_table_wise_constraint_is_honoured_by_the_default_searcher(caplog):
    # wide tables the beam would split: three must stay whole
    tables = [(f"w{i}", 200_000, 256) for i in range(4)]
    wanted = {"w0", "w1", "w2"}
    p = planner(
        4,
        "cuda",
        cap=1 << 30,
        searcher="neuroshard",
        constraints={n: ParameterConstraints(sharding_types=["table_wise"]) for n in wanted},
    )
    with caplog.at_level(logging.INFO, logger="neuroshard"):
        sp = p.plan(ebc(tables), BOTH)
    for name in wanted:
        assert sp.plan[""][name].sharding_type == "table_wise"
        assert len(p.last_plan.shards_of(name)) == 1
        assert f"table {name!r} (sharding_types=['table_wise']) honoured" in caplog.text


def test_a_searcher_that_ignores_a_constraint_is_refused_not_overridden():
    p = planner(
        2,
        searcher=split_everything,
        constraints={"t1": ParameterConstraints(sharding_types=["table_wise"])},
    )
    with pytest.raises(ConstraintError, match=r"table 't1' \(sharding_types=\['table_wise'\]\)"):
        p.plan(Model(EIGHT), BOTH)


@pytest.mark.parametrize(
    "types, device, message",
    [
        (["row_wise"], "cpu", r"offers sharding types .*on cpu"),  # gloo: no row-wise on CPU
        (["grid_shard"], "cuda", r"NeuroShard places sharding types"),
    ],
)
def test_sharding_types_nobody_can_place_are_refused_by_table(types, device, message):
    p = planner(2, device, constraints={"t3": ParameterConstraints(sharding_types=types)})
    with pytest.raises(
        ConstraintError, match=re.escape(f"table 't3' (sharding_types={types!r})") + ".*" + message
    ):
        p.plan(Model(EIGHT), BOTH)


@pytest.mark.parametrize(
    "kernels, message",
    [
        (["fused_uvm"], "NeuroShard places"),  # UVM without a cache: not in our space
        (["key_value"], "NeuroShard places"),
    ],
)
def test_kernels_nobody_can_place_are_refused_by_table(kernels, message):
    p = planner(2, "cuda", constraints={"t2": ParameterConstraints(compute_kernels=kernels)})
    with pytest.raises(ConstraintError, match=rf"table 't2' \(compute_kernels=.*{message}"):
        p.plan(Model(EIGHT), BOTH)


def test_column_wise_constraint_labels_the_table_column_wise():
    p = planner(2, constraints={"t4": ParameterConstraints(sharding_types=["column_wise"])})
    sp = p.plan(Model(EIGHT), BOTH)
    assert sp.plan[EBC_PATH]["t4"].sharding_type == "column_wise"
    assert p.last_plan.sharding_type_of("t4") == "column_wise"


def test_data_parallel_and_dense_constraints_replicate_the_table():
    p = planner(
        2,
        constraints={
            "t0": ParameterConstraints(sharding_types=["data_parallel"]),
            "t1": ParameterConstraints(compute_kernels=["dense"]),
        },
    )
    sp = p.plan(Model(EIGHT), BOTH)
    for name in ("t0", "t1"):
        ps = sp.plan[EBC_PATH][name]
        assert (ps.sharding_type, ps.compute_kernel) == ("data_parallel", "dense")


def test_uvm_caching_constraint_takes_the_cache_share_from_cache_params():
    p = planner(
        2,
        "cuda",
        constraints={
            "t5": ParameterConstraints(
                compute_kernels=["fused_uvm_caching"], cache_params=CacheParams(load_factor=0.25)
            )
        },
    )
    sp = p.plan(Model(EIGHT), BOTH)
    ps = sp.plan[EBC_PATH]["t5"]
    assert ps.compute_kernel == "fused_uvm_caching"
    assert ps.cache_params.load_factor == 0.25
    assert {s.cache_fraction for s in p.last_plan.shards_of("t5")} == {0.25}


def test_min_partition_is_checked_against_the_plan():
    p = planner(
        2, searcher=split_everything, constraints={"t0": ParameterConstraints(min_partition=48)}
    )
    with pytest.raises(ConstraintError, match=r"'t0'.*narrower than min_partition=48"):
        p.plan(Model(EIGHT), BOTH)


def test_kernel_settings_pass_through_to_the_parameter_sharding():
    p = planner(
        2, constraints={"t6": ParameterConstraints(stochastic_rounding=False, enforce_hbm=True)}
    )
    ps = p.plan(Model(EIGHT), BOTH).plan[EBC_PATH]["t6"]
    assert (ps.stochastic_rounding, ps.enforce_hbm) == (False, True)


def test_device_pins_and_colocation_from_neuroshard_constraints():
    pins = Constraints(tables={"t0": TableConstraint(devices=(1,))}, colocate=(("t2", "t3"),))
    p = planner(2, placement=pins)
    sp = p.plan(Model(EIGHT), BOTH)
    assert sp.plan[EBC_PATH]["t0"].ranks == [1]
    assert sp.plan[EBC_PATH]["t2"].ranks == sp.plan[EBC_PATH]["t3"].ranks


def test_constraints_on_tables_the_model_lacks_are_refused():
    p = planner(2, constraints={"nope": ParameterConstraints(sharding_types=["table_wise"])})
    with pytest.raises(ConstraintError, match="'nope'"):
        p.plan(Model(EIGHT), BOTH)


def test_constraints_in_the_table_config_file(tmp_path):
    from typer.testing import CliRunner

    from neuroshard.cli import app
    from neuroshard.plan_io import read_plan

    records = [{"name": n, "rows": r, "dim": 128, "pooling_factor": 8.0} for n, r, _ in EIGHT]
    records[0]["constraints"] = {"devices": [1]}
    records[1]["constraints"] = {"sharding_types": ["table_wise"]}
    records[2]["constraints"] = {"colocate": "pair"}
    records[3]["constraints"] = {"colocate": "pair"}
    config = tmp_path / "tables.json"
    config.write_text(json.dumps(records))
    out = tmp_path / "plan.json"
    done = CliRunner().invoke(app, ["plan", str(config), "-n", "4", "-m", "1GB", "--out", str(out)])
    assert done.exit_code == 0, done.stdout + done.stderr
    plan = read_plan(out)
    assert {s.device for s in plan.shards_of("t0")} == {1}
    assert len(plan.shards_of("t1")) == 1
    assert {s.device for s in plan.shards_of("t2")} == {s.device for s in plan.shards_of("t3")}

    records[4]["constraints"] = {"devices": [9]}
    config.write_text(json.dumps(records))
    done = CliRunner().invoke(app, ["plan", str(config), "-n", "4", "-m", "1GB"])
    assert done.exit_code != 0 and "table 't4'" in done.stderr and "[9]" in done.stderr
    records[4]["constraints"] = {"device": [1]}
    config.write_text(json.dumps(records))
    done = CliRunner().invoke(app, ["plan", str(config), "-n", "4", "-m", "1GB"])
    assert done.exit_code != 0 and "'t4'" in done.stderr and "unknown keys" in done.stderr


# --------------------------------------------------------------------------- modules


def test_a_model_of_embedding_collections_only_is_planned():
    model = nn.Module()
    model.seq = ec([("a", 100, 16), ("b", 200, 16)])
    sp = planner(2).plan(model, BOTH)
    assert set(sp.plan["seq"]) == {"a", "b"}


def test_every_module_is_planned_and_reused_names_are_keyed_by_path():
    model = Model(EIGHT, sequence=[("t0", 500, 16)])
    p = planner(2)
    sp = p.plan(model, BOTH)
    assert set(sp.plan) == {EBC_PATH, "seq"}
    assert set(sp.plan[EBC_PATH]) == {f"t{i}" for i in range(8)}
    assert set(sp.plan["seq"]) == {"t0"}
    names = {t.name: t for t in p.last_plan.tables}
    assert f"{EBC_PATH}.t0" in names and "seq.t0" in names
    assert names["seq.t0"].pooled is False and names["seq.t0"].module == "seq"


def test_a_module_without_a_sharder_is_named():
    with pytest.raises(NeuroShardError, match=r"EmbeddingCollection at 'seq'"):
        planner(2).plan(Model(EIGHT, sequence=[("s", 10, 8)]), [EmbeddingBagCollectionSharder()])


def test_sequence_tables_send_one_vector_per_id():
    from neuroshard.search.scoring import plan_cost

    def comm_ms(pooled):
        t = make_table("s", rows=100, dim=16, pooling_factor=5.0, pooled=pooled)
        plan = Plan((t,), (Shard("s", 0, 16, 0),), make_cluster(2))
        device = plan_cost(plan, FakeEstimator()).devices[0]
        return device.fwd_comm_ms, device.bwd_comm_ms

    # FakeEstimator's comm is 0.05 + 0.002 x values per sample: 16 pooled, 16 x 5 per id
    assert comm_ms(True)[1] == pytest.approx(0.05 + 0.002 * 16)
    assert comm_ms(False)[1] == pytest.approx(0.05 + 0.002 * 80)


# --------------------------------------------------------------------------- pooling


def test_features_are_summed_and_weighted_features_accepted():
    model = nn.Module()
    model.ebc = ebc(
        [("multi", 100, 8), ("one", 100, 8)], features={"multi": ["a", "b", "c"]}, weighted=True
    )
    specs = {s.name: s for s in table_specs(model)}
    assert specs["multi"].pooling_factor == 3.0  # 1.0 per feature, not 1.0 per table
    assert [f.name for f in specs["multi"].features] == ["a", "b", "c"]
    assert all(f.weighted for f in specs["multi"].features)
    pcs = {
        "multi": ParameterConstraints(pooling_factors=[2.0, 3.0, 4.0], num_poolings=[1.0, 2.0, 1.0])
    }
    assert table_specs(model, constraints=pcs)[0].pooling_factor == 2.0 + 6.0 + 4.0
    pcs = {
        "multi": ParameterConstraints(pooling_factors=[2.0, 3.0, 4.0], batch_sizes=[512, 256, 1024])
    }
    spec = table_specs(model, constraints=pcs, per_rank_batch_size=512)[0]
    assert spec.pooling_factor == 2.0 + 1.5 + 8.0
    stats = {
        "multi": {
            "features": [
                {"name": "a", "pooling_factor": 7.0},
                {"name": "b", "pooling_factor": 1.0},
                {"name": "c", "pooling_factor": 2.0},
            ]
        }
    }
    assert table_specs(model, stats)[0].pooling_factor == 10.0


def test_pooling_factor_lists_of_the_wrong_length_are_refused():
    model = nn.Module()
    model.ebc = ebc([("multi", 100, 8)], features={"multi": ["a", "b"]})
    pcs = {"multi": ParameterConstraints(pooling_factors=[2.0, 3.0], num_poolings=[1.0])}
    with pytest.raises(TableSpecError, match="num_poolings"):
        table_specs(model, constraints=pcs)


# --------------------------------------------------------------------------- batch size


def test_per_rank_batch_size_is_converted_to_the_global_batch():
    p = planner(2, batch_size=32_768)  # FakeEstimator prices a global 65,536
    p.plan(Model(EIGHT), BOTH)
    assert p.last_plan.cluster.batch_size == 65_536
    assert p.last_plan.cluster.per_rank_batch_size == 32_768


def test_a_batch_the_model_does_not_cover_says_which_it_does():
    with pytest.raises(
        ModelMismatchError,
        match=r"global batch of 1,024 on 2 ranks.*"
        r"covers a global batch of 65,536 only \(batch_size=32768 per rank",
    ):
        planner(2, batch_size=512).plan(Model(EIGHT), BOTH)
    with pytest.raises(ModelMismatchError, match="batch_size=32768 per rank"):
        NeuroShardEstimator(topology(2), estimator=FakeEstimator(), batch_size=512)


class RangeEstimator(FakeEstimator):
    """A fake model that takes the batch as an input, trained on 512 to 262,144."""

    meta_ = {"batch_input": True, "training_ranges": {"batch_size": [512, 262_144]}}

    def for_batch(self, batch_size):
        bound = RangeEstimator(batch_size)
        bound.name = f"fake@{batch_size}"
        return bound


def test_a_batch_aware_model_takes_any_batch_in_its_range():
    p = planner(2, batch_size=512, estimator=RangeEstimator())
    p.plan(Model(EIGHT), BOTH)
    assert p.last_plan.cluster.batch_size == 1024
    assert p.last_plan.cost.model == "fake@1024"
    with pytest.raises(
        ModelMismatchError,
        match=r"global batches 512 to 262,144 \(batch_size "
        r"256 to 131072 per rank here\)",
    ):
        planner(2, batch_size=200, estimator=RangeEstimator()).plan(Model(EIGHT), BOTH)


def test_shipped_model_batch_is_checked_too():
    with pytest.raises(ModelMismatchError, match=r"covers a global batch of 4,096 only"):
        NeuroShardPlanner(topology(2, "cpu"), batch_size=512).cost_model()


# --------------------------------------------------------------------------- compute device


def test_the_model_follows_the_compute_device():
    cpu = NeuroShardPlanner(topology(2, "cpu")).cost_model()
    gpu = NeuroShardPlanner(topology(2, "cuda")).cost_model()
    assert (cpu.batch_size, gpu.batch_size) == (4096, 65_536)
    assert "cpu" in cpu.name and "sim" in gpu.name
    with pytest.raises(ModelFileError, match="compute device 'mtia'.*cover: cpu, cuda"):
        NeuroShardPlanner(topology(2, "mtia", cap=1 << 30)).cost_model()


# --------------------------------------------------------------------------- plan files


def test_load_sharding_plan_builds_the_plan_from_json_for_the_model(tmp_path):
    model = Model(EIGHT, sequence=[("t0", 500, 16)])
    p = planner(2)
    direct = p.plan(model, BOTH)
    path = tmp_path / "plan.json"
    write_plan(p.last_plan, path)
    assert json.loads(path.read_text())["format"] == "neuroshard.plan/v2"  # JSON, no pickle
    loaded = load_sharding_plan(path, model, device_type="cpu")
    assert loaded == direct


def test_load_sharding_plan_names_a_module_path_the_model_lacks(tmp_path):
    p = planner(2)
    p.plan(Model(EIGHT), BOTH)
    path = tmp_path / "plan.json"
    write_plan(p.last_plan, path)
    other = nn.Module()
    other.sparse = nn.Module()
    other.sparse.ebc = ebc(EIGHT)
    with pytest.raises(
        TableSpecError,
        match=rf"module path '{EBC_PATH}' is not an embedding "
        r"module of the model \(its embedding modules: 'sparse.ebc'\)",
    ):
        load_sharding_plan(path, other, device_type="cpu")


def _factory_module(tmp_path: Path, monkeypatch) -> str:
    (tmp_path / "user_models.py").write_text(
        "import torch\n"
        "from test_torchrec_planner import Model, EIGHT\n"
        "def dlrm():\n"
        "    return Model(EIGHT)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_models:dlrm"


def test_plan_cli_torchrec_out_with_module_path_and_model_factory(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from neuroshard.cli import app

    config = tmp_path / "tables.json"
    config.write_text(json.dumps([{"name": n, "rows": r, "dim": d} for n, r, d in EIGHT]))
    runner = CliRunner()
    base = ["plan", str(config), "-n", "2", "-m", "1GB", "--searcher", "greedy-grid"]

    out = tmp_path / "a.pt"
    done = runner.invoke(app, [*base, "--torchrec-out", str(out), "--module-path", EBC_PATH])
    assert done.exit_code == 0, done.stdout + done.stderr
    assert set(torch.load(out, weights_only=False).plan) == {EBC_PATH}

    target = _factory_module(tmp_path, monkeypatch)
    out = tmp_path / "b.pt"
    done = runner.invoke(app, [*base, "--torchrec-out", str(out), "--model-factory", target])
    assert done.exit_code == 0, done.stdout + done.stderr
    assert set(torch.load(out, weights_only=False).plan) == {EBC_PATH}

    config.write_text(
        json.dumps([{"name": n, "rows": r, "dim": d, "module": "sparse.ebc"} for n, r, d in EIGHT])
    )
    done = runner.invoke(app, [*base, "--torchrec-out", str(out), "--model-factory", target])
    assert done.exit_code != 0
    assert "module path 'sparse.ebc' is not an embedding module of the model" in done.stderr

    done = runner.invoke(app, [*base, "--module-path", EBC_PATH])
    assert done.exit_code != 0 and "go with --torchrec-out" in done.stderr


# --------------------------------------------------------------------------- estimator


def _options(topo, tables, kernels, constraints=None, per_rank=16_384):
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator

    pcs = constraints or {
        n: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=kernels)
        for n, _, _ in tables
    }
    ours = NeuroShardEstimator(topo, pcs, FakeEstimator(), batch_size=per_rank)
    enumerator = EmbeddingEnumerator(
        topology=topo,
        batch_size=per_rank,
        constraints=pcs,
        estimator=[ours, EmbeddingStorageEstimator(topo, pcs)],
    )
    return enumerator.enumerate(ebc(tables), [EmbeddingBagCollectionSharder()])


def test_estimator_prices_kernels_apart():
    topo = topology(4, "cuda")
    options = _options(topo, [("t", 1_000_000, 64)], ["fused", "fused_uvm", "fused_uvm_caching"])
    cost = {o.compute_kernel: o.total_perf for o in options}
    assert cost["fused"] < cost["fused_uvm_caching"] < cost["fused_uvm"]

    def cached(load_factor):  # 10M rows, 20 ids per sample: ~150k rows hit per batch
        (option,) = _options(
            topo,
            [("t", 10_000_000, 64)],
            None,
            constraints={
                "t": ParameterConstraints(
                    sharding_types=["table_wise"],
                    pooling_factors=[20.0],
                    compute_kernels=["fused_uvm_caching"],
                    cache_params=CacheParams(load_factor=load_factor),
                )
            },
        )
        return option.total_perf

    assert cached(0.05) < cached(0.005) < cached(0.0005)


def test_estimator_prices_sequence_outputs_per_id():
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator

    topo = topology(2, "cuda")
    pcs = {
        "t": ParameterConstraints(
            sharding_types=["table_wise"], compute_kernels=["fused"], pooling_factors=[5.0]
        )
    }
    comms = {}
    for name, module, sharder in (
        ("bag", ebc([("t", 1000, 16)]), BOTH[0]),
        ("seq", ec([("t", 1000, 16)]), BOTH[1]),
    ):
        ours = NeuroShardEstimator(topo, pcs, FakeEstimator(), batch_size=32_768)
        enumerator = EmbeddingEnumerator(
            topology=topo,
            batch_size=32_768,
            constraints=pcs,
            estimator=[ours, EmbeddingStorageEstimator(topo, pcs)],
        )
        (option,) = enumerator.enumerate(module, [sharder])
        comms[name] = option.shards[0].perf.bwd_comms
    # FakeEstimator: 0.002 ms per value per sample; 16 pooled, 16 x 5 ids per sequence
    assert comms["bag"] == pytest.approx(0.002 * 16)
    assert comms["seq"] == pytest.approx(0.002 * 80)


def test_estimator_alone_in_the_enumerator_fills_storage_too():
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator

    topo = topology(2, "cuda")
    ours = NeuroShardEstimator(topo, estimator=FakeEstimator(), batch_size=32_768)
    enumerator = EmbeddingEnumerator(topology=topo, batch_size=32_768, estimator=ours)
    sp = EmbeddingShardingPlanner(
        topology=topo, batch_size=32_768, enumerator=enumerator, debug=False
    ).plan(ebc(EIGHT), [EmbeddingBagCollectionSharder()])
    assert set(sp.plan[""]) == {n for n, _, _ in EIGHT}


def test_estimator_as_performance_model_says_how_to_wire_it():
    from torchrec.distributed.planner import EmbeddingShardingPlanner

    topo = topology(2, "cuda")
    ours = NeuroShardEstimator(topo, estimator=FakeEstimator(), batch_size=32_768)
    with pytest.raises(NeuroShardError, match="not a PerfModel.*EmbeddingEnumerator"):
        EmbeddingShardingPlanner(
            topology=topo, batch_size=32_768, performance_model=ours, debug=False
        ).plan(ebc(EIGHT), [EmbeddingBagCollectionSharder()])


def test_readme_estimator_snippet_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("<!-- estimator-snippet -->")
    code = readme[start:].split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {"model": Model(EIGHT)}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert set(namespace["plan"].plan) == {EBC_PATH}


# --------------------------------------------------------------------------- memory


def test_fifteen_percent_is_reserved_by_default():
    cap = 200 << 20
    p = planner(2, "cuda", cap=cap)
    assert p.reserve == DEFAULT_RESERVE_FRACTION == 0.15
    p.plan(Model(EIGHT), BOTH)
    assert p.last_plan.cluster.hbm_reserve_fraction == 0.15
    # 8 tables of 64 columns: 36,000 rows x 256 bytes = 9.2 MB in all; force them to fill
    # 91.6% of two devices and the plan must refuse or keep 15% free
    rows = int(0.916 * 2 * cap / (8 * 64 * 4))
    tight = [(f"t{i}", rows, 64) for i in range(8)]
    p = planner(2, "cpu", cap=cap, io_buffers=False)  # the reserve alone
    with pytest.raises(PlanInfeasibleError):
        p.plan(Model(tight), BOTH)
    p = planner(2, "cpu", cap=cap, reserve=0.0, io_buffers=False)
    p.plan(Model(tight), BOTH)
    assert max(p.last_plan.memory_bytes()) <= cap


def test_to_sharding_plan_matches_tables_by_module_and_name():
    model = Model(EIGHT, sequence=[("t0", 500, 16)])
    p = planner(2)
    p.plan(model, BOTH)
    assert np.isfinite(p.last_plan.cost.max_ms)
    again = to_sharding_plan(p.last_plan, model)
    assert set(again.plan["seq"]) == {"t0"}

import json

import pytest

from neuroshard.plan_io import plan_to_dict, read_plan, validate_plan, write_plan
from neuroshard.types import Cluster, DeviceCost, Plan, PlanCost, PlanFormatError, Shard

from factories import make_cluster, make_table

GB_ = 1 << 30


def make_plan(shards=None, memory_gb=4.0):
    tables = (make_table("a", rows=1000, dim=96), make_table("b", rows=10, dim=8))
    shards = shards or (Shard("a", 0, 32, 1), Shard("a", 32, 96, 0), Shard("b", 0, 8, 1))
    cost = PlanCost("m", tuple(DeviceCost(1.0, 0.5, 0.25, 100) for _ in range(2)))
    return Plan(tables, tuple(shards), make_cluster(2, memory_gb), cost, {"searcher": "x"})


def test_round_trip(tmp_path):
    plan = make_plan()
    write_plan(plan, tmp_path / "p.json")
    back = read_plan(tmp_path / "p.json")
    assert back == plan
    assert back.meta["searcher"] == "x"
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["format"] == "neuroshard.plan/v2"
    assert doc["tables"][0]["shards"] == [
        {"rows": [0, 1000], "columns": [0, 32], "device": 1},
        {"rows": [0, 1000], "columns": [32, 96], "device": 0},
    ]
    assert doc["tables"][0]["sharding_type"] == "column_wise"
    assert doc["tables"][1]["sharding_type"] == "table_wise"
    assert doc["cost"]["max_ms"] == 1.75 and doc["cost"]["devices"][0]["total_ms"] == 1.75


@pytest.mark.parametrize(
    "shards, words",
    [
        ((Shard("a", 0, 32, 1), Shard("b", 0, 8, 1)), "shards end at column 32"),
        ((Shard("a", 0, 32, 1), Shard("a", 16, 96, 0), Shard("b", 0, 8, 1)), "covered twice"),
        ((Shard("a", 0, 30, 1), Shard("a", 30, 96, 0), Shard("b", 0, 8, 1)), "multiple of 4"),
        ((Shard("a", 0, 96, 2), Shard("b", 0, 8, 1)), "out of range"),
        ((Shard("a", 0, 96, 0), Shard("c", 0, 8, 1), Shard("b", 0, 8, 1)), "unknown table"),
    ],
)
def test_validator_rejects(shards, words):
    with pytest.raises(PlanFormatError, match=words):
        validate_plan(make_plan(shards))


def test_validator_rejects_memory_over_cap():
    with pytest.raises(PlanFormatError, match="exceeds cap"):
        validate_plan(make_plan(memory_gb=1e-7))


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d.update(num_devices="2"), "num_devices"),
        (lambda d: d.update(memory_per_device_bytes=[1]), "entries"),
        (lambda d: d["tables"][0].update(shards=[{"columns": [0], "device": 0}]), "columns"),
        (lambda d: d["tables"][0].update(dim=7), "dim"),
    ],
)
def test_reader_names_the_problem_and_the_file(tmp_path, mutate, words):
    doc = plan_to_dict(make_plan())
    mutate(doc)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanFormatError, match=words) as info:
        read_plan(path)
    assert "p.json" in str(info.value)


def test_reader_malformed_and_missing(tmp_path):
    (tmp_path / "p.json").write_text("{")
    with pytest.raises(PlanFormatError, match="malformed JSON"):
        read_plan(tmp_path / "p.json")
    with pytest.raises(PlanFormatError, match="not found"):
        read_plan(tmp_path / "q.json")


# --------------------------------------------------------------------------- v2 vocabulary


def _plan_of(shards, *, num_devices=4, devices_per_host=2, hbm=GB_, host=0, rows=1000, dim=8):
    table = make_table("t", rows=rows, dim=dim)
    cluster = Cluster.uniform(
        num_devices, hbm, devices_per_host=devices_per_host, host_memory_bytes=host
    )
    return Plan((table,), tuple(shards), cluster)


def _rw(bounds, devices, kind="row_wise", **kw):
    return [
        Shard("t", 0, 8, d, rows=(lo, hi), sharding_type=kind, **kw)
        for (lo, hi), d in zip(bounds, devices, strict=True)
    ]


@pytest.mark.parametrize(
    "shards",
    [
        _rw([(0, 500), (500, 1000)], [0, 3]),
        _rw([(0, 300), (300, 1000)], [2, 3], kind="table_row_wise"),
        [Shard("t", 0, 8, d, sharding_type="data_parallel") for d in range(4)],
        [Shard("t", 0, 8, 1, compute_kernel="fused_uvm_caching", cache_fraction=0.25)],
        [Shard("t", 0, 4, 1, rows=(0, 1000), sharding_type="column_wise"), Shard("t", 4, 8, 0)],
    ],
)
def test_v2_round_trips_every_sharding_type(tmp_path, shards):
    plan = _plan_of(shards, host=1 << 20)
    write_plan(plan, tmp_path / "p.json")
    back = read_plan(tmp_path / "p.json")
    assert back.cluster == plan.cluster
    assert [back.sharding_type_of("t")] == [plan.sharding_type_of("t")]
    assert plan_to_dict(back) == plan_to_dict(plan)


@pytest.mark.parametrize(
    "shards, words",
    [
        (_rw([(0, 500), (400, 1000)], [0, 1]), "covered twice"),
        (_rw([(0, 500), (600, 1000)], [0, 1]), "uncovered"),
        (_rw([(0, 500), (500, 900)], [0, 1]), "end at row 900"),
        (_rw([(0, 500), (500, 1000)], [1, 2], kind="table_row_wise"), "one host"),
        ([Shard("t", 0, 8, d, sharding_type="data_parallel") for d in range(3)], "every device"),
        ([Shard("t", 0, 8, 0, compute_kernel="fused_uvm_caching")], "cache_fraction"),
        ([Shard("t", 0, 8, 0, cache_fraction=0.5)], "only for fused_uvm_caching"),
        (
            [
                Shard("t", 0, 4, 0, rows=(0, 500), sharding_type="column_wise"),
                Shard("t", 4, 8, 0, rows=(0, 500), sharding_type="column_wise"),
                Shard("t", 0, 8, 1, rows=(500, 1000), sharding_type="column_wise"),
            ],
            "keep every row",
        ),
        (
            [
                Shard("t", 0, 8, 0, rows=(0, 500), sharding_type="row_wise"),
                Shard("t", 0, 8, 1, rows=(500, 1000), sharding_type="table_wise"),
            ],
            "disagree",
        ),
    ],
)
def test_v2_validator_names_the_broken_invariant(shards, words):
    with pytest.raises(PlanFormatError, match=words):
        validate_plan(_plan_of(shards))


def test_uvm_caching_counts_the_cache_in_hbm_and_the_table_in_host_memory():
    shards = [Shard("t", 0, 8, 0, compute_kernel="fused_uvm_caching", cache_fraction=0.25)]
    plan = _plan_of(shards, hbm=8000, host=32_000)  # the table is 1000 x 8 x 4 = 32,000 bytes
    assert plan.memory_bytes()[0] == 8000 and plan.host_memory_bytes()[0] == 32_000
    validate_plan(plan)
    with pytest.raises(PlanFormatError, match="host memory used exceeds"):
        validate_plan(_plan_of(shards, hbm=8000, host=31_999))
    with pytest.raises(PlanFormatError, match="HBM used exceeds"):
        validate_plan(_plan_of(shards, hbm=7999, host=32_000))


def test_row_shards_take_their_share_of_lookups():
    plan = _plan_of(_rw([(0, 250), (250, 1000)], [0, 1]))
    loads = plan.device_loads()
    assert loads[0][0].rows == 250 and loads[1][0].rows == 750
    assert loads[0][0].pooling_factor + loads[1][0].pooling_factor == pytest.approx(
        plan.tables[0].pooling_factor
    )


def test_v1_files_still_read(tmp_path):
    doc = {
        "format": "neuroshard.plan/v1",
        "num_devices": 2,
        "memory_per_device_bytes": [1 << 30, 1 << 30],
        "batch_size": 65536,
        "tables": [
            {
                "name": "a",
                "rows": 10,
                "dim": 8,
                "pooling_factor": 2.0,
                "shards": [{"columns": [0, 4], "device": 0}, {"columns": [4, 8], "device": 1}],
            }
        ],
    }
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(doc))
    plan = read_plan(path)
    assert plan.cluster.devices_per_host == 2 and plan.sharding_type_of("a") == "column_wise"
    assert plan.shards == (Shard("a", 0, 4, 0), Shard("a", 4, 8, 1))


def test_cluster_topology_views():
    cluster = Cluster.uniform(16, GB_, 4096, devices_per_host=8)
    assert cluster.num_hosts == 2 and cluster.host_of(9) == 1
    assert list(cluster.devices_of_host(1)) == list(range(8, 16))
    assert cluster.per_rank_batch_size == 256
    with pytest.raises(ValueError, match="divide"):
        Cluster.uniform(10, GB_, devices_per_host=4)

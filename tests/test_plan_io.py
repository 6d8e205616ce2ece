import json

import pytest

from neuroshard.plan_io import plan_to_dict, read_plan, validate_plan, write_plan
from neuroshard.types import DeviceCost, Plan, PlanCost, PlanFormatError, Shard

from factories import make_cluster, make_table


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
    assert doc["format"] == "neuroshard.plan/v1"
    assert doc["tables"][0]["shards"] == [{"columns": [0, 32], "device": 1}, {"columns": [32, 96], "device": 0}]
    assert doc["cost"]["max_ms"] == 1.75 and doc["cost"]["devices"][0]["total_ms"] == 1.75


@pytest.mark.parametrize("shards, words", [
    ((Shard("a", 0, 32, 1), Shard("b", 0, 8, 1)), "shards end at column 32"),
    ((Shard("a", 0, 32, 1), Shard("a", 16, 96, 0), Shard("b", 0, 8, 1)), "covered twice"),
    ((Shard("a", 0, 30, 1), Shard("a", 30, 96, 0), Shard("b", 0, 8, 1)), "multiple of 4"),
    ((Shard("a", 0, 96, 2), Shard("b", 0, 8, 1)), "out of range"),
    ((Shard("a", 0, 96, 0), Shard("c", 0, 8, 1), Shard("b", 0, 8, 1)), "unknown table"),
])
def test_validator_rejects(shards, words):
    with pytest.raises(PlanFormatError, match=words):
        validate_plan(make_plan(shards))


def test_validator_rejects_memory_over_cap():
    with pytest.raises(PlanFormatError, match="exceeds cap"):
        validate_plan(make_plan(memory_gb=1e-7))


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(num_devices="2"), "num_devices"),
    (lambda d: d.update(memory_per_device_bytes=[1]), "entries"),
    (lambda d: d["tables"][0].update(shards=[{"columns": [0], "device": 0}]), "columns"),
    (lambda d: d["tables"][0].update(dim=7), "dim"),
])
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

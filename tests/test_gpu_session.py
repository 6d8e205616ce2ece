"""bench/gpu_session.py: the tasks file, the stage helpers, and the whole session as a CPU
dry run (``--quick``) in an environment with only what the GPU machine has."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from neuroshard.plan_io import validate_plan  # noqa: E402
from neuroshard.pretrain.pool import load_pool  # noqa: E402
from neuroshard.types import TableSpec  # noqa: E402

import gpu_session  # noqa: E402
from gpu_session import Job, load_tasks, plan_figures  # noqa: E402

# Run in a child: hide the optional packages the GPU machine lacks and the editable
# install, so neuroshard and its mapped subpackages import from the checkout alone.
_CHILD = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('fbgemm_gpu', 'torchrec', 'ray', 'lightgbm'):
            raise ImportError('not on the GPU machine: ' + name)
sys.meta_path[:] = [Block()] + [f for f in sys.meta_path if 'editable' not in repr(f).lower()
                                and 'editable' not in type(f).__module__.lower()]
sys.path_hooks[:] = [h for h in sys.path_hooks if 'editable' not in repr(h).lower()]
sys.path_importer_cache.clear()
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_tasks_file_matches_the_pool_and_holds_valid_torchrec_plans():
    test_pool = load_pool("test")
    header, tasks, plans = load_tasks(gpu_session.TASKS_FILE, test_pool)
    assert header["num_devices"] == 8 and len(tasks) == len(plans) == 20
    names = {t.name for t in test_pool}
    cap = header["memory_per_device_bytes"]
    for task, plan in zip(tasks, plans):
        assert 20 <= len(task) <= 60 and {t.name for t in task} <= names
        assert len({t.name for t in task}) == len(task)
        validate_plan(plan)
        assert plan.cluster.num_devices == 8
        assert max(plan.memory_bytes()) <= cap
        assert set(plan.tables) == set(task)  # the pool's tables, statistics included


def test_tasks_file_refuses_tables_not_in_the_pool(tmp_path):
    doc = json.loads(gpu_session.TASKS_FILE.read_text())
    doc["tasks"][0]["tables"][0] = "no_such_table"
    bad = tmp_path / "tasks.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="no_such_table"):
        load_tasks(bad, load_pool("test"))


def test_retests_lag_one_round_and_every_set_ends_complete():
    first, again = Job("a", list(range(10))), Job("r", list(range(4)), retest=True)
    assert [first.head(r, 3) for r in (1, 2, 3)] == [4, 7, 10]
    assert [again.head(r, 3) for r in (1, 2, 3)] == [0, 2, 3]


class _Deadline:
    """A clock whose collection deadline passes after ``ticks`` checks."""

    def __init__(self, ticks: int):
        self.ticks = ticks

    def left(self, share: float) -> float:
        self.ticks -= 1
        return 1.0 if self.ticks >= 0 else -1.0

    def now(self) -> float:
        return 0.0


def _jobs(n: int = 12) -> list[Job]:
    from neuroshard.pretrain.augment import ComputeSample
    from neuroshard.pretrain.fidelity import RETEST_INDEX_OFFSET

    tables = load_pool("train")[:30]
    loads = [ComputeSample(i, tuple(tables[i : i + 3])) for i in range(n)]
    held = [ComputeSample(100 + i, tuple(tables[i + 1 : i + 2])) for i in range(n // 2)]
    retest = [ComputeSample(s.index + RETEST_INDEX_OFFSET, s.tables) for s in held[:3]]
    return [
        Job("compute", loads),
        Job("compute_holdout", held),
        Job("compute_retest", retest, retest=True),
    ]


def test_collection_interleaves_rounds_and_stops_at_the_deadline(tmp_path):
    from neuroshard.backends.sim import SimBackend

    cfg = gpu_session.SessionConfig(out=tmp_path, rounds=3, chunk_size=2)
    sim = SimBackend("h200", batch_size=1024)
    done = gpu_session.collect_rounds(sim, _jobs(), tmp_path, cfg, _Deadline(10**6))
    assert done == {"compute": 12, "compute_holdout": 6, "compute_retest": 3}
    a, b = gpu_session.retest_pairs(tmp_path, _jobs()[2].samples)
    np.testing.assert_allclose(a, b)  # the sim without noise measures alike twice
    assert len(a) == 3

    cut = tmp_path / "cut"
    done = gpu_session.collect_rounds(sim, _jobs(), cut, cfg, _Deadline(3))
    # three checks pass: round 1's two compute chunks (0->2->4) and its held-out chunk
    # (0->2); the retests lag a round, and the deadline ends the rounds and the last pass
    assert done == {"compute": 4, "compute_holdout": 2, "compute_retest": 0}
    assert gpu_session.retest_pairs(cut, _jobs()[2].samples)[0].size == 0


def _rows(costs: dict[str, list[float]], passes: int = 2, devices: int = 2) -> list[dict]:
    """Device loads whose maximum per plan is ``costs[searcher][task]`` (device 0)."""
    rows = []
    for p in range(passes):
        for n, per_task in costs.items():
            for i, c in enumerate(per_task):
                for d in range(devices):
                    ms = c * (1.0 + 0.01 * p) if d == 0 else c / 2
                    rows.append(
                        {
                            "pass": p,
                            "task": i,
                            "searcher": n,
                            "device": d,
                            "shards": 1,
                            "ms": ms,
                            "spread": 0.0,
                        }
                    )
    return rows


def test_plan_figures_ratios_and_noise_floor():
    costs = {
        "neuroshard": [8.0, 9.0],
        "greedy-grid": [9.0, 9.0],
        "random": [20.0, 20.0],
        "dim": [12.0, 15.0],
        "size": [11.0, 10.0],
        "lookup": [10.0, 12.0],
        "size-lookup": [13.0, 13.0],
        "torchrec": [10.0, 10.0],
    }
    names = list(costs)
    plans = [{n: None for n in names}, {n: None for n in names}]
    cfg = gpu_session.SessionConfig(out=Path("unused"), num_devices=2)
    fig = plan_figures(_rows(costs), names, plans, cfg)
    first = fig["passes"][0]
    assert first["tasks"] == 2 and first["best_heuristic"] == "size"  # mean 10.5, lookup 11
    assert first["mean_max_ms"]["neuroshard"] == pytest.approx(8.5)
    assert first["neuroshard_over_best_heuristic"] == pytest.approx(8.5 / 10.5)
    # per task the best heuristic is lookup (10) then size (10)
    assert first["neuroshard_over_per_task_best_heuristic"] == pytest.approx(
        np.mean([8 / 10, 9 / 10])
    )
    assert first["neuroshard_over_greedy_grid"] == pytest.approx(8.5 / 9.0)
    assert first["neuroshard_over_torchrec"] == pytest.approx(0.85)
    assert first["neuroshard_wins_vs_torchrec"] == 1.0
    # pass 2 is 1% slower on the maximum: the floor is about 1% / sqrt(2)
    assert fig["plan_noise_floor"]["floor_mape"] == pytest.approx(0.01 / np.sqrt(2), rel=0.02)


def test_plan_figures_skip_plans_missing_a_device():
    costs = {
        n: [5.0]
        for n in (
            "neuroshard",
            "greedy-grid",
            "random",
            "dim",
            "size",
            "lookup",
            "size-lookup",
            "torchrec",
        )
    }
    rows = [r for r in _rows(costs, passes=1) if not (r["searcher"] == "dim" and r["device"] == 1)]
    cfg = gpu_session.SessionConfig(out=Path("unused"), num_devices=2)
    fig = plan_figures(rows, list(costs), [{n: None for n in costs}], cfg)
    assert fig["passes"] == {}  # the one task is incomplete: no figure from it


@pytest.mark.slow
def test_quick_session_runs_end_to_end_without_optional_packages(tmp_path):
    out = tmp_path / "session"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD,
            str(ROOT / "bench" / "gpu_session.py"),
            "--quick",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["mode"].startswith("quick")
    assert set(results["stages"]) == {
        "setup",
        "indices",
        "preflight",
        "collect",
        "comm",
        "train",
        "plan",
        "measure",
        "report",
    }
    assert results["preflight"]["update_max_abs_error"] < 1e-4
    assert results["collected"]["compute"] == results["asked"]["compute"]
    assert results["collected"]["compute_retest"] == results["asked"]["compute_retest"]
    assert 0 < results["model"]["mape"] and -1 <= results["model"]["spearman"] <= 1
    assert results["plans"]["passes"]  # at least one full pass over the tasks
    for fig in results["plans"]["passes"].values():  # verification on measured compute
        assert "neuroshard+verify" in fig["mean_max_ms"] and fig["verified_over_torchrec"] > 0
    meta = json.loads((out / "model" / "meta.json").read_text())
    assert "one GPU cannot measure a collective" in meta["provenance"]["comm"]
    assert meta["backend"] == "cpu" and meta["metrics"]["compute"]["test_pool"]["mape"] > 0
    assert meta["architecture"]["compute_members"] == 3 and meta["conservative_k"] == 0.25
    for part in ("compute", "compute_holdout", "compute_retest", "comm"):
        assert list((out / "data" / part).glob("part-*.parquet")), part
    loads = (out / "plan_loads.csv").read_text().splitlines()
    assert loads[0] == "pass,task,searcher,device,shards,ms,spread" and len(loads) > 100
    assert "## Stages" in (out / "results.md").read_text()


def test_archive_packs_the_folders_and_removes_them_only_once_packed(tmp_path):
    for rel in ("data/compute/part-0.parquet", "data/comm/part-0.parquet", "model/meta.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / "results.json").write_text("{}")
    target = gpu_session.archive(tmp_path, ("data", "model", "absent"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_model.tar.gz", "results.json"]
    with tarfile.open(target) as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
        assert names == {
            "data/compute/part-0.parquet",
            "data/comm/part-0.parquet",
            "model/meta.json",
        }
        member = tar.extractfile("model/meta.json")
        assert member is not None and member.read() == b"model/meta.json"


def test_measured_compute_times_each_load_once_and_empty_loads_not_at_all():
    class Backend:
        name = "fake"
        calls = 0

        def measure_compute(self, load):
            Backend.calls += 1
            return type("T", (), {"median_ms": 2.0 * len(load)})()

    model = type("M", (), {"name": "model"})()
    a, b = TableSpec("a", 100, 8), TableSpec("b", 200, 8)
    measured = gpu_session.MeasuredCompute(model, Backend())
    assert measured.compute_ms([[a, b], [], [a]]) == [4.0, 0.0, 2.0]
    assert measured.for_cluster(None).compute_ms([[a, b]]) == [4.0]  # shares the timings
    assert Backend.calls == 2

from collections import defaultdict

import numpy as np
import pytest

from neuroshard.pretrain.plan_loads import plan_load_samples
from neuroshard.search import get_searcher

from factories import FakeEstimator, make_tables

GB = 1 << 30


def _draw(seed=0, **kw):
    args = dict(
        searchers=[get_searcher("greedy-grid"), get_searcher("neuroshard")],
        num_devices=4,
        memory_bytes=4 * GB,
        batch_size=4096,
        min_tables=10,
        max_tables=20,
        start_index=500,
    )
    args.update(kw)
    return plan_load_samples(
        FakeEstimator(4096), make_tables(40, seed=3), 4, np.random.default_rng(seed), **args
    )


def test_samples_are_the_distinct_device_loads_of_the_plans():
    samples = _draw()
    assert [s.index for s in samples] == list(range(500, 500 + len(samples)))
    loads = [tuple(sorted((t.name, t.dim, t.rows) for t in s.tables)) for s in samples]
    assert len(set(loads)) == len(loads)  # no load twice, across searchers and tasks
    # 4 tasks x 2 searchers x 4 devices at most, and more than one plan's worth
    assert 4 < len(samples) <= 32
    tables = {t.name: t for t in make_tables(40, seed=3)}
    for s in samples:
        assert s.size_bytes <= 4 * GB
        widths = defaultdict(int)
        for t in s.tables:  # shard views: a table's columns and (row-wise) a row block
            full = tables[t.name]
            assert t.rows <= full.rows and t.pooling_factor <= full.pooling_factor
            widths[t.name] += t.dim * t.rows / full.rows
        assert all(w <= tables[name].dim for name, w in widths.items())
    assert [s.key for s in _draw()] == [s.key for s in samples]
    assert [s.key for s in _draw(seed=1)] != [s.key for s in samples]


def test_tasks_no_searcher_can_plan_give_no_samples():
    assert _draw(memory_bytes=1024) == []


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="min_tables"):
        _draw(min_tables=0)


def test_fill_sizes_each_tasks_devices_and_hosts_split_the_cluster():
    seen = []
    greedy = get_searcher("greedy-grid")

    def recording(tables, cluster, estimator, **kw):
        seen.append((sum(t.size_bytes for t in tables), cluster))
        return greedy(tables, cluster, estimator, **kw)

    samples = _draw(
        memory_bytes=None, fill=0.5, num_devices=8, devices_per_host=4, searchers=[recording]
    )
    assert samples and len(samples) <= 4 * 8 and len(seen) == 4
    for total, cluster in seen:  # each task's HBM is its own tables' bytes / devices / fill
        assert cluster.memory_per_device_bytes == (int(total / 8 / 0.5) + 1,) * 8
        assert cluster.devices_per_host == 4
    with pytest.raises(ValueError, match="fill"):
        _draw(fill=0.5)  # memory_bytes as well
    with pytest.raises(ValueError, match="fill"):
        _draw(memory_bytes=None, fill=1.5)


def test_fewer_tables_than_a_task_asks_for_are_all_drawn():
    samples = plan_load_samples(
        FakeEstimator(4096), make_tables(5, seed=3), 1, np.random.default_rng(0),
        searchers=[get_searcher("greedy-grid")], num_devices=2, memory_bytes=4 * GB,
        batch_size=4096, min_tables=10, max_tables=20,
    )  # fmt: skip
    assert sorted(t.name for s in samples for t in s.tables) == [f"t{i}" for i in range(5)]

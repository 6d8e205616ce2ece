import numpy as np
import pytest

from neuroshard.tasks import sample_task, sample_tasks

from factories import GB, make_tables


def test_tasks_have_distinct_tables_in_range_under_cap():
    pool = make_tables(100)
    cap = 3 * GB
    for task in sample_tasks(pool, 20, seed=1, min_tables=5, max_tables=20, max_total_bytes=cap):
        assert 5 <= len(task) <= 20
        assert len({t.name for t in task}) == len(task)
        assert sum(t.size_bytes for t in task) <= cap


def test_seeded_and_impossible_cap():
    pool = make_tables(80)
    assert sample_tasks(pool, 3, seed=2) == sample_tasks(pool, 3, seed=2)
    with pytest.raises(ValueError, match="no task"):
        sample_task(pool, np.random.default_rng(0), max_total_bytes=1, max_draws=5)

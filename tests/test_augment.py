import numpy as np
import pytest

from neuroshard.pretrain.augment import (
    CommSample,
    ComputeSample,
    augment_tables,
    sample_comm_tasks,
    sample_compute_loads,
)

from factories import GB, make_table, make_tables


def _dims(tables):
    return [t.dim for t in tables]


def test_augment_halves_while_half_is_multiple_of_4():
    assert _dims(augment_tables([make_table(dim=128)])) == [128, 64, 32, 16, 8, 4]
    assert _dims(augment_tables([make_table(dim=100)])) == [100]
    assert _dims(augment_tables([make_table(dim=96)])) == [96, 48, 24, 12]
    assert _dims(augment_tables([make_table(dim=6)])) == [6]


def test_augment_keeps_everything_but_dim():
    t = make_table("x", rows=123, dim=16, pooling_factor=7.5)
    out = augment_tables([t])
    assert {(a.name, a.rows, a.pooling_factor, a.reuse_hist) for a in out} == {
        ("x", 123, 7.5, t.reuse_hist)
    }


def test_compute_loads_respect_cap_and_table_counts():
    tables = augment_tables(make_tables(40, seed=3))
    cap = 2 * 10**8
    rng = np.random.default_rng(0)
    loads = sample_compute_loads(tables, 300, rng, max_tables=15, memory_cap_bytes=cap)
    assert len(loads) == 300
    counts = [len(s.tables) for s in loads]
    assert min(counts) >= 1 and max(counts) <= 15
    assert max(counts) >= 10  # the range is used, not just small loads
    assert all(s.size_bytes <= cap for s in loads)
    assert any(s.size_bytes > cap // 2 for s in loads)  # the cap binds sometimes
    for s in loads:  # distinct augmented tables
        assert len({(t.name, t.dim) for t in s.tables}) == len(s.tables)


def test_compute_loads_skip_tables_over_the_cap():
    big = make_table("big", rows=10**8, dim=128)  # 51 GB
    small = make_table("small", rows=100, dim=4)
    loads = sample_compute_loads(
        [big, small], 20, np.random.default_rng(0), memory_cap_bytes=4 * GB
    )
    assert all(s.tables == (small,) for s in loads)
    with pytest.raises(ValueError):
        sample_compute_loads([big], 1, np.random.default_rng(0), memory_cap_bytes=4 * GB)


def test_sample_keys_are_stable_and_unique():
    tables = augment_tables(make_tables(10))
    a = sample_compute_loads(tables, 50, np.random.default_rng(7))
    b = sample_compute_loads(tables, 80, np.random.default_rng(7))
    assert [s.key for s in a] == [s.key for s in b[:50]]  # a longer run extends a shorter one
    assert len({s.key for s in b}) == 80
    # same content at another index is another sample
    assert ComputeSample(0, a[0].tables).key != ComputeSample(1, a[0].tables).key
    assert CommSample(0, (1, 2), (0.0, 0.0)).key == CommSample(0, (1, 2), (0.0, 0.0)).key


def test_comm_tasks_shapes_totals_waits_and_balance():
    tables = [make_table(f"t{i}", dim=128) for i in range(100)]
    samples = sample_comm_tasks(tables, 400, np.random.default_rng(1), 4)
    assert all(s.num_devices == 4 for s in samples)
    totals = np.array([sum(s.dim_sums) for s in samples])
    # splits keep a task's total width: 10..60 tables of 128
    assert np.all(totals % 128 == 0) and totals.min() >= 1280 and totals.max() <= 7680
    assert any(d % 128 for s in samples for d in s.dim_sums)  # column splits happened
    zero = [s for s in samples if not any(s.waits_ms)]
    assert 0 < len(zero) < len(samples)
    waits = np.array([s.waits_ms for s in samples if any(s.waits_ms)])
    assert waits.min() >= 1.0 and waits.max() <= 20.0
    imbalance = np.array([max(s.dim_sums) / np.mean(s.dim_sums) for s in samples])
    assert imbalance.min() < 1.3 and imbalance.max() > 3.0  # balanced and skewed plans


def test_comm_tasks_mixed_device_counts():
    tables = make_tables(30)
    samples = sample_comm_tasks(tables, 100, np.random.default_rng(2), [2, 8])
    assert {s.num_devices for s in samples} == {2, 8}
    assert all(len(s.waits_ms) == s.num_devices for s in samples)


def test_shift_reuse_hist_moves_mass_hotter():
    from neuroshard.pretrain.augment import shift_reuse_hist

    h = [0.5, 0.25, 0.25] + [0.0] * 14
    assert shift_reuse_hist(h, 2)[:5] == (0.0, 0.0, 0.5, 0.25, 0.25)
    tail = [0.0] * 15 + [0.6, 0.4]
    assert shift_reuse_hist(tail, 3)[-1] == pytest.approx(1.0)


def test_shrink_tables_smaller_and_hotter():
    from neuroshard.pretrain.augment import shrink_tables

    t = make_table("a", rows=64_000, dim=128, pooling_factor=9.0)
    out = shrink_tables(
        [t, make_table("tiny", rows=150)], np.random.default_rng(0), factors=(16,), copies=1
    )
    assert len(out) == 1  # 150 // 16 rows would be under the 100-row floor
    (c,) = out
    assert (c.name, c.rows, c.dim, c.pooling_factor) == ("a@rows/16", 4000, 128, 9.0)
    assert c.reuse_hist[4:8] == pytest.approx(t.reuse_hist[0:4])  # 16x counts: 4 bins on
    assert sum(c.reuse_hist) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        shrink_tables([t], np.random.default_rng(0), factors=(3,))

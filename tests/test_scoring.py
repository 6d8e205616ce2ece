import numpy as np
import pytest

from neuroshard.search.scoring import EMPTY_LOAD, Scorer, WithoutEmbeddings, plan_cost
from neuroshard.types import Plan, Shard

from factories import FakeEstimator, make_cluster, make_table, make_tables


class LinearEstimator:
    """Costs simple enough to work out by hand; records what it was asked."""

    name = "linear"
    batch_size = 65_536

    def __init__(self):
        self.loads = []

    def compute_ms(self, loads):
        self.loads.append([[t.dim for t in load] for load in loads])
        return np.array([0.1 * sum(t.dim for t in load) for load in loads])

    def bwd_comm_ms(self, dim_sums):
        return 0.01 * np.asarray(dim_sums, dtype=float)

    def fwd_comm_ms(self, dim_sums, waits_ms):
        return 0.02 * np.asarray(dim_sums, dtype=float) + np.asarray(waits_ms)


def test_plan_cost_matches_hand_computation_on_two_devices():
    a, b = make_table("a", rows=10, dim=8), make_table("b", rows=10, dim=4)
    plan = Plan(
        (a, b), (Shard("a", 0, 4, 0), Shard("a", 4, 8, 1), Shard("b", 0, 4, 0)), make_cluster(2)
    )
    cost = plan_cost(plan, LinearEstimator())
    # compute 0.1 * widths: 0.8, 0.4; bwd 0.01 * dim sums (8, 4): 0.08, 0.04;
    # waits (0.88, 0.44) - 0.44 = 0.44, 0; fwd 0.02 * dims + waits: 0.60, 0.08.
    dev0, dev1 = cost.devices
    assert cost.model == "linear"
    assert (dev0.compute_ms, dev1.compute_ms) == pytest.approx((0.8, 0.4))
    assert (dev0.bwd_comm_ms, dev1.bwd_comm_ms) == pytest.approx((0.08, 0.04))
    assert (dev0.fwd_comm_ms, dev1.fwd_comm_ms) == pytest.approx((0.60, 0.08))
    assert (dev0.memory_bytes, dev1.memory_bytes) == (320, 160)
    assert cost.max_ms == pytest.approx(1.48)


def test_plan_cost_makes_one_compute_call_and_skips_empty_devices():
    est = LinearEstimator()
    a = make_table("a", dim=8)
    plan = Plan((a,), (Shard("a", 0, 8, 2),), make_cluster(4))
    cost = plan_cost(plan, est)
    assert est.loads == [[[8]]]  # one call, only the busy device
    assert [d.compute_ms for d in cost.devices] == pytest.approx([0, 0, 0.8, 0])


def random_plans(tables, cluster, n, seed=0):
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(n):
        shards = []
        for t in tables:
            cut = int(rng.integers(0, t.dim // 4)) * 4  # 0 means table-wise
            ranges = [(0, t.dim)] if cut == 0 else [(0, cut), (cut, t.dim)]
            shards += [
                Shard(t.name, s, e, int(rng.integers(cluster.num_devices))) for s, e in ranges
            ]
        plans.append(Plan(tuple(tables), tuple(shards), cluster))
    return plans


def assignment(plan, scorer):
    by_name = {t.name: t for t in plan.tables}
    return [
        scorer.key(by_name[s.table].with_dim(s.width) for s in plan.shards if s.device == d)
        for d in range(plan.cluster.num_devices)
    ]


def test_scorer_equals_plan_cost_with_one_compute_call_per_batch():
    tables, cluster = make_tables(12, seed=3), make_cluster(4)
    plans = random_plans(tables, cluster, 20)
    est = FakeEstimator()
    scorer = Scorer(est)
    batch = [assignment(p, scorer) for p in plans]

    calls = est.compute_calls
    scores = scorer.score(batch)
    assert est.compute_calls == calls + 1
    expected = [plan_cost(p, FakeEstimator()) for p in plans]
    assert scores == pytest.approx([c.max_ms for c in expected], rel=1e-12)

    compute, bwd, fwd = scorer.device_costs(batch)
    assert compute == pytest.approx(
        np.array([[d.compute_ms for d in c.devices] for c in expected]), rel=1e-12
    )
    assert fwd == pytest.approx(
        np.array([[d.fwd_comm_ms for d in c.devices] for c in expected]), rel=1e-12
    )
    assert bwd == pytest.approx(
        np.array([[d.bwd_comm_ms for d in c.devices] for c in expected]), rel=1e-12
    )


def test_scorer_caches_compute_by_load():
    est = LinearEstimator()
    scorer = Scorer(est)
    a, b = make_table("a", dim=8), make_table("b", dim=4)
    ka, kab = scorer.key([a]), scorer.key([a, b])
    scorer.compute([ka, kab, ka])
    assert est.loads == [[[8], [8, 4]]]  # deduplicated within the batch
    scorer.compute([kab, ka, EMPTY_LOAD])
    assert len(est.loads) == 1  # all cached (the empty load is 0 without asking)
    out = scorer.compute([kab, scorer.key([b])])
    assert est.loads[1:] == [[[4]]]  # only the new load is computed
    assert out == pytest.approx([1.2, 0.4])
    assert scorer.compute_calls == 2 and scorer.loads_computed == 3


def test_load_keys_are_multisets_of_shards():
    scorer = Scorer(LinearEstimator())
    a, b = make_table("a", dim=8), make_table("b", dim=8)
    a4 = a.with_dim(4)
    assert scorer.key([a, b]) == scorer.key([b, a])
    assert scorer.key([a4, a4]) != scorer.key([a4])
    assert scorer.key([a4]) != scorer.key([a])
    built = Scorer.add(Scorer.add(EMPTY_LOAD, scorer.item(b)), scorer.item(a))
    assert built == scorer.key([a, b])
    assert scorer.dim_sum(scorer.key([a4, a4, b])) == 16


# --------------------------------------------------------------------------- additive path


class AdditiveEstimator:
    """An additive CostEstimator in exact arithmetic: a shard's embedding is a few small
    integers (width / 4, rounded pooling, a rows bucket, 1), a device's compute a nonlinear
    head of their sum. Sums of small integers are exact in float32 in any order, so the
    additive and the generic search paths must agree bit for bit."""

    name = "additive-fake"
    batch_size = 65_536

    def __init__(self):
        self.embedded = 0  # shards embedded
        self.compute_calls = 0

    @staticmethod
    def _embed(t):
        return [t.dim / 4, round(t.pooling_factor), t.rows // 200_000 + 1, 1.0]

    def shard_embeddings(self, specs):
        self.embedded += len(specs)
        return np.asarray([self._embed(t) for t in specs], dtype=np.float32).reshape(-1, 4)

    def compute_from_embeddings(self, summed, counts=None):
        s = np.asarray(summed, dtype=np.float64).reshape(-1, 4)
        work = s[:, 0] * s[:, 1] * (1.0 + 0.1 * s[:, 2])
        out = 0.01 * s[:, 3] + 1e-3 * work + 2e-7 * work**1.5
        if counts is not None:
            out = np.where(np.asarray(counts).reshape(-1) > 0, out, 0.0)
        return out

    def compute_ms(self, loads):
        self.compute_calls += 1
        summed = np.zeros((len(loads), 4), dtype=np.float32)
        for i, load in enumerate(loads):
            for t in load:
                summed[i] += self._embed(t)
        return self.compute_from_embeddings(summed, [len(load) for load in loads])

    def bwd_comm_ms(self, dim_sums):
        return 0.05 + 0.002 * np.asarray(dim_sums, dtype=float)

    def fwd_comm_ms(self, dim_sums, waits_ms):
        waits = np.asarray(waits_ms, dtype=float)
        return (
            0.05
            + 0.001 * np.asarray(dim_sums, dtype=float)
            + (waits.max(axis=-1, keepdims=True) - waits)
        )


Opaque = WithoutEmbeddings  # the estimator without shard_embeddings: the generic path


def test_additive_estimators_are_detected():
    assert Scorer(AdditiveEstimator()).additive
    assert not Scorer(Opaque(AdditiveEstimator())).additive
    assert not Scorer(FakeEstimator()).additive
    assert not Scorer(AdditiveEstimator(), additive=False).additive
    with pytest.raises(ValueError, match="shard_embeddings"):
        Scorer(FakeEstimator(), additive=True)


def test_additive_scorer_equals_plan_cost_and_embeds_each_shard_once():
    tables, cluster = make_tables(12, seed=3), make_cluster(4)
    plans = random_plans(tables, cluster, 20)
    est = AdditiveEstimator()
    scorer = Scorer(est)
    scores = scorer.score([assignment(p, scorer) for p in plans])
    assert scores == pytest.approx(
        [plan_cost(p, AdditiveEstimator()).max_ms for p in plans], rel=1e-12
    )
    assert est.compute_calls == 0  # priced from embeddings, never whole loads
    assert est.embedded == scorer.num_items  # each (table, width) embedded once
    scorer.score([assignment(p, scorer) for p in plans])
    assert est.embedded == scorer.num_items


def test_compute_sums_and_singles_match_whole_loads():
    a, b = make_table("a", dim=8, pooling_factor=3), make_table("b", dim=16, pooling_factor=5)
    est = AdditiveEstimator()
    scorer = Scorer(est)
    ia, ib = scorer.item(a), scorer.item(b)
    emb = scorer.embeddings()
    assert emb.shape == (2, 4) and emb.dtype == np.float32
    summed = np.stack([emb[ia] + emb[ib], emb[ia], np.zeros(4, dtype=np.float32)])
    assert scorer.compute_sums(summed, np.array([2, 1, 0])) == pytest.approx(
        est.compute_ms([[a, b], [a], []]), rel=1e-12
    )
    singles = scorer.singles([ib, ia, ib])
    assert singles == pytest.approx(est.compute_ms([[b], [a], [b]]), rel=1e-12)
    assert scorer.singles([ia]) == pytest.approx(singles[1:2])


def test_plan_ms_is_the_max_over_devices_of_the_device_totals():
    tables, cluster = make_tables(8, seed=4), make_cluster(4)
    plans = random_plans(tables, cluster, 5, seed=1)
    scorer = Scorer(FakeEstimator())
    batch = [assignment(p, scorer) for p in plans]
    compute, _, _ = scorer.device_costs(batch)
    dims = np.array([p.dim_sums() for p in plans], dtype=float)
    assert scorer.plan_ms(compute, dims) == pytest.approx(scorer.score(batch), rel=1e-12)
    assert scorer.plan_ms(np.zeros((0, 4)), np.zeros((0, 4))).shape == (0,)


def test_link_speeds_of_a_measured_model_come_from_its_own_alltoall():
    from dataclasses import replace as _replace

    from neuroshard.search.scoring import CALIBRATION_DIMS, link_speeds
    from neuroshard.traffic import DEFAULT_SPEEDS

    cluster = make_cluster(4)
    fake = FakeEstimator()
    assert link_speeds(fake, cluster) == DEFAULT_SPEEDS.for_cluster(cluster)  # the sim's

    class Measured(FakeEstimator):
        backend_ = "cpu"

        def bwd_comm_ms(self, dim_sums):  # 0.5 ms + 1 us per column per device
            return np.asarray(dim_sums, dtype=float) * 1e-3 + 0.5

    speeds = link_speeds(Measured(), cluster)
    per_column = cluster.batch_size * 4 * 3 / 4
    assert speeds.intra_bytes_per_ms == pytest.approx(per_column / 1e-3)
    assert speeds.inter_bytes_per_ms == speeds.intra_bytes_per_ms
    assert CALIBRATION_DIMS[0] < CALIBRATION_DIMS[1]
    given = _replace(cluster, intra_host_bw_bytes_per_ms=123.0)
    assert link_speeds(Measured(), given).intra_bytes_per_ms == 123.0  # the cluster's win

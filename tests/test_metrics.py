"""neuroshard/models/metrics.py: numpy metrics, breakdown buckets, the model-report tables,
and scoring a model without pandas."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from neuroshard.models import read_meta, shipped_models
from neuroshard.models.metrics import (
    TextTable,
    bucket_order,
    noise_floor,
    regression_metrics,
    report_header,
    report_summary,
    report_tables,
    spearman,
)


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, size=200).astype(float)  # many ties
    b = a + rng.normal(scale=2.0, size=200)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert np.isnan(spearman(a, np.ones_like(a)))  # a constant side has no ranking
    assert np.isnan(spearman([1.0], [2.0]))


def test_regression_metrics():
    true = np.array([1.0, 2.0, 4.0, 8.0])
    m = regression_metrics(true * 1.1, true)
    assert m["n"] == 4 and m["mape"] == pytest.approx(0.1)
    assert m["spearman"] == pytest.approx(1.0)
    assert m["mse_log"] == pytest.approx(np.log(1.1) ** 2, rel=1e-3)
    assert regression_metrics(true[::-1], true)["spearman"] == pytest.approx(-1.0)
    assert np.isnan(regression_metrics(np.zeros(0), np.zeros(0))["mape"])


def test_noise_floor_averages_both_directions():
    a = np.array([1.0, 2.0, 3.0])
    m = noise_floor(a, a * 1.2)
    assert m["mape"] == pytest.approx(0.5 * (0.2 + 0.2 / 1.2))
    assert m["floor_mape"] == pytest.approx(m["mape"] / np.sqrt(2))


def test_bucket_order_lists_buckets_small_to_large():
    labels = ["21-40", "1", ">40", "2-5"]
    assert sorted(labels, key=lambda x: bucket_order("by_tables", x)) == [
        "1",
        "2-5",
        "21-40",
        ">40",
    ]
    assert sorted(["16", "2", "8"], key=lambda x: bucket_order("by_devices", x)) == ["2", "8", "16"]


def test_report_of_a_shipped_model():
    meta = read_meta(shipped_models()["sim-h100-d4"])
    assert meta["name"] in report_header(meta) and "sim" in report_header(meta)
    tables = report_tables(meta)
    assert all(isinstance(t, TextTable) for t in tables)
    error = tables[0]
    assert error.title == "held-out error" and len(error.columns) == 8
    assert {row[0] for row in error.rows} >= {"compute", "bwd_comm", "fwd_comm"}
    assert all(len(row) == len(t.columns) for t in tables for row in t.rows)
    session = {
        "data": "/x/run7/data",
        "noise_floor": {"floor_mape": 0.05},
        "compute": {"n": 10, "mse_log": 0.01, "mape": 0.1, "spearman": 0.9},
    }
    rows = report_tables(meta, [session])[0].rows
    assert rows[-1] == ("compute", "data", "10", "0.0100", "10.00%", "0.9000", "5.00%", "2.00")
    summary = report_summary(meta, [session])
    assert summary["sessions"] == [session] and summary["kind"] == "neural"
    json.dumps(summary)


def test_scoring_a_neural_model_imports_neither_pandas_nor_training_code():
    code = (
        "import sys, numpy as np\n"
        "from neuroshard.models import load_cost_model, shipped_models\n"
        "from neuroshard.features import raw_features\n"
        "from neuroshard.samples import ComputeData\n"
        "from neuroshard.types import TableSpec\n"
        "m = load_cost_model(shipped_models()['sim-h100-d4'])\n"
        "t = [TableSpec(f't{i}', rows=1000 * (i + 1), dim=16) for i in range(6)]\n"
        "d = ComputeData(np.array(list('abc'), dtype=object), np.array([0, 2, 4, 6]),\n"
        "                raw_features(t), np.array([x.name for x in t], dtype=object),\n"
        "                np.array([1.0, 2.0, 3.0]), np.zeros(3), '{}')\n"
        "assert m.score_compute(d)['n'] == 3\n"
        "bad = sorted({k.split('.')[0] if k.startswith('pandas') else k for k in sys.modules\n"
        "              if k.startswith(('pandas', 'neuroshard.pretrain', 'neuroshard.search'))})\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

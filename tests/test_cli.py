"""The CLI verbs on good input: they call the library and write what they say."""

import json

import pytest
from typer.testing import CliRunner

from neuroshard.cli import app
from neuroshard.plan_io import read_plan

EXAMPLE = "data/examples/tables.json"


@pytest.fixture()
def run(monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.stdout + result.stderr
        return result.stdout

    return invoke


@pytest.mark.parametrize(
    "devices, searcher", [(4, "neuroshard"), (8, "neuroshard"), (4, "lookup"), (8, "greedy-grid")]
)
def test_plan_writes_a_valid_plan_with_the_shipped_model(run, tmp_path, devices, searcher):
    out = tmp_path / "plan.json"
    text = run(
        "plan",
        EXAMPLE,
        "--devices",
        devices,
        "--memory",
        "4GB",
        "--searcher",
        searcher,
        "--out",
        out,
    )
    plan = read_plan(out)  # validates coverage, widths and memory
    assert plan.cluster.num_devices == devices and plan.meta["searcher"] == searcher
    assert "plan cost (max over devices)" in text
    cost = json.loads(run("evaluate", out, "--backend", "sim", "--json"))
    assert len(cost["devices"]) == devices and cost["max_ms"] > 0 and cost["model"] == "sim"


def test_plan_json_convert_and_model_report(run, tmp_path):
    doc = json.loads(
        run(
            "plan",
            "data/examples/tables.csv",
            "-n",
            "2",
            "-m",
            "8GB",
            "--searcher",
            "size",
            "--json",
        )
    )
    assert doc["format"] == "neuroshard.plan/v2" and doc["num_devices"] == 2
    (tmp_path / "p.json").write_text(json.dumps(doc))
    run(
        "convert",
        tmp_path / "p.json",
        "--to",
        "torchrec",
        "--out",
        tmp_path / "p.pt",
        "--module-path",
        "sparse.ebc",
    )
    import torch

    sharding_plan = torch.load(tmp_path / "p.pt", weights_only=False)
    assert set(sharding_plan.plan) == {"sparse.ebc"}
    assert len(sharding_plan.plan["sparse.ebc"]) == len(doc["tables"])
    meta = json.loads(run("model-report", "data/models/sim-h100-d4", "--json"))
    assert meta["kind"] == "neural" and meta["metrics"]["compute"]["test_pool"]["mape"] < 0.1


def test_collect_resumes(run, tmp_path):
    text = run("collect", "--out", tmp_path, "--kind", "comm", "--samples", "40")
    assert "40 measured, 0 already on disk" in text
    text = run("collect", "--out", tmp_path, "--kind", "comm", "--samples", "60")
    assert "20 measured, 40 already on disk" in text


def test_model_report_shows_noise_floor_and_buckets(run, tmp_path):
    from neuroshard.pretrain.pipeline import PretrainConfig, pretrain

    from factories import make_tables

    tables = make_tables(30, seed=4)
    model_dir = pretrain(
        PretrainConfig(
            tmp_path,
            backend="sim",
            backend_kwargs={"noise": 0.05, "seed": 1},
            tables=tables[:20],
            holdout_tables=tables[20:],
            compute_samples=300,
            comm_samples=100,
            holdout_samples=100,
            retest_samples=40,
            max_tables=8,
            progress=False,
            model_kwargs={"max_epochs": 5, "train_batch_size": 64},
        )
    )
    text = run("model-report", model_dir)
    assert "floor" in text and "MSE(log)" in text
    assert "compute test_pool by bucket" in text and "bwd_comm test by bucket" in text
    assert text.index("<64MiB") < text.index("64MiB-512MiB")
    floor = json.loads(run("model-report", model_dir, "--json"))["metrics"]["noise_floor"]
    assert 0.01 < floor["compute"]["floor_mape"] < 0.08  # lognormal sigma 0.05 -> ~0.04


def test_model_report_scores_the_shipped_cpu_model_on_another_session(run):
    report = json.loads(
        run(
            "model-report",
            "data/models/cpu-b4096-d4",
            "--json",
            "--data",
            "data/datasets/cpu_b4096_r10",
            "--data",
            "data/datasets/cpu_b4096",
        )
    )
    other, own = report["sessions"]
    # its own session's held-out loads are its test pool, scored as in its metadata
    assert own["compute"]["mape"] == pytest.approx(
        report["metrics"]["compute"]["test_pool"]["mape"]
    )
    assert own["noise_floor"] == pytest.approx(report["metrics"]["noise_floor"]["compute"])
    assert other["compute"]["n"] == 300 and other["compute"]["spearman"] > 0.97
    assert other["noise_floor"]["n"] == 150
    assert other["compute"]["mape"] < 1.5 * other["noise_floor"]["floor_mape"]
    text = run("model-report", "data/models/cpu-b4096-d4", "--data", "data/datasets/cpu_b4096_r10")
    assert f"{other['compute']['mape']:.2%}" in text
    assert f"{other['noise_floor']['floor_mape']:.2%}" in text


def test_plan_with_the_shipped_lightgbm_model(run, tmp_path):
    out = tmp_path / "plan.json"
    run(
        "plan",
        EXAMPLE,
        "-n",
        "4",
        "-m",
        "4GB",
        "--cost-model",
        "lightgbm",
        "--backend",
        "sim",
        "--searcher",
        "greedy-grid",
        "--out",
        out,
    )
    assert read_plan(out).cost.model.startswith("lightgbm-sim-")


def test_plan_takes_a_lightgbm_model_dir_without_cost_model(run, tmp_path):
    out = tmp_path / "plan.json"
    run(
        "plan",
        EXAMPLE,
        "-n",
        "4",
        "-m",
        "4GB",
        "--model",
        "data/models/sim-h100-d4-lightgbm",
        "--searcher",
        "greedy-grid",
        "--out",
        out,
    )
    assert read_plan(out).cost.model.startswith("lightgbm-sim-")


def test_plan_verify_keeps_the_candidate_the_sim_prices_cheapest(run, tmp_path):
    out = tmp_path / "plan.json"
    run(
        "plan",
        EXAMPLE,
        "--devices",
        4,
        "--memory",
        "4GB",
        "--verify",
        "sim:h100",
        "--top",
        4,
        "--out",
        out,
    )
    record = read_plan(out).meta["verify"]
    assert record["backend"] == "sim" and record["candidates"] == 4
    assert record["verified_ms"][record["chosen_rank"] - 1] == min(record["verified_ms"])
    cost = json.loads(run("evaluate", out, "--backend", "sim", "--json"))
    assert cost["max_ms"] == pytest.approx(min(record["verified_ms"]), rel=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--verify", "sim:nope"], "unknown sim profile 'nope'"),
        (["--verify", "cpu:h100"], "only the sim backend takes a profile"),
        (["--verify", "sim", "--searcher", "lookup"], "'lookup' keeps a single plan"),
        (["--top", "3"], "--top goes with --verify"),
        (["--margin", "0.05", "--searcher", "greedy-grid"], "--margin goes with --searcher"),
        (["--margin", "0.05", "--verify", "sim"], "--margin goes with --searcher"),
        (["--margin", "1.5"], "--margin must be a fraction in [0, 1)"),
    ],
)
def test_plan_verify_refuses_bad_options(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    result = CliRunner().invoke(app, ["plan", EXAMPLE, "--devices", "4", "--memory", "4GB", *args])
    assert result.exit_code != 0 and message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_plan_help_gives_the_default_margin(run):
    from neuroshard.search.beam import DEFAULT_MARGIN

    text = " ".join(run("plan", "--help").split())  # rich wraps the help
    assert f"(default {DEFAULT_MARGIN:g})" in text.replace("│", "").replace("  ", " ")


def test_plan_margin_zero_returns_the_cheapest_searched_plan(run, tmp_path):
    plans = {}
    for margin in ("0", "0.99"):
        plans[margin] = tmp_path / f"m{margin}.json"
        run("plan", EXAMPLE, *"-n 4 -m 4GB --margin".split(), margin, "--out", plans[margin])
    strict, lax = read_plan(plans["0.99"]), read_plan(plans["0"])
    assert strict.meta["searcher"] == "neuroshard"
    assert strict.meta["kept_start"] or strict.shards == lax.shards  # 99%: the greedy grid's
    assert strict.cost.max_ms == pytest.approx(strict.meta["start_ms"], rel=1e-6)
    assert lax.cost.max_ms <= strict.cost.max_ms + 1e-12


def test_plan_counts_io_buffers_unless_told_not_to(run, tmp_path):
    on, off = tmp_path / "on.json", tmp_path / "off.json"
    run("plan", EXAMPLE, "--devices", 4, "--memory", "4GB", "--searcher", "lookup", "--out", on)
    run(
        "plan",
        EXAMPLE,
        "--devices",
        4,
        "--memory",
        "4GB",
        "--searcher",
        "lookup",
        "--no-io-buffers",
        "--out",
        off,
    )
    with_io, without = read_plan(on), read_plan(off)
    assert with_io.cluster.io_buffers and not without.cluster.io_buffers
    assert sum(with_io.memory_bytes()) > sum(without.memory_bytes())


def test_pretrain_with_plan_rounds_adds_the_searches_loads(run, tmp_path):
    out = tmp_path / "pt"
    run(
        "pretrain", "--out", out, "--backend", "sim", "--devices", "2", "--compute-samples", "30",
        "--comm-samples", "10", "--plan-rounds", "1", "--plan-tasks", "1",
    )  # fmt: skip
    meta = json.loads((out / "model" / "meta.json").read_text())
    plans = meta["sample_counts"]["compute_plans"]
    assert 1 <= plans <= 2 * 2  # one task, two searchers, two devices
    assert meta["sample_counts"]["compute"]["total"] == 30 + plans
    assert meta["provenance"]["plan_rounds"] == 1

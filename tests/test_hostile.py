"""Issue 18, "hostile and careless input, round two": one test (or a table of cases) per
numbered item of the issue, run through the CLI in-process.

Every case checks what a user sees: the documented exit code, one error line naming the
culprit, no traceback, inputs left as they were, no NaN or Infinity printed. Hand-made
table configs live in ``tests/corpus/hostile/``; plan files, model directories and lookup
files are made here from valid ones. ``CASES`` is the table of single-command cases; the
other tests need more than one command or a look at the files afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from neuroshard.cli import app
from neuroshard.models import META_FILE
from neuroshard.plan_io import plan_to_dict, write_plan
from neuroshard.types import Cluster, Plan, Shard

from factories import GB, make_table, pythonpath_with_tests

CORPUS = Path(__file__).parent / "corpus" / "hostile"
DATA = Path(__file__).resolve().parents[1] / "data"
LGB_SHIPPED = DATA / "models" / "sim-h100-d4-lightgbm"
NEURAL_SHIPPED = DATA / "models" / "sim-h100-d4"
LGB_FILES = ("compute.lgb.txt", "bwd_comm.lgb.txt", "fwd_comm.lgb.txt")
EXIT_OK, EXIT_INPUT, EXIT_INFEASIBLE, EXIT_MODEL = 0, 2, 3, 4


# --------------------------------------------------------------------------- helpers


@pytest.fixture()
def runner(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="neuroshard")
    monkeypatch.delenv("NEUROSHARD_DEBUG", raising=False)
    monkeypatch.setenv("COLUMNS", "100")
    return CliRunner()


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def invoke(runner: CliRunner, *args: object) -> Run:
    """The CLI in-process; fails on an escaped exception, a traceback, NaN or Infinity."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__} escaped: {result.exception}"
    )
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    for token in ("NaN", "Infinity"):
        assert token not in result.stdout, f"{token} printed:\n{result.stdout[-2000:]}"
    return Run(result.exit_code, result.stdout, result.stderr)


def one_error(run: Run, code: int, *needles: str) -> str:
    """The single stderr line of a failure with ``code``, holding every needle."""
    assert run.code == code, f"exit {run.code}, expected {code}:\n{run.stderr}{run.stdout}"
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr:\n{run.stderr}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(
            b"".join(
                p.relative_to(path).as_posix().encode() + p.read_bytes()
                for p in sorted(path.rglob("*"))
                if p.is_file()
            )
        ).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_plan() -> Plan:
    tables = (make_table("t0", rows=1000, dim=8), make_table("t1", rows=2000, dim=16))
    shards = (Shard("t0", 0, 8, 0), Shard("t1", 0, 8, 0), Shard("t1", 8, 16, 1))
    return Plan(tables, shards, Cluster.uniform(2, GB))


def rewrite_checksums(model_dir: Path, files) -> None:
    meta = json.loads((model_dir / META_FILE).read_text())
    meta["files"] = {f: hashlib.sha256((model_dir / f).read_bytes()).hexdigest() for f in files}
    (model_dir / META_FILE).write_text(json.dumps(meta))


def edit_meta(model_dir: Path, **changes) -> None:
    meta = json.loads((model_dir / META_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (model_dir / META_FILE).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Inputs made at run time: valid tables and plan, damaged plans and model copies."""
    d = tmp_path_factory.mktemp("hostile")
    (d / "tables.json").write_text(
        json.dumps(
            [{"name": "t0", "rows": 1000, "dim": 16}, {"name": "t1", "rows": 5000, "dim": 32}]
        )
    )
    (d / "thousand.json").write_text(
        json.dumps([{"name": f"t{i}", "rows": 1000 + i, "dim": 16} for i in range(1000)])
    )
    (d / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    write_plan(small_plan(), d / "plan.json")
    shutil.copy(d / "plan.json", d / "plan_named.png")
    doc = plan_to_dict(small_plan())

    def plan_variant(name, mutate):
        broken = json.loads(json.dumps(doc))
        mutate(broken)
        (d / name).write_text(json.dumps(broken))

    def costed(p):
        p["cost"] = {
            "model": "x",
            "max_ms": 1.0,
            "devices": [
                {
                    "compute_ms": 1.0,
                    "fwd_comm_ms": 0.0,
                    "bwd_comm_ms": 0.0,
                    "total_ms": 1.0,
                    "memory_bytes": 1,
                }
                for _ in range(2)
            ],
        }

    plan_variant("costed.json", costed)
    plan_variant(
        "negative_cost.json", lambda p: (costed(p), p["cost"]["devices"][0].update(compute_ms=-5.0))
    )
    plan_variant("other_tables.json", lambda p: (costed(p), p["tables"][0].update(name="zz")))
    plan_variant("dotted.json", lambda p: p["tables"][0].update(name="user.id"))
    plan_variant("bad_shards.json", lambda p: p["tables"][0].update(shards=[{"columns": 1}]))
    plan_variant("overlap.json", lambda p: p["tables"][1]["shards"][1].update(columns=[0, 8]))
    plan_variant(
        "many_devices.json",
        lambda p: p.update(
            num_devices=100_000,
            devices_per_host=100_000,
            memory_per_device_bytes=[GB] * 100_000,
            host_memory_per_device_bytes=[0] * 100_000,
        ),
    )
    (d / "nan_cost.json").write_text(
        (d / "costed.json").read_text().replace('"compute_ms": 1.0', '"compute_ms": NaN', 1)
    )
    (d / "repeated_key_plan.json").write_text(
        (d / "plan.json")
        .read_text()
        .replace('"batch_size": 65536', '"batch_size": 65536, "batch_size": 4096', 1)
    )
    return d


@pytest.fixture(scope="module")
def damaged_models(tmp_path_factory):
    """Copies of the shipped models, each damaged one way (item 1, 4, 10, 11, 12)."""
    if not LGB_SHIPPED.is_dir() or not NEURAL_SHIPPED.is_dir():
        pytest.skip("the shipped models are not in this checkout")
    d = tmp_path_factory.mktemp("models")
    out = {}

    def copy(name, src):
        out[name] = shutil.copytree(src, d / name)
        return out[name]

    for name in ("lgb_cut_no_checksums", "lgb_cut_rewritten"):
        m = copy(name, LGB_SHIPPED)
        text = (m / "compute.lgb.txt").read_bytes()
        (m / "compute.lgb.txt").write_bytes(text[: len(text) // 2])
    edit_meta(out["lgb_cut_no_checksums"], files=None)
    rewrite_checksums(out["lgb_cut_rewritten"], LGB_FILES)

    m = copy("lgb_cycle", LGB_SHIPPED)  # a child link back to the root: a loop, not a tree
    text = (m / "bwd_comm.lgb.txt").read_text()
    head, tree0 = text.split("Tree=0\n", 1)
    line = next(li for li in tree0.splitlines() if li.startswith("left_child="))
    values = line.split("=")[1].split(" ")
    values[1] = "0"
    (m / "bwd_comm.lgb.txt").write_text(
        head + "Tree=0\n" + tree0.replace(line, "left_child=" + " ".join(values), 1)
    )
    rewrite_checksums(m, LGB_FILES)

    import torch

    m = copy("neural_nan", NEURAL_SHIPPED)
    for f in ("compute.pt", "comm.pt"):
        state = torch.load(m / f, weights_only=True)
        torch.save(_nan_state(state), m / f)
    rewrite_checksums(m, ("compute.pt", "comm.pt"))

    m = copy("random_weights", NEURAL_SHIPPED)
    (m / "compute.pt").write_bytes(np.random.default_rng(0).bytes(4000))
    rewrite_checksums(m, ("compute.pt", "comm.pt"))
    m = copy("pickle_weights", NEURAL_SHIPPED)
    (m / "compute.pt").write_bytes(b"\x80\x04cposix\nsystem\n(Vtouch /tmp/h5-pwned\ntR.")
    rewrite_checksums(m, ("compute.pt", "comm.pt"))
    edit_meta(copy("unknown_kind", NEURAL_SHIPPED), kind="xgboost")
    edit_meta(copy("bad_metrics", NEURAL_SHIPPED), metrics={"compute": {"test": "x"}})
    edit_meta(copy("batch_as_text", NEURAL_SHIPPED), batch_size="65536")
    return out


def _nan_state(state):
    if isinstance(state, dict):
        return {k: _nan_state(v) for k, v in state.items()}
    if hasattr(state, "is_floating_point") and state.is_floating_point():
        return state.clone().fill_(float("nan"))
    return state


# --------------------------------------------------------------------------- single commands


@dataclass(frozen=True)
class Case:
    item: int
    id: str
    args: tuple[str, ...]  # {corpus}, {work}, {model:<name>} placeholders
    code: int
    needles: tuple[str, ...] = ()


PLAN2 = ("-n", "2", "-m", "1GB", "--searcher", "size")
CASES = [
    Case(
        1,
        "plan: truncated LightGBM model without checksums",
        (
            "plan",
            "{work}/tables.json",
            "-n",
            "4",
            "-m",
            "1GB",
            "--model",
            "{model:lgb_cut_no_checksums}",
        ),
        EXIT_MODEL,
        ("compute.lgb.txt", "no checksum"),
    ),
    Case(
        1,
        "plan: truncated LightGBM model, checksums rewritten",
        (
            "plan",
            "{work}/tables.json",
            "-n",
            "4",
            "-m",
            "1GB",
            "--model",
            "{model:lgb_cut_rewritten}",
        ),
        EXIT_MODEL,
        ("compute.lgb.txt", "not a valid LightGBM model"),
    ),
    Case(
        1,
        "evaluate: truncated LightGBM model, checksums rewritten",
        ("evaluate", "{work}/plan.json", "--model", "{model:lgb_cut_rewritten}"),
        EXIT_MODEL,
        ("compute.lgb.txt",),
    ),
    Case(
        1,
        "evaluate: LightGBM tree that loops back to its root",
        ("evaluate", "{work}/plan.json", "--model", "{model:lgb_cycle}"),
        EXIT_MODEL,
        ("bwd_comm.lgb.txt", "tree 0"),
    ),
    Case(
        2,
        "plan: markup table names in a duplicate-name error",
        ("plan", "{corpus}/markup_names_dup.json", *PLAN2),
        EXIT_INPUT,
        ("'[/red]'", "duplicate"),
    ),
    Case(
        2,
        "plan: markup in a missing path",
        ("plan", "{work}/in/[/red]missing.json", *PLAN2),
        EXIT_INPUT,
        ("[/red]missing.json",),
    ),
    Case(
        2,
        "plan: [bold] in a name is reported as written",
        ("plan", "{corpus}/bold_name_dup.json", *PLAN2),
        EXIT_INPUT,
        ("'[bold]x'",),
    ),
    Case(
        2,
        "evaluate: the library's own [start, end] survives",
        ("evaluate", "{work}/bad_shards.json"),
        EXIT_INPUT,
        ("'columns' [start, end]",),
    ),
    Case(
        4,
        "plan: NaN weights are an error, not a NaN answer",
        (
            "plan",
            "{work}/tables.json",
            "-n",
            "4",
            "-m",
            "1GB",
            "--model",
            "{model:neural_nan}",
            "--json",
        ),
        EXIT_MODEL,
        ("nan",),
    ),
    Case(
        4,
        "evaluate: NaN weights are an error",
        ("evaluate", "{work}/plan.json", "--model", "{model:neural_nan}", "--json"),
        EXIT_MODEL,
        ("nan",),
    ),
    Case(
        4,
        "plan: 1,000 tables on 4 devices under --strict (a model of loads up to 40 shards)",
        (
            "plan",
            "{work}/thousand.json",
            "-n",
            "4",
            "-m",
            "4GB",
            "--searcher",
            "size",
            "--strict",
            "--model",
            str(NEURAL_SHIPPED),
        ),
        EXIT_MODEL,
        ("tables per device 250", "[1, 40]"),
    ),
    Case(
        5,
        "plan: --out is the table config",
        ("plan", "{corpus}/same.csv", *PLAN2, "--out", "{corpus}/same.csv"),
        EXIT_INPUT,
        ("is an input",),
    ),
    Case(
        5,
        "plan: --out and --torchrec-out are one file",
        (
            "plan",
            "{work}/tables.json",
            *PLAN2,
            "--out",
            "{work}/x.json",
            "--torchrec-out",
            "{work}/x.json",
        ),
        EXIT_INPUT,
        ("is an input",),
    ),
    Case(
        5,
        "convert: --out is the plan",
        ("convert", "{work}/plan.json", "--out", "{work}/plan.json"),
        EXIT_INPUT,
        ("is an input",),
    ),
    Case(
        5,
        "report: --out is a plan (named .png)",
        ("report", "{work}/plan_named.png", "--out", "{work}/plan_named.png"),
        EXIT_INPUT,
        ("is an input",),
    ),
    Case(
        6,
        "plan: misspelled pooling_factor",
        ("plan", "{corpus}/misspelled_pooling.json", *PLAN2),
        EXIT_INPUT,
        ("pooling_factr", "did you mean 'pooling_factor'"),
    ),
    Case(
        6,
        "plan: misspelled reuse_hist (YAML)",
        ("plan", "{corpus}/misspelled_reuse.yaml", *PLAN2),
        EXIT_INPUT,
        ("reuse_hst", "did you mean 'reuse_hist'"),
    ),
    Case(
        6,
        "plan: key given twice (JSON)",
        ("plan", "{corpus}/repeated_key.json", *PLAN2),
        EXIT_INPUT,
        ("'dim' given twice",),
    ),
    Case(
        6,
        "plan: key given twice (YAML)",
        ("plan", "{corpus}/repeated_key.yaml", *PLAN2),
        EXIT_INPUT,
        ("'dim' given twice",),
    ),
    Case(
        6,
        "plan: CSV column repeated",
        ("plan", "{corpus}/repeated_column.csv", *PLAN2),
        EXIT_INPUT,
        ("repeats column", "'dim'"),
    ),
    Case(
        6,
        "plan: CSV column and its alias",
        ("plan", "{corpus}/alias_and_field.csv", *PLAN2),
        EXIT_INPUT,
        ("repeats column",),
    ),
    Case(
        6,
        "evaluate: plan key given twice",
        ("evaluate", "{work}/repeated_key_plan.json"),
        EXIT_INPUT,
        ("'batch_size' given twice",),
    ),
    Case(
        7,
        "plan: dotted names with --torchrec-out",
        ("plan", "{corpus}/dotted_names.json", *PLAN2, "--torchrec-out", "{work}/never.pt"),
        EXIT_INPUT,
        ("'user.id'", "'../../etc/passwd'", "TorchRec"),
    ),
    Case(
        7,
        "plan: a ModuleDict attribute as a name with --torchrec-out",
        ("plan", "{corpus}/module_dict_name.json", *PLAN2, "--torchrec-out", "{work}/never.pt"),
        EXIT_INPUT,
        ("'keys'",),
    ),
    Case(
        7,
        "convert: a dotted name",
        ("convert", "{work}/dotted.json", "--out", "{work}/never.pt"),
        EXIT_INPUT,
        ("'user.id'",),
    ),
    Case(
        8,
        "pretrain: --backend os:system",
        ("pretrain", "--out", "{work}/never", "--backend", "os:system"),
        EXIT_INPUT,
        ("unknown backend 'os:system'",),
    ),
    Case(
        8,
        "collect: --backend os:system",
        ("collect", "--out", "{work}/never", "--backend", "os:system"),
        EXIT_INPUT,
        ("unknown backend 'os:system'",),
    ),
    Case(
        8,
        "evaluate: --backend os:system",
        ("evaluate", "{work}/plan.json", "--backend", "os:system"),
        EXIT_INPUT,
        ("unknown backend 'os:system'",),
    ),
    Case(
        8,
        "report: --backend os:system",
        ("report", "{work}/plan.json", "--out", "{work}/never.png", "--backend", "os:system"),
        EXIT_INPUT,
        ("unknown backend 'os:system'",),
    ),
    Case(
        10,
        "plan: --out in a missing folder",
        ("plan", "{work}/tables.json", *PLAN2, "--out", "{work}/nowhere/p.json"),
        EXIT_INPUT,
        ("does not exist",),
    ),
    Case(
        10,
        "plan: --out is a folder",
        ("plan", "{work}/tables.json", *PLAN2, "--out", "{work}"),
        EXIT_INPUT,
        ("is a directory",),
    ),
    Case(
        10,
        "profile: --out in a missing folder",
        ("profile", "{work}/lookups.parquet", "--out", "{work}/nowhere/t.json"),
        EXIT_INPUT,
        ("does not exist",),
    ),
    Case(
        10,
        "convert: --out in a missing folder",
        ("convert", "{work}/plan.json", "--out", "{work}/nowhere/p.pt"),
        EXIT_INPUT,
        ("does not exist",),
    ),
    Case(
        10,
        "collect: --out is a file",
        ("collect", "--out", "{work}/tables.json"),
        EXIT_INPUT,
        ("is a file",),
    ),
    Case(
        10,
        "pretrain: --out under a file",
        ("pretrain", "--out", "{work}/tables.json/run"),
        EXIT_INPUT,
        ("is a file",),
    ),
    Case(
        10,
        "plan: --seed -1",
        ("plan", "{work}/tables.json", *PLAN2, "--seed", "-1"),
        EXIT_INPUT,
        ("--seed",),
    ),
    Case(
        10,
        "pretrain: --seed -1",
        ("pretrain", "--out", "{work}/never", "--seed", "-1"),
        EXIT_INPUT,
        ("--seed",),
    ),
    Case(
        10,
        "collect: --seed -1",
        ("collect", "--out", "{work}/never", "--seed", "-1"),
        EXIT_INPUT,
        ("--seed",),
    ),
    Case(
        10,
        "evaluate: JSON nested 100,000 deep",
        ("evaluate", "{work}/deep.json"),
        EXIT_INPUT,
        ("nested too deeply",),
    ),
    Case(
        10,
        "report: JSON nested 100,000 deep",
        ("report", "{work}/deep.json", "--out", "{work}/r.png"),
        EXIT_INPUT,
        ("nested too deeply",),
    ),
    Case(
        10,
        "convert: JSON nested 100,000 deep",
        ("convert", "{work}/deep.json", "--out", "{work}/c.pt"),
        EXIT_INPUT,
        ("nested too deeply",),
    ),
    Case(
        10,
        "plan: table config nested 100,000 deep",
        ("plan", "{work}/deep.json", *PLAN2),
        EXIT_INPUT,
        ("nested too deeply",),
    ),
    Case(
        10,
        "profile: a Parquet table column of lists",
        ("profile", "{work}/list_tables.parquet"),
        EXIT_INPUT,
        ("column 'table'",),
    ),
    Case(
        10,
        "model-report: malformed metrics",
        ("model-report", "{model:bad_metrics}"),
        EXIT_MODEL,
        ("'metrics'",),
    ),
    Case(
        10,
        "plan: --time-budget inf",
        ("plan", "{work}/tables.json", *PLAN2, "--time-budget", "inf"),
        EXIT_INPUT,
        ("time budget",),
    ),
    Case(
        10,
        "plan: --batch-size 10**20",
        ("plan", "{work}/tables.json", *PLAN2, "--batch-size", str(10**20), "--force"),
        EXIT_INPUT,
        ("--batch-size",),
    ),
    Case(
        11,
        "model-report: random bytes for weights",
        ("model-report", "{model:random_weights}"),
        EXIT_MODEL,
        ("compute.pt",),
    ),
    Case(
        11,
        "model-report: a pickle for weights",
        ("model-report", "{model:pickle_weights}"),
        EXIT_MODEL,
        ("compute.pt",),
    ),
    Case(
        11,
        "model-report: unknown kind",
        ("model-report", "{model:unknown_kind}"),
        EXIT_MODEL,
        ("'xgboost'",),
    ),
    Case(
        11,
        "model-report: truncated LightGBM model",
        ("model-report", "{model:lgb_cut_rewritten}"),
        EXIT_MODEL,
        ("compute.lgb.txt",),
    ),
    Case(
        12, "profile: keys 5 and '5'", ("profile", "{work}/keys_5.pt"), EXIT_INPUT, ("duplicate",)
    ),
    Case(
        12, "profile: an empty name", ("profile", "{work}/empty_name.pt"), EXIT_INPUT, ("'name'",)
    ),
    Case(12, "profile: 2**62 rows", ("profile", "{work}/huge_ids.pt"), EXIT_INPUT, ("rows",)),
    Case(
        12,
        "profile: --dim 1000000",
        ("profile", "{work}/lookups.parquet", "--dim", "1000000"),
        EXIT_INPUT,
        ("'dim'", "65536"),
    ),
    Case(12, "plan: a directory", ("plan", "{work}", *PLAN2), EXIT_INPUT, ("is a directory",)),
    Case(
        12,
        "plan: a symlink loop",
        ("plan", "{work}/loop.json", *PLAN2),
        EXIT_INPUT,
        ("symbolic link loop",),
    ),
    Case(
        12,
        "profile: a symlink loop",
        ("profile", "{work}/loop.json"),
        EXIT_INPUT,
        ("symbolic link loop",),
    ),
    Case(
        12,
        "evaluate: a symlink loop",
        ("evaluate", "{work}/loop.json"),
        EXIT_INPUT,
        ("symbolic link loop",),
    ),
    Case(
        12,
        "plan: -m 0.5B",
        ("plan", "{work}/tables.json", "-n", "2", "-m", "0.5B"),
        EXIT_INPUT,
        ("0.5B",),
    ),
    Case(
        12,
        "plan: meta batch_size '65536' (text)",
        ("plan", "{work}/tables.json", "-n", "4", "-m", "1GB", "--model", "{model:batch_as_text}"),
        EXIT_MODEL,
        ("'batch_size'", "'65536'"),
    ),
    Case(
        12,
        "evaluate: 100,000 devices",
        ("evaluate", "{work}/many_devices.json"),
        EXIT_INPUT,
        ("num_devices",),
    ),
    Case(
        12,
        "evaluate: overlapping shards",
        ("evaluate", "{work}/overlap.json"),
        EXIT_INPUT,
        ("columns [0, 8) covered twice",),
    ),
    Case(
        12,
        "pretrain: 1000 rounds for 10 samples",
        (
            "pretrain",
            "--out",
            "{work}/never",
            "--rounds",
            "1000",
            "--compute-samples",
            "10",
            "--comm-samples",
            "10",
        ),
        EXIT_INPUT,
        ("1000 rounds",),
    ),
    Case(
        12,
        "convert: --module-path ../../x",
        ("convert", "{work}/plan.json", "--out", "{work}/m.pt", "--module-path", "../../x"),
        EXIT_INPUT,
        ("'../../x'",),
    ),
    Case(
        12,
        "report: a stored cost of -5 ms",
        ("report", "{work}/negative_cost.json", "--out", "{work}/neg.png"),
        EXIT_INPUT,
        ("compute_ms -5.0",),
    ),
    Case(
        12,
        "evaluate: a stored NaN cost",
        ("evaluate", "{work}/nan_cost.json"),
        EXIT_INPUT,
        ("NaN",),
    ),
]


@pytest.fixture(scope="module")
def lookups(work):
    """Lookup files for ``profile``: a valid Parquet, one whose table column holds lists,
    torch dicts with keys 5 and '5', an empty name, ids past 2**62; a symlink loop."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    pq.write_table(
        pa.table({"table": ["a", "a", "b"], "sample": [0, 1, 0], "id": [1, 2, 3]}),
        work / "lookups.parquet",
    )
    pq.write_table(
        pa.table({"table": [["a"], ["b"]], "sample": [0, 1], "id": [1, 2]}),
        work / "list_tables.parquet",
    )
    bag = {"indices": torch.tensor([0, 1, 2]), "offsets": torch.tensor([0, 2, 3])}
    torch.save({5: bag, "5": bag}, work / "keys_5.pt")
    torch.save({"": bag}, work / "empty_name.pt")
    torch.save(
        {"t": {"indices": torch.tensor([2**62]), "offsets": torch.tensor([0, 1])}},
        work / "huge_ids.pt",
    )
    if not (work / "loop.json").is_symlink():
        os.symlink(work / "loop.json", work / "loop.json")
    return work


def _argv(case: Case, work: Path, models) -> list[str]:
    out = []
    for a in case.args:
        if a.startswith("{model:"):
            a = str(models[a[len("{model:") : -1]])
        out.append(a.format(corpus=CORPUS, work=work))
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"item {c.item}: {c.id}")
def test_case(case, runner, work, lookups, damaged_models):
    before = {p: digest(p) for p in (CORPUS, work / "plan.json", work / "tables.json")}
    run = invoke(runner, *_argv(case, work, damaged_models))
    one_error(run, case.code, *case.needles)
    assert {p: digest(p) for p in before} == before, "an input changed"
    assert not (work / "never.pt").exists() and not (work / "never").exists()


def test_every_item_has_cases():
    assert {c.item for c in CASES} | {3, 9} == set(range(1, 13))


# --------------------------------------------------------------------------- item 1


LGB_CHILD = """
import sys
from pathlib import Path
from neuroshard.models import load_cost_model
from neuroshard.types import ModelFileError
for d in sys.argv[1:]:
    try:
        load_cost_model(d)
        print("loaded", d)
    except ModelFileError as e:
        print("refused", d)
"""


def test_damaged_lightgbm_models_never_kill_the_process(damaged_models, tmp_path):
    """In a real process (a segfault there cannot take the tests down): each damaged
    LightGBM directory is refused, and the process exits normally."""
    env = {**os.environ, "PYTHONPATH": pythonpath_with_tests(), "OMP_NUM_THREADS": "1"}
    dirs = [
        str(damaged_models[n]) for n in ("lgb_cut_no_checksums", "lgb_cut_rewritten", "lgb_cycle")
    ]
    done = subprocess.run(
        [sys.executable, "-c", LGB_CHILD, *dirs],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stderr[-2000:]}"
    assert done.stdout.count("refused") == 3, done.stdout


# --------------------------------------------------------------------------- item 2, 4


def test_markup_names_print_as_written(runner, tmp_path):
    run = invoke(
        runner,
        "plan",
        CORPUS / "markup_names_ok.json",
        "-n",
        "2",
        "-m",
        "1GB",
        "--searcher",
        "size",
        "--out",
        tmp_path / "[red]p.json",
    )
    assert run.code == EXIT_OK, run.stderr
    assert "[red]p.json" in run.stdout
    doc = json.loads((tmp_path / "[red]p.json").read_text())
    assert {t["name"] for t in doc["tables"]} == {"[/red]", "[bold]b[/bold]"}


def test_json_output_is_strict_json(runner, work):
    run = invoke(runner, "evaluate", work / "plan.json", "--json")
    assert run.code == EXIT_OK
    json.loads(run.stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON output"))


def test_out_of_range_is_a_warning_without_strict(runner, work):
    options = "-n 4 -m 4GB --searcher size --json --model".split()
    run = invoke(runner, "plan", work / "thousand.json", *options, NEURAL_SHIPPED)
    assert run.code == EXIT_OK, run.stderr
    assert "warning: tables per device 250 outside the model's training range [1, 40]" in run.stderr
    doc = json.loads(run.stdout)
    assert all(d["compute_ms"] > 0 for d in doc["cost"]["devices"])


def test_a_host_larger_than_the_model_knows_is_a_warning_naming_the_option(runner, work):
    # the any-cluster model was trained on hosts of 1 to 8 devices; 16 on one host is beyond
    options = "-n 16 -m 4GB --searcher size --json --model".split()
    model = DATA / "models" / "sim-h100"
    run = invoke(runner, "plan", work / "thousand.json", *options, model)
    assert run.code == EXIT_OK, run.stderr
    assert (
        "warning: devices per host 16 outside the model's training range [1, 8] "
        "(give --devices-per-host)" in run.stderr
    )
    hosts = invoke(
        runner, "plan", work / "thousand.json", *options, model, "--devices-per-host", "8"
    )
    assert hosts.code == EXIT_OK, hosts.stderr
    assert "devices per host" not in hosts.stderr


def test_training_ranges_are_recorded_and_checked(tmp_path):
    from neuroshard.models import load_cost_model
    from neuroshard.models.lightgbm import LightGBMCostModel

    from factories import collect_fake_data

    model = LightGBMCostModel(n_estimators=20, num_leaves=7, min_child_samples=5).fit(
        *collect_fake_data(tmp_path / "data", num_loads=120, num_comm=60)
    )
    loaded = load_cost_model(model.save(tmp_path / "m"))
    ranges = loaded.training_ranges_
    assert ranges["devices"] == [2, 8] and ranges["batch_size"] == [65_536, 65_536]
    low, high = ranges["tables_per_device"]
    assert 1 <= low <= high
    inside = Plan(
        (
            make_table(
                "a",
                rows=int(ranges["rows"][0]),
                dim=int(ranges["dim"][1]),
                pooling_factor=ranges["pooling_factor"][0],
            ),
        ),
        (Shard("a", 0, int(ranges["dim"][1]), 0),),
        Cluster.uniform(2, GB),
    )
    assert loaded.out_of_range(inside) == []
    wide = Plan(inside.tables, inside.shards, Cluster.uniform(16, GB))
    assert loaded.out_of_range(wide) == ["devices 16 outside the model's training range [2, 8]"]
    sequence = Plan((replace(inside.tables[0], pooled=False),), inside.shards, inside.cluster)
    (line,) = loaded.out_of_range(sequence)
    assert line.startswith("sequence tables (a) outside the model's training range")


# --------------------------------------------------------------------------- item 3


def test_collect_folder_keeps_its_first_settings(runner, tmp_path):
    out = tmp_path / "c"
    assert invoke(runner, "collect", "--out", out, "--samples", "10").code == EXIT_OK
    before = digest(out)
    for extra, needle in (
        (("--kind", "comm"), "kind 'compute' (first run) vs 'comm'"),
        (("--batch-size", "4096"), "batch_size 65536 (first run) vs 4096"),
        (("--profile", "a100"), "profile 'h100' (first run) vs 'a100'"),
        (("--seed", "3"), "seed 0 (first run) vs 3"),
    ):
        # nothing is left to measure at 5 samples: the check runs all the same
        run = invoke(runner, "collect", "--out", out, "--samples", "5", *extra)
        one_error(run, EXIT_INPUT, needle, str(out))
        assert digest(out) == before
    assert invoke(runner, "collect", "--out", out, "--samples", "12").code == EXIT_OK


def test_pretrain_folder_keeps_its_first_settings(runner, tmp_path):
    out = tmp_path / "run"
    small = ("--compute-samples", "30", "--comm-samples", "20", "--cost-model", "lightgbm")
    assert invoke(runner, "pretrain", "--out", out, *small).code == EXIT_OK, "first run"
    meta = (out / "model" / META_FILE).read_text()
    for extra, needle in (
        (("--batch-size", "4096"), "batch_size 65536 (first run) vs 4096"),
        (("--profile", "a100"), "profile 'h100' (first run) vs 'a100'"),
        (("--devices", "8"), "comm_device_counts [4] (first run) vs [8]"),
    ):
        one_error(invoke(runner, "pretrain", "--out", out, *small, *extra), EXIT_INPUT, needle)
    assert (out / "model" / META_FILE).read_text() == meta, "the model was replaced"


# --------------------------------------------------------------------------- item 5


def test_out_through_a_link_to_an_input_is_refused(runner, tmp_path):
    src = tmp_path / "t.csv"
    shutil.copy(CORPUS / "same.csv", src)
    os.symlink(src, tmp_path / "soft.json")
    os.link(src, tmp_path / "hard.json")
    for out in ("soft.json", "hard.json"):
        run = invoke(
            runner,
            "plan",
            src,
            "-n",
            "2",
            "-m",
            "1GB",
            "--searcher",
            "size",
            "--out",
            tmp_path / out,
        )
        one_error(run, EXIT_INPUT, "is an input")
    assert src.read_text() == (CORPUS / "same.csv").read_text()


def test_profile_out_equal_to_its_input(runner, lookups):
    before = digest(lookups / "lookups.parquet")
    run = invoke(
        runner, "profile", lookups / "lookups.parquet", "--out", lookups / "lookups.parquet"
    )
    one_error(run, EXIT_INPUT, "is an input")
    assert digest(lookups / "lookups.parquet") == before


# --------------------------------------------------------------------------- item 7


def test_names_are_checked_before_anything_is_written(runner, tmp_path):
    out = tmp_path / "p.json"
    run = invoke(
        runner,
        "plan",
        CORPUS / "dotted_names.json",
        "-n",
        "2",
        "-m",
        "1GB",
        "--searcher",
        "size",
        "--out",
        out,
        "--torchrec-out",
        tmp_path / "p.pt",
    )
    one_error(run, EXIT_INPUT, "'user.id'")
    assert not out.exists() and not (tmp_path / "p.pt").exists()
    # the same tables without a TorchRec output plan fine: plan JSON takes any name
    run = invoke(
        runner,
        "plan",
        CORPUS / "dotted_names.json",
        "-n",
        "2",
        "-m",
        "1GB",
        "--searcher",
        "size",
        "--out",
        out,
    )
    assert run.code == EXIT_OK and out.exists()


# --------------------------------------------------------------------------- item 8


def test_a_module_path_as_backend_imports_nothing(runner, work, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "h5_evil_backend.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef make(**kw):\n    raise SystemExit(99)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for argv in (
        ("collect", "--out", tmp_path / "c"),
        ("pretrain", "--out", tmp_path / "p"),
        ("evaluate", work / "plan.json"),
    ):
        run = invoke(runner, *argv, "--backend", "h5_evil_backend:make")
        assert run.code == EXIT_INPUT, run.stderr
        assert not marker.exists(), f"{argv[0]} imported a module named on the command line"
    assert "h5_evil_backend" not in sys.modules


def test_plugins_come_from_entry_points(tmp_path, monkeypatch):
    """A backend a package declares in the ``neuroshard.backends`` entry-point group is
    found by name; the same module named on the command line is not."""
    from neuroshard import backends
    from neuroshard.types import UnknownNameError

    dist = tmp_path / "h5_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: h5-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[neuroshard.backends]\nfake-plugin = factories:FakeBackend\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    backends._plugins.cache_clear()
    try:
        assert "fake-plugin" in backends.backend_names()
        assert backends.get_backend("fake-plugin", batch_size=4096).batch_size == 4096
        with pytest.raises(UnknownNameError, match="entry points"):
            backends.get_backend("factories:FakeBackend")
    finally:
        backends._plugins.cache_clear()


# --------------------------------------------------------------------------- item 9


HOLD_LOCK = """
import sys, time
from neuroshard.paths import folder_lock
with folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_run_into_a_held_folder_is_refused(runner, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": pythonpath_with_tests()}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for argv in (
            ("collect", "--out", out, "--samples", "10"),
            ("pretrain", "--out", out, "--compute-samples", "10", "--comm-samples", "10"),
        ):
            run = invoke(runner, *argv)
            one_error(run, EXIT_INPUT, str(out), f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert invoke(runner, "collect", "--out", out, "--samples", "10").code == EXIT_OK


def test_concurrent_atomic_writes_share_no_temporary_name(tmp_path):
    """Two writers of one file (two runs' checkpoints, say) never trip over each other's
    temporary file: the issue's 'FileNotFoundError: ...pt.tmp -> ...pt'."""
    import torch

    from neuroshard.models.training import FileCheckpointer

    path = tmp_path / "train" / "compute-x.pt"
    errors: list[BaseException] = []

    def save(seed: int) -> None:
        try:
            for epoch in range(20):
                FileCheckpointer(path).save(
                    {"w": torch.full((256,), float(seed))}, epoch=epoch, val_loss=1.0
                )
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert FileCheckpointer(path).load()["w"].shape == (256,)
    assert [p.name for p in path.parent.iterdir()] == [path.name], "a temporary file was left"


# --------------------------------------------------------------------------- item 10


def test_a_full_disk_is_an_input_error(runner, work, tmp_path, monkeypatch):
    import errno

    import neuroshard.atomic

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "p.json"))

    monkeypatch.setattr(neuroshard.atomic.os, "replace", full)
    run = invoke(
        runner,
        "plan",
        work / "tables.json",
        "-n",
        "4",
        "-m",
        "1GB",
        "--searcher",
        "size",
        "--out",
        tmp_path / "p.json",
    )
    one_error(run, EXIT_INPUT, "no space left", "p.json")
    assert list(tmp_path.iterdir()) == [], "a temporary file was left behind"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_an_input_error(runner, work, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    run = invoke(
        runner,
        "plan",
        work / "tables.json",
        "-n",
        "2",
        "-m",
        "1GB",
        "--searcher",
        "size",
        "--out",
        ro / "p.json",
    )
    one_error(run, EXIT_INPUT, "not writable")


def test_a_corrupt_training_checkpoint_names_its_file(tmp_path):
    from neuroshard.models.training import FileCheckpointer
    from neuroshard.types import ModelFileError

    path = tmp_path / "train" / "compute-abc.pt"
    path.parent.mkdir()
    path.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(ModelFileError, match="compute-abc.pt"):
        FileCheckpointer(path).load()


# --------------------------------------------------------------------------- item 12


def test_profile_writes_what_plan_reads(runner, lookups, tmp_path):
    out = tmp_path / "t.json"
    run = invoke(runner, "profile", lookups / "lookups.parquet", "--out", out)
    assert run.code == EXIT_OK, run.stderr
    run = invoke(runner, "plan", out, "-n", "2", "-m", "1GB", "--searcher", "size")
    assert run.code == EXIT_OK, run.stderr


def test_part_files_follow_the_umask(runner, tmp_path):
    old = os.umask(0o022)
    try:
        assert invoke(runner, "collect", "--out", tmp_path / "c", "--samples", "10").code == 0
    finally:
        os.umask(old)
    parts = list((tmp_path / "c").glob("part-*.parquet"))
    assert parts and all(p.stat().st_mode & 0o777 == 0o644 for p in parts)


def test_report_warns_when_plans_price_different_tables(runner, work, tmp_path, caplog):
    run = invoke(
        runner,
        "report",
        work / "costed.json",
        work / "other_tables.json",
        "--out",
        tmp_path / "r.png",
    )
    assert run.code == EXIT_OK, run.stderr
    assert "plan different tables" in caplog.text


def test_a_resumed_sim_collection_draws_the_same_noise(tmp_path):
    from neuroshard.pretrain.pipeline import PretrainConfig, backend_spec, collect_samples

    def run(out, n):
        config = PretrainConfig(
            out,
            backend=backend_spec("sim", 65_536, noise=0.05, seed=1),
            compute_samples=n,
            comm_samples=n,
            progress=False,
        )
        collect_samples(config, "compute")

    run(tmp_path / "once", 20)
    run(tmp_path / "twice", 10)
    run(tmp_path / "twice", 20)
    from neuroshard.pretrain.dataset import load_compute

    once, twice = load_compute(tmp_path / "once"), load_compute(tmp_path / "twice")
    by_key = dict(zip(twice.keys, twice.label_ms, strict=True))
    assert [by_key[k] for k in once.keys] == list(once.label_ms)

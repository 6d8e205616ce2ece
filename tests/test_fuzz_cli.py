"""Bad input to the ``neuroshard`` CLI: the documented exit code, one line on stderr, no traceback.

Exit codes (README): 1 internal error, 2 bad input, 3 no plan fits, 4 model file
unreadable or mismatched, 5 backend cannot run here. Every case runs in-process through
``typer.testing.CliRunner``; a representative subset also runs as a real subprocess
(``python -m neuroshard.cli``) so the entry point's own error handling is covered.

``plan`` always loads a cost model before searching, so the cases that reach the search
(infeasible tables, unknown searcher, model mismatch) pass ``--model``: the first shipped
model when there is one, else a tiny model fitted here on ``FakeBackend`` data (its
accuracy is irrelevant to exit codes); they skip only if neither can be had.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from neuroshard.cli import app
from neuroshard.plan_io import plan_to_dict, write_plan
from neuroshard.types import Cluster, Plan, Shard

from factories import GB, make_table

EXIT_INTERNAL, EXIT_INPUT, EXIT_INFEASIBLE, EXIT_MODEL, EXIT_BACKEND = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # "{name}" placeholders name files made by the `files` fixture
    code: int
    needle: str = ""  # must appear in the error line (case-insensitive)
    needs_model: bool = False


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir():
    """A shipped model of one device count and one batch (4 devices, 65,536), so that
    another batch is a mismatch."""
    from neuroshard.models import shipped_models

    return shipped_models()["sim-h100-d4"]


def _plan() -> Plan:
    tables = (make_table("t0", rows=1000, dim=8), make_table("t1", rows=2000, dim=16))
    shards = (Shard("t0", 0, 8, 0), Shard("t1", 0, 8, 0), Shard("t1", 8, 16, 1))
    return Plan(tables, shards, Cluster.uniform(2, GB))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_inputs")
    good = [{"name": "t0", "rows": 1000, "dim": 16}, {"name": "t1", "rows": 5000, "dim": 32}]
    texts = {
        "tables": json.dumps(good),
        "malformed": '[{"name": "t0", "rows": 1000, "dim": 16',
        "bad_dim": json.dumps([{"name": "t0", "rows": 1000, "dim": 6}]),
        "bad_rows": json.dumps([{"name": "t0", "rows": "many", "dim": 16}]),
        "nan_rows": '[{"name": "t0", "rows": NaN, "dim": 16}]',
        "dup_names": json.dumps(good + good[:1]),
        "empty": "",
        "binary": "\x00\xff\x00",
        # 1e9 rows: even a 4-column shard is 16e9 bytes, more than a 1 GB device
        "huge_table": json.dumps(
            [{"name": "giant", "rows": 10**9, "dim": 4}, {"name": "t1", "rows": 10, "dim": 4}]
        ),
        # 8 tables of 512 MiB each on two 1 GB devices: each fits, all together do not
        "too_many": json.dumps([{"name": f"t{i}", "rows": 1 << 21, "dim": 64} for i in range(8)]),
    }
    paths = {}
    for name, text in texts.items():
        suffix = ".csv" if name == "binary" else ".json"
        paths[name] = d / f"{name}{suffix}"
        paths[name].write_bytes(text.encode("utf-8", "surrogateescape"))
    paths["tables_csv_bad"] = d / "bad.csv"
    paths["tables_csv_bad"].write_text("name,rows\nt0,10\n")
    paths["dir"] = d

    plan = _plan()
    paths["plan"] = d / "plan.json"
    write_plan(plan, paths["plan"])
    doc = plan_to_dict(plan)

    def bad_plan(name, mutate):
        broken = json.loads(json.dumps(doc))
        mutate(broken)
        paths[name] = d / f"{name}.json"
        paths[name].write_text(json.dumps(broken))

    bad_plan("plan_format", lambda p: p.update(format="neuroshard.plan/v0"))
    bad_plan("plan_device", lambda p: p["tables"][0]["shards"][0].update(device=7))
    bad_plan("plan_gap", lambda p: p["tables"][1]["shards"].pop())
    bad_plan("plan_overlap", lambda p: p["tables"][1]["shards"][1].update(columns=[4, 16]))
    bad_plan("plan_over_cap", lambda p: p.update(memory_per_device_bytes=[1000, 1000]))
    bad_plan("plan_no_shards", lambda p: p["tables"][0].pop("shards"))
    bad_plan("plan_num_devices", lambda p: p.update(num_devices="two"))
    bad_plan("plan_cost", lambda p: p.update(cost={"model": "x", "devices": [{"compute_ms": 1}]}))
    bad_plan("plan_table", lambda p: p["tables"][0].update(dim=6))
    paths["plan_list"] = d / "plan_list.json"
    paths["plan_list"].write_text("[]")
    paths["missing"] = d / "missing.json"
    paths["no_model"] = d / "no_model_here"
    return {k: str(v) for k, v in paths.items()}


# --------------------------------------------------------------------------- cases

PLAN = ("plan", "{tables}", "--devices", "2", "--memory", "4GB")
PLAN_WITH_MODEL = PLAN + ("--model", "{model}", "--searcher", "greedy-grid")

CASES = [
    Case(
        "plan: missing file",
        ("plan", "{missing}", "-n", "2", "-m", "4GB"),
        EXIT_INPUT,
        "file not found",
    ),
    Case("plan: directory", ("plan", "{dir}", "-n", "2", "-m", "4GB"), EXIT_INPUT, "directory"),
    Case(
        "plan: malformed JSON",
        ("plan", "{malformed}", "-n", "2", "-m", "4GB"),
        EXIT_INPUT,
        "malformed JSON",
    ),
    Case("plan: bad dim", ("plan", "{bad_dim}", "-n", "2", "-m", "4GB"), EXIT_INPUT, "'dim'"),
    Case("plan: bad rows", ("plan", "{bad_rows}", "-n", "2", "-m", "4GB"), EXIT_INPUT, "'rows'"),
    Case("plan: NaN rows", ("plan", "{nan_rows}", "-n", "2", "-m", "4GB"), EXIT_INPUT, "NaN"),
    Case(
        "plan: duplicate names",
        ("plan", "{dup_names}", "-n", "2", "-m", "4GB"),
        EXIT_INPUT,
        "duplicate",
    ),
    Case("plan: empty file", ("plan", "{empty}", "-n", "2", "-m", "4GB"), EXIT_INPUT, "empty"),
    Case("plan: binary csv", ("plan", "{binary}", "-n", "2", "-m", "4GB"), EXIT_INPUT, ""),
    Case(
        "plan: csv lacks dim",
        ("plan", "{tables_csv_bad}", "-n", "2", "-m", "4GB"),
        EXIT_INPUT,
        "dim",
    ),
    Case("plan: memory 4XB", PLAN[:-1] + ("4XB",), EXIT_INPUT, "4XB"),
    Case("plan: memory -1GB", PLAN[:-1] + ("-1GB",), EXIT_INPUT, "-1GB"),
    Case("plan: memory abc", PLAN[:-1] + ("abc",), EXIT_INPUT, "abc"),
    Case("plan: memory empty", PLAN[:-1] + ("",), EXIT_INPUT, "memory"),
    Case("plan: memory 0GB", PLAN[:-1] + ("0GB",), EXIT_INPUT, "0GB"),
    Case("plan: three caps for two devices", PLAN[:-1] + ("1GB,1GB,1GB",), EXIT_INPUT, "3 caps"),
    Case(
        "plan: devices 0",
        ("plan", "{tables}", "--devices", "0", "--memory", "4GB"),
        EXIT_INPUT,
        "devices",
    ),
    Case(
        "plan: devices -3",
        ("plan", "{tables}", "--devices", "-3", "--memory", "4GB"),
        EXIT_INPUT,
        "devices",
    ),
    Case(
        "plan: devices abc",
        ("plan", "{tables}", "--devices", "abc", "--memory", "4GB"),
        EXIT_INPUT,
        "devices",
    ),
    Case("plan: no --memory", ("plan", "{tables}", "--devices", "2"), EXIT_INPUT, "memory"),
    Case("plan: batch size 0", PLAN + ("--batch-size", "0"), EXIT_INPUT, "batch-size"),
    Case("plan: model dir missing", PLAN + ("--model", "{no_model}"), EXIT_MODEL, "meta.json"),
    Case(
        "plan: unknown searcher",
        PLAN + ("--model", "{model}", "--searcher", "astrology"),
        EXIT_INPUT,
        "astrology",
        needs_model=True,
    ),
    Case(
        "plan: table larger than any device",
        (
            "plan",
            "{huge_table}",
            "-n",
            "2",
            "-m",
            "1GB",
            "--model",
            "{model}",
            "--searcher",
            "greedy-grid",
        ),
        EXIT_INFEASIBLE,
        "giant",
        needs_model=True,
    ),
    Case(
        "plan: tables do not fit in total",
        (
            "plan",
            "{too_many}",
            "-n",
            "2",
            "-m",
            "1GB",
            "--model",
            "{model}",
            "--searcher",
            "greedy-grid",
        ),
        EXIT_INFEASIBLE,
        "bytes",
        needs_model=True,
    ),
    Case(
        "plan: model batch size mismatch",
        PLAN_WITH_MODEL + ("--batch-size", "1024"),
        EXIT_MODEL,
        "batch size",
        needs_model=True,
    ),
    Case(
        "plan: model for another backend",
        PLAN_WITH_MODEL + ("--backend", "cpu"),
        EXIT_MODEL,
        "backend",
        needs_model=True,
    ),
    Case(
        "plan: model of another kind",
        PLAN_WITH_MODEL + ("--cost-model", "lightgbm"),
        EXIT_MODEL,
        "cost model",
        needs_model=True,
    ),
    Case("plan: unknown cost model", PLAN + ("--cost-model", "xgboost"), EXIT_INPUT, "xgboost"),
    Case(
        "plan: no shipped model for the backend",
        PLAN + ("--backend", "abacus"),
        EXIT_MODEL,
        "abacus",
    ),
    Case("evaluate: missing plan", ("evaluate", "{missing}"), EXIT_INPUT, "file not found"),
    Case("evaluate: malformed JSON", ("evaluate", "{malformed}"), EXIT_INPUT, "malformed JSON"),
    Case("evaluate: table config, not a plan", ("evaluate", "{tables}"), EXIT_INPUT, "JSON object"),
    Case("evaluate: empty list", ("evaluate", "{plan_list}"), EXIT_INPUT, ""),
    Case("evaluate: binary", ("evaluate", "{binary}"), EXIT_INPUT, ""),
    Case("evaluate: wrong format", ("evaluate", "{plan_format}"), EXIT_INPUT, "format"),
    Case(
        "evaluate: device out of range", ("evaluate", "{plan_device}"), EXIT_INPUT, "out of range"
    ),
    Case("evaluate: columns uncovered", ("evaluate", "{plan_gap}"), EXIT_INPUT, "t1"),
    Case(
        "evaluate: columns covered twice",
        ("evaluate", "{plan_overlap}"),
        EXIT_INPUT,
        "covered twice",
    ),
    Case("evaluate: over memory cap", ("evaluate", "{plan_over_cap}"), EXIT_INPUT, "exceeds cap"),
    Case("evaluate: no shards", ("evaluate", "{plan_no_shards}"), EXIT_INPUT, "shards"),
    Case(
        "evaluate: num_devices a string",
        ("evaluate", "{plan_num_devices}"),
        EXIT_INPUT,
        "num_devices",
    ),
    Case("evaluate: malformed cost", ("evaluate", "{plan_cost}"), EXIT_INPUT, "cost"),
    Case("evaluate: bad table in plan", ("evaluate", "{plan_table}"), EXIT_INPUT, "dim"),
    Case(
        "evaluate: unknown backend",
        ("evaluate", "{plan}", "--backend", "abacus"),
        EXIT_INPUT,
        "abacus",
    ),
    Case(
        "evaluate: unknown sim profile",
        ("evaluate", "{plan}", "--profile", "z80"),
        EXIT_INPUT,
        "z80",
    ),
    Case(
        "evaluate: model dir missing",
        ("evaluate", "{plan}", "--model", "{no_model}"),
        EXIT_MODEL,
        "meta.json",
    ),
    Case(
        "pretrain: unknown backend",
        ("pretrain", "--out", "{dir}/pt", "--backend", "abacus"),
        EXIT_INPUT,
        "abacus",
    ),
    Case(
        "pretrain: members for lightgbm",
        ("pretrain", "--out", "{dir}/pt", "--cost-model", "lightgbm", "--compute-members", "3"),
        EXIT_INPUT,
        "--compute-members",
    ),
    Case("unknown command", ("shard-everything",), EXIT_INPUT, "shard-everything"),
]


def _argv(case: Case, files, model_dir=None) -> list[str]:
    return [a.format(**files, model=model_dir) for a in case.args]


def assert_clean_failure(case: Case, code: int, stdout: str, stderr: str) -> None:
    assert "Traceback" not in stdout + stderr, f"traceback shown:\n{stdout}{stderr}"
    assert code == case.code, f"exit {code}, documented {case.code}; stderr:\n{stderr}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert case.needle.lower() in lines[0].lower(), f"{case.needle!r} not in {lines[0]!r}"


def _model_for(case: Case, request):
    return request.getfixturevalue("model_dir") if case.needs_model else None


@pytest.fixture()
def runner(monkeypatch, caplog):
    # No INFO records during invoke: pytest's live logging (--log-cli-level) would swap
    # sys.stdout under CliRunner, whose captured stream then closes.
    caplog.set_level(logging.WARNING, logger="neuroshard")
    monkeypatch.delenv("NEUROSHARD_DEBUG", raising=False)
    monkeypatch.setenv("COLUMNS", "100")
    return CliRunner()


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_in_process(case, files, runner, request):
    result = runner.invoke(app, _argv(case, files, _model_for(case, request)))
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__} escaped: {result.exception}"
    )
    assert_clean_failure(case, result.exit_code, result.stdout, result.stderr)


SUBPROCESS_CASES = [
    c
    for c in CASES
    if c.id
    in {
        "plan: missing file",
        "plan: bad dim",
        "plan: memory 4XB",
        "plan: devices 0",
        "plan: table larger than any device",
        "evaluate: columns covered twice",
        "evaluate: unknown backend",
    }
]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=lambda c: c.id)
def test_bad_input_in_a_real_process(case, files, request, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NEUROSHARD_DEBUG"}
    env.update(OMP_NUM_THREADS="1", COLUMNS="100")
    done = subprocess.run(
        [sys.executable, "-m", "neuroshard.cli", *_argv(case, files, _model_for(case, request))],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert_clean_failure(case, done.returncode, done.stdout, done.stderr)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU may be here")
def test_cuda_backend_without_a_gpu_exits_5(files, runner):
    case = Case(
        "evaluate: cuda here", ("evaluate", "{plan}", "--backend", "cuda"), EXIT_BACKEND, "cuda"
    )
    result = runner.invoke(app, _argv(case, files))
    assert_clean_failure(case, result.exit_code, result.stdout, result.stderr)


def test_infeasible_message_names_table_and_bytes(files, runner, model_dir):
    argv = ["plan", files["huge_table"], "-n", "2", "-m", "1GB", "--model", str(model_dir)]
    result = runner.invoke(app, argv)
    assert result.exit_code == EXIT_INFEASIBLE
    assert "'giant'" in result.stderr and "bytes" in result.stderr


def test_the_model_used_here_can_plan(files, runner, model_dir, tmp_path):
    """Guards the cases above: with good input the same command line succeeds."""
    out = tmp_path / "p.json"
    result = runner.invoke(
        app, [*_argv(Case("ok", PLAN_WITH_MODEL, 0), files, model_dir), "--out", str(out)]
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(out.read_text())["format"] == "neuroshard.plan/v2"


# --------------------------------------------------------------------------- hypothesis (issue 18)
#
# Generated table configs, plan files and model directories through plan, evaluate,
# convert, report and model-report, in-process. Whatever the input: an exit code in the
# documented set, one error line and no traceback on failure, inputs unchanged, and no
# NaN or Infinity printed. ``FUZZ_TRIED`` counts the inputs tried per verb (logged at
# module teardown, ``pytest --log-cli-level=INFO``).

import hashlib  # noqa: E402
import math  # noqa: E402
from collections import Counter  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DOCUMENTED = {0, EXIT_INPUT, EXIT_INFEASIBLE, EXIT_MODEL}
FUZZ_EXAMPLES = 150  # per test below; about 25 s for the three on two cores
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
FUZZ_TRIED: Counter[str] = Counter()
log = logging.getLogger(__name__)

NAMES = [
    "t0",
    "t1",
    "[/red]",
    "[bold]x",
    "user.id",
    "../../etc/passwd",
    "keys",
    "",
    " t0",
    "t\n0",
    "\u8868",
    "t\x00",
    "a" * 300,
    "t-0",
    "[start, end]",
]
FIELDS = [
    "name",
    "rows",
    "dim",
    "pooling_factor",
    "reuse_hist",
    "num_embeddings",
    "embedding_dim",
    "pooling_factr",
    "reuse_hst",
    "features",
    "pooled",
    "module",
]
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**7),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["[/red]", "1e400", "NaN", "65536", "[start, end]"]),
    st.lists(st.integers(-2, 10), max_size=4),
    st.just({"a": [1]}),
)


def _digest(path) -> str:
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        return hashlib.sha256(
            b"".join(
                str(p.relative_to(path)).encode() + p.read_bytes()
                for p in sorted(path.rglob("*"))
                if p.is_file()
            )
        ).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


def _run_clean(verb: str, argv: list[str], inputs: list) -> tuple[int, str, str]:
    """Invoke and check the invariants; returns (exit code, stdout, stderr)."""
    FUZZ_TRIED[verb] += 1
    before = {str(p): _digest(p) for p in inputs}
    quiet = logging.getLogger("neuroshard")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # INFO records under live logging close CliRunner's stream
    try:
        result = CliRunner().invoke(app, argv)
    finally:
        quiet.setLevel(level)
    escaped = result.exception
    assert escaped is None or isinstance(escaped, SystemExit), (
        f"{type(escaped).__name__} escaped from {argv}: {escaped}"
    )
    out, err = result.stdout, result.stderr
    assert "Traceback" not in out + err, out + err
    assert result.exit_code in DOCUMENTED, f"exit {result.exit_code} for {argv}:\n{err}"
    if result.exit_code == 0:
        assert "NaN" not in out and "Infinity" not in out, out
    else:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert {str(p): _digest(p) for p in inputs} == before, f"an input changed: {argv}"
    FUZZ_TRIED[f"{verb} exit {result.exit_code}"] += 1
    return result.exit_code, out, err


@pytest.fixture(scope="module")
def tiny_lgb(tmp_path_factory):
    """A small LightGBM model fitted on FakeBackend data (its accuracy is irrelevant)."""
    from neuroshard.models.lightgbm import LightGBMCostModel

    from factories import collect_fake_data

    root = tmp_path_factory.mktemp("tiny_lgb")
    model = LightGBMCostModel(n_estimators=25, num_leaves=7, min_child_samples=5, seed=0)
    yield model.fit(*collect_fake_data(root / "data", num_loads=150, num_comm=80)).save(
        root / "model"
    )
    log.info(
        "CLI fuzz inputs tried: %s (total %d)",
        dict(sorted(FUZZ_TRIED.items())),
        sum(FUZZ_TRIED.values()),
    )


@st.composite
def table_records(draw):
    """Mostly valid tables with hostile names, sometimes a junk, misspelled or repeated
    field."""
    records = []
    for i in range(draw(st.integers(1, 4))):
        rec = {
            "name": draw(st.sampled_from(NAMES) | st.just(f"t{i}")),
            "rows": draw(st.integers(1, 10**6)),
            "dim": 4 * draw(st.integers(1, 32)),
        }
        if draw(st.booleans()):
            rec["pooling_factor"] = draw(st.floats(0.5, 50))
        if draw(st.integers(0, 2)) == 0:
            rec[draw(st.sampled_from(FIELDS))] = draw(JUNK)
        records.append(rec)
    return records


def _config_text(records, fmt: str, repeat_key: bool) -> str:
    if fmt == ".json":
        text = json.dumps(records)
        return text.replace('"rows":', '"rows": 7, "rows":', 1) if repeat_key else text
    if fmt == ".yaml":
        import yaml

        return yaml.safe_dump(records, allow_unicode=True)
    import csv as csv_module
    import io

    columns = sorted({k for r in records for k in r}, key=FIELDS.index)
    buf = io.StringIO()
    writer = csv_module.writer(buf)
    writer.writerow(columns + (["dim"] if repeat_key else []))
    for r in records:
        extra = [r.get("dim", "")] if repeat_key else []
        writer.writerow([r.get(c, "") for c in columns] + extra)
    return buf.getvalue()


@FUZZ
@given(
    records=table_records(),
    fmt=st.sampled_from([".json", ".yaml", ".csv"]),
    repeat_key=st.booleans(),
    devices=st.sampled_from(["2", "4"]),
    memory=st.sampled_from(["64MB", "1GB"]),
    searcher=st.sampled_from(["size", "greedy-grid"]),
    torchrec=st.booleans(),
    strict=st.booleans(),
)
def test_fuzz_plan_on_generated_table_configs(
    tiny_lgb, tmp_path, records, fmt, repeat_key, devices, memory, searcher, torchrec, strict
):
    config = tmp_path / f"tables{fmt}"
    config.write_text(_config_text(records, fmt, repeat_key))
    out = tmp_path / "plan.json"
    out.unlink(missing_ok=True)
    argv = [
        "plan",
        str(config),
        "-n",
        devices,
        "-m",
        memory,
        "--model",
        str(tiny_lgb),
        "--searcher",
        searcher,
        "--out",
        str(out),
    ]
    argv += ["--torchrec-out", str(tmp_path / "plan.pt")] if torchrec else []
    argv += ["--strict"] if strict else []
    code, _, _ = _run_clean("plan", argv, [config, tiny_lgb])
    if code == 0:
        doc = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c))
        assert math.isfinite(doc["cost"]["max_ms"]) and doc["cost"]["max_ms"] > 0


def _valid_plan_doc() -> dict:
    return json.loads(json.dumps(plan_to_dict(_plan())))


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@st.composite
def plan_texts(draw):
    """A valid plan document with a few nodes replaced by junk or deleted, or its text
    cut, nested, or given a key twice."""
    doc = _valid_plan_doc()
    doc["cost"] = {
        "model": "m",
        "max_ms": 1.0,
        "devices": [
            {
                "compute_ms": 0.5,
                "fwd_comm_ms": 0.1,
                "bwd_comm_ms": 0.1,
                "total_ms": 0.7,
                "memory_bytes": 1,
            }
            for _ in range(2)
        ],
    }
    for _ in range(draw(st.integers(0, 3))):
        paths = [p for p in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.integers(0, 3)) == 0 and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JUNK)
    text = json.dumps(doc)
    how = draw(st.integers(0, 9))
    if how == 0:
        text = text[: draw(st.integers(0, len(text)))]
    elif how == 1:
        text = text.replace('"batch_size": ', '"batch_size": 1, "batch_size": ', 1)
    elif how == 2:
        depth = draw(st.sampled_from([50, 5000, 200_000]))
        text = text.replace('"meta"', '"deep": ' + "[" * depth + "]" * depth + ', "meta"', 1)
    return text


@FUZZ
@given(
    text=plan_texts(),
    verb=st.sampled_from(["evaluate", "evaluate-model", "convert", "report", "evaluate-json"]),
)
def test_fuzz_plan_files(tiny_lgb, tmp_path, text, verb):
    plan = tmp_path / "plan.json"
    plan.write_text(text)
    if verb == "convert":
        argv = ["convert", str(plan), "--out", str(tmp_path / "plan.pt")]
    elif verb == "report":
        argv = ["report", str(plan), str(plan), "--out", str(tmp_path / "r.png")]
    elif verb == "evaluate-model":
        argv = ["evaluate", str(plan), "--model", str(tiny_lgb)]
    else:
        argv = ["evaluate", str(plan)] + (["--json"] if verb == "evaluate-json" else [])
    code, out, _ = _run_clean(verb.split("-")[0], argv, [plan, tiny_lgb])
    if code == 0 and verb == "evaluate-json":
        json.loads(out, parse_constant=lambda c: pytest.fail(c))


META_KEYS = [
    "kind",
    "batch_size",
    "num_devices",
    "backend",
    "files",
    "metrics",
    "feature_schema",
    "normalisation",
    "aggregate_features",
    "hyperparameters",
    "training_ranges",
    "provenance",
    "sample_counts",
]


@st.composite
def model_damage(draw):
    return {
        "meta_key": draw(st.none() | st.sampled_from(META_KEYS)),
        "meta_value": draw(JUNK),
        "file": draw(
            st.none() | st.sampled_from(["compute.lgb.txt", "bwd_comm.lgb.txt", "fwd_comm.lgb.txt"])
        ),
        "cut": draw(st.floats(0.0, 1.0)),
        "flip": draw(st.none() | st.integers(0, 10**6)),
        "checksums": draw(st.sampled_from(["kept", "rewritten", "deleted"])),
    }


@FUZZ
@given(damage=model_damage(), verb=st.sampled_from(["plan", "evaluate", "model-report"]))
def test_fuzz_model_directories(tiny_lgb, files, tmp_path, damage, verb):
    model = tmp_path / "model"
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(tiny_lgb, model)
    if damage["file"] is not None:
        path = model / damage["file"]
        blob = bytearray(path.read_bytes())
        if damage["flip"] is not None and blob:
            blob[damage["flip"] % len(blob)] = ord("7")
        path.write_bytes(
            bytes(blob[: int(len(blob) * damage["cut"])]) if damage["cut"] < 0.5 else bytes(blob)
        )
    meta = json.loads((model / "meta.json").read_text())
    if damage["checksums"] == "rewritten":
        meta["files"] = {
            f: hashlib.sha256((model / f).read_bytes()).hexdigest() for f in meta["files"]
        }
    elif damage["checksums"] == "deleted":
        meta.pop("files")
    if damage["meta_key"] is not None:
        meta[damage["meta_key"]] = damage["meta_value"]
    (model / "meta.json").write_text(json.dumps(meta))
    if verb == "plan":
        argv = [
            "plan",
            files["tables"],
            "-n",
            "2",
            "-m",
            "1GB",
            "--model",
            str(model),
            "--searcher",
            "size",
            "--json",
        ]
    elif verb == "evaluate":
        argv = ["evaluate", files["plan"], "--model", str(model), "--json"]
    else:
        argv = ["model-report", str(model), "--json"]
    code, _, _ = _run_clean(verb, argv, [model])
    intact = (
        damage["file"] is None and damage["meta_key"] is None and damage["checksums"] != "deleted"
    )
    if intact:
        assert code == 0
    if damage["checksums"] == "deleted":
        assert code == EXIT_MODEL, "a model directory without checksums was used"

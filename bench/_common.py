"""What the bench scripts share: the task options, the tasks, the truth backend, p95, and
:func:`emit`, which writes a results file headed by the command that reproduces it and the
conditions it ran under (recorded here, never by hand)."""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from neuroshard.atomic import write_text_atomic
from neuroshard.backends import as_estimator, get_backend
from neuroshard.pretrain.pool import load_pool
from neuroshard.search import get_searcher
from neuroshard.search.beam import check_margin
from neuroshard.tasks import default_max_total_bytes, sample_tasks
from neuroshard.types import Cluster, CostEstimator, TableSpec
from neuroshard.units import parse_memory


def add_task_args(p: argparse.ArgumentParser) -> None:
    """--tasks --devices --memory --split --min-tables --max-tables --profile --truth
    --batch-size --reserve --seed --out."""
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--memory", default="4GB")
    p.add_argument("--split", default="test", choices=["train", "test", "all"])
    p.add_argument("--min-tables", type=int, default=10)
    p.add_argument("--max-tables", type=int, default=60)
    p.add_argument("--profile", default="h100", help="sim profile that costs every plan")
    p.add_argument(
        "--truth",
        default="sim",
        choices=["sim", "cpu"],
        help="backend that costs every plan: the sim (noise 0) or real CPU timings",
    )
    p.add_argument("--batch-size", type=int, default=65_536)
    p.add_argument(
        "--reserve",
        type=float,
        default=0.0,
        help="share of HBM kept from embeddings (the planner's default is 0.15; 0, "
        "the paper's protocol: --memory is all for embeddings)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)


def add_verify_arg(p: argparse.ArgumentParser) -> None:
    """--verify-top K,K: rows planned with the planner's verification."""
    p.add_argument(
        "--verify-top",
        default="",
        help="comma-separated K: also plan 'neuroshard+verifyK', neuroshard keeping its K "
        "cheapest plans under the model and keeping the one a fresh instance of the truth "
        "backend prices cheapest (plan --verify TRUTH --top K)",
    )


def verify_variants(spec: str, verifier: CostEstimator) -> dict[str, dict]:
    """Planner keyword arguments of each ``neuroshard+verifyK`` row of ``--verify-top``."""
    return {
        f"neuroshard+verify{k}": {"searcher": "neuroshard", "verify": verifier, "top": k}
        for k in (int(x) for x in spec.split(",") if x.strip())
    }


def add_margins_arg(p: argparse.ArgumentParser) -> None:
    """--margins M,M: rows planned by NeuroShard at other margins than the default."""
    p.add_argument(
        "--margins",
        default="",
        help="comma-separated fractions M: also plan 'neuroshard-mM', NeuroShard returning "
        "the greedy grid's plan unless its own is priced that share cheaper",
    )


def margin_variants(p: argparse.ArgumentParser, spec: str) -> dict[str, dict]:
    """Planner keyword arguments of each ``neuroshard-mM`` row of ``--margins``; a bad
    fraction is a parser error naming it."""
    rows = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        try:
            check_margin(margin := float(item))
        except ValueError as e:
            p.error(f"--margins {item}: {e}")
        rows[f"neuroshard-m{margin:g}"] = {"searcher": get_searcher("neuroshard", margin=margin)}
    return rows


def truth_backend(args: argparse.Namespace, batch_size: int) -> CostEstimator:
    """A new instance of the ``--truth`` backend (the sim with noise 0, or the CPU)."""
    kwargs = {"profile": args.profile} if args.truth == "sim" else {}
    return as_estimator(get_backend(args.truth, batch_size=batch_size, **kwargs))


def task_setup(args: argparse.Namespace) -> tuple[Cluster, CostEstimator, list[list[TableSpec]]]:
    """The cluster, the backend that costs plans (``--truth``: the sim with noise 0, or the
    CPU backend timing every device's load and the all-to-all), and the seeded tasks."""
    memory = parse_memory(args.memory)
    cluster = Cluster.uniform(args.devices, memory, args.batch_size)
    truth = truth_backend(args, cluster.batch_size)
    tasks = sample_tasks(
        load_pool(args.split),
        args.tasks,
        seed=args.seed,
        min_tables=args.min_tables,
        max_tables=args.max_tables,
        max_total_bytes=default_max_total_bytes(args.devices, memory),
    )
    return cluster, truth, tasks


def truth_name(args: argparse.Namespace) -> str:
    """How the bench's tables name the backend that costs plans."""
    return f"sim/{args.profile} (noise 0)" if args.truth == "sim" else "the cpu backend (measured)"


def p95(values: list[float]) -> float:
    s = sorted(values) or [math.nan]
    return s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]


REPO = Path(__file__).resolve().parents[1]


def _now() -> dict:
    return {
        "utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "load": os.getloadavg(),
        "monotonic": time.monotonic(),
    }


# Taken when a bench script imports this module, i.e. as it starts.
_STARTED = _now()


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def command_line(argv: list[str] | None = None) -> str:
    """The shell command that reruns this bench script from the repository root with
    ``argv`` (default: the process's own arguments), under its ``OMP_NUM_THREADS``."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_path = script.relative_to(REPO).as_posix()
    except ValueError:
        script_path = f"bench/{script.name}"
    args = argv if argv is not None else sys.argv[1:]
    threads = os.environ.get("OMP_NUM_THREADS")
    env = f"OMP_NUM_THREADS={threads} " if threads is not None else ""
    return f"{env}.venv/bin/python {shlex.join([script_path, *map(str, args)])}"


def conditions() -> str:
    """One line on the machine and the code a bench ran on, from the start of the script
    to now: date, git commit (and uncommitted changes), logical CPUs, OMP_NUM_THREADS,
    1-minute load average at start and end, wall seconds."""
    end = _now()
    commit = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    changed = [
        line
        for line in _git("status", "--porcelain", "--untracked-files=no", "--", ".").splitlines()
        if line.strip()
    ]
    code = f"commit {commit}" + (
        f" with uncommitted changes in {len(changed)} tracked file(s)" if changed else ""
    )
    return (
        f"Conditions: {_STARTED['utc']} to {end['utc']}; {code}; "
        f"{os.cpu_count()} logical CPUs; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; 1-minute load "
        f"average {_STARTED['load'][0]:.2f} at start, {end['load'][0]:.2f} at end; "
        f"{end['monotonic'] - _STARTED['monotonic']:.0f} s."
    )


def emit(
    text: str, out: Path | None, *, title: str | None = None, argv: list[str] | None = None
) -> None:
    """Print a bench's Markdown and write it to ``out`` when given: first the command that
    reproduces it (:func:`command_line`; ``argv`` default the process's own arguments),
    then ``title``, the :func:`conditions` it ran under, and ``text``."""
    print(text)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        head = f"# {title}\n\n" if title else ""
        body = f"Command: `{command_line(argv)}`\n\n{head}{conditions()}\n\n{text}\n"
        write_text_atomic(out, body)  # a killed bench leaves the earlier results whole


def extract_revision(rev: str, dest: Path, *paths: str | Path) -> Path:
    """The files of commit ``rev`` of this repository (all, or only ``paths``) under
    ``dest``; a ``ValueError`` with git's complaint when ``rev`` or a path is not there."""
    done = subprocess.run(
        ["git", "archive", rev, *map(str, paths)], cwd=REPO, capture_output=True, check=False
    )
    if done.returncode != 0:
        raise ValueError(f"{rev}: {done.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def export(rev: str, dest: Path) -> Path:
    """``rev`` of this repository laid out as installed: ``dest/pkg/neuroshard`` with
    pretrain/, search/ and data/ inside, and the revision's bench/ at ``dest/src/bench``."""
    src = dest / "src"
    src.mkdir(parents=True)
    extract_revision(rev, src)
    pkg = dest / "pkg" / "neuroshard"
    shutil.copytree(src / "neuroshard", pkg)
    for sub in ("pretrain", "search", "data"):
        shutil.copytree(src / sub, pkg / sub)
    return dest


def run_python(code: str, pythonpath: Path | None, what: str) -> Any:
    """Run ``code`` in a fresh interpreter (with ``pythonpath``, e.g. a revision laid out by
    :func:`export`, from a neutral folder) and parse the JSON its last output line prints;
    a failure exits, naming ``what`` failed."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tempfile.gettempdir(),
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def renamed_draws(
    pool: Sequence[TableSpec], num_tables: int, rng: np.random.Generator
) -> list[TableSpec]:
    """``num_tables`` tables drawn from ``pool`` with replacement, the ``k``-th renamed
    ``NAME#k`` (everything else kept) so that a task may outgrow the pool."""
    picks = rng.integers(0, len(pool), size=num_tables)
    return [replace(pool[i], name=f"{pool[i].name}#{k}") for k, i in enumerate(picks.tolist())]

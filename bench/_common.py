"""What the bench scripts share: the task options, the tasks, the truth backend, p95."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from neuroshard.backends import as_estimator, get_backend
from neuroshard.cli import parse_memory
from neuroshard.pretrain.pool import load_pool
from neuroshard.tasks import default_max_total_bytes, sample_tasks
from neuroshard.types import Cluster, CostEstimator, TableSpec


def add_task_args(p: argparse.ArgumentParser) -> None:
    """--tasks --devices --memory --split --min-tables --max-tables --profile --truth
    --batch-size --seed --out."""
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--memory", default="4GB")
    p.add_argument("--split", default="test", choices=["train", "test", "all"])
    p.add_argument("--min-tables", type=int, default=10)
    p.add_argument("--max-tables", type=int, default=60)
    p.add_argument("--profile", default="h100", help="sim profile that costs every plan")
    p.add_argument("--truth", default="sim", choices=["sim", "cpu"],
                   help="backend that costs every plan: the sim (noise 0) or real CPU timings")
    p.add_argument("--batch-size", type=int, default=65_536)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)


def task_setup(args: argparse.Namespace) -> tuple[Cluster, CostEstimator, list[list[TableSpec]]]:
    """The cluster, the backend that costs plans (``--truth``: the sim with noise 0, or the
    CPU backend timing every device's load and the all-to-all), and the seeded tasks."""
    memory = parse_memory(args.memory)
    cluster = Cluster.uniform(args.devices, memory, args.batch_size)
    kwargs = {"profile": args.profile} if args.truth == "sim" else {}
    truth = as_estimator(get_backend(args.truth, batch_size=cluster.batch_size, **kwargs))
    tasks = sample_tasks(load_pool(args.split), args.tasks, seed=args.seed,
                         min_tables=args.min_tables, max_tables=args.max_tables,
                         max_total_bytes=default_max_total_bytes(args.devices, memory))
    return cluster, truth, tasks


def truth_name(args: argparse.Namespace) -> str:
    """How the bench's tables name the backend that costs plans."""
    return f"sim/{args.profile} (noise 0)" if args.truth == "sim" else "the cpu backend (measured)"


def p95(values: list[float]) -> float:
    s = sorted(values) or [math.nan]
    return s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]


def emit(text: str, out: Path | None, *, title: str | None = None,
         argv: list[str] | None = None) -> None:
    """Print a bench's Markdown and write it to ``out`` when given, headed by ``title``
    and the command that reproduces it (this script with ``argv``, default the process's
    own arguments)."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        script = Path(sys.argv[0]).name
        command = " ".join([f"bench/{script}", *(argv if argv is not None else sys.argv[1:])])
        head = f"# {title}\n\n" if title else ""
        out.write_text(f"{head}Command: `OMP_NUM_THREADS=1 .venv/bin/python {command}`\n\n"
                       f"{text}\n")

"""``neuroshard`` command line: parses, calls the library, prints. No logic of its own.

Exit codes: 0 success; 1 internal error (a bug: please report it); 2 bad input (a table
config, plan file, option or argument, an output that cannot be written, a folder another
run holds); 3 no plan fits the memory caps; 4 a model file is unreadable or does not match
the request, or its costs are not finite positive numbers; 5 a hardware backend cannot run
here; 6 the Ray cluster at --address cannot be reached or refuses this client (token, no
node here); 130 interrupted.

Every string a user gave (a path, a table name) is printed as text, never read as rich
markup; no output file may be one of the command's inputs.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from neuroshard.types import (
    DEFAULT_RESERVE_FRACTION,
    MAX_BATCH_SIZE,
    OPTIMIZERS,
    BackendError,
    Cluster,
    ModelFileError,
    ModelMismatchError,
    NeuroShardError,
    Plan,
    PlanCost,
    PlanInfeasibleError,
    RayClusterError,
    UsageError,
)
from neuroshard.units import parse_memory_list

EXIT_INTERNAL, EXIT_INPUT, EXIT_INFEASIBLE, EXIT_MODEL, EXIT_BACKEND = 1, 2, 3, 4, 5
EXIT_CLUSTER = 6


def _is(error: Exception, name: str) -> bool:
    """Whether ``error`` is click's ``name`` (typer vendors click privately; match by name)."""
    return any(c.__name__ == name for c in type(error).__mro__)


class _OneLineErrors(TyperGroup):
    """Usage errors as one line on stderr (exit 2) instead of click's usage block and panel."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.pop("standalone_mode", True):
            return super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[misc]
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[misc]
        except typer.Abort:
            err.print("aborted")
            sys.exit(EXIT_INTERNAL)
        except typer.TyperException as e:
            if _is(e, "NoArgsIsHelpError"):
                e.show()  # type: ignore[attr-defined]
                sys.exit(EXIT_INPUT)
            hint = " (see --help)" if _is(e, "UsageError") else ""
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            err.print(f"error: {message}{hint}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(EXIT_INPUT)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Embedding-table sharding with pre-trained neural cost models.",
)
out = Console()
err = Console(stderr=True)


def _exit_code(e: NeuroShardError) -> int:
    if isinstance(e, PlanInfeasibleError):
        return EXIT_INFEASIBLE
    if isinstance(e, (ModelFileError, ModelMismatchError)):
        return EXIT_MODEL
    if isinstance(e, BackendError):
        return EXIT_BACKEND
    if isinstance(e, RayClusterError):
        return EXIT_CLUSTER
    return EXIT_INPUT


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One line on stderr and a documented exit code instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NeuroShardError as e:
            _error_line(str(e))
            raise typer.Exit(_exit_code(e)) from None
        except typer.Exit:
            raise
        except OSError as e:  # the file system said no: a full disk, no permission
            from neuroshard.paths import os_error_message

            logging.getLogger("neuroshard").debug("file system error", exc_info=True)
            _error_line(f"cannot read or write {os_error_message(e)}")
            raise typer.Exit(EXIT_INPUT) from None
        except RecursionError:
            _error_line("input nested too deeply to read")
            raise typer.Exit(EXIT_INPUT) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:  # a bug, not bad input: still one line, with a way to see more
            logging.getLogger("neuroshard").debug("internal error", exc_info=True)
            err.print(
                f"internal error: {type(e).__name__}: {e} (rerun with NEUROSHARD_DEBUG=1 for "
                f"details)",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            if _debug():
                raise
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def _error_line(message: str) -> None:
    """``error: <message>`` on stderr: one line (a library's multi-line text joined), as
    plain text (never rich markup)."""
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    err.print(f"[red]error:[/red] {escape(line)}", markup=True, highlight=False, soft_wrap=True)


def _warn(message: str) -> None:
    err.print(
        f"[yellow]warning:[/yellow] {escape(message)}", markup=True, highlight=False, soft_wrap=True
    )


def _json(doc: Any, *, nulls_for_nan: bool = False) -> str:
    """``doc`` as JSON that never holds NaN or Infinity: a non-finite number is an error,
    or (``nulls_for_nan``, for undefined metrics) null."""
    if nulls_for_nan:
        doc = _finite_or_null(doc)
    return json.dumps(doc, allow_nan=False)


def _finite_or_null(value: Any) -> Any:
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _check_ranges(model: Any, result: Plan, strict: bool) -> None:
    """Warn (or, ``strict``, fail) when ``result`` lies outside ``model``'s training ranges."""
    lines = model.out_of_range(result) if hasattr(model, "out_of_range") else []
    if lines and strict:
        raise ModelMismatchError(
            f"{getattr(model, 'name', 'the model')}: " + "; ".join(lines) + " (--strict)"
        )
    from neuroshard.models.base import RANGE_NAMES

    for line in lines:
        hosts = line.startswith(RANGE_NAMES["devices_per_host"])
        hint = " (give --devices-per-host)" if hosts else ""
        _warn(f"{line}{hint}: its costs are extrapolated (--strict refuses this)")


def _debug() -> bool:
    import os

    return os.environ.get("NEUROSHARD_DEBUG", "") not in ("", "0")


def print_cost_table(plan: Plan, cost: PlanCost, title: str) -> None:
    table = Table(title=Text(title))
    for column in (
        "device",
        "compute ms",
        "fwd comm ms",
        "bwd comm ms",
        "total ms",
        "memory GiB",
        "cap GiB",
        "shards",
    ):
        table.add_column(column, justify="right")
    shards_per_device = [0] * plan.cluster.num_devices
    for s in plan.shards:
        shards_per_device[s.device] += 1
    worst = max(range(len(cost.devices)), key=lambda i: cost.devices[i].total_ms)
    for i, d in enumerate(cost.devices):
        style = "bold" if i == worst else None
        table.add_row(
            str(i),
            f"{d.compute_ms:.3f}",
            f"{d.fwd_comm_ms:.3f}",
            f"{d.bwd_comm_ms:.3f}",
            f"{d.total_ms:.3f}",
            f"{d.memory_bytes / (1 << 30):.2f}",
            f"{plan.cluster.memory_per_device_bytes[i] / (1 << 30):.2f}",
            str(shards_per_device[i]),
            style=style,
        )
    out.print(table)
    out.print(
        f"plan cost (max over devices): [bold]{cost.max_ms:.3f} ms[/bold] by {escape(cost.model)}"
    )


@app.command()
@handles_errors
def plan(
    tables: Path = typer.Argument(..., help="Table config: JSON, CSV or YAML."),
    devices: int = typer.Option(..., "--devices", "-n", min=1, max=4096, help="Number of devices."),
    memory: str = typer.Option(
        ...,
        "--memory",
        "-m",
        help="Memory cap per device, e.g. 4GB (GB = 2**30), or one per device: 4GB,4GB,2GB,2GB.",
    ),
    batch_size: int = typer.Option(
        65_536, "--batch-size", min=1, max=MAX_BATCH_SIZE, help="Global batch size."
    ),
    model: Path | None = typer.Option(
        None, "--model", help="Model directory (default: the shipped model)."
    ),
    cost_model: str | None = typer.Option(
        None,
        "--cost-model",
        help="neural or lightgbm: the shipped model of that kind (default neural), or the kind "
        "--model must be.",
    ),
    backend: str | None = typer.Option(
        None,
        "--backend",
        help="Hardware the plan is for (sim, cpu, cuda); the model must be trained on it. "
        "Default: the shipped sim models.",
    ),
    searcher: str = typer.Option(
        "neuroshard",
        "--searcher",
        help="neuroshard, greedy-grid, surco, torchrec, random, dim, size, lookup, size-lookup.",
    ),
    out_path: Path | None = typer.Option(None, "--out", "-o", help="Write the plan JSON here."),
    force: bool = typer.Option(
        False, "--force", help="Use a model even if its batch size, backend or kind does not match."
    ),
    seed: int = typer.Option(0, "--seed", min=0),
    as_json: bool = typer.Option(False, "--json", help="Print the plan JSON instead of a table."),
    torchrec_out: Path | None = typer.Option(
        None,
        "--torchrec-out",
        help="Also write a TorchRec ShardingPlan (torch.save); see --module-path, --model-factory.",
    ),
    module_path: str | None = typer.Option(
        None,
        "--module-path",
        help="With --torchrec-out: the path of the embedding module holding tables whose config "
        "names none (e.g. sparse_arch.embedding_bag_collection; default: the model itself).",
    ),
    model_factory: str | None = typer.Option(
        None,
        "--model-factory",
        help="With --torchrec-out: pkg.module:function returning your model; module paths are "
        "resolved against it.",
    ),
    time_budget: float | None = typer.Option(
        None, "--time-budget", help="Seconds the neuroshard or surco search may take."
    ),
    verify: str | None = typer.Option(
        None,
        "--verify",
        help="Price the search's --top cheapest plans on this backend (sim[:PROFILE], cpu or "
        "cuda) and keep the one it prices cheapest.",
    ),
    top: int | None = typer.Option(
        None, "--top", min=1, max=100, help="With --verify: how many candidates to measure (5)."
    ),
    margin: float | None = typer.Option(
        None,
        "--margin",
        help="neuroshard only: how much cheaper (a fraction) than the greedy grid's plan the "
        "model must price the search's plan to return it instead (default 0.03).",
    ),
    strict: bool = typer.Option(
        False,
        "--strict",
        help="Fail when the plan lies outside the model's training ranges (tables per device, "
        "rows, dims, pooling, devices, batch) instead of warning.",
    ),
    reserve: float = typer.Option(
        DEFAULT_RESERVE_FRACTION,
        "--reserve",
        min=0.0,
        max=0.99,
        help="Share of each device's memory kept for what is not embeddings (dense part, "
        "buffers); default 0.15, as TorchRec.",
    ),
    optimizer: str = typer.Option(
        "sgd",
        "--optimizer",
        help="sgd, rowwise_adagrad or adam: its state (none, a float per row, two per element) "
        "counts in each shard's memory.",
    ),
    io_buffers: bool = typer.Option(
        True,
        "--io-buffers/--no-io-buffers",
        help="Count each shard's input and output buffers in its HBM, as TorchRec does.",
    ),
    devices_per_host: int = typer.Option(
        0,
        "--devices-per-host",
        min=0,
        help="Devices per host (default: all on one host); shapes the collectives' cost.",
    ),
    host_memory: str | None = typer.Option(
        None,
        "--host-memory",
        help="Host memory (DDR) each device may use for fused_uvm_caching, e.g. 64GB, or one "
        "per device; default none.",
    ),
) -> None:
    """Plan TABLES on DEVICES devices.

    Example: neuroshard plan data/examples/tables.json --devices 4 --memory 4GB --out plan.json
    """
    from neuroshard.models import resolve_cost_model
    from neuroshard.paths import check_output
    from neuroshard.plan_io import plan_to_dict, write_plan
    from neuroshard.planner import Planner
    from neuroshard.tables import load_table_config

    outputs = [
        (o, name)
        for o, name in ((out_path, "--out"), (torchrec_out, "--torchrec-out"))
        if o is not None
    ]
    for o, name in outputs:
        check_output(o, [tables, *(other for other, _ in outputs if other is not o)], option=name)
    if (module_path is not None or model_factory) and not torchrec_out:
        raise UsageError("--module-path and --model-factory go with --torchrec-out")
    if module_path is not None and model_factory:
        raise UsageError("--module-path or --model-factory, not both (the model has the paths)")
    user_model = None
    if model_factory:
        from neuroshard.torchrec_adapter import model_from_factory

        user_model = model_from_factory(model_factory)
    specs, constraints = load_table_config(tables)  # tables' "constraints" too
    if torchrec_out and user_model is None:
        from neuroshard.torchrec_adapter import check_torchrec_names

        check_torchrec_names(specs, module_path or "")  # before any work, not after
    if user_model is not None:
        from neuroshard.torchrec_adapter import match_tables

        match_tables(specs, user_model)  # names a table or module path the model lacks
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if devices_per_host and devices % devices_per_host:
        raise UsageError(f"--devices-per-host {devices_per_host} must divide --devices {devices}")
    cluster = Cluster(
        devices,
        parse_memory_list(memory, devices),
        batch_size,
        devices_per_host,
        tuple(parse_memory_list(host_memory, devices)) if host_memory else (),
    )

    models: list[Any] = []

    def model_for(c: Cluster) -> Any:
        models.append(
            resolve_cost_model(
                model,
                kind=cost_model,
                backend=backend,
                batch_size=c.batch_size,
                num_devices=c.num_devices,
                force=force,
            )
        )
        return models[-1]

    if top is not None and verify is None:
        raise UsageError("--top goes with --verify")
    chosen: Any = searcher
    if margin is not None:
        if searcher != "neuroshard" or verify is not None:
            raise UsageError(
                "--margin goes with --searcher neuroshard without --verify (a verifier's "
                "measurements choose the plan)"
            )
        from neuroshard.search import get_searcher
        from neuroshard.search.beam import check_margin

        try:
            check_margin(margin)
        except ValueError as e:
            raise UsageError(f"--{e}") from None
        chosen = get_searcher(searcher, margin=margin)
    planner = Planner(
        model_for,
        chosen,
        budget_s=time_budget,
        seed=seed,
        constraints=constraints if constraints.tables or constraints.colocate else None,
        reserve=reserve,
        optimizer=optimizer,
        io_buffers=io_buffers,
        verify=None if verify is None else _verifier(verify, cluster.batch_size),
        top=top,
    )
    result = planner.plan(specs, cluster)
    cast(PlanCost, result.cost).check(result)
    if models:
        _check_ranges(models[-1], result, strict)
    if out_path:
        write_plan(result, out_path)
    if torchrec_out:
        from neuroshard.torchrec_adapter import save_sharding_plan

        save_sharding_plan(result, torchrec_out, module_path=module_path or "", model=user_model)
    if as_json:
        out.print_json(_json(plan_to_dict(result)))
        return
    print_cost_table(
        result,
        cast(PlanCost, result.cost),
        f"{len(specs)} tables on {devices} devices ({searcher}, "
        f"{result.meta.get('search_seconds', 0):.2f} s)",
    )
    if out_path:
        out.print(f"plan written to {out_path}", markup=False, highlight=False, soft_wrap=True)


def _verifier(spec: str, batch_size: int) -> Any:
    """The estimator ``--verify NAME[:PROFILE]`` names (a profile for the sim only)."""
    from neuroshard.backends import as_estimator, get_backend

    name, _, profile = spec.partition(":")
    kwargs: dict[str, Any] = {"batch_size": batch_size}
    if name == "sim":
        kwargs["profile"] = profile or "h100"
    elif profile:
        raise UsageError(f"--verify {spec}: only the sim backend takes a profile")
    return as_estimator(get_backend(name, **kwargs))


@app.command()
@handles_errors
def evaluate(
    plan_path: Path = typer.Argument(..., help="Plan JSON (neuroshard.plan/v2 or v1)."),
    backend: str = typer.Option("sim", "--backend", help="sim, cpu or cuda."),
    profile: str = typer.Option(
        "h100", "--profile", help="Profile of the sim backend: v100, a100, h100, h200."
    ),
    model: Path | None = typer.Option(
        None, "--model", help="Score with this model instead of a backend."
    ),
    as_json: bool = typer.Option(False, "--json"),
    strict: bool = typer.Option(
        False,
        "--strict",
        help="With --model: fail when the plan lies outside the model's training ranges instead "
        "of warning.",
    ),
) -> None:
    """The plan's cost on a backend (or under a model), per device.

    Example: neuroshard evaluate plan.json --backend sim --profile h100
    """
    from neuroshard.backends import as_estimator, get_backend
    from neuroshard.models import load_cost_model
    from neuroshard.plan_io import cost_to_dict, read_plan
    from neuroshard.planner import evaluate_plan

    result = read_plan(plan_path)
    if model is not None:
        estimator = load_cost_model(model, batch_size=result.cluster.batch_size)
    else:
        kwargs: dict[str, Any] = {"batch_size": result.cluster.batch_size}
        if backend == "sim":
            kwargs["profile"] = profile
        estimator = as_estimator(get_backend(backend, **kwargs))
    cost = evaluate_plan(result, estimator).check(result)
    if model is not None:
        _check_ranges(estimator, result, strict)
    if as_json:
        out.print_json(_json(cost_to_dict(cost)))
        return
    print_cost_table(result, cost, f"{plan_path} on {estimator.name}")


@app.command()
@handles_errors
def pretrain(
    out_dir: Path = typer.Option(..., "--out", help="Output directory (data/ and model/ inside)."),
    backend: str = typer.Option("sim", "--backend", help="sim, cpu or cuda."),
    profile: str = typer.Option("h100", "--profile", help="Profile of the sim backend."),
    noise: float = typer.Option(
        0.03, "--noise", min=0.0, max=1.0, help="Sim noise (lognormal sigma)."
    ),
    devices: int = typer.Option(
        4, "--devices", min=2, max=4096, help="Device count of the comm samples."
    ),
    compute_samples: int = typer.Option(20_000, "--compute-samples", min=10),
    comm_samples: int = typer.Option(8_000, "--comm-samples", min=10),
    batch_size: int = typer.Option(65_536, "--batch-size", min=1, max=MAX_BATCH_SIZE),
    seed: int = typer.Option(0, "--seed", min=0),
    cost_model: str = typer.Option("neural", "--cost-model", help="neural or lightgbm."),
    workers: int = typer.Option(
        0, "--workers", min=0, help="Collect and train on this many Ray workers (0: in process)."
    ),
    address: str | None = typer.Option(
        None,
        "--address",
        help="An existing Ray cluster's head, HOST:PORT (see the README's Ray cluster section).",
    ),
    storage: str | None = typer.Option(
        None,
        "--storage",
        help="Ray Train checkpoints: a path every node reaches, or a URI like s3://bucket/prefix "
        "(default: OUT/train).",
    ),
    rounds: int = typer.Option(
        1,
        "--rounds",
        min=1,
        help="Interleave training, held-out and retest samples over this many rounds (real "
        "hardware drifts).",
    ),
    compute_members: int = typer.Option(
        1, "--compute-members", min=1, help="Neural: average this many compute nets (an ensemble)."
    ),
    plan_rounds: int = typer.Option(
        0,
        "--plan-rounds",
        min=0,
        help="Then this many rounds of plan-shaped samples: plan training tasks with the model, "
        "measure the plans' device loads, train again on all samples.",
    ),
    plan_tasks: int = typer.Option(40, "--plan-tasks", min=1, help="Tasks per plan round."),
) -> None:
    """Augment the table pool, measure samples on a backend, train the cost models.

    Example: neuroshard pretrain --backend sim --profile h100 --devices 4 --out runs/h100-d4
    """
    from neuroshard.pretrain.pipeline import PretrainConfig, backend_spec
    from neuroshard.pretrain.pipeline import pretrain as run_pretrain
    from neuroshard.search import plan_shaped_searchers

    if compute_members > 1 and cost_model != "neural":
        raise UsageError("--compute-members applies to --cost-model neural only")
    config = PretrainConfig(
        out_dir,
        backend=backend_spec(backend, batch_size, profile=profile, noise=noise, seed=seed),
        num_devices=devices,
        compute_samples=compute_samples,
        comm_samples=comm_samples,
        seed=seed,
        cost_model=cost_model,
        workers=workers,
        address=address,
        storage=storage,
        rounds=rounds,
        model_kwargs={"compute_members": compute_members} if compute_members > 1 else None,
        plan_rounds=plan_rounds,
        plan_tasks=plan_tasks,
        plan_searchers=plan_shaped_searchers() if plan_rounds else (),
    )
    model_dir = run_pretrain(config)
    out.print(f"model written to {model_dir}", markup=False, highlight=False, soft_wrap=True)


@app.command()
@handles_errors
def collect(
    out_dir: Path = typer.Option(
        ..., "--out", help="Output directory of Parquet parts (resumable)."
    ),
    backend: str = typer.Option("sim", "--backend", help="sim, cpu or cuda."),
    kind: str = typer.Option("compute", "--kind", help="compute or comm."),
    samples: int = typer.Option(1000, "--samples", min=1),
    devices: int = typer.Option(
        4, "--devices", min=2, max=4096, help="Device count of comm samples."
    ),
    batch_size: int = typer.Option(65_536, "--batch-size", min=1, max=MAX_BATCH_SIZE),
    profile: str = typer.Option("h100", "--profile", help="Profile of the sim backend."),
    workers: int = typer.Option(0, "--workers", min=0, help="Ray workers (0: in this process)."),
    address: str | None = typer.Option(
        None,
        "--address",
        help="An existing Ray cluster's head, HOST:PORT (see the README's Ray cluster section).",
    ),
    seed: int = typer.Option(0, "--seed", min=0),
) -> None:
    """Measure pretraining samples on a backend into Parquet; rerun to resume.

    Example: neuroshard collect --backend cpu --kind compute --samples 2000 --workers 2
    --out runs/cpu
    """
    from neuroshard.pretrain.pipeline import PretrainConfig, backend_spec, collect_samples

    config = PretrainConfig(
        out_dir,
        backend=backend_spec(backend, batch_size, profile=profile),
        num_devices=devices,
        compute_samples=samples,
        comm_samples=samples,
        seed=seed,
        workers=workers,
        address=address,
        chunk_size=64,
    )
    result = collect_samples(config, kind)
    out.print(
        f"{result.measured} measured, {result.skipped} already on disk, {result.failed} failed "
        f"of {result.total} {kind} samples in {escape(str(result.out_dir))}"
    )


@app.command()
@handles_errors
def report(
    plans: list[Path] = typer.Argument(..., help="One or two plan JSON files."),
    out_path: Path = typer.Option(..., "--out", "-o", help="report.png or report.html"),
    backend: str | None = typer.Option(
        None, "--backend", help="Re-score every plan on this backend (default: stored costs)."
    ),
) -> None:
    """Per-device stacked costs and memory against the cap, two plans side by side.

    Example: neuroshard report neuroshard.json torchrec.json --out report.png
    """
    from neuroshard.report import report_from_files

    written = report_from_files(plans, out_path, backend=backend)
    out.print(f"report written to {written}", markup=False, highlight=False, soft_wrap=True)


@app.command()
@handles_errors
def convert(
    plan_path: Path = typer.Argument(..., help="Plan JSON (neuroshard.plan/v2 or v1)."),
    to: str = typer.Option("torchrec", "--to", help="Target format: torchrec."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Where to write (plan.pt)."),
    module_path: str = typer.Option(
        "",
        "--module-path",
        help="Fully qualified path of the EmbeddingBagCollection in your model.",
    ),
    device_type: str = typer.Option("cpu", "--device-type", help="cpu or cuda placements."),
) -> None:
    """Convert a plan to a TorchRec ShardingPlan (load with torch.load(weights_only=False)).

    Example: neuroshard convert plan.json --to torchrec --out plan.pt --module-path sparse.ebc
    """
    from neuroshard.plan_io import read_plan
    from neuroshard.torchrec_adapter import save_sharding_plan

    if to != "torchrec":
        raise UsageError(f"--to: unknown format {to!r}; valid: torchrec")
    if device_type not in ("cpu", "cuda"):
        raise UsageError(f"--device-type: {device_type!r} is not cpu or cuda")
    from neuroshard.paths import check_output

    check_output(out_path, [plan_path])
    save_sharding_plan(
        read_plan(plan_path), out_path, module_path=module_path, device_type=device_type
    )
    out.print(
        f"TorchRec ShardingPlan written to {out_path}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@handles_errors
def profile(
    input_path: Path = typer.Argument(
        ...,
        help="Lookups: a saved KeyedJaggedTensor, a dict of "
        "indices/offsets tensors, or a Parquet of (table, sample, id).",
    ),
    out_path: Path | None = typer.Option(
        None, "--out", "-o", help="Write the table config JSON here."
    ),
    dim: int = typer.Option(
        128, "--dim", min=4, help="Embedding dim for every table (not in lookup data)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, help="Cut samples into batches of this size for the histogram."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the table config JSON."),
) -> None:
    """Measure rows, pooling factor and reuse histogram of each table from real lookups.

    Example: neuroshard profile lookups.parquet --dim 64 --out tables.json
    """
    from neuroshard.paths import check_output
    from neuroshard.profile import profile_tables
    from neuroshard.tables import save_tables

    if dim % 4:
        raise UsageError(f"--dim must be a multiple of 4, got {dim}")
    if out_path:
        check_output(out_path, [input_path])
    specs = profile_tables(input_path, batch_size, dims=dim)
    if out_path:
        save_tables(specs, out_path)
    if as_json:
        out.print_json(_json([t.to_record() for t in specs]))
        return
    table = Table(title=Text(f"{len(specs)} tables from {input_path}"))
    for column in ("table", "rows", "dim", "pooling factor", "accessed once"):
        table.add_column(column, justify="right")
    for t in specs:
        table.add_row(
            Text(t.name),
            str(t.rows),
            str(t.dim),
            f"{t.pooling_factor:.2f}",
            f"{t.reuse_hist[0]:.3f}",
        )
    out.print(table)
    if out_path:
        out.print(
            f"table config written to {out_path}", markup=False, highlight=False, soft_wrap=True
        )


@app.command("model-report")
@handles_errors
def model_report(
    model_dir: Path = typer.Argument(..., help="Model directory (meta.json inside)."),
    data: list[Path] | None = typer.Option(
        None,
        "--data",
        help="Also score on this pretrain run's data/ (its held-out loads, beside its floor); "
        "repeatable.",
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A model's provenance and its error on held-out data next to the noise floor.

    MSE is of log(ms); "floor" is the noise floor, the MAPE a model that knew every
    sample's true cost would score against a second measurement of the same samples, and
    "/floor" the model's MAPE over it. Breakdowns by tables per load, load size, device
    count and dim sum follow. With --data, the model is also scored on the held-out loads
    of other pretrain runs (another session on the same hardware), each beside its own floor.

    Example: neuroshard model-report data/models/cpu-b4096-d4 --data data/datasets/cpu_b4096_r10
    """
    from neuroshard.models import META_FILE, load_model
    from neuroshard.models.base import RANGE_NAMES
    from neuroshard.models.metrics import report_header, report_summary, report_tables
    from neuroshard.pretrain.fidelity import model_report as read_report

    model = load_model(model_dir)  # weights and checksums checked, as plan does
    meta, sessions = read_report(model_dir, data or [])
    ranges = getattr(model, "training_ranges_", None)
    try:
        if as_json:
            summary = report_summary(meta, sessions)
            if ranges is not None:
                summary["training_ranges"] = {k: ranges.get(k) for k in RANGE_NAMES}
            out.print_json(_json(summary, nulls_for_nan=True))
            return
        header = report_header(meta)
        tables = report_tables(meta, sessions)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ModelFileError(
            f"{Path(model_dir) / META_FILE}: entry 'metrics' is malformed ({type(e).__name__}: {e})"
        ) from None
    out.print(header, markup=False, highlight=False)
    if ranges is not None:
        out.print(
            "training ranges: "
            + "; ".join(
                f"{label} "
                + (f"{ranges[k][0]:g} to {ranges[k][1]:g}" if k in ranges else "unknown")
                for k, label in RANGE_NAMES.items()
            ),
            markup=False,
            highlight=False,
        )
    for text_table in tables:
        table = Table(title=Text(text_table.title))
        for column in text_table.columns:
            table.add_column(Text(column), justify="right")
        for row in text_table.rows:
            table.add_row(*(Text(str(cell)) for cell in row))
        out.print(table)


def main() -> None:
    logging.basicConfig(
        level=logging.DEBUG if _debug() else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        app()
    except SystemExit as e:
        sys.exit(e.code)


if __name__ == "__main__":
    main()

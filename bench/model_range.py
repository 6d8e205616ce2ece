"""How well a cost model prices plans and loads across scales, batches and table families.

    OMP_NUM_THREADS=1 .venv/bin/python bench/model_range.py --model data/models/sim-h100 \
        --out bench/results/model_range.md

Two parts, truth = the sim backend (``--profile``, noise 0 for plans):

* **Plan cost.** For each size ``n x d`` (``--sizes``; hosts of ``--per-host`` devices)
  and batch (``--batches``), ``--tasks`` tasks of ``n`` tables from the test half of the
  pool (drawn with replacement and renamed beyond its size; memory per device = total
  bytes / devices / ``--fill``) are planned by ``--searcher`` with the model, and the
  final plan is priced by the model (what the search believed) and by the sim bound to
  the same cluster and batch. The table gives the mean absolute relative error
  ``|model - sim| / sim`` of the plan cost (max over devices) over the tasks, and of its
  per-device compute and comm terms on the costliest device.
* **Compute MAPE vs the noise floor.** Loads are timed by the sim with noise ``--noise``
  (the labels a model is trained and tested on) and without (the truth); the noise floor
  is the MAPE of the truth against the labels, the best any model can score. Sets: single
  tables, loads of 1-15 shards at batch 65,536 (the old protocol) and range loads (1 to
  400 shards, any batch in 512-262,144), from the test half of the pool and from the
  ``heldout`` generated family (:mod:`neuroshard.pretrain.generate`, never trained on),
  and with ``--fresh-families`` from newly drawn tables of trained families (another
  seed than training's: families the model knows, tables it never saw).
  The last column is the first model's mean signed error against the truth (a bias: is
  a set priced high or low as a whole). ``--compare`` adds other models (one batch size:
  only the batch-65,536 sets), and comm MAPE on 4- and 8-device one-host tasks at batch
  65,536; ``--compare-rev REV`` reads the ``--compare`` directories as commit ``REV`` of
  this repository holds them (a model shipped before).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from neuroshard.backends.sim import SimBackend
from neuroshard.models import load_cost_model
from neuroshard.planner import Planner
from neuroshard.pretrain import generate as gen
from neuroshard.pretrain.augment import augment_tables, sample_comm_tasks, sample_compute_loads
from neuroshard.pretrain.pool import load_pool
from neuroshard.search.scoring import plan_cost
from neuroshard.types import Cluster, PlanInfeasibleError

from _common import emit, extract_revision
from search_speed import make_task, parse_sizes


def _mape(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - true) / np.maximum(true, 1e-3)))


def plan_rows(model, args: argparse.Namespace) -> list[str]:
    pool = load_pool("test")
    rows = [
        "| tables x devices | hosts | batch | tasks | plan cost MARE | compute MARE "
        "(costliest device) | comm MARE (costliest device) | mean sim ms | plan s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, d in parse_sizes(args.sizes):
        for batch in args.batches:
            errs, comp, comm, sims, secs = [], [], [], [], []
            skipped = 0
            for k in range(args.tasks):
                rng = np.random.default_rng([args.seed, n, d, k])
                tables, c = make_task(pool, n, d, rng, fill=args.fill)
                cluster = Cluster.uniform(
                    d, c.memory_per_device_bytes[0], batch, devices_per_host=min(args.per_host, d)
                )
                start = time.perf_counter()
                # bound here: the greedy grid's scorer does not bind the estimator itself
                try:
                    plan = Planner(model.for_cluster(cluster), args.searcher).plan(tables, cluster)
                except PlanInfeasibleError:
                    skipped += 1
                    continue
                secs.append(time.perf_counter() - start)
                truth = plan_cost(plan, SimBackend(args.profile, batch_size=batch))
                pred = plan.cost
                errs.append(abs(pred.max_ms - truth.max_ms) / truth.max_ms)
                worst = int(np.argmax([x.total_ms for x in truth.devices]))
                t, p = truth.devices[worst], pred.devices[worst]
                comp.append(abs(p.compute_ms - t.compute_ms) / max(t.compute_ms, 1e-6))
                tc, pc = t.fwd_comm_ms + t.bwd_comm_ms, p.fwd_comm_ms + p.bwd_comm_ms
                comm.append(abs(pc - tc) / max(tc, 1e-6))
                sims.append(truth.max_ms)
            if not errs:
                rows.append(f"| {n} x {d} | | {batch} | 0 ({skipped} infeasible) | | | | | |")
                continue
            rows.append(
                f"| {n} x {d} | {max(d // args.per_host, 1)} | {batch} | {len(errs)} | "
                f"{np.mean(errs):.1%} | {np.mean(comp):.1%} | {np.mean(comm):.1%} | "
                f"{np.mean(sims):.2f} | {np.mean(secs):.1f} |"
            )
    return rows


FRESH_SEED = 1000  # fresh tables of trained families: training draws them at its own seed (0)


def at_revision(rev: str, path: Path, dest: Path, p: argparse.ArgumentParser) -> Path:
    """``path`` (relative to the repository) as commit ``rev`` holds it, under ``dest``."""
    try:
        return extract_revision(rev, dest / rev, path) / path
    except ValueError as e:
        p.error(f"--compare-rev {rev}: no {path} there ({e})")


def compute_sets(args: argparse.Namespace) -> dict[str, tuple[list, np.ndarray]]:
    rng = np.random.default_rng(args.seed + 7)
    sources = [
        ("test pool", augment_tables(load_pool("test"))),
        (
            "held-out family",
            augment_tables(gen.generate_tables(args.heldout_tables, args.seed, "heldout")),
        ),
    ]
    for family in args.fresh_families:
        tables = gen.generate_tables(args.heldout_tables, args.seed + FRESH_SEED, family)
        sources.append((f"fresh {family} tables", augment_tables(tables)))
    n = args.samples
    out = {}
    for name, tables in sources:
        fits = [t for t in tables if t.size_bytes <= 4 << 30]
        singles = [[fits[i]] for i in rng.integers(len(fits), size=n)]
        out[f"{name}: single tables, batch 65536"] = (singles, np.full(n, 65536))
        loads = [list(s.tables) for s in sample_compute_loads(tables, n, rng)]
        out[f"{name}: 1-15 shards, batch 65536"] = (loads, np.full(n, 65536))
        loads, batches = gen.sample_range_loads([tables], n, rng)
        out[f"{name}: 1-400 shards, batch 512-262144"] = (loads, batches)
    return out


def mape_rows(models: dict, args: argparse.Namespace) -> list[str]:
    names = list(models)
    rows = [
        "| set | loads | noise floor | "
        + " | ".join(f"{m} MAPE (x floor)" for m in names)
        + f" | {names[0]} mean signed error (noise-free sim) |",
        "|---|---|---|" + "---|" * (len(names) + 1),
    ]
    for label, (loads, batches) in compute_sets(args).items():
        labels = gen.label_compute(
            loads, batches, profile=args.profile, noise=args.noise, seed=args.seed + 1
        ).label_ms
        truth = gen.label_compute(loads, batches, profile=args.profile).label_ms
        floor = _mape(truth, labels)
        cells = []
        bias = "n/a"
        for m in names:
            model = models[m]
            if not getattr(model, "range_inputs", False) and np.any(batches != 65536):
                cells.append("n/a (one batch)")
                continue
            pred = np.empty(len(loads))
            for b in np.unique(batches):
                idx = np.flatnonzero(batches == b)
                bound = model.for_batch(int(b)) if hasattr(model, "for_batch") else model
                pred[idx] = bound.compute_ms([loads[i] for i in idx])
            err = _mape(pred, labels)
            cells.append(f"{err:.2%} ({err / floor:.2f}x)")
            if m == names[0]:
                bias = f"{np.mean((pred - truth) / np.maximum(truth, 1e-3)):+.2%}"
        rows.append(
            f"| {label} | {len(loads)} | {floor:.2%} | " + " | ".join(cells) + f" | {bias} |"
        )
    return rows


def comm_rows(models: dict, args: argparse.Namespace) -> list[str]:
    names = list(models)
    rows = [
        "| comm set (batch 65536, one host) | samples | "
        + " | ".join(f"{m} bwd / fwd MAPE" for m in names)
        + " |",
        "|---|---|" + "---|" * len(names),
    ]
    tables = augment_tables(load_pool("test"))
    for devices in (4, 8):
        rng = np.random.default_rng([args.seed, devices])
        samples = sample_comm_tasks(tables, args.samples, rng, devices)
        d = np.array([s.dim_sums for s in samples], dtype=float)
        w = np.array([s.waits_ms for s in samples], dtype=float)
        sim = SimBackend(args.profile, 65536, noise=args.noise, seed=args.seed).for_cluster(
            Cluster.uniform(devices, 1 << 34)
        )
        bwd, fwd = sim.bwd_comm_ms(d), sim.fwd_comm_ms(d, w)
        cells = []
        for m in names:
            model = models[m]
            if hasattr(model, "for_cluster"):
                model = model.for_cluster(Cluster.uniform(devices, 1 << 34))
            cells.append(
                f"{_mape(model.bwd_comm_ms(d), bwd):.2%} / "
                f"{_mape(model.fwd_comm_ms(d, w), fwd):.2%}"
            )
        rows.append(f"| {devices} devices | {len(samples)} | " + " | ".join(cells) + " |")
    return rows


def spread_rows(model, args: argparse.Namespace) -> list[str]:
    """Does the members' spread flag the loads the model gets wrong? Test-pool loads of
    1-400 shards at any batch, against the noise-free sim, priced with k = 0."""
    rng = np.random.default_rng(args.seed + 11)
    tables = augment_tables(load_pool("test"))
    loads, batches = gen.sample_range_loads([tables], args.samples, rng)
    truth = gen.label_compute(loads, batches, profile=args.profile).label_ms
    plain = model.with_conservative(0.0)
    pred, spread = np.empty(len(loads)), np.empty(len(loads))
    for b in np.unique(batches):
        idx = np.flatnonzero(batches == b)
        bound = plain.for_batch(int(b))
        pred[idx] = bound.compute_ms([loads[i] for i in idx])
        spread[idx] = bound.compute_spread([loads[i] for i in idx])
    err = np.abs(np.log((pred + 1e-3) / (truth + 1e-3)))
    shards = np.array([len(load) for load in loads])
    rows = [
        "| shards per load | loads | MAPE (k = 0) | mean signed error | mean spread (log) |",
        "|---|---|---|---|---|",
    ]
    for lo, hi in ((1, 2), (2, 16), (16, 50), (50, 150), (150, 401)):
        sel = (shards >= lo) & (shards < hi)
        if sel.any():
            rel = pred[sel] / truth[sel] - 1
            rows.append(
                f"| {lo}-{hi - 1} | {sel.sum()} | {np.abs(rel).mean():.2%} | "
                f"{rel.mean():+.2%} | {spread[sel].mean():.3f} |"
            )
    corr = float(np.corrcoef(spread, err)[0, 1])
    rows += [
        "",
        f"Correlation of spread and absolute log error over the {len(loads)} loads: {corr:.2f}.",
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument(
        "--compare",
        type=Path,
        nargs="*",
        default=[],
        help="other model directories for the MAPE tables",
    )
    p.add_argument(
        "--compare-rev",
        default=None,
        help="read the --compare model directories as this commit holds them",
    )
    p.add_argument(
        "--fresh-families",
        default="",
        help="comma-separated trained families (zipf, mixture, piecewise) whose newly drawn "
        f"tables (seed + {FRESH_SEED}) add rows to the MAPE table",
    )
    p.add_argument("--sizes", default="60x16,250x32,1000x128")
    p.add_argument("--batches", type=int, nargs="+", default=[512, 4096, 65536])
    p.add_argument("--per-host", type=int, default=8)
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument(
        "--fill",
        type=float,
        default=0.4,
        help="total table bytes / total HBM (the planner keeps a reserve too)",
    )
    p.add_argument("--searcher", default="greedy-grid")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--heldout-tables", type=int, default=400)
    p.add_argument("--noise", type=float, default=0.03)
    p.add_argument("--profile", default="h100")
    p.add_argument(
        "--conservative-k",
        type=float,
        default=None,
        help="price with this k instead of the models' own (meta.json), --compare's too "
        "where they have members (a one-net model has no spread to add)",
    )
    p.add_argument("--skip-plans", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.fresh_families = [f.strip() for f in args.fresh_families.split(",") if f.strip()]
    for family in args.fresh_families:
        if family not in gen.FAMILIES or family == "heldout":
            trained = ", ".join(f for f in gen.FAMILIES if f != "heldout")
            p.error(f"--fresh-families {family}: the trained families are {trained}")
    if args.compare_rev is not None and not args.compare:
        p.error("--compare-rev reads the --compare directories: give --compare")

    model = load_cost_model(args.model)
    if args.conservative_k is not None:
        model = model.with_conservative(args.conservative_k)
    models = {args.model.name: model}
    with tempfile.TemporaryDirectory() as tmp:
        for extra in args.compare:
            name, where = extra.name, extra
            if args.compare_rev is not None:
                name, where = (
                    f"{name}@{args.compare_rev}",
                    at_revision(args.compare_rev, extra, Path(tmp), p),
                )
            other = load_cost_model(where)
            if args.conservative_k is not None and hasattr(other, "with_conservative"):
                other = other.with_conservative(args.conservative_k)
            models[name] = other
    k = getattr(model, "conservative_k", 0.0)
    parts = [
        f"Model `{args.model}` ({model.name}), conservative k = {k:g}; truth: "
        f"sim/{args.profile}. Searcher for plans: {args.searcher}.",
        "",
    ]
    if not args.skip_plans:
        parts += [
            "## Plan cost: model vs sim (mean absolute relative error over tasks)",
            "",
            *plan_rows(model, args),
            "",
        ]
    parts += [
        f"## Compute MAPE against labels with noise {args.noise} (floor = the truth's "
        "MAPE against them)",
        "",
        *mape_rows(models, args),
        "",
        "## Comm MAPE (labels with the same noise)",
        "",
        *comm_rows(models, args),
    ]
    if getattr(model, "compute_members", 1) > 1:
        parts += [
            "",
            "## Uncertainty: the compute members' spread against the error (test pool, "
            "1-400 shards, any batch, noise-free sim)",
            "",
            *spread_rows(model, args),
        ]
    emit("\n".join(parts), args.out, title="Cost model range: scales, batches, table families")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

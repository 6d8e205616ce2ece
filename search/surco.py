"""SurCo-style search: fit a linear surrogate of the plan cost, solve it as a MILP, repeat.

After Ferber et al., "SurCo: Learning Linear Surrogates for Combinatorial Nonlinear
Optimization Problems" (ICML 2023): a nonlinear cost (here the estimator's plan cost) is
replaced by a linear surrogate that an off-the-shelf MILP solver optimises under the
hard constraints (each shard on one device, memory caps), and the surrogate is improved
from the solver's answers. Placement is table-wise over given column shards (default: no
splits), as in :func:`~neuroshard.search.greedy.greedy_grid`.

**Surrogate.** Around a placement ``a`` (device of each shard) with loads ``L_d``:

* compute -- ``c[s, d]`` is the change in device ``d``'s predicted compute when shard ``s``
  is added to ``L_d`` (``s`` not on ``d``) or removed from it (``s`` on ``d``), by finite
  differences; all ``S x D`` changed loads plus the ``D`` current ones go to the estimator
  in one ``compute_ms`` call. A per-device intercept makes the surrogate exact at ``a``:
  ``compute_d(x) ~ k_d + sum_s c[s, d] x[s, d]``.
* comm -- with table-wise placement the total width ``T`` is fixed, so each device's
  all-to-all is (nearly) a function of its own dim sum ``W_d``. The backward comm and the
  forward comm without waits are sampled at a grid of ``W_d`` in ``[0, T]`` (the other
  devices share ``T - W_d`` in proportion to their current dim sums; two estimator calls
  for all devices) and replaced by the lower convex envelope of the samples: exact where
  the estimator is convex in ``W_d`` (the sim backend's ``max(send, recv)`` is), an
  under-estimate elsewhere.
* plan cost -- the estimator contract makes the forward all-to-all include the straggler
  wait ``max_j w_j - w_d`` with ``w = compute + bwd comm`` (up to a shift), so a device's
  total is ``fwd_base_d + max_j (compute_j + bwd_j)`` and the plan cost is
  ``max_d (compute_d + bwd_d) + max_d fwd_base_d``. The surrogate keeps that structure
  with two epigraph variables.

**MILP** (HiGHS through :func:`scipy.optimize.milp`, under a time limit)::

    min  z_c + z_f
    s.t. z_c >= k_d + sum_s c[s,d] x[s,d] + b_d          every device d
         b_d >= slope * W_d + intercept                   every bwd envelope line of d
         z_f >= slope * W_d + intercept                   every fwd envelope line of d
         W_d  = sum_s width_s x[s,d]
         sum_d x[s,d] = 1                                 every shard s
         sum_s bytes_s x[s,d] <= cap_d                    every device d
         z_c >= sum_d x[s,d] L[s,d]                       every shard s (valid cuts)
         z_f >= sum_d x[s,d] F[s,d]                       every shard s
         sum_s x[s, a_s] >= S - radius                    trust region (after a failure)
         x binary

where ``L[s, d]`` is the least device ``d``'s compute + backward comm can be with ``s`` on
it (``k_d + c[s, d]``, the negative ``c`` of other shards, the envelope's minimum over dim
sums of at least ``width_s``) and ``F[s, d]`` the same for the forward comm. The cuts
change no integer solution but lift the LP relaxation (and the solver's bound) above the
cost of the costliest shard wherever it goes.

Its LP relaxation (same model, ``integrality=0``) gives a lower bound *under the
surrogate* -- not on the real cost. Each solution is priced by the real estimator
(:func:`~neuroshard.search.scoring.plan_cost`); the best plan so far (the greedy grid
plan to start with) is the incumbent, the surrogate is re-fitted around it each round,
and a round that does not improve halves the trust radius (how many shards may move).
The search stops early when the solver returns the incumbent or proves that nothing beats
it under the surrogate, or when the time budget is spent.

**Variants.** ``"zero"`` fits ``c`` by finite differences each round (``S x D`` estimator
loads per round). ``"prior"`` predicts ``c[s, d]`` from shard features and device context
with a small network (:class:`~neuroshard.models.surrogate.SurrogatePrior`, trained by
:func:`fit_surrogate_prior` on the ``c`` the zero variant fitted on training-pool tasks and
saved as a model directory), so a round costs ``D``
estimator loads (for the intercepts) plus ``S`` single-shard loads once: worth it when
the estimator is a slow hardware backend. Without a ``prior_path`` the prior variant
uses each shard's single-shard compute as ``c[s, d]`` (no fitting at all).

``plan.meta["surco"]`` records, per round, the surrogate objective, solver status
(``optimal`` / ``time_limit`` / ...), MIP gap, the solver's dual bound, the LP lower
bound under the surrogate, the real cost of the solution and the trust radius.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from neuroshard.feasibility import infeasibility
from neuroshard.features import table_features
from neuroshard.models import load_model
from neuroshard.models.surrogate import KIND as PRIOR_KIND
from neuroshard.models.surrogate import SurrogatePrior, pair_features
from neuroshard.search.greedy import place, shard_specs, to_plan
from neuroshard.search.scoring import plan_cost
from neuroshard.types import (
    Cluster,
    CostEstimator,
    Plan,
    PlanInfeasibleError,
    TableSpec,
    embedding_bytes,
    io_buffer_bytes,
)

logger = logging.getLogger(__name__)

VARIANTS = ("zero", "prior")
COMM_GRID_POINTS = 9  # dim-sum samples per device for the comm envelopes
DEFAULT_BUDGET_S = 10.0  # solver seconds when the planner gives no budget
MIN_SOLVE_S = 0.2  # the least time limit a round's solve is given (s)
_GIB = float(1 << 30)

# SolverStatus of scipy.optimize.milp -> the words plan.meta records
_STATUS = {0: "optimal", 1: "time_limit", 2: "infeasible", 3: "unbounded", 4: "other"}

# Per device, the lines (K, 2) of (slope in ms per column, intercept in ms) of a convex
# piecewise-linear envelope in the device's dim sum.
Lines = tuple[np.ndarray, ...]


# --------------------------------------------------------------------------- surrogate


@dataclass(frozen=True)
class Surrogate:
    """A linear-plus-envelope model of the plan cost around one placement (all in ms)."""

    compute_ms: np.ndarray  # (S, D): c[s, d]
    intercept_ms: np.ndarray  # (D,): k_d
    bwd_lines: Lines  # backward comm
    fwd_lines: Lines  # forward comm without waits

    def value(self, devices: np.ndarray, widths: np.ndarray) -> float:
        """The surrogate plan cost (ms) of placing shard ``s`` on ``devices[s]``."""
        num_devices = len(self.intercept_ms)
        rows = np.arange(len(devices))
        compute = self.intercept_ms + np.bincount(
            devices, weights=self.compute_ms[rows, devices], minlength=num_devices
        )
        dims = np.bincount(devices, weights=widths, minlength=num_devices)
        bwd = [_envelope(lines, w) for lines, w in zip(self.bwd_lines, dims, strict=True)]
        fwd = [_envelope(lines, w) for lines, w in zip(self.fwd_lines, dims, strict=True)]
        return float(np.max(compute + bwd) + np.max(fwd))


def _envelope(lines: np.ndarray, x: float) -> float:
    return float(np.max(lines[:, 0] * x + lines[:, 1]))


def _envelope_min(lines: np.ndarray, lo: float, hi: float) -> float:
    """Minimum over ``[lo, hi]`` of the convex envelope ``max(lines)``: at an end or where
    two lines cross."""
    points = [lo, hi]
    for (m1, b1), (m2, b2) in itertools.combinations(lines.tolist(), 2):
        if m1 != m2:
            x = (b2 - b1) / (m1 - m2)
            if lo < x < hi:
                points.append(x)
    return min(_envelope(lines, x) for x in points)


def _lower_hull_lines(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Lines ``(slope, intercept)`` of the lower convex envelope of the points ``(xs, ys)``
    (``xs`` sorted, distinct); one flat line when there is a single point."""
    if len(xs) == 1:
        return np.array([[0.0, float(ys[0])]])
    hull: list[int] = []
    for i in range(len(xs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the chord a -> i
            lhs = (ys[b] - ys[a]) * (xs[i] - xs[a])
            rhs = (ys[i] - ys[a]) * (xs[b] - xs[a])
            if lhs >= rhs - 1e-12 * (abs(lhs) + abs(rhs)):  # collinear counts as above
                hull.pop()
            else:
                break
        hull.append(i)
    lines = []
    for a, b in itertools.pairwise(hull):
        slope = (ys[b] - ys[a]) / (xs[b] - xs[a])
        lines.append((slope, ys[a] - slope * xs[a]))
    return np.asarray(lines, dtype=float)


def _loads(specs: Sequence[TableSpec], devices: np.ndarray, num_devices: int) -> list[list[int]]:
    loads: list[list[int]] = [[] for _ in range(num_devices)]
    for s, d in enumerate(devices.tolist()):
        if d >= 0:
            loads[d].append(s)
    return loads


def fit_compute(
    specs: Sequence[TableSpec], devices: np.ndarray, num_devices: int, estimator: CostEstimator
) -> tuple[np.ndarray, np.ndarray]:
    """Finite-difference ``c[s, d]`` and intercepts ``k_d`` around ``devices`` (``-1``:
    shard not placed), from one ``compute_ms`` call over ``S x D + D`` loads."""
    loads = _loads(specs, devices, num_devices)
    queries: list[list[TableSpec]] = [[specs[i] for i in load] for load in loads]
    for s in range(len(specs)):
        for d in range(num_devices):
            if devices[s] == d:
                queries.append([specs[i] for i in loads[d] if i != s])
            else:
                queries.append(queries[d] + [specs[s]])
    values = np.asarray(estimator.compute_ms(queries), dtype=float)
    # an empty load costs 0 by contract; guard estimators that return a constant for it
    sizes = np.fromiter(map(len, queries), dtype=np.int64, count=len(queries))
    values = np.where(sizes > 0, values, 0.0)
    current = values[:num_devices]
    changed = values[num_devices:].reshape(len(specs), num_devices)
    on = devices[:, None] == np.arange(num_devices)[None, :]
    c = np.where(on, current[None, :] - changed, changed - current[None, :])
    return c, _intercepts(current, c, devices, num_devices)


def _intercepts(
    current_ms: np.ndarray, c: np.ndarray, devices: np.ndarray, num_devices: int
) -> np.ndarray:
    """``k_d`` making the surrogate compute exact at ``devices``."""
    placed = devices >= 0
    own = np.bincount(
        devices[placed], weights=c[np.flatnonzero(placed), devices[placed]], minlength=num_devices
    )
    return np.asarray(current_ms, dtype=float) - own


def fit_comm(
    estimator: CostEstimator, dims: np.ndarray, total_dim: float, points: int = COMM_GRID_POINTS
) -> tuple[Lines, Lines]:
    """Per device, the lower convex envelopes of backward comm and of forward comm without
    waits as functions of its dim sum (two estimator calls for all devices)."""
    num_devices = len(dims)
    dims = np.asarray(dims, dtype=float)
    if num_devices == 1:
        row = np.array([[total_dim]])
        bwd_ms = float(np.asarray(estimator.bwd_comm_ms(row))[0, 0])
        fwd_ms = float(np.asarray(estimator.fwd_comm_ms(row, np.zeros_like(row)))[0, 0])
        return (np.array([[0.0, bwd_ms]]),), (np.array([[0.0, fwd_ms]]),)
    grids, rows = [], []
    for d in range(num_devices):
        grid = np.unique(np.concatenate([np.linspace(0.0, total_dim, points), [dims[d]]]))
        grids.append(grid)
        others = dims.copy()
        others[d] = 0.0
        for v in grid:
            rest = max(total_dim - v, 0.0)
            if others.sum() > 0:
                row = others * (rest / others.sum())
            else:
                row = np.full(num_devices, rest / (num_devices - 1))
            row[d] = v
            rows.append(row)
    table = np.asarray(rows)
    bwd = np.asarray(estimator.bwd_comm_ms(table), dtype=float)
    fwd = np.asarray(estimator.fwd_comm_ms(table, np.zeros_like(table)), dtype=float)
    bwd_lines, fwd_lines, pos = [], [], 0
    for d, grid in enumerate(grids):
        sl = slice(pos, pos + len(grid))
        bwd_lines.append(_lower_hull_lines(grid, bwd[sl, d]))
        fwd_lines.append(_lower_hull_lines(grid, fwd[sl, d]))
        pos += len(grid)
    return tuple(bwd_lines), tuple(fwd_lines)


# --------------------------------------------------------------------------- the MILP


@dataclass(frozen=True)
class Solve:
    """One MILP solve and its LP relaxation."""

    devices: np.ndarray | None  # device of each shard, None when no solution was found
    status: str  # optimal / time_limit / infeasible / unbounded / other
    objective_ms: float  # surrogate objective of the solution (nan without one)
    mip_gap: float  # relative gap reported by HiGHS (nan without a solution)
    dual_bound_ms: float  # HiGHS's proven lower bound on the MILP optimum
    lp_bound_ms: float  # LP relaxation optimum: a lower bound under the surrogate
    seconds: float


def solve_surrogate(
    surrogate: Surrogate,
    widths: np.ndarray,
    sizes_bytes: np.ndarray,
    cluster: Cluster,
    *,
    time_limit_s: float,
    mip_rel_gap: float = 1e-3,
    incumbent: np.ndarray | None = None,
    radius: int | None = None,
    relax: bool = True,
) -> Solve:
    """Minimise the surrogate over table-wise placements with HiGHS (see the module doc).

    ``radius`` (with ``incumbent``) bounds how many shards may leave their incumbent device.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    num_shards, num_devices = surrogate.compute_ms.shape
    nx = num_shards * num_devices
    col_b = nx  # b_0 .. b_{D-1}
    col_zc, col_zf = nx + num_devices, nx + num_devices + 1
    nvars = nx + num_devices + 2
    xcol = np.arange(nx).reshape(num_shards, num_devices)  # column of x[s, d]

    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    lo: list[float] = []
    hi: list[float] = []
    nrows = 0

    def add_row(c: np.ndarray, v: np.ndarray, lower: float, upper: float) -> None:
        nonlocal nrows
        rows.append(np.full(len(c), nrows))
        cols.append(c)
        vals.append(v)
        lo.append(lower)
        hi.append(upper)
        nrows += 1

    widths_f = np.asarray(widths, dtype=float)
    gib = np.asarray(sizes_bytes, dtype=float) / _GIB
    for s in range(num_shards):  # each shard on exactly one device
        add_row(xcol[s], np.ones(num_devices), 1.0, 1.0)
    total_dim = float(widths_f.sum())
    negative = np.minimum(surrogate.compute_ms, 0.0)
    floor = (
        surrogate.intercept_ms[None, :] + surrogate.compute_ms + negative.sum(axis=0) - negative
    )  # (S, D): least surrogate compute of d with s on it
    for s in range(num_shards):
        bwd = [
            _envelope_min(surrogate.bwd_lines[d], widths_f[s], total_dim)
            for d in range(num_devices)
        ]
        fwd = [
            _envelope_min(surrogate.fwd_lines[d], widths_f[s], total_dim)
            for d in range(num_devices)
        ]
        add_row(np.append(xcol[s], col_zc), np.append(floor[s] + bwd, -1.0), -np.inf, 0.0)
        add_row(np.append(xcol[s], col_zf), np.append(fwd, -1.0), -np.inf, 0.0)
    for d in range(num_devices):
        add_row(xcol[:, d], gib, -np.inf, cluster.memory_per_device_bytes[d] / _GIB)
        add_row(
            np.append(xcol[:, d], [col_b + d, col_zc]),
            np.append(surrogate.compute_ms[:, d], [1.0, -1.0]),
            -np.inf,
            -float(surrogate.intercept_ms[d]),
        )
        for lines, epi in ((surrogate.bwd_lines[d], col_b + d), (surrogate.fwd_lines[d], col_zf)):
            for slope, icpt in lines:
                add_row(
                    np.append(xcol[:, d], epi),
                    np.append(slope * widths_f, -1.0),
                    -np.inf,
                    -float(icpt),
                )
    if incumbent is not None and radius is not None:
        add_row(
            xcol[np.arange(num_shards), incumbent],
            np.ones(num_shards),
            float(num_shards - radius),
            np.inf,
        )

    A = csr_array(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(nrows, nvars)
    )
    constraints = LinearConstraint(A, np.asarray(lo), np.asarray(hi))
    objective = np.zeros(nvars)
    objective[[col_zc, col_zf]] = 1.0
    lb = np.full(nvars, -np.inf)
    ub = np.full(nvars, np.inf)
    lb[:nx] = 0.0
    caps = np.asarray(cluster.memory_per_device_bytes, dtype=np.int64)
    ub[:nx] = np.where(
        np.asarray(sizes_bytes, dtype=np.int64)[:, None] > caps[None, :], 0.0, 1.0
    ).reshape(-1)  # a shard never goes where it cannot fit
    bounds = Bounds(lb, ub)
    integrality = np.zeros(nvars)
    integrality[:nx] = 1

    started = time.perf_counter()
    options = {"time_limit": float(time_limit_s), "mip_rel_gap": float(mip_rel_gap), "disp": False}
    res = milp(
        objective, integrality=integrality, bounds=bounds, constraints=constraints, options=options
    )
    status = _STATUS.get(int(res.status), "other")
    devices = None
    objective_ms = gap = math.nan
    if res.x is not None:
        x = np.asarray(res.x[:nx]).reshape(num_shards, num_devices)
        devices = x.argmax(axis=1).astype(np.int64)
        objective_ms = float(res.fun)
        raw_gap = getattr(res, "mip_gap", None)
        gap = math.nan if raw_gap is None else float(raw_gap)
    dual = getattr(res, "mip_dual_bound", None)
    dual = math.nan if dual is None else float(dual)
    lp_bound = math.nan
    if relax and status != "infeasible":
        lp = milp(
            objective,
            integrality=np.zeros(nvars),
            bounds=bounds,
            constraints=constraints,
            options={"time_limit": float(time_limit_s), "disp": False},
        )
        if lp.status == 0:
            lp_bound = float(lp.fun)
    return Solve(devices, status, objective_ms, gap, dual, lp_bound, time.perf_counter() - started)


# --------------------------------------------------------------------------- the search


def _single_ms(specs: Sequence[TableSpec], estimator: CostEstimator) -> np.ndarray:
    return np.asarray(estimator.compute_ms([[s] for s in specs]), dtype=float)


def _current_ms(
    specs: Sequence[TableSpec], devices: np.ndarray, num_devices: int, estimator: CostEstimator
) -> np.ndarray:
    loads = _loads(specs, devices, num_devices)
    busy = [d for d, load in enumerate(loads) if load]
    out = np.zeros(num_devices)
    if busy:
        out[busy] = estimator.compute_ms([[specs[i] for i in loads[d]] for d in busy])
    return out


def _infeasible(specs: Sequence[TableSpec], cluster: Cluster, why: str) -> PlanInfeasibleError:
    biggest = sorted(specs, key=lambda s: -s.size_bytes)[:5]
    need = sum(s.size_bytes for s in specs)
    return PlanInfeasibleError(
        f"{why}: {len(specs)} shards need {need} bytes ({need / _GIB:.2f} GiB) on "
        f"{cluster.num_devices} devices of {list(cluster.memory_per_device_bytes)} bytes; "
        "largest: "
        + ", ".join(f"{s.name!r} (width {s.dim}: {s.size_bytes} bytes)" for s in biggest)
    )


def _search(
    tables: Sequence[TableSpec],
    specs: Sequence[TableSpec],
    cluster: Cluster,
    estimator: CostEstimator,
    *,
    rounds: int,
    time_limit_s: float,
    mip_rel_gap: float,
    variant: str,
    prior: SurrogatePrior | None,
    start: np.ndarray | None,
    start_ms: float,
    trust_radius: int | None = None,
    record: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, float, list[dict[str, Any]]]:
    """The SurCo loop over shard ``specs``; returns the best devices, its real cost, and
    one record per round. ``start`` (None: nothing placed) is the incumbent to begin with."""
    num_devices = cluster.num_devices
    widths = np.asarray([s.dim for s in specs], dtype=float)
    sizes = np.asarray(
        [
            embedding_bytes(s.rows, s.dim, cluster.optimizer)
            + io_buffer_bytes(s, "column_wise", s.dim, cluster)
            for s in specs
        ],
        dtype=np.int64,
    )  # weights, optimizer state and I/O buffers, as the plan's validation counts them
    total_dim = float(widths.sum())
    best = start if start is not None else np.full(len(specs), -1, dtype=np.int64)
    best_ms = start_ms
    history: list[dict[str, Any]] = []
    prior_variant = variant == "prior"
    single = _single_ms(specs, estimator) if prior_variant else np.zeros(len(specs))
    feats = table_features(specs) if prior_variant else None
    radius = trust_radius if start is not None else None
    deadline = time.perf_counter() + time_limit_s
    for r in range(rounds):
        left_s = deadline - time.perf_counter()
        if left_s < MIN_SOLVE_S and r > 0:
            logger.debug("surco: solver budget of %.1f s spent after %d rounds", time_limit_s, r)
            break
        limit_s = max(left_s / (rounds - r), MIN_SOLVE_S)
        fit_started = time.perf_counter()
        if variant == "zero":
            c, k = fit_compute(specs, best, num_devices, estimator)
            if record is not None:
                record(best, c)
        else:
            ratio = (
                prior.predict(pair_features(specs, best, num_devices, single, feats)).reshape(
                    len(specs), num_devices
                )
                if prior is not None
                else np.ones((len(specs), num_devices))
            )
            c = ratio * single[:, None]
            k = _intercepts(_current_ms(specs, best, num_devices, estimator), c, best, num_devices)
        dims = np.bincount(best[best >= 0], weights=widths[best >= 0], minlength=num_devices)
        bwd_lines, fwd_lines = fit_comm(estimator, dims, total_dim)
        surrogate = Surrogate(c, k, bwd_lines, fwd_lines)
        fit_s = time.perf_counter() - fit_started
        placed = bool((best >= 0).all())
        sol = solve_surrogate(
            surrogate,
            widths,
            sizes,
            cluster,
            time_limit_s=limit_s,
            mip_rel_gap=mip_rel_gap,
            incumbent=best if placed else None,
            radius=radius,
        )
        entry: dict[str, Any] = {
            "round": r,
            "status": sol.status,
            "surrogate_ms": sol.objective_ms,
            "incumbent_surrogate_ms": surrogate.value(best, widths) if placed else math.nan,
            "mip_gap": sol.mip_gap,
            "dual_bound_ms": sol.dual_bound_ms,
            "lp_bound_ms": sol.lp_bound_ms,
            "trust_radius": radius,
            "time_limit_s": round(limit_s, 3),
            "fit_seconds": round(fit_s, 4),
            "solve_seconds": round(sol.seconds, 4),
        }
        history.append(entry)
        if sol.status == "infeasible" and not placed:
            raise _infeasible(
                specs, cluster, "the memory caps admit no placement (MILP proved infeasible)"
            )
        if sol.devices is None:
            entry["real_ms"] = math.nan
            logger.info("surco round %d: no solution (%s)", r, sol.status)
            if not placed:
                raise _infeasible(
                    specs, cluster, f"no placement found within the {limit_s:.1f} s solver limit"
                )
            break
        mem = np.bincount(sol.devices, weights=sizes, minlength=num_devices)
        if (mem > np.asarray(cluster.memory_per_device_bytes)).any():  # solver tolerance
            entry["real_ms"] = math.nan
            logger.warning(
                "surco round %d: solution breaks a memory cap by solver tolerance; dropped", r
            )
            if not placed:
                raise _infeasible(specs, cluster, "no placement within the memory caps found")
            break
        moved = int((sol.devices != best).sum()) if placed else len(specs)
        entry["moved"] = moved
        real_ms = (
            best_ms
            if moved == 0
            else plan_cost(to_plan(tables, cluster, specs, sol.devices.tolist()), estimator).max_ms
        )
        entry["real_ms"] = real_ms
        entry["improved"] = improved = real_ms < best_ms
        logger.debug(
            "surco round %d: %s, surrogate %.4f (LP %.4f), real %.4f vs best %.4f, %d moved",
            r,
            sol.status,
            sol.objective_ms,
            sol.lp_bound_ms,
            real_ms,
            best_ms,
            moved,
        )
        if improved:
            best, best_ms = sol.devices, real_ms
            radius = trust_radius
        elif moved == 0 or (
            sol.status == "optimal"
            and entry["incumbent_surrogate_ms"]
            <= sol.objective_ms + 1e-9 * max(1.0, abs(sol.objective_ms))
        ):
            # The incumbent is optimal under its own surrogate, and a smaller trust region
            # cannot beat that: later rounds would refit and re-solve the same problem.
            logger.debug("surco round %d: the incumbent is optimal under the surrogate", r)
            break
        else:
            radius = max(1, moved // 2)
    return best, best_ms, history


def surco_plan(
    tables: Sequence[TableSpec],
    cluster: Cluster,
    estimator: CostEstimator,
    *,
    seed: int = 0,
    budget_s: float | None = None,
    rounds: int = 5,
    splits: Mapping[str, Sequence[int]] | None = None,
    variant: str = "zero",
    prior_path: str | os.PathLike | None = None,
    mip_rel_gap: float = 1e-3,
    trust_radius: int | None = None,
) -> Plan:
    """SurCo-style search from the greedy grid plan (see the module doc).

    ``rounds`` surrogate fits and MILP solves at most, sharing ``budget_s`` seconds of
    solver time: each round's solve (and its LP relaxation) is limited to the time left
    over the rounds left (at least 0.2 s), so time a quick solve leaves passes to the next;
    a solve stops at a relative gap of ``mip_rel_gap``. The search's own time is about
    ``budget_s`` (default :data:`DEFAULT_BUDGET_S`) plus the estimator calls.

    ``splits`` maps table names to shard widths (default: table-wise). ``variant`` is
    ``"zero"`` (finite-difference fits) or ``"prior"`` (costs predicted by the
    :class:`SurrogatePrior` in ``prior_path``; without one, single-shard compute).

    ``trust_radius`` (default None: unbounded) caps how many shards a round may move;
    after a round that does not improve, the cap is halved either way.

    Never worse under ``estimator`` than the greedy grid plan it starts from; when the
    greedy grid finds no placement that fits, the first MILP starts from single-shard
    costs. Raises :class:`PlanInfeasibleError` naming the tables and bytes when no
    placement fits. Deterministic when every solve finishes inside its time limit (a solve
    cut by the limit depends on the machine's speed); ``seed`` is accepted for the
    :class:`~neuroshard.types.Searcher` signature.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    time_limit_s = DEFAULT_BUDGET_S if budget_s is None else budget_s
    if rounds < 1 or time_limit_s <= 0:
        raise ValueError(f"need rounds >= 1 and time_limit_s > 0, got {rounds}, {time_limit_s}")
    specs = shard_specs(tables, splits)
    error = infeasibility(specs, cluster)
    if error is not None:
        raise error
    prior = load_model(prior_path, kind=PRIOR_KIND) if variant == "prior" and prior_path else None
    try:
        placement = place(specs, cluster, estimator)
        start = np.asarray(placement.devices, dtype=np.int64)
        start_ms = plan_cost(to_plan(tables, cluster, specs, start.tolist()), estimator).max_ms
    except PlanInfeasibleError as exc:  # the greedy packing failed; the MILP may not
        logger.info("greedy grid found no placement (%s); solving from scratch", exc)
        start, start_ms = None, math.inf
    best, best_ms, history = _search(
        tables,
        specs,
        cluster,
        estimator,
        rounds=rounds,
        time_limit_s=time_limit_s,
        mip_rel_gap=mip_rel_gap,
        variant=variant,
        prior=prior,
        start=start,
        start_ms=start_ms,
        trust_radius=trust_radius,
    )
    solved = [h for h in history if h["status"] in ("optimal", "time_limit")]
    logger.info(
        "surco (%s): %d rounds, start %.4f ms, best %.4f ms",
        variant,
        len(history),
        start_ms,
        best_ms,
    )
    plan = to_plan(tables, cluster, specs, best.tolist())
    return replace(
        plan,
        meta={
            "surco": {
                "variant": variant,
                "prior": str(prior_path) if prior is not None else None,
                "start_ms": start_ms,
                "best_ms": best_ms,
                "rounds": history,
                "proved_optimal": sum(h["status"] == "optimal" for h in solved),
                "time_limit_s": time_limit_s,
                "mip_rel_gap": mip_rel_gap,
            }
        },
    )


def fit_surrogate_prior(
    tasks: Sequence[Sequence[TableSpec]],
    cluster: Cluster,
    estimator: CostEstimator,
    out_path: str | os.PathLike,
    *,
    rounds: int = 3,
    time_limit_s: float = 2.0,
    seed: int = 0,
    **hyperparameters: Any,
) -> SurrogatePrior:
    """Train a :class:`~neuroshard.models.surrogate.SurrogatePrior` and save it to the
    model directory ``out_path``.

    Runs the zero variant on each task (table-wise, from its greedy grid plan) and keeps,
    for every fit, the pairs (:func:`pair_features`, fitted ``c[s, d]`` over the shard's
    single-shard compute). ``tasks`` should come from the training pool
    (``load_pool("train")``) so test tables stay unseen. ``hyperparameters`` go to
    the prior's constructor.
    """
    X_parts: list[np.ndarray] = []
    y_parts: list[np.ndarray] = []
    for i, tables in enumerate(tasks):
        specs = shard_specs(tables)
        if infeasibility(specs, cluster) is not None:
            logger.info("prior task %d does not fit the cluster; skipped", i)
            continue
        single = _single_ms(specs, estimator)
        feats = table_features(specs)

        def record(
            devices: np.ndarray,
            c: np.ndarray,
            specs: list[TableSpec] = specs,
            single: np.ndarray = single,
            feats: np.ndarray = feats,
        ) -> None:
            X_parts.append(pair_features(specs, devices, cluster.num_devices, single, feats))
            y_parts.append((c / np.maximum(single, 1e-9)[:, None]).reshape(-1))

        try:
            placement = place(specs, cluster, estimator)
        except PlanInfeasibleError:
            continue
        start = np.asarray(placement.devices, dtype=np.int64)
        start_ms = plan_cost(to_plan(tables, cluster, specs, start.tolist()), estimator).max_ms
        _search(
            tables,
            specs,
            cluster,
            estimator,
            rounds=rounds,
            time_limit_s=time_limit_s,
            mip_rel_gap=1e-3,
            variant="zero",
            prior=None,
            start=start,
            start_ms=start_ms,
            record=record,
        )
    if not X_parts:
        raise ValueError("no training pairs: every task was infeasible or tasks is empty")
    X, y = np.concatenate(X_parts), np.concatenate(y_parts)
    prior = SurrogatePrior(seed=seed, **hyperparameters).fit(X, y)
    prior.save(
        out_path,
        estimator=getattr(estimator, "name", "?"),
        batch_size=getattr(estimator, "batch_size", None),
        num_devices=cluster.num_devices,
        num_tasks=len(tasks),
    )
    return prior


__all__ = [
    "Surrogate",
    "fit_comm",
    "fit_compute",
    "fit_surrogate_prior",
    "solve_surrogate",
    "surco_plan",
]

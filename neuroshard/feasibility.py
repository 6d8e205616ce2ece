"""Whether tables can fit a cluster at all: the one memory check before any search, and
the check that a finished plan honours its constraints.

:func:`check_fits` is the planner's: a task is infeasible only when no placement of any
sharding type and kernel the constraints allow fits the cluster's budgets (HBM after the
reserve, host memory), counting the optimizer's state. :func:`infeasibility` is the
older, narrower check that searchers use on the table- or column-wise shard sets they
are about to place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from neuroshard.types import (
    DIM_MULTIPLE,
    Cluster,
    ConstraintError,
    Constraints,
    Plan,
    PlanInfeasibleError,
    TableConstraint,
    TableSpec,
    embedding_bytes,
    io_buffer_bytes,
    shard_hbm_bytes,
)

# The smallest HBM cache a fused_uvm_caching table may get (search.space.CACHE_FRACTIONS).
MIN_CACHE_FRACTION = 0.01


def format_bytes(n: int) -> str:
    """``n`` bytes, with GiB beside for people."""
    return f"{n} bytes ({n / 2**30:.2f} GiB)"


def infeasibility(
    specs: Sequence[TableSpec], cluster: Cluster, *, splittable: bool = False
) -> PlanInfeasibleError | None:
    """The error when ``specs`` cannot fit ``cluster`` table- or column-wise on their HBM
    (weights only), else None.

    ``specs`` are whole tables or column shards (tables narrowed to the shard width). With
    ``splittable`` a spec larger than every device still passes when its narrowest column
    shard (4 columns) fits one. The error names the tables and the bytes.
    """
    largest = max(cluster.hbm_budget_bytes)
    total = sum(cluster.hbm_budget_bytes)

    def smallest_piece(s: TableSpec) -> int:
        return s.column_bytes(min(DIM_MULTIPLE, s.dim)) if splittable else s.size_bytes

    too_big = [s for s in specs if smallest_piece(s) > largest]
    if too_big:
        what = (
            "even a 4-column shard is larger than any device"
            if splittable
            else "larger than any device"
        )
        names = ", ".join(
            f"{s.name!r} (width {s.dim}: {format_bytes(s.size_bytes)})" for s in too_big
        )
        return PlanInfeasibleError(
            f"{what}: {names}; largest device memory {format_bytes(largest)}, "
            f"total {format_bytes(total)} on {cluster.num_devices} devices"
        )
    need = sum(s.size_bytes for s in specs)
    if need > total:
        return _total_error(specs, [s.size_bytes for s in specs], need, total, cluster)
    return None


def _total_error(
    specs: Sequence[TableSpec], sizes: Sequence[int], need: int, total: int, cluster: Cluster
) -> PlanInfeasibleError:
    biggest = sorted(range(len(specs)), key=lambda i: -sizes[i])[:3]
    reserve = cluster.hbm_reserve_fraction
    after = f" after a {reserve:.0%} reserve" if reserve else ""
    return PlanInfeasibleError(
        f"{len(specs)} tables need {format_bytes(need)} but the {cluster.num_devices} "
        f"devices have {format_bytes(total)} in total{after} (largest: "
        + ", ".join(f"{specs[i].name!r} {format_bytes(sizes[i])}" for i in biggest)
        + ")"
    )


def _options(
    t: TableSpec, rule: TableConstraint, cluster: Cluster
) -> list[tuple[str, int, int, int]]:
    """Per allowed (type, kernel): (label, HBM per device, host memory per device, HBM in
    total) at their smallest (narrowest column shard, lowest cache fraction)."""
    devices = rule.allowed_devices(cluster)
    optimizer = cluster.optimizer
    # label, sharding type, rows, width, copies
    shapes: list[tuple[str, str, int, int, int]] = []
    if rule.allows_type("table_wise"):
        shapes.append(("table-wise", "table_wise", t.rows, t.dim, 1))
    if rule.allows_type("column_wise"):
        shapes.append(("column-wise", "column_wise", t.rows, min(DIM_MULTIPLE, t.dim), 1))
    if rule.allows_type("row_wise"):
        shapes.append(("row-wise", "row_wise", math.ceil(t.rows / len(devices)), t.dim, 1))
    if rule.allows_type("table_row_wise"):
        hosts = [[d for d in devices if cluster.host_of(d) == h] for h in range(cluster.num_hosts)]
        widest = max(len(h) for h in hosts)
        shapes.append(("table-row-wise", "table_row_wise", math.ceil(t.rows / widest), t.dim, 1))
    if rule.allows_type("data_parallel"):
        shapes.append(("data-parallel", "data_parallel", t.rows, t.dim, cluster.num_devices))
    out = []
    for label, kind, rows, width, copies in shapes:
        io = io_buffer_bytes(t, kind, width, cluster)  # per shard
        for kernel in ("fused", "dense", "fused_uvm_caching"):
            if not rule.allows_kernel(kernel):
                continue
            fraction = rule.cache_fraction or MIN_CACHE_FRACTION
            hbm = shard_hbm_bytes(rows, width, kernel, fraction, optimizer) + io
            host = embedding_bytes(rows, width, optimizer) if kernel == "fused_uvm_caching" else 0
            whole = (shard_hbm_bytes(t.rows, t.dim, kernel, fraction, optimizer) + io) * copies
            suffix = "" if kernel == "fused" else f" on {kernel}"
            out.append((label + suffix, hbm, host, whole))
    return out


def check_fits(
    tables: Sequence[TableSpec], cluster: Cluster, constraints: Constraints | None = None
) -> None:
    """Raise :class:`PlanInfeasibleError` when no plan of ``tables`` can exist on
    ``cluster``: a table none of whose allowed sharding types and kernels fits a device
    (its smallest shard: a 4-column slice, a row block over every device or a host, an
    HBM cache of 1% of its rows), or tables whose smallest HBM footprints together exceed
    the devices' budgets. Footprints count the cluster's optimizer state and, when it counts
    them, the I/O buffers; HBM budgets are the caps less the reserve. The error names the
    tables and the bytes."""
    constraints = constraints or Constraints()
    budget, host_budget = cluster.hbm_budget_bytes, cluster.host_budget_bytes
    too_big, least = [], []
    for t in tables:
        rule = constraints.of(t.name)
        devices = rule.allowed_devices(cluster)
        largest = max(budget[d] for d in devices)
        largest_host = max(host_budget[d] for d in devices)
        options = _options(t, rule, cluster)
        fitting = [o for o in options if o[1] <= largest and o[2] <= largest_host]
        if not options:
            raise ConstraintError(
                f"table {t.name!r}: its constraints allow no sharding type and kernel"
            )
        if not fitting:
            too_big.append((t, min(options, key=lambda o: (o[2] > largest_host, o[1]))))
        else:
            least.append(min(o[3] for o in fitting))
    if too_big:
        names = ", ".join(
            f"{t.name!r} ({format_bytes(embedding_bytes(t.rows, t.dim, cluster.optimizer))}; "
            f"smallest shard {format_bytes(o[1])} {o[0]})"
            for t, o in too_big
        )
        reserve = cluster.hbm_reserve_fraction
        after = f" after a {reserve:.0%} reserve" if reserve else ""
        raise PlanInfeasibleError(
            f"larger than any device under every sharding type and kernel: {names}; "
            f"largest device memory {format_bytes(max(budget))}{after}, host memory "
            f"{format_bytes(max(host_budget))}, total {format_bytes(sum(budget))} on "
            f"{cluster.num_devices} devices"
        )
    need = sum(least)
    if need > sum(budget):
        raise _total_error(tables, least, need, sum(budget), cluster)


def constraint_problems(plan: Plan, constraints: Constraints) -> list[str]:
    """What in ``plan`` breaks ``constraints`` (empty when nothing does)."""
    problems = []
    for t in plan.tables:
        rule = constraints.of(t.name)
        shards = plan.shards_of(t.name)
        kind = plan.sharding_type_of(t.name)
        if not rule.allows_type(kind):
            problems.append(f"table {t.name!r} is {kind}, allowed {list(rule.sharding_types)}")
        kernels = {s.compute_kernel for s in shards}
        if any(not rule.allows_kernel(k) for k in kernels):
            problems.append(
                f"table {t.name!r} runs on {sorted(kernels)}, allowed {list(rule.compute_kernels)}"
            )
        allowed = set(rule.allowed_devices(plan.cluster))
        if kind != "data_parallel" and any(s.device not in allowed for s in shards):
            problems.append(
                f"table {t.name!r} has shards on devices "
                f"{sorted({s.device for s in shards} - allowed)}, pinned to "
                f"{sorted(allowed)}"
            )
        if rule.cache_fraction is not None and any(
            s.cache_fraction != rule.cache_fraction for s in shards
        ):
            problems.append(f"table {t.name!r}: cache fraction is not {rule.cache_fraction}")
    for group in constraints.colocate:
        devices = {s.device for name in group for s in plan.shards_of(name)}
        if len(devices) != 1:
            problems.append(f"co-located tables {list(group)} sit on devices {sorted(devices)}")
    return problems


def check_constraints(plan: Plan, constraints: Constraints | None) -> None:
    """Raise :class:`ConstraintError` listing what in ``plan`` breaks ``constraints``."""
    if constraints is None:
        return
    problems = constraint_problems(plan, constraints)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ConstraintError("the plan breaks its constraints: " + "; ".join(problems[:5]) + more)

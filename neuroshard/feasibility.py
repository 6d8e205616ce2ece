"""Whether tables can fit a cluster at all: the one memory check before any search.

Used by the planner on a whole task (tables may still be split column-wise, down to
4-column shards) and by searchers on the shard sets they are about to place.
"""

from __future__ import annotations

from collections.abc import Sequence

from neuroshard.types import DIM_MULTIPLE, Cluster, PlanInfeasibleError, TableSpec


def format_bytes(n: int) -> str:
    """``n`` bytes, with GiB beside for people."""
    return f"{n} bytes ({n / 2**30:.2f} GiB)"


def infeasibility(
    specs: Sequence[TableSpec], cluster: Cluster, *, splittable: bool = False
) -> PlanInfeasibleError | None:
    """The error when ``specs`` cannot fit ``cluster`` whatever the placement, else None.

    ``specs`` are whole tables or column shards (tables narrowed to the shard width). With
    ``splittable`` a spec larger than every device still passes when its narrowest column
    shard (4 columns) fits one. The error names the tables and the bytes.
    """
    largest = max(cluster.memory_per_device_bytes)
    total = cluster.total_memory_bytes

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
        biggest = sorted(specs, key=lambda s: -s.size_bytes)[:3]
        return PlanInfeasibleError(
            f"{len(specs)} tables need {format_bytes(need)} but the {cluster.num_devices} "
            "devices "
            f"have {format_bytes(total)} in total (largest: "
            + ", ".join(f"{s.name!r} {format_bytes(s.size_bytes)}" for s in biggest)
            + ")"
        )
    return None


def check_fits(tables: Sequence[TableSpec], cluster: Cluster) -> None:
    """Raise :class:`PlanInfeasibleError` when no plan of ``tables`` can exist on ``cluster``."""
    error = infeasibility(tables, cluster, splittable=True)
    if error is not None:
        raise error

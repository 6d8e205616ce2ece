"""Greedy grid search: table-wise placement of given column shards.

Shards are placed largest predicted compute first, each on the device whose predicted
fused compute (its current shards plus this one) is lowest among the devices that fit
both the memory cap and a dim cap of ``scale * total_dim / num_devices``; when no device
fits both, the dim cap is dropped for that shard. The scale sweeps :data:`GRID_SCALES`
and the placement with the lowest plan cost (comm included) wins.

All grid points -- and, through :func:`place_many`, the grids of many shardings at once
(one per beam-search child) -- run in lockstep: each placement step is one batched
``compute_ms`` call over every lane's candidate devices, and the finished placements are
scored in one batch.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_right
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

from neuroshard.search.scoring import EMPTY_LOAD, LoadKey, Scorer, finish_plan
from neuroshard.types import (
    DIM_MULTIPLE,
    Cluster,
    CostEstimator,
    Plan,
    PlanInfeasibleError,
    Shard,
    TableSpec,
    TableSpecError,
)

logger = logging.getLogger(__name__)

# Dim-cap scales of the grid: 1.0, 1.05, ..., 1.5.
GRID_SCALES: tuple[float, ...] = tuple(round(1.0 + 0.05 * i, 2) for i in range(11))

_CAP_SLACK = 1e-9  # float slack on the dim cap comparison


@dataclass(frozen=True)
class Placement:
    """Where each shard spec goes, and the plan cost of that placement."""

    devices: tuple[int, ...]  # device of each shard spec, in the order the specs were given
    cost_ms: float  # plan cost (max over devices) under the scorer's estimator
    scale: float  # dim-cap scale of the winning grid point


# --------------------------------------------------------------------------- memory errors


def _bytes(n: int) -> str:
    return f"{n} bytes ({n / 2**30:.2f} GiB)"


def check_fits(specs: Sequence[TableSpec], cluster: Cluster) -> PlanInfeasibleError | None:
    """The error when ``specs`` cannot fit ``cluster`` whatever the placement, else None.

    ``specs`` are whole tables or column shards (tables narrowed to the shard width).
    """
    largest = max(cluster.memory_per_device_bytes)
    total = cluster.total_memory_bytes
    too_big = [s for s in specs if s.size_bytes > largest]
    if too_big:
        names = ", ".join(f"{s.name!r} (width {s.dim}: {_bytes(s.size_bytes)})" for s in too_big)
        return PlanInfeasibleError(
            f"larger than any device: {names}; largest device memory {_bytes(largest)}, "
            f"total {_bytes(total)} on {cluster.num_devices} devices"
        )
    need = sum(s.size_bytes for s in specs)
    if need > total:
        return PlanInfeasibleError(
            f"{len(specs)} tables need {_bytes(need)} but the {cluster.num_devices} devices "
            f"have {_bytes(total)} in total"
        )
    return None


def no_room(spec: TableSpec, free_bytes: Sequence[int]) -> PlanInfeasibleError:
    """The error when no device has room left for ``spec`` in a partial placement."""
    return PlanInfeasibleError(
        f"no device has room for table {spec.name!r} (width {spec.dim}: "
        f"{_bytes(spec.size_bytes)} needed); largest free device memory "
        f"{_bytes(max(free_bytes))}, {_bytes(sum(free_bytes))} free in total"
    )


# --------------------------------------------------------------------------- shards <-> plans


def shard_specs(tables: Sequence[TableSpec],
                splits: Mapping[str, Sequence[int]] | None = None) -> list[TableSpec]:
    """Column shards of ``tables`` as narrowed specs, tables in order, widths as given.

    ``splits`` maps a table name to its shard widths (default: one shard of full dim).
    """
    splits = splits or {}
    unknown = set(splits) - {t.name for t in tables}
    if unknown:
        raise TableSpecError(f"splits name unknown tables {sorted(unknown)}",
                             field_name="splits")
    specs: list[TableSpec] = []
    for t in tables:
        widths = tuple(splits.get(t.name, (t.dim,)))
        if sum(widths) != t.dim or any(w <= 0 or w % DIM_MULTIPLE for w in widths):
            raise TableSpecError(
                f"shard widths {widths} must be positive multiples of {DIM_MULTIPLE} "
                f"summing to dim {t.dim}", table=t.name, field_name="splits")
        specs.extend(t.with_dim(w) for w in widths)
    return specs


def to_plan(tables: Sequence[TableSpec], cluster: Cluster, specs: Sequence[TableSpec],
            devices: Sequence[int]) -> Plan:
    """A plan placing shard ``specs[i]`` on ``devices[i]``.

    Each table's shards take consecutive column ranges in the order they appear in ``specs``.
    """
    next_col = {t.name: 0 for t in tables}
    shards = []
    for spec, device in zip(specs, devices, strict=True):
        start = next_col[spec.name]
        next_col[spec.name] = start + spec.dim
        shards.append(Shard(spec.name, start, start + spec.dim, int(device)))
    return Plan(tables=tuple(tables), shards=tuple(shards), cluster=cluster)


# --------------------------------------------------------------------------- placement


class _State(NamedTuple):
    """A partial placement shared by every grid lane that has made the same choices."""

    keys: tuple[LoadKey, ...]  # per device, the scorer's key of its shards
    free: tuple[int, ...]  # per device, memory left (bytes)
    dims: tuple[int, ...]  # per device, sum of shard widths
    path: tuple | None  # devices chosen so far, newest first, as nested (device, rest) pairs


def _devices(path: tuple | None, order: Sequence[int]) -> tuple[int, ...]:
    """Device of each shard spec, from the choices (step by step) along ``order``."""
    chosen = []
    while path is not None:
        device, path = path
        chosen.append(device)
    devices = [0] * len(order)
    for j, device in zip(order, reversed(chosen), strict=True):
        devices[j] = device
    return tuple(devices)


def _choices(fits: tuple[int, ...], dims_after: list[int], caps: Sequence[float],
             wanted: int) -> list[tuple[tuple[int, ...], int]]:
    """The devices each wanted dim cap allows, as ``(devices, mask of caps)`` pairs.

    ``dims_after[i]`` is device ``fits[i]``'s dim sum with the shard added; cap ``s`` (bit
    ``s`` of ``wanted``) allows the devices within it, or all of ``fits`` when none is.
    """
    if not wanted & (wanted - 1):  # one cap: the common case once grid points diverge
        cap = caps[wanted.bit_length() - 1]
        return [(tuple(d for d, dim in zip(fits, dims_after) if dim <= cap) or fits, wanted)]
    wanted_caps = [cap for s, cap in enumerate(caps) if wanted >> s & 1]
    if max(dims_after) <= min(wanted_caps) or min(dims_after) > max(wanted_caps):
        return [(fits, wanted)]  # every wanted cap allows all of fits (or none: fallback)
    by_dim = sorted(range(len(fits)), key=dims_after.__getitem__)
    sorted_dims = [dims_after[i] for i in by_dim]
    by_count: dict[int, int] = {}
    for s, cap in enumerate(caps):
        if wanted >> s & 1:
            k = bisect_right(sorted_dims, cap)
            by_count[k] = by_count.get(k, 0) | (1 << s)
    masks: dict[tuple[int, ...], int] = {}
    for k, mask in by_count.items():
        allowed = tuple(sorted(fits[i] for i in by_dim[:k])) if k else fits
        masks[allowed] = masks.get(allowed, 0) | mask
    return list(masks.items())


def place_many(problems: Sequence[Sequence[TableSpec]], cluster: Cluster, scorer: Scorer, *,
               scales: Sequence[float] = GRID_SCALES) -> list[Placement | PlanInfeasibleError]:
    """Greedy grid placement of each list of shard specs, all in lockstep.

    Returns, per problem, its best :class:`Placement`, or the :class:`PlanInfeasibleError`
    that stopped every grid point (returned, not raised, so a beam can drop the child).

    A *lane* is one grid point (scale) of one problem. Lanes whose choices so far agree
    share one :class:`_State` -- the grid points of a problem agree until their dim caps
    bind, and beam children until the first shard that one of them split -- so each step
    costs one state update per distinct choice, not per lane. A group's lanes are kept as
    ``(problem, mask)`` bundles, bit ``s`` of the mask standing for ``scales[s]``.
    """
    if not scales:
        raise ValueError("place_many needs at least one scale")
    num_devices = cluster.num_devices
    results: list[Placement | PlanInfeasibleError | None] = [None] * len(problems)
    items = [[scorer.item(s) for s in specs] for specs in problems]
    singles = scorer.compute([(i,) for row in items for i in row]).tolist()

    orders: list[list[int]] = []  # per problem, the placement order of its shard specs
    total_dims = [sum(s.dim for s in specs) for specs in problems]
    caps_of = {total: [scale * total / num_devices + _CAP_SLACK for scale in scales]
               for total in set(total_dims)}  # per total dim, each scale's dim cap
    bundles: list[tuple[int, int]] = []
    all_scales = (1 << len(scales)) - 1
    offset = 0
    for p, specs in enumerate(problems):
        single = singles[offset:offset + len(specs)]
        offset += len(specs)
        orders.append(sorted(range(len(specs)), key=lambda j: -single[j]))
        error = check_fits(specs, cluster)
        if error is not None:
            results[p] = error
        else:
            bundles.append((p, all_scales))

    start = _State((EMPTY_LOAD,) * num_devices, tuple(cluster.memory_per_device_bytes),
                   (0,) * num_devices, None)
    groups: list[tuple[_State, list[tuple[int, int]]]] = [(start, bundles)] if bundles else []
    finished: list[tuple[int, int, _State]] = []
    errors: list[tuple[int, PlanInfeasibleError]] = []
    add = Scorer.add
    step = 0
    while groups:
        queries: list[LoadKey] = []
        pending = []
        for state, members in groups:
            by_item: dict[int, list[tuple[int, int]]] = {}
            for p, mask in members:
                if step == len(orders[p]):
                    finished.append((p, mask, state))
                else:
                    by_item.setdefault(items[p][orders[p][step]], []).append((p, mask))
            for item, same_item in by_item.items():
                spec = scorer.spec(item)
                need, width = spec.size_bytes, spec.dim
                fits = tuple(d for d in range(num_devices) if state.free[d] >= need)
                if not fits:
                    error = no_room(spec, state.free)
                    errors.extend((p, error) for p, _ in same_item)
                    continue
                # Split the bundles by the devices their dim caps allow (caps depend on
                # the problem's total dim: the same for every beam child).
                by_total: dict[int, list[tuple[int, int]]] = {}
                for p, mask in same_item:
                    by_total.setdefault(total_dims[p], []).append((p, mask))
                dims_after = [state.dims[d] + width for d in fits]
                by_choice: dict[tuple[int, ...], list[tuple[int, int]]] = {}
                for total, same_total in by_total.items():
                    wanted = 0
                    for _, mask in same_total:
                        wanted |= mask
                    for capped, cap_mask in _choices(fits, dims_after, caps_of[total], wanted):
                        for p, mask in same_total:
                            if mask & cap_mask:
                                by_choice.setdefault(capped, []).append((p, mask & cap_mask))
                for capped, same_choice in by_choice.items():
                    keys = [add(state.keys[d], item) for d in capped]
                    queries.extend(keys)
                    pending.append((state, need, width, capped, keys, same_choice))
        values = scorer.compute(queries).tolist()
        groups = []
        pos = 0
        for state, need, width, capped, keys, members in pending:
            vals = values[pos:pos + len(capped)]
            pos += len(capped)
            k = min(range(len(capped)), key=vals.__getitem__)
            d = capped[k]
            groups.append((_State(
                state.keys[:d] + (keys[k],) + state.keys[d + 1:],
                state.free[:d] + (state.free[d] - need,) + state.free[d + 1:],
                state.dims[:d] + (state.dims[d] + width,) + state.dims[d + 1:],
                (d, state.path),
            ), members))
        step += 1

    unique = list({id(state): state for _, _, state in finished}.values())
    cost_of = dict(zip(map(id, unique), scorer.score([s.keys for s in unique]).tolist()))
    best: dict[int, tuple[float, int, _State]] = {}
    for p, mask, state in finished:
        s = (mask & -mask).bit_length() - 1  # the bundle's first grid point
        candidate = (cost_of[id(state)], s, state)
        if p not in best or candidate[:2] < best[p][:2]:  # ties keep the earlier grid point
            best[p] = candidate
    for p, (cost, s, state) in best.items():
        results[p] = Placement(_devices(state.path, orders[p]), cost, scales[s])
    for p, error in errors:
        if results[p] is None:
            results[p] = error
    return results  # type: ignore[return-value]


def place(shard_specs: Sequence[TableSpec], cluster: Cluster, estimator: CostEstimator, *,
          scales: Sequence[float] = GRID_SCALES, scorer: Scorer | None = None) -> Placement:
    """Greedy grid placement of one list of shard specs; raises :class:`PlanInfeasibleError`."""
    scorer = scorer if scorer is not None else Scorer(estimator)
    result = place_many([shard_specs], cluster, scorer, scales=scales)[0]
    if isinstance(result, PlanInfeasibleError):
        raise result
    return result


def greedy_grid(tables: Sequence[TableSpec], cluster: Cluster, estimator: CostEstimator, *,
                seed: int = 0, splits: Mapping[str, Sequence[int]] | None = None,
                scales: Sequence[float] = GRID_SCALES) -> Plan:
    """Greedy grid search over ``tables`` split as ``splits`` (default: table-wise).

    Deterministic; ``seed`` is accepted for the :class:`~neuroshard.types.Searcher` signature.
    """
    started = time.perf_counter()
    specs = shard_specs(tables, splits)
    placement = place(specs, cluster, estimator, scales=scales)
    logger.debug("greedy grid: %d shards, best scale %.2f, cost %.4f ms",
                 len(specs), placement.scale, placement.cost_ms)
    plan = to_plan(tables, cluster, specs, placement.devices)
    return finish_plan(plan, estimator, searcher="greedy-grid", started=started,
                       scale=placement.scale)

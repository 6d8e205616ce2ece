"""Greedy grid search: table-wise placement of given column shards.

Shards are placed largest predicted compute first, each on the device whose predicted
fused compute (its current shards plus this one) is lowest among the devices that fit
both the memory cap and a dim cap of ``scale * total_dim / num_devices``; when no device
fits both, the dim cap is dropped for that shard. The scale sweeps :data:`GRID_SCALES`
and the placement with the lowest plan cost (comm included) wins.

All grid points -- and, through :func:`place_many`, the grids of many shardings at once
(one per beam-search child) -- run in lockstep: each placement step is one batched
compute call over every lane's candidate devices, and the finished placements are scored
in one batch. With an additive estimator (the neural model: compute is a head of summed
per-shard embeddings) the lanes are numpy arrays of per-device embedding sums, free memory
and dim sums, the memory and dim-cap masks are computed over lanes x devices at once, and
a step is one head call on the distinct (state, device) rows; with any other estimator
(the sim backend, fakes) lanes share tuples of cached load keys.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from dataclasses import dataclass, replace
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from neuroshard.feasibility import format_bytes, infeasibility
from neuroshard.search.scoring import EMPTY_LOAD, LoadKey, Scorer
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
# Equal device contents are tracked when lanes x devices reach _DEDUP_CELLS, and merged in
# a step pricing at least _DEDUP_ROWS rows; below that the bookkeeping costs more than it saves.
_DEDUP_CELLS = 32_768
_DEDUP_ROWS = 4096


@dataclass(frozen=True)
class Placement:
    """Where each shard spec goes, and the plan cost of that placement."""

    devices: tuple[int, ...]  # device of each shard spec, in the order the specs were given
    cost_ms: float  # plan cost (max over devices) under the scorer's estimator
    scale: float  # dim-cap scale of the winning grid point


# --------------------------------------------------------------------------- memory errors


def no_room(spec: TableSpec, free_bytes: Sequence[int]) -> PlanInfeasibleError:
    """The error when no device has room left for ``spec`` in a partial placement."""
    return PlanInfeasibleError(
        f"no device has room for table {spec.name!r} (width {spec.dim}: "
        f"{format_bytes(spec.size_bytes)} needed); largest free device memory "
        f"{format_bytes(max(free_bytes))}, {format_bytes(sum(free_bytes))} free in total"
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
    share their state -- the grid points of a problem agree until their dim caps bind, and
    beam children until the first shard that one of them split -- so each step prices one
    "device + shard" per distinct state and device, not per lane. With an additive
    estimator (:attr:`Scorer.additive`) the lanes live in numpy arrays and a step is one
    head call (:func:`_place_arrays`); otherwise states are shared tuples of load keys and
    a step is one cached ``compute_ms`` call (:func:`_place_keys`). Both give the same
    placements up to float rounding of the compute values.
    """
    if not scales:
        raise ValueError("place_many needs at least one scale")
    results: list[Placement | PlanInfeasibleError | None] = [None] * len(problems)
    items = [[scorer.item(s) for s in specs] for specs in problems]
    singles = scorer.singles([i for row in items for i in row]).tolist()

    orders: list[list[int]] = []  # per problem, the placement order of its shard specs
    total_dims = [sum(s.dim for s in specs) for specs in problems]
    feasible: list[int] = []
    offset = 0
    for p, specs in enumerate(problems):
        single = singles[offset:offset + len(specs)]
        offset += len(specs)
        orders.append(sorted(range(len(specs)), key=lambda j: -single[j]))
        error = infeasibility(specs, cluster)
        if error is not None:
            results[p] = error
        else:
            feasible.append(p)
    if feasible:
        place_lanes = _place_arrays if scorer.additive else _place_keys
        found = place_lanes(feasible, items, orders, total_dims, cluster, scorer, scales)
        for p, result in found.items():
            results[p] = result
    return results  # type: ignore[return-value]


def _place_keys(feasible: Sequence[int], items: Sequence[Sequence[int]],
                orders: Sequence[Sequence[int]], total_dims: Sequence[int], cluster: Cluster,
                scorer: Scorer, scales: Sequence[float]
                ) -> dict[int, Placement | PlanInfeasibleError]:
    """The lockstep grid over shared :class:`_State` tuples of load keys (any estimator).

    A group's lanes are kept as ``(problem, mask)`` bundles, bit ``s`` of the mask
    standing for ``scales[s]``.
    """
    num_devices = cluster.num_devices
    caps_of = {total: [scale * total / num_devices + _CAP_SLACK for scale in scales]
               for total in set(total_dims)}  # per total dim, each scale's dim cap
    all_scales = (1 << len(scales)) - 1
    bundles = [(p, all_scales) for p in feasible]
    results: dict[int, Placement | PlanInfeasibleError] = {}
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
        results.setdefault(p, error)
    return results


def _distinct(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_index=True, return_inverse=True)[1:]`` for non-negative
    int64 keys: where each distinct key first occurs (in key order) and each key's rank.

    When key and position fit 62 bits together they are packed into one int64 and
    sorted by value, several times faster than the argsort ``np.unique`` uses.
    """
    n = len(keys)
    if not n:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    pos_bits = max(1, (n - 1).bit_length())
    if int(keys.max()).bit_length() + pos_bits > 62:
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        return first, inverse
    packed = np.sort((keys << pos_bits) | np.arange(n, dtype=np.int64))
    order = packed & ((1 << pos_bits) - 1)
    packed >>= pos_bits
    starts = np.empty(n, dtype=bool)
    starts[0] = True
    np.not_equal(packed[1:], packed[:-1], out=starts[1:])
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.cumsum(starts) - 1
    return order[starts], inverse


def _first_per_group(groups: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort order of ``groups`` and where each group's run starts in it."""
    order = np.argsort(groups, kind="stable")
    starts = np.searchsorted(groups[order], np.arange(num_groups))
    return order, starts


def _place_arrays(feasible: Sequence[int], items: Sequence[Sequence[int]],
                  orders: Sequence[Sequence[int]], total_dims: Sequence[int], cluster: Cluster,
                  scorer: Scorer, scales: Sequence[float]
                  ) -> dict[int, Placement | PlanInfeasibleError]:
    """The lockstep grid in numpy arrays, for an additive estimator.

    Lane ``l`` is problem ``feasible[l // S]`` at scale ``l % S``. Each lane holds, per
    device, the sum of its shards' embeddings, shard count, free bytes and dim sum. Lanes
    with equal states carry equal group ids (same group and same next shard: same costs;
    same choice too: same new group), so a step prices each (group, shard) pair once on
    the devices that any of its lanes may take -- memory and dim-cap masks over lanes x
    devices -- in one head call on the summed embeddings.

    On big grids (lanes x devices >= ``_DEDUP_CELLS``) each device's contents also carry an
    id (the same shards added in the same order: bit-identical sums), and (contents, shard)
    pairs are priced once across groups. Lanes that diverged -- beam children after the
    table one of them split, grid points after a dim cap bound -- still share most devices,
    so this halves the rows priced at 1,000 tables on 128 devices, and more in later beam
    steps.
    """
    num_devices, num_scales = cluster.num_devices, len(scales)
    emb = scorer.embeddings()
    need_of, width_of = scorer.sizes_bytes(), scorer.widths()
    num_items = scorer.num_items
    lengths = np.array([len(items[p]) for p in feasible], dtype=np.int64)
    steps = int(lengths.max())
    sequence = np.zeros((len(feasible), max(steps, 1)), dtype=np.int64)  # item of each step
    for k, p in enumerate(feasible):
        sequence[k, :lengths[k]] = np.asarray(items[p], dtype=np.int64)[list(orders[p])]

    lane_problem = np.repeat(np.arange(len(feasible)), num_scales)
    lane_scale = np.tile(np.arange(num_scales), len(feasible))
    lane_length = lengths[lane_problem]
    caps = np.array([[scale * total_dims[p] / num_devices + _CAP_SLACK for scale in scales]
                     for p in feasible]).reshape(-1)
    num_lanes = len(lane_problem)
    sums = np.zeros((num_lanes, num_devices, emb.shape[1]), dtype=np.float32)
    flat_sums = sums.reshape(num_lanes * num_devices, emb.shape[1])  # a view: lane * D + device
    counts = np.zeros((num_lanes, num_devices), dtype=np.int64)
    free = np.tile(np.asarray(cluster.memory_per_device_bytes, dtype=np.int64), (num_lanes, 1))
    dims = np.zeros((num_lanes, num_devices), dtype=np.int64)
    chosen = np.zeros((num_lanes, steps), dtype=np.int32)
    group = np.zeros(num_lanes, dtype=np.int64)  # every lane starts from the empty state
    # Per lane and device, an id of the device's contents: the same shards added in the
    # same order (so bit-identical embedding sums) have the same id; 0 is empty.
    dedup = num_lanes * num_devices >= _DEDUP_CELLS
    device = np.zeros((num_lanes, num_devices) if dedup else (0, 0), dtype=np.int64)
    next_device = 1
    alive = np.ones(num_lanes, dtype=bool)
    errors: dict[int, PlanInfeasibleError] = {}

    for step in range(steps):
        idx = np.flatnonzero(alive & (lane_length > step))
        if not idx.size:
            break
        item = sequence[lane_problem[idx], step]
        first, inv = _distinct(group[idx] * num_items + item)
        reps, rep_item = idx[first], item[first]
        mem_ok = (free[reps] >= need_of[rep_item][:, None])[inv]  # (lanes, devices)
        allowed = mem_ok & (dims[idx] + width_of[item][:, None] <= caps[idx][:, None])
        uncapped = ~allowed.any(axis=1)
        allowed[uncapped] = mem_ok[uncapped]  # no device within the dim cap: drop the cap
        stuck = ~mem_ok.any(axis=1)
        if stuck.any():
            for lane in idx[stuck].tolist():
                p = feasible[lane_problem[lane]]
                if p not in errors:
                    spec = scorer.spec(int(sequence[lane_problem[lane], step]))
                    errors[p] = no_room(spec, free[lane].tolist())
            alive[idx[stuck]] = False
            keep = ~stuck
            idx, item, inv, allowed = idx[keep], item[keep], inv[keep], allowed[keep]
            if not idx.size:
                continue
        # Price each (group, device) pair that some lane of the group may choose.
        order, starts = _first_per_group(inv, len(reps))
        present = np.bincount(inv, minlength=len(reps)) > 0
        wanted = np.zeros((len(reps), num_devices), dtype=bool)
        wanted[present] = np.logical_or.reduceat(allowed[order], starts[present], axis=0)
        r_pos, d_pos = np.nonzero(wanted)
        price = np.full((len(reps), num_devices), np.inf)
        if dedup and len(r_pos) >= _DEDUP_ROWS:
            # Devices with equal contents (across groups too) and the same next shard are
            # priced once: many devices of two lanes that diverged still agree.
            first, same = _distinct(device[reps[r_pos], d_pos] * num_items + rep_item[r_pos])
            rows = flat_sums.take(reps[r_pos[first]] * num_devices + d_pos[first], axis=0)
            rows += emb.take(rep_item[r_pos[first]], axis=0)
            price[r_pos, d_pos] = scorer.compute_sums(rows)[same]
        else:
            rows = flat_sums.take(reps[r_pos] * num_devices + d_pos, axis=0)
            rows += emb.take(rep_item[r_pos], axis=0)
            price[r_pos, d_pos] = scorer.compute_sums(rows)
        choice = np.where(allowed, price[inv], np.inf).argmin(axis=1)

        if dedup:
            fresh = _distinct(device[idx, choice] * num_items + item)[1]
            device[idx, choice] = next_device + fresh
            next_device += int(fresh.max()) + 1
        flat_sums[idx * num_devices + choice] += emb.take(item, axis=0)
        counts[idx, choice] += 1
        free[idx, choice] -= need_of[item]
        dims[idx, choice] += width_of[item]
        chosen[idx, step] = choice
        group[idx] = _distinct(inv * num_devices + choice)[1]

    done = np.flatnonzero(alive)
    results: dict[int, Placement | PlanInfeasibleError] = dict(errors)
    if done.size:
        # Lanes of one length finished at one step: equal group ids mean equal placements.
        first, inv = _distinct(lane_length[done] * num_lanes + group[done])
        final = done[first]
        busy = counts[final] > 0
        compute = np.zeros(busy.shape)
        compute[busy] = scorer.compute_sums(sums[final][busy])
        cost = scorer.plan_ms(compute, dims[final])[inv]
        # per problem, the cheapest lane; ties keep the earlier grid point
        ranked = np.lexsort((lane_scale[done], cost, lane_problem[done]))
        best = ranked[np.r_[True, np.diff(lane_problem[done][ranked]) != 0]]
        for k in best.tolist():
            lane = done[k]
            p = feasible[lane_problem[lane]]
            devices = np.zeros(lengths[lane_problem[lane]], dtype=np.int64)
            devices[list(orders[p])] = chosen[lane, :len(devices)]
            results[p] = Placement(tuple(devices.tolist()), float(cost[k]),
                                   scales[lane_scale[lane]])
    return results


def place(shard_specs: Sequence[TableSpec], cluster: Cluster, estimator: CostEstimator, *,
          scales: Sequence[float] = GRID_SCALES, scorer: Scorer | None = None) -> Placement:
    """Greedy grid placement of one list of shard specs; raises :class:`PlanInfeasibleError`."""
    scorer = scorer if scorer is not None else Scorer(estimator)
    result = place_many([shard_specs], cluster, scorer, scales=scales)[0]
    if isinstance(result, PlanInfeasibleError):
        raise result
    return result


def greedy_grid(tables: Sequence[TableSpec], cluster: Cluster, estimator: CostEstimator, *,
                seed: int = 0, budget_s: float | None = None,
                splits: Mapping[str, Sequence[int]] | None = None,
                scales: Sequence[float] = GRID_SCALES) -> Plan:
    """Greedy grid search over ``tables`` split as ``splits`` (default: table-wise).

    Deterministic and fast; ``seed`` and ``budget_s`` are accepted for the
    :class:`~neuroshard.types.Searcher` signature.
    """
    specs = shard_specs(tables, splits)
    placement = place(specs, cluster, estimator, scales=scales)
    logger.debug("greedy grid: %d shards, best scale %.2f, cost %.4f ms",
                 len(specs), placement.scale, placement.cost_ms)
    plan = to_plan(tables, cluster, specs, placement.devices)
    return replace(plan, meta={"scale": placement.scale})

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from neuroshard.feasibility import format_bytes
from neuroshard.search.scoring import EMPTY_LOAD, LoadKey, Scorer
from neuroshard.traffic import NUM_FIXED
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


def no_room(
    spec: TableSpec, free_bytes: Sequence[int], need: int | None = None, what: str = "device memory"
) -> PlanInfeasibleError:
    """The error when no device has room left for ``spec`` (``need`` bytes, default its
    weights) in a partial placement."""
    need = spec.size_bytes if need is None else need
    return PlanInfeasibleError(
        f"no device has room for table {spec.name!r} (width {spec.dim}: "
        f"{format_bytes(need)} needed); largest free {what} "
        f"{format_bytes(max(free_bytes))}, {format_bytes(sum(free_bytes))} free in total"
    )


# --------------------------------------------------------------------------- shards <-> plans


def shard_specs(
    tables: Sequence[TableSpec], splits: Mapping[str, Sequence[int]] | None = None
) -> list[TableSpec]:
    """Column shards of ``tables`` as narrowed specs, tables in order, widths as given.

    ``splits`` maps a table name to its shard widths (default: one shard of full dim).
    """
    splits = splits or {}
    unknown = set(splits) - {t.name for t in tables}
    if unknown:
        raise TableSpecError(f"splits name unknown tables {sorted(unknown)}", field_name="splits")
    specs: list[TableSpec] = []
    for t in tables:
        widths = tuple(splits.get(t.name, (t.dim,)))
        if sum(widths) != t.dim or any(w <= 0 or w % DIM_MULTIPLE for w in widths):
            raise TableSpecError(
                f"shard widths {widths} must be positive multiples of {DIM_MULTIPLE} "
                f"summing to dim {t.dim}",
                table=t.name,
                field_name="splits",
            )
        specs.extend(t.with_dim(w) for w in widths)
    return specs


def to_plan(
    tables: Sequence[TableSpec],
    cluster: Cluster,
    specs: Sequence[TableSpec],
    devices: Sequence[int],
) -> Plan:
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


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """One placement for the greedy grid: pieces to place on top of what is placed already.

    ``pieces``: each a tuple of scorer item ids that go to one device together (one item
    for a shard; a co-located group several). ``allowed``: per piece, the devices it may
    take (None or empty: any). ``preplaced``: per device, the items already there (row
    blocks, data-parallel replicas; empty: nothing). ``fixed``: the problem's fixed
    traffic ``(NUM_FIXED, num_devices)`` (:func:`neuroshard.traffic.fixed_traffic`;
    None: none).
    """

    pieces: tuple[tuple[int, ...], ...]
    allowed: tuple[tuple[int, ...] | None, ...] = ()
    preplaced: tuple[tuple[int, ...], ...] = ()
    fixed: np.ndarray | None = field(default=None, compare=False, hash=False)

    def allowed_of(self, j: int) -> tuple[int, ...] | None:
        return self.allowed[j] if self.allowed and self.allowed[j] else None


class _Pieces:
    """The distinct pieces of one :func:`place_many` call, as arrays by piece id."""

    def __init__(self, scorer: Scorer, cluster: Cluster):
        self.scorer, self.num_devices = scorer, cluster.num_devices
        self.ids: dict[tuple, int] = {}
        self.members: list[tuple[int, ...]] = []
        self.allowed: list[tuple[int, ...] | None] = []

    def intern(self, members: tuple[int, ...], allowed: tuple[int, ...] | None) -> int:
        key = (members, allowed)
        found = self.ids.get(key)
        if found is None:
            found = self.ids[key] = len(self.members)
            self.members.append(members)
            self.allowed.append(allowed)
        return found

    def finalize(self) -> None:
        sc = self.scorer
        need, host = sc.sizes_bytes(), sc.host_sizes_bytes()
        width, lookups, link = sc.widths(), sc.lookups(), sc.host_link_bytes()

        def total(values: np.ndarray, dtype: type) -> np.ndarray:
            return np.asarray([values[list(m)].sum() for m in self.members], dtype=dtype)

        self.need = total(need, np.int64)
        self.host_need = total(host, np.int64)
        self.width = total(width, float)
        self.lookups = total(lookups, float)
        self.link = total(link, float)
        self.count = np.asarray([len(m) for m in self.members], dtype=np.int64)
        self.mask = np.ones((len(self.members), self.num_devices), dtype=bool)
        for p, allowed in enumerate(self.allowed):
            if allowed is not None:
                self.mask[p] = False
                self.mask[p, list(allowed)] = True

    def spec(self, piece: int) -> TableSpec:
        return self.scorer.spec(self.members[piece][0])


class _Start(NamedTuple):
    """What a problem's devices hold before the grid places anything."""

    keys: tuple[LoadKey, ...]
    free: tuple[int, ...]
    host_free: tuple[int, ...]
    dims: tuple[float, ...]
    fixed: np.ndarray


def _start(problem: Problem, cluster: Cluster, scorer: Scorer) -> _Start:
    n = cluster.num_devices
    keys = [EMPTY_LOAD] * n
    free, host_free = list(cluster.hbm_budget_bytes), list(cluster.host_budget_bytes)
    dims = [0.0] * n
    for d, items in enumerate(problem.preplaced):
        keys[d] = tuple(sorted(items))
        free[d] -= sum(scorer.hbm_need(i) for i in items)
        host_free[d] -= sum(scorer.host_need(i) for i in items)
        dims[d] = float(scorer.dim_sum(keys[d]))
    fixed = np.zeros((NUM_FIXED, n)) if problem.fixed is None else problem.fixed
    return _Start(tuple(keys), tuple(free), tuple(host_free), tuple(dims), fixed)


def _problem_error(
    pieces: Sequence[int], table: _Pieces, start: _Start, cluster: Cluster
) -> PlanInfeasibleError | None:
    """The error when ``pieces`` cannot fit on top of ``start`` whatever the placement: a
    piece larger than every device it may take, or more bytes than are free in total."""
    for what, left, cap in (
        ("HBM", start.free, cluster.hbm_budget_bytes),
        ("host memory", start.host_free, cluster.host_budget_bytes),
    ):
        d = int(np.argmin(left))
        if left[d] < 0:
            names = sorted({table.scorer.spec(i).name for i in start.keys[d]})
            return PlanInfeasibleError(
                f"row blocks and replicas of tables {', '.join(map(repr, names))} alone "
                f"need {format_bytes(cap[d] - left[d])} of {what} on device {d}, which has "
                f"{format_bytes(cap[d])}"
            )
    free, host_free = np.asarray(start.free), np.asarray(start.host_free)
    too_big = [
        p
        for p in pieces
        if table.need[p] > free[table.mask[p]].max(initial=-1)
        or table.host_need[p] > host_free[table.mask[p]].max(initial=-1)
    ]
    if too_big:
        listed = ", ".join(
            f"{table.spec(p).name!r} (width {table.spec(p).dim}: "
            f"{format_bytes(int(table.need[p]))})"
            for p in too_big
        )
        return PlanInfeasibleError(
            f"larger than any device: {listed}; largest device memory "
            f"{format_bytes(int(free.max()))}, total {format_bytes(int(free.sum()))} on "
            f"{cluster.num_devices} devices"
        )
    need = int(table.need[list(pieces)].sum())
    if need > free.sum() or table.host_need[list(pieces)].sum() > host_free.sum():
        biggest = sorted(pieces, key=lambda p: -table.need[p])[:3]
        return PlanInfeasibleError(
            f"{len(pieces)} tables need {format_bytes(need)} but the {cluster.num_devices} "
            f"devices have {format_bytes(int(free.sum()))} in total (largest: "
            + ", ".join(
                f"{table.spec(p).name!r} {format_bytes(int(table.need[p]))}" for p in biggest
            )
            + ")"
        )
    return None


# --------------------------------------------------------------------------- placement


class _State(NamedTuple):
    """A partial placement shared by every grid lane that has made the same choices."""

    keys: tuple[LoadKey, ...]  # per device, the scorer's key of its shards
    free: tuple[int, ...]  # per device, HBM left (bytes)
    host_free: tuple[int, ...]  # per device, host memory left (bytes)
    dims: tuple[float, ...]  # per device, sum of all-to-all widths
    path: tuple | None  # devices chosen so far, newest first, as nested (device, rest) pairs
    start: int  # index of the problem start it grew from


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


def _choices(
    fits: tuple[int, ...], dims_after: list[float], caps: Sequence[float], wanted: int
) -> list[tuple[tuple[int, ...], int]]:
    """The devices each wanted dim cap allows, as ``(devices, mask of caps)`` pairs.

    ``dims_after[i]`` is device ``fits[i]``'s dim sum with the shard added; cap ``s`` (bit
    ``s`` of ``wanted``) allows the devices within it, or all of ``fits`` when none is.
    """
    if not wanted & (wanted - 1):  # one cap: the common case once grid points diverge
        cap = caps[wanted.bit_length() - 1]
        return [
            (
                tuple(d for d, dim in zip(fits, dims_after, strict=True) if dim <= cap) or fits,
                wanted,
            )
        ]
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


def place_many(
    problems: Sequence[Sequence[TableSpec] | Problem],
    cluster: Cluster,
    scorer: Scorer,
    *,
    scales: Sequence[float] = GRID_SCALES,
) -> list[Placement | PlanInfeasibleError]:
    """Greedy grid placement of each problem, all in lockstep.

    A problem is a list of shard specs (each a table- or column-wise ``fused`` shard, placed
    alone, anywhere) or a :class:`Problem` (pieces of scorer items, allowed devices, what
    is placed already and its fixed traffic). Returns, per problem, its best
    :class:`Placement` (a device per piece, in the order given), or the
    :class:`PlanInfeasibleError` that stopped every grid point (returned, not raised, so
    a beam can drop the child).

    A *lane* is one grid point (scale) of one problem. Lanes whose choices so far agree
    share their state -- the grid points of a problem agree until their dim caps bind, and
    beam children until the first shard that one of them split -- so each step prices one
    "device + shard" per distinct state and device, not per lane. With an additive
    estimator (:attr:`Scorer.additive`) the lanes live in numpy arrays and a step is one
    head call (:func:`_place_arrays`); otherwise states are shared tuples of load keys and
    a step is one cached ``compute_ms`` call (:func:`_place_keys`). Both give the same
    placements up to float rounding of the compute values. A device is a candidate for a
    piece when it has the HBM and host memory the piece needs and the piece may take it.
    """
    if not scales:
        raise ValueError("place_many needs at least one scale")
    results: list[Placement | PlanInfeasibleError | None] = [None] * len(problems)
    normal = [
        p if isinstance(p, Problem) else Problem(tuple((scorer.item(s),) for s in p))
        for p in problems
    ]
    table = _Pieces(scorer, cluster)
    pieces = [
        [table.intern(tuple(members), prob.allowed_of(j)) for j, members in enumerate(prob.pieces)]
        for prob in normal
    ]
    table.finalize()
    flat = [i for row in pieces for p in row for i in table.members[p]]
    single_of = dict(zip(flat, scorer.singles(flat).tolist(), strict=True))

    starts: list[_Start] = []
    start_ids: dict[tuple, int] = {}
    start_of: list[int] = []
    orders: list[list[int]] = []  # per problem, the placement order of its pieces
    total_dims: list[float] = []
    feasible: list[int] = []
    for p, prob in enumerate(normal):
        single = [sum(single_of[i] for i in table.members[q]) for q in pieces[p]]
        orders.append(sorted(range(len(single)), key=lambda j: -single[j]))
        total_dims.append(float(sum(table.width[q] for q in pieces[p])))
        start = _start(prob, cluster, scorer)
        ident = (start.keys, np.asarray(start.fixed).tobytes())
        if ident not in start_ids:
            start_ids[ident] = len(starts)
            starts.append(start)
        start_of.append(start_ids[ident])
        error = _problem_error(pieces[p], table, start, cluster)
        if error is not None:
            results[p] = error
        else:
            feasible.append(p)
    if feasible:
        place_lanes = _place_arrays if scorer.additive else _place_keys
        found = place_lanes(
            feasible, pieces, orders, total_dims, cluster, scorer, scales, table, starts, start_of
        )
        for p, result in found.items():
            results[p] = result
    return results  # type: ignore[return-value]


def _place_keys(
    feasible: Sequence[int],
    pieces: Sequence[Sequence[int]],
    orders: Sequence[Sequence[int]],
    total_dims: Sequence[float],
    cluster: Cluster,
    scorer: Scorer,
    scales: Sequence[float],
    table: _Pieces,
    starts: Sequence[_Start],
    start_of: Sequence[int],
) -> dict[int, Placement | PlanInfeasibleError]:
    """The lockstep grid over shared :class:`_State` tuples of load keys (any estimator).

    A group's lanes are kept as ``(problem, mask)`` bundles, bit ``s`` of the mask
    standing for ``scales[s]``.
    """
    num_devices = cluster.num_devices
    caps_of = {
        total: [scale * total / num_devices + _CAP_SLACK for scale in scales]
        for total in set(total_dims)
    }  # per total dim, each scale's dim cap
    all_scales = (1 << len(scales)) - 1
    results: dict[int, Placement | PlanInfeasibleError] = {}
    groups: list[tuple[_State, list[tuple[int, int]]]] = []
    by_start: dict[int, list[tuple[int, int]]] = {}
    for p in feasible:
        by_start.setdefault(start_of[p], []).append((p, all_scales))
    for k, bundles in by_start.items():
        st = starts[k]
        groups.append((_State(st.keys, st.free, st.host_free, st.dims, None, k), bundles))
    finished: list[tuple[int, int, _State]] = []
    errors: list[tuple[int, PlanInfeasibleError]] = []
    add = Scorer.add
    every = tuple(range(num_devices))
    step = 0
    while groups:
        queries: list[LoadKey] = []
        pending = []
        for state, members in groups:
            by_piece: dict[int, list[tuple[int, int]]] = {}
            for p, mask in members:
                if step == len(orders[p]):
                    finished.append((p, mask, state))
                else:
                    by_piece.setdefault(pieces[p][orders[p][step]], []).append((p, mask))
            for piece, same_piece in by_piece.items():
                need, host_need = int(table.need[piece]), int(table.host_need[piece])
                width = float(table.width[piece])
                allowed = table.allowed[piece] or every
                fits = tuple(
                    d for d in allowed if state.free[d] >= need and state.host_free[d] >= host_need
                )
                if not fits:
                    spec = table.spec(piece)
                    if any(state.free[d] >= need for d in allowed):
                        error = no_room(
                            spec, [state.host_free[d] for d in allowed], host_need, "host memory"
                        )
                    else:
                        error = no_room(spec, [state.free[d] for d in allowed], need)
                    errors.extend((p, error) for p, _ in same_piece)
                    continue
                # Split the bundles by the devices their dim caps allow (caps depend on
                # the problem's total dim: the same for every beam child).
                by_total: dict[float, list[tuple[int, int]]] = {}
                for p, mask in same_piece:
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
                items = table.members[piece]
                for capped, same_choice in by_choice.items():
                    keys = []
                    for d in capped:
                        key = state.keys[d]
                        for item in items:
                            key = add(key, item)
                        keys.append(key)
                    queries.extend(keys)
                    pending.append((state, need, host_need, width, capped, keys, same_choice))
        values = scorer.compute(queries).tolist()
        groups = []
        pos = 0
        for state, need, host_need, width, capped, keys, members in pending:
            vals = values[pos : pos + len(capped)]
            pos += len(capped)
            k = min(range(len(capped)), key=vals.__getitem__)
            d = capped[k]
            groups.append(
                (
                    _State(
                        state.keys[:d] + (keys[k],) + state.keys[d + 1 :],
                        state.free[:d] + (state.free[d] - need,) + state.free[d + 1 :],
                        state.host_free[:d]
                        + (state.host_free[d] - host_need,)
                        + state.host_free[d + 1 :],
                        state.dims[:d] + (state.dims[d] + width,) + state.dims[d + 1 :],
                        (d, state.path),
                        state.start,
                    ),
                    members,
                )
            )
        step += 1

    unique = list({id(state): state for _, _, state in finished}.values())
    fixed = np.stack([starts[s.start].fixed for s in unique]) if unique else None
    cost_of = dict(
        zip(map(id, unique), scorer.score([s.keys for s in unique], fixed).tolist(), strict=True)
    )
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


def _place_arrays(
    feasible: Sequence[int],
    pieces: Sequence[Sequence[int]],
    orders: Sequence[Sequence[int]],
    total_dims: Sequence[float],
    cluster: Cluster,
    scorer: Scorer,
    scales: Sequence[float],
    table: _Pieces,
    starts: Sequence[_Start],
    start_of: Sequence[int],
) -> dict[int, Placement | PlanInfeasibleError]:
    """The lockstep grid in numpy arrays, for an additive estimator.

    Lane ``l`` is problem ``feasible[l // S]`` at scale ``l % S``. Each lane holds, per
    device, the sum of its shards' embeddings, shard count, free HBM and host memory, dim
    sum, ids received and host-link bytes. Lanes with equal states carry equal group ids
    (same group and same next piece: same costs; same choice too: same new group), so a
    step prices each (group, piece) pair once on the devices that any of its lanes may
    take -- memory, allowed-device and dim-cap masks over lanes x devices -- in one head
    call on the summed embeddings.

    On big grids (lanes x devices >= ``_DEDUP_CELLS``) each device's contents also carry an
    id (the same shards added in the same order: bit-identical sums), and (contents, piece)
    pairs are priced once across groups. Lanes that diverged -- beam children after the
    table one of them split, grid points after a dim cap bound -- still share most devices,
    so this halves the rows priced at 1,000 tables on 128 devices, and more in later beam
    steps.
    """
    num_devices, num_scales = cluster.num_devices, len(scales)
    emb = scorer.embeddings()
    num_pieces = len(table.members)
    piece_emb = np.zeros((num_pieces, emb.shape[1]), dtype=np.float32)
    for q, members in enumerate(table.members):
        if len(members) == 1:
            piece_emb[q] = emb[members[0]]
        else:
            piece_emb[q] = emb[list(members)].sum(axis=0)
    need_of, host_need_of, width_of = table.need, table.host_need, table.width
    lengths = np.array([len(pieces[p]) for p in feasible], dtype=np.int64)
    steps = int(lengths.max())
    sequence = np.zeros((len(feasible), max(steps, 1)), dtype=np.int64)  # piece of each step
    for k, p in enumerate(feasible):
        sequence[k, : lengths[k]] = np.asarray(pieces[p], dtype=np.int64)[list(orders[p])]

    lane_problem = np.repeat(np.arange(len(feasible)), num_scales)
    lane_scale = np.tile(np.arange(num_scales), len(feasible))
    lane_length = lengths[lane_problem]
    lane_start = np.asarray([start_of[feasible[k]] for k in range(len(feasible))], dtype=np.int64)[
        lane_problem
    ]
    caps = np.array(
        [[scale * total_dims[p] / num_devices + _CAP_SLACK for scale in scales] for p in feasible]
    ).reshape(-1)
    num_lanes = len(lane_problem)
    # Per start: its devices' embedding sums, counts, free memories, dims and traffic.
    start_sums = np.zeros((len(starts), num_devices, emb.shape[1]), dtype=np.float32)
    start_counts = np.zeros((len(starts), num_devices), dtype=np.int64)
    start_lookups = np.zeros((len(starts), num_devices))
    start_link = np.zeros((len(starts), num_devices))
    lookups_of, link_of = scorer.lookups(), scorer.host_link_bytes()
    for k, st in enumerate(starts):
        for d, key in enumerate(st.keys):
            if key:
                start_sums[k, d] = emb[list(key)].sum(axis=0)
                start_counts[k, d] = len(key)
                start_lookups[k, d] = lookups_of[list(key)].sum()
                start_link[k, d] = link_of[list(key)].sum()
    sums = start_sums[lane_start]  # (lanes, devices, E), a copy
    flat_sums = sums.reshape(num_lanes * num_devices, emb.shape[1])  # a view: lane * D + device
    counts = start_counts[lane_start]
    free = np.asarray([st.free for st in starts], dtype=np.int64)[lane_start]
    host_free = np.asarray([st.host_free for st in starts], dtype=np.int64)[lane_start]
    dims = np.asarray([st.dims for st in starts], dtype=float)[lane_start]
    lookups = start_lookups[lane_start]
    link = start_link[lane_start]
    chosen = np.zeros((num_lanes, steps), dtype=np.int32)
    group = lane_start.copy()  # lanes start in the group of their problem's start
    # Per lane and device, an id of the device's contents: the same shards added in the
    # same order (so bit-identical embedding sums) have the same id; 0 is empty.
    dedup = num_lanes * num_devices >= _DEDUP_CELLS
    device = np.zeros((num_lanes, num_devices) if dedup else (0, 0), dtype=np.int64)
    next_device = 1
    if dedup:
        contents: dict[LoadKey, int] = {EMPTY_LOAD: 0}
        for k, st in enumerate(starts):
            ids = [contents.setdefault(key, len(contents)) for key in st.keys]
            device[lane_start == k] = ids
        next_device = len(contents)
    alive = np.ones(num_lanes, dtype=bool)
    errors: dict[int, PlanInfeasibleError] = {}

    for step in range(steps):
        idx = np.flatnonzero(alive & (lane_length > step))
        if not idx.size:
            break
        piece = sequence[lane_problem[idx], step]
        first, inv = _distinct(group[idx] * num_pieces + piece)
        reps, rep_piece = idx[first], piece[first]
        mem_ok = (
            (free[reps] >= need_of[rep_piece][:, None])
            & (host_free[reps] >= host_need_of[rep_piece][:, None])
            & table.mask[rep_piece]
        )[inv]  # (lanes, devices)
        allowed = mem_ok & (dims[idx] + width_of[piece][:, None] <= caps[idx][:, None])
        uncapped = ~allowed.any(axis=1)
        allowed[uncapped] = mem_ok[uncapped]  # no device within the dim cap: drop the cap
        stuck = ~mem_ok.any(axis=1)
        if stuck.any():
            for lane in idx[stuck].tolist():
                p = feasible[lane_problem[lane]]
                if p not in errors:
                    q = int(sequence[lane_problem[lane], step])
                    ok = table.mask[q]
                    if (free[lane][ok] >= need_of[q]).any():
                        errors[p] = no_room(
                            table.spec(q),
                            host_free[lane][ok].tolist(),
                            int(host_need_of[q]),
                            "host memory",
                        )
                    else:
                        errors[p] = no_room(table.spec(q), free[lane][ok].tolist(), int(need_of[q]))
            alive[idx[stuck]] = False
            keep = ~stuck
            idx, piece, inv, allowed = idx[keep], piece[keep], inv[keep], allowed[keep]
            if not idx.size:
                continue
        # Price each (group, device) pair that some lane of the group may choose.
        order, starts_at = _first_per_group(inv, len(reps))
        present = np.bincount(inv, minlength=len(reps)) > 0
        wanted = np.zeros((len(reps), num_devices), dtype=bool)
        wanted[present] = np.logical_or.reduceat(allowed[order], starts_at[present], axis=0)
        r_pos, d_pos = np.nonzero(wanted)
        price = np.full((len(reps), num_devices), np.inf)
        if dedup and len(r_pos) >= _DEDUP_ROWS:
            # Devices with equal contents (across groups too) and the same next piece are
            # priced once: many devices of two lanes that diverged still agree.
            first, same = _distinct(device[reps[r_pos], d_pos] * num_pieces + rep_piece[r_pos])
            rows = flat_sums.take(reps[r_pos[first]] * num_devices + d_pos[first], axis=0)
            rows += piece_emb.take(rep_piece[r_pos[first]], axis=0)
            price[r_pos, d_pos] = scorer.compute_sums(rows)[same]
        else:
            rows = flat_sums.take(reps[r_pos] * num_devices + d_pos, axis=0)
            rows += piece_emb.take(rep_piece[r_pos], axis=0)
            price[r_pos, d_pos] = scorer.compute_sums(rows)
        choice = np.where(allowed, price[inv], np.inf).argmin(axis=1)

        if dedup:
            fresh = _distinct(device[idx, choice] * num_pieces + piece)[1]
            device[idx, choice] = next_device + fresh
            next_device += int(fresh.max()) + 1
        flat_sums[idx * num_devices + choice] += piece_emb.take(piece, axis=0)
        counts[idx, choice] += table.count[piece]
        free[idx, choice] -= need_of[piece]
        host_free[idx, choice] -= host_need_of[piece]
        dims[idx, choice] += width_of[piece]
        lookups[idx, choice] += table.lookups[piece]
        link[idx, choice] += table.link[piece]
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
        fixed = np.stack([starts[k].fixed for k in lane_start[final]])
        cost = scorer.plan_ms(
            compute, dims[final], lookups=lookups[final], host_link=link[final], fixed=fixed
        )[inv]
        # per problem, the cheapest lane; ties keep the earlier grid point
        ranked = np.lexsort((lane_scale[done], cost, lane_problem[done]))
        best = ranked[np.r_[True, np.diff(lane_problem[done][ranked]) != 0]]
        for k in best.tolist():
            lane = done[k]
            p = feasible[lane_problem[lane]]
            devices = np.zeros(lengths[lane_problem[lane]], dtype=np.int64)
            devices[list(orders[p])] = chosen[lane, : len(devices)]
            results[p] = Placement(
                tuple(devices.tolist()), float(cost[k]), scales[lane_scale[lane]]
            )
    return results


def place(
    shard_specs: Sequence[TableSpec],
    cluster: Cluster,
    estimator: CostEstimator,
    *,
    scales: Sequence[float] = GRID_SCALES,
    scorer: Scorer | None = None,
) -> Placement:
    """Greedy grid placement of one list of shard specs; raises :class:`PlanInfeasibleError`."""
    scorer = scorer if scorer is not None else Scorer(estimator, cluster=cluster)  # as plan_cost
    result = place_many([shard_specs], cluster, scorer, scales=scales)[0]
    if isinstance(result, PlanInfeasibleError):
        raise result
    return result


def greedy_grid(
    tables: Sequence[TableSpec],
    cluster: Cluster,
    estimator: CostEstimator,
    *,
    seed: int = 0,
    budget_s: float | None = None,
    splits: Mapping[str, Sequence[int]] | None = None,
    scales: Sequence[float] = GRID_SCALES,
) -> Plan:
    """Greedy grid search over ``tables`` split as ``splits`` (default: table-wise).

    Deterministic and fast; ``seed`` and ``budget_s`` are accepted for the
    :class:`~neuroshard.types.Searcher` signature.
    """
    specs = shard_specs(tables, splits)
    placement = place(specs, cluster, estimator, scales=scales)
    logger.debug(
        "greedy grid: %d shards, best scale %.2f, cost %.4f ms",
        len(specs),
        placement.scale,
        placement.cost_ms,
    )
    plan = to_plan(tables, cluster, specs, placement.devices)
    return replace(plan, meta={"scale": placement.scale})

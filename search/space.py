"""The sharding space the searches walk: a :class:`Layout` per table, and what it places.

A layout fixes how a table is sharded before devices are chosen: its sharding type (the
``columns`` kind covers ``table_wise``, one shard, and ``column_wise``, several), its
column widths, compute kernel and cache fraction, and for ``table_row_wise`` its host. A
search state is one layout per table (:data:`State`). :class:`Space` turns a state into a
greedy-grid :class:`~neuroshard.search.greedy.Problem`:

* ``columns`` shards are *pieces* the grid places (co-located tables form one piece;
  pinned tables may take only their devices);
* ``row_wise`` row blocks are pre-placed one per allowed device (TorchRec spreads them
  over all ranks), ``table_row_wise`` blocks one per device of the layout's host, and a
  ``data_parallel`` replica on every device; their collectives are the problem's fixed
  traffic (:func:`neuroshard.traffic.fixed_traffic`);

and a placement back into a :class:`~neuroshard.types.Plan`. It also proposes the moves
a beam step tries (:meth:`Space.moves`) and a start state that fits memory
(:meth:`Space.initial_state`), honouring :class:`~neuroshard.types.Constraints`.

Footprints count the cluster's optimizer state; HBM is the cluster's budget after its
reserve. ``fused_uvm_caching`` shards keep their weights in host memory and
``cache_fraction`` of them in HBM; their misses cross the host link.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple, cast

import numpy as np

from neuroshard.feasibility import format_bytes
from neuroshard.search.greedy import Placement, Problem
from neuroshard.search.scoring import Scorer
from neuroshard.traffic import combine, fixed_traffic, uvm_host_bytes
from neuroshard.types import (
    DIM_MULTIPLE,
    Cluster,
    ComputeKernel,
    ConstraintError,
    Constraints,
    Plan,
    PlanInfeasibleError,
    Shard,
    TableSpec,
    embedding_bytes,
    io_buffer_bytes,
    shard_hbm_bytes,
    shard_host_bytes,
)

logger = logging.getLogger(__name__)

COLUMNS, ROW_WISE, TABLE_ROW_WISE, DATA_PARALLEL = (
    "columns",
    "row_wise",
    "table_row_wise",
    "data_parallel",
)
UVM = "fused_uvm_caching"
# Cache fractions a fused_uvm_caching table may take (the start state takes the largest
# that fits; moves go up the ladder).
CACHE_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# A table is a data-parallel candidate when its replica takes at most this share of the
# smallest device's HBM budget, and when the all-reduce of its gradient that every device
# joins, 2 R w 4 bytes, is at most what each device stops receiving in the all-to-all,
# B w 4 / N bytes, i.e. R <= B / (2 N) rows (traffic.py's formulas).
DP_MAX_SHARE = 0.02


class Layout(NamedTuple):
    """How one table is placed before devices are chosen (see the module doc)."""

    kind: str = COLUMNS
    widths: tuple[int, ...] = ()  # columns: shard widths, widest first
    kernel: str = "fused"
    cache_fraction: float | None = None
    host: int = -1  # table_row_wise: its host

    def sharding_type(self) -> str:
        if self.kind == COLUMNS:
            return "table_wise" if len(self.widths) == 1 else "column_wise"
        return self.kind


State = tuple[Layout, ...]


def halve(widths: tuple[int, ...]) -> tuple[int, ...] | None:
    """``widths`` with the widest shard halved, or None when the half is not a multiple of 4."""
    widest = widths[0]
    half = widest // 2
    if widest % 2 or half % DIM_MULTIPLE or half < DIM_MULTIPLE:
        return None
    return tuple(sorted(widths[1:] + (half, half), reverse=True))


def row_blocks(rows: int, parts: int) -> list[tuple[int, int]]:
    """``rows`` cut into at most ``parts`` contiguous blocks the way TorchRec's row-wise
    sharding cuts them: ``ceil(rows / parts)`` rows each, the last the remainder; blocks
    that would be empty are left out (their ranks hold no rows)."""
    block = math.ceil(rows / parts)
    return [(lo, min(lo + block, rows)) for lo in range(0, rows, block)]


class Space:
    """The sharding space of ``tables`` on ``cluster`` under ``constraints``, with the
    scorer that interns its shards (see the module doc)."""

    def __init__(
        self,
        tables: Sequence[TableSpec],
        cluster: Cluster,
        scorer: Scorer,
        constraints: Constraints | None = None,
    ):
        self.tables = list(tables)
        self.cluster = cluster
        self.scorer = scorer
        self.constraints = constraints or Constraints()
        self.constraints.check(self.tables, cluster)
        self.optimizer = cluster.optimizer
        self.budget = cluster.hbm_budget_bytes
        self.host_budget = cluster.host_budget_bytes
        self.index = {t.name: i for i, t in enumerate(self.tables)}
        self.rules = [self.constraints.of(t.name) for t in self.tables]
        self.allowed = [r.allowed_devices(cluster) for r in self.rules]
        # Co-located tables: group id per table (-1: none), groups as table indices.
        self.group_of = [-1] * len(self.tables)
        self.groups: list[tuple[int, ...]] = []
        for group in self.constraints.colocate:
            members = tuple(self.index[name] for name in group)
            for i in members:
                self.group_of[i] = len(self.groups)
            self.groups.append(members)
        self._items: dict[tuple[int, Layout], list[tuple[int, int]]] = {}
        self._fixed: dict[tuple[int, Layout], np.ndarray] = {}
        # The most shards per device the estimator was trained on (None: no known limit).
        ranges = getattr(scorer.estimator, "training_ranges_", None) or {}
        limit = ranges.get("tables_per_device") if isinstance(ranges, dict) else None
        self.max_load: float | None = float(limit[1]) if limit else None

    # ------------------------------------------------------------------ shards of a layout

    def _kernel_args(self, layout: Layout) -> tuple[ComputeKernel, float | None]:
        kernel = cast(ComputeKernel, layout.kernel)  # a Layout holds one of COMPUTE_KERNELS
        return kernel, layout.cache_fraction if layout.kernel == UVM else None

    def _hbm(self, table: TableSpec, rows: int, width: int, layout: Layout) -> int:
        """HBM of one shard of ``table`` under ``layout``: weights and optimizer state (the
        cached share on ``fused_uvm_caching``) and, when the cluster counts them, its I/O
        buffers -- the footprint :meth:`Plan.memory_bytes` checks."""
        kernel, fraction = self._kernel_args(layout)
        return shard_hbm_bytes(rows, width, kernel, fraction, self.optimizer) + io_buffer_bytes(
            table, layout.sharding_type(), width, self.cluster
        )

    def _item(
        self,
        table: TableSpec,
        view: TableSpec,
        rows: int,
        width: int,
        layout: Layout,
        *,
        alltoall: float | None = None,
        ids: float | None = None,
    ) -> int:
        kernel, fraction = self._kernel_args(layout)
        batch = self.cluster.batch_size
        return self.scorer.item(
            view,
            hbm_bytes=self._hbm(table, rows, width, layout),
            host_bytes=shard_host_bytes(rows, width, kernel, self.optimizer),
            alltoall=alltoall,
            ids=ids,
            host_link_bytes=uvm_host_bytes(view, fraction or 0.0, batch) if kernel == UVM else 0.0,
        )

    def devices_of(self, i: int, layout: Layout) -> tuple[int, ...]:
        """The devices a row-wise, table-row-wise or data-parallel table's blocks sit on."""
        if layout.kind == TABLE_ROW_WISE:
            host = set(self.cluster.devices_of_host(layout.host))
            return tuple(d for d in self.allowed[i] if d in host)
        if layout.kind == DATA_PARALLEL:
            return tuple(range(self.cluster.num_devices))
        return self.allowed[i]

    def shards(self, i: int, layout: Layout) -> list[tuple[int, int]]:
        """Table ``i``'s shards under ``layout`` as (scorer item, device or -1 for one the
        grid places), in column order (columns) or row order (row blocks)."""
        key = (i, layout)
        found = self._items.get(key)
        if found is not None:
            return found
        t = self.tables[i]
        out: list[tuple[int, int]] = []
        if layout.kind == COLUMNS:
            for w in layout.widths:
                view = t if w == t.dim else t.with_dim(w)
                out.append((self._item(t, view, t.rows, w, layout), -1))
        elif layout.kind in (ROW_WISE, TABLE_ROW_WISE):
            devices = self.devices_of(i, layout)
            for (lo, hi), d in zip(row_blocks(t.rows, len(devices)), devices, strict=False):
                view = t.shard_view((lo, hi), t.dim)
                out.append((self._item(t, view, hi - lo, t.dim, layout, alltoall=0.0), d))
        elif layout.kind == DATA_PARALLEL:
            n = self.cluster.num_devices
            view = replace(t, pooling_factor=t.pooling_factor / n)
            item = self._item(t, view, t.rows, t.dim, layout, alltoall=0.0, ids=0.0)
            out = [(item, d) for d in range(n)]
        else:
            raise ValueError(f"unknown layout kind {layout.kind!r}")
        self._items[key] = out
        return out

    def fixed_of(self, i: int, layout: Layout) -> np.ndarray | None:
        if layout.kind == COLUMNS:
            return None
        key = (i, layout)
        found = self._fixed.get(key)
        if found is None:
            devices = [d for _, d in self.shards(i, layout)]
            found = self._fixed[key] = fixed_traffic(
                self.tables[i], layout.sharding_type(), devices, self.cluster
            )
        return found

    # ------------------------------------------------------------------ problems and plans

    def problem(self, state: State) -> Problem:
        """The greedy-grid problem of ``state`` (pieces in table order, then column order;
        a co-located group is one piece, at its first table)."""
        n = self.cluster.num_devices
        pieces: list[tuple[int, ...]] = []
        allowed: list[tuple[int, ...] | None] = []
        preplaced: list[list[int]] = [[] for _ in range(n)]
        fixed = []
        every = tuple(range(n))
        for i, layout in enumerate(state):
            g = self.group_of[i]
            if g >= 0:
                if i != self.groups[g][0]:
                    continue
                members = self.groups[g]
                pieces.append(tuple(self.shards(j, state[j])[0][0] for j in members))
                common = set(every)
                for j in members:
                    common &= set(self.allowed[j])
                devices = tuple(sorted(common))
                allowed.append(None if devices == every else devices)
                continue
            for item, device in self.shards(i, layout):
                if device < 0:
                    pieces.append((item,))
                    allowed.append(None if self.allowed[i] == every else self.allowed[i])
                else:
                    preplaced[device].append(item)
            part = self.fixed_of(i, layout)
            if part is not None:
                fixed.append(part)
        return Problem(
            tuple(pieces),
            tuple(allowed),
            tuple(tuple(p) for p in preplaced) if any(preplaced) else (),
            combine(fixed, n) if fixed else None,
        )

    def to_plan(self, state: State, placement: Placement) -> Plan:
        """The plan of ``state`` with its pieces on ``placement.devices``."""
        shards: list[Shard] = []
        devices = iter(placement.devices)
        group_device: dict[int, int] = {}
        for i, layout in enumerate(state):
            t = self.tables[i]
            kind = layout.sharding_type()
            kernel, fraction = self._kernel_args(layout)
            g = self.group_of[i]
            if g >= 0:
                if i == self.groups[g][0]:
                    group_device[g] = next(devices)
                shards.append(
                    Shard(t.name, 0, t.dim, group_device[g], None, None, kernel, fraction)
                )
                continue
            if layout.kind == COLUMNS:
                col = 0
                for w in layout.widths:
                    shards.append(
                        Shard(t.name, col, col + w, next(devices), None, None, kernel, fraction)
                    )
                    col += w
                continue
            placed = [d for _, d in self.shards(i, layout)]
            if layout.kind == DATA_PARALLEL:
                shards.extend(
                    Shard(
                        t.name,
                        0,
                        t.dim,
                        d,
                        None,
                        kind,  # type: ignore[arg-type]
                        kernel,
                        fraction,
                    )
                    for d in placed
                )
                continue
            holders = self.devices_of(i, layout)
            for (lo, hi), d in zip(row_blocks(t.rows, len(holders)), placed, strict=True):
                rows = None if (lo, hi) == (0, t.rows) else (lo, hi)
                shards.append(
                    Shard(
                        t.name,
                        0,
                        t.dim,
                        d,
                        rows,
                        kind,  # type: ignore[arg-type]
                        kernel,
                        fraction,
                    )
                )
        return Plan(tables=tuple(self.tables), shards=tuple(shards), cluster=self.cluster)

    # ------------------------------------------------------------------ what fits

    def footprint(self, i: int, width: int | None = None, rows: int | None = None) -> int:
        t = self.tables[i]
        return embedding_bytes(
            t.rows if rows is None else rows, t.dim if width is None else width, self.optimizer
        )

    def _largest(self, i: int, devices: Sequence[int] | None = None) -> int:
        return max(self.budget[d] for d in (devices or self.allowed[i]))

    def _kernels(self, i: int) -> list[str]:
        rule = self.rules[i]
        kernels = [k for k in ("fused", "dense", UVM) if rule.allows_kernel(k)]
        return kernels

    def _uvm_layout(self, i: int, layout: Layout) -> Layout:
        fraction = self.rules[i].cache_fraction or CACHE_FRACTIONS[0]
        return layout._replace(kernel=UVM, cache_fraction=fraction)

    def start_layout(self, i: int) -> Layout:
        """The first layout of table ``i`` that fits a device's budget, in this order:
        table-wise, column-wise (halved until a shard fits), row-wise over its devices,
        table-row-wise over a host, each on a fused kernel (or ``dense`` when that is the
        only one allowed), then the same on ``fused_uvm_caching`` at the lowest cache
        fraction; data-parallel (on ``dense``) last. Raises :class:`ConstraintError` (a
        constraint rules out every layout that fits) or :class:`PlanInfeasibleError`."""
        t, rule = self.tables[i], self.rules[i]
        kernels = self._kernels(i)
        if not kernels:
            raise ConstraintError(f"table {t.name!r}: no compute kernel allowed")
        hbm_kernel = next((k for k in kernels if k != UVM), None)
        devices = self.allowed[i]
        candidates: list[Layout] = []
        if rule.allows_type("table_wise") or self.group_of[i] >= 0:
            candidates.append(Layout(COLUMNS, (t.dim,)))
        if rule.allows_type("column_wise") and self.group_of[i] < 0:
            widths = halve((t.dim,))
            while widths is not None:
                candidates.append(Layout(COLUMNS, widths))
                widths = halve(widths)
        if rule.allows_type("row_wise") and self.group_of[i] < 0 and t.rows >= len(devices):
            candidates.append(Layout(ROW_WISE, (t.dim,)))
        if rule.allows_type("table_row_wise") and self.group_of[i] < 0 and t.pooled:
            hosts = sorted({self.cluster.host_of(d) for d in devices})
            for h in hosts:
                layout = Layout(TABLE_ROW_WISE, (t.dim,), host=h)
                if t.rows >= len(self.devices_of(i, layout)):
                    candidates.append(layout)
                    break
        if rule.allows_type("data_parallel") and "dense" in kernels and self.group_of[i] < 0:
            candidates.append(Layout(DATA_PARALLEL, (t.dim,), "dense"))
        for kernel in ([hbm_kernel] if hbm_kernel else []) + ([UVM] if UVM in kernels else []):
            for layout in candidates:
                if layout.kind == DATA_PARALLEL:  # TorchRec's replicas run on dense
                    if kernel == UVM:
                        continue
                else:
                    layout = (
                        self._uvm_layout(i, layout)
                        if kernel == UVM
                        else layout._replace(kernel=kernel)
                    )
                if self._fits(i, layout):
                    return layout
        if not candidates:
            raise ConstraintError(
                f"table {t.name!r}: its constraints allow no sharding type the planner can "
                f"place (types {list(rule.sharding_types)})"
            )
        raise PlanInfeasibleError(
            f"table {t.name!r} ({format_bytes(self.footprint(i))} with {self.optimizer} "
            f"state) fits no device under any allowed sharding type and kernel: largest HBM "
            f"budget {format_bytes(self._largest(i))}, largest host memory "
            f"{format_bytes(max(self.host_budget[d] for d in devices))}"
        )

    def _fits(self, i: int, layout: Layout) -> bool:
        """Whether each of the layout's shards fits some device it may take, alone."""
        t = self.tables[i]
        kernel, fraction = self._kernel_args(layout)
        if layout.kind == COLUMNS:
            w = layout.widths[0]
            hbm = self._hbm(t, t.rows, w, layout)
            host = shard_host_bytes(t.rows, w, kernel, self.optimizer)
            return any(
                self.budget[d] >= hbm and self.host_budget[d] >= host for d in self.allowed[i]
            )
        devices = self.devices_of(i, layout)
        if not devices:
            return False
        if layout.kind == DATA_PARALLEL:
            blocks = [(0, t.rows)] * len(devices)
        else:
            blocks = row_blocks(t.rows, len(devices))
        return all(
            self.budget[d] >= self._hbm(t, hi - lo, t.dim, layout)
            and self.host_budget[d] >= shard_host_bytes(hi - lo, t.dim, kernel, self.optimizer)
            for (lo, hi), d in zip(blocks, devices, strict=False)
        )

    def hbm_bytes(self, i: int, layout: Layout) -> int:
        """HBM the layout takes over all devices."""
        t = self.tables[i]
        kernel, fraction = self._kernel_args(layout)
        total = shard_hbm_bytes(t.rows, t.dim, kernel, fraction, self.optimizer)
        kind = layout.sharding_type()
        if layout.kind == DATA_PARALLEL:
            n = self.cluster.num_devices
            return n * (total + io_buffer_bytes(t, kind, t.dim, self.cluster))
        if layout.kind == COLUMNS:
            return total + sum(io_buffer_bytes(t, kind, w, self.cluster) for w in layout.widths)
        blocks = len(self.devices_of(i, layout))
        return total + blocks * io_buffer_bytes(t, kind, t.dim, self.cluster)

    def initial_state(self) -> State:
        """Each table's :meth:`start_layout`; then, while the tables' HBM exceeds the total
        budget, the largest tables that allow it move to ``fused_uvm_caching`` (weights in
        host memory, the lowest cache fraction in HBM)."""
        state = [self.start_layout(i) for i in range(len(self.tables))]
        total_budget = sum(self.budget)
        used = sum(self.hbm_bytes(i, layout) for i, layout in enumerate(state))
        if used > total_budget:
            host_left = [float(h) for h in self.host_budget]
            order = sorted(range(len(state)), key=lambda i: -self.hbm_bytes(i, state[i]))
            for i in order:
                if used <= total_budget:
                    break
                layout = state[i]
                if layout.kernel == UVM or UVM not in self._kernels(i):
                    continue
                moved = self._uvm_layout(i, layout)
                need = self.footprint(i)
                if not self._fits(i, moved) or sum(host_left) < need:
                    continue
                used += self.hbm_bytes(i, moved) - self.hbm_bytes(i, layout)
                state[i] = moved
                share = need / max(1, len(host_left))
                host_left = [h - share for h in host_left]
                logger.info(
                    "table %r on fused_uvm_caching (cache fraction %.2f) to fit HBM",
                    self.tables[i].name,
                    moved.cache_fraction,
                )
        self._unload_devices(state)
        return tuple(state)

    def _unload_devices(self, state: list[Layout]) -> None:
        """While the row blocks and replicas of ``state`` overfill a device's HBM, move the
        largest of those tables that may to ``fused_uvm_caching``."""
        n = self.cluster.num_devices
        while True:
            used = [0] * n
            owners: list[list[int]] = [[] for _ in range(n)]
            for i, layout in enumerate(state):
                if layout.kind == COLUMNS:
                    continue
                for item, d in self.shards(i, layout):
                    used[d] += self.scorer.hbm_need(item)
                    owners[d].append(i)
            over = [d for d in range(n) if used[d] > self.budget[d]]
            if not over:
                return
            movable = [
                i
                for i in owners[over[0]]
                if state[i].kernel != UVM
                and UVM in self._kernels(i)
                and self._fits(i, self._uvm_layout(i, state[i]))
            ]
            if not movable:
                return
            i = max(movable, key=lambda j: self.hbm_bytes(j, state[j]))
            state[i] = self._uvm_layout(i, state[i])
            logger.info(
                "table %r on fused_uvm_caching: row blocks overfill device %d",
                self.tables[i].name,
                over[0],
            )

    def load_estimate(self, state: State) -> float:
        """The most shards a device of ``state`` holds, expected: its row blocks and
        replicas plus the grid's column shards spread evenly."""
        n = self.cluster.num_devices
        placed = np.zeros(n)
        pieces = 0
        for i, layout in enumerate(state):
            if layout.kind == COLUMNS:
                pieces += len(layout.widths)
            else:
                placed[list(self.devices_of(i, layout))] += 1
        return float(placed.max() + pieces / n)

    def within_range(self, parent: State, child: State) -> bool:
        """Whether ``child`` stays within the estimator's trained shards per device, or
        at least goes no further out than ``parent``: beyond it a learned model
        extrapolates, and its errors would steer the search."""
        if self.max_load is None:
            return True
        load = self.load_estimate(child)
        return load <= self.max_load or load <= self.load_estimate(parent)

    # ------------------------------------------------------------------ moves

    def moves(self, state: State, i: int) -> list[Layout]:
        """The layouts a beam step may give table ``i`` instead of its current one: the
        widest column shard halved; row-wise; for a table of at least
        ``1 / devices_per_host`` of a device's HBM, table-row-wise on the host with the
        least pre-placed HBM (pooled tables: TorchRec offers no table-row-wise sequence
        sharding); data-parallel for a table small enough that its all-reduce
        costs each device less than the all-to-all it saves (:data:`DP_MAX_SHARE`); for
        ``fused_uvm_caching`` the next cache fraction up (the HBM kernel at the top). Only
        layouts the constraints allow and that fit alone."""
        layout, t, rule = state[i], self.tables[i], self.rules[i]
        if self.group_of[i] >= 0:
            return []
        out: list[Layout] = []
        if layout.kind == COLUMNS and rule.allows_type("column_wise"):
            halved = halve(layout.widths)
            if halved is not None:
                out.append(layout._replace(widths=halved))
        n = self.cluster.num_devices
        if (
            layout.kind != ROW_WISE
            and rule.allows_type("row_wise")
            and n > 1
            and t.rows >= len(self.allowed[i])
        ):
            out.append(layout._replace(kind=ROW_WISE, widths=(t.dim,), host=-1))
        if (
            layout.kind != TABLE_ROW_WISE
            and rule.allows_type("table_row_wise")
            and self.cluster.num_hosts > 1
            and t.pooled
            and self.footprint(i) * self.cluster.devices_per_host >= min(self.budget)
        ):
            host = self._quiet_host(state, i)
            if host is not None:
                out.append(layout._replace(kind=TABLE_ROW_WISE, widths=(t.dim,), host=host))
        if (
            layout.kind != DATA_PARALLEL
            and rule.allows_type("data_parallel")
            and n > 1
            and rule.allows_kernel("dense")
            and self.footprint(i) <= DP_MAX_SHARE * min(self.budget)
            and 2 * t.rows * n <= self.cluster.batch_size
        ):
            out.append(Layout(DATA_PARALLEL, (t.dim,), "dense"))
        if layout.kernel == UVM and rule.cache_fraction is None:
            higher = [f for f in CACHE_FRACTIONS if f > (layout.cache_fraction or 0.0)]
            if higher:
                out.append(layout._replace(cache_fraction=higher[0]))
            hbm = next((k for k in self._kernels(i) if k != UVM), None)
            if hbm is not None:
                out.append(layout._replace(kernel=hbm, cache_fraction=None))
        return [m for m in out if self._fits(i, m)]

    def _quiet_host(self, state: State, i: int) -> int | None:
        """The allowed host of table ``i`` with the least row-block HBM pre-placed."""
        hosts = sorted({self.cluster.host_of(d) for d in self.allowed[i]})
        load = dict.fromkeys(hosts, 0)
        for j, layout in enumerate(state):
            if layout.kind == TABLE_ROW_WISE and layout.host in load and j != i:
                load[layout.host] += self.hbm_bytes(j, layout)
        full = [
            h for h in hosts if all(d in self.allowed[i] for d in self.cluster.devices_of_host(h))
        ]
        return min(full or hosts, key=lambda h: (load[h], h)) if hosts else None

    def comm_share(self, i: int) -> float:
        """How much all-to-all traffic table ``i`` sends per byte of its weights: the
        data-parallel candidates' ranking (output bytes per iteration over table bytes)."""
        t = self.tables[i]
        return self.cluster.batch_size * t.dim / max(1.0, math.prod((t.rows, t.dim)))

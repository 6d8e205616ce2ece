"""Plan JSON: writer (``neuroshard.plan/v2``), reader (v2 and v1) and the plan validator.

v2, the format written (shared/REFERENCE.md; the README documents every field)::

    {"format": "neuroshard.plan/v2", "num_devices": 16, "devices_per_host": 8,
     "memory_per_device_bytes": [...], "host_memory_per_device_bytes": [...],
     "batch_size": 65536,
     "tables": [{"name": "t0", "module": "sparse.ebc", "rows": 1000, "dim": 128,
                 "pooled": true, "features": [{"name": "f0", "pooling_factor": 12.5}],
                 "reuse_hist": [...17...], "sharding_type": "column_wise",
                 "compute_kernel": "fused", "cache_fraction": null,
                 "shards": [{"rows": [0, 1000], "columns": [0, 64], "device": 1}, ...]}],
     "cost": {"model": "<id>", "max_ms": 1.23, "devices": [{"compute_ms": ..., ...}]}}

v1 (still read) has no host fields, no per-table type or kernel and shards with
``columns`` only. Ranges are half-open. ``cost`` and ``meta`` are optional.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from neuroshard.atomic import write_text_atomic
from neuroshard.paths import input_problem
from neuroshard.tables import tables_from_records, unique_keys
from neuroshard.types import (
    COMPUTE_KERNELS,
    DIM_MULTIPLE,
    SHARDING_TYPES,
    Cluster,
    DeviceCost,
    Plan,
    PlanCost,
    PlanFormatError,
    Shard,
    TableSpec,
    TableSpecError,
    inferred_sharding_type,
)

PLAN_FORMAT = "neuroshard.plan/v2"
PLAN_FORMAT_V1 = "neuroshard.plan/v1"
_PLACEMENT_KEYS = ("shards", "sharding_type", "compute_kernel", "cache_fraction")
_BANDWIDTH_KEYS = ("intra_host_bw_bytes_per_ms", "inter_host_bw_bytes_per_ms")
MAX_DEVICES = 4096  # as the CLI's --devices


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as a ``neuroshard.plan/v2`` document."""
    cluster = plan.cluster
    doc: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "num_devices": cluster.num_devices,
        "devices_per_host": cluster.devices_per_host,
        "memory_per_device_bytes": list(cluster.memory_per_device_bytes),
        "host_memory_per_device_bytes": list(cluster.host_memory_per_device_bytes),
        "batch_size": cluster.batch_size,
    }
    for key in _BANDWIDTH_KEYS:
        if getattr(cluster, key) is not None:
            doc[key] = getattr(cluster, key)
    doc["hbm_reserve_fraction"] = cluster.hbm_reserve_fraction
    doc["optimizer"] = cluster.optimizer
    if cluster.io_buffers:
        doc["io_buffers"] = True
    doc["tables"] = [_table_to_dict(plan, t) for t in plan.tables]
    if plan.cost is not None:
        doc["cost"] = cost_to_dict(plan.cost)
    if plan.meta:
        doc["meta"] = dict(plan.meta)
    return doc


def _table_to_dict(plan: Plan, t: TableSpec) -> dict[str, Any]:
    shards = plan.shards_of(t.name)
    return {
        "name": t.name,
        "module": t.module,
        "rows": t.rows,
        "dim": t.dim,
        "pooled": t.pooled,
        "pooling_factor": t.pooling_factor,
        "features": [
            {"name": f.name, "pooling_factor": f.pooling_factor, "weighted": f.weighted}
            for f in t.feature_list
        ],
        "reuse_hist": list(t.reuse_hist),
        "sharding_type": plan.sharding_type_of(t.name),
        "compute_kernel": shards[0].compute_kernel if shards else "fused",
        "cache_fraction": shards[0].cache_fraction if shards else None,
        "shards": [
            {"rows": list(s.rows or (0, t.rows)), "columns": [s.start, s.end], "device": s.device}
            for s in shards
        ],
    }


def cost_to_dict(cost: PlanCost) -> dict[str, Any]:
    return {
        "model": cost.model,
        "max_ms": cost.max_ms,
        "devices": [
            {
                "compute_ms": d.compute_ms,
                "fwd_comm_ms": d.fwd_comm_ms,
                "bwd_comm_ms": d.bwd_comm_ms,
                "total_ms": d.total_ms,
                "memory_bytes": d.memory_bytes,
            }
            for d in cost.devices
        ],
    }


def write_plan(plan: Plan, path: str | Path) -> None:
    """Validate ``plan`` and write it as v2 JSON, atomically."""
    validate_plan(plan)
    write_text_atomic(path, json.dumps(plan_to_dict(plan), indent=1, allow_nan=False) + "\n")


def read_plan(path: str | Path) -> Plan:
    """Read and validate a plan file; every problem is a :class:`PlanFormatError` naming
    the file."""
    path = Path(path)
    problem = input_problem(path)
    if problem is not None:
        raise PlanFormatError(f"{path}: {problem}")
    try:
        doc = json.loads(
            path.read_text(encoding="utf-8"),
            parse_constant=_reject_constant,
            object_pairs_hook=unique_keys(str(path)),
        )
    except TableSpecError as e:  # a key given twice
        raise PlanFormatError(str(e)) from None
    except FileNotFoundError:
        raise PlanFormatError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanFormatError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise PlanFormatError(
            f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except RecursionError:
        raise PlanFormatError(f"{path}: malformed JSON: nested too deeply") from None
    except ValueError as e:  # NaN / Infinity, or an integer of too many digits
        raise PlanFormatError(f"{path}: malformed JSON: {e}") from None
    try:
        plan = plan_from_dict(doc)
        validate_plan(plan)
    except PlanFormatError as e:
        raise PlanFormatError(f"{path}: {e}") from None
    return plan


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid number")


def plan_from_dict(doc: Any) -> Plan:
    """A :class:`Plan` from a v2 or v1 document (not yet validated: see :func:`validate_plan`)."""
    if not isinstance(doc, Mapping):
        raise PlanFormatError("expected a JSON object")
    version = doc.get("format")
    if version not in (PLAN_FORMAT, PLAN_FORMAT_V1):
        raise PlanFormatError(
            f"field 'format' must be {PLAN_FORMAT!r} or {PLAN_FORMAT_V1!r}, got {version!r}"
        )
    v2 = version == PLAN_FORMAT
    cluster = _cluster_from_dict(doc, v2)
    records = doc.get("tables")
    if not isinstance(records, list):
        raise PlanFormatError("field 'tables' must be a list")
    try:
        tables = tables_from_records(records, source="plan", extra=_PLACEMENT_KEYS)
    except TableSpecError as e:
        raise PlanFormatError(str(e)) from None
    shards: list[Shard] = []
    for table, record in zip(tables, records):
        shards.extend(_shards_from_dict(table, record, v2))
    cost = _cost_from_dict(doc["cost"]) if doc.get("cost") is not None else None
    if cost is not None and len(cost.devices) != cluster.num_devices:
        raise PlanFormatError(
            f"field 'cost' has {len(cost.devices)} devices, the plan {cluster.num_devices}"
        )
    raw_meta = doc.get("meta")
    meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, Mapping) else {}
    return Plan(tuple(tables), tuple(shards), cluster, cost, meta)


def _cluster_from_dict(doc: Mapping[str, Any], v2: bool) -> Cluster:
    num_devices = _int(doc, "num_devices")
    if not 1 <= num_devices <= MAX_DEVICES:
        raise PlanFormatError(
            f"field 'num_devices' must be between 1 and {MAX_DEVICES}, got {num_devices}"
        )
    memory = _int_list(doc, "memory_per_device_bytes")
    extra: dict[str, Any] = {}
    if v2:
        extra["devices_per_host"] = _int(doc, "devices_per_host")
        extra["host_memory_per_device_bytes"] = tuple(
            _int_list(doc, "host_memory_per_device_bytes")
        )
        for key in _BANDWIDTH_KEYS:
            if doc.get(key) is not None:
                extra[key] = _number(doc, key)
        if doc.get("hbm_reserve_fraction") is not None:
            extra["hbm_reserve_fraction"] = _number(doc, "hbm_reserve_fraction")
        if doc.get("optimizer") is not None:
            extra["optimizer"] = str(doc["optimizer"])
        if doc.get("io_buffers") is not None:
            if not isinstance(doc["io_buffers"], bool):
                raise PlanFormatError(
                    f"field 'io_buffers' must be true or false, got {doc['io_buffers']!r}"
                )
            extra["io_buffers"] = doc["io_buffers"]
    try:
        return Cluster(num_devices, tuple(memory), _int(doc, "batch_size"), **extra)
    except ValueError as e:
        raise PlanFormatError(str(e)) from None


def _shards_from_dict(table: TableSpec, record: Mapping[str, Any], v2: bool) -> list[Shard]:
    where = f"table {table.name!r}"
    raw = record.get("shards")
    if not isinstance(raw, list) or not raw:
        raise PlanFormatError(f"{where}: field 'shards' must be a non-empty list")
    sharding_type = compute_kernel = cache_fraction = None
    if v2:
        sharding_type = record.get("sharding_type")
        if sharding_type not in SHARDING_TYPES:
            raise PlanFormatError(
                f"{where}: field 'sharding_type' must be one of "
                f"{', '.join(SHARDING_TYPES)}, got {sharding_type!r}"
            )
        compute_kernel = record.get("compute_kernel")
        if compute_kernel not in COMPUTE_KERNELS:
            raise PlanFormatError(
                f"{where}: field 'compute_kernel' must be one of "
                f"{', '.join(COMPUTE_KERNELS)}, got {compute_kernel!r}"
            )
        cache_fraction = record.get("cache_fraction")
        if cache_fraction is not None and (
            isinstance(cache_fraction, bool) or not isinstance(cache_fraction, (int, float))
        ):
            raise PlanFormatError(f"{where}: field 'cache_fraction' must be a number or null")
    shards = []
    for s in raw:
        cols = s.get("columns") if isinstance(s, Mapping) else None
        device = s.get("device") if isinstance(s, Mapping) else None
        rows = s.get("rows", [0, table.rows]) if isinstance(s, Mapping) and v2 else None
        if not (
            isinstance(cols, list)
            and _is_range(cols)
            and isinstance(device, int)
            and _is_int(device)
            and (rows is None or _is_range(rows))
        ):
            raise PlanFormatError(
                f"{where}: each shard needs 'columns' [start, end], an integer 'device'"
                + (" and 'rows' [start, end]" if v2 else "")
            )
        full_rows = rows is None or tuple(rows) == (0, table.rows)
        row_range = None if rows is None or full_rows else (int(rows[0]), int(rows[1]))
        shards.append(
            Shard(
                table.name,
                cols[0],
                cols[1],
                device,
                rows=row_range,
                sharding_type=sharding_type,
                compute_kernel=compute_kernel or "fused",
                cache_fraction=None if cache_fraction is None else float(cache_fraction),
            )
        )
    whole_rows = all(s.rows is None for s in shards)
    if whole_rows and sharding_type == inferred_sharding_type(shards):
        # The type the shapes imply: keep the canonical (inferred) form, as v1 files read.
        shards = [replace(s, sharding_type=None) for s in shards]
    return shards


def validate_plan(plan: Plan) -> None:
    """Raise :class:`PlanFormatError` unless ``plan`` keeps every invariant of the format.

    Per table: one sharding type, kernel and cache fraction; the shards tile rows x columns
    exactly once (``data_parallel``: one full-table replica on every device); column
    widths are multiples of 4; ``table_wise`` is one shard, ``column_wise`` keeps all rows,
    ``row_wise`` and ``table_row_wise`` keep all columns, ``table_row_wise`` stays on one
    host; ``cache_fraction`` in (0, 1] exactly for ``fused_uvm_caching``. Per device:
    HBM and host-memory footprints (weights and the cluster's optimizer state, and the I/O
    buffers when the cluster counts them) within their caps, the HBM cap less the
    cluster's ``hbm_reserve_fraction``.
    """
    problems: list[str] = []
    names = {t.name for t in plan.tables}
    n = plan.cluster.num_devices
    for s in plan.shards:
        if s.table not in names:
            problems.append(f"shard of unknown table {s.table!r}")
        if not 0 <= s.device < n:
            problems.append(f"table {s.table!r}: device {s.device} out of range 0..{n - 1}")
    for t in plan.tables:
        problems.extend(_table_problems(plan, t))
    if not problems:
        reserve = plan.cluster.hbm_reserve_fraction
        hbm = f"HBM (after a {reserve:.0%} reserve)" if reserve else "HBM"
        caps = (
            (hbm, plan.memory_bytes(), plan.cluster.hbm_budget_bytes),
            ("host memory", plan.host_memory_bytes(), plan.cluster.host_budget_bytes),
        )
        for what, used_list, cap_list in caps:
            for device, (used, cap) in enumerate(zip(used_list, cap_list)):
                if used > cap:
                    problems.append(
                        f"device {device}: {used} bytes of {what} used exceeds cap of {cap} bytes"
                    )
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise PlanFormatError("invalid plan: " + "; ".join(problems[:5]) + more)


def _table_problems(plan: Plan, t: TableSpec) -> list[str]:
    where = f"table {t.name!r}"
    shards = plan.shards_of(t.name)
    if not shards:
        return [f"{where}: no shards"]
    problems: list[str] = []
    kind = plan.sharding_type_of(t.name)
    kinds = {(s.sharding_type or kind, s.compute_kernel, s.cache_fraction) for s in shards}
    if len(kinds) > 1:
        problems.append(f"{where}: shards disagree on sharding type, kernel or cache fraction")
    kernel, fraction = shards[0].compute_kernel, shards[0].cache_fraction
    if kernel == "fused_uvm_caching":
        if fraction is None or not (0.0 < fraction <= 1.0) or not math.isfinite(fraction):
            problems.append(
                f"{where}: fused_uvm_caching needs a cache_fraction in (0, 1], got {fraction}"
            )
    elif fraction is not None:
        problems.append(f"{where}: cache_fraction is only for fused_uvm_caching")
    for s in shards:
        if s.width <= 0 or s.width % DIM_MULTIPLE:
            problems.append(
                f"{where}: shard columns [{s.start}, {s.end}) width must be a "
                f"positive multiple of {DIM_MULTIPLE}"
            )
        lo, hi = s.rows or (0, t.rows)
        if not 0 <= lo < hi <= t.rows:
            problems.append(f"{where}: shard rows [{lo}, {hi}) outside [0, {t.rows})")
    if problems:
        return problems
    if kind == "data_parallel":
        devices = sorted(s.device for s in shards)
        if devices != list(range(plan.cluster.num_devices)):
            problems.append(f"{where}: data_parallel needs one replica on every device")
        if any(s.rows is not None or (s.start, s.end) != (0, t.dim) for s in shards):
            problems.append(f"{where}: a data_parallel replica holds the whole table")
        return problems
    problems.extend(_tiling_problems(where, shards, t))
    full_rows = all(s.rows is None or s.rows == (0, t.rows) for s in shards)
    full_cols = all((s.start, s.end) == (0, t.dim) for s in shards)
    if kind == "table_wise" and len(shards) != 1:
        problems.append(f"{where}: table_wise is one shard, got {len(shards)}")
    if kind == "column_wise" and not full_rows:
        problems.append(f"{where}: column_wise shards keep every row")
    if kind in ("row_wise", "table_row_wise") and not full_cols:
        problems.append(f"{where}: {kind} shards keep every column")
    if kind == "table_row_wise" and len({plan.cluster.host_of(s.device) for s in shards}) > 1:
        problems.append(f"{where}: table_row_wise shards must sit on one host")
    return problems


def _tiling_problems(where: str, shards: tuple[Shard, ...], t: TableSpec) -> list[str]:
    """Shards must tile rows x columns exactly once: the column cuts of every row band
    cover [0, dim) without gap or overlap, and the row bands cover [0, rows)."""
    problems: list[str] = []
    bands: dict[tuple[int, int], list[Shard]] = {}
    for s in shards:
        bands.setdefault(s.rows or (0, t.rows), []).append(s)
    cursor = 0
    for lo, hi in sorted(bands):
        if lo != cursor:
            problems.append(
                f"{where}: rows [{min(lo, cursor)}, {max(lo, cursor)}) "
                + ("uncovered" if lo > cursor else "covered twice")
            )
        cursor = max(cursor, hi)
        col = 0
        for s in sorted(bands[(lo, hi)], key=lambda s: s.start):
            if s.start != col:
                problems.append(
                    f"{where}: columns [{min(col, s.start)}, {max(col, s.start)}) "
                    + ("uncovered" if s.start > col else "covered twice")
                )
            col = max(col, s.end)
        if col != t.dim:
            problems.append(f"{where}: shards end at column {col}, dim is {t.dim}")
    if cursor != t.rows:
        problems.append(f"{where}: shards end at row {cursor}, the table has {t.rows}")
    return problems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_range(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)


def _int(doc: Mapping[str, Any], key: str) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise PlanFormatError(f"field {key!r} must be an integer, got {value!r}")
    return value


def _int_list(doc: Mapping[str, Any], key: str) -> list[int]:
    value = doc.get(key)
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise PlanFormatError(f"field {key!r} must be a list of integers")
    return value


def _number(doc: Mapping[str, Any], key: str) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanFormatError(f"field {key!r} must be a number, got {value!r}")
    return float(value)


def _cost_from_dict(doc: Any) -> PlanCost:
    try:
        cost = PlanCost(
            model=str(doc["model"]),
            devices=tuple(
                DeviceCost(
                    float(d["compute_ms"]),
                    float(d["fwd_comm_ms"]),
                    float(d["bwd_comm_ms"]),
                    int(d["memory_bytes"]),
                )
                for d in doc["devices"]
            ),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise PlanFormatError(f"field 'cost' is malformed: {e!r}") from None
    if not cost.devices:
        raise PlanFormatError("field 'cost' has no devices")
    for i, d in enumerate(cost.devices):
        for key in ("compute_ms", "fwd_comm_ms", "bwd_comm_ms"):
            ms = getattr(d, key)
            if not (math.isfinite(ms) and ms >= 0):
                raise PlanFormatError(
                    f"field 'cost': device {i} has {key} {ms}, not a "
                    "finite non-negative number of ms"
                )
        if d.memory_bytes < 0:
            raise PlanFormatError(f"field 'cost': device {i} has negative memory_bytes")
    return cost

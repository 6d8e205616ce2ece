"""Plan JSON ``neuroshard.plan/v1``: writer, reader and validator.

The format (shared/REFERENCE.md)::

    {"format": "neuroshard.plan/v1", "num_devices": 4,
     "memory_per_device_bytes": [...], "batch_size": 65536,
     "tables": [{"name": "t0", "rows": 100000, "dim": 128, "pooling_factor": 12.5,
                 "reuse_hist": [...17 fractions...],
                 "shards": [{"columns": [0, 64], "device": 1}, ...]}],
     "cost": {"model": "<model id>", "max_ms": 1.23,
              "devices": [{"compute_ms": .., "fwd_comm_ms": .., "bwd_comm_ms": ..,
                           "total_ms": .., "memory_bytes": ..}]}}

``columns`` is half-open. ``reuse_hist`` is optional on reading (default: the DLRM
histogram); ``cost`` is optional; a ``meta`` object (searcher, search time) may follow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from neuroshard.tables import tables_from_records
from neuroshard.types import (
    DIM_MULTIPLE,
    Cluster,
    DeviceCost,
    Plan,
    PlanCost,
    PlanFormatError,
    Shard,
    TableSpecError,
)

PLAN_FORMAT = "neuroshard.plan/v1"


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "num_devices": plan.cluster.num_devices,
        "memory_per_device_bytes": list(plan.cluster.memory_per_device_bytes),
        "batch_size": plan.cluster.batch_size,
        "tables": [
            {
                "name": t.name,
                "rows": t.rows,
                "dim": t.dim,
                "pooling_factor": t.pooling_factor,
                "reuse_hist": list(t.reuse_hist),
                "shards": [{"columns": [s.start, s.end], "device": s.device} for s in plan.shards_of(t.name)],
            }
            for t in plan.tables
        ],
    }
    if plan.cost is not None:
        doc["cost"] = cost_to_dict(plan.cost)
    if plan.meta:
        doc["meta"] = dict(plan.meta)
    return doc


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
    validate_plan(plan)
    Path(path).write_text(json.dumps(plan_to_dict(plan), indent=1) + "\n")


def read_plan(path: str | Path) -> Plan:
    """Read and validate a plan file; every problem is a :class:`PlanFormatError` naming the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanFormatError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanFormatError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise PlanFormatError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    try:
        plan = plan_from_dict(doc)
        validate_plan(plan)
    except PlanFormatError as e:
        raise PlanFormatError(f"{path}: {e}") from None
    return plan


def plan_from_dict(doc: Any) -> Plan:
    if not isinstance(doc, Mapping):
        raise PlanFormatError("expected a JSON object")
    if doc.get("format") != PLAN_FORMAT:
        raise PlanFormatError(f"field 'format' must be {PLAN_FORMAT!r}, got {doc.get('format')!r}")
    try:
        num_devices = _int(doc, "num_devices")
        memory = doc.get("memory_per_device_bytes")
        if not isinstance(memory, list) or not all(isinstance(m, int) and not isinstance(m, bool) for m in memory):
            raise PlanFormatError("field 'memory_per_device_bytes' must be a list of integers")
        cluster = Cluster(num_devices, tuple(memory), _int(doc, "batch_size"))
    except ValueError as e:
        raise PlanFormatError(str(e)) from None
    records = doc.get("tables")
    if not isinstance(records, list):
        raise PlanFormatError("field 'tables' must be a list")
    try:
        tables = tables_from_records(
            [{k: v for k, v in r.items() if k != "shards"} if isinstance(r, Mapping) else r for r in records],
            source="plan",
        )
    except TableSpecError as e:
        raise PlanFormatError(str(e)) from None
    shards = []
    for table, record in zip(tables, records):
        raw = record.get("shards")
        if not isinstance(raw, list) or not raw:
            raise PlanFormatError(f"table {table.name!r}: field 'shards' must be a non-empty list")
        for s in raw:
            cols = s.get("columns") if isinstance(s, Mapping) else None
            device = s.get("device") if isinstance(s, Mapping) else None
            if (not isinstance(cols, list) or len(cols) != 2
                    or not all(isinstance(c, int) and not isinstance(c, bool) for c in cols)
                    or not isinstance(device, int) or isinstance(device, bool)):
                raise PlanFormatError(
                    f"table {table.name!r}: each shard needs 'columns' [start, end] and an integer 'device'")
            shards.append(Shard(table.name, cols[0], cols[1], device))
    cost = _cost_from_dict(doc["cost"]) if doc.get("cost") is not None else None
    meta = doc.get("meta") if isinstance(doc.get("meta"), Mapping) else {}
    return Plan(tuple(tables), tuple(shards), cluster, cost, meta)


def validate_plan(plan: Plan) -> None:
    """Raise :class:`PlanFormatError` unless every table's columns are covered exactly once by
    shards whose widths are multiples of 4, on devices in range, within memory caps."""
    problems: list[str] = []
    names = {t.name for t in plan.tables}
    for s in plan.shards:
        if s.table not in names:
            problems.append(f"shard of unknown table {s.table!r}")
        if not 0 <= s.device < plan.cluster.num_devices:
            problems.append(f"table {s.table!r}: device {s.device} out of range 0..{plan.cluster.num_devices - 1}")
    for t in plan.tables:
        shards = plan.shards_of(t.name)
        cursor = 0
        for s in shards:
            if s.width <= 0 or s.width % DIM_MULTIPLE:
                problems.append(f"table {t.name!r}: shard [{s.start}, {s.end}) width must be a positive "
                                f"multiple of {DIM_MULTIPLE}")
            if s.start != cursor:
                problems.append(f"table {t.name!r}: columns [{cursor}, {s.start}) "
                                + ("uncovered" if s.start > cursor else "covered twice"))
            cursor = max(cursor, s.end)
        if cursor != t.dim:
            problems.append(f"table {t.name!r}: shards end at column {cursor}, dim is {t.dim}")
    if not problems:
        for device, (used, cap) in enumerate(zip(plan.memory_bytes(), plan.cluster.memory_per_device_bytes)):
            if used > cap:
                problems.append(f"device {device}: {used} bytes used exceeds cap of {cap} bytes")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise PlanFormatError("invalid plan: " + "; ".join(problems[:5]) + more)


def _int(doc: Mapping[str, Any], key: str) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise PlanFormatError(f"field {key!r} must be an integer, got {value!r}")
    return value


def _cost_from_dict(doc: Any) -> PlanCost:
    try:
        return PlanCost(
            model=str(doc["model"]),
            devices=tuple(
                DeviceCost(float(d["compute_ms"]), float(d["fwd_comm_ms"]), float(d["bwd_comm_ms"]),
                           int(d["memory_bytes"]))
                for d in doc["devices"]
            ),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise PlanFormatError(f"field 'cost' is malformed: {e!r}") from None

"""Plan reports: per-device cost and memory of one plan, or of two plans side by side.

:func:`write_report` draws, for each plan, the per-device stacked compute, forward and
backward all-to-all costs (ms) with the plan's max-device cost marked, and the memory
each device uses against its cap. Two plans (say NeuroShard against TorchRec) share
their y-axes so their bars compare directly, and the title gives both max-device costs
and their ratio. The output is a PNG, or a self-contained HTML page (the same figure as
an embedded PNG plus a per-device table).

:func:`report_from_files` is the library side of ``neuroshard report PLAN.json
[OTHER.json] --out report.png``: it reads plan files and uses each plan's stored cost, or
re-scores the plans when given an estimator (or a backend name), or when a plan has none.

matplotlib is imported only here, only when a report is drawn, and only through its Agg
canvas: no pyplot, no global backend switch.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroshard.atomic import write_bytes_atomic, write_text_atomic
from neuroshard.paths import check_output
from neuroshard.types import (
    CostEstimator,
    HardwareBackend,
    NeuroShardError,
    Plan,
    PlanCost,
    PlanFormatError,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

SUFFIXES = (".png", ".html")
MAX_PLANS = 2
DPI = 130

# Colours: compute, forward comm, backward comm, memory used, memory cap, max marker.
_COLOURS = {
    "compute": "#4C72B0",
    "fwd": "#DD8452",
    "bwd": "#55A868",
    "memory": "#8172B3",
    "cap": "#C44E52",
    "max": "#222222",
}
_MAX_TICK_LABELS = 16  # per axis; more devices than this get every k-th label


def write_report(plans: Sequence[tuple[str, Plan, PlanCost]], out_path: str | os.PathLike) -> Path:
    """Draw ``plans`` (``(label, plan, cost)``, one or two) into ``out_path`` (.png or .html).

    Raises :class:`NeuroShardError` for another suffix, no plans or more than two, or an
    output that cannot be written, and :class:`PlanFormatError` for a cost that does not
    fit its plan (another device count, a non-finite number).
    """
    out = _checked_out_path(out_path)
    png = render_png(plans)
    try:
        if out.suffix.lower() == ".png":
            write_bytes_atomic(out, png)
        else:
            write_text_atomic(out, _html_page(plans, png))
    except OSError as e:
        raise NeuroShardError(f"{out}: cannot write report: {e.strerror or e}") from None
    logger.info("wrote report of %d plan(s) to %s", len(plans), out)
    return out


def report_from_files(
    paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    backend: str | CostEstimator | HardwareBackend | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Read plan files (one or two) with :func:`~neuroshard.plan_io.read_plan` and report them.

    Each plan's stored cost is drawn, unless ``backend`` is given -- an estimator, a
    hardware backend, or a backend name such as ``"sim"`` (built for the plan's batch
    size) -- in which case every plan is re-scored with
    :func:`~neuroshard.planner.evaluate_plan`. A plan without a stored cost is scored on
    ``backend``, or on ``sim`` if none is given. ``labels`` default to each plan's
    searcher (``meta["searcher"]``), else its file name.

    Two plans of different tables (names or shapes) are reported with a warning: their
    costs price different work. ``out_path`` may not be one of the plan files.
    """
    from neuroshard.plan_io import read_plan

    _checked_out_path(out_path)  # fail before scoring, which may take a while
    check_output(out_path, paths)
    paths = [Path(p) for p in paths]
    if not paths:
        raise NeuroShardError("a report needs at least one plan file")
    if len(paths) > MAX_PLANS:
        raise NeuroShardError(f"a report compares at most {MAX_PLANS} plans, got {len(paths)}")
    if labels is not None and len(labels) != len(paths):
        raise NeuroShardError(f"{len(labels)} labels for {len(paths)} plans")
    plans = [read_plan(Path(p)) for p in paths]
    if len(plans) == 2 and _table_shapes(plans[0]) != _table_shapes(plans[1]):
        logger.warning(
            "%s and %s plan different tables (names or shapes): their costs price different work",
            paths[0],
            paths[1],
        )
    names = list(labels) if labels is not None else _default_labels(paths, plans)
    entries = []
    for name, plan in zip(names, plans):
        cost = plan.cost
        if backend is not None or cost is None:
            from neuroshard.planner import evaluate_plan

            estimator = _estimator_for(backend if backend is not None else "sim", plan)
            logger.info("scoring %s on %s", name, estimator.name)
            cost = evaluate_plan(plan, estimator)
        entries.append((name, plan, cost))
    return write_report(entries, out_path)


def render_png(plans: Sequence[tuple[str, Plan, PlanCost]]) -> bytes:
    """The report figure of ``plans`` as PNG bytes."""
    fig = report_figure(plans)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def report_figure(plans: Sequence[tuple[str, Plan, PlanCost]]) -> Figure:
    """The report as a matplotlib :class:`~matplotlib.figure.Figure` (no pyplot): a row of
    per-device cost bars over a row of memory bars, one column per plan, rows sharing y."""
    _check_plans(plans)
    _require_matplotlib()
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    cols = len(plans)
    most_devices = max(p.cluster.num_devices for _, p, _ in plans)
    # Wide enough that bars stay readable, not so wide that the page must scroll.
    panel_w = min(max(5.0, 2.0 + 0.4 * most_devices), 9.0 if cols == 1 else 8.0)
    fig_w = panel_w * cols + 0.8
    fig = Figure(figsize=(fig_w, 7.4), layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False, sharey="row")
    unit, scale = _memory_unit(plans)

    for col, (label, plan, cost) in enumerate(plans):
        n = plan.cluster.num_devices
        x = np.arange(n)
        compute = np.array([d.compute_ms for d in cost.devices])
        fwd = np.array([d.fwd_comm_ms for d in cost.devices])
        bwd = np.array([d.bwd_comm_ms for d in cost.devices])
        worst = _worst_device(cost)

        ax = axes[0][col]
        ax.bar(x, compute, 0.72, color=_COLOURS["compute"])
        ax.bar(x, fwd, 0.72, bottom=compute, color=_COLOURS["fwd"])
        ax.bar(x, bwd, 0.72, bottom=compute + fwd, color=_COLOURS["bwd"])
        # Outline the device that sets the plan's cost, and draw its level across.
        ax.bar(
            [worst],
            [cost.devices[worst].total_ms],
            0.72,
            fill=False,
            edgecolor=_COLOURS["max"],
            linewidth=1.8,
        )
        ax.axhline(cost.max_ms, color=_COLOURS["max"], linestyle="--", linewidth=1.1)
        ax.set_title(
            f"{_short(label, int(panel_w * 12))}\n{len(plan.tables)} tables; device {worst} "
            f"sets the max; costs by {_short(cost.model, 30)}",
            fontsize=10,
        )
        ax.set_ylabel("cost per batch (ms)" if col == 0 else "")
        _device_axis(ax, n, label_x=False)

        ax = axes[1][col]
        used = np.array([d.memory_bytes for d in cost.devices], dtype=float) / scale
        caps = np.array(plan.cluster.memory_per_device_bytes, dtype=float) / scale
        ax.bar(x, used, 0.72, color=_COLOURS["memory"])
        if np.all(caps == caps[0]):
            ax.axhline(caps[0], color=_COLOURS["cap"], linewidth=1.6)
            ax.set_title(f"memory per device (cap {caps[0]:.2f} {unit})", fontsize=10)
        else:
            ax.hlines(caps, x - 0.45, x + 0.45, color=_COLOURS["cap"], linewidth=1.6)
            ax.set_title("memory per device against its cap", fontsize=10)
        ax.set_ylabel(f"memory ({unit})" if col == 0 else "")
        _device_axis(ax, n, label_x=True)

    for row in axes:
        bottom = min(0.0, min(a.get_ylim()[0] for a in row))
        top = max(a.get_ylim()[1] for a in row)
        if top <= bottom:  # all zero: keep a visible range
            top = bottom + 1.0
        for ax in row:
            ax.set_ylim(bottom, top * 1.06)
            ax.grid(axis="y", linewidth=0.5, alpha=0.5)
            ax.set_axisbelow(True)
        for ax in row[1:]:
            ax.tick_params(labelleft=False)

    handles = [
        Patch(color=_COLOURS["compute"], label="compute"),
        Patch(color=_COLOURS["fwd"], label="forward all-to-all"),
        Patch(color=_COLOURS["bwd"], label="backward all-to-all"),
        Line2D([], [], color=_COLOURS["max"], linestyle="--", label="plan cost (max device)"),
        Patch(color=_COLOURS["memory"], label="memory used"),
        Line2D([], [], color=_COLOURS["cap"], linewidth=1.6, label="memory cap"),
    ]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=6 if cols > 1 else 3,
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(_summary(plans, width=int(fig_w * 8.5)), fontsize=12, fontweight="bold")
    return fig


# --------------------------------------------------------------------------- helpers


def _checked_out_path(out_path: str | os.PathLike) -> Path:
    out = Path(out_path)
    if out.suffix.lower() not in SUFFIXES:
        raise NeuroShardError(
            f"{out}: report suffix {out.suffix or '(none)'!r} not supported; "
            f"use {' or '.join(SUFFIXES)}"
        )
    return out


def _check_plans(plans: Sequence[tuple[str, Plan, PlanCost]]) -> None:
    if not plans:
        raise NeuroShardError("a report needs at least one plan")
    if len(plans) > MAX_PLANS:
        raise NeuroShardError(f"a report compares at most {MAX_PLANS} plans, got {len(plans)}")
    for label, plan, cost in plans:
        if len(cost.devices) != plan.cluster.num_devices:
            raise PlanFormatError(
                f"{label}: cost has {len(cost.devices)} devices, plan has "
                f"{plan.cluster.num_devices}"
            )
        for i, d in enumerate(cost.devices):
            if not all(
                math.isfinite(v) and v >= 0 for v in (d.compute_ms, d.fwd_comm_ms, d.bwd_comm_ms)
            ):
                raise PlanFormatError(
                    f"{label}: device {i} has a cost that is not a finite non-negative number of ms"
                )


def _table_shapes(plan: Plan) -> set[tuple[str, int, int]]:
    return {(t.name, t.rows, t.dim) for t in plan.tables}


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise NeuroShardError(
            "reports need matplotlib (pip install 'neuroshard[report]')"
        ) from None


def _default_labels(given: Sequence[str | os.PathLike], plans: Sequence[Plan]) -> list[str]:
    paths = [Path(p) for p in given]
    names = [str(p.meta.get("searcher") or path.stem) for path, p in zip(paths, plans)]
    if len(set(names)) < len(names):  # two plans by one searcher: tell them apart by file
        names = [path.name for path in paths]
        if len(set(names)) < len(names):
            names = [str(path) for path in paths]
    return names


def _estimator_for(backend: str | CostEstimator | HardwareBackend, plan: Plan) -> CostEstimator:
    if isinstance(backend, str):
        from neuroshard.backends import as_estimator, get_backend

        return as_estimator(get_backend(backend, batch_size=plan.cluster.batch_size))
    if isinstance(backend, CostEstimator):
        return backend
    from neuroshard.backends import as_estimator

    return as_estimator(backend)


def _memory_unit(plans: Sequence[tuple[str, Plan, PlanCost]]) -> tuple[str, int]:
    """GiB when any cap or use reaches 1 GiB, else MiB, else KiB: one unit for all plans."""
    largest = max(
        max(max(p.cluster.memory_per_device_bytes), max(d.memory_bytes for d in c.devices))
        for _, p, c in plans
    )
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if largest >= scale:
            return unit, scale
    return "KiB", 1 << 10


def _worst_device(cost: PlanCost) -> int:
    return max(range(len(cost.devices)), key=lambda i: cost.devices[i].total_ms)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(1, limit - 1)] + "\u2026"


def _summary(plans: Sequence[tuple[str, Plan, PlanCost]], width: int | None = None) -> str:
    """Each plan's max-device cost and, for two, their ratio; on several lines if over ``width``."""
    labels = [
        label if width is None else _short(label, max(12, width // 4)) for label, _, _ in plans
    ]
    parts = [f"{label}: max {cost.max_ms:.3f} ms" for label, (_, _, cost) in zip(labels, plans)]
    if len(plans) == 2:
        a, b = plans[0][2].max_ms, plans[1][2].max_ms
        ratio = b / a if a > 0 else math.inf
        parts.append(f"{labels[1]} / {labels[0]} = {ratio:.2f}x")
    line = "   |   ".join(parts)
    return line if width is None or len(line) <= width else "\n".join(parts)


def _device_axis(ax: Any, n: int, *, label_x: bool) -> None:
    step = max(1, math.ceil(n / _MAX_TICK_LABELS))
    ax.set_xticks(range(0, n, step))
    ax.set_xlim(-0.6, n - 0.4)
    if label_x:
        ax.set_xlabel("device")


def _html_page(plans: Sequence[tuple[str, Plan, PlanCost]], png: bytes) -> str:
    esc = html.escape
    unit, scale = _memory_unit(plans)
    sections = []
    for label, plan, cost in plans:
        shards = [0] * plan.cluster.num_devices
        for s in plan.shards:
            shards[s.device] += 1
        worst = _worst_device(cost)
        rows = []
        for i, d in enumerate(cost.devices):
            cap = plan.cluster.memory_per_device_bytes[i]
            cls = ' class="worst"' if i == worst else ""
            share = f"{100.0 * d.memory_bytes / cap:.1f}" if cap > 0 else "&ndash;"
            rows.append(
                f"<tr{cls}><td>{i}</td><td>{d.compute_ms:.3f}</td><td>{d.fwd_comm_ms:.3f}</td>"
                f"<td>{d.bwd_comm_ms:.3f}</td><td>{d.total_ms:.3f}</td>"
                f"<td>{d.memory_bytes / scale:.3f}</td><td>{cap / scale:.3f}</td>"
                f"<td>{share}</td><td>{shards[i]}</td></tr>"
            )
        sections.append(
            f"<h2>{esc(label)}</h2>\n"
            f"<p>{len(plan.tables)} tables, {len(plan.shards)} shards on "
            f"{plan.cluster.num_devices} devices, batch size {plan.cluster.batch_size}; "
            f"costs by <code>{esc(cost.model)}</code>. Plan cost (max over devices): "
            f"<b>{cost.max_ms:.3f} ms</b> on device {worst}.</p>\n"
            "<table>\n<tr><th>device</th><th>compute ms</th><th>fwd comm ms</th>"
            f"<th>bwd comm ms</th><th>total ms</th><th>memory {unit}</th><th>cap {unit}</th>"
            "<th>used %</th><th>shards</th></tr>\n" + "\n".join(rows) + "\n</table>"
        )
    title = esc(" vs ".join(label for label, _, _ in plans))
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>NeuroShard report: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
img {{ max-width: 100%; height: auto; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f2f2f2; }}
tr.worst td {{ font-weight: bold; background: #fff3e0; }}
</style>
</head>
<body>
<h1>NeuroShard report</h1>
<p>{esc(_summary(plans))}</p>
<img alt="per-device cost and memory of {title}" src="data:image/png;base64,{image}">
{chr(10).join(sections)}
<p>Costs are per training batch (ms); memory in {unit} (1 {unit} = {scale} bytes).
The device in bold sets the plan's cost.</p>
</body>
</html>
"""

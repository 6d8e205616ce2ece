import base64
import json
import re
import subprocess
import sys

import pytest

from neuroshard.plan_io import plan_to_dict, validate_plan, write_plan
from neuroshard.report import render_png, report_figure, report_from_files, write_report
from neuroshard.search.scoring import plan_cost
from neuroshard.types import (
    Cluster,
    DeviceCost,
    NeuroShardError,
    Plan,
    PlanCost,
    PlanFormatError,
    Shard,
)

from factories import GB, FakeEstimator, make_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plan(num_devices=8, caps=None, split=False, rows=50_000):
    """A hand-built valid plan: table i on device i % n, the first one split in two."""
    tables = tuple(
        make_table(f"t{i}", rows=rows * (i + 1), dim=32 * (1 + i % 4), pooling_factor=2.0 + i)
        for i in range(2 * num_devices)
    )
    shards = []
    for i, t in enumerate(tables):
        if split and i == 0:
            shards += [Shard(t.name, 0, 16, 0), Shard(t.name, 16, t.dim, num_devices - 1)]
        else:
            shards.append(Shard(t.name, 0, t.dim, i % num_devices))
    cluster = Cluster(num_devices, tuple(caps or [GB] * num_devices))
    plan = Plan(tables, tuple(shards), cluster, meta={"searcher": "greedy-grid"})
    validate_plan(plan)
    return plan.with_cost(plan_cost(plan, FakeEstimator()))


class StubEstimator(FakeEstimator):
    name = "stub"


def _png_size(blob):
    assert blob[:8] == PNG_MAGIC
    return int.from_bytes(blob[16:20], "big"), int.from_bytes(blob[20:24], "big")


def test_png_of_two_plans_side_by_side(tmp_path):
    a, b = _plan(8, split=True), _plan(8)
    out = write_report([("NeuroShard", a, a.cost), ("TorchRec", b, b.cost)], tmp_path / "r.png")
    assert out == tmp_path / "r.png"
    width, height = _png_size(out.read_bytes())
    assert width > height > 400  # two columns, two rows


def test_figure_shares_y_and_titles_max_and_ratio():
    a, b = _plan(4, split=True), _plan(4)
    fig = report_figure([("NeuroShard", a, a.cost), ("TorchRec", b, b.cost)])
    cost_axes, mem_axes = fig.axes[:2], fig.axes[2:]  # row by row
    assert cost_axes[0].get_ylim() == cost_axes[1].get_ylim()
    assert mem_axes[0].get_ylim() == mem_axes[1].get_ylim()
    assert max(a.cost.max_ms, b.cost.max_ms) <= cost_axes[0].get_ylim()[1]
    title = fig._suptitle.get_text()
    assert f"NeuroShard: max {a.cost.max_ms:.3f} ms" in title
    assert f"TorchRec: max {b.cost.max_ms:.3f} ms" in title
    assert f"= {b.cost.max_ms / a.cost.max_ms:.2f}x" in title
    assert cost_axes[0].get_ylabel() == "cost per batch (ms)"
    assert mem_axes[0].get_ylabel() == "memory (GiB)" and mem_axes[0].get_xlabel() == "device"
    # the max-device level is drawn across each cost panel
    levels = [line.get_ydata()[0] for line in cost_axes[0].get_lines()]
    assert a.cost.max_ms in levels


def test_one_plan_many_devices_small_memory_units():
    plan = _plan(32, caps=[64 << 20] * 32, rows=1_000)
    fig = report_figure([("solo", plan, plan.cost)])
    assert len(fig.axes) == 2
    assert fig.axes[1].get_ylabel() == "memory (MiB)"
    assert len(fig.axes[0].get_xticks()) <= 16  # thinned labels on 32 devices
    assert _png_size(render_png([("solo", plan, plan.cost)]))[0] < 2000


def test_html_is_self_contained_with_a_row_per_device(tmp_path):
    a = _plan(4, caps=[2 * GB, 2 * GB, GB, GB], split=True)
    out = write_report([("<b>mine</b>", a, a.cost)], tmp_path / "r.HTML")
    page = out.read_text(encoding="utf-8")
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match and base64.b64decode(match.group(1))[:8] == PNG_MAGIC
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from elsewhere
    assert "&lt;b&gt;mine&lt;/b&gt;" in page and "<b>mine</b>" not in page
    assert page.count("<tr><td>") + page.count('<tr class="worst"><td>') == 4
    assert page.count('class="worst"') == 1
    assert f"{a.cost.max_ms:.3f} ms" in page


@pytest.mark.parametrize("name", ["r.pdf", "r.svg", "report", "r.png.txt"])
def test_other_suffixes_are_refused_by_name(tmp_path, name):
    plan = _plan(2)
    with pytest.raises(NeuroShardError, match="suffix"):
        write_report([("p", plan, plan.cost)], tmp_path / name)
    assert not (tmp_path / name).exists()


def test_bad_plan_lists_and_costs(tmp_path):
    plan = _plan(2)
    with pytest.raises(NeuroShardError, match="at least one"):
        write_report([], tmp_path / "r.png")
    with pytest.raises(NeuroShardError, match="at most 2"):
        write_report([("p", plan, plan.cost)] * 3, tmp_path / "r.png")
    short = PlanCost("fake", plan.cost.devices[:1])
    with pytest.raises(PlanFormatError, match="1 devices, plan has 2"):
        write_report([("p", plan, short)], tmp_path / "r.png")
    nan = PlanCost("fake", (DeviceCost(float("nan"), 0.0, 0.0, 0),) + plan.cost.devices[1:])
    with pytest.raises(PlanFormatError, match="device 0"):
        write_report([("p", plan, nan)], tmp_path / "r.png")
    with pytest.raises(NeuroShardError, match="cannot write"):
        write_report([("p", plan, plan.cost)], tmp_path / "missing" / "r.png")


def test_zero_costs_and_empty_devices_still_draw(tmp_path):
    plan = _plan(3)
    zero = PlanCost("zero", tuple(DeviceCost(0.0, 0.0, 0.0, 0) for _ in range(3)))
    write_report([("zero", plan, zero), ("fake", plan, plan.cost)], tmp_path / "z.png")
    assert _png_size((tmp_path / "z.png").read_bytes())[0] > 0


def test_from_files_uses_stored_cost_or_rescores(tmp_path):
    a, b = _plan(4, split=True), _plan(4)
    write_plan(a, tmp_path / "a.json")
    write_plan(b, tmp_path / "b.json")
    page = report_from_files([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "r.html")
    text = page.read_text()
    assert "<code>fake</code>" in text and "<code>stub</code>" not in text
    # same searcher in both meta: labelled by file name instead
    assert "<h2>a.json</h2>" in text and "<h2>b.json</h2>" in text

    report_from_files(
        [tmp_path / "a.json"], tmp_path / "s.html", backend=StubEstimator(), labels=["NeuroShard"]
    )
    text = (tmp_path / "s.html").read_text()
    assert "<code>stub</code>" in text and "<h2>NeuroShard</h2>" in text


def test_from_files_scores_costless_plans_on_sim(tmp_path):
    plan = _plan(2)
    doc = plan_to_dict(plan)
    del doc["cost"]
    (tmp_path / "p.json").write_text(json.dumps(doc))
    out = report_from_files([tmp_path / "p.json"], tmp_path / "r.html")
    assert "<code>sim</code>" in out.read_text()


def test_from_files_checks_before_scoring(tmp_path):
    write_plan(_plan(2), tmp_path / "a.json")
    with pytest.raises(NeuroShardError, match="suffix '.jpg'"):
        report_from_files([tmp_path / "missing.json"], tmp_path / "r.jpg")
    with pytest.raises(NeuroShardError, match="at most 2"):
        report_from_files([tmp_path / "a.json"] * 3, tmp_path / "r.png")
    with pytest.raises(PlanFormatError, match="missing.json"):
        report_from_files([tmp_path / "missing.json"], tmp_path / "r.png")
    with pytest.raises(NeuroShardError, match="labels"):
        report_from_files([tmp_path / "a.json"], tmp_path / "r.png", labels=["x", "y"])


def test_matplotlib_is_lazy_and_pyplot_never_loaded(tmp_path):
    code = (
        "import sys; import neuroshard.report as r\n"
        "assert 'matplotlib' not in sys.modules\n"
        f"r.report_from_files([{str(tmp_path / 'a.json')!r}], {str(tmp_path / 'r.png')!r})\n"
        "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules\n"
    )
    write_plan(_plan(2), tmp_path / "a.json")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # library code logs, never prints
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC

"""Held-out error of every shipped model beside its noise floor, as ``model-report`` shows it.

Reads each model directory's ``meta.json`` (nothing is measured or trained): per model, its
name, backend, batch size and sample counts, then the held-out error of every part and
split beside the noise floor (``neuroshard.models.metrics.report_tables``). The compute
``test_pool`` row is scored on loads of test-pool tables no model saw; the ``test`` rows
are the random 10% test split of the model's own training samples (for comm, the only
held-out comm data).

    OMP_NUM_THREADS=1 .venv/bin/python bench/model_fidelity.py \
        --out bench/results/model_fidelity.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from neuroshard.models import read_meta
from neuroshard.models.metrics import report_header, report_tables

from _common import emit

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models", type=Path, default=REPO / "data" / "models", help="folder of model directories"
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    lines = [
        '"test_pool": loads of test-pool tables no model saw in training; "test": '
        "the random 10% test split of the model's own training samples (comm: the only "
        'held-out comm data). "floor": the MAPE of a second measurement of the same '
        "samples against the first.",
        "",
    ]
    for model_dir in sorted(d for d in args.models.iterdir() if (d / "meta.json").is_file()):
        meta = read_meta(model_dir)
        counts = meta.get("sample_counts") or {}
        totals = ", ".join(
            f"{part} {c['total']:,}"
            for part, c in sorted(counts.items())
            if isinstance(c, dict) and "total" in c
        )
        lines += [f"## `{model_dir.name}`", "", f"{report_header(meta)}; samples: {totals}.", ""]
        table = report_tables(meta)[0]
        lines += ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
        lines += ["| " + " | ".join(row) + " |" for row in table.rows]
        lines.append("")
    emit("\n".join(lines).rstrip(), args.out, title="Shipped models: held-out error and floor")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

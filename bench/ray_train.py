"""One pretraining, trained in this process and on Ray Train data-parallel workers.

Both runs share the collected sim data (same seeds, so the second run measures nothing)
and differ only in how the nets are trained. Prints, per run: held-out compute MAPE and
Spearman (test-pool tables), comm MAPE, training seconds, and the ratio of Ray's errors
to the single process's; the noise floor of the data is printed beside them.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ray_train.py --workers 2 \
        --out bench/results/ray_train.md
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from neuroshard.models import read_meta
from neuroshard.pretrain.pipeline import PretrainConfig, pretrain

from _common import emit


def _run(
    root: Path, name: str, data_from: Path | None, args: argparse.Namespace, workers: int
) -> dict:
    out = root / name
    if data_from is not None:  # reuse the first run's measurements: only training differs
        out.mkdir(parents=True, exist_ok=True)
        (out / "data").symlink_to(data_from / "data", target_is_directory=True)
    model_dir = pretrain(
        PretrainConfig(
            out,
            backend="sim",
            backend_kwargs={"noise": 0.03},
            compute_samples=args.compute_samples,
            comm_samples=args.comm_samples,
            holdout_samples=1000,
            retest_samples=300,
            workers=workers,
            progress=False,
            model_kwargs={"max_epochs": args.epochs, "patience": args.epochs},
        )
    )
    return read_meta(model_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--compute-samples", type=int, default=6000)
    p.add_argument("--comm-samples", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        single = _run(root, "single", None, args, 0)
        ray = _run(root, f"ray{args.workers}", root / "single", args, args.workers)

    header = (
        "| training | compute MAPE (test pool) | Spearman | bwd comm MAPE | fwd comm MAPE "
        "| train s |"
    )
    lines = [
        f"sim h100, 3% noise; {args.compute_samples} compute and {args.comm_samples} comm "
        f"samples, {args.epochs} epochs per net (no early stop); same data for both runs.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    rows = {}
    for name, meta in (("1 process", single), (f"Ray Train, {args.workers} workers", ray)):
        m = meta["metrics"]
        rows[name] = (
            m["compute"]["test_pool"]["mape"],
            m["bwd_comm"]["test"]["mape"],
            m["fwd_comm"]["test"]["mape"],
        )
        lines.append(
            f"| {name} | {m['compute']['test_pool']['mape']:.2%} | "
            f"{m['compute']['test_pool']['spearman']:.4f} | "
            f"{m['bwd_comm']['test']['mape']:.2%} | {m['fwd_comm']['test']['mape']:.2%} | "
            f"{meta['provenance']['timings']['train_s']:.0f} |"
        )
    floor = single["metrics"].get("noise_floor", {})
    a, b = rows.values()
    lines += [
        "",
        "Ray / 1 process: compute " + f"{b[0] / a[0]:.3f}, bwd comm {b[1] / a[1]:.3f}, "
        f"fwd comm {b[2] / a[2]:.3f}. Noise floor (retest): compute "
        f"{floor.get('compute', {}).get('floor_mape', float('nan')):.2%}, bwd comm "
        f"{floor.get('bwd_comm', {}).get('floor_mape', float('nan')):.2%}.",
    ]
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Samples per minute of a Ray collection with 1 and with 2 workers, sim and cpu backends.

    OMP_NUM_THREADS=1 .venv/bin/python bench/collect_rate.py \
        --out bench/results/collect_rate.md

Each run collects compute samples into a fresh temporary directory with
:func:`~neuroshard.pretrain.ray_jobs.collect_ray` on one local Ray cluster (started once,
so its start-up is not counted). Two rates per run:

* ``end-to-end``: samples / wall time of the call, actor start-up (a backend build: for
  ``cpu``, importing torch and fbgemm) included;
* ``steady``: rows of every part after the first / time from the first part file to the
  last (their modification times), start-up excluded.

The machine's load average (``uptime``) is recorded beside the figures: on a shared
machine the 2-worker speed-up is bounded by the cores nobody else is using.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from neuroshard.pretrain.augment import augment_tables, sample_compute_loads
from neuroshard.pretrain.collect import BackendSpec, part_files
from neuroshard.pretrain.pool import load_pool
from neuroshard.pretrain.ray_jobs import collect_ray

from _common import emit

logger = logging.getLogger("bench.collect_rate")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def make_samples(n: int, max_tables: int, seed: int = 0):
    tables = augment_tables(load_pool("train"))
    return sample_compute_loads(tables, n, np.random.default_rng(seed), max_tables=max_tables)


def run_once(samples, spec: BackendSpec, workers: int, chunk_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="collect-rate-") as tmp:
        t0 = time.perf_counter()
        res = collect_ray(
            samples,
            spec,
            tmp,
            kind="compute",
            workers=workers,
            chunk_size=chunk_size,
            progress=False,
        )
        wall_s = time.perf_counter() - t0
        parts = part_files(tmp)
        mtimes = sorted((p.stat().st_mtime, pq.read_metadata(p).num_rows) for p in parts)
        span_s = mtimes[-1][0] - mtimes[0][0]
        steady_rows = sum(n for _, n in mtimes[1:])
    if res.failed:
        raise RuntimeError(f"{res.failed} samples failed")
    return {
        "samples": res.measured,
        "wall_s": wall_s,
        "per_min": 60.0 * res.measured / wall_s,
        "steady_per_min": 60.0 * steady_rows / span_s if span_s > 0 else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim-samples", type=int, default=3000)
    ap.add_argument("--sim-chunk-size", type=int, default=50)
    ap.add_argument("--cpu-samples", type=int, default=60)
    ap.add_argument("--cpu-chunk-size", type=int, default=5)
    ap.add_argument("--cpu-max-tables", type=int, default=4)
    ap.add_argument("--cpu-repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write a Markdown table here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    configs = [
        (
            "sim",
            BackendSpec("sim", {"batch_size": 4096}),
            make_samples(args.sim_samples, 40),
            args.sim_chunk_size,
        ),
        (
            "cpu",
            BackendSpec(
                "cpu", {"batch_size": 4096, "warmups": 1, "repeats": args.cpu_repeats, "threads": 1}
            ),
            make_samples(args.cpu_samples, args.cpu_max_tables),
            args.cpu_chunk_size,
        ),
    ]
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        object_store_memory=256 << 20,
    )
    rows = []
    try:
        for name, spec, samples, chunk in configs:
            load_before = uptime()
            r1 = run_once(samples, spec, 1, chunk)
            r2 = run_once(samples, spec, 2, chunk)
            rows.append((name, spec, len(samples), chunk, r1, r2, load_before, uptime()))
            print(
                f"{name}: 1 worker {r1['per_min']:.0f}/min (steady {r1['steady_per_min']:.0f}), "
                f"2 workers {r2['per_min']:.0f}/min (steady {r2['steady_per_min']:.0f})",
                flush=True,
            )
    finally:
        ray.shutdown()

    lines = [
        f"{os.cpu_count()} logical CPUs; one local Ray cluster (num_cpus=2) for all runs.",
        "",
        "| backend | samples | chunk | 1 worker /min | 2 workers /min | ratio | "
        "1 worker steady /min | 2 workers steady /min | steady ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, _spec, n, chunk, r1, r2, _, _ in rows:
        lines.append(
            f"| {name} | {n} | {chunk} | {r1['per_min']:.0f} | {r2['per_min']:.0f} | "
            f"{r2['per_min'] / r1['per_min']:.2f} | {r1['steady_per_min']:.0f} | "
            f"{r2['steady_per_min']:.0f} | {r2['steady_per_min'] / r1['steady_per_min']:.2f} |"
        )
    lines += [
        "",
        "Backends: " + "; ".join(f"{name} = `{dict(spec.kwargs)}`" for name, spec, *_ in rows),
        "",
        "Machine load (`uptime`) before and after each backend's pair of runs:",
        "",
    ]
    for name, *_, before, after in rows:
        lines += [f"* {name}: before `{before}`", f"  after `{after}`"]
    emit(
        "\n".join(lines), args.out, title="Ray collection rate: samples per minute, 1 vs 2 workers"
    )


if __name__ == "__main__":
    main()

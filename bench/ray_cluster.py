"""Collection throughput on the embedded Ray cluster and on a 2-node cluster from `ray start`.

Both runs use 2 Ray workers (collect_ray): the embedded cluster that ray.init() starts in
this process with 2 CPUs, and a head plus a second node started with ``ray start`` on this
machine, one CPU each, pinned to 127.0.0.1 with token authentication on (the cluster of
tests/test_ray_cluster.py). Each backend measures the same compute samples into a fresh
directory; the clock covers one collect_ray call, the actors' start included (Ray already
started or joined), and the best of --repeats calls is kept. ``sim`` prices a sample in
microseconds, so its rate is Ray's own overhead; ``sim+20ms`` sleeps 20 ms per sample, as
a measuring backend would, so two workers reach 6,000 samples per minute at most. With
--test, the slow end-to-end test runs too and its wall time is reported.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ray_cluster.py --test \
        --out bench/results/ray_cluster.md
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from _common import emit

TESTS = Path(__file__).resolve().parents[1] / "tests"
BACKENDS = ("sim", "sim+20ms")


def _spec(backend: str):
    from test_ray_jobs import SlowSim  # the sim, 20 ms per sample (tests/ is on the path)

    from neuroshard.pretrain.collect import BackendSpec

    if backend == "sim":
        return BackendSpec("sim", {"batch_size": 65_536})
    return BackendSpec("slow-sim", {"delay_s": 0.02}, factory=SlowSim)


def _samples(n: int, seed: int) -> list:
    from neuroshard.pretrain.augment import augment_tables, sample_compute_loads
    from neuroshard.pretrain.pool import load_pool

    return sample_compute_loads(
        augment_tables(load_pool("train")), n, np.random.default_rng(seed), max_tables=40
    )


@contextmanager
def _embedded() -> Iterator[str]:
    from neuroshard.pretrain.ray_jobs import ray_session

    with ray_session(2, None):
        yield "embedded (ray.init, 2 CPUs)"


@contextmanager
def _two_nodes(root: Path) -> Iterator[str]:
    from test_ray_cluster import start_cluster

    from neuroshard.pretrain.ray_jobs import ray_session

    cluster = start_cluster(root)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(cluster.token_file)
    try:
        with ray_session(2, cluster.address):
            yield "2 nodes (ray start, 1 CPU each)"
    finally:
        cluster.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rates(
    session, samples: dict[str, list], root: Path, chunk_size: int, repeats: int
) -> dict[str, float]:
    """Samples per minute of each backend on the cluster ``session`` gives: the best of
    ``repeats`` collections (each starts its own actors), backends taking turns."""
    from neuroshard.pretrain.ray_jobs import collect_ray

    rates: dict[str, float] = {}
    with session as name:
        for _ in range(repeats):
            for backend in BACKENDS:
                out = Path(tempfile.mkdtemp(dir=root))
                t0 = time.perf_counter()
                res = collect_ray(
                    samples[backend],
                    _spec(backend),
                    out,
                    kind="compute",
                    workers=2,
                    chunk_size=chunk_size,
                    progress=False,
                )
                seconds = time.perf_counter() - t0
                assert res.measured == len(samples[backend]) and not res.failed, res
                rates[backend] = max(rates.get(backend, 0.0), 60 * res.measured / seconds)
                logging.info("%s, %s: %d samples in %.1f s", name, backend, res.measured, seconds)
    return {"name": name, **rates}


def _test_seconds() -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(TESTS / "test_ray_cluster.py"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    seconds = time.perf_counter() - t0
    summary = (res.stdout.strip().splitlines() or ["?"])[-1]
    if res.returncode != 0:
        raise SystemExit(f"tests/test_ray_cluster.py failed:\n{res.stdout[-3000:]}")
    return seconds, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20_000, help="sim samples per run")
    p.add_argument("--slow-samples", type=int, default=1200, help="sim+20ms samples per run")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="collections per backend; the best")
    p.add_argument("--test", action="store_true", help="also time tests/test_ray_cluster.py")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("neuroshard").setLevel(logging.WARNING)
    sys.path.insert(0, str(TESTS))  # the cluster helper, and SlowSim for the workers
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    )

    samples = {"sim": _samples(args.samples, 0), "sim+20ms": _samples(args.slow_samples, 1)}
    with tempfile.TemporaryDirectory(prefix="nsb") as d:
        root = Path(d)
        rows = [_rates(_embedded(), samples, root, args.chunk_size, args.repeats)]
        (root / "c").mkdir()
        rows.append(_rates(_two_nodes(root / "c"), samples, root, args.chunk_size, args.repeats))

    header = "| cluster | sim: samples/min | sim+20ms: samples/min |"
    lines = [
        f"collect_ray, 2 workers, compute samples ({args.samples} sim, "
        f"{args.slow_samples} sim+20ms), chunks of {args.chunk_size}; best of "
        f"{args.repeats} collections; {os.cpu_count()} CPU cores on this machine, "
        "shared with other jobs.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['sim']:,.0f} | {r['sim+20ms']:,.0f} |")
    lines += [
        "",
        "Ratio 2 nodes / embedded: sim "
        f"{rows[1]['sim'] / rows[0]['sim']:.2f}, sim+20ms "
        f"{rows[1]['sim+20ms'] / rows[0]['sim+20ms']:.2f}.",
    ]
    if args.test:
        seconds, summary = _test_seconds()
        lines += [
            "",
            f"tests/test_ray_cluster.py (slow; starts its own 2-node cluster, "
            f"pretrains on it, loses a node mid-collection): {seconds:.0f} s wall "
            f"({summary}).",
        ]
    emit("\n".join(lines), args.out, title="Ray: embedded cluster against 2 nodes from `ray start`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Collect training samples on a Ray cluster: one actor per worker, rows written as they land.

:func:`collect_ray` is :func:`~neuroshard.pretrain.collect.collect` spread over Ray actors.
Each actor builds its backend once from a :class:`~neuroshard.pretrain.collect.BackendSpec`
(so a ``cpu`` backend starts its gloo worker pool once per actor, not once per chunk) and
measures chunks with :func:`~neuroshard.pretrain.collect.collect_chunk`. The driver keeps
every actor two chunks deep, takes results in the order they finish (``ray.wait``) and
writes each as one part file with :func:`~neuroshard.pretrain.collect.write_part`, so the
output directory has the same layout and the same resume rule as a local collection: a
rerun skips every key already on disk, and a killed run loses at most its chunks in flight.

A chunk whose measurement raises, or whose actor dies, is retried (on a fresh actor when
the old one died) up to ``max_retries`` times; after that its samples are logged and
counted in :attr:`CollectResult.failed`, and the job goes on. A rerun measures them again.

By default an embedded local Ray cluster with ``workers`` CPUs is started and shut down
around the job; ``address`` connects to a running cluster instead (left running), as does
calling with Ray already initialised (left connected). Actors of a ``cuda`` backend ask
for one GPU each.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from neuroshard.pretrain.augment import CommSample, ComputeSample
from neuroshard.pretrain.collect import (
    BackendSpec,
    CollectResult,
    DatasetError,
    Kind,
    _Bar,
    _chunks,
    check_fingerprint,
    collect_chunk,
    fingerprint_json,
    start_collection,
    write_part,
)

logger = logging.getLogger(__name__)

__all__ = ["collect_ray"]

# Chunks queued on each actor: one measuring, one waiting, so no actor idles while the
# driver writes a part and hands out the next chunk.
CHUNKS_IN_FLIGHT_PER_WORKER = 2
# Object store of an embedded cluster: rows are small, so keep the reservation small.
EMBEDDED_OBJECT_STORE_BYTES = 256 << 20
GPU_BACKENDS = frozenset({"cuda"})


class _Worker:
    """Ray actor body: one backend, built once, measuring chunk after chunk."""

    def __init__(self, spec: BackendSpec):
        self._backend = spec.build()

    def fingerprint(self) -> str:
        return fingerprint_json(self._backend)

    def measure(self, chunk: Sequence[Any], kind: Kind) -> list[dict]:
        return collect_chunk(chunk, self._backend, kind)

    def close(self) -> None:
        close = getattr(self._backend, "close", None)
        if close is not None:
            close()


@dataclass
class _Chunk:
    samples: Sequence[Any]
    attempts: int = 0


def _init_ray(workers: int, address: str | None) -> bool:
    """Start or connect to Ray; True when this call did (and must ``ray.shutdown()``:
    that stops an embedded cluster and only disconnects from one at ``address``)."""
    import ray

    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        return True
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING,
             object_store_memory=EMBEDDED_OBJECT_STORE_BYTES)
    return True


def collect_ray(samples: Sequence[ComputeSample | CommSample], backend_spec: BackendSpec,
                out_dir: str | os.PathLike, *, kind: Kind, workers: int = 1,
                address: str | None = None, chunk_size: int = 64, max_retries: int = 2,
                gpus_per_worker: float | None = None, progress: bool = True,
                description: str | None = None) -> CollectResult:
    """Measure every sample not yet under ``out_dir`` on ``workers`` Ray actors.

    Same output and resume rule as :func:`~neuroshard.pretrain.collect.collect`; refuses
    (:class:`~neuroshard.pretrain.collect.DatasetError`) to add rows from a backend whose
    fingerprint differs from the one on disk, or when the actors disagree on theirs.
    A chunk that still fails after ``max_retries`` retries is logged and counted in
    ``failed``; it does not stop the job. ``gpus_per_worker`` defaults to 1 for the
    ``cuda`` backend and 0 otherwise (set it for a GPU backend given by import path).
    """
    if not isinstance(backend_spec, BackendSpec):
        raise TypeError(f"backend_spec must be a BackendSpec, got {type(backend_spec).__name__}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    out, pending, skipped = start_collection(samples, out_dir, kind, chunk_size)
    logger.info("collect %s into %s on %d Ray workers: %d samples, %d on disk, %d to measure",
                kind, out, workers, len(samples), skipped, len(pending))
    if not pending:
        return CollectResult(out, 0, skipped, len(samples))

    import ray

    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if backend_spec.name in GPU_BACKENDS else 0.0
    owned = _init_ray(workers, address)
    try:
        return _run(ray, pending, backend_spec, out, kind, workers, gpus_per_worker, chunk_size,
                    max_retries, progress, description or f"{kind} samples", len(samples),
                    skipped)
    finally:
        if owned:
            ray.shutdown()


def _run(ray: Any, pending: list[Any], spec: BackendSpec, out: Path, kind: Kind, workers: int,
         gpus_per_worker: float, chunk_size: int, max_retries: int, progress: bool,
         description: str, total: int, skipped: int) -> CollectResult:
    actor_cls = ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_restarts=0)(_Worker)

    def new_actor() -> Any:
        return actor_cls.remote(spec)

    queue = deque(_Chunk(c) for c in _chunks(pending, chunk_size))
    in_flight: dict[Any, tuple[int, Any, _Chunk]] = {}  # object ref -> (slot, actor, chunk)
    load = [0] * min(workers, len(queue))  # chunks queued per actor slot
    measured = failed = 0

    def submit(slot: int) -> None:
        while queue and load[slot] < CHUNKS_IN_FLIGHT_PER_WORKER:
            chunk = queue.popleft()
            chunk.attempts += 1
            ref = actors[slot].measure.remote(chunk.samples, kind)
            in_flight[ref] = (slot, actors[slot], chunk)
            load[slot] += 1

    def retry_or_give_up(chunk: _Chunk, exc: BaseException) -> int:
        if chunk.attempts <= max_retries:
            logger.warning("chunk of %d samples (first key %s) failed on attempt %d, retrying: %s",
                           len(chunk.samples), chunk.samples[0].key, chunk.attempts, exc)
            queue.appendleft(chunk)
            return 0
        logger.error("chunk of %d samples (keys %s..%s) failed %d times, giving up: %s",
                     len(chunk.samples), chunk.samples[0].key, chunk.samples[-1].key,
                     chunk.attempts, exc)
        return len(chunk.samples)

    actors = [new_actor() for _ in range(min(workers, len(queue)))]
    try:
        fingerprints = ray.get([a.fingerprint.remote() for a in actors])
        if len(set(fingerprints)) > 1:
            raise DatasetError("Ray workers measure on different hardware: "
                               f"{sorted(set(fingerprints))}; collect on identical workers, "
                               "one directory per kind of worker")
        check_fingerprint(out, fingerprints[0], spec.name)
        with _Bar(progress, description, total, skipped) as bar:
            for slot in range(len(actors)):
                submit(slot)
            while in_flight:
                [ref], _ = ray.wait(list(in_flight), num_returns=1)
                slot, actor, chunk = in_flight.pop(ref)
                load[slot] -= 1
                try:
                    rows = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    # The actor is gone for good (max_restarts=0: process killed, node
                    # lost); its other queued chunks fail the same way and are retried too.
                    lost = failed
                    failed += retry_or_give_up(chunk, exc)
                    bar.advance(failed - lost)
                    if actors[slot] is actor:
                        logger.warning("Ray worker %d died; starting a new one", slot)
                        actors[slot] = new_actor()
                except ray.exceptions.RayTaskError as exc:
                    lost = failed
                    failed += retry_or_give_up(chunk, exc.cause or exc)
                    bar.advance(failed - lost)
                else:
                    path = write_part(rows, out, kind)
                    measured += len(rows)
                    bar.advance(len(rows))
                    logger.debug("wrote %s (%d rows)", path.name, len(rows))
                for s in range(len(actors)):
                    submit(s)
    finally:
        _close_actors(ray, actors)
    if failed:
        logger.error("%d of %d samples failed after %d retries; rerun to measure them",
                     failed, len(pending), max_retries)
    return CollectResult(out, measured, skipped, total, failed)


def _close_actors(ray: Any, actors: list[Any]) -> None:
    """Let each backend stop its own processes, then end the actors."""
    refs = [a.close.remote() for a in actors]
    try:
        ray.wait(refs, num_returns=len(refs), timeout=30)
    except Exception:  # noqa: BLE001 -- a dead actor has nothing left to close
        logger.debug("closing Ray workers", exc_info=True)
    for a in actors:
        ray.kill(a)

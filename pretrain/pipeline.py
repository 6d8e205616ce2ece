"""Pre-training end to end: augment, collect (resumable), train, save a model directory.

``pretrain(PretrainConfig(out_dir))`` leaves::

    out_dir/data/compute/part-*.parquet          compute samples of the training tables
    out_dir/data/comm/part-*.parquet             comm samples
    out_dir/data/compute_holdout/part-*.parquet  compute samples of held-out tables
    out_dir/data/{compute,comm}_retest/          some samples measured a second time
    out_dir/train/                               training checkpoints (resume)
    out_dir/model/{compute.pt, comm.pt, meta.json}

Everything a run is asked for is one frozen :class:`PretrainConfig`; ``pretrain(config)``
and ``collect_samples(config, kind)`` (one sample set, as ``pretrain`` would draw it) are
the library calls behind ``neuroshard pretrain`` and ``neuroshard collect``.

Sampling is seeded and sequential, so a rerun draws the same samples with the same keys:
an interrupted run resumes collection where it stopped, and a run asking for more
samples measures only the new ones. Training reads exactly the samples of this run.

A run folder's settings are fixed by its first run (``out_dir/pretrain.json``: backend and
its fingerprint -- profile, batch size, noise --, seed, device counts, tables, load
limits); a rerun with other settings is refused with both named, before anything is
measured or trained. One run at a time writes into a folder (a lock; a second run is
refused at once, naming the holder's pid).

Metrics in ``meta.json``: ``compute.test`` on a random 10% of the training-table samples,
``compute.test_pool`` on loads built only from held-out tables (by default the pool's
test half, never seen in training), ``fwd_comm.test`` and ``bwd_comm.test``; each with
breakdowns (:mod:`~neuroshard.models.metrics`). ``noise_floor`` compares the retest
with the first measurement of the same samples: the error no model can go below.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from neuroshard.models import cost_model_kinds, model_class
from neuroshard.models.metrics import noise_floor
from neuroshard.models.training import file_checkpointed
from neuroshard.paths import check_output_dir, folder_lock
from neuroshard.pretrain.augment import (
    DEFAULT_MEMORY_CAP_BYTES,
    augment_tables,
    sample_comm_tasks,
    sample_compute_loads,
    shrink_tables,
)
from neuroshard.pretrain.collect import (
    BackendSpec,
    CollectResult,
    claim_folder,
    collect,
    folder_settings,
    resolve_backend,
)
from neuroshard.pretrain.dataset import load_comm, load_compute
from neuroshard.pretrain.fidelity import RETEST_INDEX_OFFSET
from neuroshard.pretrain.plan_loads import plan_load_samples
from neuroshard.types import (
    BackendError,
    HardwareBackend,
    Searcher,
    TableSpec,
    UnknownNameError,
    UsageError,
)

logger = logging.getLogger(__name__)

__all__ = ["PretrainConfig", "backend_spec", "collect_samples", "pretrain"]

# Independent random streams per sample kind, so changing one count leaves the others' keys.
_STREAM_COMPUTE, _STREAM_COMM, _STREAM_HOLDOUT, _STREAM_SHRINK, _STREAM_PLANS = 1, 2, 3, 4, 5
_PLAN_INDEX = 10**7  # plan-shaped samples of round r are numbered from (r + 1) x this


def backend_spec(
    name: str,
    batch_size: int,
    *,
    profile: str | None = None,
    noise: float | None = None,
    seed: int | None = None,
) -> BackendSpec:
    """The backend ``name`` at ``batch_size``; ``profile``, ``noise`` and ``seed`` are the
    sim backend's options (given ones are passed to ``sim`` and dropped for others)."""
    kwargs: dict[str, Any] = {"batch_size": batch_size}
    if name == "sim":
        kwargs.update(
            {
                k: v
                for k, v in (("profile", profile), ("noise", noise), ("seed", seed))
                if v is not None
            }
        )
    return BackendSpec(name, kwargs)


@dataclass(frozen=True)
class PretrainConfig:
    """What a pretrain run measures, on what, and what it trains.

    ``backend`` is a registered name (with ``backend_kwargs``), a :class:`BackendSpec`
    (:func:`backend_spec`) or a backend object (in-process collection only).
    ``cost_model`` is a cost-model kind of :func:`neuroshard.models.model_class`
    (``"neural"`` or ``"lightgbm"``, same data and directory layout); ``model_kwargs`` go
    to its constructor (with ``seed``).

    ``tables`` default to the pool's train half and ``holdout_tables`` then default to its
    test half (``load_pool``); with explicit ``tables`` there is no held-out pool unless
    given. Comm samples use ``num_devices`` devices, or a device count drawn from
    ``comm_device_counts`` per sample. The comm nets accept any count but are most
    accurate near the counts they saw (which devices share a host is not an input).

    ``workers`` > 0 or an ``address`` collects on Ray actors
    (:func:`~neuroshard.pretrain.ray_jobs.collect_ray`: an embedded local cluster, or the
    cluster at ``address``) and trains the neural nets data-parallel on as many Ray Train
    workers (:mod:`~neuroshard.pretrain.ray_train`); otherwise both run in this process.
    Ray Train keeps the nets' checkpoints under ``storage`` (default ``out_dir/train``): on
    a cluster of several machines, a path every node reaches (a shared file system) or a
    URI such as ``s3://bucket/prefix``.

    Compute loads are drawn from the training tables plus ``shrink_copies`` hotter copies
    of each (:func:`~neuroshard.pretrain.augment.shrink_tables`), all at every dim of
    :func:`~neuroshard.pretrain.augment.augment_tables`; they have 1 to ``max_tables``
    tables, which should cover the shards a device holds in the plans the search scores
    (more than the paper's 15). Held-out loads use the held-out tables as they are.

    The first ``retest_samples`` held-out compute samples (training samples when there
    are none) and comm samples are measured a second time; the two runs give the noise
    floor in the model's metrics.

    ``rounds`` > 1 interleaves the collection: round r measures the r-th slice of every
    set (training, comm, held-out) and retests what earlier rounds measured. Real
    hardware drifts between windows minutes apart; with one round the held-out set,
    measured in one window after the training data, is off the training data by that
    window's drift, and every retest shares the end window's. Interleaved, all sets see
    the same mix of windows, and the floor covers them.

    ``chunk_size`` samples go to each Parquet part (the unit a resumed collection skips).

    ``plan_rounds`` > 0 adds plan-shaped samples (:mod:`~neuroshard.pretrain.plan_loads`):
    each round plans ``plan_tasks`` tasks of 10 to 60 training tables on ``num_devices``
    devices of ``memory_cap_bytes`` with the model trained so far (by ``plan_searchers``),
    measures every distinct device load of their plans into ``data/compute_plans`` and
    trains a fresh model on all compute samples. A resumed run re-measures a round whose
    plans changed (the model before it was retrained on re-measured data).
    """

    out_dir: Path
    backend: str | HardwareBackend | BackendSpec = "sim"
    backend_kwargs: Mapping[str, Any] | None = None
    num_devices: int = 4
    comm_device_counts: Sequence[int] | None = None
    compute_samples: int = 20_000
    comm_samples: int = 8_000
    holdout_samples: int = 2_000
    retest_samples: int = 200
    seed: int = 0
    tables: Sequence[TableSpec] | None = None
    holdout_tables: Sequence[TableSpec] | None = None
    memory_cap_bytes: int = DEFAULT_MEMORY_CAP_BYTES
    max_tables: int = 40
    shrink_copies: int = 1
    plan_rounds: int = 0
    plan_tasks: int = 40
    plan_searchers: Sequence[Searcher] = ()
    chunk_size: int = 256
    rounds: int = 1
    model_kwargs: Mapping[str, Any] | None = None
    cost_model: str = "neural"
    workers: int = 0
    address: str | None = None
    storage: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.rounds < 1:
            raise UsageError(f"rounds must be >= 1, got {self.rounds}")
        if self.plan_rounds < 0 or self.plan_tasks < 1:
            raise UsageError(
                f"need plan_rounds >= 0 and plan_tasks >= 1, got {self.plan_rounds}, "
                f"{self.plan_tasks}"
            )
        if self.plan_rounds and not self.plan_searchers:
            raise UsageError("plan_rounds needs plan_searchers (the searches whose loads to add)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"seed must be an integer >= 0, got {self.seed!r}")
        smallest = min(self.compute_samples, self.comm_samples)
        if self.rounds > max(smallest, 1):
            raise UsageError(
                f"{self.rounds} rounds for {smallest} samples: every round "
                "measures at least one sample of each set; use fewer rounds"
            )
        if self.cost_model not in cost_model_kinds():  # fails before anything is collected
            raise UnknownNameError(
                f"unknown cost model {self.cost_model!r}; valid: {', '.join(cost_model_kinds())}"
            )
        if self.backend_kwargs and not isinstance(self.backend, str):
            raise ValueError("backend_kwargs only apply to a backend given by name")
        spec = self.backend if isinstance(self.backend, BackendSpec) else None
        name = self.backend if isinstance(self.backend, str) else spec and spec.name
        if name is not None and (spec is None or spec.factory is None):
            from neuroshard.backends import backend_names

            if name not in backend_names():  # before a folder is made or a table drawn
                raise UnknownNameError(
                    f"unknown backend {name!r}; valid: {', '.join(backend_names())}"
                )

    def backend_spec(self) -> HardwareBackend | BackendSpec:
        """The backend as a :class:`BackendSpec` (or the object given)."""
        if isinstance(self.backend, str):
            return BackendSpec(self.backend, dict(self.backend_kwargs or {}))
        return self.backend

    def training_tables(self) -> tuple[list[TableSpec], list[TableSpec]]:
        """The training tables and the held-out ones (the pool's halves by default)."""
        tables, holdout = self.tables, self.holdout_tables
        if tables is None:
            from neuroshard.pretrain.pool import load_pool

            tables = load_pool("train")
            if holdout is None:
                holdout = load_pool("test")
        if not tables:
            raise ValueError("pretrain needs at least one table")
        return list(tables), list(holdout or [])

    @property
    def comm_counts(self) -> list[int]:
        """The device counts comm samples are drawn from."""
        return list(self.comm_device_counts) if self.comm_device_counts else [self.num_devices]


def pretrain(config: PretrainConfig) -> Path:
    """Collect training data as ``config`` asks, train a cost model, save it; returns the
    model directory ``out_dir/model``.

    Training checkpoints go to ``out_dir/train``: rerunning an interrupted ``pretrain``
    skips the samples on disk and resumes each net from its last checkpoint.
    """
    check_output_dir(config.out_dir)
    with folder_lock(config.out_dir), _ray_session(config):
        return _pretrain(config)


def _ray_session(config: PretrainConfig) -> Any:
    """One Ray session (embedded, or the cluster at ``address``) for every Ray job of the
    run, joined before anything is sampled so that a bad address fails at once."""
    if not (config.workers or config.address):
        return nullcontext()
    from neuroshard.pretrain.ray_jobs import ray_session

    return ray_session(config.workers, config.address)


def _pretrain(config: PretrainConfig) -> Path:
    started = time.perf_counter()
    model_cls = model_class(config.cost_model)
    out = config.out_dir
    tables, holdout_tables = config.training_tables()
    backend = config.backend_spec()
    be = resolve_backend(backend)
    claim_folder(
        out, _run_settings(config, be, tables, holdout_tables), file_name=RUN_SETTINGS_FILE
    )
    rounds, chunk_size, progress = config.rounds, config.chunk_size, config.progress
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    compute_set = _compute_samples(config, tables, config.compute_samples)
    comm_set = _comm_samples(config, tables, config.comm_samples)
    holdout_set = []
    if holdout_tables and config.holdout_samples > 0:
        holdout_set = sample_compute_loads(
            augment_tables(holdout_tables),
            config.holdout_samples,
            np.random.default_rng([config.seed, _STREAM_HOLDOUT]),
            max_tables=config.max_tables,
            memory_cap_bytes=config.memory_cap_bytes,
        )
    timings["sample_s"] = time.perf_counter() - t0
    logger.info(
        "%d tables: %d compute, %d comm, %d held-out samples",
        len(tables),
        len(compute_set),
        len(comm_set),
        len(holdout_set),
    )

    t0 = time.perf_counter()
    data = out / "data"
    run = _collector(be, backend, config.workers, config.address)
    retests = {
        "compute": _retest(holdout_set or compute_set, config.retest_samples),
        "comm": _retest(comm_set, config.retest_samples),
    }
    jobs = [
        _Job(compute_set, data / "compute", "compute", "compute samples"),
        _Job(comm_set, data / "comm", "comm", "comm samples"),
    ]
    if holdout_set:
        jobs.append(_Job(holdout_set, data / "compute_holdout", "compute", "held-out samples"))
    jobs += [
        _Job(samples, data / f"{kind}_retest", kind, f"{kind} retest", retest=True)
        for kind, samples in retests.items()
        if samples
    ]
    for job in jobs:  # every collector, Ray's included, keeps to the folder's settings
        claim_folder(job.out, folder_settings(job.kind, be))
    # samples each job's last pass left unmeasured (a pass covers every earlier one's)
    missing: dict[str, tuple[int, int]] = {}
    for r in range(1, rounds + 1):
        for job in jobs:
            head = job.head(r, rounds)
            if head:
                got = run(
                    job.samples[:head],
                    job.out,
                    kind=job.kind,
                    chunk_size=chunk_size,
                    progress=progress,
                    description=job.describe(r, rounds),
                )
                missing[job.description] = (got.failed, len(job.samples))
    for job in (j for j in jobs if j.retest):  # the rounds measured every original
        got = run(
            job.samples,
            job.out,
            kind=job.kind,
            chunk_size=chunk_size,
            progress=progress,
            description=job.description,
        )
        missing[job.description] = (got.failed, len(job.samples))
    _fail_if_missing(missing, data)
    timings["collect_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    compute_data = load_compute(data / "compute", {s.key for s in compute_set})
    comm_data = load_comm(data / "comm", {s.key for s in comm_set})
    kwargs = {"seed": config.seed, **dict(config.model_kwargs or {})}
    with _trainer(
        config.cost_model, out / "train", config.workers, config.address, config.storage
    ) as fit_kwargs:
        model = model_cls(**kwargs).fit(
            compute_data,
            comm_data,
            backend_name=be.name,
            num_devices=config.num_devices,
            **fit_kwargs,
        )
        plan_keys: set[str] = set()
        for r in range(config.plan_rounds):
            drawn = plan_load_samples(
                model,
                tables,
                config.plan_tasks,
                np.random.default_rng([config.seed, _STREAM_PLANS, r]),
                searchers=config.plan_searchers,
                num_devices=config.num_devices,
                memory_bytes=config.memory_cap_bytes,
                batch_size=be.batch_size,
                start_index=(r + 1) * _PLAN_INDEX,
            )
            plans_dir = data / "compute_plans"
            claim_folder(plans_dir, folder_settings("compute", be))
            got = run(
                drawn,
                plans_dir,
                kind="compute",
                chunk_size=chunk_size,
                progress=progress,
                description=f"plan-shaped samples, round {r + 1}/{config.plan_rounds}",
            )
            _fail_if_missing({"plan-shaped samples": (got.failed, len(drawn))}, data)
            plan_keys |= {x.key for x in drawn}
            joined = compute_data.concat(load_compute(plans_dir, plan_keys))
            logger.info(
                "plan-shaped round %d: %d device loads; training on %d compute samples",
                r + 1,
                len(drawn),
                len(joined),
            )
            model = model_cls(**kwargs).fit(
                joined,
                comm_data,
                backend_name=be.name,
                num_devices=config.num_devices,
                **fit_kwargs,
            )
        if plan_keys:
            model.sample_counts_["compute_plans"] = len(plan_keys)
    timings["train_s"] = time.perf_counter() - t0
    if holdout_set:
        holdout = load_compute(data / "compute_holdout", {s.key for s in holdout_set})
        model.metrics_["compute"]["test_pool"] = model.score_compute(holdout)
        model.sample_counts_["compute_holdout"] = len(holdout)
    if any(retests.values()):
        model.metrics_["noise_floor"] = _noise_floors(
            data, "compute_holdout" if holdout_set else "compute", retests
        )
    timings["total_s"] = time.perf_counter() - started
    model.provenance_ = {
        "pipeline": "neuroshard.pretrain.pipeline.pretrain",
        "seed": config.seed,
        "num_devices": config.num_devices,
        "comm_device_counts": config.comm_counts,
        "num_tables": len(tables),
        "num_holdout_tables": len(holdout_tables),
        "memory_cap_bytes": config.memory_cap_bytes,
        "max_tables": config.max_tables,
        "shrink_copies": config.shrink_copies,
        "plan_rounds": config.plan_rounds,
        "plan_tasks": config.plan_tasks if config.plan_rounds else 0,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    model_dir = model.save(out / "model")
    m = model.metrics_
    logger.info(
        "pretrained %s in %.0f s: compute MAPE %.3f (test), %s; fwd comm MAPE %.3f, "
        "bwd comm MAPE %.3f",
        model.name,
        timings["total_s"],
        m["compute"]["test"]["mape"],
        f"{m['compute']['test_pool']['mape']:.3f} (test pool)"
        if "test_pool" in m["compute"]
        else "no test pool",
        m["fwd_comm"]["test"]["mape"],
        m["bwd_comm"]["test"]["mape"],
    )
    return model_dir


RUN_SETTINGS_FILE = "pretrain.json"


def _run_settings(
    config: PretrainConfig,
    be: HardwareBackend,
    tables: Sequence[TableSpec],
    holdout: Sequence[TableSpec],
) -> dict[str, Any]:
    """What a run folder fixes on its first run: everything that decides which samples
    are drawn and what they measure (sample counts may grow; the model trained may vary)."""

    def digest(specs: Sequence[TableSpec]) -> str:
        text = json.dumps([t.to_record() for t in specs], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    backend = folder_settings("compute", be)
    return {
        "backend": backend["backend"],
        "fingerprint": backend["fingerprint"],
        "seed": config.seed,
        "comm_device_counts": config.comm_counts,
        "max_tables": config.max_tables,
        "memory_cap_bytes": config.memory_cap_bytes,
        "shrink_copies": config.shrink_copies,
        "tables": digest(tables),
        "holdout_tables": digest(holdout),
    }


@dataclass(frozen=True)
class _Job:
    """One sample set of a collection and where its rows go."""

    samples: Sequence[Any]
    out: Path
    kind: str
    description: str
    retest: bool = False

    def head(self, r: int, rounds: int) -> int:
        """How many of the samples round ``r`` of ``rounds`` leaves measured.

        Originals grow by equal slices. A retest lags one round behind: retest i is the
        second measurement of original i, which an earlier round measured (retests are a
        prefix of a set no shorter than them), so the two are minutes apart, not seconds.
        """
        done = r - 1 if self.retest else r
        return -(-len(self.samples) * done // rounds)

    def describe(self, r: int, rounds: int) -> str:
        return self.description if rounds == 1 else f"{self.description} ({r}/{rounds})"


def _fail_if_missing(missing: Mapping[str, tuple[int, int]], data: Path) -> None:
    """:class:`BackendError` when a collection left samples unmeasured (Ray gave up on
    their chunks): a model trained on less than was asked for, and on a set thinned where
    the backend failed, is not the model asked for."""
    lost = {what: (n, total) for what, (n, total) in missing.items() if n}
    if lost:
        sets = ", ".join(f"{n} of {total} {what}" for what, (n, total) in lost.items())
        raise BackendError(
            f"{sum(n for n, _ in lost.values())} samples were not measured "
            f"after every retry ({sets}); nothing was trained. Rerun the same "
            f"command: it resumes, measuring only the samples missing under "
            f"{data}"
        )


def _retest(samples: Sequence[Any], n: int) -> list[Any]:
    return [replace(s, index=s.index + RETEST_INDEX_OFFSET) for s in samples[: max(n, 0)]]


def _noise_floors(
    data: Path, compute_dir: str, retests: Mapping[str, Sequence[Any]]
) -> dict[str, dict[str, float]]:
    """Noise-floor metrics of every retest that reached the disk, against the first run."""
    floors: dict[str, dict[str, float]] = {}
    if retests["compute"]:
        again = load_compute(data / "compute_retest", {s.key for s in retests["compute"]})
        first = load_compute(data / compute_dir, {_first_key(s) for s in retests["compute"]})
        a, b = _paired(first.keys, first.label_ms, again.keys, again.label_ms, retests["compute"])
        floors["compute"] = noise_floor(a, b)
    if retests["comm"]:
        comm_again = load_comm(data / "comm_retest", {s.key for s in retests["comm"]})
        comm_first = load_comm(data / "comm", {_first_key(s) for s in retests["comm"]})
        for which in ("fwd", "bwd"):
            a, b = _paired(
                comm_first.keys,
                getattr(comm_first, f"{which}_ms"),
                comm_again.keys,
                getattr(comm_again, f"{which}_ms"),
                retests["comm"],
                comm_first.mask,
                comm_again.mask,
            )
            floors[f"{which}_comm"] = noise_floor(a, b)
    return floors


def _first_key(retest: Any) -> str:
    return replace(retest, index=retest.index - RETEST_INDEX_OFFSET).key


def _paired(
    first_keys: np.ndarray,
    first: np.ndarray,
    again_keys: np.ndarray,
    again: np.ndarray,
    retests: Sequence[Any],
    first_mask: np.ndarray | None = None,
    again_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The first and second measurement of every retest sample found in both runs."""
    row_first = {k: i for i, k in enumerate(first_keys)}
    row_again = {k: i for i, k in enumerate(again_keys)}
    pairs = [
        (row_first[_first_key(s)], row_again[s.key])
        for s in retests
        if s.key in row_again and _first_key(s) in row_first
    ]
    a_rows = [i for i, _ in pairs]
    b_rows = [j for _, j in pairs]
    if first_mask is None or again_mask is None:
        return first[a_rows], again[b_rows]
    a = [first[i][first_mask[i]] for i in a_rows]
    b = [again[j][again_mask[j]] for j in b_rows]
    return (np.concatenate(a) if a else np.zeros(0)), (np.concatenate(b) if b else np.zeros(0))


@contextmanager
def _trainer(
    cost_model: str,
    checkpoint_dir: Path,
    workers: int,
    address: str | None,
    storage: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The ``fit`` keywords that train the neural nets resumably (the injected
    ``trainer``): on Ray Train when ``workers`` or ``address`` ask for Ray, else in this
    process with file checkpoints."""
    if cost_model != "neural":
        if workers or address:
            logger.info("%s trains in this process; Ray only collects", cost_model)
        yield {}
        return
    if not workers and not address:
        yield {"trainer": file_checkpointed(checkpoint_dir)}
        return
    from neuroshard.pretrain.ray_train import ray_training

    with ray_training(
        workers=max(workers, 1), storage_dir=storage or checkpoint_dir, address=address
    ) as trainer:
        yield {"trainer": trainer}


def _compute_samples(config: PretrainConfig, tables: Sequence[TableSpec], n: int) -> list:
    variants = list(tables)
    if config.shrink_copies > 0:
        variants += shrink_tables(
            tables,
            np.random.default_rng([config.seed, _STREAM_SHRINK]),
            copies=config.shrink_copies,
        )
    return sample_compute_loads(
        augment_tables(variants),
        n,
        np.random.default_rng([config.seed, _STREAM_COMPUTE]),
        max_tables=config.max_tables,
        memory_cap_bytes=config.memory_cap_bytes,
    )


def _comm_samples(config: PretrainConfig, tables: Sequence[TableSpec], n: int) -> list:
    return sample_comm_tasks(
        tables, n, np.random.default_rng([config.seed, _STREAM_COMM]), config.comm_counts
    )


def _collector(
    backend: HardwareBackend | BackendSpec, spec: Any, workers: int, address: str | None
) -> Callable[..., Any]:
    """``collect`` on ``backend`` in this process, or on Ray actors rebuilding ``spec``."""
    if not workers and not address:
        return lambda samples, out, **kw: collect(samples, backend, out, **kw)
    if not isinstance(spec, BackendSpec):
        raise ValueError("Ray collection needs the backend by name (a BackendSpec), not an object")
    from neuroshard.pretrain.ray_jobs import collect_ray

    return lambda samples, out, **kw: collect_ray(
        samples, spec, out, workers=max(workers, 1), address=address, **kw
    )


def collect_samples(config: PretrainConfig, kind: str) -> CollectResult:
    """Draw the ``kind`` samples (``compute`` or ``comm``) of the training tables as
    ``pretrain`` does (same seeds and counts, so the keys match) and measure them into
    ``config.out_dir`` itself (resumable)."""
    if kind not in ("compute", "comm"):
        raise UnknownNameError(f"unknown sample kind {kind!r}; valid: compute, comm")
    check_output_dir(config.out_dir)
    with folder_lock(config.out_dir):
        return _collect_samples(config, kind)


def _collect_samples(config: PretrainConfig, kind: str) -> CollectResult:
    tables, _ = config.training_tables()
    if kind == "compute":
        drawn = _compute_samples(config, tables, config.compute_samples)
    else:
        drawn = _comm_samples(config, tables, config.comm_samples)
    spec = config.backend_spec()
    ray = bool(config.workers or config.address)
    if not ray:
        be = resolve_backend(spec)
    else:  # Ray workers build the backend; here only if it can be (no GPU on a head)
        try:
            be = resolve_backend(spec)
        except BackendError as exc:
            logger.info("backend not built here (%s): the workers check its fingerprint", exc)
            be = None
    settings = {"kind": kind} if be is None else folder_settings(kind, be)
    claim_folder(config.out_dir, {**settings, "seed": config.seed})
    run = _collector(be if be is not None else spec, spec, config.workers, config.address)
    return run(
        drawn,
        config.out_dir,
        kind=kind,
        chunk_size=config.chunk_size,
        progress=config.progress,
        description=f"{kind} samples",
    )

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
An actor gets chunks only once it has started and reported its backend's fingerprint, so
a replacement that the cluster has no room for (its node was lost) leaves the job to the
other actors instead of stalling it; it joins if room appears (a node comes back).

By default an embedded local Ray cluster with ``workers`` CPUs is started and shut down
around the job; ``address`` connects to a running cluster instead (left running; see
:func:`connect_ray` for what is checked first), as does calling with Ray already
initialised (left connected). Actors of a ``cuda`` backend ask for one GPU each.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from neuroshard.types import BackendError, RayClusterError, UsageError

logger = logging.getLogger(__name__)

__all__ = ["collect_ray", "connect_ray", "init_ray", "ray_session"]

# Chunks queued on each actor: one measuring, one waiting, so no actor idles while the
# driver writes a part and hands out the next chunk.
CHUNKS_IN_FLIGHT_PER_WORKER = 2
# Object store of an embedded cluster: rows are small, so keep the reservation small.
EMBEDDED_OBJECT_STORE_BYTES = 256 << 20
GPU_BACKENDS = frozenset({"cuda"})
# How long the checks before connecting wait for the cluster's head to answer.
PROBE_TIMEOUT_S = 5.0
# How long a collection with no chunk in flight waits for an actor to start (the
# cluster has no room for one) before giving up.
WORKER_START_TIMEOUT_S = 300.0
_WAIT_POLL_S = 5.0
# Ray's token variables (Ray >= 2.52), in Ray's order of precedence, then its token file.
_AUTH_MODE_VAR = "RAY_AUTH_MODE"
_TOKEN_VAR, _TOKEN_PATH_VAR = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
_DEFAULT_TOKEN_FILE = Path(".ray") / "auth_token"  # under the home directory


# --------------------------------------------------------------------------- connecting


def init_ray(workers: int, address: str | None) -> bool:
    """Start or connect to Ray; True when this call did (and must ``ray.shutdown()``:
    that stops an embedded cluster and only disconnects from one at ``address``)."""
    import ray

    if ray.is_initialized():
        return False
    if address is not None:
        connect_ray(address)
        return True
    ray.init(
        num_cpus=workers,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
    )
    return True


@contextmanager
def ray_session(workers: int, address: str | None) -> Iterator[None]:
    """Ray started (embedded, ``max(workers, 1)`` CPUs) or joined (``address``) for the
    whole block, so that the collections and trainings inside share it; shut down (or
    left) after the block when this call started it."""
    import ray

    owned = init_ray(max(workers, 1), address)
    try:
        yield
    finally:
        if owned:
            ray.shutdown()


def connect_ray(address: str) -> None:
    """Connect this process to the Ray cluster whose head is at ``address`` (``HOST:PORT``,
    the address ``ray start --head`` prints), or raise :class:`RayClusterError` naming
    the address and what to check.

    Where a plain ``ray.init(address=...)`` retries for a minute and ends in a bare
    ``ConnectionError``, this first asks the head itself (one gRPC call, at most
    :data:`PROBE_TIMEOUT_S`) and fails at once when nothing answers, when the cluster
    refuses this client's token, or when no node of the cluster runs on this machine (Ray
    runs the job's driver on a node). Two of Ray's defaults are mended on the way:

    * Token: Ray >= 2.59 turns token authentication on for a cluster started where a
      token exists, but a client given an explicit address sends its token only under
      ``RAY_AUTH_MODE=token``. With ``RAY_AUTH_MODE`` unset and a token at hand
      (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), this process
      turns token mode on, as ``ray start --head`` does.
    * Loopback: Ray rewrites ``127.0.0.1`` or ``localhost`` into this machine's outward
      address, where a cluster whose nodes were started with ``--node-ip-address
      127.0.0.1`` does not listen. A loopback address is used as given.
    """
    import ray

    host, port = _split_address(address)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    token, source = _client_token()
    alive = _probe_head(target, token, source)
    _check_local_node(target, alive)
    with _loopback_kept(host):
        try:
            ray.init(address=target, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, TimeoutError, ray.exceptions.RayError) as exc:
            raise RayClusterError(
                f"cannot join the Ray cluster at {target}: {type(exc).__name__}: {exc}"
            ) from exc
    logger.info("connected to the Ray cluster at %s (%d nodes)", target, len(alive))


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(
            f"--address {address!r}: give the Ray head's address as HOST:PORT, "
            "as `ray start --head` prints it (for example 10.0.0.5:6379)"
        )
    return ("127.0.0.1" if host == "localhost" else host), int(port)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _client_token() -> tuple[str | None, str]:
    """The token this client sends (None: none) and where it comes from, for messages.
    Turns token mode on for this process when ``RAY_AUTH_MODE`` is unset and a token is
    at hand."""
    mode = os.environ.get(_AUTH_MODE_VAR, "").strip().lower()
    token, source = _find_token()
    if not mode and token is not None:
        os.environ[_AUTH_MODE_VAR] = mode = "token"
        logger.info(
            "a Ray token is at hand and %s is unset: token authentication on", _AUTH_MODE_VAR
        )
    _refresh_ray_auth()
    if mode == "token" and token is None:
        raise RayClusterError(
            f"{_AUTH_MODE_VAR}=token but this client has no token: set "
            f"{_TOKEN_VAR} or {_TOKEN_PATH_VAR}, or put the cluster's token "
            f"in ~/{_DEFAULT_TOKEN_FILE}"
        )
    return (token if mode == "token" else None), source


def _find_token() -> tuple[str | None, str]:
    if os.environ.get(_TOKEN_VAR, "").strip():
        return os.environ[_TOKEN_VAR].strip(), _TOKEN_VAR
    if os.environ.get(_TOKEN_PATH_VAR):
        path = Path(os.environ[_TOKEN_PATH_VAR]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise RayClusterError(
                f"{_TOKEN_PATH_VAR}={path} cannot be read ({exc.strerror}): "
                "point it at the file holding the cluster's token"
            ) from None
        if not token:
            raise RayClusterError(
                f"{_TOKEN_PATH_VAR}={path} is empty: point it at the file "
                "holding the cluster's token"
            )
        return token, f"{_TOKEN_PATH_VAR}={path}"
    default = Path.home() / _DEFAULT_TOKEN_FILE
    try:
        token = default.read_text().strip()
    except OSError:
        return None, "none"
    return (token or None), str(default)


def _refresh_ray_auth() -> None:
    """Make Ray reread ``RAY_AUTH_MODE`` and the token: it caches both (its config at
    import, the token when first used, say by an earlier embedded cluster in this
    process), as ``ray.init`` does for a cluster of its own. Not while connected: ray.init
    refuses a second connection anyway."""
    import ray

    if ray.is_initialized():
        return
    try:
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]  # Ray internals, guarded

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):
        logger.debug("cannot refresh Ray's auth settings", exc_info=True)


def _probe_head(target: str, token: str | None, source: str) -> list[str]:
    """Ids of the cluster's alive nodes, asked of its head (the GCS) with ``token``."""
    import grpc
    from ray.core.generated import gcs_pb2, gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(),  # type: ignore[attr-defined]
                timeout=PROBE_TIMEOUT_S,
                metadata=metadata,
            )
            reply = stub.GetAllNodeInfo(
                gcs_service_pb2.GetAllNodeInfoRequest(),  # type: ignore[attr-defined]
                timeout=PROBE_TIMEOUT_S,
                metadata=metadata,
            )
        except grpc.RpcError as exc:
            raise RayClusterError(
                _explain(target, exc.code(), exc.details() or "", token, source)
            ) from None
    return [
        n.node_id.hex()
        for n in reply.node_info_list
        if n.state == gcs_pb2.GcsNodeInfo.GcsNodeState.ALIVE  # type: ignore[attr-defined]  # Ray internals, guarded
    ]


def _explain(target: str, code: Any, details: str, token: str | None, source: str) -> str:
    import grpc

    host, _, port = target.rpartition(":")
    reach = (
        f"check that the cluster's head runs (`ray status --address {target}` there), "
        f"that {host} is the address it was started on (`ray start --head "
        f"--node-ip-address`), and that nothing blocks port {port}"
    )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if token is None:
            return (
                f"the Ray cluster at {target} requires an authentication token and this "
                f"client sends none: set {_TOKEN_VAR}, or {_TOKEN_PATH_VAR}, or copy the "
                f"head's ~/{_DEFAULT_TOKEN_FILE}, to the token the cluster was started with"
                + (
                    f", and unset {_AUTH_MODE_VAR}=disabled"
                    if os.environ.get(_AUTH_MODE_VAR, "").lower() == "disabled"
                    else ""
                )
            )
        return (
            f"the Ray cluster at {target} rejected this client's token (from {source}): "
            "use the token its nodes were started with (`ray get-auth-token` on the head "
            "prints it)"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"no Ray cluster answers at {target} ({details.split(';')[0]}): {reach}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the Ray cluster at {target} did not answer within {PROBE_TIMEOUT_S:g} s: {reach}"
    return (
        f"{target} does not answer as a Ray cluster's head ({code.name}: {details}): give "
        "the address `ray start --head` prints (its --port, 6379 by default), not the "
        "dashboard's or the Ray Client's"
    )


def _check_local_node(target: str, alive: Sequence[str]) -> None:
    """Ray runs a job's driver on a node of the cluster; without one here, ray.init would
    search for a minute before failing."""
    try:
        from ray._private.services import find_node_ids

        local = set(find_node_ids())  # Ray's own scan of this machine's raylets
    except Exception:  # noqa: BLE001 -- no scan, no check: ray.init finds out itself
        logger.debug("cannot list this machine's Ray nodes", exc_info=True)
        return
    if not local & set(alive):
        raise RayClusterError(
            f"no node of the Ray cluster at {target} ({len(alive)} alive) runs on this "
            "machine, and Ray runs the job's driver on a node: run neuroshard on the head, "
            f"or join this machine first with `ray start --address {target}`"
        )


@contextmanager
def _loopback_kept(host: str) -> Iterator[None]:
    """While connecting to a loopback ``host``, stop Ray from rewriting it into this
    machine's outward address (Ray issue #59110)."""
    try:
        from ray._private import services

        rewrite = services.resolve_ip_for_localhost
    except (ImportError, AttributeError):
        rewrite = None
    if rewrite is None or not _is_loopback(host):
        yield
        return
    services.resolve_ip_for_localhost = lambda h: h  # type: ignore[assignment]
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = rewrite


# --------------------------------------------------------------------------- collecting


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


@dataclass
class _Slot:
    """A worker's place: its current actor and, until that actor answers, the pending
    call that asked for its backend's fingerprint."""

    actor: Any
    starting: Any | None
    failed_starts: int = 0  # actors of this slot lost in a row before answering


def collect_ray(
    samples: Sequence[ComputeSample | CommSample],
    backend_spec: BackendSpec,
    out_dir: str | os.PathLike,
    *,
    kind: Kind,
    workers: int = 1,
    address: str | None = None,
    chunk_size: int = 64,
    max_retries: int = 2,
    gpus_per_worker: float | None = None,
    progress: bool = True,
    description: str | None = None,
    start_timeout_s: float = WORKER_START_TIMEOUT_S,
) -> CollectResult:
    """Measure every sample not yet under ``out_dir`` on ``workers`` Ray actors.

    Same output and resume rule as :func:`~neuroshard.pretrain.collect.collect`; refuses
    (:class:`~neuroshard.pretrain.collect.DatasetError`) to add rows from a backend whose
    fingerprint differs from the one on disk, or when the actors disagree on theirs.
    A chunk that still fails after ``max_retries`` retries is logged and counted in
    ``failed``; it does not stop the job. ``gpus_per_worker`` defaults to 1 for the
    ``cuda`` backend and 0 otherwise (set it for a GPU backend given by import path).
    When no chunk is in flight and no actor has started for ``start_timeout_s`` seconds
    (the cluster has no room for one), :class:`~neuroshard.types.RayClusterError`.
    """
    if not isinstance(backend_spec, BackendSpec):
        raise TypeError(f"backend_spec must be a BackendSpec, got {type(backend_spec).__name__}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    out, pending, skipped = start_collection(samples, out_dir, kind, chunk_size)
    logger.info(
        "collect %s into %s on %d Ray workers: %d samples, %d on disk, %d to measure",
        kind,
        out,
        workers,
        len(samples),
        skipped,
        len(pending),
    )
    if not pending:
        return CollectResult(out, 0, skipped, len(samples))

    import ray

    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if backend_spec.name in GPU_BACKENDS else 0.0
    owned = init_ray(workers, address)
    try:
        return _Collection(
            ray, backend_spec, out, kind, gpus_per_worker, max_retries, start_timeout_s
        ).run(
            pending,
            workers,
            chunk_size,
            progress,
            description or f"{kind} samples",
            len(samples),
            skipped,
        )
    finally:
        if owned:
            ray.shutdown()


class _Collection:
    """The driver's side of one :func:`collect_ray` call."""

    def __init__(
        self,
        ray: Any,
        spec: BackendSpec,
        out: Path,
        kind: Kind,
        gpus_per_worker: float,
        max_retries: int,
        start_timeout_s: float,
    ):
        self.ray, self.spec, self.out, self.kind = ray, spec, out, kind
        self.max_retries, self.start_timeout_s = max_retries, start_timeout_s
        self.actor_cls = ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_restarts=0)(_Worker)
        self.queue: deque[_Chunk] = deque()
        self.slots: list[_Slot] = []
        self.in_flight: dict[Any, tuple[_Slot, Any, _Chunk]] = {}  # ref -> slot, actor, chunk
        self.starting: dict[Any, _Slot] = {}  # fingerprint ref -> slot
        self.fingerprint: str | None = None

    def run(
        self,
        pending: list[Any],
        workers: int,
        chunk_size: int,
        progress: bool,
        description: str,
        total: int,
        skipped: int,
    ) -> CollectResult:
        ray = self.ray
        self.queue.extend(_Chunk(c) for c in _chunks(pending, chunk_size))
        measured = failed = 0
        for _ in range(min(workers, len(self.queue))):
            self.slots.append(self._start(None))
        last_answer = time.monotonic()
        try:
            with _Bar(progress, description, total, skipped) as bar:
                while self.queue or self.in_flight:
                    self._submit()
                    refs = [*self.in_flight, *self.starting]
                    if not refs:
                        raise RayClusterError(
                            f"every Ray worker was lost while starting, {len(self.queue)} "
                            "chunks left; rerun to measure them"
                        )
                    done, _ = ray.wait(refs, num_returns=1, timeout=_WAIT_POLL_S)
                    if not done:
                        if (
                            not self.in_flight
                            and time.monotonic() - last_answer > self.start_timeout_s
                        ):
                            raise RayClusterError(
                                f"no Ray worker started within {self.start_timeout_s:g} s: the "
                                "cluster has no free CPU (or GPU) for one; `ray status` shows "
                                "its resources; rerun to resume"
                            )
                        continue
                    last_answer = time.monotonic()
                    [ref] = done
                    if ref in self.starting:
                        self._started(ref)
                        continue
                    slot, actor, chunk = self.in_flight.pop(ref)
                    try:
                        rows = ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        # The actor is gone (max_restarts=0: process killed, node lost);
                        # its other queued chunks fail the same way and are retried too.
                        lost = self._retry_or_give_up(chunk, exc)
                        failed += lost
                        bar.advance(lost)
                        if slot.actor is actor:
                            logger.warning("a Ray worker died; starting a new one")
                            self._start(slot)
                    except ray.exceptions.RayTaskError as exc:
                        lost = self._retry_or_give_up(chunk, exc.cause or exc)
                        failed += lost
                        bar.advance(lost)
                    else:
                        path = write_part(rows, self.out, self.kind)
                        measured += len(rows)
                        bar.advance(len(rows))
                        logger.debug("wrote %s (%d rows)", path.name, len(rows))
        finally:
            _close_actors(
                ray,
                [s.actor for s in self.slots if s.starting is None],
                [s.actor for s in self.slots if s.starting is not None],
            )
        if failed:
            logger.error(
                "%d of %d samples failed after %d retries; rerun to measure them",
                failed,
                len(pending),
                self.max_retries,
            )
        return CollectResult(self.out, measured, skipped, total, failed)

    def _start(self, slot: _Slot | None) -> _Slot:
        """A new actor, for ``slot`` (replacing its dead one) or for a new slot."""
        actor = self.actor_cls.remote(self.spec)
        ref = actor.fingerprint.remote()
        if slot is None:
            slot = _Slot(actor, ref)
        else:
            _kill(self.ray, slot.actor)  # dead or unreachable: make sure it holds no CPU
            slot.actor, slot.starting = actor, ref
        self.starting[ref] = slot
        return slot

    def _started(self, ref: Any) -> None:
        """A slot's actor answered (or died) before its first chunk."""
        slot = self.starting.pop(ref)
        try:
            fingerprint = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            if exc.actor_init_failed:  # the backend's own error ends Ray's traceback
                cause = (str(exc).strip().splitlines() or ["?"])[-1]
                raise BackendError(
                    f"backend {self.spec.name!r} cannot start on a Ray worker: {cause}"
                ) from exc
            slot.failed_starts += 1
            if slot.failed_starts > self.max_retries:
                logger.error(
                    "a Ray worker was lost %d times while starting; going on without it",
                    slot.failed_starts,
                )
                _kill(self.ray, slot.actor)
                self.slots.remove(slot)
                return
            logger.warning("a Ray worker was lost while starting; starting a new one")
            self._start(slot)
            return
        if self.fingerprint is None:
            check_fingerprint(self.out, fingerprint, self.spec.name)
            self.fingerprint = fingerprint
        elif fingerprint != self.fingerprint:
            raise DatasetError(
                "Ray workers measure on different hardware: "
                f"{sorted({fingerprint, self.fingerprint})}; collect on identical "
                "workers, one directory per kind of worker"
            )
        slot.starting, slot.failed_starts = None, 0

    def _submit(self) -> None:
        """Keep every started actor :data:`CHUNKS_IN_FLIGHT_PER_WORKER` chunks deep."""
        for slot in self.slots:
            if slot.starting is not None:
                continue
            load = sum(actor is slot.actor for _, actor, _ in self.in_flight.values())
            while self.queue and load < CHUNKS_IN_FLIGHT_PER_WORKER:
                chunk = self.queue.popleft()
                chunk.attempts += 1
                ref = slot.actor.measure.remote(chunk.samples, self.kind)
                self.in_flight[ref] = (slot, slot.actor, chunk)
                load += 1

    def _retry_or_give_up(self, chunk: _Chunk, exc: BaseException) -> int:
        """Queue ``chunk`` again (0) or give it up (its sample count)."""
        if chunk.attempts <= self.max_retries:
            logger.warning(
                "chunk of %d samples (first key %s) failed on attempt %d, retrying: %s",
                len(chunk.samples),
                chunk.samples[0].key,
                chunk.attempts,
                exc,
            )
            self.queue.appendleft(chunk)
            return 0
        logger.error(
            "chunk of %d samples (keys %s..%s) failed %d times, giving up: %s",
            len(chunk.samples),
            chunk.samples[0].key,
            chunk.samples[-1].key,
            chunk.attempts,
            exc,
        )
        return len(chunk.samples)


def _close_actors(ray: Any, started: list[Any], unstarted: list[Any]) -> None:
    """Let each started backend stop its own processes, then end every actor."""
    refs = [a.close.remote() for a in started]
    try:
        ray.wait(refs, num_returns=len(refs), timeout=30)
    except Exception:  # noqa: BLE001 -- a dead actor has nothing left to close
        logger.debug("closing Ray workers", exc_info=True)
    for a in [*started, *unstarted]:
        _kill(ray, a)


def _kill(ray: Any, actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 -- already gone
        logger.debug("killing a Ray worker", exc_info=True)

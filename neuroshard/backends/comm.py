"""Timing the forward and backward all-to-all of pooled embeddings among N processes.

In a sharded DLRM step every device holds, for the whole batch, the pooled outputs of its
own shards: a ``(batch, dim_sum)`` tensor. The **forward** all-to-all sends each device's
rows ``[j*B/N, (j+1)*B/N)`` to device ``j``, so every device ends with its slice of the
batch for every device's columns: ``(B/N, sum of dim_sums)``. The **backward** all-to-all
sends the gradients back the other way.

A device reaches the forward collective only after its compute and backward comm, so it
waits there for the slowest one. :class:`CommPool` reproduces this: before the forward
collective each rank sleeps its injected ``waits_ms``, then times from that moment to
the end of the collective -- the time it spent waiting for stragglers plus the transfer.
The backward is timed after a barrier, with no injected wait. Each reported figure is
the median over repeats, with the relative interquartile spread.

Workers are N processes (``torch.multiprocessing`` spawn) joined in one process group --
gloo on CPU, nccl on CUDA (one GPU per rank) -- through a TCP store the parent hosts on a
free loopback port. They start once and then serve requests through queues, so a sample
costs only its collectives. Workers exit when :meth:`CommPool.close` is called, when the
parent exits, or within a second of the parent dying while they are idle.

The other sharding types' collectives (:data:`COLLECTIVES`) are timed the same way
(:meth:`CommPool.measure_collective`): an all-gather, an all-reduce and a reduce-scatter
of a given size over all ranks. Gloo has no reduce-scatter: it is emulated as an
all-to-all of the equal chunks followed by a local sum (what a reduce-scatter moves, plus
one pass over the data); NCCL runs its own. :meth:`CommTimer.link_speeds` turns a large
and a tiny all-gather into the bandwidth and per-collective latency that price a plan's
other traffic (:func:`neuroshard.traffic.price`) for the ``cpu`` and ``cuda`` backends.

Scripts that use this module must guard their entry point with
``if __name__ == "__main__":`` (spawned workers re-import the main module).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import sys
import time
import traceback
import weakref
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from neuroshard.backends.timing import summarize
from neuroshard.traffic import LinkSpeeds
from neuroshard.types import DEFAULT_BATCH_SIZE, BackendError, Timing

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_POLL_S = 1.0


def batch_slices(batch_size: int, num_ranks: int) -> list[int]:
    """Rows of the batch each rank owns after the forward all-to-all (as even as possible)."""
    base, extra = divmod(batch_size, num_ranks)
    return [base + (j < extra) for j in range(num_ranks)]


# --------------------------------------------------------------------------- worker side


COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter")


def run_collective(
    dist: Any, kind: str, data: Any, out: Any, num_ranks: int, native_reduce_scatter: bool
) -> None:
    """One collective over the default group: ``data`` is this rank's input (``numel``
    floats; ``numel / num_ranks`` for an all-gather), ``out`` the output buffer. A
    reduce-scatter without native support (gloo) is an all-to-all of equal chunks and a
    sum of the received chunks into ``out``."""
    if kind == "all_gather":
        dist.all_gather_into_tensor(out, data)
    elif kind == "all_reduce":
        dist.all_reduce(data)
    elif kind == "reduce_scatter":
        if native_reduce_scatter:
            dist.reduce_scatter_tensor(out, data)
        else:
            received = data.new_empty(data.shape)
            dist.all_to_all_single(received, data)
            out.copy_(received.view(num_ranks, -1).sum(dim=0))
    else:
        raise ValueError(f"unknown collective {kind!r}; valid: {', '.join(COLLECTIVES)}")


def _time_collective(
    torch: Any,
    dist: Any,
    dev: Any,
    kind: str,
    numel: int,
    num_ranks: int,
    warmups: int,
    repeats: int,
    sync: Any,
) -> list[float]:
    """ms of each repeat of one collective of ``numel`` floats on this rank."""
    numel = max(num_ranks, numel - numel % num_ranks)
    part = numel // num_ranks
    data = torch.ones(part if kind == "all_gather" else numel, device=dev)
    out = torch.empty(numel if kind == "all_gather" else part, device=dev)
    native = dev.type == "cuda"
    times = []
    for i in range(warmups + repeats):
        sync()
        t0 = time.perf_counter()
        run_collective(dist, kind, data, out, num_ranks, native)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= warmups:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _worker(
    rank: int,
    num_ranks: int,
    port: int,
    device: str,
    threads: int,
    timeout_s: float,
    parent_pid: int,
    requests: Any,
    results: Any,
) -> None:
    """Body of one rank: join the group, then answer measurement requests until told to stop."""
    import torch
    import torch.distributed as dist

    try:
        torch.set_num_threads(threads)
        os.environ.setdefault("MASTER_ADDR", LOOPBACK)
        os.environ.setdefault("MASTER_PORT", str(port))
        if (
            device == "cpu"
            and sys.platform.startswith("linux")
            and os.path.exists("/sys/class/net/lo")
        ):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(LOOPBACK, port, is_master=False, timeout=timeout)
        if device == "cpu":
            dev = torch.device("cpu")
            dist.init_process_group(
                "gloo", store=store, rank=rank, world_size=num_ranks, timeout=timeout
            )
        else:
            dev = torch.device("cuda", rank)
            torch.cuda.set_device(dev)
            dist.init_process_group(
                "nccl", store=store, rank=rank, world_size=num_ranks, timeout=timeout, device_id=dev
            )
        sync_token = torch.zeros(1, device=dev)
        dist.all_reduce(sync_token)
        results.put(("ready", rank, None))
    except Exception:
        results.put(("error", rank, traceback.format_exc()))
        return

    def sync() -> None:
        dist.all_reduce(sync_token)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    buffers: tuple[tuple[int, ...], Any, Any] | None = None
    try:
        while True:
            try:
                msg = requests.get(timeout=_POLL_S)
            except queue.Empty:
                if os.getppid() != parent_pid:  # orphaned: the parent died
                    break
                continue
            if msg is None:
                break
            if msg[0] == "collective":
                _, request_id, kind, numel, warmups, repeats = msg
                try:
                    times = _time_collective(
                        torch, dist, dev, kind, numel, num_ranks, warmups, repeats, sync
                    )
                    results.put(("ok", rank, (request_id, times, [])))
                except Exception:
                    results.put(("error", rank, traceback.format_exc()))
                    break
                continue
            request_id, dim_sums, waits_ms, warmups, repeats, batch_size = msg
            try:
                dims = tuple(int(d) for d in dim_sums)
                rows = batch_slices(batch_size, num_ranks)
                own = dims[rank]
                if buffers is None or buffers[0] != dims + (batch_size,):
                    buffers = whole = mine = None  # free the old pair first
                    # full-batch pooled outputs of this rank, and its slice of everyone's
                    whole = torch.ones(batch_size * own, device=dev)
                    mine = torch.ones(rows[rank] * sum(dims), device=dev)
                    buffers = (dims + (batch_size,), whole, mine)
                _, whole, mine = buffers
                to_each = [r * own for r in rows]  # whole -> every rank
                from_each = [rows[rank] * d for d in dims]  # every rank -> mine
                wait_s = float(waits_ms[rank]) / 1e3
                fwd, bwd = [], []
                for i in range(warmups + repeats):
                    sync()
                    if wait_s > 0:
                        time.sleep(wait_s)
                    t0 = time.perf_counter()
                    dist.all_to_all_single(mine, whole, from_each, to_each)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    t1 = time.perf_counter()
                    sync()
                    t2 = time.perf_counter()
                    dist.all_to_all_single(whole, mine, to_each, from_each)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    t3 = time.perf_counter()
                    if i >= warmups:
                        fwd.append((t1 - t0) * 1e3)
                        bwd.append((t3 - t2) * 1e3)
                results.put(("ok", rank, (request_id, fwd, bwd)))
            except Exception:
                results.put(("error", rank, traceback.format_exc()))
                break  # peers may be stuck in a collective: the parent restarts the pool
    finally:
        buffers = None
        try:
            dist.destroy_process_group()
        except Exception:  # already broken; the process is exiting anyway
            pass


# --------------------------------------------------------------------------- parent side


def _stop(processes: list, request_queues: list, join_s: float = 5.0) -> None:
    """Ask workers to exit, then terminate the ones that do not."""
    for q in request_queues:
        try:
            q.put_nowait(None)
        except Exception:
            pass
    deadline = time.monotonic() + join_s
    for p in processes:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
            p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=2.0)
    for q in request_queues:
        q.cancel_join_thread()
        q.close()


class CommPool:
    """``num_ranks`` worker processes in one process group that time all-to-alls on request.

    ``device`` is ``"cpu"`` (gloo) or ``"cuda"`` (nccl, rank ``r`` on GPU ``r``).
    ``timeout_s`` bounds a collective and the wait for one request's answer.
    """

    def __init__(
        self,
        num_ranks: int,
        *,
        device: str = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
        warmups: int = 5,
        repeats: int = 10,
        threads: int = 1,
        timeout_s: float = 300.0,
        start_timeout_s: float = 180.0,
    ):
        import torch
        import torch.distributed as dist
        import torch.multiprocessing as mp

        if num_ranks < 1:
            raise BackendError(f"need at least one rank, got {num_ranks}")
        if not dist.is_available():
            raise BackendError("torch.distributed is not available in this torch build")
        if device == "cuda":
            if not torch.cuda.is_available():
                raise BackendError("nccl all-to-all needs CUDA, which is not available here")
            if torch.cuda.device_count() < num_ranks:
                raise BackendError(
                    f"nccl all-to-all among {num_ranks} ranks needs {num_ranks} GPUs, "
                    f"{torch.cuda.device_count()} visible"
                )
        elif device != "cpu":
            raise BackendError(f"unknown comm device {device!r}; valid: cpu, cuda")
        self.num_ranks, self.device = num_ranks, device
        self.batch_size = int(batch_size)
        self.warmups, self.repeats = int(warmups), int(repeats)
        self.timeout_s = float(timeout_s)
        self._next_id = 0
        self._broken = False

        # The parent hosts the rendezvous store: the OS picks a free loopback port and the
        # store holds it, so no other job can take it between choosing and binding.
        self._store = dist.TCPStore(
            LOOPBACK, 0, None, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
        )
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._requests = [ctx.Queue() for _ in range(num_ranks)]
        self._processes = [
            ctx.Process(
                target=_worker,
                daemon=True,
                name=f"neuroshard-comm-{r}-of-{num_ranks}",
                args=(
                    r,
                    num_ranks,
                    self._store.port,
                    device,
                    int(threads),
                    timeout_s,
                    os.getpid(),
                    self._requests[r],
                    self._results,
                ),
            )
            for r in range(num_ranks)
        ]
        started = time.perf_counter()
        for p in self._processes:
            p.start()
        self._finalizer = weakref.finalize(self, _stop, self._processes, self._requests)
        try:
            self._collect(lambda kind, payload: kind == "ready", start_timeout_s)
        except BackendError:
            self.close()
            raise
        logger.info(
            "started %d %s comm workers on port %d in %.1f s",
            num_ranks,
            "gloo" if device == "cpu" else "nccl",
            self._store.port,
            time.perf_counter() - started,
        )

    @property
    def alive(self) -> bool:
        return not self._broken and all(p.is_alive() for p in self._processes)

    def _collect(self, accept, timeout_s: float) -> dict[int, Any]:
        """One accepted message from every rank, or a BackendError naming what went wrong."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < self.num_ranks:
            try:
                kind, rank, payload = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [p.name for p in self._processes if not p.is_alive()]
                if dead:
                    self._broken = True
                    raise BackendError(f"comm worker(s) died: {', '.join(dead)}") from None
                if time.monotonic() > deadline:
                    self._broken = True
                    raise BackendError(
                        f"comm workers did not answer within {timeout_s:.0f} s "
                        f"({len(got)} of {self.num_ranks} did)"
                    ) from None
                continue
            if kind == "error":
                self._broken = True
                raise BackendError(f"comm worker rank {rank} failed:\n{payload}")
            if accept(kind, payload):
                got[rank] = payload
        return got

    def measure(
        self, dim_sums: Sequence[int], waits_ms: Sequence[float], batch_size: int | None = None
    ) -> tuple[list[Timing], list[Timing]]:
        """Per-rank (forward, backward) all-to-all timings for one plan's dim sums and waits."""
        if not self.alive:
            raise BackendError("comm pool is closed or broken; start a new one")
        n = self.num_ranks
        if len(dim_sums) != n or len(waits_ms) != n:
            raise BackendError(
                f"need {n} dim sums and {n} waits, got {len(dim_sums)} and {len(waits_ms)}"
            )
        if any(int(d) < 0 for d in dim_sums) or any(
            not math.isfinite(float(w)) or float(w) < 0 for w in waits_ms
        ):
            raise BackendError(
                f"dim sums and waits must be >= 0: {list(dim_sums)}, {list(waits_ms)}"
            )
        request_id = self._next_id
        self._next_id += 1
        msg = (
            request_id,
            [int(d) for d in dim_sums],
            [float(w) for w in waits_ms],
            self.warmups,
            self.repeats,
            int(batch_size or self.batch_size),
        )
        for q in self._requests:
            q.put(msg)
        try:
            answers = self._collect(
                lambda kind, payload: kind == "ok" and payload[0] == request_id,
                self.timeout_s + (self.warmups + self.repeats) * max(waits_ms) / 1e3,
            )
        except BackendError:
            self.close()  # peers of a failed rank may hang in a collective: stop them all
            raise
        fwd = [summarize(answers[r][1]) for r in range(n)]
        bwd = [summarize(answers[r][2]) for r in range(n)]
        return fwd, bwd

    def measure_collective(self, kind: str, nbytes: int) -> list[Timing]:
        """Per-rank timings of one collective (:data:`COLLECTIVES`) over all ranks on
        ``nbytes`` of FP32 data per rank (the full buffer; an all-gather's output)."""
        if not self.alive:
            raise BackendError("comm pool is closed or broken; start a new one")
        if kind not in COLLECTIVES:
            raise BackendError(f"unknown collective {kind!r}; valid: {', '.join(COLLECTIVES)}")
        request_id = self._next_id
        self._next_id += 1
        msg = ("collective", request_id, kind, max(1, int(nbytes) // 4), self.warmups, self.repeats)
        for q in self._requests:
            q.put(msg)
        try:
            answers = self._collect(
                lambda k, payload: k == "ok" and payload[0] == request_id, self.timeout_s
            )
        except BackendError:
            self.close()
            raise
        return [summarize(answers[r][1]) for r in range(self.num_ranks)]

    def close(self) -> None:
        """Stop the workers and release the rendezvous port (idempotent)."""
        self._broken = True
        self._finalizer()
        self._store = None  # type: ignore[assignment]  # released: the pool is closed

    def __enter__(self) -> CommPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _host_copy_bytes_per_ms(nbytes: int) -> float:
    """Bytes per ms of a copy from the current GPU to pinned host memory (median of 5)."""
    import torch

    src = torch.ones(nbytes // 4, device="cuda")
    dst = torch.empty(nbytes // 4, pin_memory=True)
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return nbytes / sorted(times[1:])[2]


class CommTimer:
    """``measure_comm`` for the hardware backends: one :class:`CommPool` per device count,
    started on first use and restarted if it broke."""

    def __init__(
        self,
        device: str = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
        warmups: int = 5,
        repeats: int = 10,
        threads: int = 1,
        timeout_s: float = 300.0,
    ):
        self.device = device
        self.batch_size = int(batch_size)
        self.warmups, self.repeats, self.threads = int(warmups), int(repeats), int(threads)
        self.timeout_s = timeout_s
        self._pools: dict[int, CommPool] = {}
        self._speeds: dict[int, LinkSpeeds] = {}

    @property
    def process_group_backend(self) -> str:
        return "gloo" if self.device == "cpu" else "nccl"

    def pool(self, num_ranks: int) -> CommPool:
        current = self._pools.get(num_ranks)
        if current is None or not current.alive:
            if current is not None:
                current.close()
            current = CommPool(
                num_ranks,
                device=self.device,
                batch_size=self.batch_size,
                warmups=self.warmups,
                repeats=self.repeats,
                threads=self.threads,
                timeout_s=self.timeout_s,
            )
            self._pools[num_ranks] = current
        return current

    def measure_comm(
        self, dim_sums: Sequence[int], waits_ms: Sequence[float]
    ) -> tuple[list[Timing], list[Timing]]:
        """Per-device (forward, backward) all-to-all timings; see the module docstring."""
        return self.pool(len(dim_sums)).measure(dim_sums, waits_ms)

    def link_speeds(self, num_ranks: int, nbytes: int = 16 << 20) -> LinkSpeeds:
        """Measured speeds of the collectives among ``num_ranks`` workers, cached: the
        bandwidth from an all-gather of ``nbytes`` less a tiny one (``(k-1)/k`` of the
        buffer crosses each rank's link), the tiny one's time as the per-collective
        latency; both levels at that bandwidth (the workers share one host). The host link:
        as fast on ``cpu`` (host memory is the only memory), a timed copy to pinned host
        memory on ``cuda``."""
        cached = self._speeds.get(num_ranks)
        if cached is not None:
            return cached
        if num_ranks < 2:
            speeds = LinkSpeeds(1e300, 1e300, 1e300, launch_ms=0.0, step_ms=0.0)
        else:
            pool = self.pool(num_ranks)
            big = max(t.median_ms for t in pool.measure_collective("all_gather", nbytes))
            tiny = max(t.median_ms for t in pool.measure_collective("all_gather", 4 * num_ranks))
            moved = (num_ranks - 1) / num_ranks * nbytes
            bandwidth = moved / max(big - tiny, 1e-6)
            host = bandwidth if self.device == "cpu" else _host_copy_bytes_per_ms(nbytes)
            speeds = LinkSpeeds(
                bandwidth,
                bandwidth,
                host,
                efficiency=1.0,
                host_efficiency=1.0,
                launch_ms=tiny,
                step_ms=0.0,
            )
            logger.info(
                "%s collectives among %d ranks: %.2f GB/s, %.3f ms latency",
                self.process_group_backend,
                num_ranks,
                bandwidth / 1e6,
                tiny,
            )
        self._speeds[num_ranks] = speeds
        return speeds

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def __enter__(self) -> CommTimer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Timing fused embedding compute on real hardware, shared by the CPU and CUDA backends.

:class:`ComputeTimer` times one device's load -- a list of shards, each a
:class:`~neuroshard.types.TableSpec` whose ``dim`` is the shard's width -- the way a
training step runs it: one table-batched embedding module with a table per shard,
forward (sum pooling) and backward with the fused exact-SGD update, FP32. The label is
the median of ``repeats`` timed iterations after ``warmups`` untimed ones; the spread is
``(p75 - p25) / median``.

Kernels:

* ``"fbgemm"`` -- ``SplitTableBatchedEmbeddingBagsCodegen`` from fbgemm-gpu (what
  TorchRec's fused kernel runs). On CPU the weights live in a reused host arena passed as
  the module's preallocated weights, so building a module allocates nothing; on CUDA the
  module owns its device weights.
* ``"torch"`` -- one ``torch.nn.EmbeddingBag(mode="sum", sparse=True)`` per shard and a
  plain SGD step on its sparse gradient; runs wherever torch runs.

Index batches come from :func:`neuroshard.indices.generate_batch`, seeded from the
table's statistics (not its name), so a shard measured twice, or at another width, sees
the same lookups. Built modules and index batches are cached by shard key within byte
budgets, so re-measuring a load pays neither again. Weights are never initialised at
random: values do not change the kernels' speed (denormals are flushed during timing), so
they come from one reused, once-zeroed arena.

:class:`TimedBackend` joins a :class:`ComputeTimer` and a
:class:`~neuroshard.backends.comm.CommTimer` into a
:class:`~neuroshard.types.HardwareBackend`; ``cpu.CpuBackend`` and ``cuda.CudaBackend``
are it on one device each.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from neuroshard.backends.timing import summarize
from neuroshard.fingerprint import hardware_fingerprint
from neuroshard.indices import generate_batch
from neuroshard.types import BYTES_PER_FLOAT, DEFAULT_BATCH_SIZE, BackendError, TableSpec, Timing

logger = logging.getLogger(__name__)

KERNELS = ("fbgemm", "torch")
LEARNING_RATE = 0.01
# Default byte budgets of the caches (host memory for indices; module weights on CUDA).
INDEX_CACHE_BYTES = 1 << 30
MODULE_CACHE_BYTES = 8 << 30


def index_key(spec: TableSpec) -> tuple:
    """What the lookups of a table depend on: everything but its name and width."""
    return (
        int(spec.rows),
        round(float(spec.pooling_factor), 9),
        tuple(round(float(x), 9) for x in spec.reuse_hist),
    )


def index_seed(seed: int, key: tuple) -> int:
    """The generator seed of the index batch of tables with lookups ``key``: stable
    across processes, so every backend and worker draws the same batch."""
    digest = hashlib.blake2b(repr((seed, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class LRU:
    """A small LRU cache bounded by total bytes; always keeps the newest entry."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._bytes = 0

    def get(self, key: Any) -> Any | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        if key in self._items:
            self._bytes -= self._items.pop(key)[1]
        self._items[key] = (value, nbytes)
        self._bytes += nbytes
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, (_, old) = self._items.popitem(last=False)
            self._bytes -= old

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0


def _import_tbe() -> dict[str, Any]:
    """fbgemm-gpu's training TBE and its enums, or a BackendError saying what is missing."""
    try:
        import fbgemm_gpu  # noqa: F401  (registers the torch.ops.fbgemm operators)
        from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            EmbeddingLocation,
            PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except Exception as exc:  # ImportError, or an OSError from a mismatched .so
        raise BackendError(
            f"the 'fbgemm' kernel needs fbgemm-gpu (fbgemm-gpu-cpu on CPU): {exc}; "
            "install it or use kernel='torch'"
        ) from exc
    return dict(
        module=SplitTableBatchedEmbeddingBagsCodegen,
        EmbOptimType=EmbOptimType,
        SparseType=SparseType,
        EmbeddingLocation=EmbeddingLocation,
        PoolingMode=PoolingMode,
        ComputeDevice=ComputeDevice,
        variant=str(getattr(fbgemm_gpu, "__variant__", "unknown")),
    )


class Prepared:
    """Everything one timed iteration of a load needs, built once."""

    __slots__ = ("step", "nbytes")

    def __init__(self, step: Callable[[], None], nbytes: int):
        self.step, self.nbytes = step, nbytes


class ComputeTimer:
    """Times fused forward + backward (with the SGD update) of one device's shards.

    ``device`` is ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:1"``); ``threads`` is the
    intra-op thread count during timing (CPU). Byte budgets bound the caches.
    """

    def __init__(
        self,
        device: str = "cpu",
        kernel: str = "fbgemm",
        batch_size: int = DEFAULT_BATCH_SIZE,
        warmups: int = 5,
        repeats: int = 10,
        threads: int = 1,
        seed: int = 0,
        index_cache_bytes: int = INDEX_CACHE_BYTES,
        module_cache_bytes: int = MODULE_CACHE_BYTES,
    ):
        if kernel not in KERNELS:
            raise BackendError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
        if batch_size < 1 or warmups < 0 or repeats < 1 or threads < 1:
            raise BackendError(
                f"need batch_size >= 1, warmups >= 0, repeats >= 1, threads >= 1; got "
                f"{batch_size}, {warmups}, {repeats}, {threads}"
            )
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.kernel = kernel
        self.batch_size = int(batch_size)
        self.warmups, self.repeats = int(warmups), int(repeats)
        self.threads, self.seed = int(threads), int(seed)
        self._tbe = _import_tbe() if kernel == "fbgemm" else None
        self._indices = LRU(index_cache_bytes)  # index key -> (indices, offsets) numpy
        self._loads = LRU(module_cache_bytes)  # load key -> Prepared
        self._arena = torch.empty(0, dtype=torch.float32, device=self.device)
        self._grad_arena = torch.empty(0, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ public

    def measure(self, load: Sequence[TableSpec]) -> Timing:
        """Median and spread of fused forward+backward time of ``load`` in ms."""
        if not load:
            return Timing(0.0, 0.0, self.repeats)
        for t in load:
            if t.rows < 1 or t.dim < 1 or t.pooling_factor < 0:
                raise BackendError(
                    f"cannot time table {t.name!r}: rows={t.rows}, dim={t.dim}, "
                    f"pooling_factor={t.pooling_factor}"
                )
        try:
            prepared = self._prepare(load)
            return summarize(self._time(prepared.step))
        except (RuntimeError, AssertionError) as exc:  # out of memory, kernel's own checks
            raise BackendError(
                f"measuring {len(load)} shards on {self.device} with the "
                f"{self.kernel} kernel failed: {exc}"
            ) from exc

    def clear(self) -> None:
        """Drop cached modules, index batches and the weight arena."""
        self._indices.clear()
        self._loads.clear()
        self._arena = torch.empty(0, dtype=torch.float32, device=self.device)
        self._grad_arena = torch.empty(0, dtype=torch.float32, device=self.device)
        if self.is_cuda:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ building

    def _batch(self, spec: TableSpec) -> tuple[np.ndarray, np.ndarray]:
        key = index_key(spec)
        hit = self._indices.get(key)
        if hit is None:
            hit = generate_batch(spec, self.batch_size, index_seed(self.seed, key))
            self._indices.put(key, hit, hit[0].nbytes + hit[1].nbytes)
        return hit

    def _weights(self, numel: int) -> torch.Tensor:
        """A flat FP32 buffer of ``numel`` from the reused weight arena (contents arbitrary).

        The arena is zero-filled once when it grows: that touches every page up front, so
        no timed iteration pays first-touch page faults, and later loads reuse it for free.
        Every cached load shares it; growing it drops them so the old one is freed.
        """
        if self._arena.numel() < numel:
            self._loads.clear()
            self._arena = torch.empty(0, dtype=torch.float32, device=self.device)
            self._arena = torch.zeros(numel, dtype=torch.float32, device=self.device)
        return self._arena[:numel]

    def _grad(self, width: int, rows: int | None = None) -> torch.Tensor:
        """A ``(rows, width)`` output gradient (default ``batch_size`` rows: one per bag);
        read-only, so every load shares one."""
        rows = self.batch_size if rows is None else rows
        numel = rows * width
        if self._grad_arena.numel() < numel:
            self._loads.clear()
            self._grad_arena = torch.empty(0, dtype=torch.float32, device=self.device)
            self._grad_arena = torch.full((numel,), 1e-3, dtype=torch.float32, device=self.device)
        return self._grad_arena[:numel].view(rows, width)

    def _prepare(self, load: Sequence[TableSpec]) -> Prepared:
        key = tuple((int(t.rows), int(t.dim), bool(t.pooled), index_key(t)) for t in load)
        prepared = self._loads.get(key)
        if prepared is None:
            started = time.perf_counter()
            batches = [self._batch(t) for t in load]
            prepared = self._build(load, batches)
            self._loads.put(key, prepared, prepared.nbytes)
            logger.debug(
                "built %s load of %d shards in %.3f s",
                self.kernel,
                len(load),
                time.perf_counter() - started,
            )
        return prepared

    def _build(
        self, load: Sequence[TableSpec], batches: list[tuple[np.ndarray, np.ndarray]]
    ) -> Prepared:
        """The pooled tables on the chosen kernel; sequence tables (one output row per id,
        TorchRec's ``EmbeddingCollection``) beside them with torch's sparse ``Embedding``
        and the same exact-SGD update, after the pooled tables' weights in the arena."""
        build = self._build_fbgemm if self.kernel == "fbgemm" else self._build_torch
        pooled = [i for i, t in enumerate(load) if t.pooled]
        sequence = [i for i, t in enumerate(load) if not t.pooled]
        if not sequence:
            return build(load, batches)
        pooled_numel = sum(int(load[i].rows) * int(load[i].dim) for i in pooled)
        total = pooled_numel + sum(int(load[i].rows) * int(load[i].dim) for i in sequence)
        self._weights(total)  # grow the arena once, before either part takes its slice
        parts = (
            [] if not pooled else [build([load[i] for i in pooled], [batches[i] for i in pooled])]
        )
        parts.append(
            self._build_sequence(
                [load[i] for i in sequence], [batches[i] for i in sequence], pooled_numel
            )
        )

        def step() -> None:
            for part in parts:
                part.step()

        return Prepared(step, sum(p.nbytes for p in parts))

    def _build_sequence(
        self,
        load: Sequence[TableSpec],
        batches: list[tuple[np.ndarray, np.ndarray]],
        offset: int,
    ) -> Prepared:
        flat = self._weights(offset + sum(int(t.rows) * int(t.dim) for t in load))[offset:]
        tables, inputs, grads = [], [], []
        start = 0
        for t, (idx, _) in zip(load, batches):
            size = int(t.rows) * int(t.dim)
            weight = flat[start : start + size].view(int(t.rows), int(t.dim))
            start += size
            tables.append(torch.nn.Embedding(int(t.rows), int(t.dim), sparse=True, _weight=weight))
            inputs.append(torch.from_numpy(idx).to(self.device))
            grads.append(self._grad(int(t.dim), rows=len(idx)))
        optimizer = torch.optim.SGD([e.weight for e in tables], lr=LEARNING_RATE)

        def step() -> None:
            outs = [table(idx) for table, idx in zip(tables, inputs)]
            torch.autograd.backward(outs, grads)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return Prepared(step, sum(i.numel() * 8 for i in inputs))

    def _build_fbgemm(
        self, load: Sequence[TableSpec], batches: list[tuple[np.ndarray, np.ndarray]]
    ) -> Prepared:
        tbe = self._tbe
        if tbe is None:
            raise BackendError("the fbgemm kernel was not imported for this timer")
        where, what = tbe["EmbeddingLocation"], tbe["ComputeDevice"]
        location = where.DEVICE if self.is_cuda else where.HOST
        compute = what.CUDA if self.is_cuda else what.CPU
        specs = [(int(t.rows), int(t.dim), location, compute) for t in load]
        kwargs: dict[str, Any] = {}
        weight_numel = sum(r * d for r, d, _, _ in specs)
        if not self.is_cuda:  # host weights from the arena: no allocation, no zero-fill
            kwargs["preallocated_host_buffers"] = {"weights": self._weights(weight_numel)}
        module = tbe["module"](
            specs,
            optimizer=tbe["EmbOptimType"].EXACT_SGD,
            learning_rate=LEARNING_RATE,
            weights_precision=tbe["SparseType"].FP32,
            output_dtype=tbe["SparseType"].FP32,
            pooling_mode=tbe["PoolingMode"].SUM,
            device=self.device,
            **kwargs,
        )
        # fbgemm layout: all tables' indices concatenated (table-local ids); offsets of
        # length T * B + 1, table t's bags at [t * B, (t + 1) * B).
        B = self.batch_size
        offsets = np.empty(len(load) * B + 1, dtype=np.int64)
        base = 0
        for t, (idx, off) in enumerate(batches):
            offsets[t * B : (t + 1) * B] = off[:-1] + base
            base += len(idx)
        offsets[-1] = base
        indices = torch.from_numpy(np.concatenate([b[0] for b in batches])).to(self.device)
        offsets_t = torch.from_numpy(offsets).to(self.device)
        grad = self._grad(sum(int(t.dim) for t in load))

        def step() -> None:
            out = module(indices, offsets_t)
            out.backward(grad)  # fused exact-SGD update inside the backward

        nbytes = (indices.numel() + offsets_t.numel()) * 8
        if self.is_cuda:
            nbytes += weight_numel * BYTES_PER_FLOAT
        return Prepared(step, nbytes)

    def _build_torch(
        self, load: Sequence[TableSpec], batches: list[tuple[np.ndarray, np.ndarray]]
    ) -> Prepared:
        flat = self._weights(sum(int(t.rows) * int(t.dim) for t in load))
        bags, inputs, grads = [], [], []
        start = 0
        for t, (idx, off) in zip(load, batches):
            size = int(t.rows) * int(t.dim)
            weight = flat[start : start + size].view(int(t.rows), int(t.dim))
            start += size
            bags.append(
                torch.nn.EmbeddingBag(
                    int(t.rows),
                    int(t.dim),
                    mode="sum",
                    sparse=True,
                    include_last_offset=True,
                    _weight=weight,
                )
            )
            inputs.append(
                (torch.from_numpy(idx).to(self.device), torch.from_numpy(off).to(self.device))
            )
            grads.append(self._grad(int(t.dim)))
        params = [b.weight for b in bags]
        optimizer = torch.optim.SGD(params, lr=LEARNING_RATE)

        def step() -> None:
            outs = [bag(idx, off) for bag, (idx, off) in zip(bags, inputs)]
            torch.autograd.backward(outs, grads)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        nbytes = sum((i.numel() + o.numel()) * 8 for i, o in inputs)
        return Prepared(step, nbytes)

    # ------------------------------------------------------------------ timing

    def _time(self, step: Callable[[], None]) -> list[float]:
        if self.is_cuda:
            return self._time_cuda(step)
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        torch.set_flush_denormal(True)
        samples = []
        try:
            for i in range(self.warmups + self.repeats):
                started = time.perf_counter_ns()
                step()
                if i >= self.warmups:
                    samples.append((time.perf_counter_ns() - started) / 1e6)
        finally:
            torch.set_flush_denormal(False)
            torch.set_num_threads(previous_threads)
        return samples

    def _time_cuda(self, step: Callable[[], None]) -> list[float]:
        with torch.cuda.device(self.device):
            for _ in range(self.warmups):
                step()
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(self.repeats)
            ]
            torch.cuda.synchronize()
            for start, end in events:
                start.record()
                step()
                end.record()
            torch.cuda.synchronize()
            return [start.elapsed_time(end) for start, end in events]


class TimedBackend:
    """A :class:`~neuroshard.types.HardwareBackend` that measures on one real device:
    compute with :class:`ComputeTimer`, all-to-alls with a pool of worker processes
    (:class:`~neuroshard.backends.comm.CommTimer`, started on the first ``measure_comm``).

    Use it as a context manager, or call :meth:`close`, to stop the comm workers.
    """

    name = "timed"
    device = "cpu"

    def __init__(
        self,
        batch_size: int = DEFAULT_BATCH_SIZE,
        kernel: str = "fbgemm",
        warmups: int = 5,
        repeats: int = 10,
        threads: int = 1,
        seed: int = 0,
        comm_warmups: int | None = None,
        comm_repeats: int | None = None,
        index_cache_bytes: int = INDEX_CACHE_BYTES,
        module_cache_bytes: int = MODULE_CACHE_BYTES,
    ):
        from neuroshard.backends.comm import CommTimer

        self.batch_size = int(batch_size)
        self.kernel, self.threads = kernel, int(threads)
        self.warmups, self.repeats = int(warmups), int(repeats)
        self.comm_warmups = self.warmups if comm_warmups is None else int(comm_warmups)
        self.comm_repeats = self.repeats if comm_repeats is None else int(comm_repeats)
        self._compute = ComputeTimer(
            self.device,
            kernel,
            batch_size,
            warmups,
            repeats,
            threads,
            seed,
            index_cache_bytes,
            module_cache_bytes,
        )
        self._comm = CommTimer(
            device=self.device,
            batch_size=batch_size,
            warmups=self.comm_warmups,
            repeats=self.comm_repeats,
            threads=threads,
        )

    def measure_compute(self, load: Sequence[TableSpec]) -> Timing:
        return self._compute.measure(load)

    def measure_comm(
        self, dim_sums: Sequence[int], waits_ms: Sequence[float]
    ) -> tuple[list[Timing], list[Timing]]:
        return self._comm.measure_comm(dim_sums, waits_ms)

    def fingerprint(self) -> dict[str, Any]:
        return hardware_fingerprint(
            self.name,
            self.batch_size,
            kernel=self.kernel,
            threads=self.threads,
            warmups=self.warmups,
            repeats=self.repeats,
            comm=self._comm.process_group_backend,
        )

    def close(self) -> None:
        """Stop the comm worker processes and free cached modules."""
        self._comm.close()
        self._compute.clear()

    def __enter__(self) -> TimedBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

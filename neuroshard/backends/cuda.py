"""The ``cuda`` backend: one device's fused embedding compute timed on a GPU, and nccl
all-to-alls among N worker processes (one GPU each).

Compute kernels (``kernel=``):

* ``"fused"`` -- torch ops only, no fbgemm (:class:`FusedShards`): the forward, the
  backward and the exact-SGD update of a device's shards, captured in one CUDA graph per
  load so that replaying it launches every kernel without Python in between.
* ``"fbgemm"`` -- fbgemm-gpu's ``SplitTableBatchedEmbeddingBagsCodegen`` (what TorchRec's
  fused kernel runs; needs the CUDA build of fbgemm-gpu), as in
  :mod:`neuroshard.backends.tbe`.
* ``"torch"`` -- one ``torch.nn.EmbeddingBag`` per shard with sparse gradients, eager.
* ``"auto"`` (default) -- ``"fbgemm"`` when a CUDA build of fbgemm-gpu imports, else
  ``"fused"``.

How :class:`FusedShards` runs a load, in the layout of fbgemm's table-batched embedding:
shards of one width form a group whose tables are stacked in one weight slab, their
indices offset by each table's first row and their bags laid out table after table
(``T x B`` bags). Per group, one step is

1. **forward**: ``F.embedding_bag(mode="sum")`` over the slab;
2. **backward**: sort the group's lookups by row (radix sort), gather each lookup's
   output-gradient row in that order, number the runs of equal rows (neighbour compare,
   cumulative sum), sum every run into one row (``index_add_`` over run numbers) and find
   each run's row id (``scatter_``);
3. **update**: one ``index_add_`` of ``-lr x`` the sums into the touched rows: exact SGD,
   each touched row updated once by the sum of its gradients, untouched rows left alone.

A batch fixes the number of distinct rows it touches; it is counted once when a load is
built, so every shape in the step is static and the step can be captured as a CUDA graph.
Timing is :class:`~neuroshard.backends.tbe.ComputeTimer`'s: CUDA events around each
replay after the warm-up replays; the label is the median of the repeats, the spread
``(p75 - p25) / median``. When a capture
fails, that load runs eagerly instead, graphs are switched off for the rest of the run
and :attr:`FusedTimer.graph_failures` counts it.

``device="cpu"`` runs the same ops on CPU tensors, timed with ``perf_counter`` (no graphs,
no events): the numerics check against ``torch.nn.EmbeddingBag`` and dry runs of GPU
scripts use it. The module needs only torch and numpy (no fbgemm, torchrec, ray or
lightgbm). Constructing a backend on a CUDA device raises
:class:`~neuroshard.types.BackendError` when there is no GPU, or when ``kernel="fbgemm"``
and no CUDA build of fbgemm-gpu.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

from neuroshard.backends.tbe import (
    INDEX_CACHE_BYTES,
    LEARNING_RATE,
    LRU,
    MODULE_CACHE_BYTES,
    ComputeTimer,
    Prepared,
    TimedBackend,
    index_key,
    index_seed,
)
from neuroshard.indices import generate_batch
from neuroshard.traffic import price
from neuroshard.types import (
    BYTES_PER_FLOAT,
    DEFAULT_BATCH_SIZE,
    BackendError,
    ExtraCosts,
    TableSpec,
    Traffic,
)

logger = logging.getLogger(__name__)

KERNELS = ("auto", "fused", "fbgemm", "torch")
# Index batches kept on the GPU (the host keeps its own copies in the index cache).
DEVICE_INDEX_CACHE_BYTES = 16 << 30
_INDEX_BYTES = 8  # int64 indices, offsets, bag ids

Batch = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- checks


def fbgemm_cuda_available() -> bool:
    """Whether a CUDA build of fbgemm-gpu imports (the CPU build does not count)."""
    try:
        import fbgemm_gpu
    except Exception:  # ImportError, or an OSError from a mismatched .so
        return False
    return str(getattr(fbgemm_gpu, "__variant__", "unknown")).lower() != "cpu"


def resolve_kernel(kernel: str, device: str = "cuda") -> str:
    """The kernel ``kernel`` names on ``device``: ``"auto"`` is ``"fbgemm"`` on a GPU with
    a CUDA fbgemm-gpu, else ``"fused"``."""
    if kernel not in KERNELS:
        raise BackendError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
    if kernel != "auto":
        return kernel
    on_gpu = torch.device(device).type == "cuda"
    return "fbgemm" if on_gpu and fbgemm_cuda_available() else "fused"


def check_cuda(kernel: str) -> None:
    """Raise BackendError unless a GPU and (for ``kernel="fbgemm"``) a CUDA fbgemm-gpu exist."""
    if not torch.cuda.is_available():
        build = torch.version.cuda and f"CUDA {torch.version.cuda}" or "no CUDA (CPU-only build)"
        raise BackendError(
            f"the cuda backend needs a CUDA GPU: torch {torch.__version__} has "
            f"{build} and sees {torch.cuda.device_count()} GPU(s)"
        )
    if kernel == "fbgemm":
        try:
            import fbgemm_gpu
        except Exception as exc:
            raise BackendError(
                f"the cuda backend's fbgemm kernel needs fbgemm-gpu (CUDA "
                f"build): {exc}; or use kernel='fused'"
            ) from exc
        variant = str(getattr(fbgemm_gpu, "__variant__", "unknown"))
        if variant.lower() == "cpu":
            raise BackendError(
                "the installed fbgemm-gpu is the CPU build (fbgemm-gpu-cpu); the cuda "
                "backend needs the CUDA build (pip package fbgemm-gpu) or kernel='fused'"
            )


# --------------------------------------------------------------------------- the kernel


class _Group:
    """The shards of one width: a stacked weight slab and TBE-style lookups."""

    __slots__ = (
        "bags",
        "grad",
        "indices",
        "lookups",
        "members",
        "offsets",
        "row_base",
        "slab",
        "unique",
        "width",
    )
    bags: torch.Tensor
    grad: torch.Tensor
    indices: torch.Tensor
    lookups: int
    offsets: torch.Tensor
    row_base: list[int]
    slab: torch.Tensor
    unique: int

    def __init__(self, width: int, members: list[int]):
        self.width, self.members = width, members


class FusedShards:
    """One device's shards as a torch-only fused forward + backward + exact-SGD step.

    ``shapes`` are the shards' ``(rows, width)``; ``batches`` their ``(indices, offsets)``
    as int64 tensors on the device (table-local row ids; ``B + 1`` offsets from 0 to the
    lookup count). ``weights`` is a flat FP32 buffer of at least ``sum(rows x width)``
    elements whose prefix becomes the groups' slabs (see :meth:`weight`); ``grad`` a flat
    FP32 buffer of at least ``T x B x width`` elements for the largest group, read as
    each group's output gradient (see :meth:`output_grad`). ``unique_counts`` are the
    distinct rows in each shard's indices (counted here when not given).
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        weights: torch.Tensor,
        grad: torch.Tensor,
        batch_size: int,
        lr: float = LEARNING_RATE,
        unique_counts: Sequence[int] | None = None,
    ):
        if len(shapes) != len(batches):
            raise BackendError(f"{len(shapes)} shard shapes but {len(batches)} index batches")
        self.batch_size, self.lr = int(batch_size), float(lr)
        self.device = weights.device
        if unique_counts is None:
            unique_counts = [int(torch.unique(idx).numel()) for idx, _ in batches]
        by_width: dict[int, list[int]] = {}
        for i, (_, width) in enumerate(shapes):
            by_width.setdefault(int(width), []).append(i)
        need = sum(int(r) * int(w) for r, w in shapes)
        if weights.numel() < need:
            raise BackendError(
                f"weight buffer holds {weights.numel()} floats, the shards need {need}"
            )
        self.groups: list[_Group] = []
        self._where: dict[int, tuple[_Group, int]] = {}  # shard -> (group, position)
        start = 0
        B = self.batch_size
        for width in sorted(by_width):
            g = _Group(width, by_width[width])
            rows = [int(shapes[i][0]) for i in g.members]
            g.row_base = np.concatenate(([0], np.cumsum(rows)[:-1])).astype(np.int64).tolist()
            total_rows = sum(rows)
            g.slab = weights[start : start + total_rows * width].view(total_rows, width)
            start += total_rows * width
            idx = [batches[i][0] for i in g.members]
            offs = [batches[i][1] for i in g.members]
            g.lookups = int(sum(int(x.numel()) for x in idx))
            base = np.concatenate(([0], np.cumsum([int(x.numel()) for x in idx])[:-1]))
            g.indices = (
                torch.cat([x + rb for x, rb in zip(idx, g.row_base)])
                if idx
                else torch.empty(0, dtype=torch.int64, device=self.device)
            )
            last = torch.tensor([g.lookups], dtype=torch.int64, device=self.device)
            g.offsets = torch.cat([o[:-1] + int(b) for o, b in zip(offs, base)] + [last])
            num_bags = len(g.members) * B
            g.bags = torch.repeat_interleave(
                torch.arange(num_bags, device=self.device), g.offsets.diff(), output_size=g.lookups
            )
            if grad.numel() < num_bags * width:
                raise BackendError(
                    f"gradient buffer holds {grad.numel()} floats, a group "
                    f"of {len(g.members)} shards of width {width} needs "
                    f"{num_bags * width}"
                )
            g.grad = grad[: num_bags * width].view(num_bags, width)
            g.unique = int(sum(int(unique_counts[i]) for i in g.members))
            for pos, i in enumerate(g.members):
                self._where[i] = (g, pos)
            self.groups.append(g)

    # ------------------------------------------------------------------ views

    def weight(self, shard: int) -> torch.Tensor:
        """Shard ``shard``'s ``(rows, width)`` weights: a view into its group's slab."""
        g, pos = self._where[shard]
        rows = g.row_base[pos + 1] if pos + 1 < len(g.members) else g.slab.shape[0]
        return g.slab[g.row_base[pos] : rows]

    def output_grad(self, shard: int) -> torch.Tensor:
        """The ``(B, width)`` gradient :meth:`step` uses for shard ``shard``'s output."""
        g, pos = self._where[shard]
        return g.grad[pos * self.batch_size : (pos + 1) * self.batch_size]

    @property
    def nbytes(self) -> int:
        """Device bytes this load holds between steps: its lookups and bag ids."""
        return sum(
            (2 * g.lookups + len(g.members) * self.batch_size + 1) * _INDEX_BYTES
            for g in self.groups
        )

    # ------------------------------------------------------------------ compute

    def forward(self) -> list[torch.Tensor]:
        """Every shard's pooled ``(B, width)`` output, in load order (no update)."""
        out: list[torch.Tensor | None] = [None] * len(self._where)
        with torch.no_grad():
            for g in self.groups:
                pooled = self._pooled(g)
                for pos, i in enumerate(g.members):
                    out[i] = pooled[pos * self.batch_size : (pos + 1) * self.batch_size]
        return out  # type: ignore[return-value]

    def step(self) -> None:
        """Forward, backward and exact-SGD update of every shard, one group at a time."""
        with torch.no_grad():
            for g in self.groups:
                self._pooled(g)
                if g.lookups:
                    self._update(g)

    __call__ = step

    def _pooled(self, g: _Group) -> torch.Tensor:
        return torch.nn.functional.embedding_bag(
            g.indices, g.slab, g.offsets, mode="sum", include_last_offset=True
        )

    def _update(self, g: _Group) -> None:
        rows, order = torch.sort(g.indices)
        grads = g.grad.index_select(0, g.bags.index_select(0, order))
        run = torch.zeros(g.lookups, dtype=torch.int64, device=self.device)
        torch.cumsum(rows[1:] != rows[:-1], 0, out=run[1:])
        sums = torch.zeros(g.unique, g.width, dtype=g.slab.dtype, device=self.device)
        sums.index_add_(0, run, grads)
        touched = torch.empty(g.unique, dtype=torch.int64, device=self.device)
        touched.scatter_(0, run, rows)
        g.slab.index_add_(0, touched, sums, alpha=-self.lr)


# Shards of the self-check: (rows, width, pooling factor); two widths, a hot small table.
_CHECK_SHAPES = ((5_000, 64, 8.0), (300, 64, 20.0), (20_000, 16, 2.0), (40, 8, 30.0))


def check_fused_kernel(
    device: str = "cpu", batch_size: int = 512, tolerance: float = 1e-4
) -> dict[str, Any]:
    """Run :class:`FusedShards` on ``device`` against ``torch.nn.EmbeddingBag`` and a
    plain SGD step on the CPU; on a GPU also replay two loads from CUDA graphs captured
    in the timer's shared pool against eager steps of the same loads.

    Returns the largest absolute errors (``forward``, ``update``, ``graph``, the last
    NaN off a GPU) and ``graphs_ok``. Raises :class:`BackendError` when the eager
    forward or update is off by more than ``tolerance``: timings of a wrong kernel are
    worthless. A graph mismatch is only reported, so a caller can time eager steps.
    """
    from neuroshard.types import TableSpec

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    shapes = [(r, w) for r, w, _ in _CHECK_SHAPES]
    cpu_batches = []
    for i, (rows, width, pooling) in enumerate(_CHECK_SHAPES):
        idx, off = generate_batch(TableSpec(f"check{i}", rows, width, pooling), batch_size, i)
        cpu_batches.append((torch.from_numpy(idx), torch.from_numpy(off)))
    batches = [(i.to(dev), o.to(dev)) for i, o in cpu_batches]
    start = torch.randn(sum(r * w for r, w in shapes), generator=gen)
    grad = torch.randn(batch_size * 2 * 64, generator=gen).to(dev)
    shards = FusedShards(shapes, batches, start.clone().to(dev), grad, batch_size)
    before = [shards.weight(i).cpu().clone() for i in range(len(shapes))]
    pooled = [p.cpu() for p in shards.forward()]
    shards.step()
    errors = {"forward": 0.0, "update": 0.0, "graph": float("nan")}
    for i, (rows, width) in enumerate(shapes):
        bag = torch.nn.EmbeddingBag(
            rows, width, mode="sum", include_last_offset=True, _weight=before[i].clone()
        )
        out = bag(*cpu_batches[i])
        out.backward(shards.output_grad(i).cpu())
        bag_grad = bag.weight.grad
        if bag_grad is None:
            raise BackendError("the reference EmbeddingBag produced no gradient")
        with torch.no_grad():
            expected = bag.weight - LEARNING_RATE * bag_grad
        errors["forward"] = max(errors["forward"], float((pooled[i] - out.detach()).abs().max()))
        errors["update"] = max(
            errors["update"], float((shards.weight(i).cpu() - expected).abs().max())
        )
    if max(errors["forward"], errors["update"]) > tolerance:
        raise BackendError(
            f"the fused kernel on {device} is off nn.EmbeddingBag + SGD: "
            f"forward by {errors['forward']:g}, update by {errors['update']:g}"
        )
    graphs_ok = False
    if dev.type == "cuda":
        timer = FusedTimer(device, batch_size=batch_size)
        halves = [(0, 2), (2, 4)]
        eager, replays = [], []
        for lo, hi in halves:
            part = shapes[lo:hi]
            numel = sum(r * w for r, w in part)
            w0 = torch.randn(numel, generator=gen).to(dev)
            eager.append(FusedShards(part, batches[lo:hi], w0.clone(), grad, batch_size))
            # Only the returned step holds the graphed shards, as in the timer's cache.
            graphed = timer._graphed(
                FusedShards(part, batches[lo:hi], w0.clone(), grad, batch_size)
            )
            replays.append(graphed)
        gc.collect()
        torch.cuda.empty_cache()
        junk = torch.full((1 << 24,), -1, dtype=torch.int64, device=dev)  # reuses freed memory
        eager[0].step()  # the first capture ran one eager warm-up step
        for replay, ref in zip(replays, eager):  # replays in capture order
            replay()
            ref.step()
        torch.cuda.synchronize()
        del junk
        captured = [g.shards for g in replays if isinstance(g, GraphStep)]
        if len(captured) == len(eager):  # else a capture failed: graph_failures says so
            errors["graph"] = max(
                float((g.weight(i) - e.weight(i)).abs().max())
                for g, e in zip(captured, eager)
                for i in range(len(e._where))
            )
        graphs_ok = timer.graph_failures == 0 and errors["graph"] <= tolerance
    return {**{f"{k}_max_abs_error": v for k, v in errors.items()}, "graphs_ok": graphs_ok}


# --------------------------------------------------------------------------- index batches


def _generate(args: tuple[TableSpec, int, int]) -> Batch:
    spec, batch_size, seed = args
    return generate_batch(spec, batch_size, seed)


def generate_batches(
    tables: Iterable[TableSpec], batch_size: int, *, seed: int = 0, workers: int = 1
) -> dict[tuple, Batch]:
    """The index batches a timer with ``seed`` would generate for ``tables``, keyed as it
    keys them, on ``workers`` processes (forked: call it before CUDA is initialised).
    Hand the result to :meth:`FusedTimer.preload`."""
    todo: dict[tuple, TableSpec] = {}
    for t in tables:
        todo.setdefault(index_key(t), t)
    jobs = [(t, int(batch_size), index_seed(seed, k)) for k, t in todo.items()]
    if workers <= 1 or len(jobs) < 2:
        return dict(zip(todo, map(_generate, jobs)))
    with ProcessPoolExecutor(
        min(workers, len(jobs)), mp_context=multiprocessing.get_context("fork")
    ) as pool:
        return dict(zip(todo, pool.map(_generate, jobs, chunksize=4)))


# --------------------------------------------------------------------------- the timer


class GraphStep:
    """A captured step: the graph's replay, holding the shards whose tensors it reads.

    The graph records raw addresses: the concatenated indices, offsets and bag ids live in
    the :class:`FusedShards` object, so a replay after that object is freed reads (and
    its update writes) whatever the allocator put there since.
    """

    __slots__ = ("graph", "shards")

    def __init__(self, graph: Any, shards: FusedShards):
        self.graph, self.shards = graph, shards

    def __call__(self) -> None:
        self.graph.replay()


class FusedTimer(ComputeTimer):
    """:class:`~neuroshard.backends.tbe.ComputeTimer` with the torch-only ``"fused"``
    kernel besides ``"fbgemm"`` and ``"torch"``; on CUDA each fused load is captured in a
    CUDA graph (``graphs=True``) and its index batches stay on the GPU (an LRU cache of
    ``device_index_cache_bytes``)."""

    kernels = ("fused", "fbgemm", "torch")

    def __init__(
        self,
        device: str = "cpu",
        kernel: str = "fused",
        batch_size: int = DEFAULT_BATCH_SIZE,
        warmups: int = 5,
        repeats: int = 10,
        threads: int = 1,
        seed: int = 0,
        index_cache_bytes: int = INDEX_CACHE_BYTES,
        module_cache_bytes: int = MODULE_CACHE_BYTES,
        graphs: bool = True,
        device_index_cache_bytes: int = DEVICE_INDEX_CACHE_BYTES,
    ):
        if kernel not in self.kernels:
            raise BackendError(f"unknown kernel {kernel!r}; valid: {', '.join(self.kernels)}")
        # The base validates and dispatches "fbgemm" and "torch"; "fused" builds through
        # the non-fbgemm branch, overridden below.
        super().__init__(
            device,
            "torch" if kernel == "fused" else kernel,
            batch_size,
            warmups,
            repeats,
            threads,
            seed,
            index_cache_bytes,
            module_cache_bytes,
        )
        self.kernel = kernel
        self.graphs = bool(graphs) and self.is_cuda
        self.graph_failures = 0
        self._device_batches = LRU(device_index_cache_bytes)
        self._unique: dict[tuple, int] = {}
        self._pool: Any = None  # one memory pool shared by every captured graph
        self._stream: Any = None  # the stream graphs are captured on
        self._anchor: Any = None  # the pool's first graph, alive as long as the timer
        self._captures = 0

    def preload(self, batches: Mapping[tuple, Batch]) -> None:
        """Put index batches from :func:`generate_batches` (same batch size and seed) into
        the host cache, so no measurement waits for one to be generated."""
        for key, (idx, off) in batches.items():
            if len(off) != self.batch_size + 1:
                raise BackendError(
                    f"index batch of {len(off) - 1} bags, the timer runs batch {self.batch_size}"
                )
            self._indices.put(key, (idx, off), idx.nbytes + off.nbytes)

    def reserve(self, weight_bytes: int) -> None:
        """Grow the weight arena to ``weight_bytes`` now (once), so that loads up to that
        size never regrow it (which drops every cached load)."""
        self._weights(max(int(weight_bytes) // BYTES_PER_FLOAT, 1))

    def clear(self) -> None:
        super().clear()
        self._device_batches.clear()
        self._unique.clear()

    # ------------------------------------------------------------------ building

    def _build_torch(self, load: Sequence[TableSpec], batches: list[Batch]) -> Prepared:
        if self.kernel != "fused":
            return super()._build_torch(load, batches)
        keys = [index_key(t) for t in load]
        tensors = [self._on_device(k, b) for k, b in zip(keys, batches)]
        unique = [self._unique_count(k, idx) for k, (idx, _) in zip(keys, tensors)]
        widths: dict[int, int] = {}
        for t in load:
            widths[int(t.dim)] = widths.get(int(t.dim), 0) + int(t.dim)
        grad = self._grad(max(widths.values())).view(-1)
        weights = self._weights(sum(int(t.rows) * int(t.dim) for t in load))
        shards = FusedShards(
            [(int(t.rows), int(t.dim)) for t in load],
            tensors,
            weights,
            grad,
            self.batch_size,
            LEARNING_RATE,
            unique,
        )
        step: Callable[[], None] = shards.step
        if self.graphs:
            step = self._graphed(shards)
        return Prepared(step, shards.nbytes)

    def _on_device(self, key: tuple, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_cuda:
            return torch.from_numpy(batch[0]), torch.from_numpy(batch[1])
        hit = self._device_batches.get(key)
        if hit is None:
            hit = (
                torch.from_numpy(batch[0]).to(self.device),
                torch.from_numpy(batch[1]).to(self.device),
            )
            self._device_batches.put(key, hit, (batch[0].nbytes + batch[1].nbytes))
        return hit

    def _unique_count(self, key: tuple, indices: torch.Tensor) -> int:
        count = self._unique.get(key)
        if count is None:
            count = self._unique[key] = int(torch.unique(indices).numel())
        return count

    def _graphed(self, shards: FusedShards) -> Callable[[], None]:
        """``shards.step`` as a CUDA graph's replay; the eager step if capture fails.

        Every graph captures into one shared memory pool. That is safe here because a
        step's temporaries are made and used up within the step: no graph reads memory
        another graph's replay wrote, only the weights, indices and gradients allocated
        outside the capture. So the pool grows to the largest step's workspace, not the
        sum over the cached graphs. The capture calls ``CUDAGraph.capture_begin`` /
        ``capture_end`` directly: ``torch.cuda.graph`` would run a full garbage
        collection and empty the allocator's cache before every capture, once per load.
        """
        with torch.cuda.device(self.device):
            for attempt in (1, 2):
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                    self._stream = torch.cuda.Stream()
                    self._anchor = None
                try:
                    graph = self._capture(shards)
                    break
                except RuntimeError as exc:
                    torch.cuda.synchronize()
                    self._pool = None  # a fresh pool for the second attempt
                    if attempt == 2:
                        self.graph_failures += 1
                        self.graphs = False
                        logger.warning(
                            "CUDA graph capture failed (%s); timing eager steps from now on",
                            exc,
                        )
                        return shards.step
                    logger.warning("CUDA graph capture failed (%s); retrying in a new pool", exc)
            if self._anchor is None:
                # The allocator frees a private pool once no live graph uses it, and a
                # later capture into the same pool id then fails its use-count assert;
                # the first graph of a pool stays alive with the timer so that never
                # happens when the module cache evicts every other graph.
                self._anchor = graph
            self._captures += 1
        return GraphStep(graph, shards)

    def _capture(self, shards: FusedShards) -> Any:
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            if not self._captures:
                shards.step()  # warm-up outside the first capture
            graph.capture_begin(pool=self._pool)
            try:
                shards.step()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        return graph


# --------------------------------------------------------------------------- the backend


class CudaBackend(TimedBackend):
    """Measures compute on the current GPU and all-to-alls among N GPUs.

    ``kernel`` is one of :data:`KERNELS`; ``graphs`` captures fused loads in CUDA graphs.
    ``device="cpu"`` runs the fused kernel on the CPU (``name`` is then ``"cpu"``): a dry
    run of what the GPU would run. ``index_cache_bytes`` (host) and
    ``device_index_cache_bytes`` (GPU) should hold every table's batch in a long
    collection; see :meth:`preload` and :meth:`reserve`.
    """

    name = "cuda"
    device = "cuda"

    def __init__(
        self,
        batch_size: int = DEFAULT_BATCH_SIZE,
        kernel: str = "auto",
        warmups: int = 5,
        repeats: int = 10,
        threads: int = 1,
        seed: int = 0,
        comm_warmups: int | None = None,
        comm_repeats: int | None = None,
        index_cache_bytes: int = INDEX_CACHE_BYTES,
        module_cache_bytes: int = MODULE_CACHE_BYTES,
        *,
        device: str = "cuda",
        graphs: bool = True,
        device_index_cache_bytes: int = DEVICE_INDEX_CACHE_BYTES,
    ):
        on_gpu = torch.device(device).type == "cuda"
        if not on_gpu and torch.device(device).type != "cpu":
            raise BackendError(f"the cuda backend runs on 'cuda[:N]' or 'cpu', not {device!r}")
        kernel = resolve_kernel(kernel, device)
        if on_gpu:
            check_cuda(kernel)
        elif kernel == "fbgemm":
            raise BackendError(
                "device='cpu' runs the 'fused' or 'torch' kernel; the cpu "
                "backend times fbgemm on the CPU"
            )
        self.device = device
        self.name = "cuda" if on_gpu else "cpu"
        self.graphs = bool(graphs) and on_gpu and kernel == "fused"
        super().__init__(
            batch_size,
            "torch" if kernel == "fused" else kernel,
            warmups,
            repeats,
            threads,
            seed,
            comm_warmups,
            comm_repeats,
            index_cache_bytes=0,
            module_cache_bytes=0,
        )
        self.kernel = kernel
        self._compute = FusedTimer(
            device,
            kernel,
            batch_size,
            warmups,
            repeats,
            threads,
            seed,
            index_cache_bytes,
            module_cache_bytes,
            self.graphs,
            device_index_cache_bytes,
        )

    @property
    def timer(self) -> FusedTimer:
        """The compute timer (caches, graph failures)."""
        return self._compute  # type: ignore[return-value]

    def preload(self, batches: Mapping[tuple, Batch]) -> None:
        """See :meth:`FusedTimer.preload` and :func:`generate_batches`."""
        self.timer.preload(batches)

    def reserve(self, weight_bytes: int) -> None:
        """See :meth:`FusedTimer.reserve`."""
        self.timer.reserve(weight_bytes)

    def extra_ms(self, traffic: Traffic) -> ExtraCosts:
        """What the other sharding types and kernels move, priced at the speeds of NCCL
        collectives measured among as many GPUs, and the host link at a timed copy to
        pinned host memory (:meth:`~neuroshard.backends.comm.CommTimer.link_speeds`)."""
        return price(traffic, self._comm.link_speeds(traffic.fwd_calls.shape[-1]))

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        fp.update(device=str(torch.device(self.device).type), graphs=self.graphs)
        return fp


def default_workers() -> int:
    """Processes for :func:`generate_batches`: the usable cores less one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)

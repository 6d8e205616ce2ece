"""The cuda backend's torch-only fused kernel: numerics against nn.EmbeddingBag + manual
SGD (on CPU, same ops), timing, caches and the CUDA-graph path (skipped without a GPU)."""

from __future__ import annotations

import contextlib
import gc
import math
import weakref

import numpy as np
import pytest
import torch

from neuroshard.backends import get_backend
from neuroshard.backends.cuda import (
    CudaBackend,
    FusedShards,
    FusedTimer,
    check_fused_kernel,
    generate_batches,
    resolve_kernel,
)
from neuroshard.indices import generate_batch
from neuroshard.types import BackendError, HardwareBackend, Timing

from factories import make_table

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

# (rows, width, pooling factor): two widths, one of them shared by three shards, one hot
# small table (every row hit many times) and a large sparse one.
SHAPES = [(50, 8, 6.0), (400, 16, 3.0), (30, 8, 9.0), (1_000, 8, 1.5), (7, 16, 4.0)]
GRAD_PER_BAG = max(3 * 8, 2 * 16)  # floats per bag of the largest group's output gradient


def _load(batch: int, seed: int = 0) -> tuple[list[tuple[int, int]], list]:
    shapes, batches = [], []
    for i, (rows, width, pooling) in enumerate(SHAPES):
        idx, off = generate_batch(
            make_table(f"s{i}", rows=rows, dim=width, pooling_factor=pooling), batch, seed + i
        )
        shapes.append((rows, width))
        batches.append((torch.from_numpy(idx), torch.from_numpy(off)))
    return shapes, batches


def _reference(
    weight: torch.Tensor, idx: torch.Tensor, off: torch.Tensor, grad: torch.Tensor, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled output and SGD-updated weights from nn.EmbeddingBag and a dense gradient."""
    bag = torch.nn.EmbeddingBag(
        weight.shape[0],
        weight.shape[1],
        mode="sum",
        include_last_offset=True,
        _weight=weight.clone(),
    )
    out = bag(idx, off)
    out.backward(grad)
    with torch.no_grad():
        updated = bag.weight - lr * bag.weight.grad
    return out.detach(), updated


@pytest.mark.parametrize("batch", [1, 64])
def test_fused_step_matches_embedding_bag_and_sgd(batch):
    shapes, batches = _load(batch)
    gen = torch.Generator().manual_seed(0)
    need = sum(r * w for r, w in shapes)
    weights = torch.randn(need + 13, generator=gen)  # a longer buffer: only the prefix is used
    grad = torch.randn(batch * GRAD_PER_BAG, generator=gen)
    shards = FusedShards(shapes, batches, weights, grad, batch, lr=0.5)
    before = [shards.weight(i).clone() for i in range(len(shapes))]
    expected = [
        _reference(before[i], *batches[i], shards.output_grad(i), 0.5) for i in range(len(shapes))
    ]
    for i, pooled in enumerate(shards.forward()):
        assert pooled.shape == (batch, shapes[i][1])
        torch.testing.assert_close(pooled, expected[i][0], rtol=1e-6, atol=1e-6)
    tail = weights[need:].clone()
    shards.step()
    for i in range(len(shapes)):
        after = shards.weight(i)
        torch.testing.assert_close(after, expected[i][1], rtol=1e-5, atol=1e-5)
        touched = torch.zeros(shapes[i][0], dtype=torch.bool)
        touched[batches[i][0]] = True
        assert torch.equal(after[~touched], before[i][~touched])  # untouched rows: bit-equal
        assert not torch.equal(after[touched], before[i][touched])
    assert torch.equal(weights[need:], tail)  # nothing written past the shards


def test_fused_step_counts_unique_rows_itself_or_from_caller():
    shapes, batches = _load(32)
    weights, grad = torch.zeros(sum(r * w for r, w in shapes)), torch.ones(32 * GRAD_PER_BAG)
    counted = FusedShards(shapes, batches, weights, grad, 32)
    given = [int(torch.unique(i).numel()) for i, _ in batches]
    assert [g.unique for g in counted.groups] == [
        sum(given[i] for i in g.members) for g in counted.groups
    ]


def test_self_check_on_cpu_reports_errors_and_no_graphs():
    found = check_fused_kernel("cpu", batch_size=256)
    assert found["forward_max_abs_error"] < 1e-5 and found["update_max_abs_error"] < 1e-5
    assert not found["graphs_ok"] and math.isnan(found["graph_max_abs_error"])


def test_self_check_fails_a_wrong_update(monkeypatch):
    monkeypatch.setattr("neuroshard.backends.cuda.LEARNING_RATE", 0.02)  # the kernel uses 0.01
    with pytest.raises(BackendError, match="off nn.EmbeddingBag"):
        check_fused_kernel("cpu", batch_size=64)


def test_fused_rejects_short_buffers():
    shapes, batches = _load(16)
    need = sum(r * w for r, w in shapes)
    with pytest.raises(BackendError, match="weight buffer"):
        FusedShards(shapes, batches, torch.zeros(need - 1), torch.zeros(10_000), 16)
    with pytest.raises(BackendError, match="gradient buffer"):
        FusedShards(shapes, batches, torch.zeros(need), torch.zeros(10), 16)


def test_timer_step_updates_the_arena_and_times_on_cpu():
    timer = FusedTimer("cpu", batch_size=128, warmups=1, repeats=4)
    timer._weights(200 * 8).fill_(0.0)
    t = timer.measure([make_table("a", rows=200, dim=8, pooling_factor=3)])
    assert isinstance(t, Timing) and t.repeats == 4
    assert t.median_ms > 0 and math.isfinite(t.spread) and t.spread >= 0
    assert timer._arena[:1600].abs().sum() > 0  # the SGD step wrote into the arena
    assert not timer.graphs  # no graphs on the CPU


class _WeakGraph:
    """A fake CUDA graph: like a real one, it holds no reference to the shards it replays
    (only their addresses), so a replay after they are freed fails here."""

    def __init__(self, shards: FusedShards):
        self._shards = weakref.ref(shards)
        self.replays = 0

    def replay(self) -> None:
        shards = self._shards()
        if shards is None:
            raise AssertionError("replayed a graph whose shards were freed")
        shards.step()
        self.replays += 1


@pytest.fixture
def fake_graphs(monkeypatch):
    """The timer's capture path on CPU: no CUDA calls, graphs from :class:`_WeakGraph`;
    ``failures`` makes that many captures raise first."""
    state = {"failures": 0, "graphs": []}

    def capture(self, shards):
        if state["failures"]:
            state["failures"] -= 1
            raise RuntimeError("use_count > 0 INTERNAL ASSERT FAILED")
        state["graphs"].append(_WeakGraph(shards))
        return state["graphs"][-1]

    monkeypatch.setattr(torch.cuda, "device", lambda _d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "Stream", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_a: None)
    monkeypatch.setattr(FusedTimer, "_capture", capture)
    return state


def _graphed_timer() -> FusedTimer:
    timer = FusedTimer("cpu", batch_size=64, warmups=1, repeats=3)
    timer.graphs = True
    return timer


def test_a_cached_graph_keeps_the_shards_it_reads_alive(fake_graphs):
    timer = _graphed_timer()
    load = [make_table("a", rows=200, dim=8, pooling_factor=3)]
    timer.measure(load)
    gc.collect()
    timer.measure(load)  # the cached graph again, after a collection
    (graph,) = fake_graphs["graphs"]
    assert graph.replays == 2 * (1 + 3) and timer.graph_failures == 0


def test_a_failed_capture_retries_in_a_new_pool_then_runs_eagerly(fake_graphs):
    timer = _graphed_timer()
    fake_graphs["failures"] = 1
    timer.measure([make_table("a", rows=200, dim=8, pooling_factor=3)])
    assert timer.graphs and timer.graph_failures == 0 and len(fake_graphs["graphs"]) == 1
    fake_graphs["failures"] = 2
    t = timer.measure([make_table("b", rows=300, dim=8, pooling_factor=3)])
    assert not timer.graphs and timer.graph_failures == 1 and t.median_ms > 0


def test_more_lookups_cost_more():
    timer = FusedTimer("cpu", batch_size=512, warmups=1, repeats=5)
    few = timer.measure([make_table(rows=3_000, dim=32, pooling_factor=1)])
    many = timer.measure([make_table(rows=3_000, dim=32, pooling_factor=64)])
    assert many.median_ms > 2.0 * few.median_ms, (few, many)


def test_preloaded_batches_are_the_ones_the_timer_would_generate():
    tables = [
        make_table("a", rows=300, dim=8, pooling_factor=2),
        make_table("b", rows=300, dim=16, pooling_factor=2),  # same lookups as a
        make_table("c", rows=900, dim=8, pooling_factor=5),
    ]
    batches = generate_batches(tables, 64, seed=3, workers=2)
    assert len(batches) == 2  # a and b differ only in width: one batch
    timer = FusedTimer("cpu", batch_size=64, warmups=0, repeats=1, seed=3)
    fresh = FusedTimer("cpu", batch_size=64, warmups=0, repeats=1, seed=3)
    timer.preload(batches)
    for t in tables:
        for got, want in zip(timer._batch(t), fresh._batch(t)):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(BackendError, match="batch"):
        FusedTimer("cpu", batch_size=32).preload(batches)


def test_reserve_grows_the_arena_once():
    timer = FusedTimer("cpu", batch_size=16, warmups=0, repeats=1)
    timer.reserve(4 * 10_000)
    arena = timer._arena
    timer.measure([make_table(rows=100, dim=8, pooling_factor=1)])
    assert timer._arena is arena and arena.numel() == 10_000


def test_remeasuring_reuses_the_built_load():
    timer = FusedTimer("cpu", batch_size=64, warmups=0, repeats=2)
    load = [make_table("a", rows=500, dim=8), make_table("b", rows=400, dim=16)]
    timer.measure(load)
    cached = dict(timer._loads._items)
    timer.measure(load)
    assert dict(timer._loads._items).keys() == cached.keys()


def test_empty_load_and_bad_tables():
    timer = FusedTimer("cpu", batch_size=16, warmups=0, repeats=1)
    assert timer.measure([]).median_ms == 0.0
    with pytest.raises(BackendError, match="bad"):
        timer.measure([make_table("bad", rows=0)])
    with pytest.raises(BackendError, match="kernel"):
        FusedTimer("cpu", kernel="nope")


def test_backend_on_cpu_is_a_hardware_backend_named_cpu():
    b = get_backend("cuda", device="cpu", batch_size=64, warmups=0, repeats=2)
    assert isinstance(b, CudaBackend) and isinstance(b, HardwareBackend)
    assert b.name == "cpu" and b.kernel == "fused" and not b.graphs
    t = b.measure_compute([make_table(rows=100, dim=4, pooling_factor=2)])
    assert t.repeats == 2 and t.median_ms > 0
    fp = b.fingerprint()
    assert fp["backend"] == "cpu" and fp["kernel"] == "fused" and fp["device"] == "cpu"
    assert fp["graphs"] is False
    b.close()


def test_kernel_resolution():
    assert resolve_kernel("auto", "cpu") == "fused"
    assert resolve_kernel("fused", "cuda") == "fused"
    with pytest.raises(BackendError, match="unknown kernel"):
        resolve_kernel("tbe")
    with pytest.raises(BackendError, match="fbgemm"):
        CudaBackend(device="cpu", kernel="fbgemm")
    with pytest.raises(BackendError, match="'cuda"):
        CudaBackend(device="meta")


def test_imports_without_optional_packages():
    """The backend module must import where only torch and numpy are installed."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('fbgemm_gpu', 'torchrec', 'ray', 'lightgbm'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from neuroshard.backends.cuda import CudaBackend, FusedTimer\n"
        "from neuroshard.backends import get_backend\n"
        "b = get_backend('cuda', device='cpu', batch_size=8, warmups=0, repeats=1)\n"
        "from factories import make_table\n"
        "print(b.kernel, b.measure_compute([make_table(rows=20, dim=4)]).repeats)\n"
    )
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["fused", "1"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_device_without_a_gpu_explains():
    with pytest.raises(BackendError, match="CUDA"):
        CudaBackend(batch_size=64)


# --------------------------------------------------------------------------- on a GPU


@needs_cuda
def test_cuda_self_check_passes_with_graphs_in_a_shared_pool():
    found = check_fused_kernel("cuda", batch_size=1024)
    assert found["update_max_abs_error"] < 1e-4 and found["forward_max_abs_error"] < 1e-4
    assert found["graphs_ok"] and found["graph_max_abs_error"] < 1e-4


@needs_cuda
def test_cuda_backend_times_with_graphs():
    b = CudaBackend(batch_size=4096, kernel="fused", warmups=2, repeats=5)
    t = b.measure_compute(
        [
            make_table(rows=10_000, dim=64, pooling_factor=8),
            make_table(rows=2_000, dim=32, pooling_factor=20),
        ]
    )
    assert t.repeats == 5 and t.median_ms > 0
    assert b.graphs and b.timer.graph_failures == 0
    assert b.fingerprint()["gpu"]["name"]
    b.close()

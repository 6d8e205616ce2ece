"""The cpu backend times real fused embedding compute (fbgemm and plain torch kernels)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from neuroshard.backends import get_backend
from neuroshard.backends.cpu import CpuBackend
from neuroshard.backends.tbe import ComputeTimer
from neuroshard.backends.timing import summarize
from neuroshard.types import BackendError, HardwareBackend, Timing

from factories import make_table

BATCH = 1024


@pytest.fixture(scope="module")
def backend():
    with CpuBackend(batch_size=BATCH, warmups=2, repeats=7) as b:
        yield b


def _ok(t: Timing, repeats: int) -> None:
    assert t.median_ms > 0 and math.isfinite(t.median_ms)
    assert t.spread >= 0 and math.isfinite(t.spread)
    assert t.repeats == repeats


def test_registered_and_implements_protocol():
    b = get_backend("cpu", batch_size=256, warmups=0, repeats=1)
    assert isinstance(b, CpuBackend) and isinstance(b, HardwareBackend)
    assert b.name == "cpu" and b.batch_size == 256


def test_fbgemm_timings_positive_with_spread(backend):
    load = [
        make_table("a", rows=2_000, dim=32, pooling_factor=4),
        make_table("b", rows=5_000, dim=16, pooling_factor=2),
    ]
    _ok(backend.measure_compute(load), 7)


def test_more_lookups_cost_more(backend):
    few = backend.measure_compute([make_table(rows=4_000, dim=64, pooling_factor=1)])
    many = backend.measure_compute([make_table(rows=4_000, dim=64, pooling_factor=64)])
    # 64x the lookups; fixed per-call overheads keep the ratio well below 64
    assert many.median_ms > 2.0 * few.median_ms, (few, many)


def test_wider_shards_cost_more(backend):
    narrow = backend.measure_compute([make_table(rows=4_000, dim=8, pooling_factor=32)])
    wide = backend.measure_compute([make_table(rows=4_000, dim=256, pooling_factor=32)])
    assert wide.median_ms > 1.5 * narrow.median_ms, (narrow, wide)


def test_empty_load_costs_nothing(backend):
    assert backend.measure_compute([]).median_ms == 0.0


def test_torch_kernel_runs_and_scales():
    timer = ComputeTimer("cpu", kernel="torch", batch_size=512, warmups=1, repeats=5)
    few = timer.measure([make_table(rows=3_000, dim=32, pooling_factor=1)])
    many = timer.measure([make_table(rows=3_000, dim=32, pooling_factor=64)])
    _ok(few, 5)
    assert many.median_ms > 2.0 * few.median_ms, (few, many)


def test_torch_kernel_updates_weights():
    timer = ComputeTimer("cpu", kernel="torch", batch_size=64, warmups=0, repeats=1)
    timer._weights(100 * 4).fill_(0.0)
    timer.measure([make_table(rows=100, dim=4, pooling_factor=3)])
    assert timer._arena[:400].abs().sum() > 0  # the SGD step wrote into the arena


def test_fbgemm_updates_weights():
    timer = ComputeTimer("cpu", kernel="fbgemm", batch_size=64, warmups=0, repeats=1)
    timer._weights(100 * 4).fill_(0.0)
    timer.measure([make_table(rows=100, dim=4, pooling_factor=3)])
    assert timer._arena[:400].abs().sum() > 0  # the fused SGD update wrote into the arena


def test_remeasuring_reuses_the_built_load(backend):
    load = [make_table(rows=3_000, dim=12, pooling_factor=5)]
    backend.measure_compute(load)
    cached = len(backend._compute._loads._items)
    backend.measure_compute(load)
    assert len(backend._compute._loads._items) == cached


def test_restores_thread_count():
    before = torch.get_num_threads()
    ComputeTimer("cpu", batch_size=64, warmups=0, repeats=1, threads=1).measure(
        [make_table(rows=100, dim=4, pooling_factor=1)]
    )
    assert torch.get_num_threads() == before


def test_bad_arguments_raise_backend_error():
    with pytest.raises(BackendError, match="kernel"):
        CpuBackend(kernel="nope")
    with pytest.raises(BackendError):
        ComputeTimer("cpu", repeats=0)
    with pytest.raises(BackendError, match="bad"):
        ComputeTimer("cpu", batch_size=8).measure([make_table("bad", rows=0)])


def test_fingerprint_describes_machine_and_settings(backend):
    fp = backend.fingerprint()
    assert fp["backend"] == "cpu" and fp["batch_size"] == BATCH
    assert fp["kernel"] == "fbgemm" and fp["threads"] == 1 and fp["comm"] == "gloo"
    assert fp["versions"]["torch"] and fp["versions"]["fbgemm_gpu"]
    assert fp["processor"] and fp["cpu_count"] >= 1
    import socket

    assert socket.gethostname() not in repr(fp)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_backend_explains_what_is_missing():
    with pytest.raises(BackendError, match="CUDA"):
        get_backend("cuda", batch_size=64)


def test_summarize_median_and_spread():
    t = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert t.median_ms == 3.0 and t.repeats == 5
    assert np.isclose(t.spread, (4.0 - 2.0) / 3.0)


@pytest.mark.parametrize("kernel", ["fbgemm", "torch"])
def test_sequence_tables_are_timed_beside_pooled_ones_and_updated(kernel):
    timer = ComputeTimer("cpu", kernel=kernel, batch_size=256, warmups=1, repeats=3)
    pooled = make_table("p", rows=2_000, dim=16, pooling_factor=8)
    sequence = replace(make_table("s", rows=100, dim=8, pooling_factor=3), pooled=False)
    timer._weights(2_000 * 16 + 100 * 8).fill_(0.0)
    _ok(timer.measure([pooled, sequence]), 3)
    # the sequence table's weights sit after the pooled table's, and its SGD step wrote them
    assert timer._arena[2_000 * 16 : 2_000 * 16 + 800].abs().sum() > 0
    assert timer.measure([sequence]).median_ms > 0

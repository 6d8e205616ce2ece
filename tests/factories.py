"""Small factories and fakes of NeuroShard's interfaces, shared by the tests."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from neuroshard.types import Cluster, TableSpec, Timing

GB = 1 << 30


def make_table(name: str = "t0", rows: int = 10_000, dim: int = 64,
               pooling_factor: float = 4.0, **kwargs) -> TableSpec:
    return TableSpec(name=name, rows=rows, dim=dim, pooling_factor=pooling_factor, **kwargs)


def make_tables(n: int, seed: int = 0) -> list[TableSpec]:
    rng = np.random.default_rng(seed)
    return [
        make_table(f"t{i}", rows=int(rng.integers(1_000, 2_000_000)),
                   dim=int(rng.choice([16, 32, 64, 128])),
                   pooling_factor=float(rng.uniform(1, 30)))
        for i in range(n)
    ]


def make_cluster(num_devices: int = 4, memory_gb: float = 4.0,
                 batch_size: int = 65_536) -> Cluster:
    return Cluster.uniform(num_devices, int(memory_gb * GB), batch_size)


class FakeEstimator:
    """A deterministic, cheap CostEstimator: compute grows with lookups x width with a
    per-table overhead and a superlinear crowding term; comm is linear in dim sums; the
    forward comm adds the wait for the slowest device."""

    name = "fake"

    def __init__(self, batch_size: int = 65_536):
        self.batch_size = batch_size
        self.compute_calls = 0

    def compute_ms(self, loads: Sequence[Sequence[TableSpec]]) -> np.ndarray:
        self.compute_calls += 1
        out = []
        for load in loads:
            work = sum(t.dim * t.pooling_factor * np.log10(t.rows + 10) for t in load) * 1e-4
            out.append(0.01 * len(load) + work + 0.05 * work**1.5 if load else 0.0)
        return np.asarray(out, dtype=float)

    def bwd_comm_ms(self, dim_sums: np.ndarray) -> np.ndarray:
        return 0.05 + 0.002 * np.asarray(dim_sums, dtype=float)

    def fwd_comm_ms(self, dim_sums: np.ndarray, waits_ms: np.ndarray) -> np.ndarray:
        waits = np.asarray(waits_ms, dtype=float)
        gap = waits.max(axis=-1, keepdims=True) - waits
        return 0.05 + 0.002 * np.asarray(dim_sums, dtype=float) + gap


class FakeBackend:
    """A HardwareBackend over FakeEstimator, one sample at a time, with a fixed spread."""

    name = "fake"

    def __init__(self, batch_size: int = 65_536):
        self.batch_size = batch_size
        self._est = FakeEstimator(batch_size)

    def measure_compute(self, load: Sequence[TableSpec]) -> Timing:
        return Timing(float(self._est.compute_ms([load])[0]), 0.01, 3)

    def measure_comm(self, dim_sums, waits_ms):
        d = np.asarray([dim_sums], dtype=float)
        fwd = self._est.fwd_comm_ms(d, np.asarray([waits_ms], dtype=float))[0]
        bwd = self._est.bwd_comm_ms(d)[0]
        return [Timing(float(x), 0.01, 3) for x in fwd], [Timing(float(x), 0.01, 3) for x in bwd]

    def fingerprint(self) -> dict:
        return {"backend": "fake", "batch_size": self.batch_size}

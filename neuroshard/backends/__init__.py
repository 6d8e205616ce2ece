"""Hardware backends by name, imported lazily so torch/fbgemm load only when used.

``get_backend("sim", profile="h100", batch_size=65536)`` returns a
:class:`~neuroshard.types.HardwareBackend`; :func:`as_estimator` turns any backend into a
:class:`~neuroshard.types.CostEstimator` so plans are scored by one function whether the
costs come from a model or from hardware.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import numpy as np

from neuroshard.types import CostEstimator, HardwareBackend, TableSpec, UnknownNameError

# name -> "module:factory"
_REGISTRY: dict[str, str] = {
    "sim": "neuroshard.backends.sim:SimBackend",
    "cpu": "neuroshard.backends.cpu:CpuBackend",
    "cuda": "neuroshard.backends.cuda:CudaBackend",
}


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str, **kwargs: Any) -> HardwareBackend:
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown backend {name!r}; valid: {', '.join(backend_names())}")
    module, attr = _REGISTRY[name].split(":")
    factory: Callable[..., HardwareBackend] = getattr(importlib.import_module(module), attr)
    return factory(**kwargs)


class BackendEstimator:
    """A :class:`CostEstimator` over a backend that measures one sample at a time."""

    def __init__(self, backend: HardwareBackend):
        self.backend = backend
        self.name = backend.name
        self.batch_size = backend.batch_size

    def compute_ms(self, loads: Sequence[Sequence[TableSpec]]) -> np.ndarray:
        return np.array([self.backend.measure_compute(load).median_ms for load in loads])

    def bwd_comm_ms(self, dim_sums: np.ndarray) -> np.ndarray:
        dim_sums = np.asarray(dim_sums)
        out = np.empty(dim_sums.shape)
        for i, row in enumerate(dim_sums):
            _, bwd = self.backend.measure_comm([int(x) for x in row], [0.0] * len(row))
            out[i] = [t.median_ms for t in bwd]
        return out

    def fwd_comm_ms(self, dim_sums: np.ndarray, waits_ms: np.ndarray) -> np.ndarray:
        dim_sums = np.asarray(dim_sums)
        out = np.empty(dim_sums.shape)
        for i, (row, waits) in enumerate(zip(dim_sums, np.asarray(waits_ms))):
            fwd, _ = self.backend.measure_comm([int(x) for x in row], [float(w) for w in waits])
            out[i] = [t.median_ms for t in fwd]
        return out


def as_estimator(backend: HardwareBackend) -> CostEstimator:
    """The backend itself when it already estimates in batches (``sim``), else an adapter."""
    if isinstance(backend, CostEstimator):
        return backend
    return BackendEstimator(backend)

"""Hardware backends by name, imported lazily so torch/fbgemm load only when used.

``get_backend("sim", profile="h100", batch_size=65536)`` returns a
:class:`~neuroshard.types.HardwareBackend`. Names are the built-in ones (``sim``, ``cpu``,
``cuda``) and those installed packages declare as Python entry points in the group
``neuroshard.backends`` (``[project.entry-points."neuroshard.backends"] mybox =
"mypkg.backend:MyBackend"``); nothing else, so no option value can import a module.
 :func:`as_estimator` turns any backend into a
:class:`~neuroshard.types.CostEstimator` so plans are scored by one function whether the
costs come from a model or from hardware.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np

from neuroshard.types import CostEstimator, HardwareBackend, TableSpec, UnknownNameError

ENTRY_POINT_GROUP = "neuroshard.backends"

# name -> "module:factory"
_REGISTRY: dict[str, str] = {
    "sim": "neuroshard.backends.sim:SimBackend",
    "cpu": "neuroshard.backends.cpu:CpuBackend",
    "cuda": "neuroshard.backends.cuda:CudaBackend",
}


@functools.lru_cache(maxsize=1)
def _plugins() -> dict[str, Any]:
    """Backends installed packages declare as entry points (the built-ins win a clash)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in _REGISTRY}


def backend_names() -> list[str]:
    """The built-in backends and the plug-ins installed as entry points."""
    return sorted({*_REGISTRY, *_plugins()})


def get_backend(name: str, **kwargs: Any) -> HardwareBackend:
    """The backend registered as ``name``, built with ``kwargs``; :class:`UnknownNameError`
    listing the valid names for any other string (an import path included)."""
    factory: Callable[..., HardwareBackend]
    if name in _REGISTRY:
        module, attr = _REGISTRY[name].split(":")
        factory = getattr(importlib.import_module(module), attr)
    else:
        plugin = _plugins().get(name)
        if plugin is None:
            raise UnknownNameError(
                f"unknown backend {name!r}; valid: {', '.join(backend_names())} (plug-ins "
                f"register as {ENTRY_POINT_GROUP!r} entry points)"
            )
        factory = plugin.load()
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
        for i, (row, waits) in enumerate(zip(dim_sums, np.asarray(waits_ms), strict=True)):
            fwd, _ = self.backend.measure_comm([int(x) for x in row], [float(w) for w in waits])
            out[i] = [t.median_ms for t in fwd]
        return out

    def __getattr__(self, name: str) -> Any:
        """The backend's optional ``extra_ms`` (what other sharding types move)."""
        if name == "extra_ms" and callable(getattr(self.backend, "extra_ms", None)):
            return cast(Any, self.backend).extra_ms
        raise AttributeError(name)


def as_estimator(backend: HardwareBackend) -> CostEstimator:
    """The backend itself when it already estimates in batches (``sim``), else an adapter."""
    if isinstance(backend, CostEstimator):
        return backend
    return BackendEstimator(backend)

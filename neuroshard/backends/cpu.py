"""The ``cpu`` backend: fused embedding compute and gloo all-to-alls, measured on this CPU.

``CpuBackend(batch_size=65536, kernel="fbgemm", warmups=5, repeats=10, threads=1, seed=0)``
times one device's shards with fbgemm-gpu's CPU table-batched embedding (host weights,
CPU compute, exact SGD, FP32, sum pooling) -- or, with ``kernel="torch"``, with plain
``torch.nn.EmbeddingBag`` -- on ``threads`` intra-op threads, and times all-to-alls among
N gloo worker processes on loopback; the other sharding types' collectives are priced at
gloo's measured speeds (:meth:`CpuBackend.extra_ms`). See :mod:`neuroshard.backends.tbe`
and :mod:`neuroshard.backends.comm` for what exactly is timed.
"""

from __future__ import annotations

from neuroshard.backends.tbe import TimedBackend
from neuroshard.traffic import price
from neuroshard.types import ExtraCosts, Traffic


class CpuBackend(TimedBackend):
    """Measures compute and all-to-all costs on this machine's CPU."""

    name = "cpu"
    device = "cpu"

    def extra_ms(self, traffic: Traffic) -> ExtraCosts:
        """What the other sharding types and kernels move, priced at the speeds of gloo
        collectives measured among as many workers (all-gather bandwidth and latency,
        :meth:`~neuroshard.backends.comm.CommTimer.link_speeds`; gloo's reduce-scatter is
        emulated)."""
        return price(traffic, self._comm.link_speeds(traffic.fwd_calls.shape[-1]))

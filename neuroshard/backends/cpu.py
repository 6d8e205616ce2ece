"""The ``cpu`` backend: fused embedding compute and gloo all-to-alls, measured on this CPU.

``CpuBackend(batch_size=65536, kernel="fbgemm", warmups=5, repeats=10, threads=1, seed=0)``
times one device's shards with fbgemm-gpu's CPU table-batched embedding (host weights,
CPU compute, exact SGD, FP32, sum pooling) -- or, with ``kernel="torch"``, with plain
``torch.nn.EmbeddingBag`` -- on ``threads`` intra-op threads, and times all-to-alls among
N gloo worker processes on loopback. See :mod:`neuroshard.backends.tbe` and
:mod:`neuroshard.backends.comm` for what exactly is timed.
"""

from __future__ import annotations

from neuroshard.backends.tbe import TimedBackend


class CpuBackend(TimedBackend):
    """Measures compute and all-to-all costs on this machine's CPU."""

    name = "cpu"
    device = "cpu"

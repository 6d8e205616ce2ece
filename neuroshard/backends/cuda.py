"""The ``cuda`` backend: the ``cpu`` backend's measurements on a CUDA GPU.

Compute runs fbgemm-gpu's table-batched embedding with device weights and CUDA compute
(or ``torch.nn.EmbeddingBag`` with ``kernel="torch"``), timed with CUDA events; the
all-to-alls run over nccl among N worker processes, one GPU each (so N GPUs are needed).
Constructing it raises :class:`~neuroshard.types.BackendError` when CUDA or a CUDA build
of fbgemm-gpu is missing.
"""

from __future__ import annotations

from typing import Any

import torch

from neuroshard.backends.tbe import TimedBackend
from neuroshard.types import DEFAULT_BATCH_SIZE, BackendError


def check_cuda(kernel: str) -> None:
    """Raise BackendError unless a GPU and (for ``kernel="fbgemm"``) a CUDA fbgemm-gpu exist."""
    if not torch.cuda.is_available():
        build = torch.version.cuda and f"CUDA {torch.version.cuda}" or "no CUDA (CPU-only build)"
        raise BackendError(f"the cuda backend needs a CUDA GPU: torch {torch.__version__} has "
                           f"{build} and sees {torch.cuda.device_count()} GPU(s)")
    if kernel == "fbgemm":
        try:
            import fbgemm_gpu
        except Exception as exc:
            raise BackendError(f"the cuda backend's fbgemm kernel needs fbgemm-gpu (CUDA "
                               f"build): {exc}; or use kernel='torch'") from exc
        variant = str(getattr(fbgemm_gpu, "__variant__", "unknown"))
        if variant.lower() == "cpu":
            raise BackendError(
                "the installed fbgemm-gpu is the CPU build (fbgemm-gpu-cpu); the cuda "
                "backend needs the CUDA build (pip package fbgemm-gpu) or kernel='torch'")


class CudaBackend(TimedBackend):
    """Measures compute and all-to-all costs on CUDA GPUs (compute on the current GPU)."""

    name = "cuda"
    device = "cuda"

    def __init__(self, batch_size: int = DEFAULT_BATCH_SIZE, kernel: str = "fbgemm",
                 **kwargs: Any):
        check_cuda(kernel)
        super().__init__(batch_size, kernel, **kwargs)

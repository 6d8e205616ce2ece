"""Where a measurement ran: processor, GPU, core count and library versions.

Cost models are trained on one backend's measurements; the fingerprint saved beside a
model lets a later run tell whether its hardware and software match. No hostname, user
or path goes into it, so it can be published with a model.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from importlib import metadata
from typing import Any

logger = logging.getLogger(__name__)

# Distributions whose versions change measured timings; the first installed name wins.
_PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "fbgemm_gpu": ("fbgemm-gpu", "fbgemm-gpu-cpu", "fbgemm-gpu-nightly",
                   "fbgemm-gpu-nightly-cpu", "fbgemm-gpu-genai"),
    "torchrec": ("torchrec", "torchrec-nightly"),
    "numpy": ("numpy",),
}


def processor_name() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else ``platform``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    if value.strip():
                        return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def package_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape timings (``None`` when absent)."""
    versions: dict[str, str | None] = {}
    for key, dists in _PACKAGES.items():
        versions[key] = None
        for dist in dists:
            try:
                versions[key] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    versions["python"] = platform.python_version()
    return versions


def gpu_info() -> dict[str, Any] | None:
    """Name, count, memory and CUDA version of the visible GPUs, or ``None``."""
    try:
        import torch
    except ImportError:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        return {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_bytes": int(props.total_memory),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        }
    except Exception as exc:  # a broken driver should not stop a CPU measurement
        logger.warning("could not query the GPU: %s", exc)
        return None


def hardware_fingerprint(backend_name: str, batch_size: int, **extra: Any) -> dict[str, Any]:
    """A JSON-ready description of this machine for a backend at ``batch_size``.

    ``extra`` (kernel, threads, repeats, a simulator profile, ...) is merged in last.
    """
    fp: dict[str, Any] = {
        "backend": backend_name,
        "batch_size": int(batch_size),
        "processor": processor_name(),
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_count": os.cpu_count() or 1,
        "usable_cores": usable_cores(),
        "gpu": gpu_info(),
        "versions": package_versions(),
        "python_implementation": sys.implementation.name,
    }
    fp.update(extra)
    return fp

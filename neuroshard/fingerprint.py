"""Where a measurement ran: processor, GPU, core count and library versions.

Cost models are trained on one backend's measurements; the fingerprint saved beside a
model lets a later run tell whether its hardware and software match. No hostname, user
or path goes into it, so it can be published with a model.

:class:`Fingerprint` is the one way two fingerprints are compared: a model directory
against the backend a plan asks for, collected Parquet rows against the backend about to
add more.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

logger = logging.getLogger(__name__)

# Keys that do not change what a model predicts (measurement noise, seeds, when and where).
VOLATILE_KEYS = frozenset({"noise", "seed", "hostname", "created", "time"})


@dataclass(frozen=True)
class Fingerprint:
    """A backend fingerprint as canonical JSON (an object with sorted keys), so it is
    immutable, hashable and compares equal exactly when its content does."""

    text: str = "{}"

    @classmethod
    def of(cls, value: Fingerprint | Mapping[str, Any] | str | None) -> Fingerprint:
        """A fingerprint from a dict, a JSON string (as stored beside collected rows) or
        ``None`` (empty); :class:`ValueError` when the JSON is not an object."""
        if isinstance(value, Fingerprint):
            return value
        if value is None or value == "":
            return cls()
        if isinstance(value, str):
            text = value
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"fingerprint is not JSON: {text[:80]!r}") from exc
        if not isinstance(value, Mapping):
            raise ValueError(f"fingerprint is not a JSON object: {value!r}")
        return cls(json.dumps(dict(value), sort_keys=True, default=str))

    def as_dict(self) -> dict[str, Any]:
        return dict(json.loads(self.text))

    def get(self, key: str, default: Any = None) -> Any:
        return self.as_dict().get(key, default)

    def diff(
        self, other: Fingerprint | Mapping[str, Any] | str | None, *, ignore: Collection[str] = ()
    ) -> list[tuple[str, Any, Any]]:
        """``(key, ours, theirs)`` for every key whose values differ, sorted by key
        (``None`` where a side lacks the key); keys in ``ignore`` are not compared."""
        ours, theirs = self.as_dict(), Fingerprint.of(other).as_dict()
        keys = sorted((set(ours) | set(theirs)) - set(ignore))
        return [(k, ours.get(k), theirs.get(k)) for k in keys if ours.get(k) != theirs.get(k)]

    def describe_diff(
        self,
        other: Fingerprint | Mapping[str, Any] | str | None,
        *,
        ignore: Collection[str] = (),
        labels: tuple[str, str] = ("ours", "theirs"),
    ) -> list[str]:
        """:meth:`diff` as ``"key: ours (label) vs theirs (label)"`` lines."""
        return [
            f"{k}: {a!r} ({labels[0]}) vs {b!r} ({labels[1]})"
            for k, a, b in self.diff(other, ignore=ignore)
        ]


# Distributions whose versions change measured timings; the first installed name wins.
_PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "fbgemm_gpu": (
        "fbgemm-gpu",
        "fbgemm-gpu-cpu",
        "fbgemm-gpu-nightly",
        "fbgemm-gpu-nightly-cpu",
        "fbgemm-gpu-genai",
    ),
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

"""Memory sizes as people write them: ``4GB``, ``512MiB``, ``1073741824``.

GB and GiB both mean 2**30 bytes, as in TorchRec; a plain number is bytes.
"""

from __future__ import annotations

import re

from neuroshard.types import UsageError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "gb": 1 << 30,
    "gib": 1 << 30,
    "tb": 1 << 40,
    "tib": 1 << 40,
}


def parse_memory(text: str, *, option: str = "--memory") -> int:
    """``'4GB'`` -> 4 GiB in bytes. Raises :class:`UsageError` naming ``option``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"{option}: {text!r} is not a memory size like 4GB, 512MiB or 1073741824")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not 1 <= value < 1 << 60:
        raise UsageError(f"{option}: {text!r} is out of range (1 byte to 2**60 bytes)")
    if value != int(value):
        raise UsageError(f"{option}: {text!r} is not a whole number of bytes")
    return int(value)


def parse_memory_list(text: str, num_devices: int, *, option: str = "--memory") -> tuple[int, ...]:
    """One size for every device, or one per device separated by commas."""
    parts = [p for p in text.split(",") if p.strip()]
    caps = tuple(parse_memory(p, option=option) for p in parts)
    if len(caps) == 1:
        return caps * num_devices
    if len(caps) != num_devices:
        raise UsageError(f"{option} lists {len(caps)} caps for {num_devices} devices")
    return caps

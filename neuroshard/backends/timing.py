"""Summaries of timed repeats, shared by the compute and communication timers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from neuroshard.types import Timing


def summarize(samples_ms: Sequence[float]) -> Timing:
    """Median and relative interquartile spread of timed repeats."""
    arr = np.asarray(samples_ms, dtype=float)
    median = float(np.median(arr))
    p25, p75 = np.percentile(arr, [25, 75])
    spread = float((p75 - p25) / median) if median > 0 else 0.0
    return Timing(median_ms=median, spread=spread, repeats=len(arr))

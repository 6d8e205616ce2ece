"""Random sharding tasks drawn from a table pool: the benchmark protocol's workloads.

A task is 10 to 60 distinct tables from a pool (the test pool for honest figures, since
its tables are never seen in pretraining), redrawn until their total size is at most
``max_total_bytes`` (15 GB for 4 devices of 4 GB, as in the paper's protocol).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from neuroshard.types import TableSpec

GB = 1 << 30


def sample_task(
    pool: Sequence[TableSpec],
    rng: np.random.Generator,
    *,
    min_tables: int = 10,
    max_tables: int = 60,
    max_total_bytes: int | None = None,
    max_draws: int = 1000,
) -> list[TableSpec]:
    """One task; raises ``ValueError`` if ``max_draws`` draws all exceed the size cap."""
    if not 1 <= min_tables <= max_tables <= len(pool):
        raise ValueError(
            f"need 1 <= min_tables <= max_tables <= pool size ({len(pool)}), "
            f"got {min_tables}, {max_tables}"
        )
    sizes = np.array([t.size_bytes for t in pool], dtype=np.int64)
    for _ in range(max_draws):
        k = int(rng.integers(min_tables, max_tables + 1))
        chosen = rng.choice(len(pool), size=k, replace=False)
        if max_total_bytes is None or sizes[chosen].sum() <= max_total_bytes:
            return [pool[int(i)] for i in chosen]
    raise ValueError(
        f"no task of {min_tables}..{max_tables} tables under {max_total_bytes} bytes "
        f"in {max_draws} draws"
    )


def sample_tasks(
    pool: Sequence[TableSpec], n: int, seed: int = 0, **kwargs
) -> list[list[TableSpec]]:
    rng = np.random.default_rng(seed)
    return [sample_task(pool, rng, **kwargs) for _ in range(n)]


def default_max_total_bytes(num_devices: int, memory_bytes: int) -> int:
    """The protocol's task size cap: 15 GB for 4 x 4 GB, scaled with total memory."""
    return int(num_devices * memory_bytes * 15 / 16)

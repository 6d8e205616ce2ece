"""The test helpers that tests lean on for their own honesty: spawn_ranks runs an aborted
rank again once, and only an abort."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

pytest.importorskip("torch")

from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException  # noqa: E402

from factories import spawn_ranks  # noqa: E402


def _abort() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file left behind
    os.abort()


def _abort_first_time(rank: int, world: int, port: int, out_dir: str) -> None:
    marker = Path(out_dir, f"tried{rank}")
    if rank == 1 and not marker.exists():
        marker.touch()
        _abort()
    Path(out_dir, f"done{rank}").write_text(str(port))


def _always_abort(rank: int, world: int, port: int, out_dir: str) -> None:
    if rank == 1:
        _abort()


def _raise(rank: int, world: int, port: int, out_dir: str) -> None:
    Path(out_dir, f"ran{rank}").touch()
    raise ValueError("a real failure")


def test_an_aborted_rank_runs_again_once_on_a_new_port(tmp_path):
    with pytest.warns(UserWarning, match="rank 1 aborted; running all ranks again once"):
        spawn_ranks(_abort_first_time, 2, (str(tmp_path),), timeout_s=60, what="t")
    assert (tmp_path / "done0").exists() and (tmp_path / "done1").exists()


def test_a_second_abort_and_a_python_error_fail(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(ProcessExitedException, match="SIGABRT"):
        spawn_ranks(_always_abort, 2, (str(tmp_path),), timeout_s=60, what="t")
    with pytest.raises(ProcessRaisedException, match="a real failure"):
        spawn_ranks(_raise, 1, (str(tmp_path),), timeout_s=60, what="t")

"""Checks on the files a command reads and the ones it writes, before any work is done.

:func:`input_problem` says why a path cannot be read as a file (missing, a directory, a
symlink loop, no permission) in words a user can act on. :func:`check_output` refuses an
output that is one of the command's inputs (the same path, or the same file through
another path or a link), a directory, or a place that cannot take a file (a missing or
read-only folder). Outputs are then written atomically (:mod:`neuroshard.atomic`).
:func:`folder_lock` keeps two runs out of one output folder.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from neuroshard.types import FolderBusyError, UsageError

__all__ = [
    "LOCK_FILE",
    "check_output",
    "check_output_dir",
    "folder_lock",
    "input_problem",
    "os_error_message",
]

LOCK_FILE = ".neuroshard.lock"


def input_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as a regular file, or None when it can."""
    try:
        st = os.stat(path)
    except OSError as e:
        return _stat_problem(e)
    except ValueError:  # a NUL byte in the path
        return "not a valid path (a NUL byte)"
    if os.path.isdir(path):
        return "is a directory, expected a file"
    if not _is_regular(st.st_mode):
        return "is not a regular file"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)


def _stat_problem(e: OSError) -> str:
    if e.errno == errno.ENOENT:
        return "file not found"
    if e.errno == errno.ELOOP:
        return "a symbolic link loop (too many levels of links)"
    if e.errno == errno.ENOTDIR:
        return "file not found (a folder on its path is a file)"
    if e.errno == errno.ENAMETOOLONG:
        return "path too long"
    return f"cannot read: {e.strerror or e}"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False


def check_output(
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    *,
    option: str = "--out",
) -> Path:
    """``out`` as a :class:`Path` if a file can be written there without touching any of
    ``inputs``; :class:`UsageError` naming ``option`` and the path otherwise."""
    path = Path(out)
    for given in inputs:
        if given is not None and _same_file(path, Path(given)):
            raise UsageError(
                f"{option} {path}: is an input of this command ({given}); "
                "write the output elsewhere"
            )
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a directory, expected a file name")
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{option} {path}: a dangling or looping symbolic link")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: folder {parent} is not writable")
    return path


def check_output_dir(out: str | os.PathLike[str], *, option: str = "--out") -> Path:
    """``out`` as a :class:`Path` if it is (or can become) a folder; :class:`UsageError`
    naming ``option`` when it is a file or lies under one."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: is a file, expected a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{option} {path}: {parent} is a file, not a folder")
            break
    return path


def os_error_message(e: OSError) -> str:
    """One line for an error of the file system: what failed, where, and why."""
    where = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    reasons = {
        errno.ENOSPC: "no space left on the device",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EDQUOT: "disk quota exceeded",
    }
    reason = reasons.get(e.errno or 0, e.strerror or str(e))
    return f"{where}: {reason}" if where else reason


_held: dict[str, list[int]] = {}  # resolved folder -> [fd, depth] held by this process
_held_guard = threading.Lock()


@contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``folder``'s lock (created if needed) for the ``with`` block.

    An exclusive ``flock`` on ``folder/.neuroshard.lock``, which holds the holder's pid:
    a second process asking for it gets :class:`FolderBusyError` at once, naming the folder
    and that pid. The lock goes with the process (a killed run leaves none behind). Within
    one process the lock is re-entrant (a pretrain run's collection takes it again).
    """
    import fcntl

    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _held_guard:
                _held[key][1] -= 1
        return
    lock = path / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise FolderBusyError(
            f"{path}: another run (pid {holder}) is writing into this "
            "folder; wait for it to finish, or use another --out"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    with _held_guard:
        _held[key] = [fd, 1]
    try:
        yield path
    finally:
        with _held_guard:
            _held[key][1] -= 1
            done = _held[key][1] == 0
            if done:
                del _held[key]
        if done:
            os.close(fd)  # releases the flock

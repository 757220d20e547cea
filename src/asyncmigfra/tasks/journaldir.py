"""The journal's directory: the lock that makes it one agent's, and what to say when it
cannot be used (``agent.state-dir``)."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from asyncmigfra.errors import StartupError

__all__ = ["advice", "disk_full", "lock_directory"]


def disk_full(directory: Path) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def advice(errno_value: int | None, directory: Path) -> str:
    """What to do about a journal directory that cannot be used."""
    if errno_value == errno.ENOSPC or disk_full(directory):
        return "free disk space"
    return f"make {directory} writable for the agent's user, or set agent.state-dir"


def lock_directory(directory: Path) -> int:
    """Take an agent's exclusive lock on ``directory`` (``flock`` on ``directory/lock``, which
    names the holder's PID) and return its descriptor; :class:`StartupError` says who holds it
    or why the directory cannot be used. Closing the descriptor releases the lock."""
    fd: int | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise StartupError(
                f"the journal directory {directory} is in use by another agent "
                f"(PID {holder}); give each agent its own name or agent.state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        if fd is not None:
            os.close(fd)
        raise StartupError(
            f"cannot use the journal directory {directory}: {exc.strerror or exc}; "
            + advice(exc.errno, directory)
        ) from None
    except StartupError:
        if fd is not None:
            os.close(fd)
        raise
    return fd

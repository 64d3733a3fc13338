"""The service's state directory, owned by one service at a time.

One ``prowzi serve`` owns one state directory (its run journal and documents): two services
on one directory would each rewrite the journal from their own runs and lose the other's.
:class:`StateDirectory` takes an exclusive ``flock`` on ``<state_dir>/.lock`` before the
service reads its journal and holds it for the service's lifetime; the kernel releases it when
the process exits, however it exits, so a killed service leaves no stale lock. A second
service on the same directory fails to start with :class:`StateDirectoryInUseError`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from prowzi.errors import InvalidInputError, ProwziError
from prowzi.storage.files import PRIVATE_FILE, ensure_private_dir, open_nofollow

LOCK_NAME = ".lock"


class StateDirectoryInUseError(ProwziError):
    """Another service holds the state directory's lock."""


class StateDirectory:
    """The lock on a service's state directory (a context manager; :meth:`acquire` and
    :meth:`release` for longer holds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Create the directory if needed and take its lock; raises
        :class:`~prowzi.errors.InvalidInputError` when the path cannot be a state directory
        and :class:`StateDirectoryInUseError` when another service holds it."""
        if self._fd is not None:
            return
        if self.path.exists() and not self.path.is_dir():
            raise InvalidInputError(f"--state-dir {self.path} exists and is not a directory")
        try:
            ensure_private_dir(self.path)
            fd = open_nofollow(self.lock_path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        except OSError as exc:
            raise InvalidInputError(
                f"--state-dir {self.path} cannot be used: {exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            by = f" (pid {holder})" if holder else ""
            raise StateDirectoryInUseError(
                f"the state directory {self.path} is in use by another prowzi serve{by}; "
                "one service owns one state directory: stop it or pass another --state-dir"
            ) from None
        # Who holds it, for the message a second service prints (the lock is the flock).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)

    def __enter__(self) -> StateDirectory:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and len(text) < 12 else None

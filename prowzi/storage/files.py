"""Prowzi's one way to write a file, and its one permission policy.

Every file Prowzi writes in its own directories (checkpoints, telemetry, caches, the service's
journal) goes through :func:`atomic_write`: a temporary file in the same directory, write,
``fdatasync``, rename over the target, ``fsync`` of the directory. A reader sees the old file
or the new one, never a mix, and after the call returns the new one survives a power loss.
The steps are POSIX's own and the ones SQLite, git and prometheus_client's
``write_to_textfile`` take; the standard library has no such call.

Permissions, one policy: the checkpoint store, its leases and caches hold prompts and whole
results that only Prowzi reads, so their directories are ``0o700`` and files ``0o600``
(:data:`PRIVATE_DIR`, :data:`PRIVATE_FILE`); files other tools read (telemetry, event logs,
documents) are :data:`SHARED_FILE`, ``0o666``. Both are narrowed by the umask, so
``umask 077`` makes every file private. Files are opened with ``O_NOFOLLOW``: a symlink planted
where Prowzi writes or reads is refused, never followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "PRIVATE_DIR",
    "PRIVATE_FILE",
    "SHARED_FILE",
    "TEMP_PREFIX",
    "atomic_write",
    "ensure_private_dir",
    "fsync_directory",
    "open_nofollow",
    "read_nofollow",
    "read_regular",
]

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
SHARED_FILE = 0o666
TEMP_PREFIX = ".tmp."
"""Temporary files start with this; listings skip every name that starts with a dot."""


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) with :data:`PRIVATE_DIR` if it does not exist."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)


def fsync_directory(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where directories cannot be
    opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise  # a filesystem that cannot sync directories says so; anything else is real
    finally:
        os.close(fd)


def open_nofollow(path: Path, flags: int = os.O_RDONLY, mode: int = PRIVATE_FILE) -> int:
    """``os.open`` that refuses a symlink at ``path`` (``OSError`` with ``ELOOP``)."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def read_nofollow(path: Path, offset: int = 0, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file at ``path`` from ``offset`` (at most ``max_bytes`` of them,
    so a caller can go through a large file in chunks of bounded size). A symlink is refused
    (``ELOOP``), and so is anything else that is not a regular file (``EINVAL``: a FIFO would
    block the reader for ever); a missing file is ``FileNotFoundError``."""
    return read_regular(path, offset, max_bytes)[0]


def read_regular(
    path: Path, offset: int = 0, max_bytes: int | None = None, *, max_size: int | None = None
) -> tuple[bytes, os.stat_result]:
    """:func:`read_nofollow`, with the file's ``stat`` as read (the one the bytes belong to);
    a file larger than ``max_size`` is refused (``EFBIG``) without being read."""
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, not {max_bytes}")
    fd = open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if max_size is not None and st.st_size > max_size:
            raise OSError(errno.EFBIG, f"larger than {max_size >> 20} MiB", str(path))
        left = max_bytes
        chunks = []
        while left is None or left > 0:
            want = max(st.st_size - offset, 1 << 16)
            chunk = os.pread(fd, want if left is None else min(want, left), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            if left is not None:
                left -= len(chunk)
        return b"".join(chunks), st
    finally:
        os.close(fd)


def atomic_write(
    path: Path,
    data: bytes | Iterable[bytes],
    *,
    durable: bool = True,
    create_only: bool = False,
    mode: int = PRIVATE_FILE,
) -> os.stat_result:
    """Replace ``path`` with ``data`` atomically; return the new file's ``stat``.

    ``durable=False`` skips both fsyncs (for files derived from others, which a crash at worst
    leaves at their previous version). ``create_only``: raise ``FileExistsError`` instead of
    replacing an existing file (the link that publishes the file is atomic). The parent
    directory must exist. On any failure the target is unchanged and no temporary remains.
    """
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(4)}")
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            parts = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
            for part in parts:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
            if durable:
                os.fdatasync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if create_only:
            os.link(tmp, path)  # EEXIST when taken: never replaces
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_directory(path.parent)
    return st


def is_symlink_error(exc: OSError) -> bool:
    """Whether ``exc`` is ``open_nofollow`` refusing a symlink."""
    return exc.errno == errno.ELOOP

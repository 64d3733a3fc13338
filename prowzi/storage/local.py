"""The local backend: one plain file per blob under a directory.

A put is :func:`~prowzi.storage.files.atomic_write` (temporary file, write, fdatasync, rename,
directory fsync), so a blob is the old version or the new one after any crash, and durable
once the call returns. A ``create_only`` put publishes with ``link``, which fails when the
name is taken; an ``if_match`` put compares and renames under an ``flock`` on the store's lock
file, so conditional puts from several processes serialise. Nothing runs in the background.

A blob name ``a/b`` is the file ``<root>/a/b``. Names starting with a dot are never blobs:
temporaries (``.tmp.*``), the lock file and the catalog live beside the blobs under such names.
A symlink, directory or device where a blob should be is refused, never followed.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from prowzi.storage.blob import (
    Blob,
    BlobInfo,
    BlobNotFoundError,
    PreconditionFailedError,
    UnsafeBlobError,
    validate_blob_name,
)
from prowzi.storage.files import (
    TEMP_PREFIX,
    atomic_write,
    ensure_private_dir,
    open_nofollow,
    read_regular,
)

__all__ = ["MAX_BLOB_BYTES", "LocalBlobStore"]

MAX_BLOB_BYTES = 1 << 30
"""No blob Prowzi writes comes near this; a larger file is refused without being read."""

_LOCK_NAME = ".prowzi-store.lock"
_TEMPORARY_MAX_AGE = 3600.0


def _etag(st: os.stat_result) -> str:
    # A put renames a new file into place: a new inode, and a new mtime.
    return f"{st.st_ino:x}.{st.st_size:x}.{st.st_mtime_ns:x}"


class LocalBlobStore:
    """Blobs as files under ``root`` (created, private, on the first put)."""

    def __init__(self, root: Path | str, *, durable: bool = True) -> None:
        self.root = Path(root)
        self.url = str(self.root.absolute())
        self.durable = durable

    def _path(self, name: str) -> Path:
        """The blob's file; a symlink planted as one of its directories is refused (opening
        with ``O_NOFOLLOW`` guards only the last component)."""
        path = self.root / validate_blob_name(name)
        directory = self.root
        for part in name.split("/")[:-1]:
            directory = directory / part
            try:
                if stat.S_ISLNK(directory.lstat().st_mode):
                    raise UnsafeBlobError(errno.ELOOP, "a symlink, not a directory", str(directory))
            except FileNotFoundError:
                break
        return path

    def describe(self, name: str) -> str:
        return str(self.root / name)

    def get(self, name: str) -> Blob:
        path = self._path(name)
        try:
            data, st = read_regular(path, max_size=MAX_BLOB_BYTES)
        except FileNotFoundError:
            raise BlobNotFoundError(name) from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.EINVAL, errno.EFBIG):
                what = "not a regular file (a symlink?)" if exc.errno == errno.ELOOP else None
                raise UnsafeBlobError(exc.errno, what or exc.strerror, str(path)) from None
            raise
        return Blob(data, BlobInfo(name, st.st_size, st.st_mtime, _etag(st)))

    def head(self, name: str) -> BlobInfo | None:
        path = self._path(name)
        try:
            st = path.lstat()
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeBlobError(errno.EINVAL, "not a regular file (a symlink?)", str(path))
        return BlobInfo(name, st.st_size, st.st_mtime, _etag(st))

    def put(
        self,
        name: str,
        data: bytes,
        *,
        create_only: bool = False,
        if_match: str | None = None,
        durable: bool = True,
    ) -> str:
        path = self._path(name)
        ensure_private_dir(path.parent)
        durable = durable and self.durable
        if if_match is None:
            return self._write(path, data, create_only, durable)
        with self._store_lock():
            info = self.head(name)
            if info is None or info.etag != if_match:
                raise PreconditionFailedError(f"{path} has changed")
            return self._write(path, data, create_only, durable)

    @staticmethod
    def _write(path: Path, data: bytes, create_only: bool, durable: bool) -> str:
        try:
            st = atomic_write(path, data, durable=durable, create_only=create_only)
        except FileExistsError:
            raise PreconditionFailedError(f"{path} exists") from None
        return _etag(st)

    @contextlib.contextmanager
    def _store_lock(self) -> Iterator[None]:
        fd = open_nofollow(self.root / _LOCK_NAME, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def list(self, prefix: str = "") -> list[BlobInfo]:
        found: list[BlobInfo] = []
        self._scan(self.root, "", prefix, found)
        found.sort(key=lambda b: b.name)
        return found

    def _scan(
        self, directory: Path, base: str, prefix: str, found: builtins.list[BlobInfo]
    ) -> None:
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            name = base + entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    sub = name + "/"
                    if sub.startswith(prefix) or prefix.startswith(sub):
                        self._scan(Path(entry.path), sub, prefix, found)
                elif entry.is_file(follow_symlinks=False) and name.startswith(prefix):
                    st = entry.stat(follow_symlinks=False)
                    found.append(BlobInfo(name, st.st_size, st.st_mtime, _etag(st)))
            except FileNotFoundError:
                continue  # removed while listing

    def delete(self, name: str) -> bool:
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except IsADirectoryError:
            raise UnsafeBlobError(errno.EISDIR, "a directory, not a blob", str(path)) from None
        return True

    def sweep_temporaries(self, max_age: float = _TEMPORARY_MAX_AGE) -> builtins.list[str]:
        """Remove temporaries older than ``max_age`` seconds (left by a crash mid-put)."""
        removed = []
        cutoff = time.time() - max_age
        for directory, _dirs, files in os.walk(self.root):
            for file in files:
                path = Path(directory) / file
                with contextlib.suppress(OSError):
                    if file.startswith(TEMP_PREFIX) and path.lstat().st_mtime < cutoff:
                        path.unlink()
                        removed.append(str(path))
        return removed

"""Checkpoint stores: atomic put/get/list/delete of named blobs, plus per-key writer locks.

:class:`CheckpointManager` owns the checkpoint *format*; a store only keeps bytes. Two stores
ship: :class:`LocalDirectoryStore` (the default, one file per blob) and :class:`InMemoryStore`
(for tests). Both pass the same conformance suite (``tests/test_checkpoint_storage.py``); an
object store (S3, Azure Blob) would implement the same interface.

A store may remember a small ``meta`` dict per blob (as object stores keep user metadata), so
listing does not have to read every blob. Meta is only a cache: when the store cannot vouch for
it (a file changed behind its back) it reports ``meta=None`` and the caller reads the blob and
hands the result back with :meth:`CheckpointStore.remember`.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import ctypes
import errno
import fcntl
import gc
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import filelock
import orjson

from prowzi.errors import InvalidIdentifierError, SessionLockedError

log = logging.getLogger("prowzi.storage")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
TEMP_PREFIX = ".tmp."
"""Temporary files start with this (and every hidden name is ignored by listings)."""

_RACY_NS = 50_000_000
"""How long after a directory's mtime a scan must start before the index may trust that mtime.

Directory mtimes come from the kernel's coarse clock (one tick, at most 10 ms, behind the fine
clock), so a change made in the same tick as a scan leaves the mtime unchanged. An index stamp
taken less than this after the mtime is "racy" (as git calls it) and is re-checked by a scan.
"""

_INDEX_VERSION = 1
_COMPACT_MIN = 1 << 20
"""The index log is compacted once it exceeds this and twice its last snapshot."""
_RECOVER_MAX = 1 << 30
"""A spare larger than this is not read by a recovery (no checkpoint is that large)."""
_TEMPORARY_MAX_AGE = 3600.0
"""Seconds after which a temporary file is certainly abandoned and may be removed."""


def validate_blob_name(name: object) -> str:
    """A blob name is one path component: no separators, no ``..``, no NUL, at most 255."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidIdentifierError(f"invalid blob name {name!r}")
    return name


Verdict = Literal["published", "discard", "keep"]
"""What became of an interrupted put in :meth:`CheckpointStore.recover`: published under a
name, to be discarded, or kept for later (someone else may be able to vouch for it)."""
Judge = Callable[[bytes, Callable[[str, int], None]], Verdict]
"""Judges an interrupted put's bytes (perhaps followed by zero padding); calls its second
argument with a name and the blob's true length to publish them."""


class BlobNotFoundError(LookupError):
    """No blob has this name."""


class UnsafeBlobError(OSError):
    """Something that is not a blob sits under a blob's name (a symlink, a directory)."""


@dataclass(frozen=True, slots=True)
class BlobInfo:
    name: str
    size: int
    modified: float
    """Seconds since the epoch of the last write."""
    token: str
    """Changes whenever the blob is replaced. (A file edited in place, bypassing the store,
    changes it only if its size or mtime changes, and only once :meth:`refresh` or a
    rescan looks at it: content checks belong to the caller.)"""
    meta: dict[str, Any] | None
    """What ``put`` or ``remember`` recorded for this very content, or None when unknown."""


class CheckpointStore(ABC):
    """Named blobs with atomic replacement, and writer locks keyed by session."""

    @abstractmethod
    def put(
        self,
        name: str,
        data: bytes,
        *,
        meta: dict[str, Any] | None = None,
        durable: bool = True,
        zero_padding_ok: bool = False,
    ) -> None:
        """Replace ``name`` atomically: readers see the old bytes or the new, never a mix.

        ``durable`` asks that the new bytes survive a power loss once ``put`` returns.
        ``zero_padding_ok`` says the caller's format ignores zero bytes after its end, so
        readers may briefly see the blob followed by zeros (the store trims them later).
        """

    @abstractmethod
    def get(self, name: str, *, max_bytes: int | None = None) -> bytes:
        """The blob's bytes (the first ``max_bytes`` only, when given)."""

    @abstractmethod
    def list(self, *, fresh: bool = True) -> list[BlobInfo]:
        """Every blob. ``fresh=False`` allows the store's last known view plus its own writes."""

    def generation(self, *, fresh: bool = True) -> int | None:
        """A number that changes whenever :meth:`list` would change (after bringing the view
        up to date, when ``fresh``); None when the store cannot tell."""
        return None

    @abstractmethod
    def token(self, name: str) -> str | None:
        """The blob's current token, or None when it does not exist."""

    def refresh(self, name: str) -> None:
        """Re-examine one blob, so that a change made behind the store's back (a file
        rewritten in place) shows in the next :meth:`list`."""
        validate_blob_name(name)

    @abstractmethod
    def delete(self, name: str) -> bool:
        """Remove the blob; False when it did not exist."""

    @abstractmethod
    def remember(self, name: str, token: str, meta: dict[str, Any]) -> None:
        """Cache ``meta`` for the blob's content identified by ``token``."""

    @abstractmethod
    def describe(self, name: str) -> str:
        """Where the blob lives, for messages (a path or a URL)."""

    @abstractmethod
    def lock(self, key: str, timeout: float = 0) -> AbstractContextManager[None]:
        """Hold the writer lock ``key``; raises :class:`SessionLockedError` naming the holder."""

    @abstractmethod
    def is_locked(self, key: str) -> bool:
        """Whether anyone (this process included) holds the lock ``key``."""

    def sweep_temporaries(self, max_age: float = _TEMPORARY_MAX_AGE) -> builtins.list[str]:
        """Remove temporaries left by interrupted writes, older than ``max_age`` seconds."""
        return []

    def recover(self, judge: Judge) -> builtins.list[str]:
        """Finish the puts a crash interrupted, where the store defers part of a put.

        ``judge`` gets the bytes of each blob whose put was durable but may not have been
        published under its name, and a function that publishes them under a name (call it
        while holding whatever lock makes that safe); returns the names published. Stores that
        publish every put before it returns have nothing to recover.
        """
        return []

    def settle(self) -> None:
        """Make every put that has returned durable under its name, before deletions (so a
        recovery never republishes a blob deleted after it)."""
        return None


def _holder_description() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _describe_holder(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('since')})"


# --- in memory ------------------------------------------------------------------------------


class InMemoryStore(CheckpointStore):
    """A store in a dict, for tests. Locks are per store object (one process)."""

    def __init__(self) -> None:
        self._blobs: dict[str, tuple[bytes, float, str, dict[str, Any] | None]] = {}
        self._locks: dict[str, dict[str, Any]] = {}
        self._mutex = threading.Lock()
        self._counter = 0

    def put(
        self,
        name: str,
        data: bytes,
        *,
        meta: dict[str, Any] | None = None,
        durable: bool = True,
        zero_padding_ok: bool = False,
    ) -> None:
        validate_blob_name(name)
        with self._mutex:
            self._counter += 1
            self._blobs[name] = (bytes(data), time.time(), f"m{self._counter}", meta)

    def get(self, name: str, *, max_bytes: int | None = None) -> bytes:
        validate_blob_name(name)
        with self._mutex:
            entry = self._blobs.get(name)
        if entry is None:
            raise BlobNotFoundError(name)
        return entry[0] if max_bytes is None else entry[0][:max_bytes]

    def list(self, *, fresh: bool = True) -> list[BlobInfo]:
        with self._mutex:
            return [
                BlobInfo(name, len(data), modified, token, meta)
                for name, (data, modified, token, meta) in self._blobs.items()
            ]

    def token(self, name: str) -> str | None:
        validate_blob_name(name)
        entry = self._blobs.get(name)
        return None if entry is None else entry[2]

    def delete(self, name: str) -> bool:
        validate_blob_name(name)
        with self._mutex:
            self._counter += 1
            return self._blobs.pop(name, None) is not None

    def remember(self, name: str, token: str, meta: dict[str, Any]) -> None:
        with self._mutex:
            entry = self._blobs.get(name)
            if entry is not None and entry[2] == token:
                self._counter += 1
                self._blobs[name] = (entry[0], entry[1], token, meta)

    def generation(self, *, fresh: bool = True) -> int:
        return self._counter

    def describe(self, name: str) -> str:
        return f"memory://{name}"

    @contextmanager
    def _hold(self, key: str, timeout: float) -> Iterator[None]:
        validate_blob_name(key)
        deadline = time.monotonic() + max(timeout, 0)
        while True:
            with self._mutex:
                holder = self._locks.get(key)
                if holder is None:
                    self._locks[key] = _holder_description()
                    break
            if time.monotonic() >= deadline:
                raise SessionLockedError(f"session {key} is locked by {_describe_holder(holder)}")
            time.sleep(0.01)
        try:
            yield
        finally:
            with self._mutex:
                self._locks.pop(key, None)

    def lock(self, key: str, timeout: float = 0) -> AbstractContextManager[None]:
        return self._hold(key, timeout)

    def is_locked(self, key: str) -> bool:
        validate_blob_name(key)
        with self._mutex:
            return key in self._locks


# --- local directory ------------------------------------------------------------------------


_Entry = tuple[str, int, int, dict[str, Any] | None]
"""(token, size, mtime_ns, meta): tuples, because a listing may hold tens of thousands."""


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic GC while building many small containers: one collection afterwards
    instead of several (each rescanning the growing heap) along the way."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip().replace("-", "")
    except OSError:
        return None
    return boot[:16] if re.fullmatch(r"[0-9a-f]{16,}", boot) else None


_BOOT_ID = _read_boot_id()
"""This boot of the machine: a put interrupted in an earlier boot (a power loss) is recovered,
one interrupted in this boot (a killed process, whose page cache survived) is discarded."""

SPARE_DIR = ".spare"
_SPARE_RE = re.compile(r"(?P<boot>[0-9a-f]{16})-(?P<pid>[0-9]{1,10})-[0-9a-f]{8}")
_SPARE_LEVELS = {False: (8, 24), True: (4, 8)}
"""(low, high) water marks of an empty and of a zeroed pool: zeroed spares hold disk space."""
_SPARE_MIN_CAPACITY = 64 << 10
_SPARE_MAX_CAPACITY = 4 << 20
"""Blobs larger than this go to empty spares (a second journal commit, but no reservation)."""


def _flock_nb(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class _SparePool:
    """Files created ahead of time, so that a put creates no inode on its critical path.

    Creating a file is a filesystem-journal transaction of its own (and, in some directories
    of some virtual disks, costs more than the whole durable write of a checkpoint), and a
    durable put into a *new* file needs a second one to sync the new name. A background thread
    keeps a few spares (``_SPARE_LEVELS``) in ``<root>/.spare/``, created,
    synced and their directory fsynced, so a spare and its name already survive a power loss.

    A *zeroed* pool fills its spares with ``capacity`` zero bytes (and syncs them): writing a
    blob over blocks that already exist and syncing it is a pure data flush with no journal
    commit, as SQLite's reused write-ahead log does. What is left of the zeros is trimmed off
    by the same thread after the put (:meth:`trim`). An *empty* pool serves puts that are not
    synced.

    Each spare is held open with an exclusive ``flock``: the lock tells other processes the
    spare is in use and dies with its owner, so a spare whose lock is free is an orphan. Names
    are ``<boot id>-<pid>-<random>``: the boot id tells a recovery whether a spare's owner
    died alone (the page cache survived) or with the machine.
    """

    def __init__(self, directory: str, *, durable: bool, zeroed: bool) -> None:
        self.directory = directory
        self.durable = durable
        self.zeroed = zeroed
        self.capacity = _SPARE_MIN_CAPACITY if zeroed else 0
        self._low, self._high = _SPARE_LEVELS[zeroed]
        self._ready: deque[tuple[str, int, int]] = deque()
        self._trims: deque[tuple[int, int, Callable[[int], None]]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._pid = os.getpid()
        self._failed_at = -1e9

    def take(self, size: int = 0) -> tuple[str, int] | None:
        """A spare (path, open fd holding its lock) able to take ``size`` bytes without
        growing, or None when none is ready."""
        with self._cond:
            if self._closed or os.getpid() != self._pid:
                return None
            if self.zeroed and self.capacity < size <= _SPARE_MAX_CAPACITY:
                # Later spares fit blobs this large; this one would grow (a journal commit).
                self.capacity = min(_SPARE_MAX_CAPACITY, 1 << (size + size // 4).bit_length())
            spare = None
            if self._ready and self._ready[0][2] >= size:
                spare = self._ready.popleft()
            elif self._ready and self.zeroed:
                self._drop_small_locked()
            if len(self._ready) < self._low:
                self._start_locked()
                self._cond.notify()
            return None if spare is None else (spare[0], spare[1])

    def _drop_small_locked(self) -> None:
        small = [s for s in self._ready if s[2] < self.capacity]
        self._ready = deque(s for s in self._ready if s[2] >= self.capacity)
        for path, fd, _ in small:
            _drop(path, fd)

    def trim(self, fd: int, length: int, done: Callable[[int], None]) -> None:
        """Cut a used zeroed spare (now a blob) to ``length`` in the background, close it,
        and call ``done(fd)`` first (for bookkeeping by the owner)."""
        with self._cond:
            if self._closed or os.getpid() != self._pid:
                closed = True
            else:
                closed = False
                self._trims.append((fd, length, done))
                self._start_locked()
                self._cond.notify()
        if closed:
            self._trim_one(fd, length, done)

    @staticmethod
    def _trim_one(fd: int, length: int, done: Callable[[int], None]) -> None:
        try:
            os.ftruncate(fd, length)
            done(fd)
        except OSError as exc:
            log.debug("could not trim a checkpoint file: %s", exc)
        finally:
            os.close(fd)

    def start(self) -> None:
        """Begin filling the pool (a writer is about to need it)."""
        with self._cond:
            if not self._closed and os.getpid() == self._pid:
                self._start_locked()
                self._cond.notify()

    def owns(self, name: str) -> bool:
        with self._cond:
            return any(os.path.basename(path) == name for path, _, _ in self._ready)

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._fill, name=f"prowzi-spares:{self.directory}", daemon=True
            )
            self._thread.start()

    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._trims and len(self._ready) >= self._low:
                    self._cond.wait()
                if self._closed:
                    trims, self._trims = list(self._trims), deque()
                else:
                    trims = []
                    if self._trims:
                        trims.append(self._trims.popleft())
            for fd, length, done in trims:
                self._trim_one(fd, length, done)
            if self._closed:
                return
            if trims:
                continue  # trims first: they keep the index exact
            with self._cond:
                wanted = self._high - len(self._ready)
                capacity = self.capacity
                if wanted <= 0:
                    continue
                if time.monotonic() - self._failed_at < 1.0:
                    self._cond.wait(1.0)
                    continue
            made: list[tuple[str, int, int]] = []
            try:
                for _ in range(wanted):
                    made.append(self._create(capacity))
                if self.zeroed and self.durable:
                    # Write every spare's zeros out (allocating its blocks), then commit them
                    # all at once: one journal commit for the batch, not one per spare.
                    for _, fd, _ in made[:-1]:
                        _write_out(fd)
                    os.fdatasync(made[-1][1])
                if self.durable:
                    _fsync_dir(self.directory)
            except OSError as exc:
                # No room, or the directory went away: puts create their own files meanwhile.
                log.debug("could not prepare spare files in %s: %s", self.directory, exc)
                for path, fd, _ in made:
                    _drop(path, fd)
                made = []
                self._failed_at = time.monotonic()
            with self._cond:
                if self._closed:
                    for path, fd, _ in made:
                        _drop(path, fd)
                    continue
                self._ready.extend(made)

    def _create(self, capacity: int) -> tuple[str, int, int]:
        name = f"{_BOOT_ID}-{os.getpid()}-{secrets.token_hex(4)}"
        path = os.path.join(self.directory, name)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.directory, 0o700)
            if self.durable:
                _fsync_dir(os.path.dirname(self.directory))
            fd = os.open(path, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: nobody else can hold it
            if capacity:
                zeros = bytes(min(capacity, 1 << 20))
                done = 0
                while done < capacity:
                    done += os.write(fd, zeros[: capacity - done])
        except BaseException:
            _drop(path, fd)
            raise
        return path, fd, capacity

    def close(self) -> None:
        """Stop filling, and remove the spares not handed out."""
        with self._cond:
            self._closed = True
            spares, self._ready = list(self._ready), deque()
            trims, self._trims = list(self._trims), deque()
            self._cond.notify_all()
        if os.getpid() == self._pid:
            for path, fd, _ in spares:
                _drop(path, fd)
            for fd, length, done in trims:
                self._trim_one(fd, length, done)

    def forget(self) -> None:
        """In a forked child: the spares (and their locks) belong to the parent."""
        self._closed = True
        for _, fd, _ in self._ready:
            with contextlib.suppress(OSError):
                os.close(fd)  # the parent's descriptor keeps the lock
        for fd, _, _ in self._trims:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ready = deque()
        self._trims = deque()
        self._thread = None
        self._cond = threading.Condition()


def _load_sync_file_range() -> Callable[[int], None] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    wait_before_write_wait_after = 1 | 2 | 4

    def write_out(fd: int) -> None:
        if function(fd, 0, 0, wait_before_write_wait_after) != 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number))

    return write_out


_SYNC_FILE_RANGE = _load_sync_file_range()


def _write_out(fd: int) -> None:
    """Write a file's dirty pages to disk now (allocating their blocks), without committing
    the filesystem journal: a later fsync of any file in the same filesystem commits them
    together. Falls back to fdatasync where sync_file_range(2) is missing."""
    if _SYNC_FILE_RANGE is None:
        os.fdatasync(fd)
        return
    try:
        _SYNC_FILE_RANGE(fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE):
            raise
        os.fdatasync(fd)


def _drop(path: str, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_POOLS: weakref.WeakSet[_SparePool] = weakref.WeakSet()


def _close_pools() -> None:
    for pool in list(_POOLS):
        pool.close()


def _forget_pools() -> None:
    for pool in list(_POOLS):
        pool.forget()


atexit.register(_close_pools)
os.register_at_fork(after_in_child=_forget_pools)


def _token(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


class LocalDirectoryStore(CheckpointStore):
    """One file per blob in ``root``; the files are the source of truth.

    Writes, when a spare file is ready (the usual case once a writer runs; see
    :class:`_SparePool`): the blob goes into a spare in ``root/.spare/`` that was created,
    synced and had its directory synced ahead of time, fdatasync (for a zeroed spare and a
    caller that allows ``zero_padding_ok``, a pure data flush), then ``os.rename`` into
    ``root``. The rename's own sync is deferred: the filesystem commits it with the next
    journal commit (at most seconds later, or at any other fsync), and until then the data is
    durable under the spare's name, which :meth:`recover` publishes after a power loss. So a
    put that returned survives a power loss either way, with one flush instead of two journal
    commits. :meth:`settle` syncs the names before deletions. ``spares=False`` turns this off.

    Otherwise: a temporary file in ``root``, written in full, fdatasync, ``os.replace``,
    fsync of the directory (and of its parent when the put created it); the temporary is
    removed on failure. ``durable=False`` (or ``fsync=False``) skips the syncs only. Hidden
    names (``.tmp.*``, ``.index``, ``.locks``, ``.spare``) are never listed.

    Listing is served from an index in ``root/.index/manifest.jsonl``: an append-only log of the
    meta recorded at each put, plus a stamp of the directory's mtime at the last full scan. A
    listing trusts the log only while the directory's mtime still equals that stamp (and the
    stamp is not racy); otherwise it rescans the directory, reusing cached meta for files whose
    inode, size and mtime are unchanged, and compacts the log. Deleting, adding or renaming
    files by hand therefore never confuses a listing; a file rewritten *in place* does not
    change the directory and is noticed by :meth:`refresh` (the manager refreshes a session's
    files before relying on them). The index lives in a subdirectory so that writing it does
    not itself change the mtime of ``root``. Rescans also remove temporaries abandoned more
    than an hour ago.
    """

    def __init__(self, root: Path | str, *, fsync: bool = True, spares: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._dir = os.path.join(os.fspath(self.root), "")
        self._index_dir = self.root / ".index"
        self._lock_dir = self.root / ".locks"
        self._manifest = self._index_dir / "manifest.jsonl"
        self._mutex = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._stamp: tuple[int, int] | None = None
        self._manifest_ino: int | None = None
        self._offset = 0
        self._manifest_broken = False
        self._generation = 0
        self._compact_at = _COMPACT_MIN
        self._loaded = False  # whether _entries reflects the directory (as of some listing)
        self._spare_dir = os.path.join(self._dir, SPARE_DIR)
        self._pools: list[_SparePool] = []
        self._zeroed: _SparePool | None = None
        self._empty: _SparePool | None = None
        if _BOOT_ID is not None and spares:
            self._empty = _SparePool(self._spare_dir, durable=fsync, zeroed=False)
            self._pools.append(self._empty)
            if fsync:
                self._zeroed = _SparePool(self._spare_dir, durable=True, zeroed=True)
                self._pools.append(self._zeroed)
            for pool in self._pools:
                _POOLS.add(pool)
                weakref.finalize(self, pool.close)

    # blobs

    def _path(self, name: str) -> str:
        return self._dir + validate_blob_name(name)

    def _ensure_dirs(self) -> None:
        if self._index_dir.is_dir():
            return
        created_root = not self.root.is_dir()
        if created_root:
            # private: the index and the checkpoints hold prompts and results
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._index_dir.mkdir(exist_ok=True, mode=0o700)
        if created_root and self.fsync:
            # A new checkpoint directory must itself survive a power loss.
            self._fsync_dir(os.fspath(self.root.resolve().parent))

    def put(
        self,
        name: str,
        data: bytes,
        *,
        meta: dict[str, Any] | None = None,
        durable: bool = True,
        zero_padding_ok: bool = False,
    ) -> None:
        final = self._path(name)
        self._ensure_dirs()
        durable = durable and self.fsync
        trim: _SparePool | None = None
        spare = None
        if durable and zero_padding_ok and self._zeroed is not None:
            spare = self._zeroed.take(len(data))
            trim = self._zeroed if spare is not None else None
        if spare is None and self._empty is not None:
            spare = self._empty.take()
        if spare is not None:
            st = self._put_spare(spare, final, data, durable, trimmed=trim is not None)
        else:
            st = self._put_new(name, final, data, durable)
        token = _token(st)
        with self._mutex:
            self._entries[name] = (token, st.st_size, st.st_mtime_ns, meta)
            self._generation += 1
            # Without meta, a rescan learns as much as the log would; with a trim to come, the
            # trim logs the final version (a log line for this one would be stale at once).
            if meta is not None and trim is None:
                self._append(
                    [{"n": name, "t": token, "s": st.st_size, "mt": st.st_mtime_ns, "m": meta}]
                )
        if trim is not None and spare is not None:
            trim.trim(spare[1], len(data), lambda fd: self._trimmed(name, token, fd))

    def _trimmed(self, name: str, token: str, fd: int) -> None:
        """A blob's zero padding is gone: its entry (if still this version) follows."""
        st = os.fstat(fd)
        with self._mutex:
            entry = self._entries.get(name)
            if entry is None or entry[0] != token:
                return
            self._entries[name] = (_token(st), st.st_size, st.st_mtime_ns, entry[3])
            self._generation += 1
            if entry[3] is not None:
                self._append(
                    [
                        {
                            "n": name,
                            "t": _token(st),
                            "s": st.st_size,
                            "mt": st.st_mtime_ns,
                            "m": entry[3],
                        }
                    ]
                )

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        """Write all of ``data`` at the start of the file (a short write is continued)."""
        view = memoryview(data)
        offset = 0
        while offset < len(view):
            offset += os.pwrite(fd, view[offset:], offset)

    def _put_spare(
        self, spare: tuple[str, int], final: str, data: bytes, durable: bool, *, trimmed: bool
    ) -> os.stat_result:
        """Fill a spare, fdatasync it, rename it into place.

        The spare's name is already on disk, and a zeroed spare's blocks too, so the sync is
        one flush with no journal commit. The rename is not synced: until the filesystem
        commits it, a power loss leaves the data under the spare's name, where :meth:`recover`
        finds it. Metadata commits in order, so a later synced change (another put's
        directory fsync, :meth:`settle`) makes the rename durable too. A zeroed spare keeps
        its descriptor open for the trim (``trimmed``); an empty one is closed."""
        path, fd = spare
        try:
            self._write_all(fd, data)
            if durable:
                os.fdatasync(fd)
            st = os.fstat(fd)
            os.rename(path, final)
        except BaseException:
            # Emptied first: a spare that might come back after a power loss holds nothing.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            _drop(path, fd)
            raise
        if not trimmed:
            os.close(fd)
        return st

    def _put_new(self, name: str, final: str, data: bytes, durable: bool) -> os.stat_result:
        tmp = f"{self._dir}{TEMP_PREFIX}{name}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                self._write_all(fd, data)
                if durable:
                    os.fdatasync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if durable:
            self._fsync_dir(self._dir)
        return st

    @staticmethod
    def _fsync_dir(path: str) -> None:
        _fsync_dir(path)

    def settle(self) -> None:
        if not self.fsync:
            return
        with contextlib.suppress(FileNotFoundError):
            _fsync_dir(self._spare_dir)
        with contextlib.suppress(FileNotFoundError):
            _fsync_dir(self._dir)

    def recover(self, judge: Judge) -> list[str]:
        """Publish the puts a power loss interrupted; remove the spares of dead processes.

        A spare is looked at only when its lock is free (its owner is gone), it is a regular
        file of ours, and its name is one this store makes. Empty: an unused spare, removed.
        Written in this boot: its writer was killed before the put returned (the page cache
        survived, so nothing published was lost), removed. Written in an earlier boot: the
        put's data may be durable only here, so ``judge`` decides: publish it under a name
        (then synced), discard it, or keep it.
        """
        published: list[str] = []
        try:
            entries = list(os.scandir(self._spare_dir))
        except (FileNotFoundError, NotADirectoryError):
            return published
        for entry in entries:
            match = _SPARE_RE.fullmatch(entry.name)
            if match is None or any(pool.owns(entry.name) for pool in self._pools):
                continue
            try:
                fd = os.open(entry.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    continue
                if not _flock_nb(fd):
                    continue  # its owner is alive
                if st.st_size == 0 or match["boot"] == _BOOT_ID:
                    os.unlink(entry.path)
                    continue
                data = b"" if st.st_size > _RECOVER_MAX else os.pread(fd, st.st_size, 0)

                def publish(name: str, length: int, path: str = entry.path, fd: int = fd) -> None:
                    os.ftruncate(fd, length)  # a zeroed spare's padding
                    os.rename(path, self._path(name))
                    self.settle()
                    self._forget_view()
                    published.append(name)

                if judge(data, publish) == "discard":
                    os.unlink(entry.path)
            except OSError as exc:
                log.warning("could not recover %s: %s", entry.path, exc)
            finally:
                os.close(fd)
        return published

    def _forget_view(self) -> None:
        with self._mutex:
            self._loaded = False
            self._stamp = None
            self._generation += 1

    def get(self, name: str, *, max_bytes: int | None = None) -> bytes:
        path = self._path(name)
        try:
            # O_NOFOLLOW: a symlink planted in the directory is not a blob.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobNotFoundError(name) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeBlobError(f"{name} is a symbolic link; it is not followed") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeBlobError(f"{name} is not a regular file")
            wanted = st.st_size if max_bytes is None else min(st.st_size, max_bytes)
            chunks = [os.read(fd, wanted)]
            got = len(chunks[0])
            while got < wanted:
                chunk = os.read(fd, wanted - got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        finally:
            os.close(fd)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def token(self, name: str) -> str | None:
        try:
            st = os.stat(self._path(name), follow_symlinks=False)
        except FileNotFoundError:
            return None
        return _token(st) if stat.S_ISREG(st.st_mode) else None

    def refresh(self, name: str) -> None:
        path = self._path(name)
        with self._mutex:
            if not self._loaded:
                return  # nothing cached yet: the next listing reads the directory
            try:
                st = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            known = self._entries.get(name)
            if st is None or not stat.S_ISREG(st.st_mode):
                if known is not None:
                    del self._entries[name]
                    self._generation += 1
            elif known is None or known[0] != _token(st):
                self._entries[name] = (_token(st), st.st_size, st.st_mtime_ns, None)
                self._generation += 1

    def delete(self, name: str) -> bool:
        path = self._path(name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        with self._mutex:
            self._entries.pop(name, None)
            self._generation += 1
            self._append([{"n": name, "d": 1}])
        return True

    def describe(self, name: str) -> str:
        return self._path(name)

    def sweep_temporaries(self, max_age: float = _TEMPORARY_MAX_AGE) -> list[str]:
        removed: list[str] = []
        cutoff = time.time() - max_age
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return removed
        for entry in entries:
            if not entry.name.startswith(TEMP_PREFIX):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed.append(entry.name)
        return removed

    # index

    @contextmanager
    def _index_lock(self) -> Iterator[None]:
        """Serialise index appends and rewrites across threads and processes."""
        with self._mutex:
            try:
                self._ensure_dirs()
                fd = os.open(self._index_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                # A read-only directory: nobody can be writing the index, so no lock is needed.
                log.debug("no index lock in %s: %s", self.root, exc)
                yield
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _append(self, records: list[dict[str, Any]]) -> None:
        payload = b"".join(orjson.dumps(r) + b"\n" for r in records)
        try:
            with self._index_lock():
                fd = os.open(
                    self._manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
                try:
                    os.write(fd, payload)
                    size = os.fstat(fd).st_size
                finally:
                    os.close(fd)
                if size > self._compact_at:
                    self._compact()
        except OSError as exc:
            # The index is a cache: a listing that cannot trust it rescans the directory.
            log.warning("could not update the checkpoint index in %s: %s", self.root, exc)

    def _compact(self) -> None:
        """Rewrite the log as one snapshot, so that it does not grow without bound between
        listings. Replaying the log gives the same entries and keeps the stamp valid."""
        self._read_manifest()
        if self._manifest_broken:
            return  # the next listing rescans and rewrites it
        self._write_manifest(self._stamp or (0, 0))  # (0, 0): never fresh, rescanned later

    def _read_manifest(self) -> None:
        """Bring the in-memory index up to date with the manifest file (tail only if possible)."""
        try:
            fd = os.open(self._manifest, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._stamp, self._manifest_ino, self._offset = None, None, 0
            return
        try:
            st = os.fstat(fd)
            if st.st_ino != self._manifest_ino or st.st_size < self._offset:
                self._entries, self._stamp, self._offset = {}, None, 0
                self._manifest_broken = False
                self._manifest_ino = st.st_ino
            if st.st_size == self._offset:
                return
            os.lseek(fd, self._offset, os.SEEK_SET)
            chunks = []
            remaining = st.st_size - self._offset
            while remaining > 0:
                chunk = os.read(fd, remaining)
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self._offset += end
        self._generation += 1
        with paused_gc():
            for line in data[:end].splitlines():
                self._apply(line)

    def _apply(self, line: bytes) -> None:
        entries = self._entries
        try:
            rec = orjson.loads(line)
            if "snapshot" in rec:
                if rec["snapshot"] != _INDEX_VERSION:
                    self._manifest_broken = True
                    return
                self._entries = entries = {e[0]: (e[1], e[2], e[3], e[4]) for e in rec["entries"]}
                self._stamp = (int(rec["stamp"][0]), int(rec["stamp"][1]))
            elif rec.get("d"):
                entries.pop(rec["n"], None)
            else:
                entries[rec["n"]] = (rec["t"], rec["s"], rec["mt"], rec.get("m"))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError):
            # A torn line (a crash mid-append): distrust the log until the next rescan.
            self._manifest_broken = True

    def _fresh(self, dir_mtime_ns: int) -> bool:
        if self._manifest_broken or self._stamp is None:
            return False
        stamp_mtime, scanned_at = self._stamp
        return stamp_mtime == dir_mtime_ns and scanned_at - stamp_mtime > _RACY_NS

    def list(self, *, fresh: bool = True) -> list[BlobInfo]:
        with self._mutex:
            self.generation(fresh=fresh)
            with paused_gc():
                return [
                    BlobInfo(name, size, mtime_ns / 1e9, token, meta)
                    for name, (token, size, mtime_ns, meta) in self._entries.items()
                ]

    def generation(self, *, fresh: bool = True) -> int:
        with self._mutex:
            if not self.root.is_dir():
                if self._entries:
                    self._entries, self._stamp, self._manifest_ino = {}, None, None
                    self._generation += 1
                self._loaded = False
                return self._generation
            if not fresh and self._loaded:
                return self._generation
            with self._index_lock():
                self._read_manifest()
                scanned_at = time.time_ns()
                dir_mtime = os.stat(self.root).st_mtime_ns
                if not self._fresh(dir_mtime):
                    self._rescan(dir_mtime, scanned_at)
            self._loaded = True
            return self._generation

    def _rescan(self, dir_mtime: int, scanned_at: int) -> None:
        entries: dict[str, _Entry] = {}
        stale_temporaries = time.time() - _TEMPORARY_MAX_AGE
        with paused_gc():
            items = list(os.scandir(self.root))
        for item in items:
            if item.name.startswith(TEMP_PREFIX):
                # Left by a writer that died mid-write; a live one is never this old.
                with contextlib.suppress(OSError):
                    if item.stat(follow_symlinks=False).st_mtime < stale_temporaries:
                        os.unlink(item.path)
                continue
            if item.name.startswith(".") or not _NAME_RE.fullmatch(item.name):
                continue
            try:
                st = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            token = _token(st)
            known = self._entries.get(item.name)
            meta = known[3] if known is not None and known[0] == token else None
            entries[item.name] = (token, st.st_size, st.st_mtime_ns, meta)
        self._entries = entries
        self._generation += 1
        self._stamp = (dir_mtime, scanned_at)
        self._manifest_broken = False
        self._write_manifest(self._stamp)

    def _write_manifest(self, stamp: tuple[int, int]) -> None:
        # One line, so that a cold reader parses the whole snapshot in a single call.
        snapshot = {
            "snapshot": _INDEX_VERSION,
            "stamp": list(stamp),
            "entries": [[n, *e] for n, e in self._entries.items()],
        }
        data = orjson.dumps(snapshot) + b"\n"
        tmp = self._index_dir / f"{TEMP_PREFIX}manifest.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, self._manifest)
            st = os.stat(self._manifest)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("could not rewrite the checkpoint index in %s: %s", self.root, exc)
            self._manifest_ino, self._offset = None, 0
            return
        self._manifest_ino, self._offset = st.st_ino, len(data)
        self._compact_at = max(_COMPACT_MIN, 2 * len(data))

    def remember(self, name: str, token: str, meta: dict[str, Any]) -> None:
        with self._mutex:
            entry = self._entries.get(name)
            if entry is None or entry[0] != token:
                return
            self._entries[name] = (token, entry[1], entry[2], meta)
            self._generation += 1
            self._append([{"n": name, "t": token, "s": entry[1], "mt": entry[2], "m": meta}])

    # locks

    def _lock_paths(self, key: str) -> tuple[Path, Path]:
        validate_blob_name(key)
        return self._lock_dir / f"{key}.lock", self._lock_dir / f"{key}.owner"

    def _holder(self, owner: Path) -> dict[str, Any] | None:
        try:
            info = orjson.loads(owner.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        return info if isinstance(info, dict) else None

    @contextmanager
    def _hold(self, key: str, timeout: float) -> Iterator[None]:
        lock_path, owner = self._lock_paths(key)
        self._ensure_dirs()  # a lock may come first: the root is created (and synced) once
        for pool in self._pools:
            pool.start()  # the holder is about to write: have spares ready
        self._lock_dir.mkdir(exist_ok=True)
        # thread_local=False and a fresh object per call: a second holder in this very
        # process is refused too (flock conflicts across open file descriptions).
        lock = filelock.FileLock(lock_path, thread_local=False, preserve_lock_file=True)
        try:
            lock.acquire(timeout=max(timeout, 0), poll_interval=0.02)
        except filelock.Timeout:
            raise SessionLockedError(
                f"session {key} is locked by {_describe_holder(self._holder(owner))}"
            ) from None
        try:
            tmp = owner.with_name(f"{TEMP_PREFIX}{owner.name}.{secrets.token_hex(4)}")
            tmp.write_bytes(orjson.dumps(_holder_description()))
            os.replace(tmp, owner)
            yield
        finally:
            with contextlib.suppress(OSError):
                owner.unlink()
            lock.release()

    def lock(self, key: str, timeout: float = 0) -> AbstractContextManager[None]:
        return self._hold(key, timeout)

    def is_locked(self, key: str) -> bool:
        lock_path, _ = self._lock_paths(key)
        if not lock_path.exists():
            return False
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return True
            raise
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

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
from prowzi.host import boot_id

log = logging.getLogger("prowzi.storage")

Blob = bytes | bytearray | memoryview | list[bytes]
"""A blob's bytes, or a list of the parts that make them, in order."""

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
Judge = Callable[[bytes, Callable[[str], None]], Verdict]
"""Judges an interrupted put's bytes; calls its second argument with a name to publish them."""


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
        data: Blob,
        *,
        meta: dict[str, Any] | None = None,
        durable: bool = True,
        recoverable: bool = False,
    ) -> str | None:
        """Replace ``name`` atomically: readers see the old bytes or the new, never a mix.
        ``data`` is the bytes, or a list of parts that make them (written without joining
        them first, where the store can). A put that is neither durable nor recoverable is
        for data derived from other blobs: it may refuse to create the store's location
        (a directory store does not bring back a directory removed meanwhile).

        ``durable`` asks that the new bytes survive a power loss once ``put`` returns.
        ``recoverable`` says the caller can recognise the blob and name it again
        (:meth:`recover`), and can read it with zero bytes after its end (a directory store
        puts it into a file pre-written with zeros, and cuts them in :meth:`finish`); this
        lets a store defer part of a durable put. Returns the new blob's :meth:`token` (None
        when the store cannot tell).
        """

    def finish(self, name: str, token: str) -> str:
        """Do what a recoverable put of ``name`` (returning ``token``) deferred but a
        reader tolerates meanwhile (cutting padding); returns the blob's token after it."""
        return token

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

    def holder(self, key: str) -> str | None:
        """Who holds the lock ``key``, described as :class:`SessionLockedError` names them,
        or None when it is free."""
        return "another process" if self.is_locked(key) else None

    def sweep_temporaries(self, max_age: float = _TEMPORARY_MAX_AGE) -> builtins.list[str]:
        """Remove temporaries left by interrupted writes, older than ``max_age`` seconds."""
        return []

    def recover(
        self, judge: Judge, order: Callable[[bytes], float] | None = None
    ) -> builtins.list[str]:
        """Finish the puts a crash interrupted, where the store defers part of a put.

        ``judge`` gets the bytes of each blob whose put was durable but may not have been
        published under its name, and a function that publishes them under a name (call it
        while holding whatever lock makes that safe); returns the names published. ``order``
        (a key of the bytes; the oldest first) says in which order they are judged. Stores
        that publish every put before it returns have nothing to recover.
        """
        return []

    def settle(self) -> None:
        """Make every put that has returned durable under its name, before deletions (so a
        recovery never republishes a blob deleted after it)."""
        return None

    def close(self) -> None:
        """Release what the store holds open (it stays usable: it reopens on demand)."""
        return None


def writer_lock_probe(root: Path | str) -> Callable[[str], bool]:
    """``session_id -> whether anyone holds the session's writer lock`` in the checkpoint
    directory ``root``, for readers: it creates nothing."""
    store = LocalDirectoryStore(root, spares=False)  # no I/O until asked
    return lambda session_id: store.holder(session_id) is not None  # only with an owner file


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
        data: Blob,
        *,
        meta: dict[str, Any] | None = None,
        durable: bool = True,
        recoverable: bool = False,
    ) -> str:
        validate_blob_name(name)
        with self._mutex:
            self._counter += 1
            token = f"m{self._counter}"
            whole = b"".join(data) if isinstance(data, list) else bytes(data)
            self._blobs[name] = (whole, time.time(), token, meta)
        return token

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

    def holder(self, key: str) -> str | None:
        validate_blob_name(key)
        with self._mutex:
            info = self._locks.get(key)
        return None if info is None else _describe_holder(info)


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


def _spare_boot(boot: str | None) -> str | None:
    """A boot id as spare names carry it: 16 hex digits."""
    boot = (boot or "").replace("-", "")
    return boot[:16] if re.fullmatch(r"[0-9a-f]{16,}", boot) else None


_BOOT_ID = _spare_boot(boot_id())
"""This boot of the machine: a put interrupted in an earlier boot (a power loss) is recovered,
one interrupted in this boot (a killed process, whose page cache survived) is discarded."""

SPARE_DIR = ".spare"
_SPARE_RE = re.compile(r"(?P<boot>[0-9a-f]{16})-(?P<pid>[0-9]{1,10})-[0-9a-f]{8}")
"""A spare's name. Spares are created under another name (``.new-*``) and renamed to this
only once locked, so a recovery never mistakes a spare being born for an orphan."""
_SPARE_LOW = 8
_SPARE_HIGH = 24
_SPARE_GRAIN = 16 << 10
_SPARE_FILL_MAX = 1 << 20
"""A durable pool pre-writes each spare with zeros: 1.25 times the largest put it has served,
in whole grains, and never more than this."""
_TOP_UP = 4
"""Spares topped up per round when the puts grow (the others stay ready meanwhile)."""
_PROBE_GRACE = 0.05
"""Seconds a writer lock attempt lasts at least (see :meth:`LocalDirectoryStore.lock`)."""
_UNTRIMMED_MAX = 32
"""Puts whose padding is still to be cut (see :meth:`LocalDirectoryStore.finish`): past this
many, a put cuts the oldest itself, so a caller that never finishes holds few descriptors."""


def _flock_nb(fd: int, *, shared: bool = False) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _private_dir(path: str) -> bool:
    """Whether ``path`` is a real directory (not a symlink) of this user."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


Spare = tuple[str, int, int]
"""A ready spare: (path, open descriptor holding its lock, bytes of zeros written to it)."""


class _SparePool:
    """Files created ahead of time in ``<root>/.spare/``, so that a put creates no inode on
    its critical path, and (when durable) allocates no block either.

    A durable put into a *new* file costs two filesystem-journal commits (the file's sync,
    then the directory's), and creating a file can cost more than that on some virtual disks.
    A spare was created, and its directory synced, in the background; a durable pool also
    writes it full of zeros and syncs them, as databases pre-write their log segments. A put
    then overwrites blocks that are already on disk: its fdatasync writes data and commits no
    metadata at all, and the put renames the spare into place without syncing the rename (see
    :meth:`LocalDirectoryStore.put`). A put larger than the spare extends it, for one commit.
    One pool serves every store of one directory in a process; a background thread keeps
    ``_SPARE_LOW`` to ``_SPARE_HIGH`` spares ready.

    Each spare is held open with an exclusive ``flock``, taken before the spare gets its
    name: the lock tells other processes the spare is in use and dies with its owner, so a
    named spare whose lock is free is an orphan. Names are ``<boot id>-<pid>-<random>``: the
    boot id tells a recovery whether the owner died alone (the page cache survived) or with
    the machine.
    """

    def __init__(self, directory: str, *, durable: bool) -> None:
        self.directory = directory
        self.durable = durable
        self._ready: deque[Spare] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._pid = os.getpid()
        self._failed_at = -1e9
        self._fill_bytes = 0
        self._busy = False
        self._released = 0
        self._pause = 1.0
        self._failed_before = False

    def take(self, nbytes: int) -> Spare | None:
        """A spare for ``nbytes`` (path, open fd holding its lock, bytes pre-written), or None
        when none is ready."""
        with self._cond:
            if self._closed or os.getpid() != self._pid:
                return None
            grew = False
            if self.durable and nbytes > self._fill_bytes * 4 // 5 < _SPARE_FILL_MAX * 4 // 5:
                grains = -(-(nbytes + nbytes // 4) // _SPARE_GRAIN)
                self._fill_bytes = min(_SPARE_FILL_MAX, grains * _SPARE_GRAIN)
                grew = bool(self._ready)  # those ready are topped up to the new size
            spare = self._ready.popleft() if self._ready else None
            if len(self._ready) < _SPARE_LOW or grew:
                self._busy = True
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name=f"prowzi-spares:{self.directory}", daemon=True
                    )
                    self._thread.start()
                self._cond.notify()
            return spare

    def owns(self, name: str) -> bool:
        with self._cond:
            return any(os.path.basename(path) == name for path, _, _ in self._ready)

    @property
    def closed(self) -> bool:
        return self._closed

    def _run(self) -> None:
        try:
            self._fill()
        except Exception:  # never leave a store believing spares will come
            log.exception("the spare-file thread for %s stopped", self.directory)
            self.close()
        finally:
            with self._cond:
                self._idle()

    def _fill(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        self._idle()
                        return
                    fill = self._fill_bytes
                    # Topped up a few at a time, the last to be used first: the others stay
                    # ready meanwhile (a put into a small spare only extends it).
                    small = [spare for spare in reversed(self._ready) if spare[2] < fill]
                    small = small[:_TOP_UP]
                    backoff = self._failed_at + self._pause - time.monotonic()
                    needed = len(self._ready) < _SPARE_LOW or bool(small)
                    if needed and backoff <= 0:
                        break
                    self._idle()
                    self._cond.wait(backoff if needed else None)
                self._busy = True
                released = self._released
                for spare in small:
                    self._ready.remove(spare)
                wanted = _SPARE_HIGH - len(self._ready) - len(small)
                kept = sum(spare[2] for spare in self._ready) + sum(spare[2] for spare in small)
            made: list[Spare] = []
            created = 0
            failure: OSError | None = None
            try:
                if not self._ensure_directory():
                    raise OSError(errno.ENOTDIR, f"{self.directory} is not a private directory")
                # Zeros take at most an eighth of the free space (theirs included): on a
                # filling disk the spares never crowd out the writes they are meant to speed up.
                room = (_free_bytes(self.directory) + kept) // 8 - kept if fill else 0
                zeros = memoryview(bytes(fill))
                while small:  # the puts grew: more zeros for the spares that were ready
                    path, fd, held = small[0]
                    if fill - held > room:
                        break
                    _write_all(fd, zeros[: fill - held], fill - held, held)
                    room -= fill - held
                    made.append((path, fd, fill))
                    del small[0]
                if fill:
                    wanted = min(wanted, room // fill)
                for _ in range(wanted):
                    if self._closed:
                        break
                    made.append(self._create(zeros))
                    created += 1
                if fill and not made:
                    raise OSError(errno.ENOSPC, "too little free space to prepare spares")
            except OSError as exc:
                failure = exc  # no room (those made are kept, their space reserved), or no use
            written = list(made)
            made.extend(small)  # as they were: what a failed write added is not counted
            try:
                if self.durable:
                    for _, fd, _ in written:
                        os.fdatasync(fd)  # the zeros' blocks, and the files' sizes
                    if created:
                        _fsync_dir(self.directory)
            except OSError as exc:
                failure = exc
                for path, fd, _ in made:
                    _drop(path, fd)
                made = []
            if failure is not None:
                # Puts create their own files meanwhile; tried again after a pause that
                # doubles, up to half a minute, while the failures last.
                log.debug("could not prepare spare files in %s: %s", self.directory, failure)
                self._failed_at = time.monotonic()
                self._pause = min(self._pause * 2, 30.0) if self._failed_before else 1.0
                self._failed_before = True
            else:
                self._failed_before = False
            with self._cond:
                if self._closed or released != self._released:
                    for path, fd, _ in made:  # the disk filled up meanwhile: room first
                        _drop(path, fd)
                    made = []
                if self._closed:
                    self._idle()
                    return
                self._ready.extend(made)

    def _idle(self) -> None:
        self._busy = False
        self._cond.notify_all()

    def release(self) -> bool:
        """Remove the spares (the disk is full: their zeros' room is needed now), those being
        topped up too, and prepare none for a while; whether there were any."""
        with self._cond:
            self._released += 1
            self._failed_at = time.monotonic()
            busy = self._busy
            deadline = time.monotonic() + 2.0
            while self._busy and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)  # the batch under way drops what it made
            spares, self._ready = list(self._ready), deque()
        for path, fd, _ in spares:
            _drop(path, fd)
        return bool(spares) or busy

    def wait_idle(self, timeout: float) -> int:
        """Wait (at most ``timeout`` seconds) until no spares are being prepared; the number
        ready."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return len(self._ready)

    def _ensure_directory(self) -> bool:
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.directory, 0o700)
            if self.durable:
                _fsync_dir(os.path.dirname(self.directory))
        return _private_dir(self.directory)

    def _create(self, zeros: memoryview) -> Spare:
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        birth = os.path.join(self.directory, f".new-{token}")
        fd = os.open(
            birth, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        path = os.path.join(self.directory, f"{_BOOT_ID}-{token}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # before it has a spare's name
            os.rename(birth, path)
        except BaseException:
            _drop(birth, fd)
            raise
        try:
            if zeros:
                _write_all(fd, zeros, len(zeros), 0)
        except BaseException:
            _drop(path, fd)
            raise
        return path, fd, len(zeros)

    def close(self) -> None:
        """Stop filling, and remove the spares not handed out. Returns once the filling
        thread is done too, so no spare of this pool stays open or on disk."""
        with self._cond:
            self._closed = True
            spares, self._ready = list(self._ready), deque()
            thread = self._thread
            self._cond.notify_all()
        if os.getpid() != self._pid:
            return
        for path, fd, _ in spares:
            _drop(path, fd)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)  # it drops what it was still creating

    def forget(self) -> None:
        """In a forked child: the spares (and their locks) belong to the parent."""
        self._closed = True
        for _, fd, _ in self._ready:
            with contextlib.suppress(OSError):
                os.close(fd)  # the parent's descriptor keeps the lock
        self._ready = deque()
        self._thread = None
        self._cond = threading.Condition()
        self._busy = False


def _write_all(fd: int, data: Blob, size: int, offset: int | None = None) -> None:
    """Write all ``size`` bytes of ``data`` (the file's offset, or at ``offset``)."""
    if isinstance(data, list):
        if offset is None:
            written = os.writev(fd, data)
        else:
            written = os.pwritev(fd, data, offset)
            offset += written
        if written == size:
            return
        data = b"".join(data)[written:]  # a short write: the rest, the plain way
    view = memoryview(data).cast("B")  # counted in bytes, whatever the view's items
    while view:
        if offset is None:
            written = os.write(fd, view)
        else:
            written = os.pwrite(fd, view, offset)
            offset += written
        view = view[written:]


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


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


_POOLS: dict[tuple[str, bool], _SparePool] = {}
_POOLS_LOCK = threading.Lock()


def _pool_for(directory: str, durable: bool) -> _SparePool:
    """The process's pool for a directory (shared by every store of that directory)."""
    key = (os.path.realpath(directory), durable)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None or pool.closed:
            pool = _POOLS[key] = _SparePool(directory, durable=durable)
        return pool


def _close_pools() -> None:
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()


def _forget_pools() -> None:
    for pool in list(_POOLS.values()):
        pool.forget()
    _POOLS.clear()


_STORES: weakref.WeakSet[LocalDirectoryStore] = weakref.WeakSet()


def _forget_in_child() -> None:
    """In a forked child: the spare pools, and the padding still to cut, are the parent's."""
    _forget_pools()
    for store in list(_STORES):
        store._forget_untrimmed()


atexit.register(_close_pools)
os.register_at_fork(after_in_child=_forget_in_child)


def _token(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


class LocalDirectoryStore(CheckpointStore):
    """One file per blob in ``root``; the files are the source of truth.

    Writes, when a spare file is ready (see :class:`_SparePool`): the blob goes into a spare
    in ``root/.spare/`` that was created, written full of zeros (when durable) and synced
    ahead of time; fdatasync when durable; then ``os.rename`` into ``root``. The zeros after
    the blob stay until :meth:`finish` cuts them (or the store closes). For a ``recoverable``
    durable put the rename's own sync is deferred: the filesystem commits it with its next
    journal commit (the periodic one, seconds at most; :meth:`settle`; any put that creates
    or extends a file; any other fsync of metadata), and until then the data is durable
    under the spare's name, where :meth:`recover` finds it after a power loss (several puts
    may be waiting so, and a recovery judges them oldest first). A put
    that returned thus survives a power loss either way, with no metadata to commit when the
    blob fits in the spare's zeros (one journal commit when it extends the spare, two for a
    new file). :meth:`settle` syncs the names before deletions.
    ``spares=False`` turns spares off.

    Otherwise (and for durable puts that are not recoverable): a temporary file in ``root``,
    written in full, fdatasync, ``os.replace``,
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
        self._index_path = os.fspath(self._index_dir)
        self._manifest_path = os.fspath(self._manifest)
        self._index_lock_path = os.path.join(self._index_path, "lock")
        self._mutex = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._stamp: tuple[int, int] | None = None
        self._manifest_ino: int | None = None
        self._offset = 0
        self._manifest_broken = False
        self._generation = 0
        self._compact_at = _COMPACT_MIN
        self._loaded = False  # whether _entries reflects the directory (as of some listing)
        self._untrimmed: dict[str, tuple[int, int, str, int]] = {}
        """Blob name -> (descriptor, blob size, token, pid) of puts whose padding is uncut."""
        self._cut: dict[str, tuple[str, str]] = {}
        """Blob name -> (token after its put, token after the cut) of recent cuts."""
        _STORES.add(self)
        self._spare_dir = os.path.join(self._dir, SPARE_DIR)
        self._pool = _pool_for(self._spare_dir, fsync) if _BOOT_ID and spares else None

    # blobs

    def _path(self, name: str) -> str:
        return self._dir + validate_blob_name(name)

    def _ensure_dirs(self) -> None:
        if os.path.isdir(self._index_path):
            return
        try:  # one look (two could straddle another thread's mkdir)
            created_root = not stat.S_ISDIR(os.stat(self.root).st_mode)
        except FileNotFoundError:
            created_root = True
        else:
            if created_root:
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self.root))
        if created_root:
            # private: the index and the checkpoints hold prompts and results
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._index_dir.mkdir(exist_ok=True, mode=0o700)
        if created_root and self.fsync:
            # A new checkpoint directory must itself survive a power loss.
            _fsync_dir(os.fspath(self.root.resolve().parent))

    def put(
        self,
        name: str,
        data: Blob,
        *,
        meta: dict[str, Any] | None = None,
        durable: bool = True,
        recoverable: bool = False,
    ) -> str:
        final = self._path(name)
        derived = not durable and not recoverable
        durable = durable and self.fsync
        st = None
        size = sum(map(len, data)) if isinstance(data, list) else memoryview(data).nbytes
        if not derived:
            # Only these create the directory. Derived data goes beside its source, into a
            # directory that exists: it never brings back one removed meanwhile.
            self._ensure_dirs()  # first: the spare pool's directory goes inside
        if self._pool is not None and recoverable:
            if self._pool.closed:
                self._pool = _pool_for(self._spare_dir, self.fsync)
            spare = self._pool.take(size)  # from inside the directory: it exists
            if spare is not None:
                st = self._put_spare(name, spare, final, data, size, durable)
        if st is None:
            try:
                st = self._put_new(name, final, data, size, durable)
            except OSError as exc:
                if (
                    exc.errno != errno.ENOSPC
                    or not recoverable
                    or self._pool is None
                    or not self._pool.release()
                ):
                    raise  # derived data never takes the room kept for checkpoints
                # The room the spares kept is this put's now (and the pool stops refilling
                # until it has some to spare again).
                st = self._put_new(name, final, data, size, durable)
        token = _token(st)
        with self._mutex:
            self._entries[name] = (token, st.st_size, st.st_mtime_ns, meta)
            self._generation += 1
            if meta is not None:  # without meta, a rescan learns as much as the log would
                self._append(
                    [{"n": name, "t": token, "s": st.st_size, "mt": st.st_mtime_ns, "m": meta}]
                )
        return token

    def _put_spare(
        self, name: str, spare: Spare, final: str, data: Blob, size: int, durable: bool
    ) -> os.stat_result | None:
        """Fill a spare, fdatasync it, rename it into place; None when the spare could not
        be used (the caller then writes a new file, which fails for real if it must).

        The rename is not synced (see the class docstring): the spare's name is already on
        disk, so the fdatasync alone makes the data durable there. Metadata commits in
        order, so the next journal commit (periodic, :meth:`settle`, or any sync that has
        metadata to commit; not another put into a spare that fits) makes the rename durable.
        Zeros the blob did not overwrite stay after it until :meth:`finish` cuts them."""
        path, fd, _ = spare
        try:
            _write_all(fd, data, size)
            if durable:
                os.fdatasync(fd)
            st = os.fstat(fd)
            os.rename(path, final)
        except BaseException as exc:
            # Emptied first: a spare that might come back after a power loss holds nothing.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            _drop(path, fd)
            if not isinstance(exc, OSError):
                raise
            log.debug("could not use spare %s: %s", path, exc)
            return None
        if st.st_size <= size:
            os.close(fd)
            return st
        with self._mutex:
            earlier = self._untrimmed.pop(name, None)
            self._untrimmed[name] = (fd, size, _token(st), os.getpid())
            oldest = None
            if len(self._untrimmed) > _UNTRIMMED_MAX:
                first = next(iter(self._untrimmed))
                oldest = (first, self._untrimmed[first][2])
        if earlier is not None:
            os.close(earlier[0])  # that file was just replaced: nobody reads its padding
        if oldest is not None:
            self._finish(*oldest, early=True)
        return st

    def finish(self, name: str, token: str) -> str:
        """Cut the zeros a put into a spare left after the blob (readers must tolerate them
        until then, and after a crash for good), and return the blob's token afterwards.
        Not synced: the cut is metadata, which the filesystem commits after the rename."""
        return self._finish(name, token, early=False)

    def _finish(self, name: str, token: str, *, early: bool) -> str:
        """:meth:`finish`; ``early`` when the store cuts before the put's caller asks (too
        many pending, or close): the caller's finish then gets the token the cut gave.
        Under the mutex: a second finish of the blob waits for the first's answer."""
        with self._mutex:
            pending = self._untrimmed.get(name)
            if pending is None or pending[2] != token:
                done = self._cut.get(name)  # cut already
                if done is not None and done[0] == token:
                    del self._cut[name]
                    return done[1]
                return token
            del self._untrimmed[name]
            fd, size, _, pid = pending
            try:
                if pid != os.getpid():
                    return token  # a forked child: the parent cuts its own files
                os.ftruncate(fd, size)
                st = os.fstat(fd)
            except OSError as exc:
                log.debug("could not cut the padding of %s: %s", name, exc)
                return token
            finally:
                os.close(fd)
            cut = _token(st)
            known = self._entries.get(name)
            if known is not None and known[0] == token:
                self._entries[name] = (cut, st.st_size, st.st_mtime_ns, known[3])
                self._generation += 1
            if early:
                if len(self._cut) >= 4 * _UNTRIMMED_MAX:  # for callers that never finish
                    self._cut.pop(next(iter(self._cut)))
                self._cut[name] = (token, cut)
            return cut

    def _put_new(
        self, name: str, final: str, data: Blob, size: int, durable: bool
    ) -> os.stat_result:
        tmp = f"{self._dir}{TEMP_PREFIX}{name}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data, size)
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
            _fsync_dir(self._dir)
        return st

    def _forget_untrimmed(self) -> None:
        self._mutex = threading.RLock()  # a parent's thread may have held it at the fork
        for fd, *_ in self._untrimmed.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._untrimmed.clear()
        self._cut.clear()

    def spares_ready(self, timeout: float = 10.0) -> int:
        """How many spare files are ready, once none is being prepared (waiting at most
        ``timeout`` seconds for that)."""
        return 0 if self._pool is None else self._pool.wait_idle(timeout)

    def close(self) -> None:
        """Cut the padding still pending; remove the spares this process prepared for the
        directory and close them (for every store of the directory in this process; the
        next put prepares new ones)."""
        with self._mutex:
            pending = [(name, entry[2]) for name, entry in self._untrimmed.items()]
        for name, token in pending:
            self._finish(name, token, early=True)
        if self._pool is not None:
            self._pool.close()

    def settle(self) -> None:
        if not self.fsync:
            return
        with contextlib.suppress(FileNotFoundError):
            _fsync_dir(self._spare_dir)
        with contextlib.suppress(FileNotFoundError):
            _fsync_dir(self._dir)

    def recover(self, judge: Judge, order: Callable[[bytes], float] | None = None) -> list[str]:
        """Publish the puts a power loss interrupted; remove the spares of dead processes.

        A spare is looked at only when its lock is free (its owner is gone), it is a regular
        file of ours, and its name is one this store makes. Empty, or all zeros: an unused
        spare, removed. Written in this boot: its writer was killed before the put returned
        (the page cache survived, so nothing published was lost), removed. Written in an
        earlier boot: the put's data may be durable only here, so ``judge`` decides: publish
        it under a name (then synced), discard it, or keep it. Several puts can await their
        rename's commit at once; ``order`` (a key of the bytes) says which to judge first.
        """
        published: list[str] = []
        if not _private_dir(self._spare_dir):
            return published  # none, or planted (a symlink elsewhere): not ours to touch
        try:
            entries = list(os.scandir(self._spare_dir))
        except (FileNotFoundError, NotADirectoryError):
            return published
        found: list[tuple[str, int, int, float]] = []  # (path, fd, size, order): held open,
        # so its lock stays ours
        try:
            for entry in entries:
                match = _SPARE_RE.fullmatch(entry.name)
                if match is None or (self._pool is not None and self._pool.owns(entry.name)):
                    continue
                try:
                    fd = os.open(entry.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                        os.close(fd)
                        continue
                    if not _flock_nb(fd):
                        os.close(fd)
                        continue  # its owner is alive
                    data = b""
                    if match["boot"] != _BOOT_ID and st.st_size <= _RECOVER_MAX:
                        data = os.pread(fd, st.st_size, 0)
                    if match["boot"] == _BOOT_ID or data.count(0) == st.st_size:
                        os.unlink(entry.path)
                        os.close(fd)
                        continue
                except OSError as exc:
                    log.warning("could not recover %s: %s", entry.path, exc)
                    os.close(fd)
                    continue
                key = order(data) if order is not None else 0.0
                found.append((entry.path, fd, st.st_size, key))  # read again when judged
            found.sort(key=lambda item: item[3])
            for path, fd, size, _ in found:

                def publish(name: str, path: str = path) -> None:
                    os.rename(path, self._path(name))
                    self.settle()
                    self._forget_view()
                    published.append(name)

                try:
                    data = b"" if size > _RECOVER_MAX else os.pread(fd, size, 0)
                    if judge(data, publish) == "discard":
                        os.unlink(path)
                except OSError as exc:
                    log.warning("could not recover %s: %s", path, exc)
        finally:
            for _, fd, _, _ in found:
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
        except (FileNotFoundError, NotADirectoryError):  # no blob there (not even a directory)
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
            pending = self._untrimmed.pop(name, None)
            if pending is not None:
                os.close(pending[0])
            self._cut.pop(name, None)
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
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self._index_path, 0o700)  # never the store's own directory
                fd = os.open(self._index_lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
                    self._manifest_path,
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                    0o600,
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

    def _holder_soon(self, owner: Path, wait: float = 0.5) -> dict[str, Any] | None:
        """The holder's description, allowing a holder that has just taken the lock the
        moment it needs to write it."""
        deadline = time.monotonic() + wait
        while (info := self._holder(owner)) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return info

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
        self._lock_dir.mkdir(exist_ok=True)
        # thread_local=False and a fresh object per call: a second holder in this very
        # process is refused too (flock conflicts across open file descriptions).
        lock = filelock.FileLock(lock_path, thread_local=False, preserve_lock_file=True)
        try:
            # A reader's probe (is_locked) holds a shared lock for an instant: a writer that
            # would not wait still tries for _PROBE_GRACE before it calls the lock taken.
            lock.acquire(timeout=max(timeout, _PROBE_GRACE), poll_interval=0.005)
        except filelock.Timeout:
            raise SessionLockedError(
                f"session {key} is locked by {_describe_holder(self._holder_soon(owner))}"
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

    def holder(self, key: str) -> str | None:
        # A holder writes its owner file as soon as it has the lock: without one there is
        # nothing to probe (a probe holds the lock for an instant).
        _, owner = self._lock_paths(key)
        info = self._holder(owner)
        try:
            if info is None or not self.is_locked(key):
                return None
        except OSError:
            return None  # a lock that cannot be probed (a read-only store) holds nothing
        return _describe_holder(info)

    def is_locked(self, key: str) -> bool:
        lock_path, _ = self._lock_paths(key)
        if not lock_path.exists():
            return False
        # A shared probe on a read-only descriptor: it conflicts with the holder's exclusive
        # lock, and works on a read-only store and over NFS (where an exclusive flock needs
        # a descriptor open for writing).
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return not _flock_nb(fd, shared=True)  # closing it releases a lock we got
        finally:
            os.close(fd)

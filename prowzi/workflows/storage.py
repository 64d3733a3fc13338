"""Checkpoint stores: atomic put/get/list/delete of named blobs, plus per-key writer locks.

:class:`CheckpointManager` owns the checkpoint *format*; a store only keeps bytes. Two stores
ship: :class:`LocalDirectoryStore` (the default, one file per blob) and :class:`InMemoryStore`
(for tests). Both pass the same conformance suite (``tests/test_checkpoint_storage.py``); an
object store (S3, Azure Blob) would implement the same interface.

:class:`LocalDirectoryStore` makes a durable put with one sync: a per-process write-ahead
journal (``.journal/``) receives the complete blob and is fdatasynced once, and the blob's
file, renamed into place without a sync of its own, is the journal's materialised view,
restored from verified journal records after an OS crash (see its docstring).

A store may remember a small ``meta`` dict per blob (as object stores keep user metadata), so
listing does not have to read every blob. Meta is only a cache: when the store cannot vouch for
it (a file changed behind its back) it reports ``meta=None`` and the caller reads the blob and
hands the result back with :meth:`CheckpointStore.remember`.
"""

from __future__ import annotations

import builtins
import collections
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
import struct
import threading
import time
import weakref
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
_SNAPSHOT_HEAD = re.compile(rb'\{"snapshot":(\d+),"stamp":\[(\d+),(\d+)\]')
"""The start of a manifest snapshot line: its stamp can be read without parsing the rest."""
_COMPACT_MIN = 1 << 20
"""The index log is compacted once it exceeds this and twice its last snapshot."""
_TEMPORARY_MAX_AGE = 3600.0
"""Seconds after which a temporary file is certainly abandoned and may be removed."""


Verifier = Callable[[str, bytes], float | None]
"""``(name, data) -> ordering key`` of content that verifies, or None (see
:meth:`CheckpointStore.attach_verifier`)."""


def validate_blob_name(name: object) -> str:
    """A blob name is one path component: no separators, no ``..``, no NUL, at most 255."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidIdentifierError(f"invalid blob name {name!r}")
    return name


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
        self, name: str, data: bytes, *, meta: dict[str, Any] | None = None, durable: bool = True
    ) -> None:
        """Replace ``name`` atomically: readers see the old bytes or the new, never a mix.

        ``durable`` asks that the new bytes survive a power loss once ``put`` returns.
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

    def attach_verifier(
        self, verify: Verifier, lock_key: Callable[[str], str | None] | None = None
    ) -> None:
        """Tell a store that keeps a write-ahead journal how to judge a blob's content.

        ``verify(name, data)`` returns an ordering key (newer content, larger key) for content
        that verifies, None otherwise; ``lock_key(name)`` names the writer lock that guards
        the blob. A journal record is only ever restored over a file when it verifies and the
        file does not hold content that verifies and is at least as new."""
        return None

    def index_identity(self, *, cold: bool = False) -> tuple[int, ...] | None:
        """Names the exact, fresh index a listing is built from, so that a cache derived from
        a listing (the manager's sorted rows) can be reused by another process: equal
        identities mean the same index and no change to the blobs since (as far as a listing
        can tell). ``cold`` computes it from storage without loading the index (what a new
        process does); otherwise it describes this object's loaded view, and is None unless
        that view is exactly what storage holds. None: cannot vouch."""
        return None

    def read_aux(self, name: str) -> bytes | None:
        """A small auxiliary file kept beside the index (a cache), or None."""
        return None

    def write_aux(self, name: str, data: bytes) -> None:
        """Replace an auxiliary file atomically (not durably: it is a cache)."""
        return None

    def sync(self) -> None:
        """Make every completed ``put`` durable in the blobs themselves (a journal, if the store
        keeps one, is then emptied)."""
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
        self, name: str, data: bytes, *, meta: dict[str, Any] | None = None, durable: bool = True
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


# --- write-ahead journal --------------------------------------------------------------------

JOURNAL_DIR = ".journal"
_JOURNAL_MAGIC = b"\x89PZWAL1\n"
_JOURNAL_HEADER = struct.Struct(">8s16s8sI")
"""magic | boot id | salt | crc32 of the fields before."""
_RECORD = struct.Struct(">4s8sQHI")
"""record magic | the journal's current salt | wall clock (ns) | name length | data length;
then the name, the data, and a crc32 of the whole record before it."""
_RECORD_MAGIC = b"PZJR"
_CRC = struct.Struct(">I")
_JOURNAL_INITIAL = 1 << 20
"""Bytes of zeros a new journal is created with (see :class:`_Journal`)."""
_JOURNAL_MAX = 16 << 20
"""A journal grows (by doubling) up to this, then is checkpointed and reused from the start."""


def _boot_id() -> bytes | None:
    """This boot's id (Linux): a journal written in this boot has not lived through a crash."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as fh:
            text = fh.read(64).strip().decode("ascii")
        return bytes.fromhex(text.replace("-", ""))[:16].ljust(16, b"\0")
    except (OSError, ValueError):
        return None


_BOOT_ID = _boot_id()


def _write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        if offset is None:
            written = os.write(fd, view)
        else:
            written = os.pwrite(fd, view, offset)
            offset += written
        view = view[written:]


def _fsync_path(path: str, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class JournalRecord:
    name: str
    data: bytes
    written_ns: int
    """Wall clock at the append: orders the records of several journals of one boot."""


def read_journal(data: bytes) -> tuple[bytes, list[JournalRecord]] | None:
    """(boot id, records) of a journal's bytes; None when its header is not intact.

    Records are read up to the first that is torn, of another salt (left from before the
    journal was last reused) or otherwise not intact: that is the journal's end."""
    if len(data) < _JOURNAL_HEADER.size:
        return None
    magic, boot, salt, crc = _JOURNAL_HEADER.unpack_from(data)
    if magic != _JOURNAL_MAGIC or zlib.crc32(data[: _JOURNAL_HEADER.size - 4]) != crc:
        return None
    records: list[JournalRecord] = []
    offset = _JOURNAL_HEADER.size
    view = memoryview(data)
    while offset + _RECORD.size <= len(data):
        magic, record_salt, written_ns, name_length, length = _RECORD.unpack_from(data, offset)
        end = offset + _RECORD.size + name_length + length
        if magic != _RECORD_MAGIC or record_salt != salt or end + _CRC.size > len(data):
            break
        (crc,) = _CRC.unpack_from(data, end)
        if zlib.crc32(view[offset:end]) != crc:
            break
        start = offset + _RECORD.size
        try:
            name = validate_blob_name(bytes(view[start : start + name_length]).decode())
        except (UnicodeDecodeError, InvalidIdentifierError):
            break
        records.append(JournalRecord(name, bytes(view[start + name_length : end]), written_ns))
        offset = end + _CRC.size
    return boot, records


class _Journal:
    """One process's write-ahead journal of durable puts into one directory.

    A file ``.journal/<pid>-<random>.wal``, created with ``_JOURNAL_INITIAL`` bytes of zeros
    (written, not just reserved, and fsynced once) so that appending a record overwrites
    blocks that already exist: the record's fdatasync then flushes data only, with no
    filesystem-journal commit for a new size or new blocks (as SQLite reuses its WAL). Each
    record is self-delimiting and carries the journal's salt and a crc32, so a torn tail, or a
    record left from before the journal was reused (another salt), ends the journal.

    The owner holds an exclusive ``flock`` on the file for its lifetime: a journal whose lock
    can be taken belongs to a process that has exited. Only the owning process (and thread,
    under the store's mutex) writes it; a forked child opens its own.
    """

    def __init__(self, root: str, boot: bytes) -> None:
        self.root = root
        self.boot = boot
        self.pid = os.getpid()
        directory = os.path.join(root, JOURNAL_DIR)
        created = False
        try:
            os.mkdir(directory, 0o700)
            created = True
        except FileExistsError:
            pass
        stem = f"{self.pid}-{secrets.token_hex(4)}"
        self.path = os.path.join(directory, f"{stem}.wal")
        # Built under another name and renamed once locked and complete: recovery only looks
        # at ``*.wal`` files, and must never take one being created for abandoned.
        tmp = os.path.join(directory, f"{TEMP_PREFIX}{stem}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.salt = secrets.token_bytes(8)
            _write_all(fd, self._header() + bytes(_JOURNAL_INITIAL - _JOURNAL_HEADER.size), 0)
            os.fsync(fd)
            os.replace(tmp, self.path)
            _fsync_path(directory, directory=True)
            if created:
                _fsync_path(root, directory=True)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.fd = fd
        self.size = _JOURNAL_INITIAL
        self.offset = _JOURNAL_HEADER.size
        self.names: set[str] = set()
        """Blobs put through the journal since it was last checkpointed."""
        self._finalizer = weakref.finalize(self, os.close, fd)

    def _header(self) -> bytes:
        fields = _JOURNAL_HEADER.pack(_JOURNAL_MAGIC, self.boot, self.salt, 0)[:-4]
        return fields + _CRC.pack(zlib.crc32(fields))

    def fits(self, name: str, data: bytes) -> bool:
        return _JOURNAL_HEADER.size + _RECORD.size + len(name) + len(data) + 4 <= _JOURNAL_MAX

    def append(self, name: str, data: bytes) -> None:
        """Write one record and fdatasync it: once this returns, the put is durable."""
        encoded = name.encode()
        needed = _RECORD.size + len(encoded) + len(data) + _CRC.size
        if self.offset + needed > self.size:
            self._make_room(needed)  # may checkpoint, which changes the salt
        fixed = _RECORD.pack(_RECORD_MAGIC, self.salt, time.time_ns(), len(encoded), len(data))
        crc = zlib.crc32(data, zlib.crc32(encoded, zlib.crc32(fixed)))
        _write_all(self.fd, b"".join((fixed, encoded, data, _CRC.pack(crc))), self.offset)
        os.fdatasync(self.fd)
        self.offset += needed
        self.names.add(name)

    def _make_room(self, needed: int) -> None:
        """Grow the journal (doubling, up to ``_JOURNAL_MAX``) or, once it is that large,
        checkpoint it and start again from the beginning."""
        if self.offset + needed > _JOURNAL_MAX:
            self.checkpoint()
        size = self.size
        while self.offset + needed > size:
            size = min(2 * size, _JOURNAL_MAX)
        if size > self.size:
            _write_all(self.fd, bytes(size - self.size), self.size)
            os.fsync(self.fd)
            self.size = size

    def checkpoint(self) -> None:
        """Make the blobs written through the journal durable in their files, then reuse it."""
        if self.offset == _JOURNAL_HEADER.size:
            return
        for name in sorted(self.names):
            with contextlib.suppress(FileNotFoundError):
                _fsync_path(os.path.join(self.root, name))
        _fsync_path(self.root, directory=True)
        # A new salt voids every record written so far, in one small write.
        self.salt = secrets.token_bytes(8)
        _write_all(self.fd, self._header(), 0)
        os.fdatasync(self.fd)
        self.offset = _JOURNAL_HEADER.size
        self.names.clear()

    def close(self) -> None:
        self._finalizer()


# --- spare files ----------------------------------------------------------------------------

SPARES_DIR = ".spares"
_SPARES = 4
"""Empty files kept ready per writing store (a save takes two: checkpoint and sidecar)."""


class _Spares:
    """Empty files created ahead of need, by a background thread, in ``root/.spares/``.

    Creating a file allocates an inode, which on a busy filesystem can cost ten times a
    rename (it may wait on metadata I/O and on the filesystem journal). A put renames a spare
    to its temporary name instead (same filesystem, so it is a rename of an empty file), and
    the thread makes another. A spare is only used if it is still an empty regular file with
    one link; anything else is discarded and the put creates its temporary as before. Spares
    are hidden (never listed); those of a process that died are removed by the next
    recovery once an hour old, and a store removes its own when it is collected or at exit.
    """

    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, SPARES_DIR)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.pid = os.getpid()
        self.ready: collections.deque[str] = collections.deque()
        self.wanted = threading.Event()
        self.closed = False
        self.thread = threading.Thread(
            target=self._run, name="prowzi-checkpoint-spares", daemon=True
        )
        self.thread.start()

    def take(self) -> str | None:
        try:
            path = self.ready.popleft()
        except IndexError:
            path = None
        self.wanted.set()
        return path

    def _run(self) -> None:
        prefix = os.path.join(self.dir, f"{self.pid}-")
        while not self.closed:
            while len(self.ready) < _SPARES and not self.closed:
                path = f"{prefix}{secrets.token_hex(6)}"
                try:
                    os.close(
                        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    )
                except OSError:
                    self.closed = True  # a full disk, a removed directory: puts create files
                    return
                self.ready.append(path)
            self.wanted.wait()
            self.wanted.clear()

    def close(self) -> None:
        self.closed = True
        if os.getpid() != self.pid:
            return  # a forked child: the thread (and its lock's state) is the parent's
        self.wanted.set()
        while self.ready:
            with contextlib.suppress(OSError):
                os.unlink(self.ready.popleft())


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


def _token(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


class LocalDirectoryStore(CheckpointStore):
    """One file per blob in ``root``; the files are the source of truth.

    Durable writes make **one** sync, as SQLite's WAL does: the bytes go to a temporary file
    in the same directory (renamed from a spare, see :class:`_Spares`), then, complete and
    self-delimiting, into this process's write-ahead journal (``root/.journal/``, see
    :class:`_Journal`) with a single fdatasync (from then on the put is durable), then the
    temporary is renamed over the blob. The blob files are the journal's materialised view:
    not synced one by one, but all at once when the journal is checkpointed (it reaches
    ``_JOURNAL_MAX``, a blob written through it is deleted, :meth:`sync`, or its process has
    exited and another store absorbs it); then the journal is reused. After an OS crash
    (detected by the boot id recorded in each journal) the first store to open the directory
    replays the journals of the earlier boot: a blob that is missing, torn, fails the
    manager's verification or holds older content is restored from its newest record that
    verifies; a valid file is never replaced by a record that does not verify or is older
    (see :meth:`CheckpointStore.attach_verifier`). A record whose put failed is voided before
    the failure is reported (the journal is checkpointed), so no replay resurrects it. A
    process killed (SIGKILL) at any instant leaves the old file or the new, and a journal the
    next store absorbs; a torn journal tail ends the journal and is ignored. Writers in
    several processes each have their own journal, so their appends never interleave; the
    writers of one blob are serialised by the session lock as before.

    Without a boot id (not Linux), with a blob too large for a journal, or when a journal
    cannot be created (no space) or fails, a put makes the classic durable write: temporary,
    fdatasync, ``os.replace``, fsync of the directory (and of its parent when the put created
    it). The temporary is removed on failure. ``durable=False`` (or ``fsync=False``) skips the
    journal and the syncs. Hidden names (``.tmp.*``, ``.index``, ``.locks``, ``.journal``,
    ``.spares``) are never listed.

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

    def __init__(self, root: Path | str, *, fsync: bool = True) -> None:
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
        self._journal: _Journal | None = None
        self._journal_failed = False
        self._spares: _Spares | None = None
        self._spares_failed = False
        self._recovered = False
        self._verify: Verifier | None = None
        self._lock_key: Callable[[str], str | None] | None = None

    # blobs

    def _path(self, name: str) -> str:
        return self._dir + validate_blob_name(name)

    def _ensure_dirs(self) -> None:
        if self._index_dir.is_dir():
            return
        created_root = not self.root.is_dir()
        self._index_dir.mkdir(parents=True, exist_ok=True)
        if created_root and self.fsync:
            # A new checkpoint directory must itself survive a power loss.
            self._fsync_dir(os.fspath(self.root.resolve().parent))

    def put(
        self, name: str, data: bytes, *, meta: dict[str, Any] | None = None, durable: bool = True
    ) -> None:
        final = self._path(name)
        self._ensure_dirs()
        self._recover_once()
        durable = durable and self.fsync
        if durable:
            with self._mutex:
                journal = self._journal_for(name, data)
                if journal is not None and self._put_journaled(journal, name, final, data, meta):
                    return
        st = self._materialise(name, final, data, sync=durable)
        if durable:
            self._fsync_dir(self._dir)
        self._record(name, st, meta)

    def _put_journaled(
        self, journal: _Journal, name: str, final: str, data: bytes, meta: dict[str, Any] | None
    ) -> bool:
        """Temporary file written, journal record appended and fdatasynced (the one sync:
        from here the put is durable), rename. The file is the journal's materialised view,
        synced when the journal is checkpointed. False: the journal failed, put directly."""
        tmp, st = self._write_temp(name, data, sync=False)
        try:
            journal.append(name, data)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            log.warning("checkpoint journal in %s failed: %s", self.root, exc)
            self._drop_journal()
            return False
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        try:
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            # Void the record of a put that failed (after syncing the files of the records
            # before it), so that no replay ever resurrects it.
            with contextlib.suppress(OSError):
                journal.checkpoint()
            raise
        self._record(name, st, meta)
        return True

    def _write_temp(self, name: str, data: bytes, *, sync: bool) -> tuple[str, os.stat_result]:
        """A temporary file beside ``name`` holding ``data`` (fdatasynced if ``sync``)."""
        tmp = f"{self._dir}{TEMP_PREFIX}{name}.{secrets.token_hex(4)}"
        try:
            fd = self._open_spare(tmp)
            if fd is None:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
                if sync:
                    os.fdatasync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return tmp, st

    def _open_spare(self, tmp: str) -> int | None:
        """A spare file renamed to ``tmp`` and opened for writing, or None (create one)."""
        spares = self._spares
        if spares is None or spares.pid != os.getpid():
            return None
        spare = spares.take()
        if spare is None:
            return None
        try:
            os.rename(spare, tmp)
        except OSError:
            return None  # swept away meanwhile
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            os.unlink(tmp)
            return None
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size == 0:
            return fd
        os.close(fd)  # not what this store made: never write through it
        os.unlink(tmp)
        return None

    def _start_spares(self) -> None:
        if self._spares_failed or (self._spares is not None and self._spares.pid == os.getpid()):
            return
        try:
            spares = self._spares = _Spares(self._dir)
        except (OSError, RuntimeError) as exc:
            log.debug("no spare files in %s: %s", self.root, exc)
            self._spares_failed = True
            return
        weakref.finalize(self, spares.close)

    def _materialise(self, name: str, final: str, data: bytes, *, sync: bool) -> os.stat_result:
        """Write ``data`` to a temporary, (fdatasync it,) rename it over ``final``."""
        tmp, st = self._write_temp(name, data, sync=sync)
        try:
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return st

    def _record(self, name: str, st: os.stat_result, meta: dict[str, Any] | None) -> None:
        token = _token(st)
        with self._mutex:
            self._entries[name] = (token, st.st_size, st.st_mtime_ns, meta)
            self._generation += 1
            if meta is not None:  # without meta, a rescan learns as much as the log would
                self._append(
                    [{"n": name, "t": token, "s": st.st_size, "mt": st.st_mtime_ns, "m": meta}]
                )

    # journal

    def _journal_for(self, name: str, data: bytes) -> _Journal | None:
        """This process's journal for a durable put of ``data``, or None for a direct one."""
        journal = self._journal
        if journal is not None and journal.pid != os.getpid():
            journal = self._journal = None  # forked: the parent's journal is not ours to write
        if journal is None:
            if self._journal_failed or _BOOT_ID is None:
                return None
            try:
                journal = self._journal = _Journal(self._dir, _BOOT_ID)
                self._start_spares()
            except OSError as exc:
                # No room for it (a nearly full disk), an odd filesystem: sync each put.
                log.debug("no checkpoint journal in %s: %s", self.root, exc)
                self._journal_failed = True
                return None
        if not journal.fits(name, data):
            if name in journal.names:
                journal.checkpoint()  # the direct write must not be undone by an older record
            return None
        return journal

    def _drop_journal(self) -> None:
        journal, self._journal, self._journal_failed = self._journal, None, True
        if journal is not None:
            with contextlib.suppress(OSError):
                journal.checkpoint()
            journal.close()

    def sync(self) -> None:
        with self._mutex:
            if self._journal is not None and self._journal.pid == os.getpid():
                self._journal.checkpoint()

    def attach_verifier(
        self, verify: Verifier, lock_key: Callable[[str], str | None] | None = None
    ) -> None:
        with self._mutex:
            self._verify, self._lock_key = verify, lock_key
            self._recover()

    def _recover_once(self) -> None:
        if not self._recovered:
            with self._mutex:
                if not self._recovered:
                    self._recover()

    def _recover(self) -> None:
        """Absorb the journals of processes that have exited (their lock is free).

        A journal written in this boot has lived through no OS crash: its files are as the
        writer left them (in the page cache), so absorbing it only fsyncs them and the
        directory, then removes it. A journal of an earlier boot (an OS crash or power loss
        came in between) is replayed: for each blob it names, the newest record that verifies
        is restored (temporary, fdatasync, rename, directory fsync) when the file is missing,
        torn, fails verification or holds older content; a valid file is never replaced by a
        record that does not verify or is older. Errors are logged, never raised: the
        journal is kept and the next opener tries again."""
        self._recovered = True
        self._sweep_spares()
        directory = os.path.join(self._dir, JOURNAL_DIR)
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            return
        own = self._journal.path if self._journal is not None else None
        earlier: list[tuple[str, list[JournalRecord]]] = []
        held: list[int] = []
        try:
            stale = time.time() - _TEMPORARY_MAX_AGE
            for entry in entries:
                path = os.path.join(directory, entry)
                if entry.startswith(TEMP_PREFIX):  # a journal whose creator died creating it
                    with contextlib.suppress(OSError):
                        if os.stat(path, follow_symlinks=False).st_mtime < stale:
                            os.unlink(path)
                    continue
                if not entry.endswith(".wal") or path == own:
                    continue
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError:
                    continue
                held.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # its writer is alive
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_size > 2 * _JOURNAL_MAX:
                        continue
                    parsed = read_journal(os.pread(fd, st.st_size, 0))
                    if parsed is None or not parsed[1]:
                        os.unlink(path)  # nothing it holds can be trusted or is needed
                    elif parsed[0] == _BOOT_ID:
                        for name in sorted({r.name for r in parsed[1]}):
                            with contextlib.suppress(FileNotFoundError):
                                _fsync_path(self._dir + name)
                        self._fsync_dir(self._dir)
                        os.unlink(path)
                    else:
                        earlier.append((path, parsed[1]))
                except OSError as exc:
                    log.warning("could not absorb checkpoint journal %s: %s", path, exc)
            if earlier:
                self._replay(earlier)
        finally:
            for fd in held:
                os.close(fd)

    def _sweep_spares(self) -> None:
        """Remove spare files an hour old: their process died, or has not saved since."""
        stale = time.time() - _TEMPORARY_MAX_AGE
        try:
            entries = list(os.scandir(os.path.join(self._dir, SPARES_DIR)))
        except OSError:
            return
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < stale:
                    os.unlink(entry.path)

    def _replay(self, journals: builtins.list[tuple[str, builtins.list[JournalRecord]]]) -> None:
        by_name: dict[str, builtins.list[JournalRecord]] = {}
        for _, records in journals:
            for record in records:
                by_name.setdefault(record.name, []).append(record)
        complete = True
        for name, candidates in sorted(by_name.items()):
            try:
                complete &= self._restore(name, candidates)
            except Exception as exc:  # a verifier's surprise must not stop an open
                log.warning("could not replay the journal for %s in %s: %s", name, self.root, exc)
                complete = False
        try:
            self._fsync_dir(self._dir)
            if complete:
                for path, _ in journals:
                    os.unlink(path)
        except OSError as exc:
            log.warning("could not finish replaying checkpoint journals in %s: %s", self.root, exc)
        with self._mutex:
            self._loaded = False
            self._generation += 1

    def _restore(self, name: str, candidates: builtins.list[JournalRecord]) -> bool:
        """Restore ``name`` from its best record if the file needs it; False to retry later."""
        verify = self._verify
        best: tuple[float, int, JournalRecord] | None = None
        for record in candidates:
            key = verify(name, record.data) if verify is not None else 0.0
            if key is not None and (best is None or (key, record.written_ns) > best[:2]):
                best = (key, record.written_ns, record)
        if best is None:
            log.warning("journal records for %s in %s do not verify: ignored", name, self.root)
            return True
        key, _, chosen = best
        lock_key = self._lock_key(name) if self._lock_key is not None else None
        try:
            guard = self.lock(lock_key, 0) if lock_key is not None else contextlib.nullcontext()
            with guard:
                try:
                    current: bytes | None = self.get(name)
                except BlobNotFoundError:
                    current = None
                except UnsafeBlobError:
                    return True  # not a file we would ever replace
                current_key = (
                    verify(name, current) if verify is not None and current is not None else None
                )
                if current is not None and (
                    current == chosen.data or (current_key is not None and current_key >= key)
                ):
                    _fsync_path(self._dir + name)
                    return True
                log.warning("restoring %s in %s from the checkpoint journal", name, self.root)
                self._materialise(name, self._dir + name, chosen.data, sync=True)
                return True
        except (SessionLockedError, OSError) as exc:
            log.warning("not restoring %s in %s yet: %s", name, self.root, exc)
            return False

    @staticmethod
    def _fsync_dir(path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def get(self, name: str, *, max_bytes: int | None = None) -> bytes:
        path = self._path(name)
        if not self._recovered:
            self._recover_once()
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
        self._recover_once()
        with self._mutex:
            journal = self._journal
            if journal is not None and journal.pid == os.getpid() and name in journal.names:
                journal.checkpoint()  # no replay may bring a deleted blob back
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
        self._recover_once()
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
            tmp.write_bytes(data)
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

    def index_identity(self, *, cold: bool = False) -> tuple[int, ...] | None:
        try:
            dir_mtime = os.stat(self.root).st_mtime_ns
            fd = os.open(self._manifest, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            head = os.pread(fd, 128, 0) if cold else b""
        finally:
            os.close(fd)
        if cold:
            match = _SNAPSHOT_HEAD.match(head)
            if match is None or int(match[1]) != _INDEX_VERSION:
                return None
            stamp = (int(match[2]), int(match[3]))
        else:
            with self._mutex:
                if (
                    self._manifest_broken
                    or self._stamp is None
                    or (st.st_ino, st.st_size) != (self._manifest_ino, self._offset)
                ):
                    return None
                stamp = self._stamp
        # The staleness check of a listing (see _fresh): the directory is as last scanned.
        if stamp[0] != dir_mtime or stamp[1] - stamp[0] <= _RACY_NS:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, stamp[0], stamp[1])

    def read_aux(self, name: str) -> bytes | None:
        try:
            fd = os.open(
                self._index_dir / validate_blob_name(name),
                os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
            )
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            return os.pread(fd, st.st_size, 0)
        finally:
            os.close(fd)

    def write_aux(self, name: str, data: bytes) -> None:
        tmp = self._index_dir / f"{TEMP_PREFIX}{validate_blob_name(name)}.{secrets.token_hex(4)}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self._index_dir / name)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.debug("could not write %s in %s: %s", name, self._index_dir, exc)

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
        self._lock_dir.mkdir(parents=True, exist_ok=True)
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

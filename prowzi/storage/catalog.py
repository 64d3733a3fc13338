"""The catalog: a SQLite table of every checkpoint's header, derived from the blobs.

Listing checkpoints must not read every blob each time (a CLI command starts cold, and a
bucket may hold thousands of sessions). The catalog remembers each blob's header by the blob's
etag: a listing lists the store once and reads only the blobs whose etag it has not seen.
It is never trusted for integrity (a load verifies the blob itself) and never for existence
(the store's listing is): a deleted, damaged or foreign catalog file costs a rebuild, nothing
else. Rows for names no longer listed are dropped.

Where it lives: in the user's cache directory, one file per store (never inside the store,
which may be read-only, shared by machines, or remote). Where it cannot be written it is kept
in memory for the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from prowzi.storage.blob import BlobInfo
from prowzi.storage.files import ensure_private_dir, open_nofollow

__all__ = ["Catalog", "SqliteCache", "default_catalog_path", "open_cache"]

log = logging.getLogger("prowzi.catalog")


def default_catalog_path(url: str) -> Path:
    """``$XDG_CACHE_HOME/prowzi/catalog/<hash of the store's URL>.db``: a cache of this
    machine's, never inside the store (which may be read-only, shared, or remote)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "prowzi" / "catalog" / f"{hashlib.sha256(url.encode()).hexdigest()[:24]}.db"


def open_cache(path: Path | None, table: str, columns: str, schema: int) -> sqlite3.Connection:
    """A derived SQLite cache with one table, ``CREATE TABLE <table> (<columns>)``: the file
    at ``path`` (created private; a symlink there is removed, never written through; a file
    of another schema is made again; a damaged one is deleted and made again), or an
    in-memory database where no file can be. Its writes are not synced: a lost one is read
    again from what the cache is derived from."""
    if path is not None:
        with contextlib.suppress(OSError):
            ensure_private_dir(path.parent)
        with contextlib.suppress(OSError):
            if path.is_symlink():
                path.unlink()
        for attempt in range(2):
            try:
                return _open_cache(path, table, columns, schema)
            except (sqlite3.Error, OSError) as exc:
                if attempt or isinstance(exc, OSError):
                    break
                log.info("rebuilding %s: %s", path, exc)
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(OSError):
                        Path(f"{path}{suffix}").unlink()
    return _open_cache(None, table, columns, schema)


def _open_cache(path: Path | None, table: str, columns: str, schema: int) -> sqlite3.Connection:
    if path is not None and not path.exists():
        os.close(open_nofollow(path, os.O_WRONLY | os.O_CREAT))
    db = sqlite3.connect(
        ":memory:" if path is None else str(path), timeout=10, check_same_thread=False
    )
    try:
        db.execute("PRAGMA synchronous=OFF")
        if db.execute("PRAGMA user_version").fetchone()[0] != schema:
            if path is not None:
                db.execute("PRAGMA journal_mode=WAL")  # kept by the file
            db.execute(f"DROP TABLE IF EXISTS {table}")
            db.execute(f"CREATE TABLE {table} ({columns})")
            db.execute(f"PRAGMA user_version={schema}")
            db.commit()
        db.execute(f"SELECT count(*) FROM {table}").fetchone()  # a damaged file fails here
    except BaseException:
        db.close()
        raise
    return db


class SqliteCache:
    """A derived SQLite cache of one table (see :func:`open_cache`), opened on first use and
    shared by the threads of a process under :attr:`_mutex`. Subclasses name the table."""

    TABLE: str
    COLUMNS: str
    SCHEMA: int

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._mutex = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = self._reopen(self.path)
        return self._db

    def _reopen(self, path: Path | None) -> sqlite3.Connection:
        """Open the cache again, at ``path`` or (None) in memory: after a failure, a file
        that cannot be used is not tried again by this process."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        self._db = open_cache(path, self.TABLE, self.COLUMNS, self.SCHEMA)
        return self._db

    def close(self) -> None:
        with self._mutex:
            if self._db is not None:
                self._db.close()
                self._db = None


class Catalog(SqliteCache):
    """Rows (header JSON, or None for an unreadable blob) by blob name, kept by etag."""

    TABLE = "blobs"
    COLUMNS = "name TEXT PRIMARY KEY, etag TEXT NOT NULL, row BLOB"
    SCHEMA = 2

    def rows(
        self,
        listing: Iterable[BlobInfo],
        read: Callable[[BlobInfo], dict[str, Any] | None],
    ) -> dict[str, dict[str, Any] | None]:
        """The row of every blob in ``listing``: remembered when its etag is unchanged, else
        ``read(blob)`` (and remembered). Rows of blobs not listed are forgotten."""
        listing = list(listing)
        with self._mutex:
            try:
                return self._rows(self._connect(), listing, read)
            except sqlite3.Error as exc:  # damaged under us: start again in memory
                log.warning("the checkpoint catalog %s is unusable: %s", self.path, exc)
                return self._rows(self._reopen(None), listing, read)

    @staticmethod
    def _rows(
        db: sqlite3.Connection,
        listing: list[BlobInfo],
        read: Callable[[BlobInfo], dict[str, Any] | None],
    ) -> dict[str, dict[str, Any] | None]:
        known = {name: (etag, row) for name, etag, row in db.execute("SELECT * FROM blobs")}
        result: dict[str, dict[str, Any] | None] = {}
        changed: list[tuple[str, str, bytes | None]] = []
        for blob in listing:
            cached = known.pop(blob.name, None)
            if cached is not None and cached[0] == blob.etag:
                result[blob.name] = orjson.loads(cached[1]) if cached[1] is not None else None
                continue
            row = read(blob)
            result[blob.name] = row
            changed.append((blob.name, blob.etag, orjson.dumps(row) if row is not None else None))
        if changed or known:
            with db:
                db.executemany("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?)", changed)
                db.executemany("DELETE FROM blobs WHERE name = ?", [(n,) for n in known])
        return result

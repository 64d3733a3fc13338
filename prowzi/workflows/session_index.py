"""The session index: a SQLite table of per-session summaries, derived from the session files.

``prowzi sessions`` over thousands of sessions must not parse thousands of JSON files each time
(a CLI command starts cold). The index remembers each session's summary by its record's
*signature*: the inode, size and mtime of a local session file, or the etag of a session blob in
the telemetry store, as :mod:`prowzi.storage.catalog` remembers checkpoint headers by etag. A
listing reads only the records whose signature changed, and forgets the rows of sessions no
longer there.

It is derived and never trusted: a row is used only while its record's signature matches, the
files (and blobs) say which sessions exist, and a deleted, damaged or foreign index costs a
rebuild, nothing else. Where it lives: the user's cache directory, one file per telemetry
directory and store (:func:`prowzi.storage.catalog.default_catalog_path`), never in the
telemetry directory, which other tools and machines share and may be read-only; so it is never
listed as a session either. Where it cannot be written it is kept in memory for the process.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from prowzi.storage.catalog import SqliteCache

__all__ = ["IndexRow", "SessionIndex"]

log = logging.getLogger("prowzi.telemetry")


IndexRow = tuple[float, str, str, str]
"""``(started, session_id, status, signature)``: what listing needs to match records, filter
and sort (newest first is the largest tuple). The summary itself is fetched for shown rows."""


class SessionIndex(SqliteCache):
    """Rows and summaries (JSON) by session id, each kept with its record's signature."""

    TABLE = "sessions"
    COLUMNS = (
        "session_id TEXT PRIMARY KEY, started REAL NOT NULL, status TEXT NOT NULL, "
        "signature TEXT NOT NULL, summary BLOB NOT NULL"
    )
    SCHEMA = 1

    def _run(self, work: str, query: str, args: Iterable[object] = ()) -> list[tuple[object, ...]]:
        with self._mutex:
            try:
                return self._connect().execute(query, tuple(args)).fetchall()
            except sqlite3.Error as exc:
                self._recover(work, exc)
                return self._connect().execute(query, tuple(args)).fetchall()

    def _recover(self, work: str, exc: sqlite3.Error) -> None:
        """After a failed query: a file damaged or foreign under us is made again; a busy one
        (another process holds it too long) is left alone, and this process goes on in memory."""
        log.warning("the session index %s is unusable (%s): %s", self.path, work, exc)
        busy = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
        if not busy and self.path is not None:  # damaged or foreign under us: made again
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    Path(f"{self.path}{suffix}").unlink()
        self._reopen(None if busy else self.path)

    def rows(self) -> dict[str, IndexRow]:
        """Every row, by session id (typed by the query, whatever a foreign file holds)."""
        found = self._run(
            "listing",
            "SELECT CAST(started AS REAL), CAST(session_id AS TEXT), CAST(status AS TEXT), "
            "CAST(signature AS TEXT) FROM sessions WHERE started IS NOT NULL AND "
            "session_id IS NOT NULL AND status IS NOT NULL AND signature IS NOT NULL",
        )
        return {row[1]: row for row in found}  # type: ignore[misc]

    def summaries(self, session_ids: Iterable[str]) -> dict[str, bytes]:
        """The summaries (JSON) of these sessions' rows."""
        wanted = list(dict.fromkeys(session_ids))
        found: dict[str, bytes] = {}
        if len(wanted) > 500:  # most of a listing: one pass over the table
            every = self._run("reading", "SELECT session_id, summary FROM sessions")
            chosen = set(wanted)
            return {
                sid: summary
                for sid, summary in every
                if sid in chosen and isinstance(sid, str) and isinstance(summary, bytes)
            }
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for session_id, summary in self._run(
                "reading",
                f"SELECT session_id, summary FROM sessions WHERE session_id IN ({marks})",
                chunk,
            ):
                if isinstance(session_id, str) and isinstance(summary, bytes):
                    found[session_id] = summary
        return found

    def update(self, fresh: Iterable[tuple[IndexRow, bytes]], forget: Iterable[str]) -> None:
        """Remember ``fresh`` rows (with their summaries) and drop the rows of ``forget``.
        Best effort: an index that cannot be written still lists correctly, only slower."""
        values = [(*row, summary) for row, summary in fresh]
        gone = [(session_id,) for session_id in forget]
        if not values and not gone:
            return
        with self._mutex:
            try:
                db = self._connect()
                with db:
                    db.executemany(
                        "INSERT OR REPLACE INTO sessions (started, session_id, status, "
                        "signature, summary) VALUES (?, ?, ?, ?, ?)",
                        values,
                    )
                    db.executemany("DELETE FROM sessions WHERE session_id = ?", gone)
            except sqlite3.Error as exc:
                log.debug("cannot update the session index %s: %s", self.path, exc)

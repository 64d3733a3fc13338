"""Session leases: at most one writer per session, with a fencing token.

A lease is a small JSON record in the blob store (``leases/<session>.json``), so every backend
gets leases from the same two conditional puts: ``create_only`` takes a lease nobody ever
held, ``if_match`` takes over an expired one and renews a held one. Whoever loses a race gets
:class:`PreconditionFailedError` from the store and reads the record again. This is the
"lock by conditional write" of object stores (as Delta Lake and LangGraph's remote
checkpointers use it), and it needs nothing the five blob operations do not give.

- **Fencing token.** Every acquisition writes ``token = previous token + 1``; the record is
  never deleted (a release marks it released), so tokens only grow. A writer carries its
  token, and :meth:`SessionLeases.check` refuses it once another writer has taken the lease
  over (:class:`LeaseLostError`). Checkpoint saves check before they write and record the
  token in the checkpoint's header.
- **Time to live.** A lease not renewed for ``ttl`` seconds may be taken over: a writer that
  died on another machine is replaced after at most ``ttl``. :class:`HeldLease` renews in a
  daemon thread every ``ttl / 3`` while the work goes on.
- **Dead holders on this machine** are recognised at once (pid, process start time and boot
  id recorded with the lease): after a ``kill -9`` a resume need not wait for the ``ttl``.

The window this leaves, as for every lease without storage-side fencing: a holder stalled
for longer than ``ttl`` *between* its check and its write could still write once. Saves check
immediately before writing, so the window is one put long.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson

from prowzi.errors import SessionLockedError
from prowzi.host import boot_id, process_alive, process_start
from prowzi.ids import validate_session_id
from prowzi.storage.blob import BlobNotFoundError, BlobStore, PreconditionFailedError

__all__ = [
    "DEFAULT_TTL",
    "HeldLease",
    "Lease",
    "LeaseLostError",
    "SessionLeases",
    "describe_process",
]

log = logging.getLogger("prowzi.lease")

DEFAULT_TTL = 30.0
_PREFIX = "leases/"
_RECORD_VERSION = 1


class LeaseLostError(SessionLockedError):
    """This writer's lease was taken over (or released): its writes are refused."""


def describe_process() -> str:
    """Who this process is, for "held by ..." messages."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class Lease:
    session: str
    token: int
    """The fencing token: larger than every earlier holder's."""
    owner: str
    expires_at: float
    etag: str
    """The lease record's version, for the next conditional renewal."""


def _live(record: dict[str, Any], now: float) -> bool:
    if record.get("released") or not isinstance(record.get("expires_at"), int | float):
        return False
    if record["expires_at"] <= now:
        return False
    pid = record.get("pid")
    return not isinstance(pid, int) or process_alive(
        record.get("host"), record.get("boot"), pid, record.get("started")
    )


class SessionLeases:
    """Leases on sessions, kept in ``store`` (any :class:`~prowzi.storage.blob.BlobStore`)."""

    def __init__(self, store: BlobStore, *, ttl: float = DEFAULT_TTL) -> None:
        if ttl <= 0:
            raise ValueError("a lease's ttl must be positive")
        self.store = store
        self.ttl = ttl

    @staticmethod
    def blob_name(session: str) -> str:
        """The blob holding ``session``'s lease record."""
        return f"{_PREFIX}{validate_session_id(session)}.json"

    def _read(self, session: str) -> tuple[dict[str, Any], str] | None:
        try:
            blob = self.store.get(self.blob_name(session))
        except BlobNotFoundError:
            return None
        try:
            record = orjson.loads(blob.data)
        except orjson.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or type(record.get("token")) is not int:
            record = {"token": 0, "released": True}  # unreadable: a dead record, taken over
        return record, blob.info.etag

    def _write(self, session: str, owner: str, token: int, etag: str | None) -> Lease:
        expires = time.time() + self.ttl
        pid = os.getpid()
        record = {
            "v": _RECORD_VERSION,
            "session": session,
            "token": token,
            "owner": owner,
            "host": socket.gethostname(),
            "boot": boot_id(),
            "pid": pid,
            "started": process_start(pid),
            "expires_at": expires,
        }
        name = self.blob_name(session)
        data = orjson.dumps(record)
        if etag is None:
            new_etag = self.store.put(name, data, create_only=True)
        else:
            new_etag = self.store.put(name, data, if_match=etag)
        return Lease(session, token, owner, expires, new_etag)

    def acquire(self, session: str, *, owner: str | None = None, timeout: float = 0) -> Lease:
        """Take the session's lease, waiting up to ``timeout`` seconds for a live holder;
        :class:`SessionLockedError` names the holder when it is still held."""
        owner = owner or describe_process()
        deadline = time.monotonic() + timeout
        while True:
            found = self._read(session)
            if found is None or not _live(found[0], time.time()):
                try:
                    token = found[0]["token"] + 1 if found else 1
                    return self._write(session, owner, token, found[1] if found else None)
                except PreconditionFailedError:
                    continue  # another writer won the race: look again
            if time.monotonic() >= deadline:
                holder = (found[0].get("owner") if found else None) or "another process"
                raise SessionLockedError(
                    f"session {session} is locked: it is being written by {holder}"
                )
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def renew(self, lease: Lease) -> Lease:
        """Extend ``lease`` by the ttl; :class:`LeaseLostError` when it is no longer held."""
        found = self._read(lease.session)
        if found is None or found[0].get("released") or found[0]["token"] != lease.token:
            raise self._lost(lease, found[0] if found else None)
        try:
            return self._write(lease.session, lease.owner, lease.token, found[1])
        except PreconditionFailedError:
            raise self._lost(lease, None) from None

    def check(self, lease: Lease) -> Lease:
        """The fencing check a write makes first: ``lease`` (renewed if it ran out) while it
        is still the session's current lease, else :class:`LeaseLostError`."""
        found = self._read(lease.session)
        if found is None or found[0].get("released") or found[0]["token"] != lease.token:
            raise self._lost(lease, found[0] if found else None)
        if found[0].get("expires_at", 0) - time.time() < self.ttl / 3:
            return self.renew(lease)
        return lease

    def release(self, lease: Lease) -> None:
        """Give the lease up (a no-op when it was lost already)."""
        found = self._read(lease.session)
        if found is None or found[0]["token"] != lease.token or found[0].get("released"):
            return
        record = {**found[0], "released": True, "expires_at": 0}
        # Taken over meanwhile (PreconditionFailed): nothing of ours to release.
        with contextlib.suppress(PreconditionFailedError):
            self.store.put(self.blob_name(lease.session), orjson.dumps(record), if_match=found[1])

    def holder(self, session: str) -> str | None:
        """Who holds the session's lease now, or None when nobody does."""
        found = self._read(session)
        if found is None or not _live(found[0], time.time()):
            return None
        owner = found[0].get("owner")
        return owner if isinstance(owner, str) else "another process"

    def status(self, session: str) -> str:
        """The lease as a new writer would find it: ``free`` (never held, or released),
        ``held`` (a live writer), ``expired`` (not renewed for ``ttl``) or ``dead`` (its
        writer on this machine is gone, before the ttl ran out)."""
        found = self._read(session)
        if found is None or found[0].get("released"):
            return "free"
        now = time.time()
        if _live(found[0], now):
            return "held"
        expires = found[0].get("expires_at")
        return "dead" if isinstance(expires, int | float) and expires > now else "expired"

    def hold(self, session: str, *, owner: str | None = None, timeout: float = 0) -> HeldLease:
        """Acquire, and keep renewing until :meth:`HeldLease.release`; a context manager."""
        return HeldLease(self, self.acquire(session, owner=owner, timeout=timeout))

    @staticmethod
    def _lost(lease: Lease, record: dict[str, Any] | None) -> LeaseLostError:
        by = record.get("owner") if record and not record.get("released") else None
        return LeaseLostError(
            f"the lease on session {lease.session} (token {lease.token}) was "
            + (f"taken over by {by}" if by else "lost")
            + "; this writer's changes are refused"
        )


class HeldLease:
    """A lease kept alive by a daemon thread that renews it every ``ttl / 3`` seconds."""

    def __init__(self, leases: SessionLeases, lease: Lease) -> None:
        self.leases = leases
        self._lease = lease
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self.lost: LeaseLostError | None = None
        self._thread = threading.Thread(
            target=self._keep, name=f"prowzi-lease-{lease.session}", daemon=True
        )
        self._thread.start()

    @property
    def lease(self) -> Lease:
        return self._lease

    def _keep(self) -> None:
        while not self._stop.wait(self.leases.ttl / 3):
            try:
                with self._mutex:
                    self._lease = self.leases.renew(self._lease)
            except LeaseLostError as exc:
                self.lost = exc
                log.error("%s", exc)
                return
            except Exception as exc:  # the store is down: try again next time
                log.warning("could not renew the lease on %s: %s", self._lease.session, exc)

    def check(self) -> Lease:
        """The fencing check (see :meth:`SessionLeases.check`)."""
        with self._mutex:
            self._lease = self.leases.check(self._lease)
            return self._lease

    def release(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._mutex:
            try:
                self.leases.release(self._lease)
            except Exception as exc:  # the store is down: the lease runs out after its ttl
                log.warning("could not release the lease on %s: %s", self._lease.session, exc)

    def __enter__(self) -> HeldLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

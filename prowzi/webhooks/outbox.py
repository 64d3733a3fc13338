"""The webhook outbox and delivery log, kept in a blob store (:mod:`prowzi.storage.blob`).

Layout (every record a small JSON blob with a version ``v``):

- ``outbox/<endpoint>/<session>/<seq>.<msg>.json``: a delivery not yet made. Written with a
  ``create_only`` put before the run moves on; rewritten (``if_match``) after a failed
  attempt with the attempt count and when to try next; deleted once it is in the log. ``seq``
  is the time in nanoseconds, increasing within a lane, so a listing sorted by name is the
  order of delivery per endpoint and session.
- ``log/<endpoint>/<session>/<seq>.<msg>.json``: a finished delivery: the entry and how it
  ended (``delivered``, ``failed``, ``disabled``), attempts, last status and error. Swept
  a session at a time by retention (:meth:`Outbox.cleanup`), like checkpoints and telemetry.
- ``subscriptions/<id>.json``: subscriptions made through the service's API (with their
  secret; the store is private, ``0600`` files).
- ``endpoints/<id>.json``: an endpoint's state (disabled after a ``410 Gone``).
- ``leases/webhook-delivery.json``: the lease of the one process that delivers (a
  :class:`~prowzi.storage.lease.SessionLeases` record).

A delivery is logged before its entry is deleted: a crash in between delivers it again with
the same ``webhook-id`` (receivers deduplicate by it), and never loses it.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import orjson

from prowzi.storage.blob import BlobNotFoundError, BlobStore, PreconditionFailedError

if TYPE_CHECKING:
    from prowzi.workflows.retention import Policy

RECORD_VERSION = 1
OUTBOX = "outbox/"
LOG = "log/"
SUBSCRIPTIONS = "subscriptions/"
ENDPOINTS = "endpoints/"
OUTCOMES = ("delivered", "failed", "disabled")
_REQUIRED = frozenset({"id", "endpoint", "session_id", "type", "body", "seq"})


def new_message_id() -> str:
    """A ``webhook-id``: unique, and the same for every attempt of one delivery."""
    return "msg_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class Entry:
    """One delivery: a message to one endpoint."""

    id: str
    endpoint: str
    session_id: str
    type: str
    body: str
    """The exact bytes signed and sent (a JSON document)."""
    created_at: float
    seq: str
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_status: int | None = None
    last_error: str | None = None
    etag: str | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return f"{OUTBOX}{self.endpoint}/{self.session_id}/{self.seq}.{self.id}.json"

    @property
    def log_name(self) -> str:
        return f"{LOG}{self.endpoint}/{self.session_id}/{self.seq}.{self.id}.json"

    def record(self) -> dict[str, Any]:
        return {
            "v": RECORD_VERSION,
            "id": self.id,
            "endpoint": self.endpoint,
            "session_id": self.session_id,
            "type": self.type,
            "body": self.body,
            "created_at": self.created_at,
            "seq": self.seq,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
            "last_status": self.last_status,
            "last_error": self.last_error,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], etag: str | None = None) -> Entry:
        version = record.get("v")
        if version != RECORD_VERSION:
            raise ValueError(f"outbox record version {version!r}; this Prowzi reads 1")
        return cls(
            id=str(record["id"]),
            endpoint=str(record["endpoint"]),
            session_id=str(record["session_id"]),
            type=str(record["type"]),
            body=str(record["body"]),
            created_at=float(record["created_at"]),
            seq=str(record["seq"]),
            attempts=int(record.get("attempts", 0)),
            next_attempt_at=float(record.get("next_attempt_at", 0.0)),
            last_status=record.get("last_status"),
            last_error=record.get("last_error"),
            etag=etag,
        )


def parse_name(name: str) -> tuple[str, str, str, str] | None:
    """``outbox/<endpoint>/<session>/<seq>.<msg>.json`` (or ``log/...``) -> (endpoint,
    session, seq, msg), or None for any other name."""
    parts = name.split("/")
    if len(parts) != 4 or not parts[3].endswith(".json"):
        return None
    seq, dot, msg = parts[3].removesuffix(".json").partition(".")
    if not dot or not msg.startswith("msg_"):
        return None
    return parts[1], parts[2], seq, msg


class Outbox:
    """The records above, in ``store``. Thread-safe (the store is)."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._seq_lock = threading.Lock()
        self._last_seq = 0

    def _next_seq(self) -> str:
        # Increasing within this process even when the clock steps back; across processes
        # the wall clock orders a session's runs (one writer per session at a time).
        with self._seq_lock:
            self._last_seq = max(self._last_seq + 1, time.time_ns())
            return f"{self._last_seq:020d}"

    # --- pending deliveries -------------------------------------------------------------

    def enqueue(
        self, endpoint: str, session_id: str, type_: str, body: str, message_id: str | None = None
    ) -> Entry:
        """Write a new pending delivery (durably, create-only) and return it."""
        entry = Entry(
            id=message_id or new_message_id(),
            endpoint=endpoint,
            session_id=session_id,
            type=type_,
            body=body,
            created_at=time.time(),
            seq=self._next_seq(),
        )
        etag = self.store.put(entry.name, orjson.dumps(entry.record()), create_only=True)
        return replace(entry, etag=etag)

    def pending_names(self) -> list[str]:
        """Every pending entry's blob name, sorted (so in delivery order within a lane)."""
        return [info.name for info in self.store.list(OUTBOX) if parse_name(info.name)]

    def load(self, name: str) -> Entry | None:
        """The entry under ``name`` (outbox or log), or None when it is gone."""
        try:
            blob = self.store.get(name)
        except BlobNotFoundError:
            return None
        return Entry.from_record(orjson.loads(blob.data), blob.info.etag)

    def reschedule(self, entry: Entry) -> Entry:
        """Record a failed attempt (``entry`` carries the new count and next time)."""
        data = orjson.dumps(entry.record())
        try:
            etag = self.store.put(entry.name, data, if_match=entry.etag, durable=False)
        except PreconditionFailedError:  # changed under us (redeliver): keep what is there
            fresh = self.load(entry.name)
            return fresh if fresh is not None else entry
        return replace(entry, etag=etag)

    def finish(self, entry: Entry, outcome: str, *, latency: float | None = None) -> None:
        """Move ``entry`` to the log with its ``outcome``; the log is written first."""
        record = {
            **entry.record(),
            "outcome": outcome,
            "finished_at": time.time(),
            "latency_seconds": latency,
        }
        self.store.put(entry.log_name, orjson.dumps(record))
        self.store.delete(entry.name)

    # --- the log ------------------------------------------------------------------------

    def records(
        self, *, session_id: str | None = None, message_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Every delivery, pending (``outcome: pending``) and finished, oldest first; only
        those of ``session_id`` or ``message_id`` when given (read from the names: no other
        record is read)."""
        rows: list[dict[str, Any]] = []
        for prefix, pending in ((OUTBOX, True), (LOG, False)):
            for info in self.store.list(prefix):
                parsed = parse_name(info.name)
                if (
                    parsed is None
                    or (session_id is not None and parsed[1] != session_id)
                    or (message_id is not None and parsed[3] != message_id)
                ):
                    continue
                try:
                    record = orjson.loads(self.store.get(info.name).data)
                except (BlobNotFoundError, orjson.JSONDecodeError):
                    continue  # delivered meanwhile, or not ours
                if not isinstance(record, dict) or not record.keys() >= _REQUIRED:
                    continue  # not a record this Prowzi wrote
                if pending:
                    record["outcome"] = "pending"
                record["name"] = info.name
                rows.append(record)
        rows.sort(key=lambda r: (str(r.get("seq")), str(r.get("id"))))
        return rows

    def cleanup(self, policy: Policy) -> list[str]:
        """Delete the delivery log of sessions whose newest record was written before the
        policy's cutoff (the blobs' times: no record is read). Kept besides what the policy
        keeps: a session with a delivery still pending (the outbox is work, never swept).
        Returns the session ids whose log went (or, for a dry run, would go)."""
        pending = {parsed[1] for name in self.pending_names() if (parsed := parse_name(name))}
        newest: dict[str, float] = {}
        names: dict[str, list[str]] = {}
        for info in self.store.list(LOG):
            parsed = parse_name(info.name)
            if parsed is None:
                continue
            newest[parsed[1]] = max(newest.get(parsed[1], info.modified), info.modified)
            names.setdefault(parsed[1], []).append(info.name)
        deleted = policy.old(newest, keep=pending)
        if not policy.dry_run:
            for session in deleted:
                for name in names[session]:
                    try:
                        self.store.delete(name)
                    except OSError as exc:
                        policy.failed(self.store.describe(name), exc)
        return deleted

    def find(self, message_id: str) -> list[dict[str, Any]]:
        """Every record (pending or logged) of the message ``message_id``."""
        return [r for r in self.records(message_id=message_id) if r.get("id") == message_id]

    def redeliver(self, message_id: str) -> Entry:
        """Queue a finished delivery again, with the same ``webhook-id``, at the end of its
        lane; a pending one is just made due now. ``LookupError`` when there is none."""
        found = self.find(message_id)
        if not found:
            raise LookupError(f"no webhook delivery {message_id}")
        latest = found[-1]
        if latest["outcome"] == "pending":
            entry = self.load(latest["name"])
            if entry is not None:
                return self.reschedule(replace(entry, next_attempt_at=0.0))
        return self.enqueue(
            latest["endpoint"], latest["session_id"], latest["type"], latest["body"], message_id
        )

    # --- endpoints and subscriptions ----------------------------------------------------

    def endpoint_state(self, endpoint: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = orjson.loads(self.store.get(f"{ENDPOINTS}{endpoint}.json").data)
            return data
        except (BlobNotFoundError, orjson.JSONDecodeError):
            return {}

    def set_disabled(self, endpoint: str, disabled: bool, reason: str | None = None) -> None:
        record = {"v": RECORD_VERSION, "disabled": disabled, "reason": reason, "at": time.time()}
        self.store.put(f"{ENDPOINTS}{endpoint}.json", orjson.dumps(record))

    def disabled_endpoints(self) -> dict[str, str]:
        """Disabled endpoint -> why."""
        found = {}
        for info in self.store.list(ENDPOINTS):
            endpoint = info.name.removeprefix(ENDPOINTS).removesuffix(".json")
            state = self.endpoint_state(endpoint)
            if state.get("disabled"):
                found[endpoint] = str(state.get("reason") or "disabled")
        return found

    def stored_subscriptions(self) -> list[dict[str, Any]]:
        rows = []
        for info in self.store.list(SUBSCRIPTIONS):
            try:
                rows.append(orjson.loads(self.store.get(info.name).data))
            except (BlobNotFoundError, orjson.JSONDecodeError):
                continue
        return rows

    def put_subscription(self, record: dict[str, Any], *, create: bool) -> None:
        name = f"{SUBSCRIPTIONS}{record['id']}.json"
        self.store.put(name, orjson.dumps({"v": RECORD_VERSION, **record}), create_only=create)

    def delete_subscription(self, subscription_id: str) -> bool:
        return self.store.delete(f"{SUBSCRIPTIONS}{subscription_id}.json")

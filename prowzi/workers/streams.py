"""A run's events in Redis, so machines other than the worker's can follow it.

Each worker publishes every event of its runs to a Redis stream per session
(``prowzi:events:<session>``, ``XADD`` with an approximate cap and an expiry), besides its local
event log. ``prowzi monitor``, the service's Server-Sent Events and anything else follow a run
with :func:`follow_run` from any machine that reaches the broker.

Why streams, not pub/sub: a stream keeps its entries, so a follower that attaches late (or
reconnects after a broker restart) reads the run from its first event, as a local follower
reads the event log from its first line; pub/sub would lose everything published before it
subscribed. redis-py is the client Celery's Redis transport uses already.

Publishing never slows or fails a run: :class:`RedisEventStream` hands records to one daemon
thread through a bounded queue (in order); a broker that is down costs a logged, counted error
per event it could not publish, never a stalled stage.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import orjson

from prowzi.errors import TelemetryError
from prowzi.events import (
    Event,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
    event_from_record,
)
from prowzi.ids import validate_session_id

if TYPE_CHECKING:
    import redis
    import redis.asyncio

log = logging.getLogger("prowzi.workers")

STREAM_PREFIX = "prowzi:events:"
STREAM_MAXLEN = 20_000
"""Entries kept per session's stream (a run with every retry used stays far below this)."""
STREAM_TTL_SECONDS = 7 * 86400
"""A session's stream expires this long after its last event (telemetry keeps the record)."""
REQUEUED = "requeued"
"""A control entry: the worker stopping this run returns it to the queue (the cancellation
that follows it is not the run's end)."""
_QUEUE_SIZE = 10_000
_SOCKET_TIMEOUT = 2.0


def stream_key(session_id: str) -> str:
    return STREAM_PREFIX + validate_session_id(session_id)


def connect(url: str, *, timeout: float = _SOCKET_TIMEOUT) -> redis.Redis:
    """A client for ``url`` whose calls give up after ``timeout`` seconds."""
    import redis

    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


class RedisEventStream:
    """An :class:`~prowzi.events.EventSink` that publishes each event to its session's stream."""

    name = "redis_stream"

    def __init__(self, url: str, *, client: redis.Redis | None = None) -> None:
        self.url = url
        self._client = client
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(_QUEUE_SIZE)
        self.failed = 0
        self._thread = threading.Thread(target=self._publish, name="prowzi-stream", daemon=True)
        self._thread.start()

    def handle(self, event: Event) -> None:
        self.put(event.as_record())

    def control(self, session_id: str, kind: str) -> None:
        """Publish a control entry (:data:`REQUEUED`) in order with the events."""
        self.put({"control": kind, "session_id": session_id, "timestamp": time.time()})

    def put(self, record: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            raise TelemetryError("the Redis event stream's queue is full; event dropped") from None

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every event handed over so far was published (or given up on)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def _publish(self) -> None:
        while True:
            record = self._queue.get()
            try:
                self._send(record)
            finally:
                self._queue.task_done()

    def _send(self, record: dict[str, Any]) -> None:
        for attempt in range(3):
            try:
                if self._client is None:
                    self._client = connect(self.url)
                key = stream_key(record["session_id"])
                pipe = self._client.pipeline(transaction=False)
                pipe.xadd(key, {"r": orjson.dumps(record)}, maxlen=STREAM_MAXLEN, approximate=True)
                pipe.expire(key, STREAM_TTL_SECONDS)
                pipe.execute()
                return
            except Exception as exc:  # the broker is down or restarting: retry, then drop
                if attempt == 2:
                    self.failed += 1
                    log.warning("cannot publish an event to %s: %s", self.url, exc)
                    return
                time.sleep(0.2 * (attempt + 1))


class _RunEnd:
    """Turns stream entries into events and knows when the run is over: completed, failed,
    or cancelled for good (a cancellation after a :data:`REQUEUED` entry is a worker handing
    the run back; the follower waits for the worker that continues it)."""

    def __init__(self, after: str = "0") -> None:
        self.last = after
        self.over = False
        self._requeued = False

    def read(self, answer: Any) -> list[Event]:
        events = []
        for _stream, entries in answer or ():
            for entry_id, fields in entries:
                self.last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                record = orjson.loads(fields[b"r"])
                if "control" in record:
                    self._requeued = self._requeued or record["control"] == REQUEUED
                    continue
                event = event_from_record(record)
                if isinstance(event, WorkflowStarted):
                    self._requeued = False
                events.append(event)
                if isinstance(event, WorkflowCompleted) or (
                    isinstance(event, WorkflowFailed) and not (event.cancelled and self._requeued)
                ):
                    self.over = True
                    return events
        return events


def stream_position(client: redis.Redis, session_id: str) -> str:
    """The id of the session's latest stream entry ("0" when it has none): follow from here
    to see only what a run submitted now will publish."""
    entries: Any = client.xrevrange(stream_key(session_id), count=1)
    if not entries:
        return "0"
    entry_id = entries[0][0]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def follow_run(
    client: redis.Redis,
    session_id: str,
    *,
    block: float = 1.0,
    stop: Callable[[], bool] | None = None,
    after: str = "0",
) -> Iterator[Event]:
    """The session's events after entry ``after`` (from its first by default), then live
    ones, until the run is over (see :class:`_RunEnd`). ``stop()`` is asked between reads
    (every ``block`` seconds at most) and ends the follow early. Connection errors propagate
    (the caller decides what to do)."""
    key = stream_key(session_id)
    end = _RunEnd(after)
    while not end.over and (stop is None or not stop()):
        answer = client.xread({key: end.last}, count=500, block=max(1, int(block * 1000)))
        yield from end.read(answer)


async def follow_run_async(
    client: redis.asyncio.Redis, session_id: str, *, block: float = 1.0, after: str = "0"
) -> AsyncIterator[Event]:
    """:func:`follow_run` for an event loop (the service follows many runs at once on one
    loop, without a thread each)."""
    key = stream_key(session_id)
    end = _RunEnd(after)
    while not end.over:
        answer = await client.xread({key: end.last}, count=500, block=max(1, int(block * 1000)))
        for event in end.read(answer):
            yield event


CANCEL_PREFIX = "prowzi:cancel:"


def cancel_key(session_id: str) -> str:
    return CANCEL_PREFIX + validate_session_id(session_id)


def request_cancel(client: redis.Redis, session_id: str, ttl: float) -> None:
    """Ask whichever worker runs (or will run) the session to cancel it."""
    client.set(cancel_key(session_id), b"1", ex=max(1, int(ttl)))


def cancel_requested(client: redis.Redis, session_id: str) -> bool:
    return bool(client.exists(cancel_key(session_id)))


__all__ = [
    "REQUEUED",
    "RedisEventStream",
    "cancel_requested",
    "connect",
    "follow_run",
    "follow_run_async",
    "request_cancel",
    "stream_key",
    "stream_position",
]

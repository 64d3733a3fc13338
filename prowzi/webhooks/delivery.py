"""Signing and sending deliveries, and the background worker that empties the outbox.

Why these libraries: ``standardwebhooks`` is the reference implementation of the Standard
Webhooks specification, so what we sign is what receivers' copies of it verify (no HMAC
layout of our own to get subtly wrong); httpx gives per-phase timeouts, redirects off by
default, streamed bodies (read up to a limit) and connection reuse in a small, typed client.
Both are imported when the first delivery is made, never by ``prowzi --help``.

The worker is one daemon thread per outbox, which hands each due lane's next entry to a
small pool of sender threads (lanes go in parallel, so one slow receiver holds up only its
own lanes). Only the process that holds the outbox's
delivery lease (``leases/webhook-delivery.json``) sends, so two processes never send the
same entry at once; the others write entries and wait (``prowzi run``'s bounded wait at its
end) for the holder to deliver them, and take the lease over when its holder dies. Each
endpoint and session is a lane: its entries go one at a time in the order they were written,
the next only after the one before was delivered or given up.

Outcomes: 2xx delivered; ``410 Gone`` disables the endpoint (its pending entries are logged
``disabled``); other 4xx and 3xx (redirects are never followed) fail that delivery at once;
429 and 503 wait for ``Retry-After``; everything else (5xx, timeouts, refused connections)
is retried after the next delay of the schedule, jittered by ±25%, until the schedule is
used up.
"""

from __future__ import annotations

import bisect
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from prowzi.errors import SessionLockedError
from prowzi.http import retry_after
from prowzi.webhooks.outbox import Entry, Outbox, parse_name
from prowzi.webhooks.safety import UnsafeAddressError, connect_target, host_header

if TYPE_CHECKING:
    import httpx

    from prowzi.config import ProwziConfig
    from prowzi.storage.lease import HeldLease
    from prowzi.webhooks.subscriptions import Subscription

log = logging.getLogger("prowzi.webhooks")

LEASE_NAME = "webhook-delivery"
MAX_RETRY_AFTER = 86400.0
JITTER = 0.25


class WebhookObserver(Protocol):
    """What metrics learn from the worker."""

    def delivery(self, event_type: str, outcome: str, seconds: float | None) -> None: ...


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one attempt went: ``ok``, ``retry``, ``permanent`` or ``gone``."""

    outcome: str
    status: int | None
    error: str | None
    seconds: float
    retry_after: float | None = None


def _user_agent() -> str:
    from prowzi import __version__

    return f"Prowzi-Webhooks/{__version__}"


def sign_headers(secret: str, message_id: str, body: str, now: float, *also: str) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt (the timestamp is the attempt's). With
    ``also`` (a secret just rotated away), one signature per secret, space-separated, as the
    specification allows: a receiver with either secret verifies."""
    from standardwebhooks.webhooks import Webhook

    when = datetime.fromtimestamp(int(now), UTC)
    signatures = [Webhook(key).sign(message_id, when, body) for key in (secret, *also)]
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now)),
        "webhook-signature": " ".join(signatures),
    }


def new_client(timeout: float) -> httpx.Client:
    import httpx

    # trust_env=False: a proxy from the environment would connect to the address we refused.
    return httpx.Client(
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        trust_env=False,
        headers={"user-agent": _user_agent()},
    )


def send(
    client: httpx.Client,
    subscription: Subscription,
    message_id: str,
    body: str,
    *,
    allow_private: bool,
) -> Attempt:
    """One signed POST of ``body`` to the subscription's URL."""
    import httpx

    started = time.perf_counter()
    now = time.time()
    try:
        target, _address = connect_target(subscription.url, allow_private)
    except UnsafeAddressError as exc:
        return Attempt("permanent", None, f"refused: {exc}", time.perf_counter() - started)
    except OSError as exc:
        return Attempt("retry", None, f"cannot resolve: {exc}", time.perf_counter() - started)
    headers = {
        "content-type": "application/json",
        "host": host_header(subscription.url),
        **sign_headers(
            subscription.secret.get_secret_value(),
            message_id,
            body,
            now,
            *subscription.previous_secrets(now),
        ),
    }
    extensions: dict[str, Any] = {}
    parts = urlsplit(subscription.url)
    if parts.scheme.lower() == "https":  # the connection goes to the checked address
        extensions["sni_hostname"] = parts.hostname
    try:
        # The answer's status and headers are all a delivery needs: its body is never read, so
        # a receiver that drips or resets it can neither hold a sender nor undo a 2xx.
        with client.stream(
            "POST", target, content=body.encode(), headers=headers, extensions=extensions
        ) as response:
            status = response.status_code
            asked = retry_after(response.headers.get("retry-after"))
            wait = min(asked, MAX_RETRY_AFTER) if asked is not None else None
    except httpx.TimeoutException as exc:
        return Attempt("retry", None, f"timeout: {type(exc).__name__}", _since(started))
    except httpx.HTTPError as exc:
        return Attempt("retry", None, f"{type(exc).__name__}: {exc}"[:200], _since(started))
    seconds = _since(started)
    if 200 <= status < 300:
        return Attempt("ok", status, None, seconds)
    if status == 410:
        return Attempt("gone", status, "410 Gone: endpoint disabled", seconds)
    if status in (429, 503):
        return Attempt("retry", status, f"HTTP {status}", seconds, wait)
    if 300 <= status < 400:
        return Attempt("permanent", status, f"HTTP {status}: redirect not followed", seconds)
    if 400 <= status < 500:
        return Attempt("permanent", status, f"HTTP {status}", seconds)
    return Attempt("retry", status, f"HTTP {status}", seconds)


def _since(started: float) -> float:
    return time.perf_counter() - started


@dataclass(frozen=True)
class DeliveryPolicy:
    """How a :class:`Deliverer` sends: the retry ``schedule`` (seconds before each retry),
    the HTTP ``timeout``, whether private addresses are allowed, the delivery lease's
    ``lease_ttl``, how often it looks at the outbox (``poll``) and how many endpoints it
    sends to at once (``concurrency``)."""

    schedule: tuple[float, ...]
    timeout: float = 10.0
    allow_private: bool = False
    lease_ttl: float = 30.0
    poll: float = 1.0
    concurrency: int = 8

    @classmethod
    def from_config(cls, config: ProwziConfig) -> DeliveryPolicy:
        from prowzi.config.webhooks import parse_schedule

        return cls(
            schedule=parse_schedule(config.webhook_retry_schedule),
            timeout=config.webhook_timeout_seconds,
            allow_private=config.webhook_allow_private,
            lease_ttl=config.lease_ttl_seconds,
        )


class Deliverer:
    """The background worker of one outbox (see the module doc)."""

    def __init__(
        self,
        outbox: Outbox,
        subscriptions: Callable[[], dict[str, Subscription]],
        policy: DeliveryPolicy,
        *,
        rng: Callable[[], float] = random.random,
        on_scan: Callable[[], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self._subscriptions = subscriptions
        self.policy = policy
        self._on_scan = on_scan
        self._rng = rng
        self._senders: _Senders | None = None
        self._in_flight: set[tuple[str, str]] = set()
        self.observers: list[WebhookObserver] = []
        self._cond = threading.Condition()
        self._lanes: dict[tuple[str, str], list[str]] = {}
        self._next_at: dict[tuple[str, str], float] = {}
        self._pending: set[str] = set()
        self.written: set[str] = set()
        """Entries this process wrote and has not seen finished (what ``prowzi run`` waits
        for at its end)."""
        self._entries: dict[str, Entry] = {}
        self._disabled: dict[str, str] = {}
        self._held: HeldLease | None = None
        self._stopping = False
        self._wake = False
        self._next_scan = 0.0
        self._warned: set[str] = set()
        self._client: httpx.Client | None = None
        self._thread: threading.Thread | None = None

    # --- what other threads call ----------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="prowzi-webhooks", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the worker thread was started (and not stopped)."""
        with self._cond:
            return self._thread is not None and not self._stopping

    def added(self, entries: Iterable[Entry]) -> None:
        """Entries this process just wrote: queue them and wake the worker."""
        with self._cond:
            for entry in entries:
                self.written.add(entry.name)
                self._entries[entry.name] = entry
                self._queue(entry.name)
            self._wake = True
            self._cond.notify_all()

    def unfinished(self) -> list[str]:
        """The entries this process wrote that it has not seen finished."""
        with self._cond:
            return list(self.written)

    def disabled(self) -> dict[str, str]:
        with self._cond:
            return dict(self._disabled)

    @property
    def holds_lease(self) -> bool:
        return self._held is not None

    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def oldest_pending_age(self) -> float:
        """Seconds since the oldest pending entry was written (0 when none is)."""
        with self._cond:
            oldest = min((parse_name(name) for name in self._pending), default=None, key=_seq_of)
        if oldest is None:
            return 0.0
        return max(0.0, time.time() - int(oldest[2]) / 1e9)

    def drain(self, names: Iterable[str], timeout: float) -> list[str]:
        """Wait up to ``timeout`` seconds for these entries to be delivered (or given up);
        returns those still pending."""
        remaining = list(names)
        deadline = time.monotonic() + timeout
        while remaining:
            if self.holds_lease:
                with self._cond:
                    remaining = [n for n in remaining if n in self._pending]
            else:  # another process delivers: look in the store
                remaining = [n for n in remaining if self.outbox.store.head(n) is not None]
            left = deadline - time.monotonic()
            if not remaining or left <= 0:
                break
            with self._cond:
                self._cond.wait(min(left, 0.05))
        return remaining

    def stop(self) -> None:
        """Stop the thread and give the lease up (pending entries stay in the outbox)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.policy.timeout + 5)
        if self._senders is not None:
            self._senders.stop()  # an attempt in flight is abandoned: it is sent again later
        held, self._held = self._held, None
        if held is not None:
            held.release()
        with self._cond:
            idle = not self._in_flight
        if self._client is not None and idle:
            self._client.close()

    # --- the worker thread ----------------------------------------------------------------

    def _queue(self, name: str) -> None:
        parsed = parse_name(name)
        if parsed is None or name in self._pending:
            return
        lane = (parsed[0], parsed[1])
        bisect.insort(self._lanes.setdefault(lane, []), name)
        self._pending.add(name)

    def _done(self, lane: tuple[str, str], name: str) -> None:
        with self._cond:
            names = self._lanes.get(lane, [])
            if name in names:
                names.remove(name)
            if not names:
                self._lanes.pop(lane, None)
                self._next_at.pop(lane, None)
            self._pending.discard(name)
            self._entries.pop(name, None)
            self.written.discard(name)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
            wait = self.policy.poll
            try:
                self._keep_lease()
                if time.monotonic() >= self._next_scan:
                    self._scan()
                    self._next_scan = time.monotonic() + self.policy.poll
                if self._held is not None:
                    wait = self._deliver_due()
            except Exception as exc:  # the store is down, say: try again later
                log.warning("webhook delivery: %s: %s", type(exc).__name__, exc)
            with self._cond:
                if not self._wake and not self._stopping and wait > 0:
                    self._cond.wait(min(wait, self.policy.poll))
                self._wake = False

    def _keep_lease(self) -> None:
        if self._held is not None and self._held.lost is not None:
            self._held = None
        if self._held is None:
            from prowzi.storage.lease import SessionLeases

            try:
                held = SessionLeases(self.outbox.store, ttl=self.policy.lease_ttl).hold(LEASE_NAME)
            except SessionLockedError:
                return
            try:
                self._scan()  # a new holder knows the whole outbox before it says it holds
            except BaseException:
                held.release()
                raise
            self._held = held
            self._next_scan = time.monotonic() + self.policy.poll

    def _scan(self) -> None:
        if self._on_scan is not None:
            self._on_scan()  # subscriptions made or deleted elsewhere (the service's API)
        names = set(self.outbox.pending_names())
        disabled = self.outbox.disabled_endpoints()
        with self._cond:
            self._disabled = disabled
            for name in names - self._pending:
                self._queue(name)
            for name in self._pending - names:
                parsed = parse_name(name)
                if parsed is not None and name not in self._entries:
                    self._done((parsed[0], parsed[1]), name)

    def _deliver_due(self) -> float:
        """Start an attempt on each lane whose head is due and that has none in flight (in
        the sender pool: lanes go in parallel, each lane one at a time); returns how long
        to wait before looking again."""
        subscriptions = self._subscriptions()
        now = time.time()
        wait = self.policy.poll
        with self._cond:
            lanes = [
                (lane, names[0])
                for lane, names in self._lanes.items()
                if names and lane not in self._in_flight
            ]
        for lane, name in lanes:
            if self._stopping:
                return 0.0
            due = self._next_at.get(lane, 0.0)
            if due > now:
                wait = min(wait, due - now)
                continue
            endpoint = lane[0]
            subscription = subscriptions.get(endpoint)
            if subscription is None:
                if endpoint not in self._warned:
                    self._warned.add(endpoint)
                    log.warning(
                        "webhook endpoint %s has pending deliveries but no subscription "
                        "configured here; they wait in the outbox",
                        endpoint,
                    )
                continue
            if self._senders is None:
                self._senders = _Senders(self.policy.concurrency)
            with self._cond:
                self._in_flight.add(lane)
            self._senders.submit(self._try_head, lane, name, subscription)
        return max(0.0, wait)

    def _http(self) -> httpx.Client:
        with self._cond:
            if self._client is None:
                self._client = new_client(self.policy.timeout)
            return self._client

    def _try_head(self, lane: tuple[str, str], name: str, subscription: Subscription) -> None:
        """One attempt on a lane's head (in a sender thread)."""
        try:
            entry = self._entries.get(name) or self.outbox.load(name)
            if entry is None:
                self._done(lane, name)
            elif entry.next_attempt_at > time.time():
                with self._cond:
                    self._next_at[lane] = entry.next_attempt_at
            else:
                self._attempt(lane, entry, subscription)
        except Exception as exc:  # the store is down, say: the lane is tried again later
            log.warning("webhook delivery of %s: %s: %s", name, type(exc).__name__, exc)
            with self._cond:
                self._next_at[lane] = time.time() + self.policy.poll
        finally:
            with self._cond:
                self._in_flight.discard(lane)
                self._wake = True
                self._cond.notify_all()

    def _attempt(self, lane: tuple[str, str], entry: Entry, subscription: Subscription) -> None:
        if entry.endpoint in self._disabled:
            self.outbox.finish(entry, "disabled")
            self._observe(entry.type, "disabled", None)
            self._done(lane, entry.name)
            return
        result = send(
            self._http(),
            subscription,
            entry.id,
            entry.body,
            allow_private=self.policy.allow_private,
        )
        attempts = entry.attempts + 1
        entry = replace(
            entry, attempts=attempts, last_status=result.status, last_error=result.error
        )
        if result.outcome == "ok":
            self.outbox.finish(entry, "delivered", latency=result.seconds)
            self._observe(entry.type, "delivered", result.seconds)
            self._done(lane, entry.name)
            return
        if result.outcome == "gone":
            self.outbox.set_disabled(entry.endpoint, True, "410 Gone")
            with self._cond:
                self._disabled[entry.endpoint] = "410 Gone"
            log.warning("webhook endpoint %s answered 410 Gone: disabled", entry.endpoint)
        if result.outcome in ("gone", "permanent") or attempts > len(self.policy.schedule):
            outcome = "disabled" if result.outcome == "gone" else "failed"
            self.outbox.finish(entry, outcome, latency=result.seconds)
            self._observe(entry.type, outcome, result.seconds)
            self._done(lane, entry.name)
            return
        delay = self.policy.schedule[attempts - 1] * (1 - JITTER + 2 * JITTER * self._rng())
        if result.retry_after is not None:
            delay = result.retry_after
        entry = replace(entry, next_attempt_at=time.time() + delay)
        entry = self.outbox.reschedule(entry)
        with self._cond:
            if entry.name in self._pending:
                self._entries[entry.name] = entry
        with self._cond:
            self._next_at[lane] = entry.next_attempt_at
        self._observe(entry.type, "retrying", result.seconds)

    def _observe(self, event_type: str, outcome: str, seconds: float | None) -> None:
        for observer in self.observers:
            try:
                observer.delivery(event_type, outcome, seconds)
            except Exception:  # metrics never stop deliveries
                log.exception("webhook observer failed")


def _seq_of(parsed: tuple[str, str, str, str] | None) -> int:
    return int(parsed[2]) if parsed is not None and parsed[2].isdigit() else 0


class _Senders:
    """``count`` daemon threads taking attempts from a queue. Daemon threads, not a
    ``ThreadPoolExecutor``, whose threads the interpreter joins at exit: an attempt waiting on
    a slow receiver must not hold up the end of ``prowzi run`` past its bounded wait."""

    def __init__(self, count: int) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None]
        self._queue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"prowzi-webhook-send-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._queue.put((fn, args))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            fn(*args)

    def stop(self) -> None:
        for _thread in self._threads:
            self._queue.put(None)

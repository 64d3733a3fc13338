"""Webhook notifications: signed per Standard Webhooks, retried, never lost.

:func:`webhooks_for` gives the process's :class:`Webhooks` for a config: its outbox (a blob
store beside the checkpoints), its subscriptions (settings and API) and its delivery worker,
one per outbox location and process. :class:`~prowzi.webhooks.sink.WebhookSink` feeds the
outbox from a run's events.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import TYPE_CHECKING

from prowzi.webhooks.delivery import Deliverer, DeliveryPolicy
from prowzi.webhooks.outbox import Outbox
from prowzi.webhooks.subscriptions import Subscription, from_settings, from_store

if TYPE_CHECKING:
    from prowzi.config import ProwziConfig
    from prowzi.storage.blob import BlobStore
    from prowzi.webhooks.outbox import Entry

__all__ = [
    "Subscription",
    "Webhooks",
    "close_all",
    "drain",
    "release",
    "require_sending",
    "running",
    "wanted",
    "webhooks_for",
]


def require_sending() -> None:
    """``ConfigError`` unless the ``webhooks`` extra (what sending needs; writing the outbox
    does not) is installed."""
    import importlib.util

    from prowzi.errors import ConfigError

    missing = [m for m in ("standardwebhooks", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"webhooks need {' and '.join(missing)}: pip install 'prowzi[webhooks]'")


class Webhooks:
    """One outbox, its subscriptions and its delivery worker."""

    def __init__(self, config: ProwziConfig, store: BlobStore | None = None) -> None:
        from prowzi.storage.remote import open_store

        self.outbox = Outbox(
            store
            if store is not None
            else open_store(config.webhook_outbox_location, durable=config.checkpoint_fsync)
        )
        self.link_base = config.webhook_link_base
        self.allow_private = config.webhook_allow_private
        self._settings = {s.id: s for s in from_settings(config)}
        self._stored: dict[str, Subscription] = {}
        self._stored_at = float("-inf")
        self._lock = threading.Lock()
        self.deliverer = Deliverer(
            self.outbox, self.subscriptions, DeliveryPolicy.from_config(config), on_scan=self.reload
        )

    def subscriptions(self) -> dict[str, Subscription]:
        """Endpoint id -> subscription: the settings' and the stored ones (read from the
        store the first time, then again by :meth:`reload`: the worker does every second)."""
        if self._stored_at == float("-inf"):
            self.reload()
        with self._lock:
            return {**self._stored, **self._settings}

    def reload(self) -> None:
        """Read the stored subscriptions again (blocking: not on an event loop)."""
        stored = {s.id: s for s in from_store(self.outbox)}
        with self._lock:
            self._stored = stored
            self._stored_at = time.monotonic()

    def subscribed(self, event_type: str) -> list[Subscription]:
        """The subscriptions that receive ``event_type`` (a disabled endpoint's deliveries
        are still written, and logged ``disabled``: the log shows what it missed)."""
        return [s for s in self.subscriptions().values() if s.wants(event_type)]

    def start(self) -> Webhooks:
        """Start the delivery worker."""
        require_sending()
        self.deliverer.start()
        return self

    def write(self, endpoints: list[str], session_id: str, event_type: str, body: str) -> None:
        """Put one event's deliveries in the outbox, durably (blocking); this process's
        delivery worker, when it runs, is told of them at once."""
        entries: list[Entry] = []
        try:
            for endpoint in endpoints:
                entries.append(self.outbox.enqueue(endpoint, session_id, event_type, body))
        finally:
            if self.deliverer.running:
                self.deliverer.added(entries)


log = logging.getLogger("prowzi.webhooks")

_REGISTRY: dict[str, Webhooks] = {}
_REGISTRY_LOCK = threading.Lock()


def _key(config: ProwziConfig) -> str:
    """What makes two configs share one :class:`Webhooks` in a process."""
    return repr(
        (
            str(config.webhook_outbox_location),
            config.webhook_url,
            config.webhook_secret.get_secret_value() if config.webhook_secret else None,
            config.webhook_events,
            config.webhooks,
            config.webhook_allow_private,
            config.webhook_retry_schedule,
            config.webhook_timeout_seconds,
        )
    )


def webhooks_for(config: ProwziConfig) -> Webhooks:
    """This process's :class:`Webhooks` for the config's outbox, started."""
    key = _key(config)
    with _REGISTRY_LOCK:
        found = _REGISTRY.get(key)
        if found is None:
            found = _REGISTRY[key] = Webhooks(config).start()
            if len(_REGISTRY) == 1:
                atexit.register(close_all)
    return found


def running(config: ProwziConfig) -> Webhooks | None:
    """This process's delivering :class:`Webhooks` for the config if something started
    them (:func:`webhooks_for`), else ``None`` (starts nothing, reads nothing)."""
    with _REGISTRY_LOCK:
        return _REGISTRY.get(_key(config))


def wanted(config: ProwziConfig) -> bool:
    """Whether this config has webhooks to run: the settings name an endpoint, or the
    outbox holds subscriptions (made through the service's API) or deliveries an earlier
    process left. Blocking (one or two listings of the store): not on an event loop."""
    if config.webhooks_configured:
        return True
    from prowzi.storage.remote import open_store
    from prowzi.webhooks.outbox import OUTBOX, SUBSCRIPTIONS

    store = open_store(config.webhook_outbox_location)
    try:
        return bool(store.list(SUBSCRIPTIONS) or store.list(OUTBOX))
    except OSError as exc:  # the store is down: the service looks again a little later
        log.warning("cannot read the webhook outbox at %s: %s", store.url, exc)
        return False


def drain(config: ProwziConfig, timeout: float | None = None) -> int:
    """Wait (up to ``timeout``, default ``webhook_drain_seconds``) for the deliveries this
    process wrote to the config's outbox; returns how many are still pending."""
    with _REGISTRY_LOCK:
        found = list(_REGISTRY.values())
    wait = config.webhook_drain_seconds if timeout is None else timeout
    deadline = time.monotonic() + wait
    remaining = 0
    for webhooks in found:
        deliverer = webhooks.deliverer
        left = deliverer.drain(deliverer.unfinished(), max(0.0, deadline - time.monotonic()))
        remaining += len(left)
    return remaining


def release(webhooks: Webhooks) -> None:
    """Stop one :class:`Webhooks`' worker and forget it (a service shutting down)."""
    with _REGISTRY_LOCK:
        for key, value in list(_REGISTRY.items()):
            if value is webhooks:
                del _REGISTRY[key]
    webhooks.deliverer.stop()


def close_all() -> None:
    """Stop every worker and release their leases (pending entries stay in the outbox)."""
    with _REGISTRY_LOCK:
        found = list(_REGISTRY.values())
        _REGISTRY.clear()
    for webhooks in found:
        webhooks.deliverer.stop()

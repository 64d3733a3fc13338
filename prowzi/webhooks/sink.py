"""The event sink that puts a run's webhook deliveries in the outbox.

Each event webhooks send (:func:`prowzi.events.webhook_type`) becomes one entry per
subscribed endpoint, written durably (a create-only put) in a worker thread while the run
waits: the run moves on only once its deliveries cannot be lost. Sending is the background
worker's business (:class:`~prowzi.webhooks.delivery.Deliverer`), so a slow or dead
receiver never slows the run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from prowzi.events import Event, webhook_type
from prowzi.webhooks.payload import build_payload, encode_payload

if TYPE_CHECKING:
    from prowzi.config import ProwziConfig
    from prowzi.webhooks import Webhooks


class WebhookSink:
    """A run's deliveries to ``webhooks``' subscriptions (only those in ``only``, when
    given)."""

    name = "webhook"

    def __init__(self, webhooks: Webhooks, only: frozenset[str] | None = None) -> None:
        self.webhooks = webhooks
        self.only = only

    def handle(self, event: Event) -> Awaitable[None] | None:
        deliveries = self._deliveries(event)
        if deliveries is None:
            return None
        return asyncio.to_thread(self.webhooks.write, *deliveries)

    def write(self, event: Event) -> None:
        """:meth:`handle` in the calling thread (blocking)."""
        deliveries = self._deliveries(event)
        if deliveries is not None:
            self.webhooks.write(*deliveries)

    def _deliveries(self, event: Event) -> tuple[list[str], str, str, str] | None:
        """(endpoints, session id, event type, body) of the deliveries ``event`` makes."""
        event_type = webhook_type(event)
        if event_type is None:
            return None
        subscriptions = [
            s
            for s in self.webhooks.subscribed(event_type)
            if self.only is None or s.id in self.only
        ]
        if not subscriptions:
            return None
        body = encode_payload(build_payload(event, event_type, link_base=self.webhooks.link_base))
        return [s.id for s in subscriptions], event.session_id, event_type, body


log = logging.getLogger("prowzi.webhooks")

_RUN_ENDS = frozenset({"run.completed", "run.failed", "run.cancelled", "run.budget_exceeded"})


class StoredSubscriptionsSink:
    """The webhook sink of a process whose settings name no endpoint (a CLI run, a worker,
    the service): the subscriptions made through the service's API live in the outbox, and
    get the events of every run that shares it and starts after them.

    At each run's start it reads them (one listing, in a worker thread, while the run
    waits); a run that starts with none sends nothing, else each of its events is written
    to the outbox for the subscriptions it started with, in order. The sending is left to
    a process that delivers, with its own settings (addresses allowed, retry schedule):
    this one if its webhooks run (the service's), else the service, whose worker reads the
    shared outbox every second. Writing needs neither the delivery worker nor the
    ``webhooks`` extra."""

    name = "webhook"

    def __init__(self, config: ProwziConfig) -> None:
        self.config = config
        self._writer: Webhooks | None = None
        self._runs: dict[str, WebhookSink] = {}
        """Session -> its sink, for the runs that started with subscriptions (touched on
        the event loop only)."""

    def handle(self, event: Event) -> Awaitable[None] | None:
        event_type = webhook_type(event)
        if event_type == "run.started":
            self._runs.pop(event.session_id, None)  # a resume starts over
            return self._started(event)
        sink = self._runs.get(event.session_id)
        if sink is None:
            return None
        if event_type in _RUN_ENDS:
            del self._runs[event.session_id]
        return sink.handle(event)

    async def _started(self, event: Event) -> None:
        sink = await asyncio.to_thread(self._start, event)
        # Known only once its start is in the outbox (a start that timed out or was
        # cancelled registers nothing): nothing of the run goes before it.
        if sink is not None:
            self._runs[event.session_id] = sink

    def _start(self, event: Event) -> WebhookSink | None:
        from prowzi.webhooks import Webhooks, running

        webhooks = running(self.config)  # a delivering process: it reads them every second
        if webhooks is None:
            if self._writer is None:
                self._writer = Webhooks(self.config)
            webhooks = self._writer
            try:
                webhooks.reload()
            except OSError as exc:  # the outbox cannot be read: this run sends nothing
                log.warning(
                    "webhooks: cannot read the outbox at %s: %s", webhooks.outbox.store.url, exc
                )
                return None
        subscribed = frozenset(webhooks.subscriptions())
        if not subscribed:
            return None
        sink = WebhookSink(webhooks, only=subscribed)
        sink.write(event)  # a failed write is the run's sink error, as for the settings'
        return sink

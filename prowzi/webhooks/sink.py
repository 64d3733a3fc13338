"""The event sink that puts a run's webhook deliveries in the outbox.

Each event webhooks send (:func:`prowzi.events.webhook_type`) becomes one entry per
subscribed endpoint, written durably (a create-only put) in a worker thread while the run
waits: the run moves on only once its deliveries cannot be lost. Sending is the background
worker's business (:class:`~prowzi.webhooks.delivery.Deliverer`), so a slow or dead
receiver never slows the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from prowzi.events import Event, webhook_type
from prowzi.webhooks.payload import build_payload, encode_payload

if TYPE_CHECKING:
    from prowzi.config import ProwziConfig
    from prowzi.webhooks import Webhooks
    from prowzi.webhooks.outbox import Entry


class WebhookSink:
    name = "webhook"

    def __init__(self, webhooks: Webhooks) -> None:
        self.webhooks = webhooks

    def handle(self, event: Event) -> Awaitable[None] | None:
        deliveries = self._deliveries(event)
        if deliveries is None:
            return None
        return asyncio.to_thread(self._write, *deliveries)

    def write(self, event: Event) -> None:
        """:meth:`handle` in the calling thread (blocking)."""
        deliveries = self._deliveries(event)
        if deliveries is not None:
            self._write(*deliveries)

    def _deliveries(self, event: Event) -> tuple[list[str], str, str, str] | None:
        """(endpoints, session id, event type, body) of the deliveries ``event`` makes."""
        event_type = webhook_type(event)
        if event_type is None:
            return None
        subscriptions = self.webhooks.subscribed(event_type)
        if not subscriptions:
            return None
        body = encode_payload(build_payload(event, event_type, link_base=self.webhooks.link_base))
        return [s.id for s in subscriptions], event.session_id, event_type, body

    def _write(self, endpoints: list[str], session_id: str, event_type: str, body: str) -> None:
        entries: list[Entry] = []
        try:
            for endpoint in endpoints:
                entries.append(self.webhooks.outbox.enqueue(endpoint, session_id, event_type, body))
        finally:
            self.webhooks.deliverer.added(entries)


class LateWebhookSink:
    """The webhook sink of a process whose settings name no endpoint (a CLI run, a worker,
    the service): subscriptions made later through the service's API, which live in the
    outbox, still get every run's events.

    Until this process's webhooks run it passes events by, with two looks: at each event,
    whether something in the process started them (the service's API, at its first
    subscription); at each run's start, whether the outbox holds subscriptions or pending
    deliveries (:func:`~prowzi.webhooks.wanted`, one listing in a worker thread) - if so,
    it starts them. From then on it is a :class:`WebhookSink`."""

    name = "webhook"

    def __init__(self, config: ProwziConfig) -> None:
        self.config = config
        self._sink: WebhookSink | None = None

    def handle(self, event: Event) -> Awaitable[None] | None:
        if self._sink is None:
            from prowzi.webhooks import running

            found = running(self.config)
            if found is None:
                if webhook_type(event) != "run.started":
                    return None
                return asyncio.to_thread(self._start_if_wanted, event)
            self._sink = WebhookSink(found)
        return self._sink.handle(event)

    def _start_if_wanted(self, event: Event) -> None:
        from prowzi.webhooks import wanted, webhooks_for

        if self._sink is None and wanted(self.config):
            self._sink = WebhookSink(webhooks_for(self.config))
        if self._sink is not None:
            self._sink.write(event)

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
    from prowzi.webhooks import Webhooks
    from prowzi.webhooks.outbox import Entry


class WebhookSink:
    name = "webhook"

    def __init__(self, webhooks: Webhooks) -> None:
        self.webhooks = webhooks

    def handle(self, event: Event) -> Awaitable[None] | None:
        event_type = webhook_type(event)
        if event_type is None:
            return None
        subscriptions = self.webhooks.subscribed(event_type)
        if not subscriptions:
            return None
        body = encode_payload(build_payload(event, event_type, link_base=self.webhooks.link_base))
        endpoints = [s.id for s in subscriptions]
        return asyncio.to_thread(self._write, endpoints, event.session_id, event_type, body)

    def _write(self, endpoints: list[str], session_id: str, event_type: str, body: str) -> None:
        entries: list[Entry] = []
        try:
            for endpoint in endpoints:
                entries.append(self.webhooks.outbox.enqueue(endpoint, session_id, event_type, body))
        finally:
            self.webhooks.deliverer.added(entries)

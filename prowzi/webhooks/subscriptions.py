"""Webhook subscriptions: from the settings, and made through the service's API.

An endpoint from the settings is named by its URL (``ep-`` and 16 hex digits of its sha256),
so every process with the same settings delivers the same outbox, and a rotated secret keeps
the endpoint's queue. One made through the API gets a random ``sub-`` id and is stored, with
its secret, in the outbox's store.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from prowzi.config.webhooks import (
    check_events,
    check_url,
    configured_endpoints,
    literal_private,
)
from prowzi.errors import InvalidInputError

if TYPE_CHECKING:
    from prowzi.config import ProwziConfig
    from prowzi.webhooks.outbox import Outbox


@dataclass(frozen=True, slots=True)
class Subscription:
    id: str
    url: str
    secret: SecretStr
    events: tuple[str, ...] | None
    """None: every event type."""
    source: str
    """``settings`` or ``api``."""
    created_at: float | None = None
    previous_secret: SecretStr | None = None
    """The secret before the last rotation, also signed with until ``previous_until``."""
    previous_until: float = 0.0

    def previous_secrets(self, now: float) -> tuple[str, ...]:
        if self.previous_secret is None or now >= self.previous_until:
            return ()
        return (self.previous_secret.get_secret_value(),)

    def wants(self, event_type: str) -> bool:
        return self.events is None or event_type in self.events

    def public(self) -> dict[str, Any]:
        """What may be shown: everything but the secret."""
        return {
            "id": self.id,
            "url": self.url,
            "events": list(self.events) if self.events is not None else None,
            "source": self.source,
            "created_at": self.created_at,
        }


def endpoint_id(url: str) -> str:
    return "ep-" + hashlib.sha256(url.encode()).hexdigest()[:16]


def new_secret() -> str:
    """A fresh Standard Webhooks secret (32 random bytes)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def from_settings(config: ProwziConfig) -> list[Subscription]:
    return [
        Subscription(endpoint_id(e.url), e.url, e.secret, e.events, "settings")
        for e in configured_endpoints(config)
    ]


def from_store(outbox: Outbox) -> list[Subscription]:
    found = []
    for record in outbox.stored_subscriptions():
        try:
            found.append(
                Subscription(
                    str(record["id"]),
                    str(record["url"]),
                    SecretStr(str(record["secret"])),
                    tuple(record["events"]) if record.get("events") else None,
                    "api",
                    record.get("created_at"),
                    SecretStr(str(record["previous_secret"]))
                    if record.get("previous_secret")
                    else None,
                    float(record.get("previous_until") or 0.0),
                )
            )
        except (KeyError, TypeError):
            continue
    return found


def create(
    outbox: Outbox,
    url: str,
    events: list[str] | None,
    *,
    allow_private: bool,
    resolve: bool = True,
) -> tuple[Subscription, str]:
    """Store a new subscription; returns it and its secret (shown once, never again).
    ``InvalidInputError`` for a bad URL, unknown event types or a private address (checked
    after DNS resolution unless ``resolve`` is False)."""
    from prowzi.webhooks.safety import UnsafeAddressError, resolve_public

    try:
        url = check_url(url)
        checked = check_events(events) if events else None
    except ValueError as exc:
        raise InvalidInputError(f"invalid subscription: {exc}") from None
    if not allow_private:
        problem = literal_private(url)
        if problem is None and resolve:
            try:
                resolve_public(url)
            except UnsafeAddressError as exc:
                problem = str(exc)
            except OSError:
                problem = None  # cannot resolve now: checked again at each delivery
        if problem:
            raise InvalidInputError(
                f"webhook endpoint {url} refused: {problem} (set "
                "PROWZI_WEBHOOK_ALLOW_PRIVATE=true to allow private addresses)"
            )
    secret = new_secret()
    subscription = Subscription(
        "sub-" + secrets.token_hex(8), url, SecretStr(secret), checked, "api", time.time()
    )
    outbox.put_subscription(
        {
            "id": subscription.id,
            "url": url,
            "secret": secret,
            "events": list(checked) if checked else None,
            "created_at": subscription.created_at,
        },
        create=True,
    )
    return subscription, secret


ROTATION_GRACE_SECONDS = 86400.0
"""For a day after a rotation, deliveries are signed with the old secret too."""


def rotate(outbox: Outbox, subscription: Subscription) -> str:
    """Give an API subscription a new secret; returns it (shown once). For
    :data:`ROTATION_GRACE_SECONDS` deliveries carry a signature with the old one as well,
    so receivers can switch without missing a delivery."""
    secret = new_secret()
    outbox.put_subscription(
        {
            "id": subscription.id,
            "url": subscription.url,
            "secret": secret,
            "events": list(subscription.events) if subscription.events else None,
            "created_at": subscription.created_at,
            "previous_secret": subscription.secret.get_secret_value(),
            "previous_until": time.time() + ROTATION_GRACE_SECONDS,
        },
        create=False,
    )
    return secret

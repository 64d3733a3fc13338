"""The service's webhook subscriptions API: create, list, delete, rotate a secret.

A secret is in the answer to the create (and rotate) request only, never again: listings
show everything else. Subscriptions from the settings are listed (``source: settings``) but
changed only through the settings. Store work runs in worker threads, off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from prowzi.errors import InvalidInputError
from prowzi.webhooks import Webhooks


class SubscriptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(min_length=1, max_length=2048, description="http:// or https:// URL.")
    events: list[str] | None = Field(
        None, description="Event types to receive (default: all), e.g. ['run.completed']."
    )


class SubscriptionInfo(BaseModel):
    id: str
    url: str
    events: list[str] | None
    source: str
    created_at: float | None = None
    disabled: str | None = Field(None, description="Why deliveries to it stopped (410 Gone).")


class SubscriptionCreated(SubscriptionInfo):
    secret: str = Field(description="The signing secret: shown now, never again.")


class SecretRotated(BaseModel):
    id: str
    secret: str = Field(description="The new signing secret: shown now, never again.")


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def webhook_router(webhooks: Callable[[], Webhooks], allow_private: bool) -> APIRouter:
    """The ``/webhooks/subscriptions`` endpoints over ``webhooks()`` (the service's)."""
    from prowzi.webhooks import subscriptions as subs

    router = APIRouter(prefix="/webhooks/subscriptions", tags=["webhooks"])

    def info(subscription: subs.Subscription, disabled: dict[str, str]) -> dict[str, Any]:
        return {**subscription.public(), "disabled": disabled.get(subscription.id)}

    @router.post("", status_code=201, response_model=SubscriptionCreated)
    async def create(body: SubscriptionRequest) -> Any:
        hub = webhooks()
        try:
            subscription, secret = await asyncio.to_thread(
                subs.create, hub.outbox, body.url, body.events, allow_private=allow_private
            )
        except InvalidInputError as exc:
            return _error(400, str(exc))
        await asyncio.to_thread(hub.reload)
        return {**info(subscription, {}), "secret": secret}

    @router.get("", response_model=list[SubscriptionInfo])
    async def list_subscriptions() -> Any:
        hub = webhooks()
        await asyncio.to_thread(hub.reload)
        found = hub.subscriptions()
        disabled = hub.deliverer.disabled()
        return [info(s, disabled) for s in found.values()]

    async def _stored(subscription_id: str) -> subs.Subscription | JSONResponse:
        hub = webhooks()
        await asyncio.to_thread(hub.reload)
        found = hub.subscriptions().get(subscription_id)
        if found is None:
            return _error(404, f"no webhook subscription {subscription_id}")
        if found.source != "api":
            return _error(409, f"{subscription_id} comes from the settings; change them there")
        return found

    @router.delete(
        "/{subscription_id}", status_code=204, response_class=Response, response_model=None
    )
    async def delete(subscription_id: str) -> Any:
        found = await _stored(subscription_id)
        if isinstance(found, JSONResponse):
            return found
        hub = webhooks()
        await asyncio.to_thread(hub.outbox.delete_subscription, found.id)
        await asyncio.to_thread(hub.reload)
        return Response(status_code=204)

    @router.post("/{subscription_id}/rotate", response_model=SecretRotated)
    async def rotate(subscription_id: str) -> Any:
        found = await _stored(subscription_id)
        if isinstance(found, JSONResponse):
            return found
        hub = webhooks()
        secret = await asyncio.to_thread(subs.rotate, hub.outbox, found)
        await asyncio.to_thread(hub.reload)
        return {"id": found.id, "secret": secret}

    return router

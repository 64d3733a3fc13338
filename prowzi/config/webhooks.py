"""Checks of the webhook settings (``PROWZI_WEBHOOK_*`` and ``PROWZI_WEBHOOKS``).

Pure functions, no I/O: a literal private address (``127.0.0.1``, ``localhost``, ``10.x``,
``169.254.169.254``) is refused here, when the settings are read; a host name is checked
again after DNS resolution, at each delivery (:mod:`prowzi.webhooks.safety`).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import orjson
from pydantic import AfterValidator, SecretStr

from prowzi.events import WEBHOOK_EVENT_TYPES

if TYPE_CHECKING:
    from prowzi.config.settings import ProwziConfig

SECRET_PREFIX = "whsec_"
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_RETRIES = 50


def check_url(value: str) -> str:
    """An ``http://`` or ``https://`` URL with a host and no credentials in it."""
    value = value.strip()
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("use an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    if parts.username or parts.password:
        raise ValueError("credentials do not belong in the URL (receivers verify the signature)")
    return value


def literal_private(url: str) -> str | None:
    """Why ``url``'s host is a private address as written (an IP literal or ``localhost``),
    or None. Host names are checked after resolution, at delivery."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return f"{host} is a loopback address"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return address_problem(address)


def address_problem(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> str | None:
    """Why a webhook must not go to ``address`` (loopback, private, link-local such as the
    cloud metadata address, ...), or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:
            return f"{address} is a site-local address"
        # An IPv6 address that carries an IPv4 one (mapped, 6to4, Teredo) is judged by it.
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is not None:
            address = embedded
    for kind in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
        if getattr(address, f"is_{kind}"):
            return f"{address} is a {kind.replace('_', '-')} address"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


def check_secret(value: SecretStr) -> SecretStr:
    """A Standard Webhooks secret: ``whsec_`` and the base64 of 24 to 64 random bytes."""
    raw = value.get_secret_value()
    if not raw.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(raw[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"a webhook secret is {SECRET_PREFIX!r} and base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"a webhook secret's key is 24 to 64 bytes, not {len(key)}")
    return value


def check_events(value: Any) -> tuple[str, ...]:
    """Event types from a comma-separated string or a list; each must be known."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("give event types as a comma-separated string or a list")
    events = tuple(str(item).strip() for item in items if str(item).strip())
    unknown = [e for e in events if e not in WEBHOOK_EVENT_TYPES]
    if unknown:
        raise ValueError(
            f"unknown event type(s) {', '.join(unknown)}; known: {', '.join(WEBHOOK_EVENT_TYPES)}"
        )
    if not events:
        raise ValueError("no event types")
    return events


def parse_schedule(value: str) -> tuple[float, ...]:
    """``"5s,5m,30m,2h"`` -> the delays in seconds (a bare number is seconds)."""
    delays = []
    for item in value.split(","):
        match = _DURATION_RE.fullmatch(item.strip().lower())
        if match is None:
            raise ValueError(f"{item.strip()!r} is not a delay such as 5s, 5m, 2h or 1d")
        delays.append(float(match.group(1)) * _UNITS[match.group(2)])
    if len(delays) > MAX_RETRIES:
        raise ValueError(f"at most {MAX_RETRIES} retries")
    return tuple(delays)


def _check_schedule(value: str) -> str:
    parse_schedule(value)
    return value


@dataclass(frozen=True, slots=True)
class EndpointSetting:
    """One endpoint as the settings give it."""

    url: str
    secret: SecretStr
    events: tuple[str, ...] | None


def parse_webhook_list(value: str) -> tuple[EndpointSetting, ...]:
    """``PROWZI_WEBHOOKS``: a JSON list of ``{url, secret, events}`` (the secret is never
    repeated in an error)."""
    try:
        items = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise ValueError("not a JSON list of {url, secret, events}") from None
    if not isinstance(items, list):
        raise ValueError("not a JSON list of {url, secret, events}")
    endpoints = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not {"url", "secret"} <= item.keys():
            raise ValueError(f"item {index} is not an object with url and secret")
        extra = sorted(item.keys() - {"url", "secret", "events"})
        if extra:
            raise ValueError(f"item {index}: unknown key(s) {', '.join(extra)}")
        if not isinstance(item["url"], str) or not isinstance(item["secret"], str):
            raise ValueError(f"item {index}: url and secret are strings")
        try:
            url = check_url(item["url"])
            secret = check_secret(SecretStr(item["secret"]))
            events = None if item.get("events") is None else check_events(item["events"])
        except ValueError as exc:
            raise ValueError(f"item {index}: {exc}") from None
        endpoints.append(EndpointSetting(url, secret, events))
    return tuple(endpoints)


def _check_webhook_list(value: str) -> str:
    parse_webhook_list(value)
    return value


WebhookUrl = Annotated[str, AfterValidator(check_url)]
WebhookSecret = Annotated[SecretStr, AfterValidator(check_secret)]
WebhookEvents = Annotated[str, AfterValidator(lambda v: ",".join(check_events(v)))]
WebhookList = Annotated[str, AfterValidator(_check_webhook_list)]
RetrySchedule = Annotated[str, AfterValidator(_check_schedule)]


def configured_endpoints(config: ProwziConfig) -> tuple[EndpointSetting, ...]:
    """Every endpoint the settings name: ``PROWZI_WEBHOOK_URL`` and ``PROWZI_WEBHOOKS``."""
    endpoints: list[EndpointSetting] = []
    if config.webhook_url and config.webhook_secret:
        events = check_events(config.webhook_events) if config.webhook_events else None
        endpoints.append(EndpointSetting(config.webhook_url, config.webhook_secret, events))
    if config.webhooks:
        endpoints.extend(parse_webhook_list(config.webhooks))
    return tuple(endpoints)


def check_webhook_settings(config: ProwziConfig) -> None:
    """What no single setting can check: a URL needs a secret, and a private address as
    written needs ``PROWZI_WEBHOOK_ALLOW_PRIVATE``."""
    if config.webhook_url and config.webhook_secret is None:
        raise ValueError(
            "webhook_url (PROWZI_WEBHOOK_URL) needs a secret: set PROWZI_WEBHOOK_SECRET"
        )
    if (config.webhook_secret or config.webhook_events) and not config.webhook_url:
        raise ValueError("PROWZI_WEBHOOK_SECRET and PROWZI_WEBHOOK_EVENTS need PROWZI_WEBHOOK_URL")
    if config.webhook_allow_private:
        return
    for endpoint in configured_endpoints(config):
        problem = literal_private(endpoint.url)
        if problem:
            variable = (
                "PROWZI_WEBHOOK_URL" if endpoint.url == config.webhook_url else "PROWZI_WEBHOOKS"
            )
            raise ValueError(
                f"webhook endpoint {endpoint.url} refused ({variable}): {problem}; set "
                "PROWZI_WEBHOOK_ALLOW_PRIVATE=true to allow private addresses"
            )

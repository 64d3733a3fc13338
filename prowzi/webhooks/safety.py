"""Where a webhook may go: public addresses only, checked after DNS resolution.

A host name is resolved here, every address it resolves to is checked (a name with one
private address among public ones is refused), and the request is then sent to the checked
address itself (the URL's host kept in ``Host`` and, for https, in the TLS server name), so a
second resolution cannot swap in another address (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

from prowzi.config.webhooks import address_problem


class UnsafeAddressError(ValueError):
    """The endpoint resolves to an address webhooks must not reach."""


def resolve(url: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address ``url``'s host resolves to (``OSError`` when it does not)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def resolve_public(url: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """:func:`resolve`, refusing (:class:`UnsafeAddressError`) if any address is private."""
    addresses = resolve(url)
    for address in addresses:
        problem = address_problem(address)
        if problem:
            host = urlsplit(url).hostname
            raise UnsafeAddressError(f"{host} resolves to {problem}")
    return addresses


def pinned(url: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """``url`` with its host replaced by ``address`` (the port, path and query kept)."""
    parts = urlsplit(url)
    host = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


def host_header(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc.rsplit("@", 1)[-1]


def connect_target(
    url: str, allow_private: bool
) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The URL to send to (pinned to a checked address) and that address."""
    addresses = resolve(url) if allow_private else resolve_public(url)
    if not addresses:
        raise OSError(f"{urlsplit(url).hostname} resolves to no address")
    return pinned(url, addresses[0]), addresses[0]

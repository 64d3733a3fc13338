"""Who hears about provider requests: the process's request observers.

Kept apart from the HTTP code (and free of its optional dependencies), so that the composition
root can register the Prometheus metrics as an observer without importing httpx.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Protocol

log = logging.getLogger("prowzi.providers")

REQUEST_OUTCOMES = ("ok", "rate_limited", "error", "cached")
"""What became of one provider request: answered (``ok``), refused with 429/503
(``rate_limited``), failed or answered with another error (``error``), or answered by the
on-disk cache without asking the service (``cached``)."""


class RequestObserver(Protocol):
    """Told about every provider request in the process (the Prometheus metrics are one)."""

    def provider_request(self, provider: str, outcome: str, seconds: float) -> None: ...


_observers: weakref.WeakSet[Any] = weakref.WeakSet()


def add_request_observer(observer: RequestObserver) -> None:
    """Tell ``observer`` about every provider request from now on. Held weakly: an observer
    nobody else holds (the metrics of a finished service, a test's registry) is dropped."""
    _observers.add(observer)


def notify(provider: str, outcome: str, seconds: float) -> None:
    for observer in list(_observers):
        try:
            observer.provider_request(provider, outcome, seconds)
        except Exception:  # an observer never breaks a search
            log.exception("provider request observer %r failed", observer)

"""HTTP for the providers: rate limits, ``Retry-After``, the on-disk cache, request accounting.

Why httpx: it is async (the search stage queries every provider at once on the run's event
loop) and its transports compose, so the rate limiter and the cache are layers around the
network rather than code in every provider; it is already what the test suite speaks HTTP
with. Why hishel for the cache: it is the maintained HTTP cache for httpx, follows RFC 9111
(validators: ``ETag``/``Last-Modified`` answered by 304) and keeps entries in one SQLite file
per provider with a TTL; a checkpoint-store blob per response would mean writing an HTTP cache
ourselves.

The layers of one provider's client, outermost first:

1. **cache** (hishel, RFC 9111, stale entries allowed up to ``provider_cache_ttl_seconds``
   unless the service said ``no-cache`` or ``must-revalidate``, in which case hishel
   revalidates with the validators it stored): a question answered within the TTL is answered
   from disk and nothing is sent, so a re-run or a resume sends zero requests;
2. **pacing and retries** (:class:`_ProviderTransport`): waits for the provider's
   :class:`RateLimiter` (its published spacing between requests and how many may be under way
   at once, shared by every run in the process; a stricter limit the service advertises in
   ``X-Rate-Limit-Limit``/``-Interval`` replaces the spacing); a 429 or 503 pauses *every*
   user of that provider for its ``Retry-After`` (seconds or an HTTP date) and is retried, up
   to ``provider_max_retries``;
   a ``Retry-After`` longer than ``provider_max_retry_after_seconds`` is not waited for;
   connection errors and other 5xx are retried with a short backoff;
3. **network** (httpx's own transport).

Every request is counted once, by provider and outcome (``ok``, ``rate_limited``, ``error``,
``cached``), in the search's :class:`RequestTally` and by the process's request observers
(:mod:`prowzi.sources.observe`; the Prometheus metrics are one, wired in
:mod:`prowzi.workflows.composition`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import ssl
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from prowzi.http import retry_after
from prowzi.sources.observe import REQUEST_OUTCOMES, notify

if TYPE_CHECKING:
    from hishel import AsyncBaseStorage

    from prowzi.config.settings import ProviderSettings

log = logging.getLogger("prowzi.providers")

OUTCOMES = REQUEST_OUTCOMES

PUBLISHED_INTERVALS: dict[str, float] = {
    # arXiv API Terms of Use: no more than one request every three seconds, one at a time.
    "arxiv": 3.0,
    # Crossref REST API: the polite pool (requests with a mailto) 10 requests per second and 3
    # at a time, the public pool 5 per second and 1 at a time (see interval_for and
    # PUBLISHED_CONCURRENCY; the service also advertises X-Rate-Limit-Limit/-Interval).
    "crossref": 0.1,
    # OpenAlex: at most 10 requests per second.
    "openalex": 0.1,
    # Semantic Scholar: 1 request per second with a key; the keyless pool is shared by all
    # users and throttled, so a keyless client waits 3 s (see interval_for).
    "semanticscholar": 1.0,
    # NCBI E-utilities: 3 requests per second without an API key, 10 with one.
    "pubmed": 1 / 3,
}
"""Seconds between two requests to each provider, from each service's published rules."""

PUBLISHED_CONCURRENCY: dict[str, int | None] = {
    "arxiv": 1,  # "a single connection at a time"
    "crossref": 3,  # the polite pool; the public pool's is 1 (see concurrency_for)
    "openalex": None,  # no published limit on requests at once
    "semanticscholar": 1,  # one request per second leaves nothing to overlap
    "pubmed": None,
}
"""How many requests to each provider may be under way at once (None: no published limit)."""

_BACKOFF_FIRST = 0.5
_POLL = 0.01
_BACKOFF_MAX = 8.0


def interval_for(provider: str, settings: ProviderSettings) -> float:
    """The pause between two requests to ``provider``: the setting if given, else the
    service's published rule (faster with a key where the service says so)."""
    if provider in settings.provider_intervals:
        return settings.provider_intervals[provider]
    if provider == "semanticscholar" and settings.semanticscholar_api_key is None:
        return 3.0
    if provider == "pubmed" and settings.pubmed_api_key is not None:
        return 0.1
    if provider == "crossref" and not settings.contact_email:
        return 0.2  # the public pool
    return PUBLISHED_INTERVALS[provider]


def concurrency_for(provider: str, settings: ProviderSettings) -> int | None:
    """How many requests to ``provider`` may be under way at once, by its published rules."""
    if provider == "crossref" and not settings.contact_email:
        return 1  # the public pool
    return PUBLISHED_CONCURRENCY[provider]


class RateLimiter:
    """Spaces the starts of requests to one service at least ``interval`` seconds apart, with
    at most ``concurrency`` under way at once (None: no limit).

    Thread-safe and free of any event loop, so concurrent runs in one process (the service's
    runs, or runs in worker threads with loops of their own) share it. A ``Retry-After``
    pushes the next start out for everyone (:meth:`hold`). Written here rather than taken from
    aiolimiter, whose limiter belongs to one event loop and knows nothing of ``Retry-After``.
    """

    def __init__(
        self,
        interval: float,
        concurrency: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.concurrency = concurrency
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0.0
        self._held_until = 0.0
        self._in_flight = 0
        self._last_start = 0.0

    def reserve(self) -> float:
        """Claim the next start; how long to wait for it."""
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
            self._last_start = start
            return start - now

    def slow_to(self, interval: float) -> None:
        """Space requests at least ``interval`` apart from now on, counting from the last
        start (a stricter limit the service advertised)."""
        with self._lock:
            if interval > self.interval:
                self.interval = interval
                self._next = max(self._next, self._last_start + interval)

    def hold(self, seconds: float) -> None:
        """No request starts within ``seconds`` from now, not even one already waiting."""
        with self._lock:
            until = self._clock() + seconds
            self._held_until = max(self._held_until, until)
            self._next = max(self._next, until)

    def held(self) -> float:
        """How long a hold still lasts (0: none)."""
        with self._lock:
            return max(0.0, self._held_until - self._clock())

    async def wait(self) -> None:
        """Wait for this request's start, and for any hold that began while waiting."""
        delay = self.reserve()
        while delay > 0:
            await asyncio.sleep(delay)
            delay = self.held()

    def _try_enter(self) -> bool:
        with self._lock:
            if self.concurrency is not None and self._in_flight >= self.concurrency:
                return False
            self._in_flight += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """``async with limiter.turn():`` send one request: a free place among the
        ``concurrency`` (polled: the limiter belongs to no event loop), then its start."""
        while not self._try_enter():
            await asyncio.sleep(_POLL)
        try:
            await self.wait()
            yield
        finally:
            self._leave()


_limiters: dict[tuple[str, str], RateLimiter] = {}
_limiters_lock = threading.Lock()


def limiter_for(
    provider: str, base_url: str, interval: float, concurrency: int | None = None
) -> RateLimiter:
    """The process's one limiter for this provider at this address (created on first use;
    its interval and concurrency follow the latest settings)."""
    with _limiters_lock:
        limiter = _limiters.get((provider, base_url))
        if limiter is None:
            limiter = _limiters[provider, base_url] = RateLimiter(interval, concurrency)
        limiter.interval = interval
        limiter.concurrency = concurrency
        return limiter


def advertised_interval(headers: httpx.Headers) -> float | None:
    """The spacing a service asks for in ``X-Rate-Limit-Limit`` / ``X-Rate-Limit-Interval``
    (Crossref: "50" requests per "1s"), in seconds per request; None when it says nothing."""
    limit, interval = headers.get("x-rate-limit-limit"), headers.get("x-rate-limit-interval")
    if not limit or not interval:
        return None
    try:
        count = int(limit.strip())
        seconds = float(interval.strip().removesuffix("s"))
    except ValueError:
        return None
    return seconds / count if count > 0 and seconds > 0 else None


# --- accounting -----------------------------------------------------------------------------


@dataclass(slots=True)
class RequestTally:
    """The requests of one search, by provider and outcome."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def record(self, provider: str, outcome: str, seconds: float) -> None:
        per = self.counts.setdefault(provider, dict.fromkeys(OUTCOMES, 0))
        per[outcome] += 1
        notify(provider, outcome, seconds)

    def of(self, provider: str) -> dict[str, int]:
        return dict(self.counts.get(provider, dict.fromkeys(OUTCOMES, 0)))


# --- the layers -----------------------------------------------------------------------------


@dataclass(eq=False)
class _Layer(httpx.AsyncBaseTransport):
    """A layer of one provider's client around the next transport (``_inner``, closed with
    it): what it sees is counted in the search's tally under the provider's name."""

    _inner: httpx.AsyncBaseTransport
    _provider: str
    _tally: RequestTally

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass(eq=False)
class _ProviderTransport(_Layer):
    """Pacing, ``Retry-After`` and retries around the network transport (layer 2)."""

    _limiter: RateLimiter
    _max_retries: int
    _max_wait: float

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                async with self._limiter.turn():
                    started = time.perf_counter()
                    response = await self._inner.handle_async_request(request)
            except httpx.TransportError:
                self._tally.record(self._provider, "error", time.perf_counter() - started)
                if attempt >= self._max_retries:
                    raise
                attempt += 1
                await asyncio.sleep(min(_BACKOFF_FIRST * 2 ** (attempt - 1), _BACKOFF_MAX))
                continue
            seconds = time.perf_counter() - started
            status = response.status_code
            advertised = advertised_interval(response.headers)
            if advertised is not None:
                self._limiter.slow_to(advertised)
            if status in (429, 503):
                self._tally.record(self._provider, "rate_limited", seconds)
                wait = retry_after(response.headers.get("retry-after"))
                if wait is None:
                    wait = min(_BACKOFF_FIRST * 2**attempt, _BACKOFF_MAX)
                if attempt >= self._max_retries or wait > self._max_wait:
                    return response  # the caller reports the refusal
                await response.aread()
                await response.aclose()
                log.info("%s answered %d: waiting %.2fs", self._provider, status, wait)
                self._limiter.hold(wait)
                attempt += 1
                continue
            if status >= 500 and attempt < self._max_retries:
                self._tally.record(self._provider, "error", seconds)
                await response.aread()
                await response.aclose()
                attempt += 1
                await asyncio.sleep(min(_BACKOFF_FIRST * 2 ** (attempt - 1), _BACKOFF_MAX))
                continue
            self._tally.record(self._provider, "ok" if status < 400 else "error", seconds)
            return response


def cache_key(request: httpx.Request) -> str:
    """The cache entry of a request: its method and URL (query string included)."""
    return hashlib.sha256(f"{request.method} {request.url}".encode()).hexdigest()


@dataclass(eq=False)
class _CountCached(_Layer):
    """Counts the answers the cache gave without asking the network, and can forget an
    answer (outside layer 1)."""

    _storage: AsyncBaseStorage

    async def forget(self, request: httpx.Request) -> None:
        for entry in await self._storage.get_entries(cache_key(request)):
            await self._storage.remove_entry(entry.id)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        # hishel's per-request setting: our key, so that forget() finds the entry.
        request.extensions = {**request.extensions, "caching": {"key": cache_key(request)}}
        response = await self._inner.handle_async_request(request)
        status = response.extensions.get("caching") or {}  # hishel's CacheStatus
        if status.get("from_cache") and not status.get("revalidated"):
            self._tally.record(self._provider, "cached", time.perf_counter() - started)
        return response


_caches: weakref.WeakKeyDictionary[httpx.AsyncClient, _CountCached] = weakref.WeakKeyDictionary()


async def forget_answer(client: httpx.AsyncClient, response: httpx.Response) -> None:
    """Drop the cached copy of ``response`` (an answer that did not parse must not be served
    again from the cache)."""
    cache = _caches.get(client)
    if cache is not None:
        await cache.forget(response.request)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The one TLS context of the process (certifi's roots, as httpx uses by default): loading
    the roots takes tens of milliseconds, too long to repeat for every client."""
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/prowzi/providers``, else ``~/.cache/prowzi/providers``."""
    from prowzi.agents.corpus import default_index_dir

    return default_index_dir().parent / "providers"


def user_agent(settings: ProviderSettings) -> str:
    from prowzi import __version__

    contact = f"; mailto:{settings.contact_email}" if settings.contact_email else ""
    return f"Prowzi/{__version__} (https://pypi.org/project/prowzi/{contact})"


def build_client(
    provider: str,
    base_url: str,
    settings: ProviderSettings,
    tally: RequestTally,
    *,
    headers: dict[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """An HTTP client for one provider: cache, pacing and retries, network (see the module
    docstring). ``transport`` replaces the network layer."""
    limiter = limiter_for(
        provider, base_url, interval_for(provider, settings), concurrency_for(provider, settings)
    )
    network = transport if transport is not None else httpx.AsyncHTTPTransport(verify=tls_context())
    layered: httpx.AsyncBaseTransport = _ProviderTransport(
        network,
        provider,
        tally,
        limiter,
        settings.provider_max_retries,
        settings.provider_max_retry_after_seconds,
    )
    ttl = settings.provider_cache_ttl_seconds
    if ttl > 0:
        import hishel
        from hishel.httpx import AsyncCacheTransport

        from prowzi.storage.files import ensure_private_dir

        directory = settings.provider_cache_dir or default_cache_dir()
        ensure_private_dir(Path(directory).expanduser())
        storage = hishel.AsyncSqliteStorage(
            database_path=Path(directory).expanduser() / f"{provider}.sqlite", default_ttl=ttl
        )
        cached = AsyncCacheTransport(
            next_transport=layered,
            storage=storage,
            rfc=hishel.CacheOptions(shared=False, allow_stale=True),
        )
        counted = _CountCached(cached, provider, tally, storage)
        layered = counted
    client = httpx.AsyncClient(
        transport=layered,
        timeout=settings.provider_timeout_seconds,
        headers={"User-Agent": user_agent(settings), **(headers or {})},
        follow_redirects=True,
    )
    if ttl > 0:
        _caches[client] = counted
    return client

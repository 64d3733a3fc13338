"""What every provider is: a name, a base URL setting, and one page of results at a time.

A provider turns one query into one page of :class:`ProviderRecord`\\ s and says where the next
page starts (:meth:`Provider.page`); :meth:`Provider.search` follows the pages until it has
``limit`` records or the service has no more. A non-2xx answer or one that does not parse is a
:class:`ProviderError` naming the provider.
"""

from __future__ import annotations

import html
import re
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar
from xml.etree import ElementTree

import httpx

from prowzi.errors import ProwziError
from prowzi.sources.providers.http import forget_answer
from prowzi.sources.providers.records import ProviderRecord

if TYPE_CHECKING:
    from prowzi.config.settings import ProviderSettings


class ProviderError(ProwziError):
    """A provider could not answer: refused, unreachable, or an answer that does not parse."""

    def __init__(self, provider: str, message: str) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider


Page = tuple[list[ProviderRecord], Any]
"""One page of a provider's results, and where the next page starts (None: no more)."""

_TAG = re.compile(r"<[^>]+>")


def plain_text(markup: str | None) -> str:
    """Text without tags (Crossref abstracts are JATS XML) or entities, whitespace collapsed."""
    if not markup:
        return ""
    return " ".join(html.unescape(_TAG.sub(" ", markup)).split())


class Provider(ABC):
    """One online scholarly index."""

    name: ClassVar[str]
    max_page: ClassVar[int]
    """The largest page the service serves (its documented maximum)."""

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings

    @property
    @abstractmethod
    def base_url(self) -> str:
        """The ``PROWZI_<PROVIDER>_URL`` setting, without a trailing slash."""

    def headers(self) -> dict[str, str]:
        """Headers every request to this provider carries (an API key, for some)."""
        return {}

    @abstractmethod
    async def page(self, client: httpx.AsyncClient, query: str, start: Any, rows: int) -> Page:
        """One page of results for ``query`` from ``start`` (None: the first page), at most
        ``rows`` long; and where the next page starts (None: no more)."""

    async def search(
        self, client: httpx.AsyncClient, query: str, limit: int
    ) -> list[ProviderRecord]:
        """Up to ``limit`` records for ``query``, following the service's pages."""
        records: list[ProviderRecord] = []
        start: Any = None
        rows = min(limit, self.max_page)
        # Pages whose items are all unusable (no title) add nothing: a bound, not a loop
        # through everything the service holds.
        for _ in range(limit // rows + 2):
            page, start = await self.page(client, query, start, rows)
            records.extend(page)
            if len(records) >= limit or not page or start is None:
                break
        return records[:limit]

    # --- helpers for the providers ----------------------------------------------------------

    def url(self, path: str) -> str:
        return f"{self.base_url.rstrip('/')}/{path.lstrip('/')}"

    async def get(
        self, client: httpx.AsyncClient, path: str, params: dict[str, Any]
    ) -> httpx.Response:
        """GET ``path``; a non-2xx answer (after the transport's retries) or no answer at all
        is a :class:`ProviderError`."""
        response = await self.get_if_found(client, path, params)
        if response is None:
            raise ProviderError(self.name, "HTTP 404")
        return response

    async def get_if_found(
        self, client: httpx.AsyncClient, path: str, params: dict[str, Any]
    ) -> httpx.Response | None:
        """As :meth:`get`, but None for a 404 (a lookup of something the service lacks)."""
        try:
            response = await client.get(self.url(path), params=params)
        except httpx.HTTPError as exc:
            what = "unreachable" if isinstance(exc, httpx.ConnectError) else "no answer"
            raise ProviderError(self.name, f"{what}: {describe_http_error(exc)}") from None
        if response.status_code == 404:
            return None
        if not response.is_success:
            retry = response.headers.get("retry-after")
            hint = f" (Retry-After: {retry})" if retry else ""
            raise ProviderError(self.name, f"HTTP {response.status_code}{hint}")
        return response

    async def get_json(self, client: httpx.AsyncClient, path: str, params: dict[str, Any]) -> Any:
        return await self.json_of(client, await self.get(client, path, params))

    async def json_of(self, client: httpx.AsyncClient, response: httpx.Response) -> Any:
        """The answer as JSON; a malformed one is dropped from the cache and an error."""
        try:
            return response.json()
        except ValueError as exc:
            await forget_answer(client, response)
            raise ProviderError(self.name, f"malformed answer (not JSON: {exc})") from None

    async def get_xml(
        self, client: httpx.AsyncClient, path: str, params: dict[str, Any]
    ) -> ElementTree.Element:
        """The answer as XML (the standard library's parser: expat refuses external entities
        and, since 2.4.1, entity-expansion bombs)."""
        response = await self.get(client, path, params)
        try:
            return ElementTree.fromstring(response.content)
        except ElementTree.ParseError as exc:
            await forget_answer(client, response)
            raise ProviderError(self.name, f"malformed answer (not XML: {exc})") from None

    def malformed(self, what: str) -> ProviderError:
        return ProviderError(self.name, f"malformed answer ({what})")


def describe_http_error(exc: httpx.HTTPError) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

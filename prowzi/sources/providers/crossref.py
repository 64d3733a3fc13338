"""Crossref's REST API (``/works``): the default online provider, no key needed.

Search: ``GET /works?query=...&rows=N&offset=O``; the answer is ``{"status": "ok",
"message-type": "work-list", "message": {"total-results": T, "items": [...]}}``, each item with
``DOI``, ``title`` (a list), ``author`` (``given``/``family`` or ``name``), ``issued``
(``date-parts``), ``URL`` and, for some works, a JATS ``abstract``. Lookup:
``GET /works/{doi}`` answers ``{"message-type": "work", "message": {...}}`` or 404.
``contact_email`` is sent as ``mailto``, which puts the requests in Crossref's polite pool.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from prowzi.sources.providers.base import Page, Provider, plain_text
from prowzi.sources.providers.records import ProviderRecord
from prowzi.sources.records import normalise_doi, year_of

SELECT = "DOI,title,author,issued,published,URL,abstract,link"


class Crossref(Provider):
    name = "crossref"
    max_page = 1000  # Crossref's maximum rows

    @property
    def base_url(self) -> str:
        return self.settings.crossref_url

    def _params(self, **extra: Any) -> dict[str, Any]:
        params = dict(extra)
        if self.settings.contact_email:
            params["mailto"] = self.settings.contact_email
        return params

    async def page(self, client: httpx.AsyncClient, query: str, start: Any, rows: int) -> Page:
        offset = int(start or 0)
        data = await self.get_json(
            client, "works", self._params(query=query, rows=rows, offset=offset, select=SELECT)
        )
        message = data.get("message") if isinstance(data, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("items"), list):
            raise self.malformed("no message.items")
        records = [r for r in (self.record(item) for item in message["items"]) if r is not None]
        total = message.get("total-results")
        after = offset + len(message["items"])
        more = bool(message["items"]) and isinstance(total, int) and after < total
        return records, after if more else None

    async def lookup(self, client: httpx.AsyncClient, doi: str) -> ProviderRecord | None:
        """The work with this DOI, or None when Crossref does not know it."""
        response = await self.get_if_found(client, f"works/{quote(doi, safe='/')}", self._params())
        if response is None:
            return None
        data = await self.json_of(client, response)
        message = data.get("message") if isinstance(data, dict) else None
        if not isinstance(message, dict):
            raise self.malformed("no message")
        return self.record(message)

    def record(self, item: Any) -> ProviderRecord | None:
        if not isinstance(item, dict):
            return None
        titles = item.get("title")
        title = plain_text(titles[0] if isinstance(titles, list) and titles else titles or "")
        if not title:
            return None
        authors = []
        for author in item.get("author") or []:
            if not isinstance(author, dict):
                continue
            name = (
                " ".join(str(author[k]).strip() for k in ("given", "family") if author.get(k))
                or str(author.get("name") or "").strip()
            )
            if name:
                authors.append(name)
        year = None
        for key in ("issued", "published"):
            date = item.get(key)
            parts = date.get("date-parts") if isinstance(date, dict) else None
            if isinstance(parts, list) and parts and isinstance(parts[0], list) and parts[0]:
                year = year_of(parts[0][0])
                if year:
                    break
        doi = normalise_doi(str(item.get("DOI") or ""))
        url = item.get("URL") if isinstance(item.get("URL"), str) else None
        abstract = item.get("abstract")
        return ProviderRecord(
            title=title,
            origin=self.name,
            metadata_source=self.name,
            authors=tuple(authors),
            year=year,
            doi=doi,
            url=url or (f"https://doi.org/{doi}" if doi else None),
            abstract=plain_text(abstract if isinstance(abstract, str) else ""),
        )

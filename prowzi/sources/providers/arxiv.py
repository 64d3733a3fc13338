"""arXiv's API (``/query``, an Atom 1.0 feed with OpenSearch and arXiv extensions).

Search: ``GET /query?search_query=all:w1 AND all:w2&start=S&max_results=N&sortBy=relevance``.
The feed carries ``opensearch:totalResults`` and one ``entry`` per e-print: ``id``
(``http://arxiv.org/abs/<id>v<n>``), ``title``, ``summary`` (the abstract), ``published``,
``author/name``, ``link`` (``rel="alternate"`` the abstract page, ``title="pdf"`` the PDF) and
``arxiv:doi`` when the e-print has a journal DOI. An error is a feed whose one entry has an id
under ``/api/errors`` and the message as its summary. arXiv asks for one request every three
seconds, one at a time: see :mod:`prowzi.sources.providers.http`.
"""

from __future__ import annotations

import re
from typing import Any
from xml.etree import ElementTree

import httpx

from prowzi.sources.providers.base import Page, Provider
from prowzi.sources.providers.records import ProviderRecord
from prowzi.sources.records import normalise_arxiv_id, normalise_doi, year_of

ATOM = "{http://www.w3.org/2005/Atom}"
OPENSEARCH = "{http://a9.com/-/spec/opensearch/1.1/}"
ARXIV = "{http://arxiv.org/schemas/atom}"


def search_query(query: str) -> str:
    """``quantum error correction`` -> ``all:quantum AND all:error AND all:correction``."""
    words = re.findall(r"[^\W_]+", query)
    return " AND ".join(f"all:{w}" for w in words) or "all:*"


def _text(element: ElementTree.Element | None) -> str:
    return " ".join((element.text or "").split()) if element is not None else ""


class Arxiv(Provider):
    name = "arxiv"
    max_page = 2000  # the API's maximum max_results per call

    @property
    def base_url(self) -> str:
        return self.settings.arxiv_url

    async def page(self, client: httpx.AsyncClient, query: str, start: Any, rows: int) -> Page:
        offset = int(start or 0)
        feed = await self.get_xml(
            client,
            "query",
            {
                "search_query": search_query(query),
                "start": offset,
                "max_results": rows,
                "sortBy": "relevance",
            },
        )
        if feed.tag != f"{ATOM}feed":
            raise self.malformed("not an Atom feed")
        entries = feed.findall(f"{ATOM}entry")
        for entry in entries:
            if "/api/errors" in _text(entry.find(f"{ATOM}id")):
                raise self.malformed(f"error: {_text(entry.find(f'{ATOM}summary'))}")
        records = [r for r in (self.record(e) for e in entries) if r is not None]
        try:
            total = int(_text(feed.find(f"{OPENSEARCH}totalResults")))
        except ValueError:
            total = 0
        after = offset + len(entries)
        return records, after if entries and after < total else None

    def record(self, entry: ElementTree.Element) -> ProviderRecord | None:
        title = _text(entry.find(f"{ATOM}title"))
        abs_url = _text(entry.find(f"{ATOM}id"))
        arxiv_id = normalise_arxiv_id(abs_url)
        if not title or not arxiv_id:
            return None
        pdf_url = None
        url = abs_url
        for link in entry.findall(f"{ATOM}link"):
            if link.get("title") == "pdf":
                pdf_url = link.get("href")
            elif link.get("rel") == "alternate" and link.get("href"):
                url = link.get("href") or url
        authors = tuple(
            name
            for name in (_text(a.find(f"{ATOM}name")) for a in entry.findall(f"{ATOM}author"))
            if name
        )
        return ProviderRecord(
            title=title,
            origin=self.name,
            metadata_source=self.name,
            authors=authors,
            year=year_of(_text(entry.find(f"{ATOM}published"))),
            doi=normalise_doi(_text(entry.find(f"{ARXIV}doi"))),
            arxiv_id=arxiv_id,
            url=url,
            abstract=_text(entry.find(f"{ATOM}summary")),
            pdf_url=pdf_url,
        )

"""Semantic Scholar's Academic Graph API (``/paper/search``).

Search: ``GET /paper/search?query=...&offset=O&limit=N&fields=...`` (the key, when set, in the
``x-api-key`` header). The answer is ``{"total": T, "offset": O, "next": O2, "data": [...]}``
(``next`` absent on the last page), each paper with ``title``, ``abstract``, ``year``,
``authors[].name``, ``externalIds`` (``DOI``, ``ArXiv``, ...), ``url`` and ``openAccessPdf``.
"""

from __future__ import annotations

from typing import Any

import httpx

from prowzi.sources.providers.base import Page, Provider
from prowzi.sources.providers.records import ProviderRecord
from prowzi.sources.records import normalise_arxiv_id, normalise_doi, year_of

FIELDS = "title,abstract,year,authors,externalIds,url,openAccessPdf"


class SemanticScholar(Provider):
    name = "semanticscholar"
    max_page = 100  # the API's maximum limit

    @property
    def base_url(self) -> str:
        return self.settings.semanticscholar_url

    def headers(self) -> dict[str, str]:
        key = self.settings.semanticscholar_api_key
        return {"x-api-key": key.get_secret_value()} if key is not None else {}

    async def page(self, client: httpx.AsyncClient, query: str, start: Any, rows: int) -> Page:
        offset = int(start or 0)
        params = {"query": query, "offset": offset, "limit": rows, "fields": FIELDS}
        data = await self.get_json(client, "paper/search", params)
        papers = data.get("data") if isinstance(data, dict) else None
        if isinstance(data, dict) and papers is None and data.get("total") == 0:
            papers = []
        if not isinstance(papers, list):
            raise self.malformed("no data")
        records = [r for r in (self.record(p) for p in papers) if r is not None]
        following = data.get("next")
        return records, following if papers and isinstance(following, int) else None

    def record(self, paper: Any) -> ProviderRecord | None:
        if not isinstance(paper, dict):
            return None
        title = str(paper.get("title") or "").strip()
        if not title:
            return None
        found = paper.get("externalIds")
        ids: dict[str, Any] = found if isinstance(found, dict) else {}
        pdf = paper.get("openAccessPdf")
        pdf_url = pdf.get("url") if isinstance(pdf, dict) else None
        authors = tuple(
            str(a["name"]).strip()
            for a in paper.get("authors") or []
            if isinstance(a, dict) and a.get("name")
        )
        return ProviderRecord(
            title=title,
            origin=self.name,
            metadata_source=self.name,
            authors=authors,
            year=year_of(paper.get("year")),
            doi=normalise_doi(str(ids.get("DOI") or "")),
            arxiv_id=normalise_arxiv_id(str(ids.get("ArXiv") or "")),
            url=paper.get("url") if isinstance(paper.get("url"), str) else None,
            abstract=str(paper.get("abstract") or "").strip(),
            pdf_url=pdf_url if isinstance(pdf_url, str) else None,
        )

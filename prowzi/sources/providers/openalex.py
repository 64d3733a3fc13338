"""OpenAlex (``/works``).

Search: ``GET /works?search=...&per-page=N&page=P`` (``api_key`` when set; ``mailto`` with a
contact). The answer is ``{"meta": {"count": T, "page": P, "per_page": N}, "results": [...]}``,
each work with ``title`` (or ``display_name``), ``doi`` (a doi.org URL),
``publication_year``, ``authorships[].author.display_name``, ``abstract_inverted_index``
(word -> positions; the abstract is rebuilt from it) and ``primary_location`` /
``locations[]`` with ``landing_page_url`` and ``pdf_url``.
"""

from __future__ import annotations

from typing import Any

import httpx

from prowzi.sources.providers.base import Page, Provider
from prowzi.sources.providers.records import ProviderRecord
from prowzi.sources.records import normalise_arxiv_id, normalise_doi, year_of


def abstract_from_inverted_index(index: Any) -> str:
    """The abstract an inverted index (``{"word": [positions]}``) encodes."""
    if not isinstance(index, dict):
        return ""
    placed: list[tuple[int, str]] = []
    for word, positions in index.items():
        if isinstance(positions, list):
            placed.extend((p, str(word)) for p in positions if isinstance(p, int))
    return " ".join(word for _, word in sorted(placed))


class OpenAlex(Provider):
    name = "openalex"
    max_page = 200  # OpenAlex's maximum per-page

    @property
    def base_url(self) -> str:
        return self.settings.openalex_url

    async def page(self, client: httpx.AsyncClient, query: str, start: Any, rows: int) -> Page:
        number = int(start or 1)
        params: dict[str, Any] = {"search": query, "per-page": rows, "page": number}
        if self.settings.openalex_api_key is not None:
            params["api_key"] = self.settings.openalex_api_key.get_secret_value()
        if self.settings.contact_email:
            params["mailto"] = self.settings.contact_email
        data = await self.get_json(client, "works", params)
        results = data.get("results") if isinstance(data, dict) else None
        meta = data.get("meta") if isinstance(data, dict) else None
        if not isinstance(results, list) or not isinstance(meta, dict):
            raise self.malformed("no meta or results")
        records = [r for r in (self.record(w) for w in results) if r is not None]
        count = meta.get("count")
        served = meta.get("per_page")
        per_page = served if isinstance(served, int) else rows
        more = bool(results) and isinstance(count, int) and number * per_page < count
        return records, number + 1 if more else None

    def record(self, work: Any) -> ProviderRecord | None:
        if not isinstance(work, dict):
            return None
        title = str(work.get("title") or work.get("display_name") or "").strip()
        if not title:
            return None
        authors = []
        for authorship in work.get("authorships") or []:
            author = authorship.get("author") if isinstance(authorship, dict) else None
            name = author.get("display_name") if isinstance(author, dict) else None
            if isinstance(name, str) and name.strip():
                authors.append(name.strip())
        locations = [work.get("primary_location"), *(work.get("locations") or [])]
        landing = None
        pdf_url = None
        arxiv_id = None
        for location in locations:
            if not isinstance(location, dict):
                continue
            page_url = location.get("landing_page_url")
            if isinstance(page_url, str):
                landing = landing or page_url
                if "arxiv.org" in page_url:
                    arxiv_id = arxiv_id or normalise_arxiv_id(page_url)
            if isinstance(location.get("pdf_url"), str):
                pdf_url = pdf_url or location["pdf_url"]
        doi = normalise_doi(str(work.get("doi") or ""))
        return ProviderRecord(
            title=title,
            origin=self.name,
            metadata_source=self.name,
            authors=tuple(authors),
            year=year_of(work.get("publication_year")),
            doi=doi,
            arxiv_id=arxiv_id or normalise_arxiv_id(doi),
            url=landing or (f"https://doi.org/{doi}" if doi else work.get("id")),
            abstract=abstract_from_inverted_index(work.get("abstract_inverted_index")),
            pdf_url=pdf_url,
        )

"""Querying the selected providers: every provider at once, each query in turn.

:func:`search_providers` sends each query to every selected provider (concurrently across
providers; one provider's requests are paced by its rate limiter). A provider that fails is
reported (:class:`ProviderReport` ``error``) and asked nothing more in this search, and the
others go on; only when every selected provider failed before answering anything does the
search fail (:class:`ProvidersFailedError`, transient: the stage is retried, and what was
answered before comes from the cache). With ``fetch_full_text``, the open-access PDF of each
arXiv result is fetched and its text extracted (pypdf).

:func:`lookup_dois` completes records from Crossref by DOI, for callers that found a DOI in a
document.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import httpx

from prowzi.errors import TransientError
from prowzi.sources.providers.arxiv import Arxiv
from prowzi.sources.providers.base import Provider, ProviderError, describe_http_error
from prowzi.sources.providers.crossref import Crossref
from prowzi.sources.providers.http import OUTCOMES, RequestTally, build_client, tls_context
from prowzi.sources.providers.openalex import OpenAlex
from prowzi.sources.providers.pubmed import PubMed
from prowzi.sources.providers.records import ProviderRecord
from prowzi.sources.providers.semanticscholar import SemanticScholar
from prowzi.sources.records import normalise_doi

if TYPE_CHECKING:
    from prowzi.config.settings import ProviderSettings

log = logging.getLogger("prowzi.providers")

PROVIDERS: dict[str, type[Provider]] = {
    "crossref": Crossref,
    "arxiv": Arxiv,
    "openalex": OpenAlex,
    "semanticscholar": SemanticScholar,
    "pubmed": PubMed,
}

MAX_PDF_BYTES = 50 * 1024 * 1024
"""A full-text PDF larger than this is not read."""


class ProvidersFailedError(TransientError):
    """Every selected provider failed; the message names each and why."""


@dataclass(frozen=True, slots=True)
class ProviderHit:
    """One record a provider returned for one query, at ``rank`` (0 is its best)."""

    query: str
    rank: int
    record: ProviderRecord


@dataclass(slots=True)
class ProviderReport:
    """What one provider did in one search."""

    provider: str
    queries: int = 0
    """Queries it answered."""
    results: int = 0
    """Records it returned, over all queries, before deduplication."""
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    error: str | None = None
    full_texts: int = 0

    @property
    def failed(self) -> bool:
        """It answered nothing: the provider is down (or refused every query)."""
        return self.error is not None and self.queries == 0

    def details(self) -> dict[str, Any]:
        details: dict[str, Any] = {
            "results": self.results,
            "queries": self.queries,
            "requests": dict(self.requests),
        }
        if self.error is not None:
            details["error"] = self.error
        if self.full_texts:
            details["full_texts"] = self.full_texts
        return details


@dataclass(slots=True)
class ProviderSearch:
    hits: list[ProviderHit]
    reports: list[ProviderReport]


async def search_providers(
    settings: ProviderSettings,
    providers: Sequence[str],
    queries: Sequence[str],
    limit: int,
    *,
    fetch_full_text: bool = False,
) -> ProviderSearch:
    """Every query against every provider; hits in provider order, then query, then rank.

    Raises :class:`ProvidersFailedError` when every provider failed before answering any query.
    """
    tally = RequestTally()
    await asyncio.to_thread(tls_context)  # loaded once per process, off the event loop
    reports = {name: ProviderReport(name) for name in providers}
    found: dict[str, list[ProviderHit]] = {name: [] for name in providers}

    async def run(name: str) -> None:
        provider = PROVIDERS[name](settings)
        report = reports[name]
        async with build_client(
            name, provider.base_url, settings, tally, headers=provider.headers()
        ) as client:
            for query in queries:
                try:
                    records = await provider.search(client, query, limit)
                except ProviderError as exc:
                    report.error = str(exc).removeprefix(f"{name}: ")
                    log.warning("provider %s failed: %s", name, report.error)
                    break
                report.queries += 1
                report.results += len(records)
                if fetch_full_text:
                    records = [await _with_full_text(client, r, report) for r in records]
                found[name].extend(ProviderHit(query, rank, r) for rank, r in enumerate(records))

    await asyncio.gather(*(run(name) for name in providers))
    for name, report in reports.items():
        report.requests = tally.of(name)
    ordered = [reports[name] for name in providers]
    if ordered and all(r.failed for r in ordered):
        raise ProvidersFailedError(
            "every online provider failed: "
            + "; ".join(f"{r.provider}: {r.error}" for r in ordered)
        )
    return ProviderSearch(hits=[h for name in providers for h in found[name]], reports=ordered)


async def _with_full_text(
    client: httpx.AsyncClient, record: ProviderRecord, report: ProviderReport
) -> ProviderRecord:
    """The record with the text of its open-access arXiv PDF (unchanged when it has none, or
    the PDF cannot be had or read: the abstract stays the source text)."""
    if record.origin != "arxiv" or not record.pdf_url or record.full_text:
        return record
    data = bytearray()
    try:
        # Streamed, and given up past MAX_PDF_BYTES: a huge or endless answer is never held.
        async with client.stream("GET", record.pdf_url) as response:
            if not response.is_success:
                log.warning("full text of %s: HTTP %d", record.pdf_url, response.status_code)
                return record
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > MAX_PDF_BYTES:
                    log.warning("full text of %s: over %d bytes", record.pdf_url, MAX_PDF_BYTES)
                    return record
    except httpx.HTTPError as exc:
        log.warning("full text of %s: %s", record.pdf_url, describe_http_error(exc))
        return record
    text = await asyncio.to_thread(pdf_text, bytes(data))
    if not text:
        return record
    report.full_texts += 1
    return replace(record, full_text=text)


def pdf_text(data: bytes) -> str:
    """The text layer of a PDF, page by page as the corpus reads one ("" when it has none or
    cannot be read)."""
    from pypdf import PdfReader

    from prowzi.sources.ingest import pdf_page_text

    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [pdf_page_text(page) for page in reader.pages]
    except Exception as exc:  # pypdf raises a wide range of errors on broken files
        log.warning("unreadable PDF: %s: %s", type(exc).__name__, exc)
        return ""
    return "\n\n".join(p for p in pages if p.strip())


async def lookup_dois(
    settings: ProviderSettings, dois: Iterable[str], tally: RequestTally | None = None
) -> dict[str, ProviderRecord | None]:
    """Crossref's record for each DOI (None: Crossref does not know it), through the same
    rate limit and cache as searches; the requests are counted in ``tally``. Raises
    :class:`ProviderError` when Crossref cannot be asked."""
    crossref = Crossref(settings)
    wanted = list(dict.fromkeys(d for d in (normalise_doi(x) for x in dois) if d))
    found: dict[str, ProviderRecord | None] = {}
    if not wanted:
        return found
    counts = tally if tally is not None else RequestTally()
    async with build_client("crossref", crossref.base_url, settings, counts) as client:
        for doi in wanted:
            found[doi] = await crossref.lookup(client, doi)
    return found


def lookup_dois_blocking(
    settings: ProviderSettings, dois: Iterable[str]
) -> dict[str, ProviderRecord | None]:
    """:func:`lookup_dois` for code running in a worker thread (no event loop of its own)."""
    return asyncio.run(lookup_dois(settings, dois))

"""The search stage's online half: provider results merged with the corpus's.

:func:`add_provider_results` is the one call the search agent makes when ``providers`` is set.
It sends the stage's queries to the providers, scores what they return, merges it with the
corpus's sources (deduplicated by DOI, arXiv id and normalised title; the corpus copy wins),
and records per provider what happened (results, queries, requests by outcome, error).

Scores: BM25 has no absolute scale and the providers give none, so with providers on, every
source is scored from 0 to 1: a corpus source by its BM25 score over the corpus's best, a
provider result by the share of its query's words found in its title and abstract (stemmed;
and, like a corpus document, it must contain one of the topic's words to count at all). The
verification stage's relative threshold then applies to both alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prowzi.agents import _settings, _text
from prowzi.agents.corpus import query_terms
from prowzi.agents.models import QueryResult, SearchAgentResult, Source
from prowzi.sources.providers.base import ProviderError
from prowzi.sources.providers.http import RequestTally
from prowzi.sources.providers.records import ProviderRecord, complete, group_duplicates, record_id
from prowzi.sources.providers.search import ProviderSearch, lookup_dois, search_providers
from prowzi.sources.records import normalise_arxiv_id, normalise_doi

if TYPE_CHECKING:
    from prowzi.agents.base import StageContext
    from prowzi.config.settings import ProviderSettings

log = logging.getLogger("prowzi.providers")


def relevance(query: str, record: ProviderRecord, anchors: Sequence[str]) -> float:
    """The share of ``query``'s words in the record's title and abstract (0 when it contains
    none of the topic's ``anchors``)."""
    words = {_text.stem(w) for w in _text.words(f"{record.title} {record.abstract}")}
    if anchors and not any(_text.stem(a) in words for a in anchors):
        return 0.0
    terms = [_text.stem(t) for t in query_terms(query)]
    if not terms:
        return 0.0
    return sum(t in words for t in terms) / len(terms)


@dataclass(slots=True)
class _Candidate:
    record: ProviderRecord
    score: float
    queries: list[str]
    source: Source | None = None
    """The corpus's own source, for a corpus candidate."""


_FIELDS = ("title", "authors", "year", "doi", "arxiv_id", "url", "abstract")
"""A work's metadata: what a corpus record copies from its source, what provenance traces."""


def _corpus_record(source: Source) -> ProviderRecord:
    """The corpus source as a record: its metadata (:data:`_FIELDS`) as the corpus has it."""
    metadata = {name: getattr(source, name) for name in _FIELDS}
    metadata["authors"] = tuple(source.authors)  # the record is frozen
    return ProviderRecord(
        origin="corpus", metadata_source="corpus", source_id=source.source_id, **metadata
    )


def merge_with_corpus(
    result: SearchAgentResult, search: ProviderSearch, anchors: Sequence[str]
) -> tuple[list[Source], list[QueryResult]]:
    """The corpus's sources and the providers' hits as one deduplicated, ranked list, and each
    query's source ids."""
    best = max((s.score for s in result.sources), default=0.0)
    candidates = [
        _Candidate(_corpus_record(s), s.score / best if best > 0 else 0.0, list(s.queries), s)
        for s in result.sources
    ]
    for hit in search.hits:
        score = relevance(hit.query, hit.record, anchors)
        if score > 0:
            candidates.append(_Candidate(hit.record, score, [hit.query]))
    sources: list[Source] = []
    owner: dict[int, str] = {}
    for group in _corpus_kept_apart(group_duplicates([c.record for c in candidates]), candidates):
        members = [candidates[i] for i in group]
        first = members[0]
        score = max(m.score for m in members)
        queries = _text.unique(q for m in members for q in m.queries)
        others = [m.record for m in members[1:]]
        if first.source is not None:
            source = completed(first.source, others).model_copy(
                update={"score": score, "queries": queries}
            )
        else:
            record = first.record
            for other in others:  # a later provider completes what the first lacks
                record = complete(record, other)
            source = Source(
                source_id=record_id(record),
                title=record.title,
                authors=list(record.authors),
                year=record.year,
                url=record.url,
                doi=normalise_doi(record.doi),
                arxiv_id=normalise_arxiv_id(record.arxiv_id),
                abstract=record.abstract,
                text=record.full_text,
                score=score,
                queries=queries,
                origin=record.origin,
                metadata_source=provenance([m.record for m in members]),
            )
        sources.append(source)
        for i in group:
            owner[i] = source.source_id
    corpus_ids = {c.source.source_id: owner[i] for i, c in enumerate(candidates) if c.source}
    per_query: dict[str, list[str]] = {q.query: [] for q in result.queries}
    for q in result.queries:
        per_query[q.query].extend(corpus_ids[i] for i in q.source_ids if i in corpus_ids)
    for i, candidate in enumerate(candidates):
        if candidate.source is None:
            per_query.setdefault(candidate.queries[0], []).append(owner[i])
    ranked = sorted(sources, key=lambda s: (-s.score, s.source_id))
    query_results = [
        QueryResult(query=q, source_ids=_text.unique(ids)) for q, ids in per_query.items()
    ]
    return ranked, query_results


def provenance(records: Sequence[ProviderRecord]) -> dict[str, str]:
    """Where each field of the merged record came from: the first record that has it."""
    found: dict[str, str] = {}
    for record in records:
        for name in _FIELDS:
            if name not in found and getattr(record, name):
                found[name] = record.metadata_source
    return found


def completed(source: Source, records: Sequence[ProviderRecord]) -> Source:
    """A corpus source with the fields it lacks (authors, year, DOI, arXiv id, URL) taken from
    the first of ``records`` that has each; its ``metadata_source`` names that provider. What
    the corpus says is never replaced."""
    update: dict[str, object] = {}
    sources = dict(source.metadata_source)
    for name in ("authors", "year", "doi", "arxiv_id", "url"):
        if getattr(source, name):
            continue
        for record in records:
            value = getattr(record, name)
            if name == "doi":
                value = normalise_doi(value)
            elif name == "arxiv_id":
                value = normalise_arxiv_id(value)
            if value:
                update[name] = list(value) if name == "authors" else value
                sources[name] = record.metadata_source
                break
    if not update:
        return source
    return source.model_copy(update={**update, "metadata_source": sources})


async def complete_from_crossref(
    settings: ProviderSettings, sources: list[Source]
) -> tuple[list[Source], dict[str, object]]:
    """Corpus sources with a DOI but no authors or no year, completed from Crossref's record
    of that DOI (issue 16 item 2: a found DOI is looked up when providers are on); and what
    was done (``doi_lookups``, ``completed``, ``requests``, ``error``)."""
    wanted = [
        s for s in sources if s.origin == "corpus" and s.doi and (not s.authors or s.year is None)
    ]
    if not wanted:
        return sources, {}
    tally = RequestTally()
    report: dict[str, object] = {"doi_lookups": len(wanted)}
    try:
        found = await lookup_dois(settings, [s.doi for s in wanted if s.doi], tally)
    except ProviderError as exc:
        report["error"] = str(exc).removeprefix("crossref: ")
        found = {}
    report["requests"] = tally.of("crossref")
    out: list[Source] = []
    done = 0
    for source in sources:
        record = found.get(normalise_doi(source.doi) or "") if source in wanted else None
        if record is not None:
            filled = completed(source, [record])
            done += filled is not source
            source = filled
        out.append(source)
    report["completed"] = done
    return out, report


def _corpus_kept_apart(groups: list[list[int]], candidates: list[_Candidate]) -> list[list[int]]:
    """Groups in which no two corpus sources are merged: duplicates within the corpus are the
    verification stage's to reject, with its reason, as they are without providers."""
    kept: list[list[int]] = []
    for group in groups:
        corpus = [i for i in group if candidates[i].source is not None]
        kept.append([i for i in group if i not in corpus[1:]])
        kept.extend([i] for i in corpus[1:])
    return kept


async def add_provider_results(
    ctx: StageContext, result: SearchAgentResult, anchors: Sequence[str]
) -> SearchAgentResult:
    """``result`` (the corpus's) with the providers' results merged in; per-provider details
    in ``providers``. Raises :class:`~prowzi.sources.providers.ProvidersFailedError` when every
    selected provider failed."""
    names = _settings.providers(ctx)
    queries = [q.query for q in result.queries]
    search = await search_providers(
        ctx.config,
        names,
        queries,
        ctx.params.max_results_per_query,
        fetch_full_text=_settings.fetch_full_text(ctx),
    )
    sources, query_results = merge_with_corpus(result, search, anchors)
    reports = {r.provider: r.details() for r in search.reports}
    sources, lookups = await complete_from_crossref(ctx.config, sources)
    if lookups:
        reports.setdefault("crossref", {}).update(
            {f"doi_{k}" if k != "doi_lookups" else k: v for k, v in lookups.items()}
        )
    ctx.annotate("providers", names)
    for report in search.reports:
        ctx.event(
            "search.provider",
            provider=report.provider,
            results=report.results,
            queries=report.queries,
            **{f"requests_{k}": v for k, v in report.requests.items()},
        )
        if report.error is not None:
            ctx.event("search.provider_failed", provider=report.provider, error=report.error)
    online = [s for s in sources if s.origin != "corpus"]
    ctx.annotate("provider_sources", len(online))
    failed = [r for r in search.reports if r.error is not None]
    message = result.message
    if online:
        found = ", ".join(
            f"{name} {sum(1 for s in online if s.origin == name)}"
            for name in names
            if any(s.origin == name for s in online)
        )
        message = _join(message, f"Online providers added {len(online)} source(s) ({found}).")
    if failed:
        message = _join(
            message,
            "Degraded search: "
            + "; ".join(f"{r.provider} failed ({r.error})" for r in failed)
            + "; the other sources were used.",
        )
    return result.model_copy(
        update={
            "sources": sources,
            "queries": query_results,
            "providers": reports,
            "message": message,
        }
    )


def _join(first: str | None, second: str) -> str:
    return f"{first} {second}" if first else second

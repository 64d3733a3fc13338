"""The search stage: every planned query against the corpus index, merged per source.

Each query returns at most ``max_results_per_query`` documents, ranked by their best passage
(BM25 over passages), each with the passages that matched; a source keeps its best
:data:`MAX_PASSAGES_PER_SOURCE` passages over all queries, which the writer quotes with their
page or section. A document must contain
at least one of the topic's words (the *anchors*) to qualify, so a generic query word
("challenges") cannot pull in a document about something else. A source found by several
queries keeps its best score and the list of queries that found it. When the corpus does not
cover the topic, the result says so in ``message`` and holds few or no sources: nothing is ever
invented.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from prowzi.agents import _settings, _text
from prowzi.agents.base import StageContext
from prowzi.agents.corpus import (
    CorpusIndex,
    Document,
    Passage,
    query_terms,
    resolve_corpus_dir,
)
from prowzi.agents.models import (
    IntentAnalysis,
    QueryResult,
    ResearchPlan,
    SearchAgentResult,
    SkippedFile,
    Source,
)
from prowzi.errors import PermanentError

THIN_RESULT_SOURCES = 3
"""Fewer sources than this is a thin result, reported in ``message``."""


MAX_PASSAGES_PER_SOURCE = 6
"""Passages a source keeps over all queries (its best ones, each matched by some query)."""


@dataclass(slots=True)
class _Found:
    document: Document
    score: float
    queries: list[str] = field(default_factory=list)
    passages: dict[Passage, float] = field(default_factory=dict)

    def add(self, passages: tuple[tuple[Passage, float], ...]) -> None:
        for passage, score in passages:
            self.passages[passage] = max(score, self.passages.get(passage, score))

    def best_passages(self) -> list[tuple[Passage, float]]:
        ranked = sorted(self.passages.items(), key=lambda p: -p[1])
        return ranked[:MAX_PASSAGES_PER_SOURCE]


@dataclass(slots=True)
class SearchOutcome:
    result: SearchAgentResult
    index_built: bool
    index_path: str | None
    skipped: list[tuple[str, str]]
    missing_anchors: list[str]
    reindexed: int = 0
    passages: int = 0


GENERIC_WORDS = _text.word_set(
    """
    global change changes changing world general future history large small big old today
    based use uses using different various approach approaches method methods problem problems
    issue issues challenge challenges application applications system systems
    """
)
"""Topic words too common to say what a document is about ("global" in "global warming"):
they rank documents but do not, alone, make one qualify."""


def anchors_for(intent: IntentAnalysis | None) -> list[str]:
    """The topic's own words: a qualifying document must contain at least one.

    Generic words are left out unless the topic has nothing else.
    """
    if intent is None:
        return []
    ignore = _text.STOPWORDS | _text.INSTRUCTION_WORDS
    words = [w for k in intent.keywords for w in query_terms(k)]
    if not words:
        words = query_terms(intent.topic)
    words = _text.unique(w for w in words if w not in ignore)
    specific = [w for w in words if w not in GENERIC_WORDS]
    return specific or words


def run_search(
    plan: ResearchPlan,
    intent: IntentAnalysis | None,
    corpus_dir: str | None,
    index_dir: str | None,
    max_results: int,
) -> SearchOutcome:
    anchors = anchors_for(intent)
    # A prompt that names no subject ("write something") must not match on its filler words.
    searchable = intent is None or bool(anchors)
    with CorpusIndex.open(resolve_corpus_dir(corpus_dir), index_dir) as index:
        found: dict[str, _Found] = {}
        query_results: list[QueryResult] = []
        for query in plan.queries:
            hits = index.search(query, max_results, anchors) if searchable else []
            query_results.append(
                QueryResult(query=query, source_ids=[h.document.source_id for h in hits])
            )
            for hit in hits:
                entry = found.get(hit.document.source_id)
                if entry is None:
                    entry = found[hit.document.source_id] = _Found(hit.document, hit.score)
                entry.score = max(entry.score, hit.score)
                entry.queries.append(query)
                entry.add(hit.passages)
        missing = [a for a in anchors if index.document_frequency(a) == 0]
        info = index.info
        built, path, skipped = index.built, index.path, index.skipped
        reindexed, passage_count = index.reindexed, index.passage_count()
    ranked = sorted(found.values(), key=lambda f: (-f.score, f.document.source_id))
    sources: list[Source] = [
        f.document.to_source(
            score=f.score, queries=_text.unique(f.queries), passages=f.best_passages()
        )
        for f in ranked
    ]
    topic = intent.topic if intent is not None else plan.title
    corpus_name = (
        f"the sample corpus ({info.documents} documents)"
        if info.sample
        else f"the corpus at {info.path} ({info.documents} documents)"
    )
    message: str | None = None
    if not searchable:
        message = (
            f"The prompt names no subject to search {corpus_name} for, so no sources were "
            "found and none were invented."
        )
    elif not sources:
        message = (
            f"{corpus_name[0].upper()}{corpus_name[1:]} has no document about '{topic}': no "
            "sources were found and none were invented. Point --corpus (PROWZI_CORPUS_DIR) at "
            "documents that cover it."
        )
    elif len(sources) < THIN_RESULT_SOURCES or missing:
        gaps = f"; no document mentions {', '.join(repr(m) for m in missing)}" if missing else ""
        message = (
            f"{corpus_name[0].upper()}{corpus_name[1:]} covers '{topic}' thinly: "
            f"{len(sources)} source(s) found{gaps}."
        )
    result = SearchAgentResult(
        queries=query_results,
        sources=sources,
        corpus=info,
        message=message,
        skipped=[SkippedFile(path=p, reason=r) for p, r in skipped],
    )
    return SearchOutcome(
        result, built, str(path) if path else None, skipped, missing, reindexed, passage_count
    )


class SearchAgent:
    """Reads ``state.plan``, ``state.intent``, ``params.max_results_per_query`` and
    ``params.corpus_dir`` (else ``config.corpus_dir``, else the sample corpus); writes a
    :class:`SearchAgentResult`.
    Raises :class:`~prowzi.errors.CorpusError` (permanent) for an unusable corpus."""

    async def __call__(self, ctx: StageContext) -> SearchAgentResult:
        plan = ctx.state.plan
        if plan is None:
            raise PermanentError("search needs the planning stage's result")
        index_dir = ctx.config.index_dir
        outcome = await asyncio.to_thread(
            run_search,
            plan,
            ctx.state.intent,
            _settings.corpus_dir(ctx),
            str(index_dir) if index_dir is not None else None,
            ctx.params.max_results_per_query,
        )
        result = outcome.result
        if _settings.providers(ctx):  # online providers (issue 16 item 4): the whole hook
            from prowzi.sources.providers.stage import add_provider_results

            result = await add_provider_results(ctx, result, anchors_for(ctx.state.intent))
        ctx.annotate("corpus", result.corpus.path)
        ctx.annotate("corpus_documents", result.corpus.documents)
        ctx.annotate("corpus_sample", result.corpus.sample)
        ctx.annotate("corpus_fingerprint", result.corpus.fingerprint[:16])
        ctx.annotate("index_built", outcome.index_built)
        ctx.annotate("files_indexed", outcome.reindexed)
        ctx.annotate("passages", outcome.passages)
        ctx.annotate("origins", [f"{k}={v}" for k, v in result.origins().items()])
        ctx.annotate("index", outcome.index_path or "in memory (the index directory is unwritable)")
        ctx.annotate("max_results_per_query", ctx.params.max_results_per_query)
        ctx.annotate("queries", [q.query for q in result.queries])
        ctx.annotate("sources_found", len(result.sources))
        if outcome.missing_anchors:
            ctx.annotate("uncovered_words", outcome.missing_anchors)
        if result.message:
            ctx.annotate("message", result.message)
        for path, reason in outcome.skipped:
            ctx.event("corpus.skipped", path=path, reason=reason)
        for query in result.queries:
            ctx.event(
                "search.query",
                query=query.query,
                results=len(query.source_ids),
                top=query.source_ids[0] if query.source_ids else "",
            )
        for source in result.sources:
            ctx.event(
                "search.source",
                source_id=source.source_id,
                score=source.score,
                queries=len(source.queries),
                origin=source.origin,
            )
        return result

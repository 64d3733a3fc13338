"""The verification stage: keep the sources a document can honestly cite, and say why the others
were rejected.

Three checks, each giving a reason when it fails:

- relevance: a source's score divided by the best score must reach ``relevance_threshold``
  (BM25 scores have no absolute scale, so the threshold is relative to the best match);
- metadata: a title, and a URL, DOI or in-corpus path to find it by;
- duplicates: the same DOI, URL or normalised title as a source already kept. Sources are
  considered best first (sources that pass the other checks, then those with complete
  metadata, then by score), so the copy kept is the best one.

A source with a title and a location but no author or year is citable: the reference says
"n.d." and names the file. Its missing fields are reported as warnings (``warnings`` of the
result, and a ``verification.warning`` event), not as a reason to reject it.
"""

from __future__ import annotations

import asyncio
import re

from prowzi.agents import _settings, _text
from prowzi.agents.base import StageContext
from prowzi.agents.models import (
    RejectedSource,
    Source,
    SourceWarning,
    VerificationAgentResult,
)
from prowzi.errors import PermanentError


def normalise_url(url: str) -> str:
    url = url.strip().lower()
    url = re.sub(r"^https?://(?:www\.)?", "", url)
    url = re.sub(r"[?#].*$", "", url) if "arxiv.org" in url else url
    return url.rstrip("/")


def _duplicate_keys(source: Source) -> list[tuple[str, str]]:
    keys: list[tuple[str, str]] = []
    if source.doi:
        keys.append(("DOI", source.doi.strip().lower()))
    if source.url:
        keys.append(("URL", normalise_url(source.url)))
    title = _text.normalise_title(source.title)
    if title:
        keys.append(("title", title))
    return keys


def _metadata_problems(source: Source) -> list[str]:
    problems = []
    if not source.title.strip():
        problems.append("missing metadata: no title")
    if not (source.url or source.doi or source.location or source.source_id):
        problems.append("missing metadata: no URL, DOI or corpus path")
    return problems


def metadata_warnings(source: Source) -> list[str]:
    """Gaps that leave a source citable (the reference says so) but worth knowing about."""
    warnings = []
    if not source.authors:
        warnings.append("no authors")
    if source.year is None:
        warnings.append("no year (cited as n.d.)")
    if source.metadata_source.get("title") == "file-name":
        warnings.append("title taken from the file name")
    return warnings


def verify(sources: list[Source], relevance_threshold: float) -> VerificationAgentResult:
    best = max((s.score for s in sources), default=0.0)
    reasons: dict[str, list[str]] = {}
    for source in sources:
        problems: list[str] = []
        relative = source.score / best if best > 0 else 0.0
        if relative < relevance_threshold:
            problems.append(
                f"relevance {relative:.2f} of the best score is below the threshold "
                f"{relevance_threshold:.2f}"
            )
        problems.extend(_metadata_problems(source))
        reasons[source.source_id] = problems
    warnings = {s.source_id: metadata_warnings(s) for s in sources}
    order = sorted(
        range(len(sources)),
        key=lambda i: (
            bool(reasons[sources[i].source_id]),
            len(warnings[sources[i].source_id]),
            -sources[i].score,
            sources[i].source_id,
        ),
    )
    kept_keys: dict[tuple[str, str], str] = {}
    for i in order:
        source = sources[i]
        keys = _duplicate_keys(source)
        duplicate_of = next(((k, kept_keys[k]) for k in keys if k in kept_keys), None)
        if duplicate_of is not None:
            (kind, _), other = duplicate_of
            reasons[source.source_id].insert(0, f"duplicate of {other} (same {kind})")
        elif not reasons[source.source_id]:
            for key in keys:
                kept_keys[key] = source.source_id
    verified = [s for s in sources if not reasons[s.source_id]]
    rejected = [
        RejectedSource(source=s, reasons=reasons[s.source_id])
        for s in sources
        if reasons[s.source_id]
    ]
    return VerificationAgentResult(
        verified=verified,
        rejected=rejected,
        relevance_threshold=relevance_threshold,
        warnings=[
            SourceWarning(source_id=s.source_id, warnings=warnings[s.source_id])
            for s in verified
            if warnings[s.source_id]
        ],
    )


class VerificationAgent:
    """Reads ``state.search`` and ``params.relevance_threshold`` (the configured one when the
    parameters leave it out); writes a
    :class:`VerificationAgentResult` (verified sources in search order, rejected with reasons)."""

    async def __call__(self, ctx: StageContext) -> VerificationAgentResult:
        search = ctx.state.search
        if search is None:
            raise PermanentError("verification needs the search stage's result")
        threshold = _settings.relevance_threshold(ctx)
        result = await asyncio.to_thread(verify, list(search.sources), threshold)
        ctx.annotate("relevance_threshold", threshold)
        ctx.annotate("verified", len(result.verified))
        ctx.annotate("rejected", len(result.rejected))
        ctx.annotate("warnings", len(result.warnings))
        for rejected in result.rejected:
            ctx.event(
                "verification.rejected",
                source_id=rejected.source.source_id,
                reasons="; ".join(rejected.reasons),
            )
        for warned in result.warnings:
            ctx.event(
                "verification.warning",
                source_id=warned.source_id,
                warnings="; ".join(warned.warnings),
            )
        return result

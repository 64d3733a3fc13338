"""The evaluation stage: score the draft against a rubric, revise it once if it falls short.

Rubric (each criterion scores 0..1; the score is their weighted mean):

=============  ======  ==============================================================
criterion      weight  measures
=============  ======  ==============================================================
coverage       0.25    planned sections present with a substantive body
citations      0.20    every ``[n]`` resolves to a listed reference of a verified source,
                       and every reference is cited
support        0.20    share of cited sentences their cited passages support
                       (:mod:`prowzi.agents._support`)
density        0.15    share of sentences carrying a supported citation (full marks from
                       40%)
length         0.10    words against a target for the document type
structure      0.10    title, Introduction first, Conclusion last, References at the end,
                       planned order kept, no empty section
=============  ======  ==============================================================

Support is measured when the verified sources are known (the stage always knows them); a
document of connective filler that cites sources for words they do not contain loses both the
support and the density marks, so it cannot pass. The unsupported share of cited sentences is
reported in ``unsupported_share`` and in the stage's telemetry details.

Below ``params.evaluation_threshold`` one revision pass runs: sentences citing a reference that
does not resolve (or is not a verified source, or whose cited passage does not support the
sentence) are removed, missing planned sections are
written, thin sections (every section, when the draft is short) get more quoted evidence, the
conclusion is written afresh for the changed document, and references are renumbered in order
of first citation. The revised draft has ``revision`` one higher; both evaluations are returned.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass

from prowzi.agents import _draft, _settings, _support
from prowzi.agents.base import StageContext
from prowzi.agents.models import (
    DraftSection,
    EvaluationAgentResult,
    EvaluationStageResult,
    IntentAnalysis,
    Reference,
    ResearchPlan,
    RubricScore,
    Source,
    WritingAgentResult,
)
from prowzi.agents.writing import Composer, ReferenceBook, assemble, notes_for
from prowzi.errors import PermanentError

WEIGHTS = {
    "coverage": 0.25,
    "citations": 0.20,
    "support": 0.20,
    "density": 0.15,
    "length": 0.10,
    "structure": 0.10,
}
TARGET_WORDS = {
    "research_paper": 700,
    "literature_review": 800,
    "survey": 800,
    "essay": 450,
    "report": 600,
    "overview": 450,
}
DEFAULT_TARGET_WORDS = 600
TARGET_DENSITY = 0.4
"""Full density marks from this share of sentences with a supported citation. Not higher: the
sentences that connect quotations or describe the document carry no citation by design, since
no passage says them."""
MIN_SECTION_WORDS = 25
THIN_SECTION_WORDS = 60

_REFERENCE_LINE = re.compile(r"^\s*(?:[-*]\s*)?(?:\[(\d+)\]|(\d+)\.\s)", re.M)
"""A reference entry: ``[3] ...`` (as Prowzi writes), ``- [3] ...`` or ``3. ...``."""


@dataclass(frozen=True, slots=True)
class _Body:
    sections: list[_draft.ParsedSection]
    references_block: str


def _split(markdown: str) -> _Body:
    parsed = _draft.parse_sections(markdown)
    body = [s for s in parsed if not _draft.is_references_heading(s.title)]
    block = next((s.body for s in parsed if _draft.is_references_heading(s.title)), "")
    return _Body(body, block)


def _words(text: str) -> int:
    return len(re.findall(r"[^\W_]+", text))


def evaluate(
    draft: WritingAgentResult,
    plan: ResearchPlan,
    verified_ids: set[str] | None,
    document_type: str | None,
    threshold: float,
    sources: Sequence[Source] | None = None,
) -> EvaluationAgentResult:
    """Score ``draft``; with ``sources`` (the verified ones), also whether each cited sentence
    is supported by the passage it cites."""
    body = _split(draft.markdown)
    by_heading = {_draft.normalise_heading(s.title): s for s in body.sections}
    recommendations: list[str] = []
    criteria: list[RubricScore] = []

    # coverage
    missing, thin = [], []
    for planned in plan.sections:
        found = by_heading.get(_draft.normalise_heading(planned.title))
        if found is None:
            missing.append(planned.title)
        elif _words(found.body) < MIN_SECTION_WORDS:
            thin.append(planned.title)
    covered = len(plan.sections) - len(missing) - len(thin)
    coverage = covered / len(plan.sections) if plan.sections else 1.0
    note = f"{covered}/{len(plan.sections)} planned sections written"
    if missing:
        recommendations.append(f"add the missing section(s): {', '.join(missing)}")
    if thin:
        recommendations.append(f"expand the thin section(s): {', '.join(thin)}")
    criteria.append(
        RubricScore(criterion="coverage", score=coverage, weight=WEIGHTS["coverage"], note=note)
    )

    # citation validity
    text = "\n\n".join(s.body for s in body.sections)
    markers = _draft.cited_numbers(text)
    refs = {r.number: r for r in draft.references}
    listed = {int(a or b) for a, b in _REFERENCE_LINE.findall(body.references_block)}

    def valid(n: int) -> bool:
        ref = refs.get(n)
        return (
            ref is not None
            and n in listed
            and (verified_ids is None or ref.source_id in verified_ids)
        )

    bad = sorted({n for n in markers if not valid(n)})
    cited = set(markers)
    unused = sorted(n for n in refs if n not in cited)
    unverified = sorted(
        n for n, r in refs.items() if verified_ids is not None and r.source_id not in verified_ids
    )
    if markers and refs:
        marker_share = sum(valid(n) for n in markers) / len(markers)
        ref_share = sum(
            1
            for n, r in refs.items()
            if n in cited and (verified_ids is None or r.source_id in verified_ids)
        ) / len(refs)
        citations = (marker_share + ref_share) / 2
    else:
        citations = 0.0
    if bad:
        recommendations.append(f"fix citations that do not resolve: {bad}")
    if unused:
        recommendations.append(f"cite or drop unused references: {unused}")
    if unverified:
        recommendations.append(f"drop references to unverified sources: {unverified}")
    if not markers:
        recommendations.append("cite verified sources for the document's claims")
    criteria.append(
        RubricScore(
            criterion="citations",
            score=citations,
            weight=WEIGHTS["citations"],
            note=f"{len(markers)} citation(s), {len(bad)} unresolved; {len(refs)} reference(s)",
        )
    )

    # support
    unsupported_share: float | None = None
    unsupported: set[str] = set()
    if sources is not None:
        by_id = {s.source_id: s for s in sources}
        checked = _support.cited_sentences([s.body for s in body.sections], refs, by_id)
        failing = sum(1 for c in checked if not c.supported)
        unsupported = {c.sentence for c in checked if not c.supported}
        unsupported_share = failing / len(checked) if checked else 0.0
        criteria.append(
            RubricScore(
                criterion="support",
                score=1.0 - unsupported_share if checked else 0.0,
                weight=WEIGHTS["support"],
                note=f"{len(checked) - failing}/{len(checked)} cited sentences "
                "supported by the passage they cite",
            )
        )
        if failing:
            recommendations.append(
                f"cite only what the cited passage says: {failing} cited sentence(s) unsupported"
            )

    # citation density
    sentences = [s for sec in body.sections for s in _draft.split_sentences(sec.body)]
    with_citation = sum(1 for s in sentences if _draft.CITATION.search(s) and s not in unsupported)
    density = with_citation / len(sentences) if sentences else 0.0
    criteria.append(
        RubricScore(
            criterion="density",
            score=min(1.0, density / TARGET_DENSITY),
            weight=WEIGHTS["density"],
            note=f"{with_citation}/{len(sentences)} sentences cite a source"
            + (" that supports them" if sources is not None else ""),
        )
    )
    if density < TARGET_DENSITY:
        recommendations.append("support more sentences with citations")

    # length
    words = _words(text)
    target = TARGET_WORDS.get(document_type or "", DEFAULT_TARGET_WORDS)
    criteria.append(
        RubricScore(
            criterion="length",
            score=min(1.0, words / target),
            weight=WEIGHTS["length"],
            note=f"{words}/{target} words",
        )
    )
    if words < target:
        recommendations.append(f"lengthen the document towards {target} words")

    # structure
    titles = [_draft.normalise_heading(s.title) for s in body.sections]
    planned_titles = [_draft.normalise_heading(s.title) for s in plan.sections]
    present = [t for t in titles if t in planned_titles]
    parsed_all = _draft.parse_sections(draft.markdown)
    checks = {
        "a title": draft.markdown.lstrip().startswith("# "),
        "Introduction first": bool(titles) and titles[0] == "introduction",
        "Conclusion last": bool(titles) and titles[-1] == "conclusion",
        "References at the end": bool(parsed_all)
        and _draft.is_references_heading(parsed_all[-1].title),
        "the planned order": present == [t for t in planned_titles if t in present],
        "no empty section": all(s.body.strip() for s in body.sections),
    }
    failed = [name for name, ok in checks.items() if not ok]
    criteria.append(
        RubricScore(
            criterion="structure",
            score=(len(checks) - len(failed)) / len(checks),
            weight=WEIGHTS["structure"],
            note="all structure checks pass" if not failed else f"lacks {', '.join(failed)}",
        )
    )
    if failed:
        recommendations.append(f"fix the structure: {', '.join(failed)}")

    total = sum(c.weight for c in criteria)
    score = round(sum(c.score * c.weight for c in criteria) / total, 4)
    return EvaluationAgentResult.graded(
        score, threshold, criteria, recommendations, unsupported_share
    )


# --- revision -----------------------------------------------------------------------------


def _sections_of(draft: WritingAgentResult) -> list[DraftSection]:
    if draft.sections:
        return list(draft.sections)
    return [
        DraftSection(
            title=s.title, text=s.body, citations=sorted(set(_draft.cited_numbers(s.body)))
        )
        for s in _split(draft.markdown).sections
    ]


def _section(title: str, text: str) -> DraftSection:
    return DraftSection(title=title, text=text, citations=sorted(set(_draft.cited_numbers(text))))


def _drop_invalid_citations(
    text: str,
    valid: set[int],
    refs: dict[int, Reference] | None = None,
    sources: dict[str, Source] | None = None,
) -> str:
    """``text`` without the sentences that cite an invalid reference or, given the references
    and sources, a passage that does not support them."""

    def keep(sentence: str) -> bool:
        if not all(n in valid for n in _draft.cited_numbers(sentence)):
            return False
        if refs is None or sources is None or not _draft.CITATION.search(sentence):
            return True
        support = _support.sentence_support(sentence, refs, sources)
        return support >= _support.SUPPORT_THRESHOLD

    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", text):
        kept = [s for s in _draft.split_sentences(paragraph) if keep(s)]
        if kept:
            paragraphs.append(" ".join(kept))
    return "\n\n".join(paragraphs)


def _renumber(
    sections: list[DraftSection], book: ReferenceBook
) -> tuple[list[DraftSection], list[Reference]]:
    order: dict[int, int] = {}
    for section in sections:
        for n in _draft.cited_numbers(section.text):
            order.setdefault(n, len(order) + 1)

    def rewrite(match: re.Match[str]) -> str:
        numbers = list(dict.fromkeys(_draft.cited_numbers(match.group(0))))
        return "[" + ", ".join(str(order[n]) for n in numbers if n in order) + "]"

    renumbered = []
    for section in sections:
        text = _draft.CITATION.sub(rewrite, section.text)
        renumbered.append(
            DraftSection(
                title=section.title, text=text, citations=sorted(set(_draft.cited_numbers(text)))
            )
        )
    refs = {r.number: r for r in book.references()}
    references = sorted(
        (refs[old].model_copy(update={"number": new}) for old, new in order.items() if old in refs),
        key=lambda r: r.number,
    )
    return renumbered, references


def revise(
    draft: WritingAgentResult,
    plan: ResearchPlan,
    intent: IntentAnalysis | None,
    verified: list[Source],
    sample: bool = False,
    message: str | None = None,
    expand: bool = False,
) -> WritingAgentResult:
    """One revision pass; ``expand`` adds evidence to every section, not only thin ones."""
    verified_ids = {s.source_id for s in verified}
    valid_refs = [r for r in draft.references if r.source_id in verified_ids]
    valid_numbers = {r.number for r in valid_refs}
    by_number = {r.number: r for r in valid_refs}
    by_id = {s.source_id: s for s in verified}
    cleaned = [
        _section(s.title, _drop_invalid_citations(s.text, valid_numbers, by_number, by_id))
        for s in _sections_of(draft)
    ]
    composer = Composer(
        intent,
        plan,
        verified,
        ReferenceBook(valid_refs),
        already_written="\n".join(s.text for s in cleaned),
    )
    existing = {_draft.normalise_heading(s.title): s for s in cleaned}
    planned_keys = [_draft.normalise_heading(p.title) for p in plan.sections]
    extras = [s for s in cleaned if _draft.normalise_heading(s.title) not in planned_keys]
    out: list[DraftSection] = []
    last = len(plan.sections) - 1
    for i, planned in enumerate(plan.sections):
        current = existing.get(planned_keys[i])
        if i == last and extras:
            out.extend(extras)
        if i == 0 and planned.title == "Introduction" and current is None:
            out.append(composer.introduction(planned, depth=2))
        elif i == last and planned.title == "Conclusion":
            # A conclusion sums up the document, which this pass changed: write it afresh.
            out.append(composer.conclusion(planned, out))
        elif current is None:
            out.append(composer.section(planned, i, depth=2))
        elif (
            0 < i < last
            and planned.queries
            and (
                expand
                or _words(current.text) < THIN_SECTION_WORDS
                or not _draft.CITATION.search(current.text)
            )
        ):
            more = composer.section(planned, i, depth=2)
            extra = [
                s
                for s in _draft.split_sentences(more.text)[1:]
                if _draft.CITATION.search(s) and s not in current.text
            ]
            text = (current.text + " " + " ".join(extra)).strip() if extra else current.text
            out.append(_section(current.title, text))
        else:
            out.append(current)
    sections, references = _renumber(out, composer.book)
    revised = assemble(
        draft.title, sections, references, notes_for(sample, message), revision=draft.revision + 1
    )
    return revised


def run_evaluation(
    draft: WritingAgentResult,
    plan: ResearchPlan,
    intent: IntentAnalysis | None,
    verified: list[Source] | None,
    threshold: float,
    sample: bool = False,
    message: str | None = None,
) -> EvaluationStageResult:
    verified_ids = {s.source_id for s in verified} if verified is not None else None
    document_type = intent.document_type if intent is not None else None
    initial = evaluate(draft, plan, verified_ids, document_type, threshold, verified)
    if initial.passed:
        return EvaluationStageResult(initial_evaluation=initial, evaluation=initial, draft=draft)
    short = any(c.criterion == "length" and c.score < 1 for c in initial.criteria)
    revised = revise(draft, plan, intent, verified or [], sample, message, expand=short)
    final = evaluate(revised, plan, verified_ids, document_type, threshold, verified)
    return EvaluationStageResult(initial_evaluation=initial, evaluation=final, draft=revised)


class EvaluationAgent:
    """Reads ``state.draft``, ``state.plan``, ``state.verification`` and
    ``params.evaluation_threshold`` (the configured one when the parameters leave it out);
    writes an :class:`EvaluationStageResult`."""

    async def __call__(self, ctx: StageContext) -> EvaluationStageResult:
        draft, plan = ctx.state.draft, ctx.state.plan
        if draft is None or plan is None:
            raise PermanentError("evaluation needs the planning and writing stages' results")
        verification, search = ctx.state.verification, ctx.state.search
        threshold = _settings.evaluation_threshold(ctx)
        result = await asyncio.to_thread(
            run_evaluation,
            draft,
            plan,
            ctx.state.intent,
            list(verification.verified) if verification is not None else None,
            threshold,
            search.corpus.sample if search is not None else False,
            search.message if search is not None else None,
        )
        revised = result.draft is not draft
        ctx.annotate("threshold", threshold)
        ctx.annotate("initial_score", result.initial_evaluation.score)
        ctx.annotate("score", result.evaluation.score)
        ctx.annotate("revised", revised)
        ctx.annotate("passed", result.evaluation.passed)
        if result.evaluation.unsupported_share is not None:
            ctx.annotate("unsupported_share", result.evaluation.unsupported_share)
        for phase, evaluation in (
            ("initial", result.initial_evaluation),
            ("final", result.evaluation),
        ):
            for criterion in evaluation.criteria:
                ctx.event(
                    "evaluation.criterion",
                    phase=phase,
                    criterion=criterion.criterion,
                    score=round(criterion.score, 4),
                    note=criterion.note,
                )
            if not revised:
                break
        if revised:
            ctx.event(
                "evaluation.revised",
                revision=result.draft.revision,
                words=result.draft.word_count,
                recommendations="; ".join(result.initial_evaluation.recommendations),
            )
        return result

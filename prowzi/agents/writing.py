"""The writing stage: a markdown document with the planned sections, built only from verified
sources.

Each topic section quotes, for each of its best sources, the sentence of a matched passage that
best matches the section's queries, in quotation marks with a numbered citation that points at
the passage's page or section (``[3, p. 12]``, ``[3, § Handlers]``); it never paraphrases a
source's words into unmarked prose. A sentence carries a citation only when the cited passage
supports it (see :mod:`prowzi.agents._support`): the quotations do. Sentences the agent writes
itself connect the quotations with facts it can check (the words two sources share, the span
of their years, which source informed most sections) or describe the document itself ("This
section turns to..."); they name sources but carry no citation, since no passage says them.
References are numbered in order of first citation and list only verified sources, with
"n.d." for a work without a year. The same inputs always give the same document.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from prowzi.agents import _draft, _text
from prowzi.agents.base import StageContext
from prowzi.agents.models import (
    DraftSection,
    IntentAnalysis,
    PlannedSection,
    Reference,
    ResearchPlan,
    Source,
    WritingAgentResult,
)
from prowzi.errors import PermanentError

SAMPLE_NOTE = (
    "Sources come from Prowzi's bundled sample corpus. Its entries are short summaries written "
    "for the sample, not the works' original abstracts: quotations below quote those entries."
)

_DOCUMENT_NOUN = {
    "research_paper": "paper",
    "literature_review": "review",
    "survey": "survey",
    "essay": "essay",
    "report": "report",
    "overview": "overview",
}

_EVIDENCE_TEMPLATES = (
    'According to {ref}, "{quote}" {cite}.',
    'As {ref} {put} it, "{quote}" {cite}.',
    '{Ref} {make} the point directly: "{quote}" {cite}.',
    'In the account of {ref}, "{quote}" {cite}.',
)
_DANGLING_OPENERS = _text.word_set("this these it its they their such he she his her")

_MIN_QUOTE_WORDS = 6
_MAX_QUOTE_WORDS = 70
_GENERIC_THEME_WORDS = _text.word_set(
    """
    paper work works show shows shown result results approach approaches method methods use
    used using new first also one two three can based study studies propose proposed present
    presents describe describes introduce introduces provide provides large small many well
    author authors article review reviews argue argues report reports discuss discusses
    """
)


class ReferenceBook:
    """Numbers sources in order of first citation."""

    def __init__(self, existing: Iterable[Reference] = ()) -> None:
        self._refs: dict[str, Reference] = {}
        for ref in existing:
            self._refs.setdefault(ref.source_id, ref)

    def cite(self, source: Source) -> int:
        ref = self._refs.get(source.source_id)
        if ref is None:
            number = max((r.number for r in self._refs.values()), default=0) + 1
            ref = Reference.to(source, number)
            self._refs[source.source_id] = ref
        return ref.number

    def references(self) -> list[Reference]:
        return sorted(self._refs.values(), key=lambda r: r.number)

    def number_of(self, source: Source) -> int | None:
        ref = self._refs.get(source.source_id)
        return ref.number if ref is not None else None


def _clean_quote(sentence: str) -> str:
    """A source sentence made safe to quote: inner double quotes become single, and anything
    that looks like a citation marker is dropped so it cannot be mistaken for ours."""
    quote = re.sub(r"[\"“”]", "'", sentence)
    quote = _draft.CITATION.sub("", quote)
    return " ".join(quote.split())


def _located_texts(source: Source) -> list[tuple[str, str]]:
    """(text, locator) of what a source offers to quote: its matched passages (with page or
    section) when the search recorded them, else its abstract and text."""
    if not source.passages:
        return [(f"{source.abstract}\n\n{source.text}", "")]
    sections = {p.section for p in source.passages if p.section}
    # A page always locates; a heading only when the source is long enough to need one.
    locate_sections = len(source.text) > 3000 or len(sections) > 1
    return [
        (p.text, p.locator() if p.page is not None or locate_sections else "")
        for p in sorted(source.passages, key=lambda p: (p.page or 0, -p.score))
    ]


def candidate_sentences(source: Source) -> list[tuple[str, str]]:
    """(sentence, locator) of a source that can stand alone as a quotation."""
    seen: dict[str, str] = {}
    for text, locator in _located_texts(source):
        for sentence in _text.sentences(text):
            quote = _clean_quote(sentence)
            n = len(quote.split())
            if _MIN_QUOTE_WORDS <= n <= _MAX_QUOTE_WORDS and not quote[:1].islower():
                seen.setdefault(quote, locator)
    return list(seen.items())


def _ref_label(source: Source) -> str:
    label = _draft.author_label(list(source.authors), source.year)
    if label:
        return label if source.year else f"{label} (n.d.)"
    title = source.title.replace('"', "'")
    return f'"{title}" ({source.year})' if source.year else f'"{title}" (n.d.)'


def _lower_title(title: str) -> str:
    """``Error Correction and Fault Tolerance`` -> ``error correction and fault tolerance``,
    keeping acronyms (``CRISPR-Cas9``, ``AI``)."""

    def keep(part: str) -> bool:
        return sum(c.isupper() for c in part) >= 2 or (
            part[:1].isupper() and any(c.isdigit() for c in part)
        )

    return " ".join(
        "-".join(p if keep(p) else p.lower() for p in word.split("-")) for word in title.split()
    )


def _join(items: list[str]) -> str:
    """``a, b and c``; ``a; b, c; and d`` when an item holds a comma itself."""
    if len(items) <= 1:
        return "".join(items)
    if any("," in item for item in items):
        return "; ".join(items[:-1]) + "; and " + items[-1]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@dataclass(slots=True)
class _Quote:
    source: Source
    number: int
    text: str
    locator: str = ""


class Composer:
    """Writes sections from verified sources; also used by the evaluation stage's revision."""

    def __init__(
        self,
        intent: IntentAnalysis | None,
        plan: ResearchPlan,
        verified: list[Source],
        book: ReferenceBook | None = None,
        already_written: str = "",
    ) -> None:
        self.intent = intent
        self.plan = plan
        self.verified = verified
        self.book = book or ReferenceBook()
        self.topic = intent.topic if intent is not None else plan.title
        self.topic_stems = set(_text.stems(self.topic))
        self._candidates = {s.source_id: candidate_sentences(s) for s in verified}
        self._used = {
            (s.source_id, q)
            for s in verified
            for q, _ in self._candidates[s.source_id]
            if q.rstrip(".!?;:,") in already_written
        }
        self._sections_per_source: Counter[str] = Counter()
        self._template = 0
        self._surnames = {w for s in verified for a in s.authors for w in _text.words(a)}
        labels = Counter(_ref_label(s) for s in verified)
        self._ambiguous = {label for label, n in labels.items() if n > 1}
        self._queries_recorded = any(s.queries for s in verified)

    def _label(self, source: Source) -> str:
        """``Shor (1994)``; with the title when two verified sources would share the label
        (two undated works by one author: ``Sajip, "logging.config" (n.d.)``)."""
        label = _ref_label(source)
        if label not in self._ambiguous or not source.authors:
            return label
        who = _draft.author_label(list(source.authors), None)
        title = source.title.replace('"', "'")
        return f'{who}, "{title}" ({source.year or "n.d."})'

    # -- choosing evidence -----------------------------------------------------------------

    def sources_for(self, section: PlannedSection) -> list[Source]:
        """Verified sources found by this section's queries, best first. When no source says
        which queries found it (a search agent that does not record them), every verified
        source is a candidate and the choice of sentences does the matching."""
        queries = set(section.queries)
        if self._queries_recorded:
            found = [s for s in self.verified if queries.intersection(s.queries)]
        else:
            found = list(self.verified) if queries else []
        return sorted(found, key=lambda s: (-s.score, s.source_id))

    def _evidence(
        self, section: PlannedSection, sources: int, quotes_per_source: int
    ) -> list[_Quote]:
        """The best quotations for a section, from at most ``sources`` distinct sources.

        Every unused sentence of every source the section's queries found is a candidate. A
        candidate scores by the section's query words it contains (twice), the topic's words,
        the source's relative relevance, and loses a point for each section that already
        quoted its source (so the evidence spreads) and for opening with a pronoun that would
        leave the quotation without its referent.
        """
        candidates = self.sources_for(section)
        if not candidates:
            return []
        best_score = max(s.score for s in candidates) or 1.0
        query_stems = set(_text.stems(" ".join([section.title, *section.queries])))
        scored: list[tuple[float, int, int, Source, str, str]] = []
        for rank, source in enumerate(candidates):
            for position, (quote, locator) in enumerate(self._candidates[source.source_id]):
                if (source.source_id, quote) in self._used:
                    continue
                stems = set(_text.stems(quote))
                value = (
                    2 * len(stems & query_stems)
                    + len(stems & self.topic_stems)
                    + source.score / best_score
                    - self._sections_per_source[source.source_id]
                )
                if _text.words(quote)[0] in _DANGLING_OPENERS:
                    value -= 1.5
                scored.append((-value, rank, position, source, quote, locator))
        scored.sort(key=lambda c: c[:3])
        per_source: Counter[str] = Counter()
        chosen: list[tuple[Source, str, str]] = []
        for _, _, _, source, quote, locator in scored:
            if per_source[source.source_id] >= quotes_per_source:
                continue
            if source.source_id not in per_source and len(per_source) >= sources:
                continue
            per_source[source.source_id] += 1
            chosen.append((source, quote, locator))
        order = {
            sid: i for i, sid in enumerate(_text.unique(src.source_id for src, _, _ in chosen))
        }
        chosen.sort(key=lambda c: order[c[0].source_id])
        quotes = []
        for source, quote, locator in chosen:
            self._used.add((source.source_id, quote))
            quotes.append(_Quote(source, self.book.cite(source), quote, locator))
        for source_id in per_source:
            self._sections_per_source[source_id] += 1
        return quotes

    # -- writing ---------------------------------------------------------------------------

    def _evidence_sentence(self, quote: _Quote) -> str:
        template = _EVIDENCE_TEMPLATES[self._template % len(_EVIDENCE_TEMPLATES)]
        self._template += 1
        label = self._label(quote.source)
        plural = len(quote.source.authors) > 1
        return template.format(
            ref=label,
            Ref=label[:1].upper() + label[1:],
            put="put" if plural else "puts",
            make="make" if plural else "makes",
            quote=quote.text.rstrip(".!?;:,"),
            cite=_draft.citation(quote.number, quote.locator),
        )

    def _themes(self, quotes: list[_Quote]) -> list[str]:
        """Words that at least two different sources' quotations share (beyond the topic)."""
        by_stem: dict[str, set[str]] = {}
        surface: dict[str, str] = {}
        for quote in quotes:
            for word in _text.content_words(quote.text):
                st = _text.stem(word)
                if (
                    len(word) < 5
                    or word in self._surnames
                    or word.isdigit()
                    or word.endswith(("ed", "ly"))
                    or any(word.startswith(t) for t in self.topic_stems if len(t) >= 4)
                    or st in self.topic_stems
                    or word in _GENERIC_THEME_WORDS
                    or word in _text.INSTRUCTION_WORDS
                ):
                    continue
                by_stem.setdefault(st, set()).add(quote.source.source_id)
                surface.setdefault(st, word)
        shared = [st for st, ids in by_stem.items() if len(ids) >= 2]
        shared.sort(key=lambda st: (-len(by_stem[st]), list(surface).index(st)))
        return [surface[st] for st in shared[:3]]

    def _synthesis(self, quotes: list[_Quote]) -> list[str]:
        if not quotes:
            return []
        distinct = list({q.source.source_id: q for q in quotes}.values())
        if len(distinct) == 1:
            only = distinct[0]
            return [
                f"Only one verified source in the corpus, {self._label(only.source)}, speaks "
                "directly to this section."
            ]
        sentences = []
        themes = self._themes(quotes)
        if themes:
            sharing = [
                q
                for q in distinct
                if any(
                    t in _text.words(q.text) or _text.stem(t) in _text.stems(q.text) for t in themes
                )
            ]
            names = _join([self._label(q.source) for q in sharing])
            sentences.append(
                f"{names[:1].upper()}{names[1:]} share a concern with {_join(themes)}."
            )
        dated = sorted(
            (q for q in distinct if q.source.year), key=lambda q: (q.source.year or 0, q.number)
        )
        if len(dated) >= 2 and dated[0].source.year != dated[-1].source.year:
            old, new = dated[0], dated[-1]
            span = (new.source.year or 0) - (old.source.year or 0)
            sentences.append(
                f"The evidence here spans {_plural(span, 'year')}, from {self._label(old.source)} "
                f"to {self._label(new.source)}."
            )
        return sentences

    def section(self, section: PlannedSection, index: int, depth: int = 1) -> DraftSection:
        """A topic section (anything but the Introduction and the Conclusion)."""
        subject = _lower_title(section.title)
        leads = (
            f"This section turns to {subject}.",
            f"We now consider {subject}.",
        )
        sentences = [leads[index % 2]]
        if section.title == "Background":
            sentences = [
                f"This section sets out the foundations on which work on {self.topic} builds."
            ]
        quotes = self._evidence(
            section, sources=3 if depth <= 1 else 5, quotes_per_source=1 if depth <= 1 else 2
        )
        found = [s for s in self.sources_for(section) if self.book.number_of(s)][:2]
        if not quotes and found:
            cited = [self._label(s) for s in found]
            verb = (
                "are the corpus sources that bear"
                if len(found) > 1
                else ("is the corpus source that bears")
            )
            sentences.append(
                f"{_join(cited)[:1].upper()}{_join(cited)[1:]}, quoted above, {verb} on this "
                "section; no further passage of theirs addresses it directly."
            )
        elif not quotes:
            sentences.append(
                "The corpus holds no verified source for this section, so it is left without "
                "claims rather than filled with unsupported ones."
            )
        sentences += [self._evidence_sentence(q) for q in quotes]
        sentences += self._synthesis(quotes)
        return self._make(section.title, [" ".join(sentences)])

    def introduction(self, section: PlannedSection, depth: int = 1) -> DraftSection:
        noun = _DOCUMENT_NOUN.get(self.intent.document_type if self.intent else "", "document")
        paragraphs = [f"This {noun} examines {self.topic}."]
        quotes = self._evidence(section, sources=2 if depth <= 1 else 3, quotes_per_source=1)
        if quotes:
            paragraphs[0] += " " + " ".join(self._evidence_sentence(q) for q in quotes)
        else:
            paragraphs[0] += (
                " No verified source in the corpus addresses it, so what follows records the "
                "plan of the document without making claims."
            )
        middle = [s.title for s in self.plan.sections[1:-1]]
        if middle:
            paragraphs.append(
                f"After this introduction, the {noun} covers {_join(middle)}, and closes with a "
                "conclusion."
            )
        return self._make(section.title, paragraphs)

    def conclusion(self, section: PlannedSection, written: list[DraftSection]) -> DraftSection:
        noun = _DOCUMENT_NOUN.get(self.intent.document_type if self.intent else "", "document")
        refs = {r.number: r for r in self.book.references()}
        by_source = {s.source_id: s for s in self.verified}
        usage: Counter[int] = Counter()
        for draft_section in written:
            for n in draft_section.citations:
                usage[n] += 1
        if not refs:
            return self._make(
                section.title,
                [
                    f"No verified source in the corpus addresses {self.topic}, so this {noun} "
                    "makes no claims about it. A corpus that covers the topic is needed first."
                ],
            )
        sections = _plural(len(written), "section")
        sources = _plural(len(refs), "verified source")
        sentences = [
            f"This {noun} has examined {self.topic} across {sections}, drawing on {sources} "
            "from the corpus."
        ]

        def label(n: int) -> str:
            source = by_source.get(refs[n].source_id)
            return self._label(source) if source else f'"{refs[n].title}"'

        # These sentences speak about the document and its sources, not about the world: no
        # passage says them, so they name sources without citing them.

        ranked = sorted(usage, key=lambda n: (-usage[n], n))
        if ranked and usage[ranked[0]] >= 2:
            top = ranked[0]
            lead = f"{label(top)[:1].upper()}{label(top)[1:]}"
            second = ranked[1] if len(ranked) > 1 and usage[ranked[1]] >= 2 else None
            if second is not None and usage[second] == usage[top]:
                text = f"{lead} and {label(second)} informed the most sections ({usage[top]} each)"
            else:
                text = f"{lead} informed the most sections ({usage[top]})"
                if second is not None:
                    text += f", followed by {label(second)} ({usage[second]})"
            sentences.append(text + ".")
        dated = sorted((n for n in refs if refs[n].year), key=lambda n: (refs[n].year or 0, n))
        if len(dated) >= 2 and refs[dated[0]].year != refs[dated[-1]].year:
            old, new = dated[0], dated[-1]
            sentences.append(
                f"The sources range from {label(old)} to {label(new)}, so the "
                f"picture drawn here reflects work from {refs[old].year} to {refs[new].year}."
            )
        challenges = (
            next(
                (s for s in written if s.title == self.plan.sections[-2].title and s.citations),
                None,
            )
            if len(self.plan.sections) >= 2
            else None
        )
        if challenges is not None:
            cited = _join([label(n) for n in challenges.citations[:3]])
            sentences.append(
                f"The open questions gathered under {challenges.title} draw on {cited}, and mark "
                f"where further work on {self.topic} is needed."
            )
        return self._make(section.title, [" ".join(sentences)])

    @staticmethod
    def _make(title: str, paragraphs: list[str]) -> DraftSection:
        text = "\n\n".join(p for p in paragraphs if p)
        return DraftSection(
            title=title, text=text, citations=sorted(set(_draft.cited_numbers(text)))
        )

    def write_all(self, depth: int = 1) -> list[DraftSection]:
        sections: list[DraftSection] = []
        last = len(self.plan.sections) - 1
        for i, planned in enumerate(self.plan.sections):
            if i == 0 and planned.title == "Introduction":
                sections.append(self.introduction(planned, depth))
            elif i == last and planned.title == "Conclusion":
                sections.append(self.conclusion(planned, sections))
            else:
                sections.append(self.section(planned, i, depth))
        return sections


def notes_for(sample: bool, message: str | None) -> list[str]:
    notes = []
    if sample:
        notes.append(SAMPLE_NOTE)
    if message:
        notes.append(message)
    return notes


def assemble(
    title: str,
    sections: list[DraftSection],
    references: list[Reference],
    notes: list[str],
    revision: int = 0,
) -> WritingAgentResult:
    return WritingAgentResult(
        title=title,
        markdown=_draft.render(title, sections, references, notes),
        sections=sections,
        references=references,
        word_count=_draft.word_count(sections),
        revision=revision,
    )


def write_draft(
    intent: IntentAnalysis | None,
    plan: ResearchPlan,
    verified: list[Source],
    sample: bool = False,
    message: str | None = None,
) -> WritingAgentResult:
    composer = Composer(intent, plan, verified)
    sections = composer.write_all(depth=1)
    return assemble(plan.title, sections, composer.book.references(), notes_for(sample, message))


class WritingAgent:
    """Reads ``state.intent``, ``state.plan`` and ``state.verification`` (and the search
    stage's coverage message); writes the first draft, a :class:`WritingAgentResult`."""

    async def __call__(self, ctx: StageContext) -> WritingAgentResult:
        plan, verification = ctx.state.plan, ctx.state.verification
        if plan is None or verification is None:
            raise PermanentError("writing needs the planning and verification stages' results")
        search = ctx.state.search
        draft = await asyncio.to_thread(
            write_draft,
            ctx.state.intent,
            plan,
            list(verification.verified),
            search.corpus.sample if search is not None else False,
            search.message if search is not None else None,
        )
        quotes = sum(len(_draft.quotations(s.text)) for s in draft.sections)
        ctx.annotate("words", draft.word_count)
        ctx.annotate("sections", len(draft.sections))
        ctx.annotate("references", len(draft.references))
        ctx.annotate("quotations", quotes)
        ctx.annotate("citations", sum(len(_draft.cited_numbers(s.text)) for s in draft.sections))
        for section in draft.sections:
            ctx.event(
                "writing.section",
                title=section.title,
                citations=len(section.citations),
                words=len(section.text.split()),
            )
        return draft

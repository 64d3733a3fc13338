"""Integrity gates a model's prose passes before it enters a document.

The model writes a section from sources numbered ``[1]..[k]`` in its prompt, all verified.
Then, sentence by sentence:

- a citation ``[n]`` whose ``n`` is not one of those sources is removed (the model cited a
  source it was not given), as is an author-year citation ``(Name, 2020)`` that matches none
  of them, and any reference list the model wrote itself (the document's references are made
  by Prowzi from the verified sources only): each counts in ``citations_dropped``;
- a quotation (text in double quotes) must appear verbatim (up to spacing and the quote marks'
  style) in a source the sentence cites; otherwise the sentence is removed and counts in
  ``quotes_dropped`` (a misquote cannot be repaired without knowing what was meant);
- a sentence that cites must share content with what it cites: the share of its content-word
  stems found in the cited sources is its *support*; below :data:`SUPPORT_THRESHOLD` (0.3:
  fewer than about a third of its content words occur in the source, where a sentence drawn
  from a source shares most of them) the citation is reported as unsupported, not removed.

Headings the model adds are removed (Prowzi writes the headings).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from prowzi.agents import _draft, _text
from prowzi.agents.models import Source

SUPPORT_THRESHOLD = 0.3

_HEADING_LINE = re.compile(r"^\s*#{1,6}\s+(.*)$")
_REFERENCE_TITLES = {
    "references",
    "reference",
    "bibliography",
    "sources",
    "works cited",
    "citations",
}
_REFERENCE_ENTRY = re.compile(r"^\s*(?:[-*]\s*)?(?:\[\d+\]|\d+\.)\s+\S")
_AUTHOR_YEAR = re.compile(r"\s?\(([A-Z][\w'’-]+)(?: et al\.?| and [A-Z][\w'’-]+)?,? (\d{4})\)")
_EDGE = " \t.,;:!?…'‘’"


@dataclass(slots=True)
class GateReport:
    citations_dropped: int = 0
    quotes_dropped: int = 0
    unsupported_citations: int = 0
    supported_citations: int = 0
    sentences: int = 0
    unsupported: list[str] = field(default_factory=list)

    def add(self, other: GateReport) -> None:
        self.citations_dropped += other.citations_dropped
        self.quotes_dropped += other.quotes_dropped
        self.unsupported_citations += other.unsupported_citations
        self.supported_citations += other.supported_citations
        self.sentences += other.sentences
        self.unsupported.extend(other.unsupported)


def normalise_quote(text: str) -> str:
    """Text as compared for verbatim quotation: spacing collapsed, quote marks straightened,
    punctuation at the edges dropped."""
    text = text.replace("“", '"').replace("”", '"').replace("’", "'").replace("‘", "'")
    return " ".join(text.split()).strip(_EDGE + '"')


def source_text(source: Source) -> str:
    return f"{source.title}\n{source.abstract}\n{source.text}"


def is_verbatim(quote: str, sources: list[Source]) -> bool:
    wanted = normalise_quote(quote)
    if not wanted:
        return False
    for source in sources:
        body = normalise_quote(source_text(source))
        # Prowzi's own writer turns a source's inner double quotes into single ones
        if wanted in body or wanted in body.replace('"', "'"):
            return True
    return False


def support(sentence: str, sources: list[Source]) -> float:
    """The share of the sentence's content-word stems that occur in ``sources``."""
    words = _text.stem_set(_draft.CITATION.sub(" ", sentence))
    if not words:
        return 1.0
    found = frozenset().union(*(_text.stem_set(source_text(source)) for source in sources))
    return len(words & found) / len(words)


def _strip_structure(text: str, report: GateReport) -> str:
    """Remove headings, and a reference list the model wrote (each entry counted as a
    dropped citation)."""
    kept: list[str] = []
    in_references = False
    for line in text.splitlines():
        heading = _HEADING_LINE.match(line)
        title = (heading.group(1) if heading else line).strip().strip("*:").strip().lower()
        if heading or (title in _REFERENCE_TITLES and len(line.split()) <= 3):
            in_references = title in _REFERENCE_TITLES
            continue
        if in_references:
            if _REFERENCE_ENTRY.match(line) or line.strip():
                report.citations_dropped += 1
            continue
        kept.append(line)
    return "\n".join(kept)


def _surname_years(sources: Mapping[int, Source]) -> set[tuple[str, int | None]]:
    pairs: set[tuple[str, int | None]] = set()
    for source in sources.values():
        for author in source.authors:
            parts = author.replace(",", " ").split()
            if parts:
                pairs.add((parts[-1].lower(), source.year))
                pairs.add((parts[0].lower(), source.year))
    return pairs


def _fix_markers(sentence: str, allowed: Mapping[int, Source], report: GateReport) -> str:
    def rewrite(match: re.Match[str]) -> str:
        numbers = _draft.cited_numbers(match.group(0))
        kept = [n for n in dict.fromkeys(numbers) if n in allowed]
        report.citations_dropped += len(set(numbers)) - len(kept)
        return f"[{', '.join(str(n) for n in kept)}]" if kept else ""

    known = _surname_years(allowed)

    def author_year(match: re.Match[str]) -> str:
        if (match.group(1).lower(), int(match.group(2))) in known:
            return match.group(0)
        report.citations_dropped += 1
        return ""

    sentence = _draft.CITATION.sub(rewrite, sentence)
    sentence = _AUTHOR_YEAR.sub(author_year, sentence)
    return re.sub(r"\s+([.,;:!?])", r"\1", " ".join(sentence.split()))


def gate_section(text: str, allowed: Mapping[int, Source]) -> tuple[str, GateReport]:
    """The section text with every gate applied (module doc), and what was done."""
    report = GateReport()
    body = _strip_structure(text, report)
    paragraphs: list[str] = []
    for paragraph in re.split(r"\n\s*\n", body):
        kept: list[str] = []
        for sentence in _draft.split_sentences(paragraph):
            sentence = _fix_markers(sentence, allowed, report)
            if not sentence.strip(" .[]"):
                continue
            cited = [allowed[n] for n in dict.fromkeys(_draft.cited_numbers(sentence))]
            quotes = [m.group(1) or m.group(2) for m in _draft.QUOTATION.finditer(sentence)]
            if any(not is_verbatim(q, cited) for q in quotes):
                report.quotes_dropped += 1
                continue
            if cited:
                if support(sentence, cited) < SUPPORT_THRESHOLD:
                    report.unsupported_citations += 1
                    report.unsupported.append(sentence[:200])
                else:
                    report.supported_citations += 1
            report.sentences += 1
            kept.append(sentence)
        if kept:
            paragraphs.append(" ".join(kept))
    return "\n\n".join(paragraphs), report


def renumber(text: str, mapping: Mapping[int, int]) -> str:
    """Citation markers rewritten from local to document numbers (each in ``mapping``)."""

    def rewrite(match: re.Match[str]) -> str:
        numbers = [mapping[n] for n in dict.fromkeys(_draft.cited_numbers(match.group(0)))]
        return f"[{', '.join(str(n) for n in sorted(set(numbers)))}]"

    return _draft.CITATION.sub(rewrite, text)

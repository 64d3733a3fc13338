"""Reading and rendering drafts: sections, citation markers, quotations and references.

Shared by the writing, evaluation and turnitin stages so that all three agree on what a
citation, a quotation and a section are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from prowzi.agents import _text
from prowzi.agents.models import DraftSection, Reference

REFERENCES_HEADING = "References"
_REFERENCE_HEADINGS = frozenset({"references", "bibliography", "works cited", "sources"})


def is_references_heading(title: str) -> bool:
    """``References`` (what Prowzi writes) or a common alternative a custom writer may use."""
    return normalise_heading(title) in _REFERENCE_HEADINGS


CITATION = re.compile(r"\[(\d+(?:\s*[,–-]\s*\d+)*)(?:,\s*((?:pp?\.|§)\s*[^\]\[\n]+))?\]")
"""A citation marker: ``[3]``, ``[1, 4]`` or ``[2-5]``, optionally with a locator: ``[3, p. 12]``
or ``[3, § Basic Logging Tutorial]``. Reference entries start with the same ``[n]`` label, so
callers look for citations outside the References section."""


def citation(number: int, locator: str = "") -> str:
    """``[3]`` or ``[3, p. 12]``; a locator cannot hold brackets or quotes."""
    locator = " ".join(re.sub(r"[\[\]\"“”]", "", locator).split())
    return f"[{number}, {locator}]" if locator else f"[{number}]"


def cited_locators(text: str) -> list[tuple[int, str]]:
    """(reference number, locator or "") of every citation in ``text``, in order."""
    found: list[tuple[int, str]] = []
    for match in CITATION.finditer(text):
        locator = (match.group(2) or "").strip()
        found.extend((n, locator) for n in cited_numbers(match.group(0)))
    return found


QUOTATION = re.compile(r"\"([^\"\n]+)\"|“([^”\n]+)”")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


def cited_numbers(text: str) -> list[int]:
    """Every reference number cited in ``text``, in order, with repeats."""
    numbers: list[int] = []
    for match in CITATION.finditer(text):
        if match.group(2):
            numbers.append(int(match.group(1)))
            continue
        for part in re.split(r"\s*,\s*", match.group(1)):
            bounds = re.split(r"\s*[–-]\s*", part)
            if len(bounds) == 2 and bounds[0].isdigit() and bounds[1].isdigit():
                lo, hi = int(bounds[0]), int(bounds[1])
                numbers.extend(range(lo, hi + 1) if 0 < hi - lo < 100 else (lo, hi))
            elif part.isdigit():
                numbers.append(int(part))
    return numbers


def split_sentences(text: str) -> list[str]:
    """Sentences of draft prose; a quotation is never split, whatever punctuation it holds."""
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        if not paragraph:
            continue
        start = 0
        in_quote = False
        i = 0
        while i < len(paragraph):
            ch = paragraph[i]
            if ch == '"':
                in_quote = not in_quote
            elif ch == "“":
                in_quote = True
            elif ch == "”":
                in_quote = False
            elif (
                ch in ".!?"
                and not in_quote
                and i + 1 < len(paragraph)
                and paragraph[i + 1] == " "
                and i + 2 < len(paragraph)
                and (paragraph[i + 2].isupper() or paragraph[i + 2] in '"“[(')
                and not paragraph[max(0, i - 5) : i + 1].endswith(("et al.", "e.g.", "i.e."))
            ):
                out.append(paragraph[start : i + 1].strip())
                start = i + 2
            i += 1
        tail = paragraph[start:].strip()
        if tail:
            out.append(tail)
    return out


@dataclass(frozen=True, slots=True)
class ParsedSection:
    title: str
    body: str
    start: int
    """Offset of the heading line in the markdown."""


def parse_sections(markdown: str) -> list[ParsedSection]:
    """The ``##`` sections of a markdown document (the ``#`` title is not a section)."""
    headings = [m for m in _HEADING.finditer(markdown) if len(m.group(1)) == 2]
    sections = []
    for i, m in enumerate(headings):
        end = headings[i + 1].start() if i + 1 < len(headings) else len(markdown)
        sections.append(
            ParsedSection(m.group(2).strip(), markdown[m.end() : end].strip(), m.start())
        )
    return sections


def references_start(markdown: str) -> int | None:
    """Offset of the References heading, if the document has one."""
    for section in parse_sections(markdown):
        if is_references_heading(section.title):
            return section.start
    return None


def normalise_heading(title: str) -> str:
    return " ".join(re.findall(r"[^\W_]+", title.lower()))


def quotations(text: str) -> list[tuple[int, int]]:
    """(start, end) of every double-quoted span, quote marks included."""
    return [(m.start(), m.end()) for m in QUOTATION.finditer(text)]


def cited_quotations(text: str) -> list[tuple[int, int]]:
    """Quoted spans whose sentence carries a citation marker: quoted *and* cited."""
    spans = []
    for start, end in quotations(text):
        sentence_start = (
            max(
                text.rfind("\n", 0, start),
                *(text.rfind(p, 0, start) for p in (". ", "? ", "! ")),
            )
            + 1
        )
        tail = re.match(r"[^\n]*?(?:[.!?](?=\s|$)|\n|$)", text[end:])
        sentence_end = end + (tail.end() if tail else 0)
        if CITATION.search(text, sentence_start, start) or CITATION.search(text, end, sentence_end):
            spans.append((start, end))
    return spans


_ORGANISATION_WORDS = _text.word_set(
    """ai panel group institute team committee consortium collaboration organization
    organisation agency association council laboratory lab foundation society project"""
)


def _is_organisation(name: str) -> bool:
    words = name.replace(",", " ").split()
    return len(words) >= 4 or any(w.lower() in _ORGANISATION_WORDS for w in words)


def author_label(authors: list[str], year: int | None) -> str:
    """``Shor (1997)``, ``Cirac and Zoller (1995)``, ``Arute et al. (2019)``."""

    def surname(name: str) -> str:
        if _is_organisation(name):
            return name
        if "," in name:
            return name.split(",", 1)[0].strip()
        return name.split()[-1] if name.split() else name

    if not authors:
        return ""
    if len(authors) == 1:
        who = surname(authors[0])
    elif len(authors) == 2:
        who = f"{surname(authors[0])} and {surname(authors[1])}"
    else:
        who = f"{surname(authors[0])} et al."
    return f"{who} ({year})" if year else who


def format_reference(ref: Reference) -> str:
    """``[n] Authors (year). *Title*. link. Corpus: `path`.``; a work with no year says
    ``(n.d.)`` (no date), and one with no authors starts with its title."""
    parts = [f"[{ref.number}]"]
    year = f"({ref.year})" if ref.year else "(n.d.)"
    if ref.authors:
        parts.append(", ".join(ref.authors) + f" {year}.")
        parts.append(f"*{ref.title.rstrip('.')}*.")
    else:
        parts.append(f"*{ref.title.rstrip('.')}* {year}.")
    if ref.doi:
        parts.append(f"https://doi.org/{ref.doi}.")
    elif ref.url:
        parts.append(f"{ref.url}.")
    if ref.origin == "corpus":
        parts.append(f"Corpus: `{ref.source_id}`.")
    else:
        parts.append(f"Found by {ref.origin}.")
    return " ".join(parts)


def render(
    title: str,
    sections: Iterable[DraftSection],
    references: list[Reference],
    notes: Iterable[str] = (),
) -> str:
    lines = [f"# {title}", ""]
    for note in notes:
        lines += [f"> {note}", ""]
    for section in sections:
        lines += [f"## {section.title}", "", section.text.strip(), ""]
    lines += [f"## {REFERENCES_HEADING}", ""]
    if references:
        for ref in references:
            lines += [format_reference(ref), ""]
    else:
        lines += ["No source in the corpus could be cited.", ""]
    return "\n".join(lines).rstrip() + "\n"


def word_count(sections: Iterable[DraftSection]) -> int:
    return sum(len(re.findall(r"[^\W_]+", s.text)) for s in sections)

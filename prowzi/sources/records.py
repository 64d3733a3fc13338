"""The record every source of documents produces: a :class:`Document` made of :class:`Passage`\\ s.

The local corpus (:mod:`prowzi.sources.ingest`) and the online providers
(``prowzi.sources.providers``) both produce :class:`Document` records; the search stage ranks
their passages and turns the documents it keeps into :class:`~prowzi.agents.models.Source`\\ s.
Only ``source_id`` and ``title`` are required; every other field has a default, so a provider
fills what it knows:

- ``origin``: where the record came from, ``"corpus"`` or a provider's name (``"crossref"``);
- ``metadata_source``: for each metadata field set (``title``, ``authors``, ``year``, ``doi``,
  ``url``), where its value came from (``"pdf-info"``, ``"bibtex"``, ``"file-name"``,
  ``"crossref"``...), so a reader can judge it; nothing is ever invented;
- ``passages``: the text split into passages with their page (PDF) or section (heading); left
  empty, the index splits ``abstract``/``text`` itself;
- ``location``: where to find the document when it has no URL or DOI (a corpus file's path);
- ``arxiv_id``: an arXiv identifier (``2103.01234``), for deduplication across sources.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prowzi.agents.models import Source


MAX_SOURCE_TEXT = 20_000
"""Characters of a document's text a source carries whole; a longer one carries its found
passages (checkpoints hold sources, and a 300-page PDF should not ride along in each)."""


@dataclass(frozen=True, slots=True)
class Passage:
    """A stretch of a document's text, a few sentences to a few paragraphs long."""

    text: str
    page: int | None = None
    """1-based page number (PDF)."""
    section: str | None = None
    """The heading the passage sits under (Markdown, reStructuredText, HTML, DOCX)."""

    def locator(self) -> str:
        """``p. 12`` or ``§ Basic Logging Tutorial`` (no brackets), or ``""``."""
        if self.page is not None:
            return f"p. {self.page}"
        if self.section:
            return f"§ {self.section}"
        return ""


def source_body(abstract: str, text: str) -> str:
    """A document's prose once: its text, preceded by its abstract unless the text holds it."""
    if not abstract or " ".join(abstract.split()) in " ".join(text.split()):
        return text or abstract
    return f"{abstract}\n\n{text}" if text else abstract


@dataclass(frozen=True, slots=True)
class Document:
    """One searchable document: a corpus file (or one record of it), or a provider's result."""

    source_id: str
    title: str
    authors: tuple[str, ...] = ()
    year: int | None = None
    url: str | None = None
    doi: str | None = None
    abstract: str = ""
    text: str = ""
    sample: bool = False
    origin: str = "corpus"
    metadata_source: Mapping[str, str] = field(default_factory=dict)
    passages: tuple[Passage, ...] = ()
    location: str | None = None
    arxiv_id: str | None = None

    @property
    def body(self) -> str:
        return source_body(self.abstract, self.text)

    def to_source(
        self,
        score: float = 0.0,
        queries: Sequence[str] = (),
        passages: Sequence[tuple[Passage, float]] = (),
    ) -> Source:
        from prowzi.agents.models import Source, SourcePassage

        text = self.text
        if len(text) > MAX_SOURCE_TEXT and passages:
            # A long document travels with the passages the queries found, not all its pages.
            text = "\n\n".join(p.text for p, _ in passages)
        found = [
            SourcePassage(text=p.text, page=p.page, section=p.section, score=s) for p, s in passages
        ]
        # Every field the source shares with its document is the document's (validation makes
        # the authors a list and the metadata a dict), except the text and the passages.
        shared = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name in Source.model_fields
        }
        return Source(
            **{**shared, "text": text, "passages": found}, score=score, queries=list(queries)
        )


_YEAR = re.compile(r"\b(1\d{3}|2\d{3})\b")


def year_of(value: Any) -> int | None:
    """The year ``value`` gives (an int, or the first four-digit year in a date string), if
    plausible: for every reader of metadata, a file's or a provider's."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 1000 <= value <= 2999 else None
    if isinstance(value, str):
        m = _YEAR.search(value)
        return int(m.group(1)) if m else None
    return None


# --- identifiers: what makes two records one work ------------------------------------------

_DOI_PREFIX = re.compile(r"^(?:https?://(?:dx\.)?doi\.org/|doi:\s*)", re.IGNORECASE)
_DOI_SHAPE = re.compile(r"^10\.\d{4,9}/\S+$")
_ARXIV_NEW = re.compile(r"(\d{4}\.\d{4,5})(?:v\d+)?$")
_ARXIV_OLD = re.compile(r"([a-z-]+(?:\.[A-Z]{2})?/\d{7})(?:v\d+)?$", re.IGNORECASE)
_ARXIV_DOI = re.compile(r"^10\.48550/arxiv\.(.+)$", re.IGNORECASE)
_WORDS = re.compile(r"[^\W_]+")


def normalise_doi(value: str | None) -> str | None:
    """``https://doi.org/10.1000/ABC`` -> ``10.1000/abc`` (DOIs are case-insensitive); None
    when the value is not a DOI."""
    if not value or not value.strip():
        return None
    doi = without_doi_prefix(value).lower()
    return doi if _DOI_SHAPE.match(doi) else None


def without_doi_prefix(value: str) -> str:
    """A DOI as given, without a resolver (``https://doi.org/``) or ``doi:`` prefix."""
    return _DOI_PREFIX.sub("", value.strip()).strip()


def normalise_arxiv_id(value: str | None) -> str | None:
    """``http://arxiv.org/abs/2101.00001v2``, ``arXiv:2101.00001`` or the arXiv DOI
    ``10.48550/arXiv.2101.00001`` -> ``2101.00001`` (no version); None when not an arXiv id."""
    if not value or not value.strip():
        return None
    text = value.strip()
    doi = _ARXIV_DOI.match(_DOI_PREFIX.sub("", text))
    if doi:
        text = doi.group(1)
    text = re.sub(r"^arxiv:\s*", "", text, flags=re.IGNORECASE)
    text = text.rstrip("/").removesuffix(".pdf")
    for pattern in (_ARXIV_NEW, _ARXIV_OLD):
        m = pattern.search(text)
        if m:
            return m.group(1).lower()
    return None


def normalise_title(title: str | None) -> str:
    """A title reduced to its lower-case letters and digits, accents removed, for matching
    ("Quantum  Error-Correction!" and "quantum error correction" are the same title)."""
    if not title:
        return ""
    plain = title
    if not title.isascii():
        decomposed = unicodedata.normalize("NFKD", title)
        plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(_WORDS.findall(plain.lower()))

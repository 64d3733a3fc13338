"""Does the cited passage support the sentence that cites it?

The measure is lexical, deterministic and cheap, so the offline writer can hold itself to it and
the evaluation can check any writer's draft with it: the share of the sentence's content words
(stemmed; stopwords, citation markers and the words naming the cited source - its authors,
title and year - left out) that occur in the cited passage. A citation with a locator
(``[3, p. 12]``) is checked against the passages at that page or section; one without, against
everything the source carries (abstract, text and matched passages). A sentence citing several
sources is checked against all of them together. A sentence is *supported* when the share
reaches :data:`SUPPORT_THRESHOLD`.

A verbatim quotation with a short attribution ("According to Shor (1994), "..." [3].") scores
close to 1; connective filler ("These sources share a concern with security [3], [5].") scores
low, because its words are the writer's, not the sources'. The measure cannot tell a faithful
paraphrase from a distortion that reuses the source's words; it is a floor, not a proof, like
the word-overlap checks it is modelled on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prowzi.agents import _draft, _text
from prowzi.agents.models import Reference, Source

SUPPORT_THRESHOLD = 0.6
"""Share of a cited sentence's content words its cited passages must contain."""

_LABEL_WORDS = _text.word_set("et al n d nd")


@dataclass(frozen=True, slots=True)
class SentenceSupport:
    sentence: str
    support: float
    supported: bool


def _passage_text(source: Source, locator: str) -> str:
    if locator and source.passages:
        at = [p.text for p in source.passages if p.locator() == locator]
        if at:
            return "\n".join(at)
    return "\n".join([source.abstract, source.text, *(p.text for p in source.passages)])


def sentence_support(
    sentence: str, refs: Mapping[int, Reference], sources: Mapping[str, Source]
) -> float:
    """The share of the sentence's own content words found in the passages it cites (0..1).

    A citation of a number with no reference, or of a reference with no known source, counts
    as citing nothing: the sentence scores 0."""
    cited = _draft.cited_locators(sentence)
    if not cited:
        return 1.0
    naming: set[str] = set(_LABEL_WORDS)
    evidence: list[str] = []
    for number, locator in cited:
        ref = refs.get(number)
        source = sources.get(ref.source_id) if ref is not None else None
        if ref is None or source is None:
            return 0.0
        naming |= _text.stem_set(" ".join([*source.authors, source.title, str(source.year or "")]))
        evidence.append(_passage_text(source, locator))
    words = _text.stem_set(_draft.CITATION.sub(" ", sentence)) - naming
    if not words:
        return 1.0  # names a source and says nothing of its own: nothing to support
    found = _text.stem_set("\n".join(evidence))
    return len(words & found) / len(words)


def cited_sentences(
    texts: Sequence[str], refs: Mapping[int, Reference], sources: Mapping[str, Source]
) -> list[SentenceSupport]:
    """Every sentence of ``texts`` (section bodies) that carries a citation, with its support."""
    out = []
    for text in texts:
        for sentence in _draft.split_sentences(text):
            if _draft.CITATION.search(sentence):
                value = sentence_support(sentence, refs, sources)
                out.append(SentenceSupport(sentence, value, value >= SUPPORT_THRESHOLD))
    return out

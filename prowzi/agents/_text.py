"""Small, deterministic text utilities shared by the default agents.

Nothing here depends on a hash seed, a locale or the order of a set: the same text always gives
the same tokens, keywords and sentences.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator


def word_set(text: str) -> frozenset[str]:
    """The whitespace-separated words of ``text``, for writing word lists compactly."""
    return frozenset(text.split())


_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?", re.UNICODE)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)]*\s+(?=[\"'“‘(]?[A-Z0-9])")
_ABBREVIATIONS = ("e.g.", "i.e.", "et al.", "cf.", "vs.", "etc.", "Fig.", "Eq.", "approx.")

STOPWORDS: frozenset[str] = word_set(
    """
    a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    may might must shall us upon via within without across among toward towards whether per
    """
)
"""Common English function words."""

INSTRUCTION_WORDS: frozenset[str] = word_set(
    """
    write writing written draft compose produce prepare create generate give provide make
    please help need want research paper papers essay essays report reports review reviews
    literature survey surveys article articles thesis dissertation summary summarise summarize
    overview brief short long detailed comprehensive thorough document documents text piece
    explain explaining describe describing discuss discussing analyse analyze analysis study
    studies introduction introductory topic subject page pages word words academic scholarly
    recent current modern latest state art advances developments new novel key main important
    role impact impacts effect effects implication implications perspective perspectives
    """
)
"""Words of the request itself ("write a short essay on..."), not of its subject."""


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters and digits; an inner apostrophe is kept)."""
    return [m.group(0).lower().replace("’", "'") for m in _WORD.finditer(text)]


def word_spans(text: str) -> Iterator[tuple[str, int, int]]:
    """Each word token with its character offsets in ``text``."""
    for m in _WORD.finditer(text):
        yield m.group(0).lower().replace("’", "'"), m.start(), m.end()


def stem(word: str) -> str:
    """A light suffix stemmer: enough to match plurals and common verb forms."""
    w = word.lower()
    if len(w) <= 3:
        return w
    for suffix, repl in (
        ("ational", "ate"),
        ("ization", "ize"),
        ("isation", "ize"),
        ("iveness", "ive"),
        ("fulness", "ful"),
        ("ousness", "ous"),
        ("ies", "y"),
        ("sses", "ss"),
        ("ing", ""),
        ("ed", ""),
        ("es", "e"),
        ("s", ""),
    ):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            if suffix == "s" and w.endswith(("ss", "us", "is")):
                return w
            return w[: len(w) - len(suffix)] + repl
    return w


def content_words(text: str) -> list[str]:
    """Words of ``text`` that carry meaning (no stopwords, no bare numbers of one digit)."""
    return [w for w in words(text) if w not in STOPWORDS and not (w.isdigit() and len(w) < 2)]


def stems(text: str) -> list[str]:
    return [stem(w) for w in content_words(text)]


@functools.lru_cache(maxsize=256)
def stem_set(text: str) -> frozenset[str]:
    """The stems of ``text``'s content words, as a set; cached, since support checks ask for
    the same source's stems once per sentence that cites it."""
    return frozenset(stems(text))


def unique(items: Iterable[str]) -> list[str]:
    """``items`` without repeats, first occurrence kept (deterministic, unlike ``set``)."""
    return list(dict.fromkeys(items))


def sentences(text: str) -> list[str]:
    """Split prose into sentences, keeping common abbreviations intact."""
    protected = text
    for i, abbr in enumerate(_ABBREVIATIONS):
        protected = protected.replace(abbr, f"\x00{i}\x00")
    parts: list[str] = []
    for block in re.split(r"\n\s*\n", protected):
        block = " ".join(block.split())
        if not block:
            continue
        parts.extend(p.strip() for p in _SENTENCE_END.split(block) if p.strip())
    restored = []
    for part in parts:
        for i, abbr in enumerate(_ABBREVIATIONS):
            part = part.replace(f"\x00{i}\x00", abbr)
        restored.append(part)
    return restored


_SMALL_WORDS = word_set("a an and as at but by for in of on or the to via vs with")


def title_case(text: str) -> str:
    """Title case that keeps acronyms (AI, NISQ, CRISPR) and lower-cases small words."""
    out = []
    for i, token in enumerate(text.split()):
        if any(c.isupper() for c in token[1:]) or token.isupper():
            out.append(token)
        elif i > 0 and token.lower() in _SMALL_WORDS:
            out.append(token.lower())
        else:
            out.append(token[:1].upper() + token[1:])
    return " ".join(out)


def normalise_title(title: str) -> str:
    """A title reduced to its words, for duplicate detection."""
    return " ".join(words(title))

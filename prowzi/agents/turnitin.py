"""The turnitin stage: how much of the draft reproduces its sources without saying so.

Document fingerprinting by winnowing (Schleimer, Wilkerson and Aiken, "Winnowing: Local
Algorithms for Document Fingerprinting", SIGMOD 2003). Texts are reduced to lower-case word
tokens; every run of ``K`` consecutive tokens (a k-gram) is hashed; in every window of ``W``
consecutive hashes the minimum is kept (the rightmost on a tie), and the kept hashes with their
positions are the fingerprints. Any passage of at least ``K + W - 1`` tokens shared by the draft
and a source is guaranteed to share a fingerprint, while passages shorter than ``K`` are ignored
as noise.

As real checkers allow, passages the draft puts in quotation marks *and* cites are excluded, and
so is the References section. The similarity ratio is the share of the remaining draft
fingerprints found in any verified source. Each flagged passage is the maximal run of draft
k-grams also present in one source, around a shared fingerprint, with its character offsets.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from prowzi.agents import _draft, _text
from prowzi.agents.base import StageContext
from prowzi.agents.corpus import source_body
from prowzi.agents.models import FlaggedPassage, Source, TurnitinAgentResult
from prowzi.errors import PermanentError

K = 5
"""k-gram length, in word tokens."""
W = 4
"""Winnowing window, in k-grams: shared passages of K + W - 1 = 8 words are always found."""


def _hash(tokens: Sequence[str]) -> int:
    # A keyed-free, seed-free hash: Python's hash() of a str changes between processes.
    digest = hashlib.blake2b(" ".join(tokens).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def kgram_hashes(tokens: Sequence[str], k: int = K) -> list[int]:
    return [_hash(tokens[i : i + k]) for i in range(len(tokens) - k + 1)]


def winnow(hashes: Sequence[int], w: int = W) -> list[tuple[int, int]]:
    """(hash, position) fingerprints: the rightmost minimum of every window of ``w`` hashes."""
    if not hashes:
        return []
    if len(hashes) <= w:
        position = min(range(len(hashes)), key=lambda i: (hashes[i], -i))
        return [(hashes[position], position)]
    selected: list[tuple[int, int]] = []
    last = -1
    for start in range(len(hashes) - w + 1):
        position = min(range(start, start + w), key=lambda i: (hashes[i], -i))
        if position != last:
            selected.append((hashes[position], position))
            last = position
    return selected


@dataclass(frozen=True, slots=True)
class _SourcePrint:
    source_id: str
    fingerprints: frozenset[int]
    kgrams: frozenset[int]


def _source_print(source: Source) -> _SourcePrint:
    tokens = _text.words(f"{source.title}\n\n{source_body(source.abstract, source.text)}")
    hashes = kgram_hashes(tokens)
    return _SourcePrint(
        source.source_id, frozenset(h for h, _ in winnow(hashes)), frozenset(hashes)
    )


def _excluded_ranges(
    markdown: str, titles: frozenset[str] = frozenset()
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(quoted-and-cited spans, other excluded spans such as the References section and a
    source's title in quotation marks: naming a work is not copying it)."""
    quoted = _draft.cited_quotations(markdown)
    other = [
        (start, end)
        for start, end in _draft.quotations(markdown)
        if _text.normalise_title(markdown[start + 1 : end - 1]) in titles
    ]
    refs = _draft.references_start(markdown)
    if refs is not None:
        other.append((refs, len(markdown)))
    return quoted, other


def _inside(offset: int, ranges: list[tuple[int, int]]) -> bool:
    return any(start <= offset < end for start, end in ranges)


def check_similarity(markdown: str, sources: list[Source]) -> TurnitinAgentResult:
    spans = list(_text.word_spans(markdown))
    tokens = [t for t, _, _ in spans]
    titles = frozenset(_text.normalise_title(s.title) for s in sources)
    quoted, other = _excluded_ranges(markdown, titles)
    in_quote = [_inside(s, quoted) for _, s, _ in spans]
    in_other = [_inside(s, other) for _, s, _ in spans]
    hashes = kgram_hashes(tokens)

    def excluded(position: int, flags: list[bool]) -> bool:
        return any(flags[position : position + K])

    prints = [_source_print(s) for s in sources]
    counted: list[tuple[int, int]] = []
    excluded_quoted = 0
    for h, position in winnow(hashes):
        if excluded(position, in_other):
            continue
        if excluded(position, in_quote):
            excluded_quoted += 1
            continue
        counted.append((h, position))
    matched = [(h, p) for h, p in counted if any(h in sp.fingerprints for sp in prints)]
    ratio = len(matched) / len(counted) if counted else 0.0

    def countable(position: int) -> bool:
        return not excluded(position, in_quote) and not excluded(position, in_other)

    flagged: list[FlaggedPassage] = []
    covered_until = -1
    for h, position in matched:
        if position <= covered_until:
            continue
        owners = [sp for sp in prints if h in sp.fingerprints]
        best: tuple[int, int, int, _SourcePrint] | None = None
        for sp in owners:
            lo = position
            while lo > 0 and countable(lo - 1) and hashes[lo - 1] in sp.kgrams:
                lo -= 1
            hi = position
            while hi + 1 < len(hashes) and countable(hi + 1) and hashes[hi + 1] in sp.kgrams:
                hi += 1
            shared = sum(1 for mh, mp in matched if lo <= mp <= hi and mh in sp.fingerprints)
            if best is None or (hi - lo, shared) > (best[1] - best[0], best[2]):
                best = (lo, hi, shared, sp)
        if best is None:
            continue
        lo, hi, shared, sp = best
        start, end = spans[lo][1], spans[hi + K - 1][2]
        flagged.append(
            FlaggedPassage(
                text=markdown[start:end],
                source_id=sp.source_id,
                start=start,
                end=end,
                shared_fingerprints=shared,
            )
        )
        covered_until = hi
    return TurnitinAgentResult(
        similarity_ratio=round(ratio, 6),
        flagged=flagged,
        excluded_quoted_fingerprints=excluded_quoted,
        k=K,
        window=W,
    )


class TurnitinAgent:
    """Reads ``state.draft`` and ``state.verification``; writes a :class:`TurnitinAgentResult`."""

    async def __call__(self, ctx: StageContext) -> TurnitinAgentResult:
        draft, verification = ctx.state.draft, ctx.state.verification
        if draft is None:
            raise PermanentError("turnitin needs the writing stage's result")
        sources = list(verification.verified) if verification is not None else []
        result = await asyncio.to_thread(check_similarity, draft.markdown, sources)
        ctx.annotate("similarity_ratio", result.similarity_ratio)
        ctx.annotate("flagged", len(result.flagged))
        ctx.annotate("excluded_quoted_fingerprints", result.excluded_quoted_fingerprints)
        ctx.annotate("k", result.k)
        ctx.annotate("window", result.window)
        ctx.annotate("sources_compared", len(sources))
        owners = Counter(p.source_id for p in result.flagged)
        for passage in result.flagged:  # where it is and whose, not the text itself
            ctx.event("turnitin.flagged", **passage.model_dump(exclude={"text"}))
        if owners:
            ctx.annotate("flagged_sources", sorted(owners))
        return result

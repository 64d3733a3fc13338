"""Checks the LLM tests share: a document cites only verified sources and quotes verbatim."""

from __future__ import annotations

import re

from prowzi.agents import _draft
from prowzi.agents.models import Source, WritingAgentResult
from prowzi.llm.gates import is_verbatim


def assert_cites_only_verified(draft: WritingAgentResult, verified: list[Source]) -> None:
    """Every citation resolves to a reference, every reference is a verified source, and
    every quotation is verbatim in a source its sentence cites."""
    by_id = {s.source_id: s for s in verified}
    refs = {r.number: r for r in draft.references}
    assert all(r.source_id in by_id for r in refs.values()), "a reference is not verified"
    body, _, listing = draft.markdown.partition("## References")
    listed = {int(n) for n in re.findall(r"^\[(\d+)\] ", listing, flags=re.M)}
    assert listed == set(refs)
    for section in draft.sections:
        for sentence in _draft.split_sentences(section.text):
            cited = [refs[n] for n in _draft.cited_numbers(sentence)]  # KeyError: unresolved
            for match in _draft.QUOTATION.finditer(sentence):
                quote = match.group(1) or match.group(2)
                assert is_verbatim(quote, [by_id[r.source_id] for r in cited]), quote
    assert set(_draft.cited_numbers(body)) <= set(refs)

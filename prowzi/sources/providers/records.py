"""The record every provider's answer is normalised to, and the merge that deduplicates them.

A :class:`ProviderRecord` holds what a citation needs (title, authors, year, DOI, arXiv id,
URL), the abstract as the source text, ``origin`` (the provider that found it, or ``corpus``)
and ``metadata_source`` (where its metadata came from, e.g. ``crossref``). Nothing is invented:
a field the provider did not give stays empty.

:func:`merge_records` is a pure function: records that share a DOI, an arXiv id or a normalised
title are one work; the first one seen (callers put the corpus first, then the providers in the
order they were selected) is kept and completed with what the others know.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from prowzi.sources.records import normalise_arxiv_id, normalise_doi, normalise_title


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """One work found by a provider (or in the corpus), normalised."""

    title: str
    origin: str
    """``corpus`` or the provider's name."""
    metadata_source: str
    """Where the metadata came from: a provider's name, or what the corpus says."""
    authors: tuple[str, ...] = ()
    year: int | None = None
    doi: str | None = None
    arxiv_id: str | None = None
    url: str | None = None
    abstract: str = ""
    """The source text: what the writer may quote and cite."""
    full_text: str = ""
    """Open-access full text, fetched only with ``fetch_full_text``."""
    pdf_url: str | None = None
    source_id: str = ""
    """The corpus's id for a corpus record; for a provider record, set by :func:`record_id`."""
    also_found_by: tuple[str, ...] = field(default=())
    """Other origins that returned the same work (deduplicated into this record)."""

    def keys(self) -> list[tuple[str, str]]:
        """What identifies this work: its DOI, arXiv id and normalised title."""
        keys: list[tuple[str, str]] = []
        doi = normalise_doi(self.doi)
        if doi:
            keys.append(("doi", doi))
        arxiv = normalise_arxiv_id(self.arxiv_id) or (
            normalise_arxiv_id(doi) if doi and doi.startswith("10.48550/") else None
        )
        if arxiv:
            keys.append(("arxiv", arxiv))
        title = normalise_title(self.title)
        if title:
            keys.append(("title", title))
        return keys


def record_id(record: ProviderRecord) -> str:
    """A stable id for a provider record: ``<origin>:doi:<doi>``, ``<origin>:arxiv:<id>`` or
    ``<origin>:<url>`` (the first the record has)."""
    if record.source_id:
        return record.source_id
    doi = normalise_doi(record.doi)
    if doi:
        return f"{record.origin}:doi:{doi}"
    arxiv = normalise_arxiv_id(record.arxiv_id)
    if arxiv:
        return f"{record.origin}:arxiv:{arxiv}"
    if record.url:
        return f"{record.origin}:{record.url}"
    return f"{record.origin}:title:{normalise_title(record.title)}"


def complete(kept: ProviderRecord, other: ProviderRecord) -> ProviderRecord:
    """``kept`` with the fields it lacks taken from ``other`` (never overwriting a value), and
    ``other``'s origin among those that also found it."""
    return replace(
        kept,
        authors=kept.authors or other.authors,
        year=kept.year if kept.year is not None else other.year,
        doi=kept.doi or other.doi,
        arxiv_id=kept.arxiv_id or other.arxiv_id,
        url=kept.url or other.url,
        abstract=kept.abstract or other.abstract,
        full_text=kept.full_text or other.full_text,
        pdf_url=kept.pdf_url or other.pdf_url,
        also_found_by=tuple(
            dict.fromkeys(
                (*kept.also_found_by, other.origin, *other.also_found_by)
                if other.origin != kept.origin
                else (*kept.also_found_by, *other.also_found_by)
            )
        ),
    )


def group_duplicates(records: Sequence[ProviderRecord]) -> list[list[int]]:
    """The positions of ``records`` grouped by work, each group and the groups in first-seen
    order. Two records are the same work when they share a DOI, an arXiv id or a normalised
    title, directly or through a third record of the group."""
    groups: list[list[int]] = []
    index: dict[tuple[str, str], int] = {}
    for position, record in enumerate(records):
        keys = record.keys()
        hit = next((index[k] for k in keys if k in index), None)
        if hit is None:
            hit = len(groups)
            groups.append([position])
        else:
            groups[hit].append(position)
        for key in keys:  # a group answers to every key of every member
            index.setdefault(key, hit)
    return groups


def merge_records(records: Iterable[ProviderRecord]) -> list[ProviderRecord]:
    """The records with duplicates merged (:func:`group_duplicates`), in first-seen order.

    The first record of a work is kept (so the corpus, listed first, wins over a provider)
    and gains the fields it lacks from the later ones; ``also_found_by`` names their origins.
    """
    items = list(records)
    merged: list[ProviderRecord] = []
    for group in group_duplicates(items):
        record = items[group[0]]
        for position in group[1:]:
            record = complete(record, items[position])
        merged.append(record)
    return merged

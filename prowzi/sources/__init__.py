"""Where sources come from: the local corpus's files (:mod:`prowzi.sources.ingest`) and, beside
it, the online providers; both produce :class:`~prowzi.sources.records.Document` records."""

from prowzi.sources.records import Document, Passage

__all__ = ["Document", "Passage"]

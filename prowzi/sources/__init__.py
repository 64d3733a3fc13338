"""Where sources come from: the local corpus's files (:mod:`prowzi.sources.ingest`) and, beside
it, the online providers (:mod:`prowzi.sources.providers`); both produce
:class:`~prowzi.sources.records.Document` records."""

from __future__ import annotations

import importlib.util

from prowzi.errors import ConfigError
from prowzi.sources.records import Document, Passage

__all__ = ["Document", "Passage", "require_providers"]

PROVIDER_MODULES = ("httpx", "hishel", "anysqlite")
"""What the online providers import (the ``providers`` extra)."""


def require_providers() -> None:
    """Raise :class:`ConfigError` when the ``providers`` extra is not installed."""
    missing = [m for m in PROVIDER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"the online providers need {', '.join(missing)}: pip install 'prowzi[providers]'"
        )

"""Where sources come from beyond the local corpus (:mod:`prowzi.sources.providers`)."""

from __future__ import annotations

import importlib.util

from prowzi.errors import ConfigError

PROVIDER_MODULES = ("httpx", "hishel", "anysqlite", "pypdf")
"""What the online providers import (the ``providers`` extra)."""


def require_providers() -> None:
    """Raise :class:`ConfigError` when the ``providers`` extra is not installed."""
    missing = [m for m in PROVIDER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"the online providers need {', '.join(missing)}: pip install 'prowzi[providers]'"
        )

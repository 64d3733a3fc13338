"""Configuration: :class:`ProwziConfig` and :func:`get_config`; pydantic-settings is the one
reader of the ``PROWZI_*`` variables.

Imported lazily: pydantic-settings is loaded only when settings are read, so ``prowzi --help``
does without it. Read-only commands read only the parts they use, :class:`TelemetryLocation`
and :class:`CheckpointLocation`, of which :class:`ProwziConfig` is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prowzi.config.locations import (
        CheckpointLocation,
        TelemetryLocation,
        describe_validation_error,
    )
    from prowzi.config.settings import ProwziConfig, get_config

__all__ = [
    "CheckpointLocation",
    "ProwziConfig",
    "TelemetryLocation",
    "describe_validation_error",
    "get_config",
]


def __getattr__(name: str) -> Any:
    if name in ("ProwziConfig", "get_config"):
        from prowzi.config import settings

        return getattr(settings, name)
    if name in __all__:  # what read-only commands need, without the whole configuration
        from prowzi.config import locations

        return getattr(locations, name)
    raise AttributeError(f"module 'prowzi.config' has no attribute {name!r}")

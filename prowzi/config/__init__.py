"""Configuration: :class:`ProwziConfig` and :func:`get_config`.

Imported lazily: pydantic-settings is loaded only when the configuration is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prowzi.config.settings import ProwziConfig, describe_validation_error, get_config

__all__ = ["ProwziConfig", "describe_validation_error", "get_config"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from prowzi.config import settings

        return getattr(settings, name)
    raise AttributeError(f"module 'prowzi.config' has no attribute {name!r}")

"""Configuration: :class:`ProwziConfig` and :func:`get_config`."""

from prowzi.config.settings import ProwziConfig, describe_validation_error, get_config

__all__ = ["ProwziConfig", "describe_validation_error", "get_config"]

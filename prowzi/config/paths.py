"""The directory and store settings read-only commands need, without the whole configuration.

``prowzi sessions``, ``show``, ``monitor`` and ``replay`` need a directory or two and a store
URL. They read them through the small settings classes :class:`ProwziConfig` is made of
(:class:`~prowzi.config.locations.TelemetryLocation`,
:class:`~prowzi.config.locations.CheckpointLocation`): pydantic-settings is the one reader of
the environment, and a setting those commands do not use cannot stop them. Each function
raises :class:`~prowzi.errors.ConfigError` with the same one line, naming the variable, as
:func:`~prowzi.config.get_config` would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

DirectorySetting = Literal["checkpoint_dir", "telemetry_dir"]


def directory_setting(field: DirectorySetting) -> Path:
    """``PROWZI_<FIELD>`` or the default, checked as :class:`~prowzi.config.ProwziConfig`
    checks it (not empty, not something other than a directory)."""
    from prowzi.config.locations import CheckpointLocation, TelemetryLocation

    if field == "checkpoint_dir":
        return CheckpointLocation.load().checkpoint_dir
    return TelemetryLocation.load().telemetry_dir


def checkpoint_location() -> Path | str:
    """``PROWZI_CHECKPOINT_URL`` when set (a store URL), else the checkpoint directory."""
    from prowzi.config.locations import CheckpointLocation

    return CheckpointLocation.load().checkpoint_location


def broker_url() -> str | None:
    """``PROWZI_BROKER_URL``: the Redis broker workers run runs from, or None."""
    from prowzi.config.locations import BrokerLocation

    return BrokerLocation.load().broker_url


def telemetry_url() -> str | None:
    """``PROWZI_TELEMETRY_URL``: the store that also holds the session files, or None."""
    from prowzi.config.locations import TelemetryLocation

    return TelemetryLocation.load().telemetry_url

"""The directory settings, resolved without building the whole configuration.

Read-only commands (``prowzi sessions``, ``show``, ``monitor``, ``replay``) need one directory
and start on every keystroke, so they resolve it here instead of importing pydantic-settings
(about 100 ms of start-up). The defaults and the variable names are the ones
:class:`~prowzi.config.ProwziConfig` uses; a test holds the two readers to the same answers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from prowzi.errors import ConfigError

ENV_PREFIX = "PROWZI_"
DEFAULT_CHECKPOINT_DIR = Path("./prowzi_checkpoints")
DEFAULT_TELEMETRY_DIR = Path("./prowzi_telemetry")

DirectorySetting = Literal["checkpoint_dir", "telemetry_dir"]
_DEFAULTS: dict[str, Path] = {
    "checkpoint_dir": DEFAULT_CHECKPOINT_DIR,
    "telemetry_dir": DEFAULT_TELEMETRY_DIR,
}


def not_a_directory(path: Path) -> str | None:
    """Why ``path`` cannot be a directory setting (it exists and is something else), or None.

    Checked when the setting is read, so a command names the setting instead of failing on
    some file inside it later."""
    try:
        if path.exists() and not path.is_dir():
            return f"{path} exists and is not a directory"
    except OSError:
        pass  # cannot tell (no permission, a name too long): the command that uses it says
    return None


def directory_setting(field: DirectorySetting) -> Path:
    """``PROWZI_<FIELD>`` (matched case-insensitively, as the full config does) or the default.

    Raises :class:`ConfigError` naming the variable when it is set but empty, or names
    something that is not a directory.
    """
    variable = f"{ENV_PREFIX}{field.upper()}"
    value = os.environ.get(variable)
    if value is None:
        wanted = variable.lower()
        value = next((v for k, v in os.environ.items() if k.lower() == wanted), None)
    if value is not None and not value.strip():
        raise ConfigError(f"invalid setting {field} ({variable}={value!r}): must not be empty")
    path = _DEFAULTS[field] if value is None else Path(value)
    problem = not_a_directory(path)
    if problem:
        shown = "" if value is None else f"={value!r}"
        raise ConfigError(f"invalid setting {field} ({variable}{shown}): {problem}")
    return path


def checkpoint_location() -> Path | str:
    """``PROWZI_CHECKPOINT_URL`` when set (a store URL), else the checkpoint directory."""
    url = os.environ.get(f"{ENV_PREFIX}CHECKPOINT_URL")
    if url is None:
        wanted = f"{ENV_PREFIX}checkpoint_url".lower()
        url = next((v for k, v in os.environ.items() if k.lower() == wanted), None)
    if url is not None and url.strip():
        return url
    return directory_setting("checkpoint_dir")

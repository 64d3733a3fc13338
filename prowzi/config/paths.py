"""The directory and store settings, resolved without building the whole configuration.

Read-only commands (``prowzi sessions``, ``show``, ``monitor``, ``replay``) need a directory or
two and a store URL and start on every keystroke, so they resolve them here instead of
importing pydantic-settings (about 100 ms of start-up). The defaults, the variable names and
the checks are the ones :class:`~prowzi.config.ProwziConfig` uses; a test holds the two readers
to the same answers.
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
    value = _variable(field)
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
    url = _variable("checkpoint_url")
    if url is not None and url.strip():
        return url
    return directory_setting("checkpoint_dir")


def telemetry_url() -> str | None:
    """``PROWZI_TELEMETRY_URL``: the store that also holds the session files, or None.

    Checked as :class:`~prowzi.config.ProwziConfig` checks it (:func:`check_store_url`), with
    the same one-line :class:`ConfigError` naming the variable."""
    value = _variable("telemetry_url")
    if value is None:
        return None
    try:
        if not value.strip():
            raise ValueError("must not be empty")
        return check_store_url(value.strip())
    except ValueError as exc:
        raise ConfigError(
            f"invalid setting telemetry_url ({ENV_PREFIX}TELEMETRY_URL={value!r}): {exc}"
        ) from None


STORE_SCHEMES = ("file", "s3", "az", "azure", "memory")


def check_store_url(value: str) -> str:
    """A store location: a path, or ``scheme://container[/prefix]`` of a known scheme (else
    ``ValueError`` saying why). :func:`prowzi.storage.remote.open_store` opens it."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        return value  # a path
    if scheme not in STORE_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}: use s3://, az://, file:// or a path")
    if scheme in ("s3", "az", "azure") and not rest.split("/", 1)[0]:
        raise ValueError(f"no bucket or container in {value!r}")
    return value


def _variable(field: str) -> str | None:
    """``PROWZI_<FIELD>``, matched case-insensitively as the full config matches it."""
    value = os.environ.get(f"{ENV_PREFIX}{field.upper()}")
    if value is None:
        wanted = f"{ENV_PREFIX}{field}".lower()
        value = next((v for k, v in os.environ.items() if k.lower() == wanted), None)
    return value

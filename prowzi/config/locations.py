"""The settings every command shares, and the two small ones read-only commands read alone.

:class:`TelemetryLocation` and :class:`CheckpointLocation` are what ``prowzi sessions``,
``show``, ``monitor`` and ``replay`` need; :class:`~prowzi.config.ProwziConfig`
(:mod:`prowzi.config.settings`) is made of them and the rest. Kept apart so that those commands
do not build the whole configuration's classes at start-up. Also here: what every settings
class shares (the prefix, strictness, one-line errors naming the variable) and the readers of
values more than one setting uses (directories, store URLs, ages).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from prowzi.errors import ConfigError

ENV_PREFIX = "PROWZI_"
DEFAULT_CHECKPOINT_DIR = Path("./prowzi_checkpoints")
DEFAULT_TELEMETRY_DIR = Path("./prowzi_telemetry")
STORE_SCHEMES = ("file", "s3", "az", "azure", "memory")
SECRET_FIELDS = frozenset({"checkpoint_key", "webhook_secret", "webhooks", "broker_url"})
"""Settings whose values an error message never shows."""


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


_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    """``"90s"``, ``"15m"``, ``"2h"``, ``"7d"``, ``"1w"`` -> a timedelta (else ``ValueError``
    saying why): the one reader of ages, for ``--older-than``, ``--since`` and
    ``PROWZI_RETENTION``."""
    match = _AGE.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"invalid age {text!r}: use a number and a unit, e.g. 30m, 12h, 7d")
    value, unit = match.groups()
    try:
        age = timedelta(**{_UNITS[unit]: float(value)})
        datetime.now(UTC) - age
    except OverflowError:
        raise ValueError(f"invalid age {text!r}: too large") from None
    return age


def _an_age(value: Any) -> Any:
    if isinstance(value, str):
        return parse_age(value) if value.strip() else None
    return value


def _no_empty_path(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    return value


def _a_directory(value: Path) -> Path:
    problem = not_a_directory(value)
    if problem:
        raise ValueError(problem)
    return value


def _a_broker_url(value: str) -> str:
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("use a Redis URL: redis://host:6379/0, rediss://... or unix://...")
    return value


BrokerUrl = Annotated[str, AfterValidator(_a_broker_url)]


def _a_store_url(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return check_store_url(value.strip())


DirectorySetting = Annotated[Path, BeforeValidator(_no_empty_path), AfterValidator(_a_directory)]
"""A directory: not empty, and not something other than a directory."""

Age = Annotated[timedelta | None, BeforeValidator(_an_age)]
"""An age such as ``30m``, ``12h`` or ``7d`` (:func:`parse_age`); empty means none."""

StoreUrl = Annotated[str, AfterValidator(_a_store_url)]
"""A store location (:func:`check_store_url`), not empty."""


class _Settings(BaseSettings):
    """What every settings class shares: the prefix, strictness, one-line errors."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        validate_assignment=True,
        validate_default=True,
        extra="forbid",
        case_sensitive=False,
    )

    def __setattr__(self, name: str, value: Any) -> None:
        """Assignments are validated; a bad value is a :class:`ConfigError` naming it."""
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Read the settings from the environment (and ``overrides``); a bad value raises
        :class:`ConfigError` with one line naming its variable."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None


class TelemetryLocation(_Settings):
    """Where sessions are recorded: all that reading them needs."""

    telemetry_dir: DirectorySetting = Field(
        DEFAULT_TELEMETRY_DIR, description="Telemetry directory.", validate_default=True
    )
    telemetry_url: StoreUrl | None = Field(
        None,
        description="A store that also holds each session's JSON file (sessions/<id>.json), "
        "so `prowzi sessions` and `show` work from any machine that reaches it: "
        "s3://bucket/prefix, az://container/prefix, file:///path or a path. Event logs stay "
        "in telemetry_dir.",
    )


class CheckpointLocation(_Settings):
    """Where checkpoints are kept: all that finding them (and their leases) needs."""

    checkpoint_dir: DirectorySetting = Field(
        DEFAULT_CHECKPOINT_DIR, description="Checkpoint store.", validate_default=True
    )
    checkpoint_url: StoreUrl | None = Field(
        None,
        description="Where checkpoints live when not in checkpoint_dir: s3://bucket/prefix, "
        "az://container/prefix, file:///path or a path. Credentials and endpoints come from "
        "each cloud's standard variables (AWS_*, AZURE_STORAGE_*).",
    )

    @property
    def checkpoint_location(self) -> Path | str:
        """The checkpoint store: ``checkpoint_url`` when set, else ``checkpoint_dir``."""
        return self.checkpoint_url or self.checkpoint_dir


class BrokerLocation(_Settings):
    """Where runs are queued for workers: what following a run on another machine needs."""

    broker_url: BrokerUrl | None = Field(
        None,
        description="The Redis broker (redis://host:6379/0): `prowzi serve` and `prowzi run "
        "--submit` enqueue runs there for `prowzi worker` processes, which publish the runs' "
        "events there too.",
    )


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad setting and its environment variable."""
    parts = []
    for err in exc.errors():
        if not err["loc"]:  # a check across settings: its message names them
            parts.append(err["msg"].removeprefix("Value error, "))
            continue
        loc = ".".join(str(p) for p in err["loc"])
        var = f"{ENV_PREFIX}{loc.upper()}"
        value = err.get("input")
        shown = f"={value!r}" if isinstance(value, str | int | float | bool) else ""
        if loc.split(".")[0] in SECRET_FIELDS:
            shown = ""  # never print a secret
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc} ({var}{shown}): {message}")
    return "invalid setting " + "; ".join(parts)

"""Prowzi's settings, resolved in one place.

Precedence: constructor argument > ``PROWZI_<FIELD>`` environment variable > default. Nothing
reads the environment at import time: :func:`get_config` builds a fresh config when called.
Assignments after construction are validated, so ``config.max_retries = -1`` raises.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prowzi.config.paths import (
    DEFAULT_CHECKPOINT_DIR,
    DEFAULT_TELEMETRY_DIR,
    ENV_PREFIX,
    check_store_url,
    not_a_directory,
)
from prowzi.errors import ConfigError


class ProwziConfig(BaseSettings):
    """Every setting Prowzi reads. Each field ``x`` is also set by ``PROWZI_X``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        validate_assignment=True,
        validate_default=True,
        extra="forbid",
        case_sensitive=False,
    )

    # Checkpoints
    enable_checkpointing: bool = Field(False, description="Save a checkpoint after stages.")
    checkpoint_dir: Path = Field(
        DEFAULT_CHECKPOINT_DIR, description="Checkpoint store.", validate_default=True
    )
    checkpoint_interval: int = Field(1, ge=1, description="Checkpoint every N stages.")
    checkpoint_key: SecretStr | None = Field(
        None, description="HMAC key; when set, unsigned or wrongly signed checkpoints are refused."
    )
    checkpoint_url: str | None = Field(
        None,
        description="Where checkpoints live when not in checkpoint_dir: s3://bucket/prefix, "
        "az://container/prefix, file:///path or a path. Credentials and endpoints come from "
        "each cloud's standard variables (AWS_*, AZURE_STORAGE_*).",
    )
    checkpoint_compression: Literal["none", "zlib", "zstd"] = Field(
        "zstd", description="Compression of checkpoint payloads."
    )
    checkpoint_compression_level: int | None = Field(
        None, ge=-7, le=22, description="Compression level (zstd: 3, zlib: 1 when unset)."
    )
    checkpoint_full_every: int = Field(
        4,
        ge=1,
        le=1000,
        description="Every Nth checkpoint of a run is a full snapshot (the others store what "
        "changed); a load reads at most N checkpoints.",
    )
    checkpoint_fsync: bool = Field(True, description="fsync checkpoint files and directory.")
    lease_ttl_seconds: float = Field(
        30.0,
        gt=0,
        le=86400,
        description="A session's lease runs out this long after its writer stops renewing it "
        "(a writer on this machine that died is recognised at once).",
    )

    # Telemetry
    enable_telemetry: bool = Field(True, description="Write per-session telemetry files.")
    telemetry_dir: Path = Field(
        DEFAULT_TELEMETRY_DIR, description="Telemetry directory.", validate_default=True
    )
    telemetry_url: str | None = Field(
        None,
        description="A store that also holds each session's JSON file (sessions/<id>.json), "
        "so `prowzi sessions` and `show` work from any machine that reaches it: "
        "s3://bucket/prefix, az://container/prefix, file:///path or a path. Event logs stay "
        "in telemetry_dir.",
    )

    # Stage loop
    max_retries: int = Field(3, ge=0, le=100, description="Retries after a stage's first try.")
    retry_backoff_base: float = Field(
        0.5, ge=0, description="Backoff of the first retry, in seconds (doubles per retry)."
    )
    retry_backoff_max: float = Field(30.0, ge=0, description="Cap on one backoff, in seconds.")
    stage_timeout_seconds: float = Field(300.0, gt=0, description="Limit on one stage attempt.")

    # Agents
    corpus_dir: Path | None = Field(
        None, description="Directory of .md/.txt/.json/.jsonl documents; the sample if unset."
    )
    agents: str | None = Field(
        None,
        description="Per-stage agent overrides: 'stage=module:factory,...'; the factory is "
        "called with the config and returns the agent.",
    )
    index_dir: Path | None = Field(
        None, description="Where the search index is kept; a cache directory if unset."
    )
    relevance_threshold: float = Field(
        0.15, ge=0, le=1, description="Minimum relative relevance a verified source needs."
    )
    evaluation_threshold: float = Field(
        0.75, ge=0, le=1, description="Evaluation score below which one revision pass runs."
    )

    # Output and observability
    output_dir: Path = Field(Path("."), description="Where `prowzi run` writes documents.")
    pushgateway_url: str | None = Field(None, description="Push metrics here after a batch run.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"

    def __setattr__(self, name: str, value: Any) -> None:
        """Assignments are validated; a bad value is a :class:`ConfigError` naming it."""
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None

    @field_validator("checkpoint_dir", "telemetry_dir", "output_dir", mode="before")
    @classmethod
    def _no_empty_path(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("checkpoint_url", "telemetry_url")
    @classmethod
    def _a_store_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("must not be empty")
        return check_store_url(value.strip())

    @field_validator("checkpoint_dir", "telemetry_dir", "output_dir")
    @classmethod
    def _a_directory(cls, value: Path) -> Path:
        problem = not_a_directory(value)
        if problem:
            raise ValueError(problem)
        return value


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad setting and its environment variable."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        var = f"{ENV_PREFIX}{loc.upper()}"
        value = err.get("input")
        shown = f"={value!r}" if isinstance(value, str | int | float | bool) else ""
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc} ({var}{shown}): {message}")
    return "invalid setting " + "; ".join(parts)


def get_config(**overrides: Any) -> ProwziConfig:
    """Build the configuration from the environment (and explicit overrides).

    Raises :class:`ConfigError` with a one-line message naming the bad variable.
    """
    try:
        return ProwziConfig(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None

"""Prowzi's settings, read from the environment by pydantic-settings and nothing else.

Precedence: constructor argument > ``PROWZI_<FIELD>`` environment variable > default. Nothing
reads the environment at import time: :func:`get_config` builds a fresh config when called.
Assignments after construction are validated, so ``config.max_retries = -1`` raises.

:class:`ProwziConfig` is made of two small settings classes that read-only commands
(``prowzi sessions``, ``show``, ``monitor``, ``replay``) build alone, each validating only its
own fields: :class:`TelemetryLocation` and :class:`CheckpointLocation`. A bad setting those
commands do not use (``PROWZI_MAX_RETRIES=many``) does not stop them, and the checkpoint
location, which they use only to tell whether a session is still running, cannot stop them
from reading telemetry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode

from prowzi.config.locations import (
    Age,
    BrokerLocation,
    CheckpointLocation,
    DirectorySetting,
    StoreUrl,
    TelemetryLocation,
    _Settings,
)
from prowzi.config.webhooks import (
    RetrySchedule,
    WebhookEvents,
    WebhookList,
    WebhookSecret,
    WebhookUrl,
    check_webhook_settings,
)

# --- online search providers (issue 16, scope item 4) ---------------------------------------

PROVIDER_NAMES = ("crossref", "arxiv", "openalex", "semanticscholar", "pubmed")
"""The online scholarly search providers Prowzi can query, in their default order."""


def provider_list(value: Any) -> Any:
    """``"crossref, arxiv"`` (a variable, ``--providers``) or a list -> known names, once."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        return value
    names = [str(item).strip().lower() for item in items if str(item).strip()]
    unknown = [n for n in names if n not in PROVIDER_NAMES]
    if unknown:
        raise ValueError(
            f"unknown provider(s) {', '.join(unknown)}: use {', '.join(PROVIDER_NAMES)}"
        )
    return list(dict.fromkeys(names))


def _provider_intervals(value: Any) -> Any:
    """``"arxiv=3,crossref=0.1"`` or a mapping -> {provider: seconds between requests}."""
    if value is None:
        return {}
    if isinstance(value, str):
        pairs: dict[str, Any] = {}
        for item in value.split(","):
            if not item.strip():
                continue
            name, sep, seconds = item.partition("=")
            if not sep:
                raise ValueError(f"{item.strip()!r} is not 'provider=seconds'")
            pairs[name.strip().lower()] = seconds.strip()
        value = pairs
    if isinstance(value, dict):
        unknown = [n for n in value if n not in PROVIDER_NAMES]
        if unknown:
            raise ValueError(
                f"unknown provider(s) {', '.join(unknown)}: use {', '.join(PROVIDER_NAMES)}"
            )
    return value


def _service_url(value: str) -> str:
    """An ``http://`` or ``https://`` URL with a host, without a trailing slash."""
    value = value.strip()
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest.split("/", 1)[0]:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value.rstrip("/")


ServiceUrl = Annotated[str, AfterValidator(_service_url)]
"""A web service's base URL (:func:`_service_url`)."""


class ProviderSettings(_Settings):
    """Online scholarly search providers: off unless ``providers`` names some."""

    providers: Annotated[list[str], NoDecode, BeforeValidator(provider_list)] = Field(
        default_factory=list,
        description="Online providers the search stage queries beside the corpus, e.g. "
        "'crossref,arxiv' (crossref, arxiv, openalex, semanticscholar, pubmed); none if unset.",
    )
    contact_email: str | None = Field(
        None,
        description="Sent to the providers that ask for a contact (Crossref's polite pool "
        "'mailto', PubMed's 'email', OpenAlex's 'mailto').",
    )
    crossref_url: ServiceUrl = Field("https://api.crossref.org", description="Crossref REST API.")
    arxiv_url: ServiceUrl = Field("https://export.arxiv.org/api", description="arXiv API.")
    openalex_url: ServiceUrl = Field("https://api.openalex.org", description="OpenAlex API.")
    openalex_api_key: SecretStr | None = Field(None, description="OpenAlex API key.")
    semanticscholar_url: ServiceUrl = Field(
        "https://api.semanticscholar.org/graph/v1", description="Semantic Scholar Graph API."
    )
    semanticscholar_api_key: SecretStr | None = Field(
        None, description="Semantic Scholar API key (optional; raises the rate limit)."
    )
    pubmed_url: ServiceUrl = Field(
        "https://eutils.ncbi.nlm.nih.gov/entrez/eutils", description="PubMed E-utilities."
    )
    pubmed_api_key: SecretStr | None = Field(
        None, description="NCBI API key (optional; 10 instead of 3 requests per second)."
    )
    provider_intervals: Annotated[
        dict[str, Annotated[float, Field(ge=0, le=3600)]],
        NoDecode,
        BeforeValidator(_provider_intervals),
    ] = Field(
        default_factory=dict,
        description="Seconds between two requests to a provider, overriding its published "
        "rule: 'arxiv=3,crossref=0.1'.",
    )
    provider_timeout_seconds: float = Field(
        30.0, gt=0, le=600, description="Limit on one provider request."
    )
    provider_max_retries: int = Field(
        3, ge=0, le=10, description="Retries of a request answered 429/503 (or failing)."
    )
    provider_max_retry_after_seconds: float = Field(
        120.0,
        ge=0,
        le=3600,
        description="A Retry-After longer than this is not waited for: the provider fails.",
    )
    provider_cache_dir: Path | None = Field(
        None, description="On-disk HTTP cache of provider answers; a cache directory if unset."
    )
    provider_cache_ttl_seconds: float = Field(
        7 * 86400.0,
        ge=0,
        description="How long a provider answer is reused without asking again (0: no cache).",
    )
    fetch_full_text: bool = Field(
        False, description="Fetch open-access full text (arXiv PDFs) of provider results."
    )


class ProwziConfig(ProviderSettings, BrokerLocation, CheckpointLocation, TelemetryLocation):
    """Every setting Prowzi reads. Each field ``x`` is also set by ``PROWZI_X``.

    ``checkpoint_dir``, ``checkpoint_url``, ``telemetry_dir`` and ``telemetry_url`` come from
    :class:`CheckpointLocation` and :class:`TelemetryLocation`."""

    # Checkpoints
    enable_checkpointing: bool = Field(False, description="Save a checkpoint after stages.")
    checkpoint_interval: int = Field(1, ge=1, description="Checkpoint every N stages.")
    checkpoint_key: SecretStr | None = Field(
        None, description="HMAC key; when set, unsigned or wrongly signed checkpoints are refused."
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

    # Retention
    retention: Age = Field(
        None,
        description="`prowzi serve` deletes what a finished session left (its checkpoints, "
        "telemetry and service document) once it is this old, e.g. 30d; unset keeps all. "
        "`prowzi cleanup --older-than` does the same on demand.",
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

    # Language model (the LLM agents run when llm_model is set; see prowzi/llm)
    llm_base_url: str = Field(
        "http://127.0.0.1:11434/v1",
        description="Base URL of an OpenAI Chat Completions server (OpenAI, Azure OpenAI, "
        "Ollama, vLLM, llama.cpp's server, LM Studio, LiteLLM).",
    )
    llm_api_key: SecretStr | None = Field(
        None, description="API key sent as a bearer token; never logged, printed or stored."
    )
    llm_model: str | None = Field(
        None, description="Model for the LLM agents; unset: the offline agents run."
    )
    llm_stage_models: str | None = Field(
        None, description="Per-stage model overrides: 'writing=gpt-4o,evaluation=gpt-4o-mini'."
    )
    llm_response_format: Literal["json_schema", "json_object"] = Field(
        "json_schema",
        description="How typed answers are asked for: 'json_schema' (the OpenAI form: OpenAI, "
        "vLLM, Ollama, LM Studio, LiteLLM) or 'json_object' with a 'schema' beside it "
        "(llama-cpp-python's server, which constrains the answer to the schema that way).",
    )
    llm_temperature: float = Field(0.2, ge=0, le=2, description="Sampling temperature.")
    llm_max_output_tokens: int = Field(
        1024, ge=1, le=1_000_000, description="Limit on one answer's tokens."
    )
    llm_context_tokens: int = Field(
        8192, ge=512, le=10_000_000, description="The model's context window, for fitting sources."
    )
    llm_timeout_seconds: float = Field(60.0, gt=0, le=3600, description="Limit on one request.")
    llm_concurrency: int = Field(4, ge=1, le=256, description="Requests in flight per run.")
    llm_max_call_retries: int = Field(
        4, ge=0, le=20, description="Retries of one request on 429, 5xx, timeouts, disconnects."
    )
    llm_prices: str | None = Field(
        None,
        description="USD per million input/output tokens per model: 'gpt-4o-mini=0.15/0.60,...'.",
    )
    llm_cache: bool = Field(True, description="Cache answers beside the checkpoints.")
    llm_cache_max_bytes: int = Field(
        256 * 1024 * 1024, ge=0, description="Cache size limit; least recently used go first."
    )
    llm_max_cost_usd: float | None = Field(None, ge=0, description="Budget in USD per run.")
    llm_max_tokens: int | None = Field(None, ge=0, description="Budget in tokens per run.")

    @field_validator("llm_base_url")
    @classmethod
    def _check_llm_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL with a host")
        return value

    @field_validator("llm_model")
    @classmethod
    def _check_llm_model(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value.strip() if value is not None else None

    @field_validator("llm_stage_models")
    @classmethod
    def _check_stage_models(cls, value: str | None) -> str | None:
        parse_stage_models(value)
        return value

    @field_validator("llm_prices")
    @classmethod
    def _check_prices(cls, value: str | None) -> str | None:
        parse_prices(value)
        return value

    # Output and observability
    output_dir: DirectorySetting = Field(
        Path("."), description="Where `prowzi run` writes documents."
    )
    pushgateway_url: str | None = Field(None, description="Push metrics here after a batch run.")

    # Workers (Celery on Redis; see prowzi/workers)
    run_time_limit_seconds: float = Field(
        3600.0,
        gt=0,
        le=7 * 86400,
        description="Longest a run may take on a worker; then it is checkpointed and stopped.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"

    # Webhooks (checked by prowzi.config.webhooks; delivered by prowzi.webhooks)
    webhook_url: WebhookUrl | None = Field(
        None, description="One webhook endpoint (http:// or https://); needs webhook_secret."
    )
    webhook_secret: WebhookSecret | None = Field(
        None, description="Its Standard Webhooks secret: 'whsec_' and base64 of 24-64 bytes."
    )
    webhook_events: WebhookEvents | None = Field(
        None, description="Comma-separated event types it receives (default: all)."
    )
    webhooks: WebhookList | None = Field(
        None,
        description="Several endpoints: a JSON list of {url, secret, events}; events a list "
        "of event types (default: all).",
    )
    webhook_allow_private: bool = Field(
        False,
        description="Allow endpoints on loopback, link-local, private or metadata addresses "
        "(checked after DNS resolution).",
    )
    webhook_retry_schedule: RetrySchedule = Field(
        "5s,5m,30m,2h,5h,10h,10h",
        description="Delays before each retry of a delivery (s, m, h or d), jittered; after "
        "the last, the delivery has failed (the default spans about 28 h).",
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="Connect and read timeout of one delivery attempt."
    )
    webhook_drain_seconds: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="How long `prowzi run` waits at its end for pending deliveries; the rest "
        "stay in the outbox for the next Prowzi process or the service.",
    )
    webhook_outbox: StoreUrl | None = Field(
        None,
        description="Where the webhook outbox and delivery log are kept (a path or store URL); "
        "default: prowzi_webhooks beside checkpoint_dir, or <checkpoint_url>/webhooks.",
    )
    webhook_link_base: str | None = Field(
        None,
        description="The service's public URL, prefixed to the links in payloads "
        "(default: relative links such as /runs/<id>).",
    )

    @model_validator(mode="after")
    def _webhooks_consistent(self) -> Self:
        check_webhook_settings(self)
        return self

    @property
    def webhooks_configured(self) -> bool:
        """Whether the settings name a webhook endpoint (PROWZI_WEBHOOK_URL or
        PROWZI_WEBHOOKS); the service's API may add more."""
        return bool(self.webhook_url or self.webhooks)

    @property
    def webhook_outbox_location(self) -> Path | str:
        """The outbox store: ``webhook_outbox``, else beside the checkpoints."""
        if self.webhook_outbox:
            return self.webhook_outbox
        if self.checkpoint_url:
            return self.checkpoint_url.rstrip("/") + "/webhooks"
        return self.checkpoint_dir.absolute().parent / "prowzi_webhooks"


LLM_STAGES = ("intent", "planning", "writing", "evaluation")
"""The stages that have an LLM agent."""


def parse_stage_models(value: str | None) -> dict[str, str]:
    """``"writing=m1,evaluation=m2"`` -> ``{"writing": "m1", ...}`` (``ValueError`` saying why)."""
    out: dict[str, str] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        stage, sep, model = (p.strip() for p in item.partition("="))
        if not sep or not model:
            raise ValueError(f"{item.strip()!r} is not 'stage=model'")
        if stage not in LLM_STAGES:
            raise ValueError(f"{stage!r} has no LLM agent; stages are {', '.join(LLM_STAGES)}")
        out[stage] = model
    return out


def parse_prices(value: str | None) -> dict[str, tuple[float, float]]:
    """``"m=0.15/0.60,..."`` (USD per million input/output tokens) -> ``{"m": (0.15, 0.6)}``."""
    out: dict[str, tuple[float, float]] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        model, sep, price = (p.strip() for p in item.rpartition("="))
        prices = price.split("/")
        try:
            pair = (float(prices[0]), float(prices[1])) if len(prices) == 2 else None
        except ValueError:
            pair = None
        if not sep or not model or pair is None or min(pair) < 0 or max(pair) > 1e6:
            raise ValueError(
                f"{item.strip()!r} is not 'model=input/output' (USD per million tokens)"
            )
        out[model] = pair
    return out


def get_config(**overrides: Any) -> ProwziConfig:
    """Build the configuration from the environment (and explicit overrides).

    Raises :class:`ConfigError` with a one-line message naming the bad variable.
    """
    return ProwziConfig.load(**overrides)

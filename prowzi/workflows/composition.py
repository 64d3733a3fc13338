"""The composition root: the one place that decides which agents, sinks, metrics, stores and
tracer a :class:`~prowzi.workflows.orchestrator.ProwziOrchestrator` built from a config gets,
for the CLI and the service alike (readers of telemetry get their liveness probe from
:meth:`~prowzi.workflows.telemetry.TelemetryCollector.reader`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, cast

from prowzi.agents.base import Agent
from prowzi.errors import ConfigError, InvalidInputError, describe_exception
from prowzi.events import EventSink
from prowzi.tracing import RunTracer
from prowzi.workflows.stages import StageSpec

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from prowzi.config import ProwziConfig
    from prowzi.observability.metrics import ProwziMetrics
    from prowzi.workflows.checkpoint import CheckpointManager


def parse_agent_setting(value: str | None) -> dict[str, str]:
    """``"search=pkg.mod:factory,writing=..."`` -> ``{"search": "pkg.mod:factory", ...}``."""
    result: dict[str, str] = {}
    if not value:
        return result
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        stage, sep, target = item.partition("=")
        if not sep or ":" not in target:
            raise ConfigError(
                f"invalid setting agents (PROWZI_AGENTS): {item!r} is not 'stage=module:factory'"
            )
        result[stage.strip()] = target.strip()
    return result


def _load_factory(target: str) -> Callable[[ProwziConfig], Agent]:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except Exception as exc:  # any failure while importing user code is a setting error
        raise ConfigError(
            f"invalid setting agents (PROWZI_AGENTS): cannot load {target!r}: "
            f"{describe_exception(exc)}"
        ) from None
    if not callable(factory):
        raise ConfigError(f"invalid setting agents (PROWZI_AGENTS): {target!r} is not callable")
    return cast("Callable[[ProwziConfig], Agent]", factory)


def resolve_agents(
    config: ProwziConfig, stages: Sequence[StageSpec], overrides: Mapping[str, Agent]
) -> dict[str, Agent]:
    """Agents per stage: explicit overrides, then ``config.agents``, then the defaults."""
    names = {s.name for s in stages}
    configured = parse_agent_setting(config.agents)
    for source, keys in (("agents", overrides.keys()), ("PROWZI_AGENTS", configured.keys())):
        unknown = sorted(set(keys) - names)
        if unknown:
            raise InvalidInputError(
                f"{source} names unknown stage(s) {', '.join(unknown)}; "
                f"stages are {', '.join(s.name for s in stages)}"
            )
    agents: dict[str, Agent] = {}
    defaults: dict[str, Agent] | None = None
    if config.llm_model and not names.issubset({*overrides, *configured}):
        # A model is configured: its agents replace the offline defaults where they exist.
        from prowzi.llm.agents import llm_agents

        defaults = {**_offline_defaults(config), **llm_agents(config)}
    for spec in stages:
        if spec.name in overrides:
            agents[spec.name] = overrides[spec.name]
        elif spec.name in configured:
            target = configured[spec.name]
            try:
                agent = _load_factory(target)(config)
            except ConfigError:
                raise
            except Exception as exc:
                raise ConfigError(
                    f"invalid setting agents (PROWZI_AGENTS): {target!r}(config) failed: "
                    f"{describe_exception(exc)}"
                ) from None
            if not callable(agent):
                raise ConfigError(
                    f"invalid setting agents (PROWZI_AGENTS): {target!r} returned "
                    f"{type(agent).__name__}, not an agent"
                )
            agents[spec.name] = agent
        else:
            if defaults is None:
                defaults = _offline_defaults(config)
            if spec.name not in defaults:
                raise InvalidInputError(f"no agent for stage '{spec.name}'")
            agents[spec.name] = defaults[spec.name]
    return agents


def _offline_defaults(config: ProwziConfig) -> dict[str, Agent]:
    from prowzi.agents import default_agents

    return default_agents(config)


def build_sinks(config: ProwziConfig) -> list[EventSink]:
    """The sinks every run of this config feeds: the JSON telemetry and its event log, and
    with a broker (``PROWZI_BROKER_URL``) the run's Redis event stream; the webhook outbox
    (for the settings' endpoints, or for the subscriptions made through the service's API
    that a run finds at its start)."""
    sinks: list[EventSink] = []
    if config.enable_telemetry:
        from prowzi.workflows.telemetry import TelemetryCollector

        sinks.append(
            TelemetryCollector(output_dir=config.telemetry_dir, store=config.telemetry_url)
        )
    if config.broker_url:
        # With a broker, runs are followed from other machines through Redis streams.
        from prowzi.workers.streams import RedisEventStream

        sinks.append(RedisEventStream(config.broker_url))
    if config.webhooks_configured:
        sinks.append(build_webhook_sink(config))
    else:
        from prowzi.webhooks.sink import StoredSubscriptionsSink

        sinks.append(StoredSubscriptionsSink(config))
    return sinks


def build_webhook_sink(config: ProwziConfig) -> EventSink:
    """A sink writing this config's webhook deliveries to its outbox (whose worker, one per
    process and outbox, is started here: it also delivers what earlier processes left)."""
    from prowzi.webhooks import webhooks_for
    from prowzi.webhooks.sink import WebhookSink

    return WebhookSink(webhooks_for(config))


def build_tracer() -> RunTracer:
    """The tracer the standard ``OTEL_*`` variables ask for (a no-op when they ask for none)."""
    from prowzi.observability.otel import build_tracer as build

    return build()


def shutdown_tracer(tracer: RunTracer) -> None:
    """Flush and stop a tracer from :func:`build_tracer` (a no-op tracer has nothing to do)."""
    from prowzi.observability.otel import shutdown_tracer as shutdown

    shutdown(tracer)


def build_metrics(
    registry: CollectorRegistry | None = None, config: ProwziConfig | None = None
) -> ProwziMetrics:
    """The Prometheus metrics sink, in ``registry`` (a fresh one by default, never the
    process-global registry); ``config`` names the models that get their own label value. It
    also counts the online providers' requests."""
    from prowzi.observability.metrics import ProwziMetrics
    from prowzi.sources.observe import add_request_observer

    metrics = ProwziMetrics(registry, models=llm_models(config) if config is not None else ())
    add_request_observer(metrics)
    return metrics


def llm_models(config: ProwziConfig) -> list[str]:
    """The configured models (the bounded set of model label values)."""
    from prowzi.config.settings import parse_prices, parse_stage_models

    models = {*parse_stage_models(config.llm_stage_models).values()}
    models |= set(parse_prices(config.llm_prices))
    if config.llm_model:
        models.add(config.llm_model)
    return sorted(models)


def build_checkpoint_manager(config: ProwziConfig) -> CheckpointManager:
    from prowzi.workflows.checkpoint import CheckpointManager

    return CheckpointManager.from_config(config)

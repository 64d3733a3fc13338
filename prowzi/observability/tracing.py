"""OpenTelemetry tracing for runs: one root span per run, one child span per stage attempt.

Span names and attributes follow the OpenTelemetry GenAI semantic conventions where they fit:

- the run: ``invoke_workflow prowzi.research`` (``gen_ai.operation.name=invoke_workflow``,
  ``gen_ai.conversation.id`` = the session id);
- each stage attempt: ``invoke_agent prowzi.<stage>`` (``gen_ai.operation.name=invoke_agent``,
  ``gen_ai.agent.name``), a child of the run span;
- :func:`tool_span` gives agent code ``execute_tool <name>`` children of the current stage.

Every span also carries ``prowzi.session_id``, ``prowzi.status`` (``completed``, ``failed`` or
``cancelled``) and, for stages, ``prowzi.stage`` and ``prowzi.attempt``. Failures set the span
status to ERROR and ``error.type`` to the closed set ``timeout|transient|permanent``; a
cancellation (user request, shutdown) is not an error. Retries are events on the run span; a
resumed run's root span links to the original run's root span. Prompts are not recorded, only
their length.

Configuration comes from the standard ``OTEL_*`` variables (see :func:`build_tracer`). When
tracing is off, :func:`build_tracer` returns :class:`~prowzi.workflows.tracing.NullTracer`
without importing the OpenTelemetry SDK.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from prowzi.agents.base import AttributeValue
from prowzi.errors import ConfigError
from prowzi.workflows.tracing import NullTracer, RunSpan, RunTracer, StageSpan

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("prowzi.tracing")

INSTRUMENTATION_NAME = "prowzi"
WORKFLOW_NAME = "prowzi.research"

# The standard variables this module reads (names from the OpenTelemetry specification).
OTEL_SDK_DISABLED = "OTEL_SDK_DISABLED"
"""``true`` switches tracing off."""
OTEL_TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
"""Comma-separated ``none``, ``console``, ``otlp``. Unset: ``otlp`` if an OTLP endpoint is
set, else tracing is off (an offline tool should not retry a collector nobody started)."""
OTEL_EXPORTER_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
OTEL_EXPORTER_OTLP_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
OTEL_EXPORTER_OTLP_TRACES_PROTOCOL = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
"""Only ``http/protobuf`` is supported; anything else is a :class:`ConfigError`."""
OTEL_TRACES_SAMPLER = "OTEL_TRACES_SAMPLER"
OTEL_TRACES_SAMPLER_ARG = "OTEL_TRACES_SAMPLER_ARG"
OTEL_EXPORTER_OTLP_HEADERS = "OTEL_EXPORTER_OTLP_HEADERS"
OTEL_EXPORTER_OTLP_TRACES_HEADERS = "OTEL_EXPORTER_OTLP_TRACES_HEADERS"
OTEL_SERVICE_NAME = "OTEL_SERVICE_NAME"
"""Wins over ``service.name`` in OTEL_RESOURCE_ATTRIBUTES; the default is ``prowzi``."""
OTEL_RESOURCE_ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"

_EXPORTERS = ("none", "console", "otlp")
_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


def _hex_ids(span: Span) -> tuple[str | None, str | None]:
    ctx = span.get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        # An unsampled span is never exported: an id pointing at it would lead nowhere.
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


class OtelStageSpan:
    """One stage attempt's span (``invoke_agent prowzi.<stage>``)."""

    __slots__ = ("_span", "_status", "span_id", "trace_id")

    def __init__(self, span: Span) -> None:
        self._span = span
        self._status: str | None = None
        self.trace_id, self.span_id = _hex_ids(span)

    def set_attribute(self, key: str, value: AttributeValue | list[str]) -> None:
        self._span.set_attribute(key, value)

    def add_event(self, name: str, attributes: dict[str, AttributeValue]) -> None:
        self._span.add_event(name, attributes)

    def record_failure(self, exc: BaseException, error_type: str) -> None:
        self._status = _mark_failed(self._span, exc, error_type)


class OtelRunSpan:
    """The root span of one run (``invoke_workflow prowzi.research``)."""

    __slots__ = ("_session_id", "_span", "_status", "_tracer", "span_id", "trace_id")

    def __init__(self, tracer: Tracer, span: Span, session_id: str) -> None:
        self._tracer = tracer
        self._span = span
        self._session_id = session_id
        self._status: str | None = None
        self.trace_id, self.span_id = _hex_ids(span)

    @contextmanager
    def stage(self, stage: str, attempt: int) -> Iterator[StageSpan]:
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": f"prowzi.{stage}",
            "gen_ai.conversation.id": self._session_id,
            "prowzi.session_id": self._session_id,
            "prowzi.stage": stage,
            "prowzi.attempt": attempt,
        }
        # Exceptions are recorded by record_failure (with the closed-set error.type), so the
        # SDK's own recording is switched off to avoid a second, unclassified status.
        with (
            self._tracer.start_as_current_span(
                f"invoke_agent prowzi.{stage}",
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span,
            _closing(span, OtelStageSpan(span)) as wrapper,
        ):
            yield wrapper

    def add_event(self, name: str, attributes: dict[str, AttributeValue]) -> None:
        self._span.add_event(name, attributes)

    def record_failure(self, exc: BaseException, error_type: str) -> None:
        self._status = _mark_failed(self._span, exc, error_type)


def _mark_failed(span: Span, exc: BaseException, error_type: str) -> str:
    """Record a failure on ``span``; returns the ``prowzi.status`` it set."""
    from opentelemetry.trace import Status, StatusCode

    if error_type == "cancelled" or isinstance(exc, asyncio.CancelledError):
        # A cancelled run (user request, SIGTERM) is stopped, not broken: no error status.
        span.set_attribute("prowzi.status", "cancelled")
        return "cancelled"
    span.record_exception(exc)
    span.set_attribute("error.type", error_type)
    span.set_attribute("prowzi.status", "failed")
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:512]))
    return "failed"


_Wrapper = TypeVar("_Wrapper", "OtelStageSpan", "OtelRunSpan")


@contextmanager
def _closing(span: Span, wrapper: _Wrapper) -> Iterator[_Wrapper]:
    """Run a block in ``wrapper``'s span and give the span its final ``prowzi.status``."""
    try:
        yield wrapper
    except BaseException as exc:
        _close_on_exception(span, exc, wrapper._status is not None)
        raise
    else:
        span.set_attribute("prowzi.status", wrapper._status or "completed")


def _close_on_exception(span: Span, exc: BaseException, failure_recorded: bool) -> None:
    """Status for a span whose block raised: cancelled is not an error; the rest are."""
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        span.set_attribute("prowzi.status", "cancelled")
    elif not failure_recorded:
        from prowzi.errors import error_type

        _mark_failed(span, exc, error_type(exc))


def _link(trace_id: str | None, span_id: str | None) -> list[Any]:
    if not trace_id or not span_id:
        return []
    from opentelemetry.trace import Link, SpanContext, TraceFlags

    try:
        context = SpanContext(
            trace_id=int(trace_id, 16),
            span_id=int(span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
    except ValueError:
        log.warning("ignoring malformed link to trace %r span %r", trace_id, span_id)
        return []
    if not context.is_valid:
        log.warning("ignoring invalid link to trace %r span %r", trace_id, span_id)
        return []
    return [Link(context, {"prowzi.link.type": "resumed_from"})]


class OtelTracer:
    """A :class:`~prowzi.workflows.tracing.RunTracer` on an OpenTelemetry ``TracerProvider``."""

    def __init__(self, provider: TracerProvider) -> None:
        from prowzi import __version__

        self.provider = provider
        self._tracer = provider.get_tracer(INSTRUMENTATION_NAME, __version__)

    @contextmanager
    def run(
        self,
        session_id: str,
        *,
        prompt: str,
        attributes: dict[str, AttributeValue],
        link_trace_id: str | None = None,
        link_span_id: str | None = None,
    ) -> Iterator[RunSpan]:
        from opentelemetry.trace import SpanKind

        span_attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "invoke_workflow",
            "gen_ai.workflow.name": WORKFLOW_NAME,
            "gen_ai.conversation.id": session_id,
            "prowzi.session_id": session_id,
            # The prompt's size, not its text: prompts may be private, traces are shipped.
            "prowzi.prompt.length": len(prompt),
            "prowzi.resumed": link_trace_id is not None,
        }
        span_attributes.update(attributes)
        with (
            self._tracer.start_as_current_span(
                f"invoke_workflow {WORKFLOW_NAME}",
                kind=SpanKind.INTERNAL,
                attributes=span_attributes,
                links=_link(link_trace_id, link_span_id),
                record_exception=False,
                set_status_on_exception=False,
            ) as span,
            _closing(span, OtelRunSpan(self._tracer, span, session_id)) as wrapper,
        ):
            yield wrapper

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self.provider.shutdown()


@contextmanager
def tool_span(name: str, attributes: Mapping[str, AttributeValue] | None = None) -> Iterator[Any]:
    """An ``execute_tool <name>`` span, child of the current stage span, for agent code.

    Uses the global OpenTelemetry API, which is a cheap no-op when no SDK is installed.
    """
    from opentelemetry import trace

    attrs: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": name,
    }
    if attributes:
        attrs.update(attributes)
    with trace.get_tracer(INSTRUMENTATION_NAME).start_as_current_span(
        f"execute_tool {name}", attributes=attrs
    ) as span:
        yield span


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in ("", "false", "0", "no"):
        return False
    if value in ("true", "1", "yes"):
        return True
    raise ConfigError(f"invalid {name}={env[name]!r}: use true or false")


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    raw = env.get(OTEL_TRACES_EXPORTER)
    if raw is None or not raw.strip():
        has_endpoint = any(
            env.get(v, "").strip()
            for v in (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT)
        )
        return ["otlp"] if has_endpoint else []
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in _EXPORTERS]
    if unknown:
        raise ConfigError(
            f"invalid {OTEL_TRACES_EXPORTER}={raw!r}: {', '.join(unknown)} not supported; "
            f"use {', '.join(_EXPORTERS)}"
        )
    return [n for n in names if n != "none"]


def _sampler(env: Mapping[str, str]) -> Sampler:
    from opentelemetry.sdk.trace import sampling

    name = env.get(OTEL_TRACES_SAMPLER, "").strip().lower() or "parentbased_always_on"
    if name not in _SAMPLERS:
        raise ConfigError(
            f"invalid {OTEL_TRACES_SAMPLER}={name!r}: use one of {', '.join(_SAMPLERS)}"
        )
    if name.endswith("traceidratio"):
        raw = env.get(OTEL_TRACES_SAMPLER_ARG, "").strip() or "1.0"
        try:
            rate = float(raw)
        except ValueError:
            rate = -1.0
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"invalid {OTEL_TRACES_SAMPLER_ARG}={raw!r}: a ratio between 0 and 1")
        ratio = sampling.TraceIdRatioBased(rate)
        return sampling.ParentBased(ratio) if name.startswith("parentbased") else ratio
    return {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "parentbased_always_on": sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
    }[name]


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    for var in (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, OTEL_EXPORTER_OTLP_PROTOCOL):
        protocol = env.get(var, "").strip()
        if protocol:
            if protocol != "http/protobuf":
                raise ConfigError(f"invalid {var}={protocol!r}: only http/protobuf is supported")
            break
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    endpoint = env.get(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "").strip() or None
    if endpoint is None:
        base = env.get(OTEL_EXPORTER_OTLP_ENDPOINT, "").strip()
        if base:
            endpoint = base.rstrip("/") + "/v1/traces"
    headers = _parse_pairs(
        env.get(OTEL_EXPORTER_OTLP_TRACES_HEADERS, "") or env.get(OTEL_EXPORTER_OTLP_HEADERS, "")
    )
    # Timeout, compression and TLS variables are read by the exporter itself.
    return OTLPSpanExporter(endpoint=endpoint, headers=headers or None)


def _parse_pairs(value: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` with percent-encoding, as OTEL_RESOURCE_ATTRIBUTES and headers use."""
    from urllib.parse import unquote

    pairs: dict[str, str] = {}
    for item in value.split(","):
        key, sep, val = item.partition("=")
        if sep and key.strip():
            pairs[unquote(key.strip())] = unquote(val.strip())
    return pairs


def build_tracer(
    env: Mapping[str, str] | None = None,
    *,
    exporters: list[SpanExporter] | None = None,
    install_global: bool = True,
) -> RunTracer:
    """The tracer the standard ``OTEL_*`` variables ask for.

    Returns :class:`NullTracer` (without importing the SDK) when ``OTEL_SDK_DISABLED`` is true
    or no exporter is configured. ``exporters`` replaces the configured ones (tests pass an
    in-memory exporter). ``install_global`` makes the provider the process's global one, so
    spans opened by agent code through the OpenTelemetry API are exported as children of
    stage spans; it is skipped when a global provider already exists. A bad value raises
    :class:`ConfigError` naming the variable.
    """
    env = os.environ if env is None else env
    if _flag(env, OTEL_SDK_DISABLED):
        return NullTracer()
    names = _exporter_names(env) if exporters is None else []
    if exporters is None and not names:
        return NullTracer()

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    sampler = _sampler(env)
    provider = TracerProvider(resource=_resource(env), sampler=sampler)
    if exporters is not None:
        for exporter in exporters:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        for name in names:
            if name == "console":
                provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
            else:
                provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(env)))
    if install_global:
        _install_global(provider)
    return OtelTracer(provider)


def _resource(env: Mapping[str, str]) -> Resource:
    """``service.name=prowzi``, overridden by OTEL_RESOURCE_ATTRIBUTES, then OTEL_SERVICE_NAME."""
    from opentelemetry.sdk.resources import Resource

    from prowzi import __version__

    attributes: dict[str, AttributeValue] = {
        "service.name": "prowzi",
        "service.version": __version__,
    }
    attributes.update(_parse_pairs(env.get(OTEL_RESOURCE_ATTRIBUTES, "")))
    service_name = env.get(OTEL_SERVICE_NAME, "").strip()
    if service_name:
        attributes["service.name"] = service_name
    # Resource.create adds the telemetry.sdk.* attributes; ours win over its detectors.
    return Resource.create(attributes)


def _install_global(provider: TracerProvider) -> None:
    from opentelemetry import trace

    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)


def shutdown_tracer(tracer: RunTracer) -> None:
    """Flush and stop a tracer from :func:`build_tracer`; a no-op for :class:`NullTracer`."""
    if isinstance(tracer, OtelTracer):
        try:
            tracer.shutdown()
        except Exception:  # telemetry never breaks the caller
            log.exception("tracer shutdown failed")


__all__ = [
    "OtelTracer",
    "build_tracer",
    "shutdown_tracer",
    "tool_span",
]

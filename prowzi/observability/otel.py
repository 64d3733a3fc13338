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

Configuration comes from the standard ``OTEL_*`` variables, read by the OpenTelemetry SDK itself;
:func:`build_tracer` checks them first and picks the exporters. When tracing is off, it returns
:class:`~prowzi.tracing.NullTracer` without importing the OpenTelemetry SDK.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from prowzi.agents.base import AttributeValue
from prowzi.errors import ConfigError
from prowzi.tracing import NullTracer, RunSpan, RunTracer, StageSpan

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("prowzi.tracing")

INSTRUMENTATION_NAME = "prowzi"
WORKFLOW_NAME = "prowzi.research"

# The OTEL_* variables Prowzi checks before the SDK reads them (names from the specification).
OTEL_SDK_DISABLED = "OTEL_SDK_DISABLED"
OTEL_TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
OTEL_TRACES_SAMPLER = "OTEL_TRACES_SAMPLER"
OTEL_TRACES_SAMPLER_ARG = "OTEL_TRACES_SAMPLER_ARG"
OTEL_RESOURCE_ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"
_OTLP = "OTEL_EXPORTER_OTLP_"
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT = _OTLP + "TRACES_ENDPOINT"
OTEL_EXPORTER_OTLP_ENDPOINT = _OTLP + "ENDPOINT"

_EXPORTERS = ("none", "console", "otlp")
_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
_COMPRESSIONS = ("none", "gzip", "deflate")


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
    """A :class:`~prowzi.tracing.RunTracer` on an OpenTelemetry ``TracerProvider``."""

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
def submit_span(tracer: RunTracer, session_id: str) -> Iterator[dict[str, str]]:
    """A ``send prowzi.research`` span (kind PRODUCER) around enqueuing a run; yields the
    W3C trace context (``traceparent``) the queued message carries, so the worker's spans
    join this trace. Without an OpenTelemetry tracer the carrier holds whatever context is
    current (none: an empty carrier) and no SDK is imported."""
    if not isinstance(tracer, OtelTracer):
        yield _carrier()
        return
    from opentelemetry.trace import SpanKind

    with tracer._tracer.start_as_current_span(
        f"send {WORKFLOW_NAME}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.operation.type": "send",
            "messaging.system": "redis",
            "prowzi.session_id": session_id,
        },
    ):
        yield _carrier()


def _carrier() -> dict[str, str]:
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


@contextmanager
def continue_trace(
    tracer: RunTracer,
    carrier: Mapping[str, str] | None,
    *,
    session_id: str,
    queued_at: float | None,
) -> Iterator[None]:
    """Inside the block, spans are children of the context ``carrier`` names (the submitter's
    ``send`` span), so a run's root span continues the trace that submitted it. A
    ``process prowzi.research`` span (kind CONSUMER) from ``queued_at`` to now records the
    queue wait. Call it in the task that runs the run: the context is the task's."""
    if not isinstance(tracer, OtelTracer) or not carrier:
        yield
        return
    from opentelemetry import context
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    token = context.attach(extract(dict(carrier)))
    try:
        if queued_at is not None:
            waited = tracer._tracer.start_span(
                f"process {WORKFLOW_NAME}",
                kind=SpanKind.CONSUMER,
                start_time=int(queued_at * 1e9),
                attributes={
                    "messaging.operation.type": "process",
                    "messaging.system": "redis",
                    "prowzi.session_id": session_id,
                    "prowzi.queue.wait_seconds": max(0.0, time.time() - queued_at),
                },
            )
            waited.end()
        yield
    finally:
        context.detach(token)


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


# --- configuration ------------------------------------------------------------------------
#
# The SDK reads the OTEL_* variables itself: TracerProvider the sampler (OTEL_TRACES_SAMPLER and
# _ARG) and span limits, Resource.create OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES,
# BatchSpanProcessor OTEL_BSP_*, OTLPSpanExporter the endpoint, headers, timeout, compression
# and certificates. Prowzi adds only three things:
# - strict validation: where the SDK would log a warning and fall back to a default (an
#   unknown sampler samples everything, a bad timeout becomes 10 s), a bad value is a
#   ConfigError naming its variable, before any SDK object is made;
# - the choice of exporters (OTEL_TRACES_EXPORTER is read by the SDK's auto-instrumentation
#   only) and the offline default: with no exporter and no OTLP endpoint, tracing is off and
#   the SDK is not imported (an offline tool should not retry a collector nobody started);
# - ``service.name=prowzi`` and ``service.version`` when the variables do not name them.


def _invalid(name: str, value: str, expected: str) -> ConfigError:
    return ConfigError(f"invalid {name}={value!r}: {expected}")


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in ("", "false", "0", "no"):
        return False
    if value in ("true", "1", "yes"):
        return True
    raise _invalid(name, env[name], "use true or false")


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    """The exporters OTEL_TRACES_EXPORTER asks for; unset: ``otlp`` if an endpoint is set."""
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
        raise _invalid(
            OTEL_TRACES_EXPORTER,
            raw,
            f"{', '.join(unknown)} not supported; use {', '.join(_EXPORTERS)}",
        )
    return [n for n in names if n != "none"]


def _check_provider_settings(env: Mapping[str, str]) -> None:
    """The variables TracerProvider and Resource.create read."""
    sampler = env.get(OTEL_TRACES_SAMPLER, "")
    # The SDK lower-cases the name but does not strip it; blank is its default.
    if sampler and sampler.lower() not in _SAMPLERS:
        raise _invalid(OTEL_TRACES_SAMPLER, sampler, f"use one of {', '.join(_SAMPLERS)}")
    arg = env.get(OTEL_TRACES_SAMPLER_ARG, "")
    # Unset, the SDK uses the specification's default ratio, 1.0.
    ratio = sampler.lower().endswith("traceidratio") and arg.strip()
    if ratio and not 0.0 <= _number(arg) <= 1.0:
        raise _invalid(OTEL_TRACES_SAMPLER_ARG, arg, "a ratio between 0 and 1")
    _check_pairs(env, OTEL_RESOURCE_ATTRIBUTES)


def _check_otlp_settings(env: Mapping[str, str]) -> None:
    """The variables OTLPSpanExporter reads, and the protocol it speaks."""
    from urllib.parse import urlsplit

    for signal in ("TRACES_", ""):
        protocol = env.get(f"{_OTLP}{signal}PROTOCOL", "").strip()
        if protocol and protocol != "http/protobuf":
            raise _invalid(f"{_OTLP}{signal}PROTOCOL", protocol, "only http/protobuf is supported")
        name = f"{_OTLP}{signal}ENDPOINT"
        endpoint = env.get(name, "")
        if endpoint:
            url = urlsplit(endpoint)
            if (
                url.scheme not in ("http", "https")
                or not url.hostname
                or endpoint != endpoint.strip()
            ):
                raise _invalid(name, endpoint, "an http:// or https:// URL")
        name = f"{_OTLP}{signal}TIMEOUT"
        timeout = env.get(name, "")
        if timeout and not 0.0 < _number(timeout) < float("inf"):
            raise _invalid(name, timeout, "a positive number of seconds")
        name = f"{_OTLP}{signal}COMPRESSION"
        compression = env.get(name, "")
        if compression and compression.strip().lower() not in _COMPRESSIONS:
            raise _invalid(name, compression, f"use one of {', '.join(_COMPRESSIONS)}")
        _check_pairs(env, f"{_OTLP}{signal}HEADERS")


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("nan")  # fails every range check


def _check_pairs(env: Mapping[str, str], name: str) -> None:
    """``k1=v1,k2=v2``: the SDK skips, with a warning, any item that is not a pair."""
    value = env.get(name, "")
    for item in value.split(","):
        key, sep, _ = item.partition("=")
        if item.strip() and not (sep and key.strip()):
            raise _invalid(name, value, f"{item.strip()!r} is not key=value")


def build_tracer(
    *,
    exporters: list[SpanExporter] | None = None,
    install_global: bool = True,
) -> RunTracer:
    """The tracer the process's ``OTEL_*`` variables ask for.

    Returns :class:`NullTracer` (without importing the SDK) when ``OTEL_SDK_DISABLED`` is true
    or no exporter is configured. ``exporters`` replaces the configured ones (tests pass an
    in-memory exporter). ``install_global`` makes the provider the process's global one, so
    spans opened by agent code through the OpenTelemetry API are exported as children of
    stage spans; it is skipped when a global provider already exists. A bad value raises
    :class:`ConfigError` naming the variable.
    """
    env = os.environ  # what the SDK reads, so what is checked
    if _flag(env, OTEL_SDK_DISABLED):
        return NullTracer()
    names = _exporter_names(env) if exporters is None else []
    if exporters is None and not names:
        return NullTracer()
    _check_provider_settings(env)
    if "otlp" in names:
        _check_otlp_settings(env)

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    provider = TracerProvider(resource=_resource())  # the sampler comes from the variables
    if exporters is not None:
        for exporter in exporters:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
    for name in names:
        if name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if install_global:
        _install_global(provider)
    return OtelTracer(provider)


def _resource() -> Resource:
    """The SDK's resource from the variables, with Prowzi's service name and version as defaults."""
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource

    from prowzi import __version__

    # Resource.create adds telemetry.sdk.* and the variables' attributes, and names an unnamed
    # service "unknown_service" (the specification's default), which Prowzi names instead.
    resource = Resource({SERVICE_VERSION: __version__}).merge(Resource.create())
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "prowzi"}))
    return resource


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
    "continue_trace",
    "shutdown_tracer",
    "submit_span",
    "tool_span",
]

"""Span structure, attributes, events, status and links, checked with the SDK's in-memory
exporter. The stage loop is driven here the way the orchestrator drives it."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from prowzi.errors import ConfigError, StageTimeoutError, TransientError, error_type
from prowzi.observability.otel import OtelTracer, build_tracer, tool_span
from prowzi.tracing import NullTracer

SESSION = "20261126-143501-9f3a1c2b"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    yield InMemorySpanExporter()


def make_tracer(exporter: InMemorySpanExporter) -> OtelTracer:
    tracer = build_tracer(exporters=[exporter], install_global=False)
    assert isinstance(tracer, OtelTracer)
    return tracer


def set_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """The variables the SDK reads are the process's: tests set them there."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def run_two_stages_with_a_retry(tracer: OtelTracer) -> tuple[str | None, str | None]:
    with tracer.run(SESSION, prompt="quantum computing", attributes={"prowzi.stages": 7}) as run:
        with run.stage("intent", 1) as span:
            span.set_attribute("prowzi.intent.field", "physics")
            span.add_event("prowzi.intent.classified", {"document_type": "research_paper"})
        with run.stage("search", 1) as span:
            exc = TransientError("rate limited")
            span.record_failure(exc, error_type(exc))
        run.add_event(
            "prowzi.stage.retry",
            {
                "prowzi.stage": "search",
                "prowzi.attempt": 1,
                "delay_seconds": 0.5,
                "error.type": "transient",
            },
        )
        with run.stage("search", 2) as span:
            span.set_attribute("prowzi.search.queries", ["qubits", "error correction"])
        return run.trace_id, run.span_id


def test_run_span_is_the_root_and_each_stage_attempt_a_child(
    exporter: InMemorySpanExporter,
) -> None:
    trace_id, span_id = run_two_stages_with_a_retry(make_tracer(exporter))
    spans = exporter.get_finished_spans()
    (root,) = by_name(spans, "invoke_workflow prowzi.research")
    assert root.parent is None
    assert format(root.context.trace_id, "032x") == trace_id
    assert format(root.context.span_id, "016x") == span_id
    stages = [s for s in spans if s is not root]
    assert [s.name for s in stages] == [
        "invoke_agent prowzi.intent",
        "invoke_agent prowzi.search",
        "invoke_agent prowzi.search",
    ]
    for stage in stages:
        assert stage.parent is not None
        assert stage.parent.span_id == root.context.span_id
        assert stage.context.trace_id == root.context.trace_id


def test_spans_carry_genai_and_prowzi_attributes(exporter: InMemorySpanExporter) -> None:
    run_two_stages_with_a_retry(make_tracer(exporter))
    spans = exporter.get_finished_spans()
    (root,) = by_name(spans, "invoke_workflow prowzi.research")
    assert root.attributes is not None
    assert root.attributes["gen_ai.operation.name"] == "invoke_workflow"
    assert root.attributes["gen_ai.conversation.id"] == SESSION
    assert root.attributes["prowzi.session_id"] == SESSION
    assert root.attributes["prowzi.status"] == "completed"
    assert root.attributes["prowzi.stages"] == 7
    assert root.attributes["prowzi.prompt.length"] == len("quantum computing")
    assert "quantum computing" not in str(dict(root.attributes))
    intent, _, search2 = [s for s in spans if s is not root]
    assert intent.attributes is not None
    assert intent.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert intent.attributes["gen_ai.agent.name"] == "prowzi.intent"
    assert intent.attributes["prowzi.session_id"] == SESSION
    assert intent.attributes["prowzi.stage"] == "intent"
    assert intent.attributes["prowzi.attempt"] == 1
    assert intent.attributes["prowzi.status"] == "completed"
    assert intent.attributes["prowzi.intent.field"] == "physics"
    assert [e.name for e in intent.events] == ["prowzi.intent.classified"]
    assert search2.attributes is not None
    assert search2.attributes["prowzi.attempt"] == 2
    assert tuple(search2.attributes["prowzi.search.queries"]) == ("qubits", "error correction")  # type: ignore[arg-type]


def test_failed_attempt_has_error_status_and_error_type(exporter: InMemorySpanExporter) -> None:
    run_two_stages_with_a_retry(make_tracer(exporter))
    search1 = by_name(exporter.get_finished_spans(), "invoke_agent prowzi.search")[0]
    assert search1.status.status_code is StatusCode.ERROR
    assert search1.status.description is not None
    assert "TransientError: rate limited" in search1.status.description
    assert search1.attributes is not None
    assert search1.attributes["error.type"] == "transient"
    assert search1.attributes["prowzi.status"] == "failed"
    assert [e.name for e in search1.events] == ["exception"]


def test_retry_is_an_event_on_the_run_span(exporter: InMemorySpanExporter) -> None:
    run_two_stages_with_a_retry(make_tracer(exporter))
    (root,) = by_name(exporter.get_finished_spans(), "invoke_workflow prowzi.research")
    (event,) = [e for e in root.events if e.name == "prowzi.stage.retry"]
    assert event.attributes is not None
    assert event.attributes["prowzi.stage"] == "search"
    assert event.attributes["error.type"] == "transient"
    assert event.attributes["delay_seconds"] == 0.5


def test_failed_run_is_an_error_with_error_type(exporter: InMemorySpanExporter) -> None:
    tracer = make_tracer(exporter)
    exc = StageTimeoutError("search", 1.0)
    with tracer.run(SESSION, prompt="p", attributes={}) as run:
        with run.stage("search", 1) as span:
            span.record_failure(exc, error_type(exc))
        run.record_failure(exc, error_type(exc))
    (root,) = by_name(exporter.get_finished_spans(), "invoke_workflow prowzi.research")
    assert root.status.status_code is StatusCode.ERROR
    assert root.attributes is not None
    assert root.attributes["error.type"] == "timeout"
    assert root.attributes["prowzi.status"] == "failed"


def test_an_exception_escaping_a_stage_marks_it_failed_once(
    exporter: InMemorySpanExporter,
) -> None:
    tracer = make_tracer(exporter)
    with (
        pytest.raises(KeyError),
        tracer.run(SESSION, prompt="p", attributes={}) as run,
        run.stage("writing", 1),
    ):
        raise KeyError("draft")
    spans = exporter.get_finished_spans()
    for span in spans:
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes is not None
        assert span.attributes["error.type"] == "permanent"
        assert len([e for e in span.events if e.name == "exception"]) == 1


def test_cancelled_run_is_marked_cancelled_not_error(exporter: InMemorySpanExporter) -> None:
    tracer = make_tracer(exporter)

    async def body() -> None:
        with tracer.run(SESSION, prompt="p", attributes={}) as run, run.stage("search", 1):
            await asyncio.sleep(10)

    async def main() -> None:
        task = asyncio.create_task(body())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    for span in exporter.get_finished_spans():
        assert span.status.status_code is StatusCode.UNSET
        assert span.attributes is not None
        assert span.attributes["prowzi.status"] == "cancelled"


def test_resumed_run_links_to_the_original_run(exporter: InMemorySpanExporter) -> None:
    tracer = make_tracer(exporter)
    with tracer.run(SESSION, prompt="p", attributes={}) as first:
        original = (first.trace_id, first.span_id)
    with tracer.run(
        SESSION, prompt="p", attributes={}, link_trace_id=original[0], link_span_id=original[1]
    ) as resumed:
        assert resumed.trace_id != original[0]
    old, new = exporter.get_finished_spans()
    assert not old.links
    (link,) = new.links
    assert link.context.trace_id == old.context.trace_id
    assert link.context.span_id == old.context.span_id
    assert link.attributes is not None
    assert link.attributes["prowzi.link.type"] == "resumed_from"
    assert new.attributes is not None
    assert new.attributes["prowzi.resumed"] is True


def test_a_malformed_link_is_dropped_not_raised(exporter: InMemorySpanExporter) -> None:
    tracer = make_tracer(exporter)
    with tracer.run(SESSION, prompt="p", attributes={}, link_trace_id="zz", link_span_id="00"):
        pass
    (span,) = exporter.get_finished_spans()
    assert not span.links


def test_stage_span_is_current_so_agent_spans_are_its_children(
    exporter: InMemorySpanExporter,
) -> None:
    tracer = make_tracer(exporter)
    inner = tracer.provider.get_tracer("agent-code")
    with (
        tracer.run(SESSION, prompt="p", attributes={}) as run,
        run.stage("search", 1),
        inner.start_as_current_span("bm25 query"),
    ):
        pass
    spans = exporter.get_finished_spans()
    (child,) = by_name(spans, "bm25 query")
    (stage,) = by_name(spans, "invoke_agent prowzi.search")
    assert child.parent is not None and child.parent.span_id == stage.context.span_id


def test_tool_span_follows_genai_execute_tool() -> None:
    with tool_span("bm25", {"prowzi.query": "q"}) as span:
        span.set_attribute("x", 1)  # a no-op span without a global SDK: must not raise


def test_ids_are_none_when_the_sampler_drops_the_run(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    tracer = make_tracer(exporter)
    with tracer.run(SESSION, prompt="p", attributes={}) as run, run.stage("intent", 1) as span:
        assert run.trace_id is None and span.trace_id is None
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"},
        {"OTEL_TRACES_EXPORTER": "none"},
    ],
)
def test_disabled_or_unconfigured_tracing_is_the_null_tracer(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    set_env(monkeypatch, env)
    assert isinstance(build_tracer(install_global=False), NullTracer)


def test_an_endpoint_alone_selects_otlp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    tracer = build_tracer(install_global=False)
    assert isinstance(tracer, OtelTracer)
    tracer.provider.shutdown()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_SDK_DISABLED": "maybe"}, "OTEL_SDK_DISABLED"),
        (
            {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "sometimes"},
            "OTEL_TRACES_SAMPLER",
        ),
        (
            {
                "OTEL_TRACES_EXPORTER": "console",
                "OTEL_TRACES_SAMPLER": "traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "2",
            },
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
    ],
)
def test_bad_settings_name_their_variable(
    env: dict[str, str], variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_env(monkeypatch, env)
    with pytest.raises(ConfigError, match=variable):
        build_tracer(install_global=False)


OTLP = {"OTEL_TRACES_EXPORTER": "otlp"}


@pytest.mark.parametrize(
    ("variable", "value", "extra"),
    [
        # Values the SDK would warn about and replace by a default.
        ("OTEL_TRACES_SAMPLER", " always_off", {}),  # the SDK does not strip: always on
        ("OTEL_TRACES_SAMPLER_ARG", "nan", {"OTEL_TRACES_SAMPLER": "traceidratio"}),
        ("OTEL_TRACES_SAMPLER_ARG", "half", {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}),
        ("OTEL_RESOURCE_ATTRIBUTES", "team=research,ci", {}),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json", OTLP),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318", OTLP),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "grpc://collector:4317", OTLP),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "ten", OTLP),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "-1", OTLP),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "zip", OTLP),
        ("OTEL_EXPORTER_OTLP_HEADERS", "authorization", OTLP),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "=token", OTLP),
    ],
)
def test_a_bad_otel_value_is_one_line_naming_its_variable(
    variable: str, value: str, extra: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    set_env(monkeypatch, {"OTEL_TRACES_EXPORTER": "console", **extra, variable: value})
    with pytest.raises(ConfigError) as raised:
        build_tracer(install_global=False)
    message = str(raised.value)
    assert message.startswith(f"invalid {variable}={value!r}: ")
    assert "\n" not in message


def test_absent_otel_variables_leave_the_sdk_defaults_and_prowzis_name(
    exporter: InMemorySpanExporter,
) -> None:
    from opentelemetry.sdk.trace.sampling import ParentBased

    from prowzi import __version__

    tracer = make_tracer(exporter)
    resource = tracer.provider.resource.attributes
    assert resource["service.name"] == "prowzi"
    assert resource["service.version"] == __version__
    assert resource["telemetry.sdk.name"] == "opentelemetry"
    assert isinstance(tracer.provider.sampler, ParentBased)
    with tracer.run(SESSION, prompt="p", attributes={}) as run:
        assert run.trace_id is not None


def test_valid_otel_variables_reach_the_sdk(
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    set_env(
        monkeypatch,
        {
            "OTEL_SERVICE_NAME": "prowzi-lab",
            "OTEL_RESOURCE_ATTRIBUTES": "service.version=9,team=re%20search",
            "OTEL_TRACES_SAMPLER": "TraceIdRatio",
            "OTEL_TRACES_SAMPLER_ARG": "0",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2.5",  # not read: no OTLP exporter here
        },
    )
    tracer = make_tracer(exporter)
    resource = tracer.provider.resource.attributes
    assert resource["service.name"] == "prowzi-lab"
    assert resource["service.version"] == "9"
    assert resource["team"] == "re search"
    with tracer.run(SESSION, prompt="p", attributes={}) as run:
        assert run.trace_id is None  # ratio 0: nothing sampled
    assert exporter.get_finished_spans() == ()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_valid_otlp_variables_build_the_sdks_exporter(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    set_env(
        monkeypatch,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.example:4318/",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2.5",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=lab%20one,authorization=Bearer t",
        },
    )
    tracer = build_tracer(install_global=False)
    assert isinstance(tracer, OtelTracer)
    tracer.provider.shutdown()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_disabled_tracing_does_not_import_the_sdk() -> None:
    code = (
        "import sys\n"
        "from prowzi.observability.otel import build_tracer\n"
        "t = build_tracer()\n"
        "with t.run('s', prompt='p', attributes={}) as r, r.stage('intent', 1):\n"
        "    pass\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry.sdk')], 'sdk'\n"
    )
    env = {**os.environ, "OTEL_SDK_DISABLED": "true"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_a_run_recorded_as_cancelled_is_not_an_error(exporter: InMemorySpanExporter) -> None:
    tracer = make_tracer(exporter)
    with tracer.run(SESSION, prompt="p", attributes={}) as run:
        run.record_failure(asyncio.CancelledError(), "cancelled")
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes is not None
    assert span.attributes["prowzi.status"] == "cancelled"
    assert "error.type" not in span.attributes

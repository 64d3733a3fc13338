"""The metrics sink: event -> metric mapping, closed label sets, exemplars, exposition."""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from prowzi.events import (
    CheckpointFailed,
    CheckpointSaved,
    Event,
    StageCompleted,
    StageFailed,
    StageRetrying,
    StageSkipped,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
)
from prowzi.observability.metrics import ProwziMetrics, render, serve_metrics
from prowzi.workflows.stages import STAGE_NAMES

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


def run_events(session: str, *, outcome: str = "success", trace_id: str = TRACE) -> list[Event]:
    """The events of one run: a retried search; success, failure at writing or cancellation."""
    now = time.time()
    events: list[Event] = []

    def add(kind: type[Event], **fields: Any) -> None:
        events.append(kind(session_id=session, timestamp=now, **fields))

    add(WorkflowStarted, prompt="p")
    for stage in STAGE_NAMES:
        if stage == "search":
            add(
                StageRetrying,
                stage=stage,
                duration_seconds=0.01,
                error="boom",
                error_type="transient",
                delay_seconds=0.1,
                trace_id=trace_id,
                span_id=SPAN,
            )
        if stage == "writing" and outcome != "success":
            if outcome == "failure":
                add(
                    StageFailed,
                    stage=stage,
                    duration_seconds=0.2,
                    error="x",
                    error_type="permanent",
                )
            add(
                WorkflowFailed,
                duration_seconds=1.0,
                stage=stage,
                error="x",
                error_type="permanent",
                cancelled=outcome == "cancelled",
            )
            return events
        details: dict[str, object] = {}
        if stage == "evaluation":
            details = {"initial_score": 0.62, "score": 0.81, "revised": True}
        if stage == "turnitin":
            details = {"similarity": 0.04, "flagged": 1}
        add(
            StageCompleted,
            stage=stage,
            duration_seconds=0.05,
            details=details,
            trace_id=trace_id,
            span_id=SPAN,
            attempt=2 if stage == "search" else 1,
        )
        add(
            CheckpointSaved,
            stage=stage,
            checkpoint_id=f"{session}_{stage}",
            path="x",
            size_bytes=5000,
            duration_seconds=0.003,
        )
    add(WorkflowCompleted, duration_seconds=2.5)
    return events


def feed(metrics: ProwziMetrics, events: list[Event]) -> None:
    for event in events:
        metrics.handle(event)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    result = registry.get_sample_value(name, labels)
    assert result is not None, (name, labels)
    return result


def series(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    text = render(registry, OPENMETRICS)[0].decode()
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_a_successful_run_counts_runs_stages_checkpoints_and_quality(
    registry: CollectorRegistry,
) -> None:
    metrics = ProwziMetrics(registry)
    feed(metrics, run_events("s1"))
    assert value(registry, "prowzi_runs_started_total") == 1
    assert value(registry, "prowzi_runs_completed_total", outcome="success") == 1
    assert value(registry, "prowzi_run_duration_seconds_sum", outcome="success") == 2.5
    assert value(registry, "prowzi_runs_in_progress") == 0
    for stage in STAGE_NAMES:
        assert (
            value(registry, "prowzi_stage_executions_total", stage=stage, outcome="completed") == 1
        )
    assert value(registry, "prowzi_stage_executions_total", stage="search", outcome="retrying") == 1
    assert (
        value(registry, "prowzi_stage_retries_total", stage="search", error_type="transient") == 1
    )
    assert value(registry, "prowzi_stage_duration_seconds_count", stage="search") == 2
    assert value(registry, "prowzi_checkpoint_writes_total", outcome="success") == 7
    assert value(registry, "prowzi_checkpoint_size_bytes_sum") == 7 * 5000
    assert value(registry, "prowzi_checkpoint_write_duration_seconds_count") == 7
    assert value(registry, "prowzi_evaluation_score_sum", phase="initial") == 0.62
    assert value(registry, "prowzi_evaluation_score_sum", phase="final") == 0.81
    assert value(registry, "prowzi_turnitin_similarity_ratio_sum") == 0.04
    assert value(registry, "prowzi_last_run_success_timestamp_seconds") > 0
    assert value(registry, "prowzi_stage_last_completed_timestamp_seconds") > 0
    assert (
        value(
            registry,
            "prowzi_build_info",
            version=__import__("prowzi").__version__,
            python_version=__import__("platform").python_version(),
        )
        == 1
    )


def test_failed_and_cancelled_runs_have_their_outcomes(registry: CollectorRegistry) -> None:
    metrics = ProwziMetrics(registry)
    feed(metrics, run_events("s1", outcome="failure"))
    feed(metrics, run_events("s2", outcome="cancelled"))
    assert value(registry, "prowzi_runs_completed_total", outcome="failure") == 1
    assert value(registry, "prowzi_runs_completed_total", outcome="cancelled") == 1
    assert value(registry, "prowzi_stage_executions_total", stage="writing", outcome="failed") == 1
    assert value(registry, "prowzi_runs_in_progress") == 0
    assert value(registry, "prowzi_last_run_success_timestamp_seconds") == 0


def test_in_progress_counts_runs_between_start_and_end(registry: CollectorRegistry) -> None:
    metrics = ProwziMetrics(registry)
    metrics.handle(WorkflowStarted(session_id="a", timestamp=1, prompt="p"))
    metrics.handle(WorkflowStarted(session_id="b", timestamp=1, prompt="p"))
    assert value(registry, "prowzi_runs_in_progress") == 2
    metrics.handle(WorkflowCompleted(session_id="a", timestamp=2, duration_seconds=1))
    # An end without a start (a sink added mid-run) must not drive the gauge negative.
    metrics.handle(WorkflowCompleted(session_id="zzz", timestamp=2, duration_seconds=1))
    assert value(registry, "prowzi_runs_in_progress") == 1


def test_skips_and_checkpoint_failures_are_counted(registry: CollectorRegistry) -> None:
    metrics = ProwziMetrics(registry)
    metrics.handle(StageSkipped(session_id="s", timestamp=1, stage="intent"))
    metrics.handle(CheckpointFailed(session_id="s", timestamp=1, stage="intent", error="disk"))
    assert value(registry, "prowzi_stage_executions_total", stage="intent", outcome="skipped") == 1
    assert value(registry, "prowzi_checkpoint_writes_total", outcome="failure") == 1


def test_unknown_stages_sinks_and_error_types_map_to_closed_sets(
    registry: CollectorRegistry,
) -> None:
    metrics = ProwziMetrics(registry)
    before = series(registry)
    metrics.handle(
        StageCompleted(session_id="s", timestamp=1, stage="x" * 30, duration_seconds=0.1)
    )
    metrics.handle(
        StageRetrying(
            session_id="s",
            timestamp=1,
            stage="made-up",
            duration_seconds=0.1,
            error="e",
            error_type="weird",
            delay_seconds=0,
        )
    )
    metrics.sink_error("some-plugin-9f3a", RuntimeError("x"))
    metrics.sink_error("telemetry", RuntimeError("x"))
    assert series(registry) == before
    assert value(registry, "prowzi_stage_executions_total", stage="other", outcome="completed") == 1
    assert value(registry, "prowzi_stage_retries_total", stage="other", error_type="transient") == 1
    assert value(registry, "prowzi_telemetry_sink_errors_total", sink="other") == 1
    assert value(registry, "prowzi_telemetry_sink_errors_total", sink="telemetry") == 1


def test_out_of_range_quality_values_are_ignored(registry: CollectorRegistry) -> None:
    metrics = ProwziMetrics(registry)
    metrics.handle(
        StageCompleted(
            session_id="s",
            timestamp=1,
            stage="evaluation",
            duration_seconds=0.1,
            details={"initial_score": "high", "score": 7},
        )
    )
    metrics.handle(
        StageCompleted(
            session_id="s",
            timestamp=1,
            stage="turnitin",
            duration_seconds=0.1,
            details={"similarity": True},
        )
    )
    assert value(registry, "prowzi_evaluation_score_count", phase="final") == 0
    assert value(registry, "prowzi_turnitin_similarity_ratio_count") == 0


def test_200_runs_leave_the_series_count_of_the_first(registry: CollectorRegistry) -> None:
    metrics = ProwziMetrics(registry)
    feed(metrics, run_events("run-0"))
    after_first = series(registry)
    outcomes = ("success", "failure", "cancelled")
    for i in range(1, 200):
        feed(metrics, run_events(f"run-{i}", outcome=outcomes[i % 3], trace_id=f"{i:032x}"))
        metrics.sink_error(f"sink-{i}", RuntimeError("x"))
    assert series(registry) == after_first
    assert value(registry, "prowzi_runs_started_total") == 200
    text = render(registry, OPENMETRICS)[0].decode()
    assert "run-1" not in text and "sink-1" not in text


def test_openmetrics_exposition_carries_the_stage_exemplar(registry: CollectorRegistry) -> None:
    metrics = ProwziMetrics(registry)
    feed(metrics, run_events("s1"))
    body, content_type = render(registry, OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text")
    exemplars = [
        s.exemplar
        for family in text_string_to_metric_families(body.decode())
        if family.name == "prowzi_stage_duration_seconds"
        for s in family.samples
        if s.exemplar is not None
    ]
    assert exemplars
    assert {e.labels["trace_id"] for e in exemplars} == {TRACE}
    assert {e.labels["span_id"] for e in exemplars} == {SPAN}


def test_classic_text_format_for_scrapers_that_do_not_ask(registry: CollectorRegistry) -> None:
    ProwziMetrics(registry)
    body, content_type = render(registry, None)
    assert content_type.startswith("text/plain")
    assert b"prowzi_runs_started_total 0.0" in body


def test_metric_names_follow_prometheus_conventions(registry: CollectorRegistry) -> None:
    ProwziMetrics(registry)
    families = {f.name: f.type for f in registry.collect()}
    for name, kind in families.items():
        assert name.startswith("prowzi_")
        if kind == "histogram" and "duration" in name:
            assert name.endswith("_seconds")
        if "size" in name:
            assert name.endswith("_bytes")


def test_serve_metrics_serves_openmetrics_on_loopback(registry: CollectorRegistry) -> None:
    metrics = ProwziMetrics(registry)
    feed(metrics, run_events("s1"))
    with serve_metrics(registry, 0) as server:
        assert server.host == "127.0.0.1"
        request = urllib.request.Request(server.url, headers={"Accept": OPENMETRICS})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            text = response.read().decode()
        assert f'trace_id="{TRACE}"' in text
        assert text.rstrip().endswith("# EOF")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(server.url.replace("/metrics", "/other"), timeout=5)
    server.close()  # idempotent


def test_serve_metrics_negotiates_like_prometheus_client(registry: CollectorRegistry) -> None:
    import gzip

    ProwziMetrics(registry)
    with serve_metrics(registry, 0) as server:
        with urllib.request.urlopen(server.url, timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            assert b"prowzi_runs_started_total 0.0" in response.read()
        request = urllib.request.Request(
            server.url, headers={"Accept": OPENMETRICS, "Accept-Encoding": "gzip"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(response.read()) == render(registry, OPENMETRICS)[0]


def test_the_default_registry_is_private() -> None:
    first, second = ProwziMetrics(), ProwziMetrics()
    assert first.registry is not second.registry


def test_200_orchestrated_runs_leave_the_series_count_of_the_first(
    registry: CollectorRegistry,
) -> None:
    """The same property with the real stage loop and tracer: successes, retries, failures."""
    import asyncio
    import contextlib

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from pydantic import BaseModel

    from prowzi.agents.base import StageContext
    from prowzi.config import ProwziConfig
    from prowzi.errors import PermanentError, TransientError, WorkflowFailedError
    from prowzi.observability.otel import build_tracer
    from prowzi.testing import noop_agents, noop_result
    from prowzi.workflows import ProwziOrchestrator

    async def flaky(ctx: StageContext) -> BaseModel:
        number = int(ctx.session_id.rsplit("-", 1)[1])
        if number % 3 == 1 and ctx.attempt == 1:
            raise TransientError("rate limited")
        if number % 3 == 2:
            raise PermanentError("bad source")
        return noop_result("search", ctx)

    metrics = ProwziMetrics(registry)
    orchestrator = ProwziOrchestrator(
        config=ProwziConfig(enable_telemetry=False, retry_backoff_base=0, max_retries=1),
        agents={**noop_agents(), "search": flaky},
        sinks=[metrics],
        tracer=build_tracer(exporters=[InMemorySpanExporter()], install_global=False),
        on_sink_error=metrics.sink_error,
    )

    async def run(i: int) -> None:
        # The permanent failures are part of the workload.
        with contextlib.suppress(WorkflowFailedError):
            await orchestrator.run_research(f"prompt {i}", session_id=f"run-{i}")

    async def the_rest() -> None:
        for i in range(1, 200):
            await run(i)

    asyncio.run(run(0))
    after_first = series(registry)
    asyncio.run(the_rest())
    assert series(registry) == after_first
    assert value(registry, "prowzi_runs_started_total") == 200
    assert value(registry, "prowzi_runs_completed_total", outcome="failure") == 66
    text = render(registry, OPENMETRICS)[0].decode()
    assert "trace_id=" in text


def test_openmetrics_exposition_is_prometheus_clients_own(registry: CollectorRegistry) -> None:
    from prometheus_client.openmetrics.exposition import generate_latest

    metrics = ProwziMetrics(registry)
    feed(metrics, run_events("s1"))
    feed(metrics, run_events("s2", outcome="failure"))
    assert render(registry, OPENMETRICS)[0] == generate_latest(registry)


def test_names_that_need_escaping_are_prometheus_clients_too(registry: CollectorRegistry) -> None:
    from prometheus_client import Gauge
    from prometheus_client.openmetrics.exposition import generate_latest

    Gauge("a:b", 'help with "quotes"\nand lines', ("x",), registry=registry).labels('q"\\').set(1)
    assert render(registry, OPENMETRICS)[0] == generate_latest(registry)

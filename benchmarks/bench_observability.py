"""Observability benchmarks (issue 5).

1. Tracing plus metrics cost per stage: what the stage loop adds for one stage attempt with
   OpenTelemetry on (a stage span under the run span through the SDK with a batch processor,
   two agent annotations and one span event) and the metrics sink handling the attempt's
   events (started, completed with a trace_id exemplar, checkpoint saved).
   Target: median at most 100 µs.
   For scale: the same stage loop measured end to end, with the tracer and metrics on vs off.
2. A /metrics scrape after 1,000 runs: OpenMetrics rendering of the registry, and a full HTTP
   GET against :func:`serve_metrics` on loopback. Target: at most 10 ms.

Run: python benchmarks/bench_observability.py
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stats import report
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry

from prowzi.config import ProwziConfig
from prowzi.events import (
    CheckpointSaved,
    StageCompleted,
    StageStarted,
    WorkflowCompleted,
    WorkflowStarted,
)
from prowzi.observability.metrics import ProwziMetrics, render, serve_metrics
from prowzi.observability.otel import OtelTracer, build_tracer
from prowzi.testing import noop_agents
from prowzi.tracing import NullTracer, RunTracer
from prowzi.workflows.orchestrator import ProwziOrchestrator
from prowzi.workflows.stages import STAGE_NAMES

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class DiscardExporter(SpanExporter):
    """Receives batches like an OTLP exporter would, and drops them."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def otel_tracer() -> OtelTracer:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    tracer = build_tracer(exporters=[], install_global=False)
    assert isinstance(tracer, OtelTracer)
    # A queue large enough that no span is dropped: dropping would flatter the figures.
    tracer.provider.add_span_processor(
        BatchSpanProcessor(DiscardExporter(), max_queue_size=1 << 17, schedule_delay_millis=200)
    )
    return tracer


def per_stage_cost(iterations: int) -> list[float]:
    tracer = otel_tracer()
    metrics = ProwziMetrics(CollectorRegistry())
    samples: list[float] = []
    clock = time.perf_counter
    with tracer.run("bench-session", prompt="p", attributes={}) as run_span:
        for i in range(iterations):
            stage = STAGE_NAMES[i % len(STAGE_NAMES)]
            started = clock()
            metrics.handle(StageStarted(session_id="s", timestamp=1.0, stage=stage))
            with run_span.stage(stage, 1) as span:
                span.set_attribute(f"prowzi.{stage}.sources", 12)
                span.set_attribute(f"prowzi.{stage}.queries", ["a", "b"])
                span.add_event("prowzi.agent.note", {"count": 3})
            metrics.handle(
                StageCompleted(
                    session_id="s",
                    timestamp=1.0,
                    stage=stage,
                    duration_seconds=0.05,
                    trace_id=span.trace_id,
                    span_id=span.span_id,
                    details={"score": 0.8, "initial_score": 0.7, "similarity": 0.05},
                )
            )
            metrics.handle(
                CheckpointSaved(
                    session_id="s",
                    timestamp=1.0,
                    stage=stage,
                    checkpoint_id="c",
                    path="p",
                    size_bytes=4096,
                    duration_seconds=0.002,
                )
            )
            samples.append(clock() - started)
    tracer.shutdown()
    return samples[iterations // 10 :]  # drop warm-up


async def stage_loop(tracer: RunTracer, sinks: list[ProwziMetrics], runs: int) -> list[float]:
    config = ProwziConfig(enable_checkpointing=False, enable_telemetry=False)
    orch = ProwziOrchestrator(config=config, agents=noop_agents(), tracer=tracer, sinks=sinks)
    for _ in range(50):
        await orch.run_research("p")
    per_stage = []
    for _ in range(runs):
        started = time.perf_counter()
        await orch.run_research("p")
        per_stage.append((time.perf_counter() - started) / len(STAGE_NAMES))
    return per_stage


def registry_after_runs(runs: int) -> CollectorRegistry:
    registry = CollectorRegistry()
    feed_runs(ProwziMetrics(registry), runs)
    return registry


def feed_runs(metrics: ProwziMetrics, runs: int) -> None:
    for i in range(runs):
        sid = f"run-{i}"
        metrics.handle(WorkflowStarted(session_id=sid, timestamp=1.0, prompt="p"))
        for stage in STAGE_NAMES:
            metrics.handle(
                StageCompleted(
                    session_id=sid,
                    timestamp=1.0,
                    stage=stage,
                    duration_seconds=0.01 * (i % 50),
                    trace_id=f"{i:032x}",
                    span_id=f"{i:016x}",
                    details={"score": 0.8, "initial_score": 0.7, "similarity": 0.05},
                )
            )
        metrics.handle(WorkflowCompleted(session_id=sid, timestamp=1.0, duration_seconds=3.0))


def scrape_render(registry: CollectorRegistry, times: int) -> list[float]:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        render(registry, OPENMETRICS)
        samples.append(time.perf_counter() - started)
    return samples


def scrape_http(registry: CollectorRegistry, times: int) -> list[float]:
    samples = []
    with serve_metrics(registry, 0) as server:
        request = urllib.request.Request(server.url, headers={"Accept": OPENMETRICS})
        for _ in range(times):
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=5) as response:
                response.read()
            samples.append(time.perf_counter() - started)
    return samples


def scrape_service(times: int) -> list[float]:
    """GET /metrics from ``prowzi serve``'s app under uvicorn, after 1,000 runs' events."""
    import tempfile
    import threading

    import uvicorn

    from prowzi.service.app import ServiceSettings, create_app

    with tempfile.TemporaryDirectory() as tmp:
        config = ProwziConfig(telemetry_dir=Path(tmp) / "t", checkpoint_dir=Path(tmp) / "c")
        app = create_app(config, ServiceSettings(state_dir=Path(tmp) / "s"), tracer=NullTracer())
        feed_runs(app.state.metrics, 1000)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics", headers={"Accept": OPENMETRICS}
        )
        samples = []
        for _ in range(times):
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=5) as response:
                response.read()
            samples.append(time.perf_counter() - started)
        server.should_exit = True
        thread.join(10)
    return samples


def main() -> None:
    report(
        "tracing + metrics per stage (OTel SDK, batch export)",
        per_stage_cost(20_000),
        "us",
        "median <= 100 us",
    )
    off = asyncio.run(stage_loop(NullTracer(), [], 2000))
    on = asyncio.run(stage_loop(otel_tracer(), [ProwziMetrics(CollectorRegistry())], 2000))
    report("stage loop per stage, tracing and metrics off", off, "us")
    report("stage loop per stage, tracing and metrics on", on, "us")

    registry = registry_after_runs(1000)
    body, _ = render(registry, OPENMETRICS)
    lines = body.count(b"\n")
    print(f"exposition after 1,000 runs: {len(body)} bytes, {lines} lines")
    report(
        "/metrics render after 1,000 runs (OpenMetrics)",
        scrape_render(registry, 500),
        "ms",
        "<= 10 ms",
    )
    report(
        "/metrics HTTP GET after 1,000 runs (serve_metrics, loopback)",
        scrape_http(registry, 500),
        "ms",
        "<= 10 ms",
    )
    report(
        "/metrics HTTP GET after 1,000 runs (prowzi serve app, loopback)",
        scrape_service(500),
        "ms",
        "<= 10 ms",
    )


if __name__ == "__main__":
    main()

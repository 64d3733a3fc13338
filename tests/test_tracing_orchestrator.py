"""Spans from the real stage loop: structure, agent annotations, retry events, a failed run's
error status, and a resumed run linked to the run that checkpointed it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from pydantic import BaseModel

from prowzi.agents.base import StageContext
from prowzi.config import ProwziConfig
from prowzi.errors import PermanentError, TransientError, WorkflowFailedError
from prowzi.observability.otel import OtelTracer, build_tracer
from prowzi.testing import STAGES, noop_agents, noop_result
from prowzi.workflows import ProwziOrchestrator
from prowzi.workflows.telemetry import TelemetryCollector


class Search:
    """Annotates its span; fails transiently once, or permanently while ``broken``."""

    def __init__(self) -> None:
        self.calls = 0
        self.broken = False

    async def __call__(self, ctx: StageContext) -> BaseModel:
        self.calls += 1
        ctx.annotate("queries", ["qubits", "decoherence"])
        ctx.event("prowzi.search.query", query="qubits", results=3)
        if self.broken:
            raise PermanentError("corpus unreadable")
        if self.calls == 1:
            raise TransientError("rate limited")
        return noop_result("search", ctx)


def make(tmp_path: Path, search: Search) -> tuple[ProwziOrchestrator, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracer = build_tracer(exporters=[exporter], install_global=False)
    assert isinstance(tracer, OtelTracer)
    config = ProwziConfig(
        enable_checkpointing=True,
        checkpoint_dir=tmp_path / "ckpt",
        telemetry_dir=tmp_path / "tel",
        retry_backoff_base=0,
        max_retries=2,
    )
    orchestrator = ProwziOrchestrator(
        config=config, agents={**noop_agents(), "search": search}, tracer=tracer
    )
    return orchestrator, exporter


def roots(spans: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is None]


def test_the_stage_loop_nests_attempts_under_the_run_with_retry_events(tmp_path: Path) -> None:
    orchestrator, exporter = make(tmp_path, Search())
    result = asyncio.run(orchestrator.run_research("quantum computing"))
    spans = exporter.get_finished_spans()
    (root,) = roots(spans)
    assert root.name == "invoke_workflow prowzi.research"
    assert format(root.context.trace_id, "032x") == result.metadata["trace_id"]
    children = [s for s in spans if s is not root]
    assert [s.attributes["prowzi.stage"] for s in children if s.attributes] == [
        "intent",
        "planning",
        "search",
        "search",
        *STAGES[3:],
    ]
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id for s in children)
    first, second = [s for s in children if s.name == "invoke_agent prowzi.search"]
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes is not None and first.attributes["error.type"] == "transient"
    assert second.attributes is not None and second.attributes["prowzi.attempt"] == 2
    assert tuple(second.attributes["prowzi.search.queries"]) == ("qubits", "decoherence")  # type: ignore[arg-type]
    assert "prowzi.search.query" in [e.name for e in second.events]
    retries = [e for e in root.events if e.name == "prowzi.stage.retry"]
    assert len(retries) == 1
    assert root.status.status_code is StatusCode.UNSET
    assert root.attributes is not None and root.attributes["prowzi.status"] == "completed"
    # The run's trace id is in its telemetry JSON.
    session = TelemetryCollector(output_dir=tmp_path / "tel").load_session(
        result.metadata["session_id"]
    )
    assert session.metadata["trace_id"] == result.metadata["trace_id"]


def test_a_resumed_run_links_to_the_failed_run_it_continues(tmp_path: Path) -> None:
    search = Search()
    search.broken = True
    orchestrator, exporter = make(tmp_path, search)
    with pytest.raises(WorkflowFailedError) as failure:
        asyncio.run(orchestrator.run_research("quantum computing"))
    (failed_root,) = roots(exporter.get_finished_spans())
    assert failed_root.status.status_code is StatusCode.ERROR
    assert failed_root.attributes is not None
    assert failed_root.attributes["error.type"] == "permanent"
    exporter.clear()

    search.broken = False
    asyncio.run(orchestrator.resume_from_checkpoint(failure.value.session_id))
    (resumed_root,) = roots(exporter.get_finished_spans())
    assert resumed_root.context.trace_id != failed_root.context.trace_id
    links = [link.context for link in resumed_root.links]
    assert [(c.trace_id, c.span_id) for c in links] == [
        (failed_root.context.trace_id, failed_root.context.span_id)
    ]
    stages = {
        s.attributes["prowzi.stage"]
        for s in exporter.get_finished_spans()
        if s.attributes and "prowzi.stage" in s.attributes
    }
    assert stages == set(STAGES[2:])  # intent and planning were restored, not re-run

"""Telemetry fed by the real orchestrator: files, the retry shape, listeners, failing sinks."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from shared import STAGES as SHARED_STAGES
from test_orchestrator import Flaky

from prowzi.config import ProwziConfig, get_config
from prowzi.errors import PermanentError, TransientError, WorkflowFailedError
from prowzi.events import Event
from prowzi.testing import noop_agents
from prowzi.tracing import NullTracer
from prowzi.workflows import ProwziOrchestrator
from prowzi.workflows.eventlog import read_events
from prowzi.workflows.telemetry import TelemetryCollector

SCHEMA = json.loads(
    (Path(__file__).parent / "schemas" / "telemetry_session.schema.json").read_text()
)
STAGES = list(SHARED_STAGES)


async def no_sleep(_: float) -> None:
    return None


def orchestrator(
    agents: dict[str, Any] | None = None, sinks: list[Any] | None = None, **settings: Any
) -> ProwziOrchestrator:
    config = ProwziConfig(telemetry_dir=Path("telemetry"), **settings)
    return ProwziOrchestrator(
        config=config,
        agents={**noop_agents(), **(agents or {})},
        sinks=sinks or [],
        tracer=NullTracer(),
        sleep=no_sleep,
    )


def session_file(session_id: str, directory: Path = Path("telemetry")) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / f"{session_id}.json").read_text())
    return data


def test_a_real_run_writes_a_schema_valid_session_file() -> None:
    result = asyncio.run(orchestrator().run_research("quantum computing", session_id="real-1"))
    assert result.metadata["session_id"] == "real-1"
    data = session_file("real-1")
    jsonschema.validate(data, SCHEMA)
    assert data["success"] is True and data["completed_at"] is not None
    assert [s["stage"] for s in data["stages"]] == STAGES
    assert {s["status"] for s in data["stages"]} == {"completed"}
    assert data["metadata"]["parameters"]["prompt"] == "quantum computing"
    assert data["metadata"]["stages"] == STAGES
    assert "trace_id" in data["metadata"] and data["metadata"]["prowzi_version"]
    collector = TelemetryCollector(Path("telemetry"))
    assert collector.rebuild_session("real-1").to_dict() == data


def test_a_retried_stage_has_the_documents_shape_from_the_engine() -> None:
    flaky = Flaky("search", 1, TransientError("Rate limit exceeded"))
    asyncio.run(orchestrator({"search": flaky}).run_research("quantum", session_id="retry-1"))
    data = session_file("retry-1")
    jsonschema.validate(data, SCHEMA)
    search = [s for s in data["stages"] if s["stage"] == "search"]
    assert [(s["status"], s["attempt"]) for s in search] == [("retrying", 1), ("completed", 2)]
    assert "Rate limit exceeded" in search[0]["error"]
    assert "error" not in search[1]
    assert data["total_retries"] == 1 and data["success"] is True


def test_a_failed_run_is_recorded_as_failed() -> None:
    broken = Flaky("planning", 99, PermanentError("no plan possible"))
    with pytest.raises(WorkflowFailedError):
        asyncio.run(orchestrator({"planning": broken}).run_research("q", session_id="fail-1"))
    data = session_file("fail-1")
    jsonschema.validate(data, SCHEMA)
    assert data["success"] is False and data["failed_stages"] == ["planning"]
    assert data["stages"][-1]["status"] == "failed"
    assert "no plan possible" in data["stages"][-1]["error"]
    rows = TelemetryCollector(Path("telemetry")).list_sessions(status="failed")
    assert [r.session_id for r in rows] == ["fail-1"]


def test_design_document_real_time_monitoring_sample() -> None:
    config = get_config()
    orchestrator = ProwziOrchestrator(config=config, agents=noop_agents(), tracer=NullTracer())

    async def sample() -> Any:
        # --- verbatim from the design document ---
        from prowzi.cli.monitor import WorkflowMonitor, ProgressListener  # noqa: F401, I001
        from prowzi.workflows.telemetry import TelemetryCollector

        # Create telemetry collector
        telemetry = TelemetryCollector(output_dir=Path("./telemetry"))
        session_id = "my-session-123"

        # Create progress listener
        progress_listener = ProgressListener(telemetry=telemetry, session_id=session_id)

        # Run with live monitoring
        result = await orchestrator.run_research(
            prompt="Research topic",
            progress_callback=progress_listener,
        )
        # --- end of sample ---
        return result, telemetry

    result, telemetry = asyncio.run(sample())
    run_id = result.metadata["session_id"]
    mine = telemetry.load_session("my-session-123")
    assert mine.success is True and mine.metadata["run_session_id"] == run_id
    assert [s.stage for s in mine.stages] == STAGES
    # the orchestrator's own telemetry recorded the same run under its id
    own = TelemetryCollector(config.telemetry_dir).load_session(run_id)
    assert own.success is True
    assert [s.to_dict()["status"] for s in own.stages] == [
        s.to_dict()["status"] for s in mine.stages
    ]


def test_a_listener_on_the_orchestrators_directory_does_not_record_twice() -> None:
    from prowzi.cli.monitor import ProgressListener

    listener = ProgressListener(telemetry=TelemetryCollector(Path("telemetry")))
    asyncio.run(orchestrator().run_research("q", session_id="once-1", progress_callback=listener))
    events = read_events(Path("telemetry") / "events" / "once-1.jsonl")
    kinds = [e.kind for e in events]
    assert kinds.count("workflow_started") == 1 and kinds.count("workflow_completed") == 1


def test_an_unwritable_telemetry_directory_never_fails_the_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    Path("blocker").write_text("a file where the directory should be")
    orch = orchestrator()
    orch.config.telemetry_dir = Path("blocker") / "telemetry"
    with caplog.at_level(logging.WARNING, logger="prowzi.telemetry"):
        result = asyncio.run(orch.run_research("quantum computing", session_id="unw-1"))
    assert result.metadata["session_id"] == "unw-1"
    assert "telemetry event_log failed for session unw-1" in caplog.text
    assert "telemetry snapshot failed for session unw-1" in caplog.text


def test_a_raising_sink_never_fails_the_run_or_the_telemetry() -> None:
    class Raising:
        name = "raising"

        def handle(self, event: Event) -> None:
            raise RuntimeError("sink bug")

    result = asyncio.run(
        orchestrator(sinks=[Raising()]).run_research("quantum computing", session_id="rs-1")
    )
    assert result.metadata["session_id"] == "rs-1"
    assert session_file("rs-1")["success"] is True


@pytest.mark.parametrize("value", ["soon", 1e20])
def test_a_resume_records_its_events_past_a_mistyped_log_line(value: object) -> None:
    """Issue 15 item 5: a resumed session whose log has a line of the wrong types (skipped,
    as a line that is not JSON is) records all of the resume's events and ends completed,
    not "interrupted 4/7" forever."""
    broken = Flaky("writing", 99, PermanentError("no words"))
    with pytest.raises(WorkflowFailedError):
        asyncio.run(
            orchestrator({"writing": broken}, enable_checkpointing=True).run_research(
                "q", session_id="typo-1"
            )
        )
    log = Path("telemetry") / "events" / "typo-1.jsonl"
    lines = log.read_text().splitlines()
    line = json.loads(lines[2])
    assert line["event"] == "stage_started"
    line["timestamp"] = value
    lines[2] = json.dumps(line)
    log.write_text("\n".join(lines) + "\n")
    resumed = orchestrator(enable_checkpointing=True)
    asyncio.run(resumed.resume_from_checkpoint("typo-1"))
    data = session_file("typo-1")
    assert data["success"] is True and data["metadata"]["runs"] == 2
    collector = TelemetryCollector(Path("telemetry"))
    assert collector.load_session("typo-1").completed_stage_count == 7
    (row,) = collector.list_sessions()
    assert (row.status, row.stages_completed) == ("completed", 7)

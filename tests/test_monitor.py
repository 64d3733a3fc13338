"""WorkflowMonitor rendering, ProgressListener, live_monitor, following and replaying logs."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from telemetry_events import DOC_SESSION, DOC_T0, STAGES, RunScript, doc_drawing_run

from prowzi.cli.monitor import (
    ProgressListener,
    ReplayClock,
    WorkflowMonitor,
    event_from_progress,
    follow_session,
    live_monitor,
    replay_session,
)
from prowzi.events import Event, progress_payload
from prowzi.workflows.eventlog import EventLogReader
from prowzi.workflows.telemetry import TelemetryCollector


def render(monitor: WorkflowMonitor, width: int) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None).print(monitor.render())
    return buffer.getvalue()


def row(screen: str, stage: str) -> list[str]:
    """The cells of a stage's row, split on runs of spaces."""
    for line in screen.splitlines():
        cells = [c for c in line.strip("│ ").split("  ") if c.strip()]
        if cells and cells[0].strip() == stage:
            return [c.strip() for c in cells]
    raise AssertionError(f"no row for {stage} in\n{screen}")


def drawing_monitor() -> WorkflowMonitor:
    run = doc_drawing_run()
    monitor = WorkflowMonitor(clock=lambda: DOC_T0 + 24.26)
    monitor.apply_all(run.events)
    return monitor


@pytest.mark.parametrize("width", [80, 120])
def test_monitor_draws_the_design_documents_table_and_summary(width: int) -> None:
    screen = render(drawing_monitor(), width)
    assert f"Prowzi Workflow Monitor - Session: {DOC_SESSION}" in screen
    for header in ("Stage", "Status", "Attempt", "Duration", "Details"):
        assert header in screen
    assert row(screen, "intent") == ["intent", "✓ completed", "1", "2.30s"]
    assert row(screen, "planning") == ["planning", "✓ completed", "1", "3.45s"]
    assert row(screen, "search") == ["search", "✓ completed", "2", "13.31s", "Sources: 48"]
    verification = row(screen, "verification")
    assert verification[:4] == ["verification", "⟳ retrying", "1", "5.20s"]
    assert verification[4].startswith("Retrying...")
    assert row(screen, "writing") == ["writing", "· pending"]
    for line in ("Total Duration: 24.26s", "Stages: 3/7 completed", "Total Retries: 2"):
        assert line in screen
    assert "Success: In Progress" in screen
    assert all(len(line) <= width for line in screen.splitlines())


def test_details_are_cut_to_fit_at_80_columns_and_shown_whole_at_120() -> None:
    run = RunScript().start()
    run.stage("intent", 1.0, {"document_type": "research_paper", "field": "computer_science"})
    monitor = WorkflowMonitor(clock=lambda: run.now)
    monitor.apply_all(run.events)
    assert "Document type: research_paper, Field: computer_science" in render(monitor, 120)
    narrow = render(monitor, 80)
    assert "Document type: research_p…" in narrow


def test_a_running_stage_counts_its_time_from_the_clock() -> None:
    run = RunScript().start().stage("intent", 2.0).begin("planning")
    now = [run.now + 1.5]
    monitor = WorkflowMonitor(clock=lambda: now[0])
    monitor.apply_all(run.events)
    assert row(render(monitor, 100), "planning") == [
        "planning",
        "… running",
        "1",
        "1.50s",
        "Running...",
    ]
    now[0] += 10
    screen = render(monitor, 100)
    assert row(screen, "planning")[3] == "11.50s"
    assert "Total Duration: 13.50s" in screen


def test_a_finished_run_shows_success_and_its_document() -> None:
    run = RunScript().start()
    for name in STAGES:
        run.stage(name, 1.0)
    run.complete("out/paper.md")
    monitor = WorkflowMonitor(clock=lambda: run.now + 1000)
    monitor.apply_all(run.events)
    screen = render(monitor, 80)
    assert monitor.finished
    assert "Stages: 7/7 completed" in screen and "Success: ✓" in screen
    assert "Total Duration: 7.00s" in screen and "Document: out/paper.md" in screen


def test_a_failed_run_shows_the_failure() -> None:
    run = RunScript().start().stage("intent", 1.0).fail_stage("planning", 1.0, "no plan")
    run.failed("planning", "no plan")
    monitor = WorkflowMonitor(clock=lambda: run.now)
    monitor.apply_all(run.events)
    screen = render(monitor, 80)
    assert row(screen, "planning")[:2] == ["planning", "✗ failed"]
    assert "Success: ✗" in screen and "Error: planning: no plan" in screen


def test_restored_stages_count_as_completed() -> None:
    run = RunScript().start().skip("intent").skip("planning").begin("search")
    monitor = WorkflowMonitor(clock=lambda: run.now)
    monitor.apply_all(run.events)
    screen = render(monitor, 100)
    assert row(screen, "intent")[:2] == ["intent", "↷ restored"]
    assert "Stages: 2/7 completed" in screen


def test_the_monitor_ignores_other_sessions() -> None:
    monitor = WorkflowMonitor("mine", clock=lambda: DOC_T0)
    monitor.apply_all(RunScript("other").start().stage("intent", 1.0).events)
    assert monitor.metrics is None
    assert "Waiting for the run's first event" in render(monitor, 80)


def test_live_drawing_reaches_a_terminal() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, width=100, force_terminal=True, color_system=None)
    run = RunScript().start().stage("intent", 1.0).complete()
    with WorkflowMonitor(console=console, clock=lambda: run.now) as monitor:
        monitor.apply_all(run.events)
    assert "Success: ✓" in buffer.getvalue()


# --- the progress listener ------------------------------------------------------------------


def payloads(events: list[Event]) -> list[tuple[str, dict[str, object]]]:
    return [p for p in (progress_payload(e) for e in events) if p is not None]


def test_progress_payloads_convert_back_to_their_events() -> None:
    run = RunScript().start().stage("intent", 1.0).checkpoint("intent").retry("planning", 1, "x")
    for event in run.events:
        converted = progress_payload(event)
        assert converted is not None
        assert event_from_progress(*converted) == event
    assert event_from_progress("intent", {"status": "weird"}) is None
    assert event_from_progress("intent", {"no": "status"}) is None


def test_progress_payloads_keep_their_values_and_bad_ones_are_not_events() -> None:
    """A payload made in this process converts back with its values as they were (a path
    stays a path); one of the wrong types, or with a time no date can hold, is no event."""
    run = RunScript().start()
    started = dataclasses.replace(
        run.events[0], parameters={"corpus_dir": Path("/corpus"), "max_results_per_query": 3}
    )
    converted = progress_payload(started)
    assert converted is not None and event_from_progress(*converted) == started
    for bad in ({"timestamp": "soon"}, {"timestamp": 1e20}, {"unknown_field": 1}):
        stage, payload = converted
        assert event_from_progress(stage, {**payload, **bad}) is None


def test_the_listener_records_under_its_own_session_id(tmp_path: Path) -> None:
    telemetry = TelemetryCollector(output_dir=tmp_path)
    listener = ProgressListener(telemetry=telemetry, session_id="my-session-123")
    run = RunScript("20261126-101500-abcdef01").start().stage("intent", 1.0).complete()
    for stage, payload in payloads(run.events):
        listener(stage, payload)
    metrics = telemetry.load_session("my-session-123")
    assert metrics.success is True
    assert metrics.metadata["run_session_id"] == "20261126-101500-abcdef01"
    assert listener.run_session_id == "20261126-101500-abcdef01"
    assert listener.session_id == "my-session-123"


def test_a_listener_without_an_id_adopts_the_runs(tmp_path: Path) -> None:
    telemetry = TelemetryCollector(output_dir=tmp_path)
    listener = ProgressListener(telemetry=telemetry)
    for stage, payload in payloads(RunScript("run-1").start().stage("intent", 1.0).events):
        listener(stage, payload)
    assert listener.session_id == "run-1"
    assert telemetry.load_session("run-1").stages[0].stage == "intent"


def test_a_listener_never_raises_into_the_run() -> None:
    class Broken(WorkflowMonitor):
        def apply(self, event: Event) -> None:
            raise RuntimeError("draw bug")

    listener = ProgressListener(monitor=Broken())
    for stage, payload in payloads(RunScript().start().events):
        listener(stage, payload)
    assert listener.errors == 1


def test_live_monitor_draws_a_run_fed_through_its_callback() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, width=100, color_system=None)
    run = RunScript("run-7").start()
    for name in STAGES:
        run.stage(name, 0.5)
    run.complete()
    callback, monitor = live_monitor(None, console, clock=lambda: run.now)
    with monitor:
        for stage, payload in payloads(run.events):
            callback(stage, payload)
    assert monitor.session_id == "run-7" and monitor.finished
    screen = buffer.getvalue()
    assert "Session: run-7" in screen and "Stages: 7/7 completed" in screen


def test_design_document_monitoring_sample_builds_a_listener(tmp_path: Path) -> None:
    # the part of the document's "Real-Time Monitoring" sample that needs no orchestrator
    from prowzi.cli.monitor import ProgressListener as _ProgressListener
    from prowzi.workflows.telemetry import TelemetryCollector as _TelemetryCollector

    telemetry = _TelemetryCollector(output_dir=Path("./telemetry"))
    session_id = "my-session-123"
    progress_listener = _ProgressListener(telemetry=telemetry, session_id=session_id)
    assert callable(progress_listener)


# --- following another process's log, replaying ----------------------------------------------


def test_follow_reads_a_log_as_it_is_written(tmp_path: Path) -> None:
    writer = TelemetryCollector(tmp_path)
    run = doc_drawing_run()
    run.stage("verification", 1.0, attempt=2)
    for name in STAGES[4:]:
        run.stage(name, 1.0)
    run.complete()
    events = list(run.events)
    writer.handle(events.pop(0))
    monitor = WorkflowMonitor(DOC_SESSION, clock=lambda: run.now)
    seen: list[int] = []

    def sleep(_: float) -> None:
        # the run goes on while the monitor sleeps: two more events per poll
        for _ in range(2):
            if events:
                writer.handle(events.pop(0))
        metrics = monitor.metrics
        seen.append(metrics.completed_stage_count if metrics else 0)

    follow_session(writer.follow(DOC_SESSION), monitor, poll_interval=0, sleep=sleep)
    assert monitor.finished and not events
    assert seen[0] == 0 and seen[-1] == 7 and seen == sorted(seen)
    assert "Success: ✓" in render(monitor, 80)


def test_follow_notices_a_writer_that_died(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    writer = TelemetryCollector(tmp_path)
    for event in RunScript("crashed").start().begin("intent").events:
        writer.handle(event)
    log_path = writer.event_log_path("crashed")
    text = log_path.read_text().replace(f'"pid":{os.getpid()}', f'"pid":{pid}')
    log_path.write_text(text)
    monitor = WorkflowMonitor("crashed", clock=lambda: DOC_T0)
    ticks = iter(range(1000))
    # a resume holds the session's lock for the first two looks, and has not logged yet
    answers = [True, True]
    asked: list[bool] = []

    def writer_lock() -> bool:
        asked.append(answers.pop(0) if answers else False)
        return asked[-1]

    follow_session(
        EventLogReader(log_path),
        monitor,
        poll_interval=0,
        liveness_interval=1,
        sleep=lambda _: None,
        monotonic=lambda: float(next(ticks)),
        writer_lock=writer_lock,
    )
    assert asked == [True, True, False]  # not interrupted while the lock was held
    assert monitor.interrupted is not None and str(pid) in monitor.interrupted
    assert "Success: ✗ (interrupted)" in render(monitor, 100)


def test_replay_keeps_the_runs_rhythm_divided_by_speed() -> None:
    run = RunScript().start().stage("intent", 2.0).stage("planning", 4.0).complete()
    sleeps: list[float] = []
    clock = ReplayClock(speed=4.0, monotonic=lambda: 0.0)
    monitor = WorkflowMonitor(clock=clock, label="replay ×4")
    replay_session(run.events, monitor, speed=4.0, clock=clock, sleep=sleeps.append)
    assert sleeps == [0.5, 1.0]
    assert monitor.finished and clock() == run.now
    assert "(replay ×4)" in render(monitor, 80)
    with pytest.raises(ValueError, match="speed"):
        replay_session(run.events, monitor, speed=0)


def test_a_resumed_sessions_duration_leaves_out_the_time_between_runs() -> None:
    first = RunScript("resumed").start().stage("intent", 2.0).failed("planning", "down")
    second = RunScript("resumed", t0=first.now + 3600).start().skip("intent").begin("planning")
    monitor = WorkflowMonitor(clock=lambda: second.now + 1.0)
    monitor.apply_all([*first.events, *second.events])
    assert "Total Duration: 3.00s" in render(monitor, 80)

"""TelemetryCollector: session files, the event log, listing, rebuilding, and never failing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from telemetry_events import DOC_SESSION, STAGES, RunScript, doc_example_run

from prowzi.errors import InvalidInputError, SessionNotFoundError, TelemetryError
from prowzi.events import Event, EventBus, StageStarted, WorkflowStarted
from prowzi.workflows import telemetry
from prowzi.workflows.eventlog import EventLogReader, EventLogWriter, read_events
from prowzi.workflows.telemetry import (
    CorruptSessionError,
    SessionRecorder,
    StageMetrics,
    TelemetryCollector,
    WorkflowMetrics,
)

SCHEMA = json.loads(
    (Path(__file__).parent / "schemas" / "telemetry_session.schema.json").read_text()
)

DOC_JSON_EXAMPLE: dict[str, Any] = {
    "session_id": "abc123-def456",
    "prompt": "Write a research paper...",
    "started_at": "2024-01-15T10:30:00Z",
    "completed_at": "2024-01-15T10:45:30Z",
    "total_duration_seconds": 930.5,
    "total_retries": 3,
    "failed_stages": [],
    "success": True,
    "stages": [
        {
            "stage": "intent",
            "status": "completed",
            "attempt": 1,
            "duration_seconds": 2.3,
            "timestamp": "2024-01-15T10:30:02Z",
            "details": {"document_type": "research_paper", "field": "computer_science"},
        },
        {
            "stage": "search",
            "status": "retrying",
            "attempt": 1,
            "duration_seconds": 5.2,
            "timestamp": "2024-01-15T10:30:15Z",
            "error": "Rate limit exceeded",
        },
        {
            "stage": "search",
            "status": "completed",
            "attempt": 2,
            "duration_seconds": 8.1,
            "timestamp": "2024-01-15T10:30:23Z",
            "details": {"sources_count": 48},
        },
    ],
}


def record(collector: TelemetryCollector, events: list[Event]) -> None:
    for event in events:
        collector.handle(event)


def session_file(directory: Path, session_id: str = DOC_SESSION) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / f"{session_id}.json").read_text())
    return data


# --- the design document's promises -------------------------------------------------------


def test_design_document_telemetry_export_sample_runs() -> None:
    record(TelemetryCollector(Path("./telemetry")), doc_example_run().events)
    exported: list[tuple[str, WorkflowMetrics]] = []

    def export_to_prometheus(metrics: WorkflowMetrics) -> None:
        exported.append(("prometheus", metrics))

    def export_to_splunk(metrics: WorkflowMetrics) -> None:
        exported.append(("splunk", metrics))

    # --- verbatim from the design document ---
    from prowzi.workflows.telemetry import TelemetryCollector as _TelemetryCollector

    telemetry = _TelemetryCollector(output_dir=Path("./telemetry"))

    # Load session metrics
    metrics = telemetry.load_session("abc123-def456")

    # Export to external system
    export_to_prometheus(metrics)
    export_to_splunk(metrics)
    # --- end of sample ---

    assert [name for name, _ in exported] == ["prometheus", "splunk"]
    assert isinstance(metrics, WorkflowMetrics)
    assert metrics.session_id == "abc123-def456" and metrics.success is True
    assert all(isinstance(s, StageMetrics) for s in metrics.stages)


def test_the_schema_accepts_the_design_documents_example() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(DOC_JSON_EXAMPLE, SCHEMA)


def test_the_schema_refuses_keys_the_document_does_not_have() -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**DOC_JSON_EXAMPLE, "extra": 1}, SCHEMA)
    bad_stage = {**DOC_JSON_EXAMPLE["stages"][0], "note": "x"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**DOC_JSON_EXAMPLE, "stages": [bad_stage]}, SCHEMA)


def test_session_file_validates_field_for_field_against_the_schema(tmp_path: Path) -> None:
    record(TelemetryCollector(tmp_path), doc_example_run().events)
    data = session_file(tmp_path)
    jsonschema.validate(data, SCHEMA)
    assert list(data) == [
        "session_id",
        "prompt",
        "started_at",
        "completed_at",
        "total_duration_seconds",
        "total_retries",
        "failed_stages",
        "success",
        "stages",
        "metadata",
    ]
    for stage in data["stages"]:
        assert list(stage)[:6] == [
            "stage",
            "status",
            "attempt",
            "duration_seconds",
            "timestamp",
            "details",
        ]
        assert ("error" in stage) == (stage["status"] in ("retrying", "failed"))
    assert data["started_at"] == "2024-01-15T10:30:00.000Z"
    assert all(s["timestamp"].endswith("Z") for s in data["stages"])


def test_stage_records_reproduce_the_documents_retry_shape(tmp_path: Path) -> None:
    record(TelemetryCollector(tmp_path), doc_example_run().events)
    stages = session_file(tmp_path)["stages"]
    search = [s for s in stages if s["stage"] == "search"]
    assert [(s["status"], s["attempt"]) for s in search] == [("retrying", 1), ("completed", 2)]
    assert search[0]["error"] == "Rate limit exceeded" and search[0]["duration_seconds"] == 5.2
    assert search[1]["details"] == {"sources_count": 48} and search[1]["duration_seconds"] == 8.1
    assert stages[0] == {
        "stage": "intent",
        "status": "completed",
        "attempt": 1,
        "duration_seconds": 2.3,
        "timestamp": "2024-01-15T10:30:02.300Z",
        "details": {"document_type": "research_paper", "field": "computer_science"},
    }
    assert [s["stage"] for s in stages if s["status"] == "completed"] == list(STAGES)


def test_workflow_totals_and_metadata(tmp_path: Path) -> None:
    run = doc_example_run()
    record(TelemetryCollector(tmp_path), run.events)
    data = session_file(tmp_path)
    assert data["total_retries"] == 1
    assert data["failed_stages"] == []
    assert data["success"] is True
    assert data["total_duration_seconds"] == pytest.approx(run.now - run.t0)
    meta = data["metadata"]
    assert meta["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert meta["parameters"]["max_results_per_query"] == 15
    assert meta["document_path"] == "paper.md"
    assert meta["format_version"] == 1 and meta["prowzi_version"]
    assert meta["parent_session_id"] is None and meta["resumed_from"] is None


def test_a_failed_run_records_the_failed_stage_and_error(tmp_path: Path) -> None:
    run = RunScript("s-fail").start().stage("intent", 1.0)
    run.retry("planning", 0.5, "flaky").fail_stage("planning", 0.5, "boom", attempt=2)
    run.failed("planning", "boom")
    record(TelemetryCollector(tmp_path), run.events)
    data = session_file(tmp_path, "s-fail")
    jsonschema.validate(data, SCHEMA)
    assert data["success"] is False and data["completed_at"] is not None
    assert data["failed_stages"] == ["planning"]
    assert data["stages"][-1]["status"] == "failed" and data["stages"][-1]["error"] == "boom"
    assert data["metadata"]["error"] == "boom"


# --- when files are written -------------------------------------------------------------


def test_the_session_file_is_written_at_stage_boundaries_not_per_event(tmp_path: Path) -> None:
    collector = TelemetryCollector(tmp_path, background=False)
    run = RunScript("s-bound").start()
    record(collector, run.events)
    path = tmp_path / "s-bound.json"
    first = path.read_bytes()
    collector.handle(StageStarted(session_id="s-bound", timestamp=run.now, stage="intent"))
    assert path.read_bytes() == first  # a start is not a boundary
    run.stage("intent", 1.0)
    collector.handle(run.events[-1])
    assert [s["status"] for s in session_file(tmp_path, "s-bound")["stages"]] == ["completed"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_background_snapshots_are_written_after_a_flush(tmp_path: Path) -> None:
    collector = TelemetryCollector(tmp_path)
    run = RunScript("s-bg").start().stage("intent", 1.0)
    record(collector, run.events)
    assert collector.flush(timeout=5)
    assert session_file(tmp_path, "s-bg")["stages"][0]["status"] == "completed"
    collector.close()


def test_the_event_log_has_each_event_as_soon_as_it_is_handled(tmp_path: Path) -> None:
    collector = TelemetryCollector(tmp_path)
    reader = None
    for event in doc_example_run().events:
        collector.handle(event)
        if reader is None:
            reader = collector.follow(DOC_SESSION)
        assert reader.poll() == [event]


def test_the_session_file_is_derivable_from_the_event_log(tmp_path: Path) -> None:
    collector = TelemetryCollector(tmp_path)
    record(collector, doc_example_run().events)
    original = session_file(tmp_path)
    (tmp_path / f"{DOC_SESSION}.json").write_text("{broken")
    rebuilt = collector.rebuild_session(DOC_SESSION)
    assert rebuilt.to_dict() == original
    assert session_file(tmp_path) == original


def test_load_session_derives_from_the_log_when_the_file_is_missing(tmp_path: Path) -> None:
    collector = TelemetryCollector(tmp_path)
    record(collector, doc_example_run().events)
    (tmp_path / f"{DOC_SESSION}.json").unlink()
    assert collector.load_session(DOC_SESSION).success is True


def _stopped_before_its_last_snapshot(directory: Path) -> dict[str, Any]:
    """A writer killed after logging the run's end, before writing the final session file:
    the file still holds the record as of the event before the end."""
    collector = TelemetryCollector(directory)
    record(collector, doc_example_run().events)
    final = session_file(directory)
    events = read_events(collector.event_log_path(DOC_SESSION))
    stale = SessionRecorder.from_events(DOC_SESSION, events[:-1]).metrics
    assert stale is not None and stale.status == "running"
    (directory / f"{DOC_SESSION}.json").write_bytes(orjson.dumps(stale.to_dict()))
    return final


def test_a_session_file_behind_a_log_that_ended_is_read_as_the_log_says(tmp_path: Path) -> None:
    final = _stopped_before_its_last_snapshot(tmp_path)
    stale = (tmp_path / f"{DOC_SESSION}.json").read_bytes()
    reader = TelemetryCollector(tmp_path)
    assert reader.load_session(DOC_SESSION).to_dict() == final
    (listed,) = reader.list_sessions()
    assert listed.status == "completed"
    # readers never write the session file (a live writer may be about to)
    assert (tmp_path / f"{DOC_SESSION}.json").read_bytes() == stale


@pytest.mark.parametrize("shape", ["a long failure message", "a header after the end"])
def test_the_end_of_a_log_is_found_whatever_its_last_lines(tmp_path: Path, shape: str) -> None:
    """The run's end is the last *event*, however long its line, and a writer that opened the
    log again (a resume killed before its first event) does not hide it."""
    run = RunScript("ending").start().stage("intent", 1.0)
    if shape == "a long failure message":
        run.fail_stage("planning", 1.0, "x" * 10_000).failed("planning", "y" * 10_000)
    else:
        run.stage("planning", 1.0).complete()
    collector = TelemetryCollector(tmp_path)
    record(collector, run.events)
    events = read_events(collector.event_log_path("ending"))
    stale = SessionRecorder.from_events("ending", events[:-1]).metrics
    assert stale is not None
    (tmp_path / "ending.json").write_bytes(orjson.dumps(stale.to_dict()))
    if shape == "a header after the end":
        EventLogWriter(collector.event_log_path("ending")).close()
    expected = "failed" if shape == "a long failure message" else "completed"
    reader = TelemetryCollector(tmp_path)
    assert reader.load_session("ending").status == expected
    assert [row.status for row in reader.list_sessions()] == [expected]


def test_a_listing_does_not_trust_an_indexed_running_row_whose_log_ended(
    tmp_path: Path,
) -> None:
    _stopped_before_its_last_snapshot(tmp_path)
    path = tmp_path / f"{DOC_SESSION}.json"
    stale = WorkflowMetrics.from_dict(json.loads(path.read_text()))
    reader = TelemetryCollector(tmp_path)
    assert [row.status for row in reader.list_sessions()] == ["completed"]
    # the index has the file's row as the file says it: running, with the file's signature
    ((started, sid, indexed, _),) = reader._session_index().rows().values()
    assert (sid, indexed, started) == (DOC_SESSION, "running", stale.started_at.timestamp())
    (listed,) = TelemetryCollector(tmp_path).list_sessions()
    assert listed.status == "completed" and listed.stages_completed == 7


def test_a_log_whose_writer_stopped_before_its_first_event_is_no_session_yet(
    tmp_path: Path,
) -> None:
    collector = TelemetryCollector(tmp_path)
    path = collector.event_log_path("early")
    path.parent.mkdir(parents=True)
    EventLogWriter(path).close()  # opened (a header line), killed before any event
    with pytest.raises(SessionNotFoundError, match="no telemetry for session 'early'"):
        collector.load_session("early")


def test_a_run_killed_mid_stage_stays_running(tmp_path: Path) -> None:
    """Only a log that ended is taken as the end: a run killed before it stays running."""
    collector = TelemetryCollector(tmp_path)
    record(collector, doc_example_run().events[:-1])
    collector.flush()
    del collector  # the writer is gone; its log ends mid-run
    assert TelemetryCollector(tmp_path).load_session(DOC_SESSION).status == "running"


def test_a_resumed_session_continues_its_record(tmp_path: Path) -> None:
    run = RunScript("s-resume").start().stage("intent", 1.0)
    run.fail_stage("planning", 1.0, "down").failed("planning", "down")
    record(TelemetryCollector(tmp_path), run.events)
    again = RunScript("s-resume", t0=run.now + 60).start().skip("intent")
    again.stage("planning", 2.0).complete()
    record(TelemetryCollector(tmp_path), again.events)
    data = session_file(tmp_path, "s-resume")
    assert data["success"] is True and data["failed_stages"] == []
    assert data["metadata"]["runs"] == 2
    assert [s["status"] for s in data["stages"]] == ["completed", "failed", "skipped", "completed"]
    assert data["total_duration_seconds"] == pytest.approx(2.0 + 2.0)


@pytest.mark.parametrize("value", ["soon", 1e20, -1e20, [1]])
def test_a_resume_skips_a_mistyped_line_and_records_its_events(
    tmp_path: Path, value: object
) -> None:
    """Issue 15 item 5: a log line whose fields have the wrong type is skipped, as a line
    that is not JSON is, and the resumed run's events are all recorded."""
    run = RunScript("s-typo").start().stage("intent", 1.0)
    run.fail_stage("planning", 1.0, "down").failed("planning", "down")
    record(TelemetryCollector(tmp_path), run.events)
    log = tmp_path / "events" / "s-typo.jsonl"
    lines = log.read_text().splitlines()
    bad = json.loads(lines[2])  # the intent stage's start
    bad["timestamp"] = value
    lines[2] = json.dumps(bad)
    log.write_text("\n".join(lines) + "\n")
    again = RunScript("s-typo", t0=run.now + 60).start().skip("intent")
    again.stage("planning", 2.0).complete()
    collector = TelemetryCollector(tmp_path)
    record(collector, again.events)
    assert collector.errors == 0
    data = session_file(tmp_path, "s-typo")
    assert data["success"] is True and data["metadata"]["runs"] == 2
    assert [s["status"] for s in data["stages"]][-2:] == ["skipped", "completed"]
    with pytest.raises(TelemetryError, match="line 3 is not a valid event: 'timestamp'"):
        read_events(log)
    assert TelemetryCollector(tmp_path).load_session("s-typo").success is True


def test_a_second_writer_of_the_same_session_stays_passive(tmp_path: Path) -> None:
    first = TelemetryCollector(tmp_path)
    second = TelemetryCollector(tmp_path)
    for event in doc_example_run().events:
        first.handle(event)
        second.handle(event)
    events = read_events(first.event_log_path(DOC_SESSION))
    assert len(events) == len(doc_example_run().events)
    assert first.errors == second.errors == 0


# --- the event log ------------------------------------------------------------------------


def test_a_follower_waits_for_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    writer = EventLogWriter(path)
    event = doc_example_run().events[0]
    line = json.dumps(event.as_record()).encode() + b"\n"
    reader = EventLogReader(path)
    assert reader.poll() == []  # only the header so far
    with open(path, "ab") as fh:
        fh.write(line[:20])
    assert reader.poll() == [] and reader.partial_bytes == 20
    with open(path, "ab") as fh:
        fh.write(line[20:])
    assert reader.poll() == [event]
    writer.close()


def test_a_log_read_in_chunks_of_bounded_size_gives_every_event_once(tmp_path: Path) -> None:
    """Issue 15 item 17: ``poll(max_bytes)`` reads at most that much; a line cut by a chunk's
    end (or longer than a chunk) is finished by the next polls; ``caught_up`` says when the
    end of the file was reached, and a partial last line is kept for later."""
    from prowzi.storage.files import read_nofollow

    path = tmp_path / "log.jsonl"
    events = doc_example_run().events
    lines = [json.dumps({"event": "log_opened", "v": 1})] + [
        json.dumps(e.as_record()) for e in events
    ]
    path.write_text("\n".join(lines) + "\n" + lines[2][:20])
    data = path.read_bytes()
    assert read_nofollow(path, 5, max_bytes=7) == data[5:12]
    assert read_nofollow(path, len(data) - 3, max_bytes=7) == data[-3:]
    with pytest.raises(ValueError, match="positive"):
        read_nofollow(path, max_bytes=0)
    longest = max(len(line) for line in lines)
    for chunk in (1, 7, 64, longest - 1, longest + 1, len(data) - 1, len(data), 1 << 20):
        reader = EventLogReader(path)
        seen: list[Event] = []
        polls = 0
        while True:
            seen += reader.poll(chunk)
            polls += 1
            if reader.caught_up:
                break
        assert seen == events, chunk
        assert reader.partial_bytes == 20, chunk
        assert reader.line_no == len(lines), chunk
        assert polls >= len(data) // chunk, chunk
    with open(path, "a") as fh:
        fh.write(lines[2][20:] + "\n")  # the partial line finished
    assert reader.poll(1 << 20) == [events[1]] and reader.partial_bytes == 0


def test_a_corrupt_line_is_reported_with_its_number(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"event": "log_opened", "v": 1}\nnot json\n')
    with pytest.raises(TelemetryError, match="line 2 is not JSON"):
        EventLogReader(path).poll()


def test_a_truncated_last_line_is_corrupt_for_a_finished_log(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"event": "log_opened", "v": 1}\n{"event": "workflow_sta')
    with pytest.raises(TelemetryError, match="line 2 is truncated"):
        read_events(path)


def test_a_log_from_a_newer_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"event": "log_opened", "v": 99}\n')
    with pytest.raises(TelemetryError, match="newer Prowzi"):
        read_events(path)


def test_a_log_header_keeps_its_typed_fields_and_needs_an_integer_version(
    tmp_path: Path,
) -> None:
    """A header's fields of the wrong type are None (the rest still says who wrote the
    log); a header without an integer version (a boolean is not one) is corrupt."""
    path = tmp_path / "log.jsonl"
    started = doc_example_run().events[0]
    header = {"event": "log_opened", "v": 1, "pid": "x", "host": "h", "timestamp": "soon"}
    path.write_text(json.dumps(header) + "\n" + json.dumps(started.as_record()) + "\n")
    reader = EventLogReader(path)
    assert reader.read_all() == [started]
    (parsed,) = reader.headers
    assert (parsed.version, parsed.pid, parsed.host, parsed.timestamp) == (1, None, "h", None)
    for version in ("true", '"1"', "null"):
        path.write_text(f'{{"event": "log_opened", "v": {version}}}\n')
        with pytest.raises(TelemetryError, match="line 1 is a log header without a version"):
            read_events(path)


def test_a_writer_cuts_a_partial_line_left_by_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    EventLogWriter(path).close()
    with open(path, "ab") as fh:
        fh.write(b'{"event": "stage_sta')
    writer = EventLogWriter(path)
    writer.append_event(doc_example_run().events[0])
    writer.close()
    assert read_events(path) == [doc_example_run().events[0]]


def test_unknown_event_kinds_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    started = doc_example_run().events[0]
    path.write_text(
        '{"event": "log_opened", "v": 1}\n{"event": "stage_progress", "x": 1}\n'
        + json.dumps(started.as_record())
        + "\n"
    )
    assert read_events(path) == [started]


# --- reading sessions ---------------------------------------------------------------------


def test_an_unknown_session_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(SessionNotFoundError, match="no telemetry for session 'nope'"):
        TelemetryCollector(tmp_path).load_session("nope")


def test_a_hostile_session_id_is_refused_before_any_path_is_built(tmp_path: Path) -> None:
    collector = TelemetryCollector(tmp_path / "t")
    with pytest.raises(InvalidInputError):
        collector.load_session("../../etc/passwd")
    event = WorkflowStarted(session_id="../escape", timestamp=0.0, prompt="x")
    collector.handle(event)
    assert collector.errors == 1
    assert not (tmp_path / "escape.json").exists() and not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"session_id": "bad", "prompt": ', "truncated JSON"),
        ("hello", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"session_id": "bad"}', "'stages' is missing"),
    ],
)
def test_a_corrupt_session_file_is_a_clear_error(tmp_path: Path, content: str, reason: str) -> None:
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(CorruptSessionError, match=reason):
        TelemetryCollector(tmp_path).load_session("bad")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"started_at": "0001-01-01T00:00:00+14:00"}, "'started_at' is invalid: .* out of range"),
        ({"started_at": "2024-01-15T10:30:00"}, "'started_at' is invalid: .* no time zone"),
        ({"started_at": 1_700_000_000}, "'started_at' is invalid: .* not a string"),
        ({"total_retries": True}, "'total_retries' is invalid"),
        ({"total_duration_seconds": "1"}, "'total_duration_seconds' is invalid"),
        ({"failed_stages": [1]}, "'failed_stages.0' is invalid"),
        ({"metadata": []}, "'metadata' is invalid"),
    ],
)
def test_a_session_file_with_a_mistyped_field_is_corrupt_and_the_listing_goes_on(
    tmp_path: Path, change: dict[str, Any], reason: str
) -> None:
    """A field of the wrong type, or a time UTC cannot hold (issue 15 item 4), makes that
    session corrupt, with the field named; the other sessions still list."""
    _record_sessions(tmp_path, 2)
    path = tmp_path / "s000.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(CorruptSessionError, match=reason):
        TelemetryCollector(tmp_path).load_session("s000")
    listed = {s.session_id: s for s in TelemetryCollector(tmp_path).list_sessions()}
    assert listed["s000"].status == "corrupt" and listed["s001"].status == "completed"
    assert listed["s000"].error is not None and "is invalid" in listed["s000"].error


def test_a_session_file_from_a_newer_format_is_refused(tmp_path: Path) -> None:
    record(TelemetryCollector(tmp_path), doc_example_run().events)
    data = session_file(tmp_path)
    data["metadata"]["format_version"] = 7
    (tmp_path / f"{DOC_SESSION}.json").write_text(json.dumps(data))
    with pytest.raises(CorruptSessionError, match="newer Prowzi"):
        TelemetryCollector(tmp_path).load_session(DOC_SESSION)


def _record_sessions(directory: Path, count: int) -> None:
    collector = TelemetryCollector(directory, background=False, fsync=False)
    for i in range(count):
        run = RunScript(f"s{i:03d}", t0=1_700_000_000.0 + i * 100).start(prompt=f"topic {i}")
        run.stage("intent", 1.0)
        if i % 3 == 0:
            run.failed("planning", "down")
        elif i % 3 == 1:
            run.complete()
        record(collector, run.events)
    collector.close()


def test_list_sessions_is_newest_first_with_limit_and_status(tmp_path: Path) -> None:
    _record_sessions(tmp_path, 9)
    collector = TelemetryCollector(tmp_path)
    assert [s.session_id for s in collector.list_sessions(limit=3)] == ["s008", "s007", "s006"]
    assert {s.status for s in collector.list_sessions(limit=None)} == {
        "running",
        "completed",
        "failed",
    }
    failed = collector.list_sessions(limit=None, status="failed")
    assert [s.session_id for s in failed] == ["s006", "s003", "s000"]
    assert failed[0].failed_stages == ("planning",) and failed[0].stages_completed == 1
    with pytest.raises(InvalidInputError, match="unknown status"):
        collector.list_sessions(status="weird")


def test_list_sessions_marks_a_corrupt_file_and_lists_the_rest(tmp_path: Path) -> None:
    _record_sessions(tmp_path, 3)
    (tmp_path / "s001.json").write_text('{"session_id": "s001", "pro')
    rows = {s.session_id: s for s in TelemetryCollector(tmp_path).list_sessions(limit=None)}
    assert rows["s001"].status == "corrupt" and rows["s001"].error == "truncated JSON"
    assert rows["s000"].status == "failed" and rows["s002"].status == "running"


def test_the_index_is_a_cache_and_the_files_are_the_truth(tmp_path: Path) -> None:
    _record_sessions(tmp_path, 4)
    collector = TelemetryCollector(tmp_path)
    assert collector.list_sessions(limit=None)[1].status == "running"  # s002, per the index
    # the file changes behind the index's back: a rebuilt record, with another status
    run = RunScript("s002", t0=1_700_000_000.0 + 200).start().stage("intent", 1.0).complete()
    (tmp_path / "events" / "s002.jsonl").unlink()
    record(TelemetryCollector(tmp_path, background=False), run.events)
    rows = {s.session_id: s for s in collector.list_sessions(limit=None)}
    assert rows["s002"].status == "completed"
    # a garbled or missing index is rebuilt from the files
    collector.index_path.write_text("garbage\n{}\n")
    assert len(collector.list_sessions(limit=None)) == 4
    collector.index_path.unlink()
    assert len(collector.list_sessions(limit=None)) == 4
    (tmp_path / "s000.json").unlink()
    assert [s.session_id for s in collector.list_sessions(limit=None)] == ["s003", "s002", "s001"]


def test_list_sessions_on_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert TelemetryCollector(tmp_path / "nothing").list_sessions() == []


# --- telemetry never breaks a run ---------------------------------------------------------


def test_an_unwritable_directory_is_counted_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    collector = TelemetryCollector(blocker / "telemetry")
    record(collector, doc_example_run().events)
    assert collector.errors > 0
    assert collector.error_counts["event_log"] >= 1 and collector.error_counts["snapshot"] >= 1
    assert collector.last_error is not None


def test_a_full_disk_is_counted_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    collector = TelemetryCollector(tmp_path)
    monkeypatch.setattr(EventLogWriter, "append", full)
    monkeypatch.setattr(TelemetryCollector, "_atomic_write", full)
    record(collector, doc_example_run().events)
    assert collector.error_counts["event_log"] >= 1
    assert collector.error_counts["snapshot"] >= 1
    assert "No space left" in (collector.last_error or "")


def test_recording_recovers_when_the_disk_has_room_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prowzi.workflows import telemetry

    monkeypatch.setattr(telemetry, "_LOG_RETRY_SECONDS", 0.0)
    real_append = EventLogWriter.append
    full = {"on": True}

    def append(self: EventLogWriter, record: dict[str, Any]) -> None:
        if full["on"] and record.get("event") != "log_opened":
            with open(self.path, "ab") as fh:
                fh.write(b'{"event": "stage_')  # a write cut short by ENOSPC
            raise OSError(28, "No space left on device")
        real_append(self, record)

    monkeypatch.setattr(EventLogWriter, "append", append)
    collector = TelemetryCollector(tmp_path, background=False)
    events = doc_example_run().events
    record(collector, events[:3])
    full["on"] = False
    record(collector, events[3:])
    assert collector.error_counts["event_log"] == 3
    assert collector.load_session(DOC_SESSION).success is True
    assert read_events(collector.event_log_path(DOC_SESSION)) == events[3:]


def test_a_bus_with_failing_telemetry_still_delivers_every_event(tmp_path: Path) -> None:
    class Raising:
        name = "raising"

        def handle(self, event: Event) -> None:
            raise RuntimeError("sink bug")

    blocker = tmp_path / "file"
    blocker.write_text("x")
    broken = TelemetryCollector(blocker)
    good = TelemetryCollector(tmp_path / "good")
    bus = EventBus([Raising(), broken, good])
    events = doc_example_run().events

    async def emit_all() -> None:
        for event in events:
            await bus.emit(event)

    asyncio.run(emit_all())
    assert bus.errors == {"raising": len(events)}
    assert broken.errors > 0
    assert good.load_session(DOC_SESSION).success is True


def test_the_collector_is_an_event_sink_named_telemetry(tmp_path: Path) -> None:
    from prowzi.events import EventSink

    collector = TelemetryCollector(tmp_path)
    assert isinstance(collector, EventSink) and collector.name == "telemetry"


def test_no_temporary_files_are_left_behind(tmp_path: Path) -> None:
    from prowzi.storage.files import TEMP_PREFIX

    directory = tmp_path / "telemetry"
    _record_sessions(directory, 3)
    leftovers = [
        p for p in directory.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(TEMP_PREFIX)
    ]
    assert leftovers == []
    TelemetryCollector(directory).list_sessions()  # the index is kept out of the directory
    assert sorted(os.listdir(directory)) == [
        "events",
        "s000.json",
        "s001.json",
        "s002.json",
    ]


def test_snapshots_owed_at_exit_are_written(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from telemetry_events import RunScript\n"
        "from prowzi.workflows.telemetry import TelemetryCollector\n"
        f"collector = TelemetryCollector(Path({str(tmp_path)!r}))\n"
        "for event in RunScript('exiting').start().stage('intent', 1.0).events:\n"
        "    collector.handle(event)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
    data = session_file(tmp_path, "exiting")
    assert [s["status"] for s in data["stages"]] == ["completed"]
    assert data["completed_at"] is None


def test_a_limited_listing_checks_the_rows_it_returns(tmp_path: Path) -> None:
    _record_sessions(tmp_path, 30)
    collector = TelemetryCollector(tmp_path)
    collector.list_sessions(limit=None)
    (tmp_path / "s029.json").write_text("garbage")  # changed in place, after indexing
    (tmp_path / "s000.json").write_text("garbage")
    top = collector.list_sessions(limit=3)
    assert top[0].session_id == "s029" and top[0].status == "corrupt"
    assert [s.session_id for s in top[1:]] == ["s028", "s027"]
    everything = {s.session_id: s.status for s in collector.list_sessions(limit=None)}
    assert everything["s000"] == "corrupt" and len(everything) == 30
    corrupt = collector.list_sessions(limit=5, status="corrupt")
    assert {s.session_id for s in corrupt} == {"s000", "s029"}


def test_a_writer_is_gone_when_its_process_is_dead_reused_a_zombie_or_from_another_boot() -> None:
    import socket
    import time

    from prowzi.workflows.eventlog import LogHeader, _process_identity, writer_gone

    here = socket.gethostname()
    now = time.time()
    me = _process_identity()
    assert {"boot", "start_ticks", "pidns"} <= me.keys()

    def header(pid: int, host: str = here, **identity: object) -> LogHeader:
        fields = {
            "boot_id": me["boot"],
            "start_ticks": me["start_ticks"],
            "pid_namespace": me["pidns"],
        }
        fields.update(identity)
        return LogHeader(1, pid, host, now, **fields)  # type: ignore[arg-type]

    assert writer_gone(header(os.getpid())) is None  # this very process: alive
    # the same pid with another start instant: the pid was reused
    assert writer_gone(header(os.getpid(), start_ticks=me["start_ticks"] - 1)) is not None
    # the machine restarted since the log was opened
    assert writer_gone(header(os.getpid(), boot_id="another-boot")) is not None
    # a header from before these fields: judged by the pid alone
    assert writer_gone(LogHeader(1, os.getpid(), here, now - 86_400)) is None
    # where this process cannot see the writer, it is assumed alive
    assert writer_gone(header(os.getpid(), pid_namespace=me["pidns"] + 1)) is None
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert writer_gone(header(int(dead.stdout), host="another-host")) is None
    assert "ended without finishing" in (writer_gone(header(int(dead.stdout))) or "")
    # killed but not reaped: a zombie cannot finish anything either
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = Path(f"/proc/{zombie.pid}/stat")
    deadline = time.monotonic() + 30
    while stat.read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ticks = int(stat.read_bytes().rsplit(b")", 1)[1].split()[19])
    assert writer_gone(header(zombie.pid, start_ticks=ticks)) is not None
    zombie.wait()


def _dead_writer_appends(log: Path, event: Event) -> None:
    """A writer (another process) opens the log, appends ``event`` and is gone."""
    script = (
        "import sys, orjson\n"
        "from pathlib import Path\n"
        "from prowzi.workflows.eventlog import EventLogWriter\n"
        "from prowzi.events import event_from_record\n"
        "writer = EventLogWriter(Path(sys.argv[1]))\n"
        "writer.append_event(event_from_record(orjson.loads(sys.argv[2])))\n"
    )
    record = orjson.dumps(event.as_record(), default=str).decode()
    subprocess.run([sys.executable, "-c", script, str(log), record], check=True)


def test_a_resume_killed_after_a_log_ended_is_reported_from_the_log_not_a_cache(
    tmp_path: Path,
) -> None:
    _stopped_before_its_last_snapshot(tmp_path)
    reader = TelemetryCollector(tmp_path)
    assert [row.status for row in reader.list_sessions()] == ["completed"]
    log = reader.event_log_path(DOC_SESSION)
    again = RunScript(DOC_SESSION, t0=2_000_000_000.0).start()
    _dead_writer_appends(log, again.events[0])  # a resume, killed before its first snapshot
    assert [row.status for row in TelemetryCollector(tmp_path).list_sessions()] == ["interrupted"]
    loaded = TelemetryCollector(tmp_path).load_session(DOC_SESSION)
    assert TelemetryCollector(tmp_path).status_of(loaded) == "interrupted"


def test_an_unreadable_newest_header_leaves_the_writer_unknown(tmp_path: Path) -> None:
    """Only the newest writer counts: if its header cannot be read (a newer Prowzi), an
    older writer's death says nothing about it."""
    collector = TelemetryCollector(tmp_path)
    log = collector.event_log_path("newer")
    log.parent.mkdir(parents=True)
    run = RunScript("newer").start().stage("intent", 1.0)
    _dead_writer_appends(log, run.events[0])
    with log.open("ab") as handle:
        handle.write(b'{"event":"log_opened","v":99,"pid":1,"host":"x"}\n')
    (tmp_path / "newer.json").write_bytes(
        orjson.dumps(SessionRecorder.from_events("newer", run.events[:1]).metrics.to_dict())  # type: ignore[union-attr]
    )
    assert [row.status for row in TelemetryCollector(tmp_path).list_sessions()] == ["running"]


# --- files: one atomic-write helper, one permission policy, no symlinks followed --------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_session_files_and_event_logs_are_shared_files_narrowed_by_the_umask(
    tmp_path: Path, umask: int
) -> None:
    """Telemetry is read by other tools: created 0o666, narrowed by the umask (like any
    program's output), unlike the checkpoint store's private 0o600 files."""
    from prowzi.storage.files import SHARED_FILE

    previous = os.umask(umask)
    try:
        collector = TelemetryCollector(tmp_path, background=False)
        record(collector, doc_example_run().events)
        collector.rebuild_session(DOC_SESSION)
    finally:
        os.umask(previous)
    expected = SHARED_FILE & ~umask
    assert (tmp_path / f"{DOC_SESSION}.json").stat().st_mode & 0o777 == expected
    assert collector.event_log_path(DOC_SESSION).stat().st_mode & 0o777 == expected


def test_session_files_are_written_through_the_one_atomic_write_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prowzi.storage import files

    written: list[tuple[str, int, bool]] = []
    real = files.atomic_write

    def spy(path: Path, data: bytes, **kwargs: Any) -> os.stat_result:
        written.append((path.name, kwargs["mode"], kwargs["durable"]))
        return real(path, data, **kwargs)

    monkeypatch.setattr(telemetry, "atomic_write", spy)
    record(TelemetryCollector(tmp_path, background=False), doc_example_run().events)
    assert written and {w[0] for w in written} == {f"{DOC_SESSION}.json"}
    assert {(w[1], w[2]) for w in written} == {(files.SHARED_FILE, True)}
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(files.TEMP_PREFIX)]


@pytest.mark.parametrize("target", ["an existing file", "a missing file"])
def test_a_symlink_planted_as_an_event_log_is_refused_never_followed(
    tmp_path: Path, target: str
) -> None:
    telemetry_dir = tmp_path / "telemetry"
    victim = tmp_path / "victim"
    if target == "an existing file":
        victim.write_bytes(b"precious\n")
    collector = TelemetryCollector(telemetry_dir, background=False)
    log = collector.event_log_path(DOC_SESSION)
    log.parent.mkdir(parents=True)
    log.symlink_to(victim)
    record(collector, doc_example_run().events)
    # never appended to, never created through the link
    if target == "an existing file":
        assert victim.read_bytes() == b"precious\n"
    else:
        assert not victim.exists()
    assert log.is_symlink()
    assert collector.error_counts["event_log"] >= 1
    assert "Too many levels of symbolic links" in (collector.last_error or "")
    # the run is still recorded in its session file, and readers do not follow the link
    assert session_file(telemetry_dir)["success"] is True
    reader = TelemetryCollector(telemetry_dir)
    assert reader.load_session(DOC_SESSION).success is True
    with pytest.raises(TelemetryError, match="cannot read event log"):
        reader.read_events(DOC_SESSION)
    with pytest.raises(TelemetryError, match="cannot read event log"):
        reader.follow(DOC_SESSION).poll()


def test_a_symlink_planted_as_a_session_file_is_read_as_corrupt_never_followed(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim.json"
    victim.write_bytes(orjson.dumps(DOC_JSON_EXAMPLE))
    telemetry_dir = tmp_path / "telemetry"
    telemetry_dir.mkdir()
    (telemetry_dir / "abc123-def456.json").symlink_to(victim)
    reader = TelemetryCollector(telemetry_dir)
    with pytest.raises(TelemetryError, match="cannot read session file"):
        reader.load_session("abc123-def456")
    (row,) = reader.list_sessions()
    assert row.status == "corrupt" and "symbolic link" in (row.error or "")
    # a writer replaces the link (the rename does not follow it) and the victim is untouched
    record(TelemetryCollector(telemetry_dir, background=False), doc_example_run().events)
    assert victim.read_bytes() == orjson.dumps(DOC_JSON_EXAMPLE)
    assert not (telemetry_dir / f"{DOC_SESSION}.json").is_symlink()


def test_a_symlink_planted_as_the_session_index_is_never_written_through(
    tmp_path: Path,
) -> None:
    _record_sessions(tmp_path / "telemetry", 3)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    collector = TelemetryCollector(tmp_path / "telemetry")
    collector.index_path.parent.mkdir(parents=True, exist_ok=True)
    collector.index_path.unlink(missing_ok=True)
    collector.index_path.symlink_to(victim)
    legacy = tmp_path / "telemetry" / ".session-index"  # where the index used to be
    legacy.symlink_to(victim)
    for _ in range(2):
        assert [s.session_id for s in collector.list_sessions()] == ["s002", "s001", "s000"]
    assert victim.read_bytes() == b"precious\n"
    assert not collector.index_path.is_symlink()  # replaced by an index of its own
    assert TelemetryCollector(tmp_path / "telemetry").list_sessions()[0].session_id == "s002"
    assert victim.read_bytes() == b"precious\n" and legacy.is_symlink()


# --- the session index: a SQLite catalog derived from the session files -------------------------


def _reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The session files a listing reads (by name)."""
    read: list[str] = []
    real = telemetry._read_regular

    def spy(path: Path) -> tuple[bytes, os.stat_result]:
        read.append(path.name)
        return real(path)

    monkeypatch.setattr(telemetry, "_read_regular", spy)
    return read


def test_the_session_index_is_a_sqlite_catalog_in_the_cache_directory(tmp_path: Path) -> None:
    import sqlite3

    directory = tmp_path / "telemetry"
    _record_sessions(directory, 3)
    collector = TelemetryCollector(directory)
    collector.list_sessions()
    path = collector.index_path
    assert path.is_relative_to(tmp_path / ".cache" / "prowzi" / "catalog")  # $XDG_CACHE_HOME
    assert path.read_bytes().startswith(b"SQLite format 3\x00")
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT session_id, status FROM sessions ORDER BY 1").fetchall()
    assert rows == [("s000", "failed"), ("s001", "completed"), ("s002", "running")]
    # one index per telemetry directory
    assert TelemetryCollector(tmp_path / "other").index_path != path


def test_a_listing_reads_only_the_session_files_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _record_sessions(tmp_path / "t", 5)
    read = _reads(monkeypatch)
    first = TelemetryCollector(tmp_path / "t").list_sessions()
    assert len(first) == 5 and sorted(read) == [f"s00{i}.json" for i in range(5)]
    read.clear()
    # another process (a fresh collector) lists from the index without reading any file
    assert TelemetryCollector(tmp_path / "t").list_sessions(limit=None) == first
    assert read == []
    # a session written again (a resume) is read again, and only it
    run = RunScript("s003", t0=1_700_000_000.0 + 300).start().stage("intent", 1.0).complete()
    (tmp_path / "t" / "events" / "s003.jsonl").unlink()
    record(TelemetryCollector(tmp_path / "t", background=False), run.events)
    rows = {s.session_id: s.status for s in TelemetryCollector(tmp_path / "t").list_sessions()}
    assert read == ["s003.json"] and rows["s003"] == "completed"


@pytest.mark.parametrize(
    "damage", ["garbage", "truncated", "another schema", "a foreign table", "deleted"]
)
def test_a_lost_or_damaged_session_index_is_rebuilt_from_the_files(
    tmp_path: Path, damage: str
) -> None:
    import sqlite3

    _record_sessions(tmp_path / "t", 4)
    listed = TelemetryCollector(tmp_path / "t").list_sessions()
    expected = [(s.session_id, s.status) for s in listed]
    path = TelemetryCollector(tmp_path / "t").index_path
    if damage == "garbage":
        path.write_bytes(b"garbage\n{}\n" * 100)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "another schema":
        with sqlite3.connect(path) as db:
            db.execute("DROP TABLE sessions")
            db.execute("CREATE TABLE sessions (x)")
            db.execute("PRAGMA user_version=99")
    elif damage == "a foreign table":  # the schema's version, another table under its name
        with sqlite3.connect(path) as db:
            db.execute("DROP TABLE sessions")
            db.execute("CREATE TABLE sessions (x)")
    else:
        path.unlink()
    reader = TelemetryCollector(tmp_path / "t")
    assert [(s.session_id, s.status) for s in reader.list_sessions()] == expected
    reader._session_index().close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM sessions").fetchone() == (4,)


def test_a_forged_session_index_is_not_trusted(tmp_path: Path) -> None:
    """A row is used only while its file's signature matches it; rows of sessions without a
    file are dropped; the index never says which sessions exist."""
    import sqlite3

    _record_sessions(tmp_path / "t", 3)
    collector = TelemetryCollector(tmp_path / "t")
    collector.list_sessions()
    collector._session_index().close()
    with sqlite3.connect(collector.index_path) as db:
        # a forged summary under a signature no file has
        db.execute(
            "UPDATE sessions SET status = 'completed', signature = 'f1.2.3', "
            "summary = '{\"prompt\": \"forged\"}' WHERE session_id = 's002'"
        )
        # a phantom session
        db.execute(
            "INSERT INTO sessions VALUES ('ghost', 2000000000.0, 'completed', 'f1.1.1', '{}')"
        )
    rows = {s.session_id: s for s in TelemetryCollector(tmp_path / "t").list_sessions()}
    assert set(rows) == {"s000", "s001", "s002"}
    assert rows["s002"].status == "running" and rows["s002"].prompt == "topic 2"
    with sqlite3.connect(collector.index_path) as db:
        assert db.execute("SELECT session_id FROM sessions ORDER BY 1").fetchall() == [
            ("s000",),
            ("s001",),
            ("s002",),
        ]


@pytest.mark.parametrize(
    "change",
    [
        # a summary is a JSON blob (a text one is not even read)
        """summary = CAST('{"done": "seven", "failed": "planning"}' AS BLOB)""",
        """summary = CAST('{"retries": true}' AS BLOB)""",
        "summary = CAST('[1]' AS BLOB)",
        "status = 'weird'",
        "started = 1e20",
    ],
)
def test_an_index_row_of_the_wrong_types_is_read_again_from_its_file(
    tmp_path: Path, change: str
) -> None:
    """An index entry is validated (strict types, a status readers report, a time a date can
    hold) even under a signature that matches its file: a bad one is read again from the
    file, never shown and never a traceback."""
    import sqlite3

    _record_sessions(tmp_path / "t", 3)
    collector = TelemetryCollector(tmp_path / "t")
    expected = [s.to_dict() for s in collector.list_sessions()]
    collector._session_index().close()
    with sqlite3.connect(collector.index_path) as db:
        db.execute(f"UPDATE sessions SET {change} WHERE session_id = 's001'")
    listed = TelemetryCollector(tmp_path / "t").list_sessions()
    assert [s.to_dict() for s in listed if s.session_id != "s001"] == [
        e for e in expected if e["session_id"] != "s001"
    ]
    (row,) = [s for s in listed if s.session_id == "s001"]
    if change.startswith("summary"):
        assert row.to_dict() == next(e for e in expected if e["session_id"] == "s001")
    else:  # the columns a row is selected by are the index's; the rest is the file's
        assert (row.status, row.stages_completed, row.prompt) == ("completed", 1, "topic 1")


def test_an_unwritable_cache_directory_still_lists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _record_sessions(tmp_path / "t", 3)
    (tmp_path / "not-a-directory").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-directory"))
    collector = TelemetryCollector(tmp_path / "t")
    for _ in range(2):  # kept in memory for the process
        assert [s.session_id for s in collector.list_sessions()] == ["s002", "s001", "s000"]

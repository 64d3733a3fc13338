"""The run manager in process, on a fake orchestrator: slots, queue, cancellation at any
moment, shutdown, the journal, recovery and bounded memory."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry

from prowzi.errors import CheckpointNotFoundError, SessionLockedError
from prowzi.events import EventSink, WorkflowCompleted, WorkflowStarted
from prowzi.observability.metrics import ProwziMetrics
from prowzi.service import runs
from prowzi.service.journal import JournalUnreadableError, RunJournal
from prowzi.service.runs import QueueFullError, RunConflictError, RunManager, SessionBusyError


class Plan:
    def __init__(self, complete: bool) -> None:
        self.complete = complete


class FakeLeases:
    """The checkpoint manager's lease view: ``held`` maps a session to its holder."""

    def __init__(self) -> None:
        self.held: dict[str, str] = {}

    def lock_holder(self, session_id: str) -> str | None:
        return self.held.get(session_id)


class FakeOrchestrator:
    """Emits a start and an end event around ``delay`` seconds; checkpoints are a set;
    a run or resume of a session in ``checkpoint_manager.held`` cannot take its lease."""

    def __init__(self, sink: EventSink, delay: float = 0.05) -> None:
        self.sink = sink
        self.delay = delay
        self.checkpointed: set[str] = set()
        self.complete: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.checkpoint_manager = FakeLeases()

    async def run_research(
        self,
        prompt: str,
        *,
        max_results_per_query: int,
        session_id: str,
        document_path: Path | None = None,
    ) -> None:
        self.calls.append(("run", session_id))
        await self._run(session_id, prompt)

    async def resume_from_checkpoint(
        self, session_id: str, document_path: Path | None = None
    ) -> None:
        self.calls.append(("resume", session_id))
        await self._run(session_id, "from checkpoint")

    def plan_resume(self, session_id: str) -> Plan:
        if session_id not in self.checkpointed:
            raise CheckpointNotFoundError(session_id)
        return Plan(session_id in self.complete)

    async def _run(self, session_id: str, prompt: str) -> None:
        holder = self.checkpoint_manager.held.get(session_id)
        if holder is not None:
            raise SessionLockedError(f"session {session_id} is locked by {holder}")
        self.sink.handle(
            WorkflowStarted(
                session_id=session_id,
                timestamp=time.time(),
                prompt=prompt,
                parameters={"max_results_per_query": 7},
                trace_id="ab" * 16,
            )
        )
        await asyncio.sleep(self.delay)
        self.checkpointed.add(session_id)
        self.complete.add(session_id)
        self.sink.handle(
            WorkflowCompleted(session_id=session_id, timestamp=time.time(), duration_seconds=0)
        )


def manager(
    tmp_path: Path, *, delay: float = 0.05, **kwargs: Any
) -> tuple[RunManager, list[FakeOrchestrator], CollectorRegistry]:
    registry = CollectorRegistry()
    made: list[FakeOrchestrator] = []

    def factory(sink: EventSink) -> Any:
        made.append(FakeOrchestrator(sink, delay))
        return made[-1]

    mgr = RunManager(
        cast("Any", factory),
        RunJournal(tmp_path / "state", fsync=False),
        ProwziMetrics(registry),
        **kwargs,
    )
    return mgr, made, registry


async def started(
    tmp_path: Path, **kwargs: Any
) -> tuple[RunManager, list[FakeOrchestrator], CollectorRegistry]:
    """A :func:`manager` started without resuming interrupted runs."""
    mgr, made, registry = manager(tmp_path, **kwargs)
    await mgr.start(resume_interrupted=False)
    return mgr, made, registry


async def settle(mgr: RunManager) -> None:
    while (
        mgr.active
        or mgr.queue_depth
        or any(r.task is not None and not r.task.done() for r in mgr.records.values())
    ):
        await asyncio.sleep(0.01)


def test_runs_beyond_the_slots_wait_and_beyond_the_queue_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        mgr, _, registry = await started(tmp_path, max_concurrent=1, max_queue=1)
        first = mgr.submit("s1", "p", 15)
        second = mgr.submit("s2", "p", 15)
        assert (first.state, second.state) == ("running", "queued")
        assert registry.get_sample_value("prowzi_service_queue_depth") == 1
        assert registry.get_sample_value("prowzi_service_active_runs") == 1
        with pytest.raises(QueueFullError):
            mgr.submit("s3", "p", 15)
        with pytest.raises(RunConflictError):
            mgr.submit("s1", "p", 15)
        await settle(mgr)
        assert (first.state, second.state) == ("completed", "completed")
        assert registry.get_sample_value("prowzi_service_queue_depth") == 0
        assert registry.get_sample_value("prowzi_service_active_runs") == 0
        assert first.trace_id == "ab" * 16

    asyncio.run(main())


def test_a_run_cancelled_before_its_task_ran_is_cancelled_and_frees_its_slot(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        mgr, _, _ = await started(tmp_path, max_concurrent=1)
        record = mgr.submit("s1", "p", 15)
        mgr.cancel("s1")  # the task exists but has not run a single step
        await settle(mgr)
        assert record.state == "cancelled"
        assert mgr.active == 0
        assert mgr.submit("s2", "p", 15).state == "running"
        await settle(mgr)

    asyncio.run(main())


def test_shutdown_interrupts_running_and_queued_runs_and_a_restart_recovers_them(
    tmp_path: Path,
) -> None:
    async def first_life() -> None:
        mgr, _, _ = await started(tmp_path, delay=5, max_concurrent=1)
        running = mgr.submit("s1", "alpha", 15)
        queued = mgr.submit("s2", "beta", 3)
        await asyncio.sleep(0.05)
        await mgr.close()
        assert (running.state, queued.state) == ("interrupted", "interrupted")
        assert not mgr.accepting
        with pytest.raises(runs.ServiceUnavailableError):
            mgr.submit("s3", "p", 15)

    async def second_life() -> None:
        mgr, made, _ = manager(tmp_path, delay=0.01)
        made_orchestrator = mgr.orchestrator
        cast("FakeOrchestrator", made_orchestrator).checkpointed.add("s1")
        interrupted = await mgr.start(resume_interrupted=True)
        assert sorted(interrupted) == ["s1", "s2"]
        await settle(mgr)
        # s1 had a checkpoint: resumed; s2 never started: run again with its parameters.
        assert sorted(made[0].calls) == [("resume", "s1"), ("run", "s2")]
        assert mgr.records["s1"].state == mgr.records["s2"].state == "completed"
        assert mgr.records["s2"].entry.prompt == "beta"

    asyncio.run(first_life())
    asyncio.run(second_life())


def test_follow_replays_then_streams_until_the_run_ends(tmp_path: Path) -> None:
    async def main() -> None:
        mgr, _, _ = await started(tmp_path, delay=0.2)
        record = mgr.submit("s1", "p", 15)
        await asyncio.sleep(0.05)
        seen = [item async for item in mgr.follow(record)]
        assert [item[1] for item in seen] == ["workflow_started", "workflow_completed"]
        assert [item[0] for item in seen] == [1, 2]
        again = [item async for item in mgr.follow(record, after=1)]
        assert [item[1] for item in again] == ["workflow_completed"]

    asyncio.run(main())


def test_finished_runs_beyond_the_limit_leave_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runs, "FINISHED_KEPT", 3)

    async def main() -> None:
        mgr, _, _ = await started(tmp_path, delay=0, max_concurrent=1, max_queue=100)
        for i in range(10):
            mgr.submit(f"s{i}", "p", 15)
        await settle(mgr)
        assert sorted(mgr.records) == ["s7", "s8", "s9"]

    asyncio.run(main())


def test_a_recovered_run_that_had_completed_its_stages_is_resumed_to_say_so(
    tmp_path: Path,
) -> None:
    """Killed after its last checkpoint but before it said so: a restart resumes it (nothing
    runs), so its record ends completed rather than stopping at the journal."""

    async def first_life() -> None:
        mgr, _, _ = await started(tmp_path, delay=5, max_concurrent=1)
        mgr.submit("done-but-unsaid", "alpha", 15)
        await asyncio.sleep(0.05)
        await mgr.close()

    async def second_life() -> None:
        mgr, made, _ = manager(tmp_path, delay=0.01)
        fake = cast("FakeOrchestrator", mgr.orchestrator)
        fake.checkpointed.add("done-but-unsaid")
        fake.complete.add("done-but-unsaid")
        await mgr.start(resume_interrupted=True)
        await settle(mgr)
        assert made[0].calls == [("resume", "done-but-unsaid")]
        assert mgr.records["done-but-unsaid"].state == "completed"
        await mgr.close()

    asyncio.run(first_life())
    asyncio.run(second_life())


def test_resume_refuses_live_and_complete_sessions(tmp_path: Path) -> None:
    async def main() -> None:
        mgr, _, _ = await started(tmp_path, delay=0.2)
        mgr.submit("s1", "p", 15)
        with pytest.raises(RunConflictError, match="running"):
            await mgr.resume("s1")
        await settle(mgr)
        with pytest.raises(RunConflictError, match="complete"):
            await mgr.resume("s1")
        with pytest.raises(CheckpointNotFoundError):
            await mgr.resume("unknown")

    asyncio.run(main())


def test_a_run_interrupted_while_queued_is_run_again_from_the_start_when_resumed(
    tmp_path: Path,
) -> None:
    """Issue 15 item 12, in process: a run still queued at shutdown has no checkpoint; a
    resume runs it from the beginning with the prompt and parameters the journal kept. A
    session without checkpoints that this service never queued is still "no checkpoint"."""

    async def first_life() -> None:
        mgr, _, _ = await started(tmp_path, max_concurrent=1, delay=0.2)
        mgr.submit("s1", "p1", 15)
        assert mgr.submit("s2", "waiting", 7).state == "queued"
        await mgr.close()

    async def second_life() -> None:
        mgr, made, _ = manager(tmp_path, delay=0.01)
        assert sorted(await mgr.start(resume_interrupted=False)) == ["s1", "s2"]
        record = await mgr.resume("s2")
        assert (record.entry.kind, record.entry.prompt) == ("run", "waiting")
        assert record.entry.max_results_per_query == 7
        await settle(mgr)
        assert made[0].calls == [("run", "s2")]
        assert mgr.records["s2"].state == "completed"
        with pytest.raises(RunConflictError, match="complete"):
            await mgr.resume("s2")
        with pytest.raises(CheckpointNotFoundError):
            await mgr.resume("never-queued")
        await mgr.close()

    asyncio.run(first_life())
    asyncio.run(second_life())


def test_resume_of_a_session_another_process_holds_is_refused_and_records_nothing(
    tmp_path: Path,
) -> None:
    """Issue 15 item 11, in process: a held session is refused at once, naming the holder;
    one whose lease is taken after the resume was accepted (before it could start) is not
    recorded as failed: the record it replaced (here, an interrupted run) is put back."""

    async def first_life() -> None:
        mgr, made, _ = await started(tmp_path, max_concurrent=1, delay=0.2)
        mgr.submit("s1", "p", 15)
        await asyncio.sleep(0.05)
        made[0].checkpointed.add("s1")
        await mgr.close()

    async def second_life() -> None:
        mgr, made, _ = await started(tmp_path, max_concurrent=1, delay=0.2)
        orchestrator = mgr.orchestrator
        made[0].checkpointed.add("s1")
        made[0].checkpoint_manager.held["s1"] = "pid 42 on cli-host"
        with pytest.raises(SessionBusyError, match="s1 is locked by pid 42 on cli-host"):
            await mgr.resume("s1")
        assert mgr.records["s1"].state == "interrupted"
        assert orchestrator is made[0] and made[0].calls == []
        # Free when asked, taken before the run could start (it waits behind another run).
        del made[0].checkpoint_manager.held["s1"]
        mgr.submit("s2", "p", 15)
        accepted = await mgr.resume("s1")
        assert accepted.state == "queued"
        made[0].checkpoint_manager.held["s1"] = "pid 43 on cli-host"
        followed = [item async for item in mgr.follow(accepted)]
        assert followed == []  # its followers' stream ends
        await settle(mgr)
        assert made[0].calls == [("run", "s2"), ("resume", "s1")]
        assert mgr.records["s1"].state == "interrupted"  # not failed: it never started
        assert accepted.error == "not started: session s1 is locked by pid 43 on cli-host"
        await mgr.journal_written()
        states = {e.session_id: e.state for e in RunJournal(tmp_path / "state").load().values()}
        assert states == {"s1": "interrupted", "s2": "completed"}
        # A session the service never knew, taken the same way, leaves no record at all.
        made[0].checkpointed.add("s3")
        accepted = await mgr.resume("s3")
        made[0].checkpoint_manager.held["s3"] = "pid 44 on cli-host"
        await settle(mgr)
        assert "s3" not in mgr.records
        assert "s3" not in RunJournal(tmp_path / "state").load()
        await mgr.close()

    asyncio.run(first_life())
    asyncio.run(second_life())


@pytest.mark.parametrize("value", ["soon", 1e20])
def test_get_run_of_a_session_whose_log_has_a_mistyped_line_is_a_clear_409(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: object
) -> None:
    """Issue 15 item 5: ``GET /runs/{id}`` of a session (no file, only its event log) whose
    log has a field of the wrong type answers as for any unreadable log, never 500."""
    import json

    from fastapi.testclient import TestClient
    from telemetry_events import DOC_SESSION, doc_example_run

    from prowzi.config import get_config
    from prowzi.service.app import ServiceSettings, create_app
    from prowzi.workflows.telemetry import TelemetryCollector

    monkeypatch.chdir(tmp_path)
    config = get_config(telemetry_dir=tmp_path / "telemetry")
    collector = TelemetryCollector(config.telemetry_dir, background=False, fsync=False)
    for event in doc_example_run().events:
        collector.handle(event)
    collector.close()
    (config.telemetry_dir / f"{DOC_SESSION}.json").unlink()
    log = config.telemetry_dir / "events" / f"{DOC_SESSION}.jsonl"
    lines = log.read_text().splitlines()
    line = json.loads(lines[3])
    line["timestamp"] = value
    lines[3] = json.dumps(line)
    log.write_text("\n".join(lines) + "\n")
    app = create_app(config, ServiceSettings(state_dir=tmp_path / "state"))
    with TestClient(app) as client:
        response = client.get(f"/runs/{DOC_SESSION}")
        assert response.status_code == 409, response.text
        assert "line 4 is not a valid event: 'timestamp'" in response.text
        assert client.get("/runs").status_code == 200


def test_the_journal_skips_bad_entries_and_refuses_what_is_not_a_journal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Entries are read strictly (a boolean is not a count, a session id is one Prowzi
    makes): a bad entry is skipped with a warning naming the field; the others are kept."""
    import json

    journal = RunJournal(tmp_path, fsync=False)
    good = {
        "session_id": "good-1",
        "state": "interrupted",
        "kind": "run",
        "prompt": "p",
        "max_results_per_query": 15,
        "created_at": 1,
        "updated_at": 2.5,
    }
    bad = [
        {**good, "session_id": "../escape"},
        {**good, "session_id": "b2", "max_results_per_query": True},
        {**good, "session_id": "b3", "state": "dreaming"},
        {**good, "session_id": "b4", "created_at": "yesterday"},
        {key: value for key, value in good.items() if key != "prompt"} | {"session_id": "b5"},
        ["not", "an", "object"],
    ]
    journal.path.write_text(json.dumps({"version": 1, "runs": [good, *bad]}))
    with caplog.at_level("WARNING", logger="prowzi.service"):
        entries = journal.load()
    assert list(entries) == ["good-1"]
    entry = entries["good-1"]
    assert (entry.state, entry.created_at, entry.updated_at) == ("interrupted", 1.0, 2.5)
    skipped = [r.getMessage() for r in caplog.records if "bad run journal entry" in r.message]
    assert len(skipped) == len(bad)
    assert any("'max_results_per_query' is invalid" in m for m in skipped)
    assert any("'session_id' is invalid" in m for m in skipped)
    assert any("'prompt' is missing" in m for m in skipped)
    # A journal that cannot be read is an error naming it, and is left as it is: it may
    # list interrupted runs, and treating it as empty would have the next write wipe them.
    for content, reason in [
        ('{"version": 2, "runs": []}', "format 2 is not this Prowzi's (1)"),
        ('{"version": "1", "runs": []}', "format '1' is not this Prowzi's (1)"),
        ('{"version": 0, "runs": []}', "format 0 is not this Prowzi's (1)"),
        ("[]", "not a run journal"),
        ('{"version": 1}', "not a run journal"),
        ('{"version": 1, "runs": {}}', "not a run journal"),
        ("nonsense", "not JSON"),
        ('{"version": 1, "ru', "not JSON"),
    ]:
        journal.path.write_text(content)
        with pytest.raises(JournalUnreadableError, match="unreadable") as raised:
            journal.load()
        assert str(journal.path) in str(raised.value) and reason in str(raised.value)
        assert journal.path.read_text() == content
    journal.path.unlink()
    assert journal.load() == {}  # no journal yet: no runs
    journal.save(entries)
    assert RunJournal(tmp_path, fsync=False).load() == entries


def test_a_manager_does_not_start_over_an_unreadable_journal(tmp_path: Path) -> None:
    """Even without ``prowzi serve``'s check, the manager's start refuses such a journal
    rather than rewriting it with no runs."""
    mgr, _, _ = manager(tmp_path)
    path = tmp_path / "state" / "runs.json"
    path.parent.mkdir()
    path.write_text('{"version": 2, "runs": [{"session_id": "x"}]}')

    async def main() -> None:
        with pytest.raises(JournalUnreadableError):
            await mgr.start(resume_interrupted=False)

    asyncio.run(main())
    assert path.read_text() == '{"version": 2, "runs": [{"session_id": "x"}]}'
    assert not mgr.accepting

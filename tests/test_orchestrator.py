"""The stage loop: retries with backoff and jitter, permanent errors, timeouts, sinks."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from recording import Recorder

from prowzi.agents.base import StageContext
from prowzi.config import ProwziConfig
from prowzi.errors import (
    InvalidInputError,
    PermanentError,
    StageTimeoutError,
    TransientError,
    WorkflowFailedError,
)
from prowzi.events import StageCompleted, StageFailed, StageRetrying
from prowzi.testing import noop_agents, noop_result
from prowzi.tracing import NullTracer
from prowzi.workflows import ProwziOrchestrator


class Flaky:
    """Fails ``failures`` times with ``exc``, then returns the stage's no-op result."""

    def __init__(self, stage: str, failures: int, exc: Exception) -> None:
        self.stage, self.failures, self.exc, self.calls = stage, failures, exc, 0

    async def __call__(self, ctx: StageContext) -> BaseModel:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return noop_result(self.stage, ctx)


def make(
    agents: dict[str, Any] | None = None, **settings: Any
) -> tuple[ProwziOrchestrator, Recorder, list[float]]:
    config = ProwziConfig(enable_telemetry=False, **settings)
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    recorder = Recorder()
    orchestrator = ProwziOrchestrator(
        config=config,
        agents={**noop_agents(), **(agents or {})},
        sinks=[recorder],
        tracer=NullTracer(),
        sleep=sleep,
    )
    return orchestrator, recorder, delays


def test_transient_failure_is_retried_with_growing_jittered_backoff() -> None:
    first_delays = set()
    for _ in range(5):
        flaky = Flaky("search", 2, TransientError("rate limit exceeded"))
        orch, rec, delays = make(
            {"search": flaky}, max_retries=3, retry_backoff_base=0.1, retry_backoff_max=10
        )
        result = asyncio.run(orch.run_research("quantum computing"))
        assert result.metadata["session_id"]
        assert flaky.calls == 3
        retrying = rec.of(StageRetrying)
        assert [e.attempt for e in retrying] == [1, 2]
        assert all(e.error == "TransientError: rate limit exceeded" for e in retrying)
        assert [e.delay_seconds for e in retrying] == delays
        # exponential: base * 2**(n-1), plus up to one base of jitter
        assert 0.1 <= delays[0] <= 0.2 and 0.2 <= delays[1] <= 0.3
        completed = [e for e in rec.of(StageCompleted) if e.stage == "search"]
        assert completed[0].attempt == 3
        first_delays.add(delays[0])
    assert len(first_delays) > 1, "jitter should make the delays differ between runs"


def test_backoff_is_capped() -> None:
    flaky = Flaky("intent", 4, TransientError("flaky"))
    orch, _, delays = make(
        {"intent": flaky}, max_retries=4, retry_backoff_base=1.0, retry_backoff_max=2.5
    )
    asyncio.run(orch.run_research("x"))
    assert len(delays) == 4 and max(delays) <= 2.5 and delays[-1] == 2.5


def test_exhausted_retries_fail_the_run_naming_stage_and_cause() -> None:
    flaky = Flaky("verification", 99, ConnectionError("upstream reset"))
    orch, rec, delays = make({"verification": flaky}, max_retries=2, retry_backoff_base=0)
    with pytest.raises(WorkflowFailedError) as info:
        asyncio.run(orch.run_research("x"))
    err = info.value
    assert err.stage == "verification" and err.attempts == 3
    assert isinstance(err.cause, ConnectionError)
    assert "verification" in str(err) and "upstream reset" in str(err)
    assert flaky.calls == 3 and len(delays) == 2
    [failed] = rec.of(StageFailed)
    assert failed.attempt == 3 and failed.error_type == "transient"
    # later stages never ran
    assert not [e for e in rec.of(StageCompleted) if e.stage == "writing"]


@pytest.mark.parametrize("exc", [PermanentError("bad request"), ValueError("bad value")])
def test_permanent_error_is_not_retried(exc: Exception) -> None:
    flaky = Flaky("planning", 99, exc)
    orch, rec, delays = make({"planning": flaky}, max_retries=5)
    with pytest.raises(WorkflowFailedError) as info:
        asyncio.run(orch.run_research("x"))
    assert flaky.calls == 1 and delays == [] and info.value.attempts == 1
    assert rec.of(StageFailed)[0].error_type == "permanent"
    assert not rec.of(StageRetrying)


def test_agent_returning_the_wrong_type_is_a_permanent_error() -> None:
    async def wrong(ctx: StageContext) -> BaseModel:
        return noop_result("planning", ctx)

    orch, _, delays = make({"intent": wrong}, max_retries=3)
    with pytest.raises(WorkflowFailedError, match="expected IntentAnalysis"):
        asyncio.run(orch.run_research("x"))
    assert delays == []


def test_stage_timeout_is_enforced_and_retried() -> None:
    calls = 0

    async def slow(ctx: StageContext) -> BaseModel:
        nonlocal calls
        calls += 1
        await asyncio.sleep(30)
        return noop_result("writing", ctx)

    orch, rec, _ = make({"writing": slow}, max_retries=1, stage_timeout_seconds=0.05)
    loop_start = asyncio.run(_timed(orch))
    assert loop_start < 5, "the timeout must interrupt the agent"
    assert calls == 2
    [retry] = rec.of(StageRetrying)
    assert retry.error_type == "timeout" and "timed out after 0.05s" in retry.error


async def _timed(orch: ProwziOrchestrator) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(WorkflowFailedError) as info:
        await orch.run_research("x")
    assert isinstance(info.value.cause, StageTimeoutError)
    return loop.time() - start


def test_raising_progress_callbacks_do_not_fail_the_run() -> None:
    calls: list[str] = []

    def sync_boom(stage: str, payload: dict[str, Any]) -> None:
        calls.append(stage)
        raise RuntimeError("callback bug")

    async def async_boom(stage: str, payload: dict[str, Any]) -> None:
        raise RuntimeError("async callback bug")

    for callback in (sync_boom, async_boom):
        orch, rec, _ = make()
        result = asyncio.run(orch.run_research("x", progress_callback=callback))
        assert result.draft is not None
        assert result.metadata["sink_errors"]["callback"] > 0
        assert len(rec.of(StageCompleted)) == 7
    assert "intent" in calls


def test_progress_callback_receives_stage_and_payload_sync_or_async() -> None:
    seen: list[tuple[str, str]] = []

    async def callback(stage: str, payload: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        seen.append((stage, payload["status"]))

    orch, _, _ = make()
    asyncio.run(orch.run_research("x", progress_callback=callback))
    assert seen[0] == ("workflow", "started") and seen[-1] == ("workflow", "completed")
    assert ("intent", "started") in seen and ("turnitin", "completed") in seen


def test_an_event_callback_receives_the_events_themselves(tmp_path: Any) -> None:
    """A ProgressListener (any EventCallback) given as the progress callback gets the run's
    events as the sinks do, the very objects, with no (stage, payload) round trip; it still
    records the run under its own session id, and a plain callback still gets payloads."""
    from prowzi import events as ev
    from prowzi.cli.monitor import ProgressListener
    from prowzi.workflows.telemetry import TelemetryCollector

    class Seen(ev.EventCallback):
        def __init__(self) -> None:
            self.events: list[ev.Event] = []

        def on_event(self, event: ev.Event) -> None:
            self.events.append(event)

        def __call__(self, stage: str, payload: dict[str, Any]) -> None:
            raise AssertionError("called with (stage, payload)")

    seen = Seen()
    orch, rec, _ = make()
    asyncio.run(orch.run_research("x", progress_callback=seen))
    assert seen.events and all(a is b for a, b in zip(seen.events, rec.events, strict=True))

    telemetry = TelemetryCollector(tmp_path, background=False, fsync=False)
    listener = ProgressListener(telemetry=telemetry, session_id="my-session-123")
    orch, rec, _ = make()
    result = asyncio.run(orch.run_research("x", progress_callback=listener))
    assert listener.errors == 0 and listener.run_session_id == result.metadata["session_id"]
    metrics = telemetry.load_session("my-session-123")
    assert metrics.success is True and metrics.completed_stage_count == 7
    assert metrics.metadata["run_session_id"] == result.metadata["session_id"]


def test_a_user_agent_replaces_one_stage_only() -> None:
    class MyIntent:
        async def __call__(self, ctx: StageContext) -> BaseModel:
            from prowzi.agents.models import IntentAnalysis

            return IntentAnalysis(
                prompt=ctx.params.prompt, document_type="essay", field="history", topic="mine"
            )

    config = ProwziConfig(enable_telemetry=False)
    orch = ProwziOrchestrator(config=config, agents={"intent": MyIntent()}, tracer=NullTracer())
    result = asyncio.run(orch.run_research("Write a research paper on quantum computing"))
    assert result.intent is not None and result.intent.topic == "mine"
    # the default agents ran the other stages on the sample corpus
    assert result.search is not None and result.search.corpus.sample
    assert result.draft is not None and "## References" in result.draft.markdown


def test_agents_for_unknown_stages_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="unknown stage"):
        make({"serach": noop_agents()["search"]})[0].agents  # noqa: B018


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "   "}, "prompt: the prompt is empty"),
        ({"prompt": "x", "max_results_per_query": 0}, "max_results_per_query"),
        ({"prompt": "x", "max_results_per_query": -3}, "max_results_per_query"),
    ],
)
def test_bad_run_parameters_are_refused(kwargs: dict[str, Any], message: str) -> None:
    orch, rec, _ = make()
    with pytest.raises(InvalidInputError, match=message):
        asyncio.run(orch.run_research(**kwargs))
    assert rec.events == []


def test_session_ids_of_the_wrong_form_are_refused() -> None:
    orch, _, _ = make()
    for bad in ("../etc", "a/b", "x\x00y", "a" * 200, "a_b"):
        with pytest.raises(InvalidInputError):
            asyncio.run(orch.run_research("x", session_id=bad))


def test_a_stuck_async_callback_is_abandoned_and_counted() -> None:
    async def stuck(stage: str, payload: dict[str, Any]) -> None:
        if stage == "intent" and payload["status"] == "started":
            await asyncio.sleep(3600)

    config = ProwziConfig(enable_telemetry=False)
    recorder = Recorder()
    orch = ProwziOrchestrator(
        config=config,
        agents=noop_agents(),
        sinks=[recorder],
        tracer=NullTracer(),
        sink_timeout=0.05,
    )
    result = asyncio.run(orch.run_research("x", progress_callback=stuck))
    assert result.metadata["sink_errors"] == {"callback": 1}
    assert len(recorder.of(StageCompleted)) == 7


class _UnreachableStore:
    """A checkpoint manager whose store cannot be reached."""

    def has_session(self, session_id: str, stages: Any) -> bool:
        raise ConnectionRefusedError(111, "Connection refused")


def test_a_chosen_session_id_is_checked_but_an_unreachable_store_only_logs_when_not_needed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With checkpointing off a chosen id is still checked against the store (a session with
    checkpoints is not reused), but a store that cannot be reached does not fail a run that
    will not write to it: it is logged. With checkpointing on, it fails the run."""
    orchestrator, _, _ = make()
    orchestrator._checkpoints = _UnreachableStore()  # type: ignore[assignment]
    with caplog.at_level("WARNING", logger="prowzi.orchestrator"):
        result = asyncio.run(orchestrator.run_research("x y", session_id="chosen"))
    assert result.metadata["session_id"] == "chosen"
    assert [r.getMessage() for r in caplog.records] == [
        "could not check whether session chosen already has checkpoints ([Errno 111] "
        "Connection refused); checkpointing is off, so the run goes on"
    ]
    strict, _, _ = make(enable_checkpointing=True)
    strict._checkpoints = _UnreachableStore()  # type: ignore[assignment]
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(strict.run_research("x y", session_id="chosen"))


def test_a_checkpoint_saved_while_the_run_is_cancelled_is_announced(tmp_path: Path) -> None:
    """A cancellation (a service cancel, SIGTERM) that arrives while a checkpoint is being
    written waits for the write; the checkpoint it made is announced (``checkpoint_saved``),
    so telemetry lists every checkpoint that exists (found by a flaky service test)."""
    import threading

    from prowzi.events import CheckpointSaved
    from prowzi.storage.local import LocalBlobStore
    from prowzi.workflows.checkpoint import CheckpointManager

    writing = threading.Event()

    class SlowStore(LocalBlobStore):
        def put(self, name: str, data: bytes, **options: Any) -> str:
            if name.endswith(".pkl"):
                writing.set()
                time.sleep(0.3)
            return super().put(name, data, **options)

    config = ProwziConfig(enable_telemetry=False, enable_checkpointing=True)
    recorder = Recorder()
    manager = CheckpointManager(tmp_path, store=SlowStore(tmp_path))
    orchestrator = ProwziOrchestrator(
        config=config,
        agents=noop_agents(),
        sinks=[recorder],
        tracer=NullTracer(),
        checkpoint_manager=manager,
    )

    async def main() -> None:
        run = asyncio.ensure_future(orchestrator.run_research("cancelled mid-save"))
        await asyncio.to_thread(writing.wait, 10)  # the first checkpoint is being written
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    asyncio.run(main())
    announced = [e.checkpoint_id for e in recorder.of(CheckpointSaved)]
    written = sorted(p.stem for p in tmp_path.glob("*.pkl"))
    assert written and announced == written

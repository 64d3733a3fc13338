"""Scripted event streams for the telemetry and monitor tests.

:class:`RunScript` emits the events the orchestrator would, on a fake clock, so tests can
reproduce the design document's telemetry example and monitor drawing exactly.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from shared import STAGES

from prowzi import events as ev

DOC_SESSION = "abc123-def456"
DOC_T0 = datetime(2024, 1, 15, 10, 30, 0, tzinfo=UTC).timestamp()


class RunScript:
    """Builds a run's events; each stage call advances the fake clock by its duration."""

    def __init__(self, session_id: str = DOC_SESSION, t0: float = DOC_T0) -> None:
        self.session_id = session_id
        self.t0 = t0
        self.now = t0
        self.events: list[ev.Event] = []

    def _add(self, event: ev.Event) -> RunScript:
        self.events.append(event)
        return self

    def start(self, prompt: str = "Write a research paper...", **extra: Any) -> RunScript:
        return self._add(
            ev.WorkflowStarted(
                session_id=self.session_id,
                timestamp=self.now,
                prompt=prompt,
                parameters={"prompt": prompt, "max_results_per_query": 15},
                stages=STAGES,
                trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
                **extra,
            )
        )

    def begin(self, stage: str, attempt: int = 1) -> RunScript:
        return self._add(
            ev.StageStarted(
                session_id=self.session_id, timestamp=self.now, stage=stage, attempt=attempt
            )
        )

    def _stage_ending(
        self, stage: str, duration: float, attempt: int, ending: type[ev.Event], **fields: Any
    ) -> RunScript:
        """A stage's start, then the event that ends the attempt (``ending``) ``duration``
        seconds later."""
        self.begin(stage, attempt)
        self.now += duration
        return self._add(
            ending(
                session_id=self.session_id,
                timestamp=self.now,
                stage=stage,
                attempt=attempt,
                duration_seconds=duration,
                **fields,
            )
        )

    def stage(
        self, stage: str, duration: float, details: dict[str, Any] | None = None, attempt: int = 1
    ) -> RunScript:
        return self._stage_ending(
            stage, duration, attempt, ev.StageCompleted, details=details or {}
        )

    def retry(self, stage: str, duration: float, error: str, attempt: int = 1) -> RunScript:
        return self._stage_ending(
            stage,
            duration,
            attempt,
            ev.StageRetrying,
            error=error,
            error_type="transient",
            delay_seconds=0.0,
        )

    def fail_stage(self, stage: str, duration: float, error: str, attempt: int = 1) -> RunScript:
        return self._stage_ending(
            stage, duration, attempt, ev.StageFailed, error=error, error_type="permanent"
        )

    def skip(self, stage: str) -> RunScript:
        return self._add(
            ev.StageSkipped(session_id=self.session_id, timestamp=self.now, stage=stage)
        )

    def checkpoint(self, stage: str) -> RunScript:
        return self._add(
            ev.CheckpointSaved(
                session_id=self.session_id,
                timestamp=self.now,
                stage=stage,
                checkpoint_id=f"{self.session_id}_{stage}",
                path=f"prowzi_checkpoints/{self.session_id}_{stage}.pkl",
                size_bytes=1024,
                duration_seconds=0.01,
            )
        )

    def _run_ending(self, ending: type[ev.Event], **fields: Any) -> RunScript:
        """The event that ends the run (``ending``), timed from its start."""
        return self._add(
            ending(
                session_id=self.session_id,
                timestamp=self.now,
                duration_seconds=self.now - self.t0,
                **fields,
            )
        )

    def complete(self, document_path: str | None = "paper.md") -> RunScript:
        return self._run_ending(ev.WorkflowCompleted, document_path=document_path)

    def failed(self, stage: str, error: str) -> RunScript:
        return self._run_ending(ev.WorkflowFailed, stage=stage, error=error, error_type="permanent")


def doc_example_run(session_id: str = DOC_SESSION, *, finish: bool = True) -> RunScript:
    """The design document's telemetry example: intent, a search retried once, then done."""
    run = RunScript(session_id).start()
    run.stage("intent", 2.3, {"document_type": "research_paper", "field": "computer_science"})
    run.stage("planning", 3.45, {"sections": 5, "queries": 12})
    run.retry("search", 5.2, "Rate limit exceeded")
    run.stage("search", 8.1, {"sources_count": 48}, attempt=2)
    if finish:
        for name in STAGES[3:]:
            run.stage(name, 1.0)
        run.complete()
    return run


def doc_drawing_run(session_id: str = DOC_SESSION) -> RunScript:
    """The design document's monitor drawing: 3/7 done, verification retrying, 2 retries."""
    run = RunScript(session_id).start()
    run.stage("intent", 2.30)
    run.stage("planning", 3.45)
    run.retry("search", 5.20, "Rate limit exceeded")
    run.stage("search", 8.11, {"sources_count": 48}, attempt=2)
    run.retry("verification", 5.20, "Timeout")
    return run

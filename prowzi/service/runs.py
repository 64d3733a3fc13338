"""Runs inside the service: a bounded number execute, the rest wait in a bounded queue.

The :class:`RunManager` owns every run this process accepted: it starts them on one shared
orchestrator, keeps each run's recent events for Server-Sent Events followers, journals states
so a restart can find interrupted runs, and on shutdown cancels the runs in flight (the
orchestrator checkpoints their completed stages as it unwinds) and marks them interrupted.

Nothing here does file or store work on the event loop: the journal is written by one task
whose writes (fsync included) run in a worker thread, the latest state winning when several
changes arrive during one write; checkpoint plans are read in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prowzi.errors import (
    CheckpointNotFoundError,
    ProwziError,
    SessionLockedError,
    WorkflowFailedError,
)
from prowzi.events import Event, EventSink, WorkflowCompleted, WorkflowFailed, WorkflowStarted
from prowzi.ids import validate_session_id
from prowzi.service.journal import FINISHED, JournalEntry, RunJournal, RunKind, RunState
from prowzi.storage.lease import LeaseLostError

if TYPE_CHECKING:
    from prowzi.observability.metrics import ProwziMetrics
    from prowzi.workers.client import RemoteRuns
    from prowzi.workflows.orchestrator import ProwziOrchestrator

log = logging.getLogger("prowzi.service")

EVENTS_KEPT = 5000
"""Events kept per run for SSE replay (a run with every retry used stays far below this)."""
FINISHED_KEPT = 200
"""Finished runs kept in memory; older ones are served from telemetry."""


class ServiceUnavailableError(ProwziError):
    """The service is shutting down and accepts no new run."""


class QueueFullError(ProwziError):
    """Every run slot is busy and the queue is full."""


class RunConflictError(ProwziError):
    """The request does not fit the run's state (cancel a finished run, resume a live one)."""


class SessionBusyError(RunConflictError):
    """Another process (a CLI ``prowzi run`` or ``resume``) holds the session's lease."""


@dataclass(slots=True)
class RunRecord:
    """One run (or resume) this process accepted."""

    entry: JournalEntry
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    trace_id: str | None = None
    events: deque[tuple[int, str, dict[str, Any]]] = field(
        default_factory=lambda: deque(maxlen=EVENTS_KEPT)
    )
    next_seq: int = 1
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    replaces: RunRecord | None = None
    """The record this one took the place of (an interrupted run being resumed), put back
    if this run cannot start because another process holds the session; dropped once it
    has started."""

    @property
    def session_id(self) -> str:
        return self.entry.session_id

    @property
    def state(self) -> RunState:
        return self.entry.state

    @property
    def done(self) -> bool:
        return self.entry.state in FINISHED or self.entry.state == "interrupted"

    def add_event(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((self.next_seq, kind, data))
        self.next_seq += 1
        self.notify()

    def notify(self) -> None:
        # Followers hold the previous Event; setting it wakes them, a fresh one waits again.
        self.changed.set()
        self.changed = asyncio.Event()

    def summary(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "state": self.state,
            "kind": self.entry.kind,
            "prompt": self.entry.prompt,
            "max_results_per_query": self.entry.max_results_per_query,
            "created_at": self.entry.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "trace_id": self.trace_id,
        }


class _RouterSink:
    """The service's event sink: hands each event to the run it belongs to."""

    name = "service"

    def __init__(self, manager: RunManager) -> None:
        self._manager = manager

    def handle(self, event: Event) -> None:
        record = self._manager.records.get(event.session_id)
        if record is None:
            return
        if isinstance(event, WorkflowStarted):
            record.trace_id = event.trace_id
            # A resume accepted for a session this process never ran learns its prompt here.
            record.entry.prompt = event.prompt
            results = event.parameters.get("max_results_per_query")
            if isinstance(results, int):
                record.entry.max_results_per_query = results
        record.add_event(event.kind, event.as_record())


class RunManager:
    """Accepts, queues, runs, cancels, journals and recovers runs."""

    def __init__(
        self,
        orchestrator_factory: Callable[[EventSink], ProwziOrchestrator],
        journal: RunJournal,
        metrics: ProwziMetrics,
        *,
        max_concurrent: int = 2,
        max_queue: int = 100,
        shutdown_timeout: float = 30.0,
        documents_dir: Path | None = None,
        remote: RemoteRuns | None = None,
        llm_orchestrator_factory: Callable[[EventSink, JournalEntry], ProwziOrchestrator]
        | None = None,
    ) -> None:
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError("max_concurrent must be >= 1 and max_queue >= 0")
        self.records: dict[str, RunRecord] = {}
        self.accepting = False
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.shutdown_timeout = shutdown_timeout
        self._journal = journal
        self._metrics = metrics
        self._sink = _RouterSink(self)
        self._factory = orchestrator_factory
        self._llm_factory = llm_orchestrator_factory
        self._orchestrator: ProwziOrchestrator | None = None
        self._pending: deque[RunRecord] = deque()
        self._running: set[str] = set()
        self._entries: dict[str, JournalEntry] = {}
        self._shutting_down = False
        self.documents_dir = documents_dir
        self._journal_dirty = False
        self._journal_writer: asyncio.Task[None] | None = None
        self.remote = remote
        self._background: set[asyncio.Task[None]] = set()
        """With a broker: runs are enqueued for ``prowzi worker`` processes and followed
        through their event streams; the broker's queue is the queue, so every accepted run
        is submitted at once, up to ``max_concurrent + max_queue`` followed at a time."""

    @property
    def orchestrator(self) -> ProwziOrchestrator:
        if self._orchestrator is None:
            self._orchestrator = self._factory(self._sink)
        return self._orchestrator

    def document_path(self, session_id: str) -> Path | None:
        """Where a run's document is written (named by its validated session id)."""
        if self.documents_dir is None:
            return None
        return self.documents_dir / f"{validate_session_id(session_id)}.md"

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self._running)

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, *, resume_interrupted: bool) -> list[str]:
        """Load the journal; mark runs it left unfinished as interrupted and, if asked,
        resume them (or re-run those that never reached a checkpoint). Returns their ids."""
        self._entries = await asyncio.to_thread(self._journal.load)
        interrupted = [e for e in self._entries.values() if e.state not in FINISHED]
        for entry in interrupted:
            entry.state = "interrupted"
            entry.updated_at = time.time()
            self.records[entry.session_id] = RunRecord(entry=entry)
        self._save()
        await self.journal_written()
        self.accepting = True
        if resume_interrupted:
            for entry in sorted(interrupted, key=lambda e: e.created_at):
                await self._recover(entry)
        return [e.session_id for e in interrupted]

    async def _recover(self, entry: JournalEntry) -> None:
        try:
            # Planned only to know that it can be resumed. A complete plan is resumed too:
            # nothing runs, but the resume records the session as completed (it died after
            # its last checkpoint, before it could say so).
            await asyncio.to_thread(self.orchestrator.plan_resume, entry.session_id)
        except CheckpointNotFoundError:
            # Interrupted before its first checkpoint: run it again from the start.
            self._admit(entry.session_id, "run", entry.prompt, entry.max_results_per_query)
            return
        except Exception as exc:  # one unrecoverable run must not keep the service down
            log.error("cannot resume interrupted run %s: %s", entry.session_id, exc)
            self._set_state(self.records[entry.session_id], "failed", error=str(exc))
            return
        self._admit(entry.session_id, "resume", entry.prompt, entry.max_results_per_query)

    def begin_shutdown(self) -> None:
        """Stop accepting; interrupt queued runs; cancel running ones (they checkpoint)."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self.accepting = False
        while self._pending:
            self._set_state(self._pending.popleft(), "interrupted")
        self._update_gauges()
        for session_id in list(self._running):
            task = self.records[session_id].task
            if task is not None:
                task.cancel()

    async def close(self) -> None:
        """Shut down and wait (up to ``shutdown_timeout``) for cancelled runs to unwind."""
        self.begin_shutdown()
        tasks = [r.task for r in self.records.values() if r.task is not None and not r.task.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.shutdown_timeout)
            for task in pending:
                log.error(
                    "%s did not stop within %.0fs of shutdown",
                    task.get_name(),
                    self.shutdown_timeout,
                )
        await self.journal_written()

    # --- requests -----------------------------------------------------------------------

    def submit(
        self, session_id: str, prompt: str, max_results_per_query: int, **llm: Any
    ) -> RunRecord:
        """Accept a new run; raises when shutting down or when the queue is full. ``llm``:
        ``model``, ``max_cost_usd``, ``max_tokens`` (the run's LLM options)."""
        if session_id in self.records:
            raise RunConflictError(f"session {session_id} already exists")
        self._check_capacity()
        return self._admit(session_id, "run", prompt, max_results_per_query, **llm)

    async def resume(self, session_id: str, *, settle_complete: bool = False) -> RunRecord:
        """Accept a resume of ``session_id`` from its latest checkpoint.

        A session whose lease another process holds (a CLI ``prowzi run`` or ``resume`` in
        progress) is refused at once with :class:`SessionBusyError` naming the holder.
        A session whose checkpoints are complete has nothing to resume, unless
        ``settle_complete``: its record says it was interrupted (killed after its last
        checkpoint), and the resume, running nothing, records it completed. A run this
        service accepted and that was interrupted before its first checkpoint (still queued
        when the service stopped) has no checkpoint: it starts again from the beginning, with
        the prompt and parameters its journal entry kept."""
        self._check_capacity()
        existing = self.records.get(session_id)
        if existing is not None and not existing.done:
            raise RunConflictError(f"session {session_id} is {existing.state}; nothing to resume")
        orchestrator = self.orchestrator

        def plan() -> Any:
            holder = orchestrator.checkpoint_manager.lock_holder(session_id)
            if holder is not None:
                raise SessionBusyError(f"session {session_id} is locked by {holder}")
            return orchestrator.plan_resume(session_id)

        try:
            resume_plan = await asyncio.to_thread(plan)
        except CheckpointNotFoundError as exc:
            restart = self.records.get(session_id)
            if (
                restart is None
                or restart.state != "interrupted"
                or restart.entry.kind != "run"
                or exc.saved_stages
            ):
                raise
            self._check_capacity()
            entry = restart.entry
            return self._admit(session_id, "run", entry.prompt, entry.max_results_per_query)
        if resume_plan.complete and not settle_complete:
            raise RunConflictError(f"session {session_id} is complete; nothing to resume")
        # Another request may have resumed it, or filled the queue, while the plan was read.
        existing = self.records.get(session_id)
        if existing is not None and not existing.done:
            raise RunConflictError(f"session {session_id} is {existing.state}; nothing to resume")
        self._check_capacity()
        prompt = existing.entry.prompt if existing is not None else ""
        results = existing.entry.max_results_per_query if existing is not None else 15
        return self._admit(session_id, "resume", prompt, results)

    def cancel(self, session_id: str) -> RunRecord:
        record = self.records.get(session_id)
        if record is None:
            raise LookupError(session_id)
        if record.done:
            raise RunConflictError(f"session {session_id} is {record.state}; nothing to cancel")
        if record in self._pending:  # queued here (a run on the workers is queued there)
            self._pending.remove(record)
            self._set_state(record, "cancelled")
            self._update_gauges()
        elif self.remote is not None:
            # The worker running it hears of it through the broker, checkpoints and stops;
            # its last event ends this record's follower.
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self.remote.cancel, session_id)
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        elif record.task is not None:
            record.task.cancel()
        return record

    def _check_capacity(self) -> None:
        if not self.accepting:
            raise ServiceUnavailableError("the service is shutting down; no new runs accepted")
        if self.remote is not None:
            if self.active >= self.max_concurrent + self.max_queue:
                raise QueueFullError(
                    f"{self.active} runs are queued or running on the workers; retry later"
                )
            return
        if self.active >= self.max_concurrent and len(self._pending) >= self.max_queue:
            raise QueueFullError(
                f"all {self.max_concurrent} run slots are busy and {self.max_queue} runs "
                "are queued; retry later"
            )

    # --- execution ----------------------------------------------------------------------

    def _admit(
        self, session_id: str, kind: RunKind, prompt: str, results: int, **llm: Any
    ) -> RunRecord:
        now = time.time()
        record = self.records.get(session_id)
        if not llm and record is not None:  # a resume keeps the run's LLM options
            llm = {
                "model": record.entry.model,
                "max_cost_usd": record.entry.max_cost_usd,
                "max_tokens": record.entry.max_tokens,
            }
        entry = JournalEntry(
            session_id=session_id,
            state="queued",
            kind=kind,
            prompt=prompt,
            max_results_per_query=results,
            created_at=record.entry.created_at if record is not None else now,
            updated_at=now,
            **llm,
        )
        previous = record
        record = RunRecord(entry=entry, replaces=previous)
        self.records[session_id] = record
        self._entries[session_id] = entry
        self._pending.append(record)
        self._save()
        self._dispatch()
        return record

    def _dispatch(self) -> None:
        limit = self.max_concurrent if self.remote is None else self.max_concurrent + self.max_queue
        while self._pending and len(self._running) < limit:
            record = self._pending.popleft()
            self._running.add(record.session_id)
            record.started_at = time.time()
            self._set_state(record, "running")
            task = asyncio.get_running_loop().create_task(
                self._execute(record), name=f"prowzi-run-{record.session_id}"
            )
            # Bookkeeping in a done callback also covers a task cancelled before it ran.
            task.add_done_callback(partial(self._finished, record))
            record.task = task
        self._update_gauges()

    async def _execute_remote(self, record: RunRecord, remote: RemoteRuns) -> None:
        """Enqueue the run (a resume too: the worker continues a session that has
        checkpoints) and follow its events from the broker to its end."""
        entry = record.entry
        try:
            position = await asyncio.to_thread(
                remote.submit, entry.session_id, entry.prompt, entry.max_results_per_query
            )
            # Queued in the broker until a worker takes it: its first event says so.
            record.started_at = None
            self._set_state(record, "queued")
            last: Event | None = None
            async for event in remote.follow(entry.session_id, after=position):
                if record.state == "queued":
                    record.started_at = event.timestamp
                    self._set_state(record, "running")
                self._sink.handle(event)
                last = event
        except Exception as exc:  # the broker is down: the run was not queued, or is lost to us
            log.error("run %s on the workers: %s", entry.session_id, exc)
            self._set_state(record, "failed", error=f"broker: {type(exc).__name__}: {exc}")
            return
        if isinstance(last, WorkflowCompleted):
            self._set_state(record, "completed")
        elif isinstance(last, WorkflowFailed) and last.cancelled:
            self._set_state(record, "cancelled", error=last.error)
        else:
            error = last.error if isinstance(last, WorkflowFailed) else "no end event"
            self._set_state(record, "failed", error=error)

    async def _execute(self, record: RunRecord) -> None:
        if self.remote is not None:
            await self._execute_remote(record, self.remote)
            return
        entry = record.entry
        closing: list[Any] = []
        try:
            orchestrator = self.orchestrator
            if self._llm_factory is not None and (
                entry.model or entry.max_cost_usd is not None or entry.max_tokens is not None
            ):
                orchestrator = self._llm_factory(self._sink, entry)
                # its agents ask the model server first: off the loop
                agents = await asyncio.to_thread(getattr, orchestrator, "agents")
                closing = [a for a in agents.values() if hasattr(a, "aclose")][:1]
            if entry.kind == "run":
                await orchestrator.run_research(
                    entry.prompt,
                    max_results_per_query=entry.max_results_per_query,
                    session_id=entry.session_id,
                    document_path=self.document_path(entry.session_id),
                )
            else:
                await orchestrator.resume_from_checkpoint(
                    entry.session_id, document_path=self.document_path(entry.session_id)
                )
            self._set_state(record, "completed")
        except SessionLockedError as exc:
            if isinstance(exc, LeaseLostError):  # it ran, and lost its lease while running
                self._set_state(record, "failed", error=str(exc))
            else:
                self._not_started(record, str(exc))
        except WorkflowFailedError as exc:
            self._set_state(record, "failed", error=str(exc))
        except Exception as exc:
            log.exception("run %s failed", entry.session_id)
            self._set_state(record, "failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            for agent in closing:  # this run's own model client (its agents share it)
                with contextlib.suppress(Exception):
                    await agent.aclose()

    def _not_started(self, record: RunRecord, reason: str) -> None:
        """The run could not start: another process took the session's lease after the
        request was accepted. Nothing is recorded against the session: the record it
        replaced is put back (or none is kept, and its telemetry answers for it), and the
        followers of this one see their stream end."""
        log.warning("run %s not started: %s", record.session_id, reason)
        record.error = f"not started: {reason}"
        previous = record.replaces
        record.replaces = None
        if previous is not None:
            self.records[record.session_id] = previous
            self._entries[record.session_id] = previous.entry
        else:
            self.records.pop(record.session_id, None)
            self._entries.pop(record.session_id, None)
        self._save()
        # Followers of this record end their stream: it is done, though never journaled so.
        record.entry = replace(record.entry, state="cancelled")
        record.finished_at = time.time()
        record.notify()

    def _finished(self, record: RunRecord, task: asyncio.Task[None]) -> None:
        record.replaces = None
        if task.cancelled() and not record.done:
            self._set_state(record, "interrupted" if self._shutting_down else "cancelled")
        self._running.discard(record.session_id)
        if not self._shutting_down:
            self._dispatch()
        self._update_gauges()

    def _set_state(self, record: RunRecord, state: RunState, error: str | None = None) -> None:
        record.entry.state = state
        record.entry.updated_at = time.time()
        if error is not None:
            record.error = error
        if record.done:
            record.finished_at = record.entry.updated_at
            record.replaces = None
        self._entries[record.session_id] = record.entry
        self._save()
        record.notify()
        if record.done:
            self._forget_old_runs()

    def is_active(self, session_id: str) -> bool:
        """Whether this service has the session queued or running."""
        record = self.records.get(session_id)
        return record is not None and record.state in ("queued", "running")

    def expire(self, cutoff: float) -> list[str]:
        """Forget the finished runs last updated before ``cutoff`` (retention: their
        documents and telemetry are gone too). Interrupted runs stay: they wait for a resume.
        Returns their ids."""
        gone = [
            sid for sid, e in self._entries.items() if e.state in FINISHED and e.updated_at < cutoff
        ]
        for session_id in gone:
            del self._entries[session_id]
            self.records.pop(session_id, None)
        if gone:
            self._save()
        return gone

    def _forget_old_runs(self) -> None:
        # Interrupted runs stay: they wait for a resume.
        finished = [r for r in self.records.values() if r.state in FINISHED]
        excess = len(finished) - FINISHED_KEPT
        if excess > 0:
            finished.sort(key=lambda r: r.entry.updated_at)
            for record in finished[:excess]:
                del self.records[record.session_id]

    def _save(self) -> None:
        """Have the journal written: by the writer task, off the event loop (started here
        if it is not running); :meth:`journal_written` waits for it."""
        self._journal_dirty = True
        if self._journal_writer is None or self._journal_writer.done():
            self._journal_writer = asyncio.get_running_loop().create_task(
                self._write_journal(), name="prowzi-run-journal"
            )

    async def _write_journal(self) -> None:
        while self._journal_dirty:
            self._journal_dirty = False
            # The copy is taken on the loop, where the entries change; the file work is not.
            entries = self._journal.snapshot(self._entries)
            try:
                await asyncio.to_thread(self._journal.write, entries)
            except Exception:  # the runs go on; the next change tries again
                log.exception("cannot write the run journal %s", self._journal.path)

    async def journal_written(self) -> None:
        """Wait until the journal holds every state change made so far."""
        while self._journal_writer is not None and not self._journal_writer.done():
            # Shielded: a request cancelled while it waits must not stop the writer.
            await asyncio.shield(self._journal_writer)

    def _update_gauges(self) -> None:
        self._metrics.queue_depth.set(len(self._pending))
        self._metrics.active_runs.set(len(self._running))

    # --- events -------------------------------------------------------------------------

    async def follow(
        self, record: RunRecord, after: int = 0
    ) -> AsyncIterator[tuple[int, str, dict[str, Any]]]:
        """The run's events with a sequence number above ``after``, then live ones, until
        the run is finished. (Keep-alives on a quiet stream are the SSE response's.)"""
        last = after
        while True:
            changed = record.changed
            fresh = [e for e in record.events if e[0] > last]
            for item in fresh:
                last = item[0]
                yield item
            if fresh:
                continue
            if record.done:
                return
            await changed.wait()

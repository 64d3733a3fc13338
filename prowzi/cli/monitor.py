"""The live terminal monitor, and the progress callback that feeds it.

:class:`WorkflowMonitor` draws the design document's table (one row per stage: status symbol,
attempt, duration, details) and summary panel (total duration, "Stages n/7 completed", total
retries, Success: In Progress / ✓ / ✗). It folds events with the same
:class:`~prowzi.workflows.telemetry.SessionRecorder` that writes the session files, so the
screen and the file agree. Events reach it three ways:

* in the running process, through :class:`ProgressListener` (a progress callback) or
  :func:`live_monitor` (what ``prowzi run --monitor`` uses);
* from another process, by following the session's event log (:func:`follow_session`,
  ``prowzi monitor ID``);
* from a finished session's log, re-timed (:func:`replay_session`, ``prowzi replay ID``).

The console and the clock are injected so tests render into a ``StringIO`` at a fixed width
and time.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from prowzi.agents.base import format_model_usage
from prowzi.events import (
    Event,
    EventCallback,
    WorkflowStarted,
    event_from_progress,
)
from prowzi.ids import validate_session_id
from prowzi.workflows.eventlog import EventLogReader
from prowzi.workflows.eventlog import writer_gone as header_writer_gone
from prowzi.workflows.telemetry import (
    DEFAULT_STAGE_COUNT,
    SessionRecorder,
    StageMetrics,
    TelemetryCollector,
    WorkflowMetrics,
)

log = logging.getLogger("prowzi.monitor")

Clock = Callable[[], float]

SYMBOLS: dict[str, tuple[str, str, str]] = {
    # status: (symbol, word, style)
    "completed": ("✓", "completed", "green"),
    "failed": ("✗", "failed", "red"),
    "retrying": ("⟳", "retrying", "yellow"),
    "started": ("…", "running", "cyan"),
    "skipped": ("↷", "restored", "blue"),
    "pending": ("·", "pending", "dim"),
}

_DETAIL_LABELS = {"sources_count": "Sources", "sources_by_origin": "From"}
_LONG_DETAILS = frozenset({"reference_sources"})
"""Details too long for a monitor row (``prowzi show`` lists them)."""


# --- the monitor -------------------------------------------------------------------------


class WorkflowMonitor:
    """A live view of one session. Use as a context manager to draw it with rich ``Live``.

    ``session_id`` None adopts the id of the first event; events of other sessions are then
    ignored. ``label`` is appended to the title (e.g. "replay ×10").
    """

    def __init__(
        self,
        session_id: str | None = None,
        *,
        console: Console | None = None,
        clock: Clock = time.time,
        refresh_per_second: float = 4.0,
        label: str | None = None,
    ) -> None:
        self.session_id = validate_session_id(session_id) if session_id is not None else None
        self.console = console if console is not None else Console()
        self.clock = clock
        self.label = label
        self.interrupted: str | None = None
        self._refresh_per_second = refresh_per_second
        self._recorder: SessionRecorder | None = None
        self._static: WorkflowMetrics | None = None
        self._live: Live | None = None

    # feeding

    def apply(self, event: Event) -> None:
        """Fold one event in and redraw."""
        if self.session_id is None:
            self.session_id = event.session_id
        elif event.session_id != self.session_id:
            return
        if self._recorder is None:
            self._recorder = SessionRecorder(self.session_id)
        self._recorder.apply(event)
        self.refresh()

    def apply_all(self, events: Sequence[Event]) -> None:
        for event in events:
            self.apply(event)

    def show(self, metrics: WorkflowMetrics) -> None:
        """Display a recorded session (its file), for sessions with no event log to follow."""
        self.session_id = metrics.session_id
        self._static = metrics
        self.refresh()

    def mark_interrupted(self, reason: str) -> None:
        """The run ended without a final event (its process is gone)."""
        self.interrupted = reason
        self.refresh()

    @property
    def metrics(self) -> WorkflowMetrics | None:
        if self._recorder is not None and self._recorder.metrics is not None:
            return self._recorder.metrics
        return self._static

    @property
    def finished(self) -> bool:
        metrics = self.metrics
        return self.interrupted is not None or (
            metrics is not None and metrics.completed_at is not None
        )

    # drawing

    def __enter__(self) -> WorkflowMonitor:
        self._live = Live(
            get_renderable=self.render,
            console=self.console,
            refresh_per_second=self._refresh_per_second,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._live.start(refresh=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.stop()
            if not self.console.is_terminal:
                # Live leaves the cursor after its last frame on a terminal; in a pipe or file
                # the next output would be glued to the frame's last line.
                self.console.line()

    def refresh(self) -> None:
        if self._live is not None:
            self._live.refresh()

    def render(self) -> RenderableType:
        metrics = self.metrics
        now = self.clock()
        title = f"Prowzi Workflow Monitor - Session: {self.session_id or '(waiting)'}"
        if self.label:
            title += f" ({self.label})"
        table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False)
        table.add_column("Stage", no_wrap=True, min_width=8)
        table.add_column("Status", no_wrap=True, min_width=6)
        table.add_column("Attempt", justify="right", no_wrap=True)
        table.add_column("Duration", justify="right", no_wrap=True)
        table.add_column("Details", overflow="ellipsis", no_wrap=True, ratio=1)
        if metrics is not None:
            for name in metrics.stage_names:
                self._add_row(table, name, metrics, now)
        return Group(
            Panel(table, title=Text(title, style="bold"), title_align="left", box=box.ROUNDED),
            Panel(self._summary(metrics, now), title="Summary", title_align="left"),
        )

    def _add_row(self, table: Table, name: str, metrics: WorkflowMetrics, now: float) -> None:
        records = [r for r in metrics.stages if r.stage == name]
        if not records:
            symbol, word, style = SYMBOLS["pending"]
            table.add_row(
                Text(name, style="dim"), Text(f"{symbol} {word}", style=style), "", "", ""
            )
            return
        latest = records[-1]
        duration = sum(r.duration_seconds for r in records if r.status != "started")
        running = metrics.completed_at is None and self.interrupted is None
        if latest.status == "started" and running:
            duration += max(0.0, now - latest.timestamp.timestamp())
        symbol, word, style = SYMBOLS.get(latest.status, ("?", latest.status, ""))
        table.add_row(
            name,
            Text(f"{symbol} {word}", style=style),
            str(latest.attempt),
            f"{duration:.2f}s",
            _details(latest),
        )

    def _summary(self, metrics: WorkflowMetrics | None, now: float) -> RenderableType:
        if metrics is None:
            return Text("Waiting for the run's first event...", style="dim")
        if metrics.completed_at is None and self.interrupted is None:
            if self._recorder is not None:
                total = self._recorder.elapsed(now)
            else:
                total = max(0.0, now - metrics.started_at.timestamp())
        else:
            total = metrics.total_duration_seconds
        lines = [
            f"Total Duration: {total:.2f}s",
            f"Stages: {metrics.completed_stage_count}/{metrics.stage_total or DEFAULT_STAGE_COUNT}"
            " completed",
            f"Total Retries: {metrics.total_retries}",
        ]
        usage = format_model_usage(r.details for r in metrics.stages if r.status == "completed")
        if usage:
            lines.append(f"Model usage: {usage}")
        text = Text("\n".join(lines) + "\n")
        if self.interrupted is not None and metrics.completed_at is None:
            text.append("Success: ✗ (interrupted)", style="red")
            text.append(f"\n{self.interrupted}", style="dim")
        elif metrics.completed_at is None:
            text.append("Success: In Progress", style="cyan")
        elif metrics.success:
            text.append("Success: ✓", style="green")
            document = metrics.metadata.get("document_path")
            if document:
                text.append(f"\nDocument: {document}")
        else:
            text.append("Success: ✗", style="red")
            error = metrics.metadata.get("error")
            failed = ", ".join(metrics.failed_stages)
            if error:
                text.append(f"\nError: {failed + ': ' if failed else ''}{error}")
        return text


def _details(record: StageMetrics) -> str:
    if record.status == "started":
        return "Running..."
    if record.status == "retrying":
        return f"Retrying... ({record.error})" if record.error else "Retrying..."
    if record.status == "failed":
        return record.error or "failed"
    if record.status == "skipped":
        return "Restored from checkpoint"
    parts = []
    details = dict(record.details)
    if "llm_calls" in details:  # model usage first, compactly: the row may be cut off
        tokens = int(details.pop("input_tokens", 0)) + int(details.pop("output_tokens", 0))
        parts.append(f"{tokens} tokens ${float(details.pop('cost_usd', 0.0)):.4f}")
        for key in ("llm_calls", "llm_cached_calls", "llm_failed_requests"):
            details.pop(key, None)
    for key, value in details.items():
        if key in _LONG_DETAILS:
            continue
        label = _DETAIL_LABELS.get(key, key.replace("_", " ").capitalize())
        if isinstance(value, dict):  # counts by name: "corpus 12, crossref 3"
            shown = counts_text(value)
        else:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{label}: {shown}")
    return ", ".join(parts)


def counts_text(value: dict[str, Any]) -> str:
    """``corpus 12, crossref 3``; a nested mapping (a provider's details) in parentheses. The
    monitor's and ``prowzi show``'s way of showing counts by name."""
    return (
        ", ".join(
            f"{k} ({counts_text(v)})" if isinstance(v, dict) else f"{k} {v}"
            for k, v in value.items()
        )
        or "-"
    )


# --- the progress callback -------------------------------------------------------------------


class ProgressListener(EventCallback):
    """A progress callback ``(stage, payload)`` that records the run and drives a monitor.

    Given as a run's progress callback, it receives the run's events themselves
    (:class:`~prowzi.events.EventCallback`); called with ``(stage, payload)``, it
    turns them back into events.

    Session ids: the orchestrator generates the run's id, and the caller may name another
    (the design document's ``"my-session-123"``). The listener records under the id it was
    given, so ``telemetry.load_session("my-session-123")`` and ``prowzi monitor
    my-session-123`` find the run by the name the caller chose; the orchestrator's own id is
    kept in the session's ``metadata["run_session_id"]`` and in :attr:`run_session_id`. With
    ``session_id=None`` it records under the run's id.

    If the orchestrator also records the run into the same directory under the same id, the
    second writer finds the session's log locked and stays passive: the run is recorded once.
    """

    def __init__(
        self,
        telemetry: TelemetryCollector | None = None,
        session_id: str | None = None,
        *,
        monitor: WorkflowMonitor | None = None,
    ) -> None:
        self.telemetry = telemetry
        self.session_id = validate_session_id(session_id) if session_id is not None else None
        self.monitor = monitor
        self.run_session_id: str | None = None
        self.errors = 0

    def on_event(self, event: Event) -> None:
        """:meth:`handle`, never raising: a progress callback must not fail the run."""
        try:
            self.handle(event)
        except Exception:
            self.errors += 1
            log.exception("progress listener failed on %s", event.kind)

    def handle(self, event: Event) -> None:
        """Record and show one event (an :class:`EventSink`-style entry point)."""
        self.run_session_id = event.session_id
        if self.session_id is None:
            self.session_id = event.session_id
        if event.session_id != self.session_id:
            changes: dict[str, Any] = {"session_id": self.session_id}
            if isinstance(event, WorkflowStarted):
                changes["metadata"] = {**event.metadata, "run_session_id": event.session_id}
            event = dataclasses.replace(event, **changes)
        if self.telemetry is not None:
            self.telemetry.handle(event)
        if self.monitor is not None:
            self.monitor.apply(event)


def live_monitor(
    session_id: str | None = None, console: Console | None = None, *, clock: Clock = time.time
) -> tuple[ProgressListener, WorkflowMonitor]:
    """A monitor for a run in this process, and the progress callback that feeds it.

    Usage (``prowzi run --monitor``)::

        callback, monitor = live_monitor(session_id, console)
        with monitor:
            result = await orchestrator.run_research(prompt, progress_callback=callback)

    The callback records nothing itself (the orchestrator's telemetry sink does); it only
    draws. ``session_id`` None adopts the run's id from its first event.
    """
    monitor = WorkflowMonitor(session_id, console=console, clock=clock)
    return ProgressListener(session_id=session_id, monitor=monitor), monitor


# --- following another process, replaying a finished session -------------------------------


def writer_gone(reader: EventLogReader) -> str | None:
    """Why the log's writer can no longer finish the run, or None if it may still be running
    (see :func:`prowzi.workflows.eventlog.writer_gone`)."""
    return header_writer_gone(reader.headers[-1]) if reader.headers else None


def follow_session(
    reader: EventLogReader,
    monitor: WorkflowMonitor,
    *,
    poll_interval: float = 0.2,
    liveness_interval: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Clock = time.monotonic,
    writer_lock: Callable[[], bool] | None = None,
) -> None:
    """Feed ``monitor`` from a session's log until the run finishes or its process is gone.
    While ``writer_lock()`` says the session's lock is held (a resume that has not logged
    yet), a gone writer does not end it.

    Events already in the log are applied first. Raises
    :class:`~prowzi.errors.TelemetryError` on a corrupt line; a partial last line is awaited.
    """
    monitor.apply_all(reader.poll())
    last_news = monotonic()
    while not monitor.finished:
        sleep(poll_interval)
        events = reader.poll()
        if events:
            monitor.apply_all(events)
            last_news = monotonic()
            continue
        monitor.refresh()
        if monotonic() - last_news >= liveness_interval:
            last_news = monotonic()
            reason = writer_gone(reader)
            if reason is not None and not (writer_lock is not None and writer_lock()):
                monitor.mark_interrupted(reason)


class ReplayClock:
    """The replayed run's time: the last event's timestamp plus scaled wall time since."""

    def __init__(self, speed: float, monotonic: Clock = time.monotonic) -> None:
        self.speed = speed
        self._monotonic = monotonic
        self._event_time = 0.0
        self._wall = monotonic()

    def at(self, event_time: float) -> None:
        self._event_time = event_time
        self._wall = self._monotonic()

    def __call__(self) -> float:
        return self._event_time + (self._monotonic() - self._wall) * self.speed


def replay_session(
    events: Sequence[Event],
    monitor: WorkflowMonitor,
    *,
    speed: float,
    clock: ReplayClock | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Apply ``events`` to ``monitor`` with their original spacing divided by ``speed``."""
    if speed <= 0:
        raise ValueError("speed must be positive")
    previous: float | None = None
    for event in events:
        if previous is not None and event.timestamp > previous:
            sleep((event.timestamp - previous) / speed)
        previous = event.timestamp
        if clock is not None:
            clock.at(event.timestamp)
        monitor.apply(event)


__all__ = [
    "ProgressListener",
    "ReplayClock",
    "WorkflowMonitor",
    "event_from_progress",
    "follow_session",
    "live_monitor",
    "replay_session",
]

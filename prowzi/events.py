"""Typed workflow events and the bus that fans them out to sinks.

Everything that observes a run (telemetry files, the live event log, Prometheus metrics, the
user's progress callback, webhooks) is an :class:`EventSink`. A sink that raises is logged and
counted; it never fails the workflow.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import orjson

if TYPE_CHECKING:
    from pydantic import TypeAdapter, ValidationError

log = logging.getLogger("prowzi.events")

STAGE_STATUSES = ("started", "completed", "failed", "skipped", "retrying")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every event. ``timestamp`` is seconds since the epoch (UTC)."""

    kind: ClassVar[str] = "event"
    __pydantic_config__: ClassVar[dict[str, Any]] = {"strict": True, "extra": "forbid"}
    """How a record read back is validated (:func:`event_from_record`): every field of its
    type (a boolean is not a number), no field this Prowzi does not know."""
    session_id: str
    timestamp: float

    def as_record(self) -> dict[str, Any]:
        """A JSON-ready dict with an ``event`` key naming the kind."""
        record: dict[str, Any] = {"event": self.kind}
        for f in fields(self):
            record[f.name] = getattr(self, f.name)
        return record


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowStarted(Event):
    kind: ClassVar[str] = "workflow_started"
    prompt: str
    parameters: dict[str, Any] = field(default_factory=dict)
    stages: tuple[str, ...] = ()
    trace_id: str | None = None
    parent_session_id: str | None = None
    resumed_from: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowCompleted(Event):
    kind: ClassVar[str] = "workflow_completed"
    duration_seconds: float
    document_path: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowFailed(Event):
    kind: ClassVar[str] = "workflow_failed"
    duration_seconds: float
    stage: str | None
    error: str
    error_type: str
    cancelled: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class StageEvent(Event):
    stage: str
    attempt: int = 1
    trace_id: str | None = None
    span_id: str | None = None

    @property
    def status(self) -> str:
        return self.kind.removeprefix("stage_")


@dataclass(frozen=True, slots=True, kw_only=True)
class StageStarted(StageEvent):
    kind: ClassVar[str] = "stage_started"


@dataclass(frozen=True, slots=True, kw_only=True)
class StageCompleted(StageEvent):
    kind: ClassVar[str] = "stage_completed"
    duration_seconds: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class _AttemptFailed(StageEvent):
    """What every failed attempt reports (one to be retried, or the last)."""

    duration_seconds: float
    error: str
    error_type: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StageRetrying(_AttemptFailed):
    kind: ClassVar[str] = "stage_retrying"
    delay_seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StageFailed(_AttemptFailed):
    kind: ClassVar[str] = "stage_failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class StageSkipped(StageEvent):
    """A stage restored from a checkpoint instead of run."""

    kind: ClassVar[str] = "stage_skipped"
    reason: str = "restored from checkpoint"
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointSaved(Event):
    kind: ClassVar[str] = "checkpoint_saved"
    stage: str
    checkpoint_id: str
    path: str
    size_bytes: int
    duration_seconds: float
    completed_stages: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointFailed(Event):
    kind: ClassVar[str] = "checkpoint_failed"
    stage: str
    error: str


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (
        WorkflowStarted,
        WorkflowCompleted,
        WorkflowFailed,
        StageStarted,
        StageCompleted,
        StageRetrying,
        StageFailed,
        StageSkipped,
        CheckpointSaved,
        CheckpointFailed,
    )
}


WEBHOOK_EVENT_TYPES = (
    "run.started",
    "stage.completed",
    "stage.failed",
    "stage.retrying",
    "checkpoint.saved",
    "run.completed",
    "run.failed",
    "run.cancelled",
    "run.budget_exceeded",
)
"""The event types webhooks deliver (:func:`webhook_type`)."""


def webhook_type(event: Event) -> str | None:
    """The webhook event type of ``event``, or None when webhooks do not send it."""
    if isinstance(event, WorkflowFailed):
        if event.cancelled:
            return "run.cancelled"
        return "run.budget_exceeded" if event.error_type == "budget" else "run.failed"
    return _WEBHOOK_TYPES.get(event.kind)


_WEBHOOK_TYPES = {
    "workflow_started": "run.started",
    "stage_completed": "stage.completed",
    "stage_failed": "stage.failed",
    "stage_retrying": "stage.retrying",
    "checkpoint_saved": "checkpoint.saved",
    "workflow_completed": "run.completed",
}


def event_from_record(record: dict[str, Any], *, strict: bool = True) -> Event:
    """Rebuild an event from :meth:`Event.as_record` output (e.g. a line of an event log).

    The record is validated (pydantic): a field of the wrong type (``"timestamp": "soon"``),
    a timestamp no date can hold (``1e20``), a missing or unknown field is a ``ValueError``
    saying which, never an event that breaks its readers later. ``strict`` (what was read
    from a file) checks it as JSON, where a boolean is not a number; ``strict=False`` (a
    record made in this process) converts what it can and keeps values JSON cannot hold."""
    data = dict(record)
    kind = data.pop("event", None)
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown event kind {kind!r}")
    from pydantic import ValidationError

    adapter = _record_adapter(cls)
    try:
        if not strict:
            return adapter.validate_python(data, strict=False)
        try:
            encoded = orjson.dumps(data)
        except TypeError as exc:  # a value JSON cannot hold: not what a log line gives
            raise ValueError(str(exc)) from None
        return adapter.validate_json(encoded)
    except ValidationError as exc:
        raise ValueError(validation_reason(exc)) from None


def _valid_time(event: Event) -> Event:
    try:
        datetime.fromtimestamp(event.timestamp, UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"'timestamp' is out of range ({event.timestamp!r})") from None
    return event


_ADAPTERS: dict[str, TypeAdapter[Event]] = {}


def _record_adapter(cls: type[Event]) -> TypeAdapter[Event]:
    """The validator of one kind's records (pydantic is imported when a record is first read,
    not by every command that imports the event types)."""
    adapter = _ADAPTERS.get(cls.kind)
    if adapter is None:
        from typing import Annotated, cast

        from pydantic import AfterValidator, TypeAdapter

        checked = Annotated[cls, AfterValidator(_valid_time)]  # type: ignore[valid-type]
        adapter = _ADAPTERS[cls.kind] = cast("TypeAdapter[Event]", TypeAdapter(checked))
    return adapter


def validation_reason(exc: ValidationError) -> str:
    """A pydantic error as one line: what is wrong, and where (``'stages.0.attempt' ...``)."""
    reasons = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"]
        if error["type"] == "value_error":
            message = str(error.get("ctx", {}).get("error", message))
        if not where:
            reasons.append(message)
        elif error["type"] == "missing":
            reasons.append(f"'{where}' is missing")
        elif error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            reasons.append(f"'{where}' is not a known field")
        else:
            reasons.append(f"'{where}' is invalid: {message[:1].lower()}{message[1:]}")
    return "; ".join(reasons) or str(exc)


@runtime_checkable
class EventSink(Protocol):
    """Observes events. ``handle`` may return an awaitable, which the bus awaits."""

    name: str

    def handle(self, event: Event) -> Awaitable[None] | None: ...


SinkErrorHook = Callable[[str, BaseException], None]


SINK_TIMEOUT_SECONDS = 10.0
"""How long the bus waits for an asynchronous sink (a progress callback) per event."""


class EventBus:
    """Fans each event out to every sink, in order, isolating their failures.

    An asynchronous sink that takes longer than ``timeout`` is abandoned for that event and
    counted as failed, so a stuck callback cannot stall the run. (A synchronous sink that
    blocks cannot be interrupted; sinks must not block.)
    """

    __slots__ = ("_on_error", "errors", "sinks", "timeout")

    def __init__(
        self,
        sinks: Iterable[EventSink] = (),
        on_error: SinkErrorHook | None = None,
        timeout: float = SINK_TIMEOUT_SECONDS,
    ) -> None:
        self.sinks: list[EventSink] = list(sinks)
        self.errors: dict[str, int] = {}
        self._on_error = on_error
        self.timeout = timeout

    def add(self, sink: EventSink) -> None:
        self.sinks.append(sink)

    async def emit(self, event: Event) -> None:
        for sink in self.sinks:
            try:
                result = sink.handle(event)
                if result is not None and inspect.isawaitable(result):
                    await asyncio.wait_for(result, self.timeout)
            except Exception as exc:  # a sink must never fail the run
                self._sink_failed(sink, event.kind, exc)

    def notify(self, method: str, *args: Any) -> None:
        """Call ``method(*args)`` on each sink that has it: what a run tells its sinks that is
        not an event (an attempt's model calls, for the metrics sink's
        ``observe_model_calls``). Failures are isolated and counted as :meth:`emit`'s are."""
        for sink in self.sinks:
            call = getattr(sink, method, None)
            if call is None:
                continue
            try:
                call(*args)
            except Exception as exc:  # a sink must never fail the run
                self._sink_failed(sink, method, exc)

    def _sink_failed(self, sink: EventSink, what: str, exc: Exception) -> None:
        name = getattr(sink, "name", type(sink).__name__)
        self.errors[name] = self.errors.get(name, 0) + 1
        log.warning("event sink %s failed on %s: %s: %s", name, what, type(exc).__name__, exc)
        if self._on_error is not None:
            try:
                self._on_error(name, exc)
            except Exception:  # the error hook is telemetry too
                log.exception("sink error hook failed")


ProgressCallback = Callable[[str, dict[str, Any]], Awaitable[None] | None]


def progress_payload(event: Event) -> tuple[str, dict[str, Any]] | None:
    """The ``(stage, payload)`` a progress callback receives for an event.

    Workflow-level events use the stage name ``"workflow"``.
    """
    record = event.as_record()
    kind = record.pop("event")
    if isinstance(event, StageEvent):
        stage = record.pop("stage")
        record["status"] = event.status
        return stage, record
    if isinstance(event, WorkflowStarted | WorkflowCompleted | WorkflowFailed):
        record["status"] = kind.removeprefix("workflow_")
        return "workflow", record
    if isinstance(event, CheckpointSaved):
        stage = record.pop("stage")
        record["status"] = "checkpoint_saved"
        return stage, record
    return None


def event_from_progress(stage: str, payload: Mapping[str, Any]) -> Event | None:
    """The event a progress callback's ``(stage, payload)`` came from (the inverse of
    :func:`progress_payload`), or None if it is not one."""
    record = dict(payload)
    status = record.pop("status", None)
    if not isinstance(status, str):
        return None
    if stage == "workflow" and status in ("started", "completed", "failed"):
        record["event"] = f"workflow_{status}"
    elif status == "checkpoint_saved":
        record["event"] = status
        record["stage"] = stage
    else:
        record["event"] = f"stage_{status}"
        record["stage"] = stage
    try:
        return event_from_record(record, strict=False)
    except ValueError as exc:
        log.debug("progress payload for %s is not an event: %s", stage, exc)
        return None


class EventCallback(ABC):
    """A progress callback that takes the events themselves.

    :class:`CallbackSink` hands such a callback each event (:meth:`on_event`), with no
    ``(stage, payload)`` in between. Called as any progress callback is,
    ``callback(stage, payload)``, it turns the payload back into its event.
    """

    @abstractmethod
    def on_event(self, event: Event) -> Awaitable[None] | None:
        """Observe one event of the run."""

    def __call__(self, stage: str, payload: dict[str, Any]) -> Awaitable[None] | None:
        event = event_from_progress(stage, payload)
        return None if event is None else self.on_event(event)


class CallbackSink:
    """Adapts a user's ``callback(stage, payload)``, sync or async, into a sink; an
    :class:`EventCallback` receives the events themselves."""

    name = "callback"

    def __init__(self, callback: ProgressCallback) -> None:
        self._callback = callback
        self._on_event = callback.on_event if isinstance(callback, EventCallback) else None

    def handle(self, event: Event) -> Awaitable[None] | None:
        if self._on_event is not None:
            return self._on_event(event)
        converted = progress_payload(event)
        if converted is None:
            return None
        return self._callback(*converted)

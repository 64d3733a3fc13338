"""Per-session telemetry: the event log, the session JSON file, and the readers of both.

:class:`TelemetryCollector` is an event sink. For each session it keeps

* ``<output_dir>/events/<session_id>.jsonl``: the live event stream (see
  :mod:`prowzi.workflows.eventlog`), one line per event, written as the event happens;
* ``<output_dir>/<session_id>.json``: the design document's session record, rewritten
  atomically at stage boundaries and at completion. It is derivable from the event log, and
  :meth:`TelemetryCollector.rebuild_session` derives it;
* the session index (:mod:`prowzi.workflows.session_index`): a SQLite cache of per-session
  summaries in the user's cache directory, so that :meth:`~TelemetryCollector.list_sessions`
  need not parse thousands of files. The session files are the truth: a row is used only while
  its file's signature (inode, size, mtime) matches it, and a lost or damaged index is rebuilt.

With a store (``store=``, the ``telemetry_url`` setting: a path, ``file://``, ``s3://`` or
``az://``, see :func:`prowzi.storage.remote.open_store`), each session file is also put there as
``sessions/<session_id>.json``, at the same moments and from the same thread as the local file.
The readers find the sessions that exist only there (recorded on another machine), so listing
and showing work from any machine that reaches the store. A session this machine has a file for
is read from that file, beside its event log (which tells whether its writer is alive); event
logs stay local files.

Per event the collector appends one line to the log and updates its in-memory record; the
snapshot file (and the log's fsync) is written by a background thread at stage boundaries, and
synchronously at the end of the run so that a finished run's file is complete when the run
returns. Every failure (unwritable directory, full disk) is logged and counted in
:attr:`TelemetryCollector.errors`; none reaches the workflow.

Stage records: a ``stage_started`` event opens a record with status ``started``; the outcome of
that attempt (``completed``, ``retrying`` or ``failed``) replaces it in place. A finished run's
``stages`` list therefore holds one record per attempt outcome, as in the design document: a
``retrying`` record with its error, then the ``completed`` record of attempt 2.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import heapq
import logging
import os
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

from prowzi import __version__
from prowzi.errors import InvalidInputError, SessionNotFoundError, TelemetryError
from prowzi.events import (
    CheckpointFailed,
    CheckpointSaved,
    Event,
    StageCompleted,
    StageEvent,
    StageFailed,
    StageRetrying,
    StageSkipped,
    StageStarted,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
    validation_reason,
)
from prowzi.ids import validate_session_id
from prowzi.storage.blob import BlobInfo, BlobNotFoundError, BlobStore
from prowzi.storage.files import (
    SHARED_FILE,
    atomic_write,
    fsync_directory,
    open_nofollow,
    read_nofollow,
)
from prowzi.workflows.eventlog import (
    HEADER_KIND,
    EventLogBusyError,
    EventLogReader,
    EventLogWriter,
    LogHeader,
    decode_line,
    iter_events_lenient,
)
from prowzi.workflows.eventlog import writer_gone as header_writer_gone

if TYPE_CHECKING:
    from pydantic import TypeAdapter

    from prowzi.workflows.session_index import IndexRow, SessionIndex

log = logging.getLogger("prowzi.telemetry")

SESSION_FORMAT_VERSION = 1
"""``metadata.format_version`` of the session files this module writes."""

DEFAULT_STAGE_COUNT = 7
SessionStatus = Literal["running", "interrupted", "completed", "failed", "corrupt"]
SESSION_STATUSES: tuple[str, ...] = ("running", "interrupted", "completed", "failed", "corrupt")
"""As readers report them. A session file records only running, completed or failed;
``interrupted`` is a running session whose writing process is gone (see
:meth:`TelemetryCollector.status_of`)."""

_EVENTS_DIR = "events"
_HEADER_MARK = b'{"event":"' + HEADER_KIND.encode() + b'"'
"""How a writer's header line starts (see :class:`EventLogWriter`)."""
_RUN_ENDS: dict[str, SessionStatus] = {
    WorkflowCompleted.kind: "completed",
    WorkflowFailed.kind: "failed",
}
_IDLE_SECONDS = 2.0
_LOG_RETRY_SECONDS = 1.0
_PROMPT_IN_INDEX = 200


# --- timestamps ---------------------------------------------------------------------------


def format_timestamp(value: datetime | float) -> str:
    """ISO-8601 UTC with a ``Z``, to the millisecond: ``2024-01-15T10:30:02.123Z``."""
    dt = value if isinstance(value, datetime) else datetime.fromtimestamp(value, UTC)
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_timestamp(value: object) -> datetime:
    """The inverse of :func:`format_timestamp`; accepts any ISO-8601 form with an offset."""
    if not isinstance(value, str):
        raise ValueError(f"timestamp {value!r} is not a string")
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no time zone")
    try:
        return dt.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+14:00 is before the first UTC instant
        raise ValueError(f"timestamp {value!r} is out of range") from None


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _seconds(value: float) -> float:
    return round(value, 6)


# --- the records of the design document ----------------------------------------------------


@dataclass(slots=True)
class StageMetrics:
    """One stage attempt (or its outcome) in a session's ``stages`` list."""

    stage: str
    status: str  # started, completed, failed, skipped, retrying
    attempt: int
    duration_seconds: float
    timestamp: datetime
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "stage": self.stage,
            "status": self.status,
            "attempt": self.attempt,
            "duration_seconds": _seconds(self.duration_seconds),
            "timestamp": format_timestamp(self.timestamp),
            "details": self.details,
        }
        if self.error is not None:
            record["error"] = self.error
        return record


@dataclass(slots=True)
class WorkflowMetrics:
    """A session: what ran, when, how long, with what retries and failures."""

    session_id: str
    prompt: str
    started_at: datetime
    completed_at: datetime | None = None
    total_duration_seconds: float = 0.0
    stages: list[StageMetrics] = field(default_factory=list)
    total_retries: int = 0
    failed_stages: list[str] = field(default_factory=list)
    success: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> SessionStatus:
        """``running`` until a workflow completed/failed event is recorded (a run that was
        killed stays ``running``; its event log tells how far it got)."""
        if self.completed_at is None:
            return "running"
        return "completed" if self.success else "failed"

    @property
    def stage_names(self) -> list[str]:
        """The run's stages in order: the declared ones, then any others seen."""
        declared = self.metadata.get("stages")
        names = [s for s in declared if isinstance(s, str)] if isinstance(declared, list) else []
        for record in self.stages:
            if record.stage not in names:
                names.append(record.stage)
        return names

    @property
    def stage_total(self) -> int:
        declared = self.metadata.get("stages")
        return len(declared) if isinstance(declared, list) and declared else DEFAULT_STAGE_COUNT

    def latest_by_stage(self) -> dict[str, StageMetrics]:
        latest: dict[str, StageMetrics] = {}
        for record in self.stages:
            latest[record.stage] = record
        return latest

    @property
    def completed_stage_count(self) -> int:
        """Stages whose latest record is completed (or restored from a checkpoint)."""
        return sum(
            1 for r in self.latest_by_stage().values() if r.status in ("completed", "skipped")
        )

    def to_dict(self) -> dict[str, Any]:
        """The session file's content: the design document's keys, plus ``metadata``."""
        return {
            "session_id": self.session_id,
            "prompt": self.prompt,
            "started_at": format_timestamp(self.started_at),
            "completed_at": (
                format_timestamp(self.completed_at) if self.completed_at is not None else None
            ),
            "total_duration_seconds": _seconds(self.total_duration_seconds),
            "total_retries": self.total_retries,
            "failed_stages": list(self.failed_stages),
            "success": self.success,
            "stages": [s.to_dict() for s in self.stages],
            "metadata": self.metadata,
        }

    @classmethod
    def from_json(cls, data: bytes | str) -> WorkflowMetrics:
        """Parse a session file's content; raises ``ValueError`` saying what is wrong (its
        JSON, or which field is missing or of the wrong type)."""
        from pydantic import ValidationError

        try:
            return _session_file_adapter().validate_json(data, strict=True)
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                if error["type"] == "json_invalid":
                    raise ValueError(_json_problem(data)) from None
                if not error["loc"] and error["type"] in ("model_type", "model_attributes_type"):
                    raise ValueError("the content is not a JSON object") from None
            raise ValueError(validation_reason(exc)) from None

    @classmethod
    def from_dict(cls, data: object) -> WorkflowMetrics:
        """:meth:`from_json` for content already parsed."""
        try:
            encoded = orjson.dumps(data)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        return cls.from_json(encoded)


def _json_problem(data: bytes | str) -> str:
    """Why ``data`` is not JSON: empty, truncated, or not JSON at all."""
    if not data.strip():
        return "empty"
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return "truncated JSON" if "unexpected end" in str(exc).lower() else "not JSON"
    return "not JSON"


@functools.cache
def _session_file_adapter() -> TypeAdapter[WorkflowMetrics]:
    """The validator of session files: the design document's keys, each of its type
    (strictly: a boolean is not a count), timestamps ISO-8601 with a zone
    (:func:`parse_timestamp`), a newer format refused before anything else is looked at.
    Built on first use: listing from the index needs no pydantic."""
    from typing import Annotated, NotRequired

    from pydantic import (
        AfterValidator,
        BaseModel,
        ConfigDict,
        PlainValidator,
        TypeAdapter,
        model_validator,
        with_config,
    )
    from typing_extensions import TypedDict

    Time = Annotated[datetime, PlainValidator(parse_timestamp)]

    @with_config(ConfigDict(strict=True))
    class StageRecord(TypedDict):  # a dict: faster to turn into StageMetrics than a model
        stage: str
        status: str
        attempt: int
        duration_seconds: float
        timestamp: Time
        details: NotRequired[dict[str, Any]]
        error: NotRequired[str | None]

    class SessionFile(BaseModel):
        model_config = ConfigDict(strict=True)
        session_id: str
        prompt: str
        started_at: Time
        completed_at: Time | None = None
        total_duration_seconds: float
        stages: list[StageRecord]
        total_retries: int
        failed_stages: list[str]
        success: bool
        metadata: dict[str, Any] = {}

        @model_validator(mode="before")
        @classmethod
        def _not_newer(cls, data: Any) -> Any:
            metadata = data.get("metadata") if isinstance(data, dict) else None
            version = metadata.get("format_version") if isinstance(metadata, dict) else None
            if isinstance(version, int) and version > SESSION_FORMAT_VERSION:
                raise ValueError(
                    f"it was written by a newer Prowzi (format {version}, this one reads "
                    f"{SESSION_FORMAT_VERSION})"
                )
            return data

    def metrics(record: SessionFile) -> WorkflowMetrics:
        return WorkflowMetrics(
            session_id=record.session_id,
            prompt=record.prompt,
            started_at=record.started_at,
            completed_at=record.completed_at,
            total_duration_seconds=record.total_duration_seconds,
            stages=[StageMetrics(**stage) for stage in record.stages],
            total_retries=record.total_retries,
            failed_stages=record.failed_stages,
            success=record.success,
            metadata=record.metadata,
        )

    return TypeAdapter(Annotated[SessionFile, AfterValidator(metrics)])  # type: ignore[arg-type]


class CorruptSessionError(TelemetryError):
    """A session file exists but cannot be read as a session."""

    def __init__(
        self, session_id: str, path: Path | str, reason: str, *, has_event_log: bool
    ) -> None:
        super().__init__(f"session file {path} is corrupt: {reason}")
        self.session_id = session_id
        self.path = path
        self.reason = reason
        self.has_event_log = has_event_log


# --- events -> records ---------------------------------------------------------------------


class SessionRecorder:
    """Folds a session's events into its :class:`WorkflowMetrics`.

    The collector, the rebuild from a log, and the monitor all use this one reducer, so the
    file, the rebuilt file and the screen agree.
    """

    __slots__ = ("_base_duration", "_open", "_segment_start", "metrics", "session_id")

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.metrics: WorkflowMetrics | None = None
        self._open: dict[str, int] = {}
        self._segment_start = 0.0
        self._base_duration = 0.0

    def elapsed(self, now: float) -> float:
        """The session's duration at ``now`` while it runs: earlier runs of the session (it
        was resumed) plus the time since this run started."""
        return self._base_duration + max(0.0, now - self._segment_start)

    @classmethod
    def from_events(cls, session_id: str, events: Iterable[Event]) -> SessionRecorder:
        recorder = cls(session_id)
        for event in events:
            recorder.apply(event)
        return recorder

    def apply(self, event: Event) -> bool:
        """Record one event. Returns whether it is a boundary (a snapshot is due)."""
        if isinstance(event, WorkflowStarted):
            self._started(event)
            return True
        metrics = self._ensure(event)
        if not metrics.completed_at:
            metrics.total_duration_seconds = self._base_duration + max(
                0.0, event.timestamp - self._segment_start
            )
        if isinstance(event, StageEvent):
            return self._stage(metrics, event)
        if isinstance(event, WorkflowCompleted):
            self._close_open(metrics, event.timestamp, "workflow completed")
            metrics.completed_at = _utc(event.timestamp)
            metrics.total_duration_seconds = self._base_duration + event.duration_seconds
            metrics.success = True
            metrics.metadata["document_path"] = event.document_path
            return True
        if isinstance(event, WorkflowFailed):
            self._close_open(metrics, event.timestamp, event.error)
            metrics.completed_at = _utc(event.timestamp)
            metrics.total_duration_seconds = self._base_duration + event.duration_seconds
            metrics.success = False
            if event.stage and event.stage not in metrics.failed_stages:
                metrics.failed_stages.append(event.stage)
            metrics.metadata["error"] = event.error
            metrics.metadata["error_type"] = event.error_type
            metrics.metadata["cancelled"] = event.cancelled
            return True
        if isinstance(event, CheckpointSaved):
            metrics.metadata["last_checkpoint"] = event.checkpoint_id
            return False
        if isinstance(event, CheckpointFailed):
            failures = metrics.metadata.get("checkpoint_failures", 0)
            metrics.metadata["checkpoint_failures"] = (
                failures + 1 if isinstance(failures, int) else 1
            )
        return False

    def _started(self, event: WorkflowStarted) -> None:
        added = {
            **event.metadata,
            "format_version": SESSION_FORMAT_VERSION,
            "prowzi_version": __version__,
            "trace_id": event.trace_id,
            "parameters": event.parameters,
            "stages": list(event.stages),
            "parent_session_id": event.parent_session_id,
            "resumed_from": event.resumed_from,
        }
        metrics = self.metrics
        if metrics is None:
            self.metrics = WorkflowMetrics(
                session_id=self.session_id,
                prompt=event.prompt,
                started_at=_utc(event.timestamp),
                metadata={**added, "runs": 1, "document_path": None},
            )
            self._base_duration = 0.0
        else:
            # the same session run again (a resume): keep its history, reopen it
            runs = metrics.metadata.get("runs", 1)
            for stale in ("error", "error_type", "cancelled"):
                metrics.metadata.pop(stale, None)
            metrics.metadata.update(added)
            metrics.metadata["runs"] = (runs if isinstance(runs, int) else 1) + 1
            metrics.prompt = event.prompt or metrics.prompt
            metrics.completed_at = None
            metrics.success = False
            self._base_duration = metrics.total_duration_seconds
        self._segment_start = event.timestamp
        self._open.clear()

    def _ensure(self, event: Event) -> WorkflowMetrics:
        # events of a run whose start was not seen (a listener attached late)
        if self.metrics is None:
            self.metrics = WorkflowMetrics(
                session_id=self.session_id,
                prompt="",
                started_at=_utc(event.timestamp),
                metadata={"format_version": SESSION_FORMAT_VERSION, "runs": 1},
            )
            self._segment_start = event.timestamp
        return self.metrics

    def _stage(self, metrics: WorkflowMetrics, event: StageEvent) -> bool:
        when = _utc(event.timestamp)
        if isinstance(event, StageStarted):
            self._open[event.stage] = len(metrics.stages)
            metrics.stages.append(StageMetrics(event.stage, "started", event.attempt, 0.0, when))
            return False
        if isinstance(event, StageSkipped):
            metrics.stages.append(
                StageMetrics(
                    event.stage,
                    "skipped",
                    event.attempt,
                    0.0,
                    when,
                    details={**event.details, "reason": event.reason},
                )
            )
            return True
        details: dict[str, Any]
        if isinstance(event, StageCompleted):
            details, error = dict(event.details), None
            if event.stage in metrics.failed_stages:
                metrics.failed_stages.remove(event.stage)
        elif isinstance(event, StageRetrying):
            metrics.total_retries += 1
            details = {"error_type": event.error_type, "delay_seconds": event.delay_seconds}
            error = event.error
        elif isinstance(event, StageFailed):
            details, error = {"error_type": event.error_type}, event.error
            if event.stage not in metrics.failed_stages:
                metrics.failed_stages.append(event.stage)
        else:
            return False
        record = StageMetrics(
            event.stage,
            event.status,
            event.attempt,
            event.duration_seconds,
            when,
            details=details,
            error=error,
        )
        index = self._open.pop(event.stage, None)
        if (
            index is not None
            and index < len(metrics.stages)
            and metrics.stages[index].attempt == event.attempt
        ):
            metrics.stages[index] = record
        else:
            metrics.stages.append(record)
        return True

    def _close_open(self, metrics: WorkflowMetrics, ts: float, error: str) -> None:
        # an attempt still open when the run ends was interrupted (cancelled, crashed stage loop)
        for index in self._open.values():
            if index < len(metrics.stages) and metrics.stages[index].status == "started":
                record = metrics.stages[index]
                record.status = "failed"
                record.duration_seconds = max(0.0, ts - record.timestamp.timestamp())
                record.error = error
        self._open.clear()


# --- listing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _LogFacts:
    """What the end of an event log says (see :meth:`TelemetryCollector._log_facts`)."""

    ended: SessionStatus | None
    """``completed`` or ``failed`` when the log's last event ends the run."""
    header: LogHeader | None
    """The newest writer's header; None when there is none or it cannot be read."""


def _running_status(facts: _LogFacts) -> SessionStatus:
    """How to report a session its file records as running, from what its log says: the
    run's end (its writer was stopped before writing the file), ``interrupted`` when the
    writer is gone, else running."""
    if facts.ended is not None:
        return facts.ended
    if facts.header is not None and header_writer_gone(facts.header) is not None:
        return "interrupted"
    return "running"


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """One row of :meth:`TelemetryCollector.list_sessions`."""

    session_id: str
    status: SessionStatus
    prompt: str = ""
    started_at: datetime | None = None
    completed_at: datetime | None = None
    total_duration_seconds: float = 0.0
    total_retries: int = 0
    stages_completed: int = 0
    stages_total: int = DEFAULT_STAGE_COUNT
    failed_stages: tuple[str, ...] = ()
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "status": self.status,
            "prompt": self.prompt,
            "started_at": format_timestamp(self.started_at) if self.started_at else None,
            "completed_at": format_timestamp(self.completed_at) if self.completed_at else None,
            "total_duration_seconds": _seconds(self.total_duration_seconds),
            "total_retries": self.total_retries,
            "stages_completed": self.stages_completed,
            "stages_total": self.stages_total,
            "failed_stages": list(self.failed_stages),
            "error": self.error,
        }


def _entry(metrics: WorkflowMetrics) -> dict[str, Any]:
    """A session's summary as the index keeps it (what a listing shows)."""
    return {
        "session_id": metrics.session_id,
        "status": metrics.status,
        "prompt": metrics.prompt[:_PROMPT_IN_INDEX],
        "started": metrics.started_at.timestamp(),
        "completed": metrics.completed_at.timestamp() if metrics.completed_at else None,
        "duration": metrics.total_duration_seconds,
        "retries": metrics.total_retries,
        "done": metrics.completed_stage_count,
        "total": metrics.stage_total,
        "failed": metrics.failed_stages,
    }


def _corrupt_entry(session_id: str, modified: float, reason: str) -> dict[str, Any]:
    """The summary of a record that cannot be read: listed by when it was last written."""
    return {"session_id": session_id, "status": "corrupt", "started": modified, "error": reason}


def _summary(entry: dict[str, Any]) -> SessionSummary:
    """The listing row of an index entry (:func:`_entry`, :func:`_corrupt_entry`, or one read
    back from the session index). Raises ``ValueError`` for an entry that is not one (a
    damaged or foreign index: the caller reads the session's record instead)."""
    return _summary_adapter().validate_python(entry)


@functools.cache
def _summary_adapter() -> TypeAdapter[SessionSummary]:
    """The validator of index entries (strict: a count is an int, a time a number that a date
    can hold, a status one a reader reports)."""
    from typing import Annotated, NotRequired

    from pydantic import AfterValidator, ConfigDict, TypeAdapter, with_config
    from typing_extensions import TypedDict

    def in_range(value: float) -> float:
        try:
            _utc(value)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"time {value!r} is out of range") from None
        return value

    Time = Annotated[float, AfterValidator(in_range)] | None

    @with_config(ConfigDict(strict=True))
    class IndexEntry(TypedDict):
        session_id: str
        status: SessionStatus
        prompt: NotRequired[str]
        started: NotRequired[Time]
        completed: NotRequired[Time]
        duration: NotRequired[float]
        retries: NotRequired[int]
        done: NotRequired[int]
        total: NotRequired[int]
        failed: NotRequired[list[str]]
        error: NotRequired[str | None]

    def summary(entry: IndexEntry) -> SessionSummary:
        started, completed = entry.get("started"), entry.get("completed")
        return SessionSummary(
            session_id=entry["session_id"],
            status=entry["status"],
            prompt=entry.get("prompt", ""),
            started_at=None if started is None else _utc(started),
            completed_at=None if completed is None else _utc(completed),
            total_duration_seconds=entry.get("duration", 0.0),
            total_retries=entry.get("retries", 0),
            stages_completed=entry.get("done", 0),
            stages_total=entry.get("total", DEFAULT_STAGE_COUNT),
            failed_stages=tuple(entry.get("failed", ())),
            error=entry.get("error"),
        )

    return TypeAdapter(Annotated[IndexEntry, AfterValidator(summary)])  # type: ignore[arg-type]


def _file_signature(st: os.stat_result) -> str:
    """A local session file's version: a write renames a new file into place (a new inode),
    and an edit in place changes its size or mtime."""
    return f"f{st.st_ino:x}.{st.st_size:x}.{st.st_mtime_ns:x}"


_BLOB_MARK = "s"


def _blob_signature(blob: BlobInfo) -> str:
    """A session blob's version in the store: its etag."""
    return _BLOB_MARK + blob.etag


_STORE_PREFIX = "sessions/"
_STORE_READERS = 16
"""Blobs read at once by a listing that must read many (a cold index over a bucket)."""
_MAX_SESSION_BYTES = 64 << 20
"""A session file is a few kilobytes; a larger blob is listed as corrupt without being read."""


def _store_name(session_id: str) -> str:
    """A session file's name in the telemetry store."""
    return f"{_STORE_PREFIX}{validate_session_id(session_id)}.json"


def _location_of(store: BlobStore | Path | str) -> str:
    """A store location, for messages."""
    return str(store) if isinstance(store, str | Path) else store.url


def _read_regular(path: Path) -> tuple[bytes, os.stat_result]:
    """A regular file's bytes and the ``stat`` of the very file read (never through a
    symlink, never a FIFO)."""
    fd = open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return os.pread(fd, st.st_size, 0), st
    finally:
        os.close(fd)


# --- the collector ----------------------------------------------------------------------


class _SessionState:
    __slots__ = ("lock", "log", "log_retry_at", "passive", "recorder", "session_id")

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.log_retry_at = 0.0
        self.recorder = SessionRecorder(session_id)
        self.log: EventLogWriter | None = None
        self.passive = False
        self.lock = threading.Lock()


# collectors whose writer thread ran; the thread is a daemon, so at exit the snapshots it
# still owes are written by this hook
_WITH_WRITER: weakref.WeakSet[TelemetryCollector] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for collector in list(_WITH_WRITER):
        collector.flush(timeout=5.0)


class TelemetryCollector:
    """Records sessions under ``output_dir`` (and in ``store``, if given) and reads them back.

    As a sink (``name = "telemetry"``) it never raises: failures are logged and counted in
    :attr:`errors` (by operation in :attr:`error_counts`: ``store`` for the store's). Set
    ``background=False`` to write snapshots in the caller's thread (deterministic tests);
    ``fsync=False`` skips fsyncs. ``store`` is a location :func:`~prowzi.storage.remote.open_store`
    opens (on first use) or a :class:`~prowzi.storage.blob.BlobStore`.
    """

    name = "telemetry"

    def __init__(
        self,
        output_dir: Path | str = Path("./prowzi_telemetry"),
        *,
        background: bool = True,
        fsync: bool = True,
        writer_lock: Callable[[str], bool] | None = None,
        store: BlobStore | Path | str | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self._store_location = store
        self._store: BlobStore | None = None
        self._store_lock = threading.Lock()
        self._writer_lock = writer_lock
        """``session_id -> whether a run or resume holds the session's writer lock``: such a
        session is running even while its log still shows a writer that is gone (a resume
        takes the lock before it logs anything)."""
        self.errors = 0
        self.error_counts: dict[str, int] = {}
        self.last_error: str | None = None
        self._background = background
        self._fsync = fsync
        self._sessions: dict[str, _SessionState] = {}
        self._cond = threading.Condition()
        self._dirty: dict[str, _SessionState] = {}
        self._busy: str | None = None  # the session the writer thread is writing
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()
        self._facts: dict[str, tuple[tuple[int, int, int], _LogFacts]] = {}
        self._index: SessionIndex | None = None
        self._index_lock = threading.Lock()

    @classmethod
    def reader(
        cls,
        output_dir: Path | str,
        *,
        store: BlobStore | Path | str | None,
        checkpoints: Path | str | None,
    ) -> TelemetryCollector:
        """The collector the CLI, the monitor and the service read with: a session whose log
        shows a writer that is gone is still running while a live writer holds its lease in
        the checkpoint store at ``checkpoints`` (:mod:`prowzi.workflows.liveness`; None: no
        such store to ask)."""
        from prowzi.workflows.liveness import lease_probe

        probe = lease_probe(checkpoints) if checkpoints is not None else None
        return cls(output_dir, writer_lock=probe, store=store)

    def writer_alive(self, session_id: str) -> bool:
        """Whether a live writer holds the session's lease (False without a probe, or when
        the probe cannot tell)."""
        if self._writer_lock is None:
            return False
        try:
            return self._writer_lock(session_id)
        except Exception as exc:
            log.debug("could not probe the lease of %s: %s", session_id, exc)
            return False

    # paths

    def session_path(self, session_id: str) -> Path:
        return self.output_dir / f"{validate_session_id(session_id)}.json"

    def event_log_path(self, session_id: str) -> Path:
        return self.output_dir / _EVENTS_DIR / f"{validate_session_id(session_id)}.jsonl"

    @property
    def index_path(self) -> Path:
        """The session index's SQLite file: in the user's cache directory, one per telemetry
        directory and store (see :mod:`prowzi.workflows.session_index`)."""
        from prowzi.storage.catalog import default_catalog_path

        key = f"telemetry:{self.output_dir.absolute()}"
        store = self.store
        if store is not None:
            key += f"\n{store.url}"
        return default_catalog_path(key)

    @property
    def store(self) -> BlobStore | None:
        """The store that also holds the session files, opened on first use (None when there
        is none). A location that cannot be opened is :class:`~prowzi.errors.ConfigError`."""
        if self._store_location is None:
            return None
        with self._store_lock:
            if self._store is None:
                location = self._store_location
                if isinstance(location, str | Path):
                    from prowzi.storage.remote import open_store

                    self._store = open_store(location, durable=self._fsync)
                else:
                    self._store = location
            return self._store

    def _session_index(self) -> SessionIndex:
        with self._index_lock:
            if self._index is None:
                from prowzi.workflows.session_index import SessionIndex

                self._index = SessionIndex(self.index_path)
            return self._index

    # the sink

    def handle(self, event: Event) -> None:
        try:
            state = self._sessions.get(event.session_id)
            if state is None:
                state = self._open_session(event.session_id)
            terminal = isinstance(event, WorkflowCompleted | WorkflowFailed)
            if state.passive:
                if terminal:
                    self._sessions.pop(state.session_id, None)
                return
            if state.log is None and time.monotonic() >= state.log_retry_at:
                self._open_log(state)
            if state.log is not None:
                try:
                    state.log.append_event(event)
                except OSError as exc:
                    # reopened later: opening cuts a partial line this write may have left
                    self._failed("event_log", state.session_id, exc)
                    state.log.close()
                    state.log = None
                    state.log_retry_at = time.monotonic() + _LOG_RETRY_SECONDS
            with state.lock:
                boundary = state.recorder.apply(event)
            if terminal:
                self._finish(state)
            elif boundary:
                self._schedule(state)
        except Exception as exc:  # telemetry must never fail the run
            self._failed("event", event.session_id, exc)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every scheduled snapshot is written. Returns False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._dirty and self._busy is None, timeout)

    def close(self) -> None:
        """Write what is pending and release every open log. Idempotent."""
        self.flush()
        for state in list(self._sessions.values()):
            if not state.passive:
                self._write_snapshot(state)
            if state.log is not None:
                state.log.close()
        self._sessions.clear()

    def __enter__(self) -> TelemetryCollector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open_session(self, session_id: str) -> _SessionState:
        validate_session_id(session_id)
        state = _SessionState(session_id)
        self._open_log(state, resume=True)
        self._sessions[session_id] = state
        return state

    def _open_log(self, state: _SessionState, *, resume: bool = False) -> None:
        path = self.event_log_path(state.session_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            existed = path.exists()
            # a new log's directory entry is made durable by the snapshot writer, off this path
            state.log = EventLogWriter(path, sync_directory=False)
            if resume and existed:
                # the same session recorded before (a resume): continue its record
                for old in iter_events_lenient(path):
                    state.recorder.apply(old)
        except EventLogBusyError:
            log.info(
                "session %s is already recorded by another writer; not recording",
                state.session_id,
            )
            state.passive = True
        except OSError as exc:
            self._failed("event_log", state.session_id, exc)
            state.log_retry_at = time.monotonic() + _LOG_RETRY_SECONDS

    def _schedule(self, state: _SessionState) -> None:
        if not self._background:
            self._write_snapshot(state)
            return
        with self._cond:
            self._dirty[state.session_id] = state
            if self._thread is None:
                _WITH_WRITER.add(self)
                self._thread = threading.Thread(
                    target=self._run_writer, name="prowzi-telemetry", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def _run_writer(self) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: bool(self._dirty), _IDLE_SECONDS):
                    self._thread = None
                    return
                session_id = next(iter(self._dirty))
                state = self._dirty.pop(session_id)
                self._busy = session_id
            try:
                self._write_snapshot(state)
            finally:
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()

    def _finish(self, state: _SessionState) -> None:
        # the final snapshot supersedes a pending one; one being written must land first, or
        # it could replace the final file with an older record
        with self._cond:
            self._dirty.pop(state.session_id, None)
            self._cond.wait_for(lambda: self._busy != state.session_id)
        self._write_snapshot(state)
        if state.log is not None:
            state.log.close()
        self._sessions.pop(state.session_id, None)

    def _write_snapshot(self, state: _SessionState) -> None:
        with state.lock:
            metrics = state.recorder.metrics
            if metrics is None:
                return
            data = orjson.dumps(metrics.to_dict(), default=str, option=orjson.OPT_INDENT_2)
        if state.log is not None and not state.log.closed and self._fsync:
            try:
                state.log.sync()
                if state.log.created:
                    fsync_directory(state.log.path.parent)
                    state.log.created = False
            except OSError as exc:
                self._failed("event_log", state.session_id, exc)
        path = self.output_dir / f"{state.session_id}.json"
        # the session index is the readers' cache: a changed file tells them to read it again
        try:
            self._atomic_write(path, data)
        except OSError as exc:
            self._failed("snapshot", state.session_id, exc)
        try:
            self._put_in_store(state.session_id, data)
        except Exception as exc:  # an unreachable store, a bad location: the run goes on
            self._failed("store", state.session_id, exc)

    def _put_in_store(self, session_id: str, data: bytes) -> None:
        store = self.store
        if store is not None:
            store.put(_store_name(session_id), data, durable=self._fsync)

    def _atomic_write(self, path: Path, data: bytes) -> None:
        """:func:`prowzi.storage.files.atomic_write`, shared (other tools read these files)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data, durable=self._fsync, mode=SHARED_FILE)

    def _failed(self, operation: str, session_id: str, exc: BaseException) -> None:
        with self._cond:
            self.errors += 1
            self.error_counts[operation] = self.error_counts.get(operation, 0) + 1
            self.last_error = f"{operation}: {type(exc).__name__}: {exc}"
        key = f"{session_id}:{operation}"
        if key in self._warned:
            log.debug("telemetry %s failed for session %s: %s", operation, session_id, exc)
        else:
            self._warned.add(key)
            log.warning(
                "telemetry %s failed for session %s: %s: %s (the run goes on)",
                operation,
                session_id,
                type(exc).__name__,
                exc,
            )

    # readers

    def load_session(self, session_id: str) -> WorkflowMetrics:
        """The session's record: its file; derived from its event log if the file was never
        written; else the store's copy (a session recorded on another machine).

        Raises :class:`SessionNotFoundError` for an unknown session and
        :class:`CorruptSessionError` for a file that is not a valid session.
        """
        path = self.session_path(session_id)
        try:
            data = read_nofollow(path)
        except FileNotFoundError:
            log_path = self.event_log_path(session_id)
            events = (
                self.read_events(session_id, tolerate_partial=True) if log_path.exists() else []
            )
            metrics = SessionRecorder.from_events(session_id, events).metrics
            if metrics is None:  # no log, or one whose writer stopped before its first event
                metrics = self._load_from_store(session_id)
            if metrics is None:
                raise SessionNotFoundError(
                    f"no telemetry for session {session_id!r} in {self._places()}"
                ) from None
            return metrics
        except OSError as exc:
            raise TelemetryError(f"cannot read session file {path}: {exc}") from None
        return self._caught_up(self._parse(session_id, path, data))

    def _load_from_store(self, session_id: str) -> WorkflowMetrics | None:
        """The store's copy of the session's file, or None (no store, or not there)."""
        store = self.store
        if store is None:
            return None
        name = _store_name(session_id)
        try:
            blob = store.get(name)
        except BlobNotFoundError:
            return None
        except OSError as exc:
            raise TelemetryError(f"cannot read session {session_id!r}: {exc}") from None
        return self._parse(session_id, store.describe(name), blob.data)

    def _places(self) -> str:
        """Where sessions are looked for, for messages."""
        if self._store_location is None:
            return str(self.output_dir)
        return f"{self.output_dir} or {_location_of(self._store_location)}"

    def status_of(self, metrics: WorkflowMetrics) -> SessionStatus:
        """The session's status as a reader should report it: ``interrupted`` when it is
        recorded as running but the process writing it is gone (killed, or its machine
        restarted); ``prowzi resume`` continues it from its last checkpoint."""
        if metrics.status != "running":
            return metrics.status
        return self._live_status(metrics.session_id)

    def _live_status(self, session_id: str) -> SessionStatus:
        """The status of a session its file records as running: what its event log says,
        unless a writer holds the session's lock."""
        status = _running_status(self._log_facts(session_id))
        if status == "interrupted" and self._writer_lock is not None:
            try:
                if self._writer_lock(session_id):
                    return "running"
            except OSError as exc:
                log.debug("could not probe the writer lock of %s: %s", session_id, exc)
        return status

    def _log_facts(self, session_id: str) -> _LogFacts:
        """What the end of the session's event log says: whether its last event ends the
        run, and which process opened it last. The log is read again only once it has
        changed (it is only ever appended to); nothing is written."""
        try:
            fd = open_nofollow(self.event_log_path(session_id), os.O_RDONLY | os.O_NONBLOCK)
            try:
                st = os.fstat(fd)
                version = (st.st_ino, st.st_size, st.st_mtime_ns)
                cached = self._facts.get(session_id)
                if cached is not None and cached[0] == version:
                    return cached[1]
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                data = os.pread(fd, st.st_size, 0)
            finally:
                os.close(fd)
        except OSError:
            return _LogFacts(ended=None, header=None)
        facts = self._read_facts(data)
        if len(data) == version[1]:  # not grown while read: its facts hold for this version
            self._facts[session_id] = (version, facts)
        return facts

    @staticmethod
    def _read_facts(data: bytes) -> _LogFacts:
        ended: SessionStatus | None = None
        header: LogHeader | None = None
        seen_event = seen_header = False
        # complete lines only, newest first (a partial last line is still being written)
        for line in reversed(data[: data.rfind(b"\n") + 1].splitlines()):
            if not line.strip():
                continue
            if line.startswith(_HEADER_MARK):
                if not seen_header:  # only the newest writer counts, readable or not
                    seen_header = True
                    with contextlib.suppress(TelemetryError):
                        decoded = decode_line(line, "a log header")
                        header = decoded if isinstance(decoded, LogHeader) else None
            elif not seen_event:
                seen_event = True
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    record = None
                kind = record.get("event") if isinstance(record, dict) else None
                ended = _RUN_ENDS.get(kind) if isinstance(kind, str) else None
            if seen_header and seen_event:
                break
        return _LogFacts(ended=ended, header=header)

    def _caught_up(self, metrics: WorkflowMetrics) -> WorkflowMetrics:
        """``metrics`` from a session file, or, when the file still says running but the
        event log has the run's end (its writer was stopped between logging the end and
        writing the file), the record the log gives. Readers never rewrite the file: a live
        writer may be about to."""
        if metrics.status != "running":
            return metrics
        if self._log_facts(metrics.session_id).ended is None:
            return metrics
        try:
            return self._derive(metrics.session_id, tolerate_partial=True)
        except TelemetryError:
            return metrics

    def _parse(self, session_id: str, path: Path | str, data: bytes) -> WorkflowMetrics:
        try:
            metrics = WorkflowMetrics.from_json(data)
        except ValueError as exc:
            raise self._corrupt(session_id, path, str(exc)) from None
        if metrics.session_id != session_id:
            raise self._corrupt(session_id, path, f"it records session {metrics.session_id!r}")
        return metrics

    def _corrupt(self, session_id: str, path: Path | str, reason: str) -> CorruptSessionError:
        return CorruptSessionError(
            session_id, path, reason, has_event_log=self.event_log_path(session_id).exists()
        )

    def read_events(self, session_id: str, *, tolerate_partial: bool = False) -> list[Event]:
        """The session's events from its log. A corrupt line is an error; so is a partial last
        line unless ``tolerate_partial`` (a log still being written, or cut by a crash)."""
        path = self._existing_log(session_id)
        reader = EventLogReader(path)
        if not tolerate_partial:
            return reader.read_all()
        events = reader.poll()
        if reader.partial_bytes:
            log.warning("event log %s ends with a partial line; ignored", path)
        return events

    def follow(self, session_id: str) -> EventLogReader:
        """A reader at the start of the session's log; call its ``poll()`` to follow it."""
        return EventLogReader(self._existing_log(session_id))

    def _existing_log(self, session_id: str) -> Path:
        """The session's event log; :class:`SessionNotFoundError` when the session is unknown,
        :class:`TelemetryError` when only its log is missing."""
        path = self.event_log_path(session_id)
        if not os.path.lexists(path):  # a planted symlink is refused when read
            if self.session_path(session_id).exists():
                raise TelemetryError(f"session {session_id!r} has no event log ({path} is missing)")
            raise SessionNotFoundError(
                f"no telemetry for session {session_id!r} in {self.output_dir}"
            )
        return path

    def _derive(self, session_id: str, *, tolerate_partial: bool) -> WorkflowMetrics:
        events = self.read_events(session_id, tolerate_partial=tolerate_partial)
        metrics = SessionRecorder.from_events(session_id, events).metrics
        if metrics is None:
            raise TelemetryError(f"the event log of session {session_id!r} holds no events")
        return metrics

    def rebuild_session(self, session_id: str) -> WorkflowMetrics:
        """Rewrite the session file from the event log (a partial last line is ignored)."""
        metrics = self._derive(session_id, tolerate_partial=True)
        path = self.session_path(session_id)
        data = orjson.dumps(metrics.to_dict(), default=str, option=orjson.OPT_INDENT_2)
        try:
            self._atomic_write(path, data)
        except OSError as exc:
            raise TelemetryError(f"cannot write session file {path}: {exc}") from None
        try:
            self._put_in_store(session_id, data)
        except OSError as exc:
            raise TelemetryError(
                f"rebuilt {path}, but cannot put it in the telemetry store: {exc}"
            ) from None
        return metrics

    def list_sessions(
        self, limit: int | None = 20, status: str | None = None
    ) -> list[SessionSummary]:
        """Sessions, newest first; unreadable files are listed with status ``corrupt``.

        Every session returned is checked against its file (its signature: inode, size and
        mtime; a store blob's etag) and read again if it changed since it was indexed. With a
        ``status`` filter, or no ``limit``, every file is checked, since any of them may have
        changed status; otherwise only the candidates for the first ``limit`` rows are, which
        keeps listing thousands of sessions fast. With a store, its sessions that have no file
        here are listed too; a store that cannot be listed is skipped with a warning.
        """
        if status is not None and status not in SESSION_STATUSES:
            raise InvalidInputError(
                f"unknown status {status!r}: use one of {', '.join(SESSION_STATUSES)}"
            )
        if limit is not None and limit < 0:
            raise InvalidInputError(f"limit must not be negative (got {limit})")
        index = self._session_index()
        cached = index.rows()
        files = dict(self._scan(cached))
        blobs, store_listed = self._scan_store(cached, files)
        rows = {sid: cached[sid] for sid in (files.keys() | blobs.keys()) & cached.keys()}
        fresh: dict[str, tuple[IndexRow, dict[str, Any]]] = {}

        def found(session_id: str, entry: dict[str, Any] | None, signature: str) -> None:
            if entry is None:
                rows.pop(session_id, None)  # gone since it was listed, or unreadable for now
                return
            row = (float(entry["started"]), session_id, entry["status"], signature)
            rows[session_id] = row
            fresh[session_id] = (row, entry)

        def check(session_ids: Iterable[str]) -> None:
            # the file is the truth: re-read it if it changed since it was indexed
            stale: list[BlobInfo] = []
            for session_id in session_ids:
                row = rows.get(session_id)
                blob = blobs.get(session_id)
                if blob is not None:
                    if row is None or row[3] != _blob_signature(blob):
                        stale.append(blob)
                    continue
                try:
                    st = files[session_id].stat(follow_symlinks=False)
                except OSError:
                    rows.pop(session_id, None)  # removed since the directory was listed
                    continue
                if row is None or row[3] != _file_signature(st):
                    found(session_id, *self._entry_from_file(session_id, st))
            for session_id, entry, signature in self._entries_from_store(stale):
                found(session_id, entry, signature)

        live: dict[str, str] = {}

        def reported(row: IndexRow) -> str:
            # The index caches what the file says; for a file that says running, the log
            # tells more (the run's end: its writer was stopped before writing the file),
            # and the writer may be gone. Only running sessions' logs are read at all, and
            # once per listing, so a row is shown with the status it was selected by.
            if row[2] != "running":
                return row[2]
            if row[1] not in live:
                live[row[1]] = self._live_status(row[1])
            return live[row[1]]

        checked = (files.keys() | blobs.keys()) - rows.keys()
        check(checked)
        if status is not None or limit is None or limit >= len(rows):
            check(rows.keys() - checked)
            selected = [r for r in rows.values() if status is None or reported(r) == status]
            selected.sort(reverse=True)  # newest first: by start time, then id
            selected = selected[:limit] if limit is not None else selected
        else:
            while True:
                selected = heapq.nlargest(limit, rows.values())
                unchecked = [r[1] for r in selected if r[1] not in checked]
                if not unchecked:
                    break
                check(unchecked)
                checked.update(unchecked)
        # best effort: a reader that cannot write the index still lists correctly. The rows of
        # the store's sessions are kept while the store cannot be listed.
        index.update(
            ((row, orjson.dumps(entry)) for row, entry in fresh.values()),
            forget=[
                sid
                for sid in cached.keys() - rows.keys()
                if store_listed or not cached[sid][3].startswith(_BLOB_MARK)
            ],
        )
        entries: dict[str, Any] = {sid: entry for sid, (_row, entry) in fresh.items()}
        entries.update(index.summaries(r[1] for r in selected if r[1] not in entries))
        return [
            self._reported_summary(r, reported(r), entries.get(r[1]), blobs.get(r[1]))
            for r in selected
        ]

    def cleanup(
        self,
        *,
        older_than: timedelta,
        keep_last: int = 0,
        dry_run: bool = False,
        is_running: Callable[[str], bool] | None = None,
        on_running: Callable[[str], None] | None = None,
        on_error: Callable[[str, OSError], None] | None = None,
    ) -> list[str]:
        """Delete the telemetry of sessions last written more than ``older_than`` ago: the
        session file, the event log and the store's copy.

        The ``keep_last`` newest sessions are kept whatever their age, and a running session
        is never touched (``on_running`` hears of each that was old enough to go); besides
        what its file, log and lease say, ``is_running`` may know of more. An entry
        that cannot be deleted is reported to ``on_error`` and the rest goes on. Returns the
        deleted (or, with ``dry_run``, the deletable) session ids."""
        from prowzi.workflows import retention

        cutoff = retention.cutoff(older_than, keep_last)
        sessions = self.list_sessions(limit=None)  # newest first
        store = self.store
        # when each session's store copy was written: one listing, not a request per session
        in_store: dict[str, float] = {}
        if store is not None:
            with contextlib.suppress(OSError):  # unreachable: its copies are not aged here
                in_store = {b.name: b.modified for b in store.list(_STORE_PREFIX)}
        deleted: list[str] = []
        for summary in sessions[keep_last:]:
            session_id = summary.session_id
            paths = (self.session_path(session_id), self.event_log_path(session_id))
            written = [in_store.get(_store_name(session_id), 0.0)]
            for path in paths:
                with contextlib.suppress(OSError):
                    written.append(path.lstat().st_mtime)
            if max(written) >= cutoff:
                continue
            if (
                summary.status == "running"
                or self.writer_alive(session_id)
                or (is_running is not None and is_running(session_id))
            ):
                if on_running is not None:
                    on_running(session_id)
                continue
            deleted.append(session_id)
            if dry_run:
                continue
            for path in paths:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    if on_error is not None:
                        on_error(str(path), exc)
            if store is not None:
                try:
                    store.delete(_store_name(session_id))
                except OSError as exc:
                    if on_error is not None:
                        on_error(store.describe(_store_name(session_id)), exc)
        return deleted

    def _reported_summary(
        self, row: IndexRow, status: str, entry: Any, blob: BlobInfo | None
    ) -> SessionSummary:
        summary = self._row_summary(row, entry, blob)
        if summary.status != "running" or status == "running":
            return summary
        if status == "interrupted":
            return replace(summary, status="interrupted")
        try:  # the log has the run's end: its record, derived (never written back)
            return _summary(_entry(self._derive(row[1], tolerate_partial=True)))
        except (TelemetryError, OSError):
            return summary

    def _row_summary(self, row: IndexRow, entry: Any, blob: BlobInfo | None) -> SessionSummary:
        """The row's summary: ``entry`` (a fresh one, or the index's JSON), with the row's own
        columns (what it was selected and sorted by); read again from the session's file
        (``blob`` when it is in the store) when the index's is damaged."""
        try:
            if isinstance(entry, bytes):
                entry = orjson.loads(entry)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
            return _summary({**entry, "started": row[0], "session_id": row[1], "status": row[2]})
        except (ValueError, KeyError, TypeError):
            # a damaged or missing summary: the file is the truth
            if blob is not None:
                for _sid, fresh, _signature in self._entries_from_store([blob]):
                    if fresh is not None:
                        return _summary(fresh)
                return _summary(_corrupt_entry(row[1], blob.modified, "unreadable"))
            path = self.output_dir / f"{row[1]}.json"
            try:
                st = path.lstat()
            except OSError as exc:
                return _summary(_corrupt_entry(row[1], 0.0, f"unreadable: {exc}"))
            return _summary(self._entry_from_file(row[1], st)[0])

    def _scan(self, known: dict[str, IndexRow]) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """The session files in the directory, without touching their content."""
        try:
            it = os.scandir(self.output_dir)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise TelemetryError(f"cannot list {self.output_dir}: {exc}") from None
        with it:
            for entry in it:
                name = entry.name
                if not name.endswith(".json") or name.startswith("."):
                    continue
                session_id = name[:-5]
                if session_id not in known:
                    try:
                        validate_session_id(session_id)
                    except InvalidInputError:
                        continue
                yield session_id, entry

    def _scan_store(
        self, known: dict[str, IndexRow], files: dict[str, os.DirEntry[str]]
    ) -> tuple[dict[str, BlobInfo], bool]:
        """The store's session blobs that have no file here, and whether the store could be
        listed (a store that cannot is skipped with a warning: the local files still list)."""
        store = self.store
        if store is None:
            return {}, True
        try:
            listing = store.list(_STORE_PREFIX)
        except OSError as exc:
            log.warning("cannot list the sessions in the telemetry store: %s", exc)
            return {}, False
        blobs: dict[str, BlobInfo] = {}
        for blob in listing:
            session_id = blob.name[len(_STORE_PREFIX) : -5]
            if not blob.name.endswith(".json") or session_id in files:
                continue
            if session_id not in known:
                try:
                    validate_session_id(session_id)
                except InvalidInputError:
                    continue  # not of Prowzi's making (a deeper name, another suffix)
            blobs[session_id] = blob
        return blobs, True

    def _entries_from_store(
        self, blobs: list[BlobInfo]
    ) -> Iterator[tuple[str, dict[str, Any] | None, str]]:
        """``(session_id, summary, signature)`` of each blob, read from the store (several at
        once: a cold listing of a bucket reads every session). The summary is None for a blob
        gone since the listing, or one the store cannot give now (not remembered, so read
        again next time, rather than remembered as corrupt)."""
        store = self.store
        if store is None or not blobs:
            return

        def read(blob: BlobInfo) -> tuple[str, dict[str, Any] | None, str]:
            session_id = blob.name[len(_STORE_PREFIX) : -5]
            where = store.describe(blob.name)
            if blob.size > _MAX_SESSION_BYTES:
                reason = f"larger than {_MAX_SESSION_BYTES >> 20} MiB"
                return (
                    session_id,
                    _corrupt_entry(session_id, blob.modified, reason),
                    (_blob_signature(blob)),
                )
            try:
                got = store.get(blob.name)
            except BlobNotFoundError:
                return session_id, None, ""
            except OSError as exc:
                log.warning("cannot read session %s from the telemetry store: %s", session_id, exc)
                return session_id, None, ""
            signature = _blob_signature(got.info)
            try:
                entry = _entry(self._parse(session_id, where, got.data))
            except CorruptSessionError as exc:
                entry = _corrupt_entry(session_id, got.info.modified, exc.reason)
            return session_id, entry, signature

        if len(blobs) == 1:
            yield read(blobs[0])
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(_STORE_READERS, len(blobs))) as pool:
            yield from pool.map(read, blobs)

    def _entry_from_file(self, session_id: str, st: os.stat_result) -> tuple[dict[str, Any], str]:
        """The summary of the session's file and the signature of the version read (``st``,
        the file's ``lstat``, when it cannot be read)."""
        path = self.output_dir / f"{session_id}.json"
        try:
            data, st = _read_regular(path)
            metrics = self._parse(session_id, path, data)
        except OSError as exc:
            entry = _corrupt_entry(session_id, st.st_mtime, f"unreadable: {exc}")
        except CorruptSessionError as exc:
            entry = _corrupt_entry(session_id, st.st_mtime, exc.reason)
        else:
            entry = _entry(metrics)
        return entry, _file_signature(st)

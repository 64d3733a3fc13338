"""The live event stream of a session: an append-only JSON-lines log.

One line per event (:meth:`Event.as_record`), written to the OS as each event happens, so another
process can follow a run while it is going. The writer fsyncs at stage boundaries (the telemetry
collector says when). Each time a process opens the log for writing it first appends a header
record, ``{"event": "log_opened", "v": 1, "pid": ..., "host": ...}``; readers use it to refuse a
log written by a newer format and to tell which process is writing.

A reader tolerates a partial last line while the log is being written (it waits for the rest);
a complete line that is not a JSON object, or not a valid event (a field of the wrong type, a
time no date can hold: :func:`~prowzi.events.event_from_record` validates it), is
corruption, reported with its line number; :func:`iter_events_lenient` skips such lines.

Writers and readers open the log through :mod:`prowzi.storage.files` (``O_NOFOLLOW``, regular
files only): a symlink or FIFO planted at a log's name is refused, never followed, appended to
or waited on. A new log is a :data:`~prowzi.storage.files.SHARED_FILE` (``0o666`` narrowed by
the umask): log shippers and ``prowzi monitor`` in another account read it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from prowzi.errors import TelemetryError
from prowzi.events import EVENT_TYPES, Event, event_from_record
from prowzi.host import boot_id
from prowzi.storage.files import SHARED_FILE, fsync_directory, open_nofollow, read_nofollow

if TYPE_CHECKING:
    from pydantic import TypeAdapter

log = logging.getLogger("prowzi.telemetry")

LOG_FORMAT_VERSION = 1
HEADER_KIND = "log_opened"
_READ_CHUNK = 1 << 16


class EventLogBusyError(TelemetryError):
    """Another writer (in this process or another) holds the session's event log."""


def encode_record(record: dict[str, Any]) -> bytes:
    """One log line. Values JSON cannot hold (paths, sets...) are written as strings."""
    return orjson.dumps(record, default=str, option=orjson.OPT_NON_STR_KEYS) + b"\n"


class EventLogWriter:
    """Appends records to one session's log; the only writer while it is open.

    An exclusive ``flock`` on the file makes a second writer (a second collector on the same
    directory, in this process or another) fail with :class:`EventLogBusyError` instead of
    interleaving a second copy of the run. A partial last line left by a writer that crashed
    mid-write is cut off before appending, so the log stays a sequence of whole lines.
    """

    __slots__ = ("_fd", "created", "path")

    def __init__(self, path: Path, *, sync_directory: bool = True) -> None:
        """Open (creating) the log. ``sync_directory=False`` leaves making a new file's
        directory entry durable to the caller (see :attr:`created`)."""
        self.path = path
        created = not os.path.lexists(path)
        self.created = created
        # a symlink planted at the log's name is refused, never followed or appended to
        fd = open_nofollow(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, SHARED_FILE)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO would block the run
                raise OSError(errno.EINVAL, "not a regular file", str(path))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EventLogBusyError(
                f"event log {path} is being written by another writer"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:
            self._cut_partial_tail()
            if created and sync_directory:
                fsync_directory(path.parent)
            self.append(
                {
                    "event": HEADER_KIND,
                    "v": LOG_FORMAT_VERSION,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "timestamp": time.time(),
                    **_process_identity(),
                }
            )
        except BaseException:
            self.close()
            raise

    def _cut_partial_tail(self) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        start = max(0, size - _READ_CHUNK)
        tail = os.pread(self._fd, size - start, start)
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        while cut < 0 and start > 0:
            start = max(0, start - _READ_CHUNK)
            tail = os.pread(self._fd, size - start, start)
            cut = tail.rfind(b"\n")
        keep = start + cut + 1 if cut >= 0 else 0
        log.warning(
            "event log %s: dropping a partial last line of %d bytes", self.path, size - keep
        )
        os.ftruncate(self._fd, keep)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as a line. It reaches the OS now; :meth:`sync` makes it durable."""
        data = encode_record(record)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def append_event(self, event: Event) -> None:
        self.append(event.as_record())

    def sync(self) -> None:
        os.fsync(self._fd)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Release the file and its lock. Idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


@dataclass(frozen=True, slots=True)
class LogHeader:
    """Who opened the log for writing, and when."""

    version: int
    pid: int | None
    host: str | None
    timestamp: float | None
    boot_id: str | None = None
    start_ticks: int | None = None
    pid_namespace: int | None = None


def writer_gone(header: LogHeader) -> str | None:
    """Why the writer that opened a log (its last header) can no longer finish the run, or
    None if it may still be running.

    Judged only where this process can see the writer: the same host, and, when the header
    says, the same PID namespace. A writer is gone when its machine has restarted since
    (another boot id), or no process has its pid, or the process with its pid is a zombie or
    started at another instant (the pid was reused). Start instants are compared in the
    kernel's clock ticks since boot, which clock steps do not move. Elsewhere, or when /proc
    cannot tell, the writer is assumed alive."""
    if header.pid is None or header.host != socket.gethostname():
        return None
    mine = _process_identity()
    if header.pid_namespace is not None and header.pid_namespace != mine.get("pidns"):
        return None  # another PID namespace (a container) on this hostname: cannot see it
    gone = f"the run's process {header.pid} ended without finishing the session"
    if header.boot_id is not None and mine.get("boot") not in (None, header.boot_id):
        return gone  # the machine restarted since the log was opened
    try:
        os.kill(header.pid, 0)
    except ProcessLookupError:
        return gone
    except PermissionError:
        pass  # alive, another user's: the checks below still apply
    state, started = _process_stat(header.pid)
    if state == b"Z":
        return gone  # killed, not yet reaped by its parent
    if header.start_ticks is not None and started is not None and started != header.start_ticks:
        return gone
    return None


def _process_stat(pid: int) -> tuple[bytes | None, int | None]:
    """A process's state letter and start time (clock ticks since boot), from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None, None


_IDENTITY: tuple[int, dict[str, Any]] | None = None


def _process_identity() -> dict[str, Any]:
    """What tells this process apart from a later one with its pid: the boot, its start
    time in clock ticks since boot, and its PID namespace (for the log header). Read once
    per process (a forked child reads its own)."""
    global _IDENTITY
    if _IDENTITY is None or _IDENTITY[0] != os.getpid():
        _IDENTITY = (os.getpid(), _read_identity())
    return dict(_IDENTITY[1])


def _read_identity() -> dict[str, Any]:
    identity: dict[str, Any] = {}
    boot = boot_id()
    if boot is not None:
        identity["boot"] = boot
    _, started = _process_stat(os.getpid())
    if started is not None:
        identity["start_ticks"] = started
    with contextlib.suppress(OSError):
        identity["pidns"] = os.stat("/proc/self/ns/pid").st_ino
    return identity


class EventLogReader:
    """Reads a session's log from an offset, remembering where it stopped.

    :meth:`poll` returns the events of every complete line written since the last call and
    leaves a partial last line for the next call, so it can follow a log while it is written.
    Unknown event kinds (from a newer Prowzi of the same format version) are skipped.
    """

    __slots__ = ("_pending", "caught_up", "headers", "line_no", "offset", "path")

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self.offset = offset
        self.line_no = 0
        self.headers: list[LogHeader] = []
        self._pending = b""
        self.caught_up = False  # the last poll read up to the end of the file as it was

    def poll(self, max_bytes: int | None = None) -> list[Event]:
        """New events since the last call. Raises :class:`TelemetryError` on a corrupt line.

        With ``max_bytes``, reads at most that many bytes of the file, so going through a large
        log takes memory for one chunk of it (and a line longer than a chunk); :attr:`caught_up`
        then tells whether more was already there to read.
        """
        return list(self.iter_poll(max_bytes))

    def iter_poll(self, max_bytes: int | None = None) -> Iterator[Event]:
        """:meth:`poll`, yielding each event as its line is parsed (the file is read at the
        first ``next``): a caller that lets each event go before the next holds none of them."""
        try:
            data = read_nofollow(self.path, self.offset, max_bytes)
        except FileNotFoundError:
            raise TelemetryError(f"event log {self.path} does not exist") from None
        except OSError as exc:
            raise TelemetryError(f"cannot read event log {self.path}: {exc}") from None
        self.caught_up = max_bytes is None or len(data) < max_bytes
        if not data:
            return
        self.offset += len(data)
        if b"\n" not in data:  # (part of) one long line: keep it for the next call
            self._pending += data
            return
        buffer = self._pending + data if self._pending else data
        del data
        lines = buffer.split(b"\n")
        del buffer
        self._pending = lines.pop()
        for line in lines:
            self.line_no += 1
            event = self._decode(line)
            if event is not None:
                yield event

    @property
    def partial_bytes(self) -> int:
        """Bytes of an unfinished last line read so far."""
        return len(self._pending)

    def read_all(self) -> list[Event]:
        """Every event in a log that is no longer being written; a partial last line is an error."""
        events = self.poll()
        if self._pending:
            raise TelemetryError(
                f"event log {self.path} is corrupt: line {self.line_no + 1} is truncated "
                f"({len(self._pending)} bytes without a newline)"
            )
        return events

    def _decode(self, line: bytes) -> Event | None:
        decoded = decode_line(line, f"event log {self.path} is corrupt: line {self.line_no}")
        if isinstance(decoded, LogHeader):
            self.headers.append(decoded)
            return None
        return decoded


def decode_line(line: bytes, where: str) -> Event | LogHeader | None:
    """One log line as an event, a header, or None (blank line, unknown event kind).

    ``where`` prefixes the :class:`TelemetryError` raised for a corrupt line.
    """
    if not line.strip():
        return None
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise TelemetryError(f"{where} is not JSON") from None
    if not isinstance(record, dict):
        raise TelemetryError(f"{where} is not a JSON object")
    kind = record.get("event")
    if kind == HEADER_KIND:
        return _header(record, where)
    if isinstance(kind, str) and kind not in EVENT_TYPES:
        log.debug("%s: skipping unknown event kind %r", where, kind)
        return None
    try:
        return event_from_record(record)
    except (TypeError, ValueError) as exc:
        raise TelemetryError(f"{where} is not a valid event: {exc}") from None


def _header(record: dict[str, Any], where: str) -> LogHeader:
    from pydantic import ValidationError

    try:
        return _header_adapter().validate_python(record)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            if error["type"] == "value_error":  # a newer format
                raise TelemetryError(f"{where} {error.get('ctx', {}).get('error')}") from None
        raise TelemetryError(f"{where} is a log header without a version") from None


@functools.cache
def _header_adapter() -> TypeAdapter[LogHeader]:
    """The validator of log headers: a version (strictly an int) no newer than this Prowzi's;
    each other field is kept when it has its type and is None otherwise (a header tells who
    wrote the log, and an odd field must not hide the rest)."""
    from typing import Annotated, NotRequired

    from pydantic import (
        AfterValidator,
        ConfigDict,
        TypeAdapter,
        ValidationError,
        ValidatorFunctionWrapHandler,
        WrapValidator,
        with_config,
    )
    from typing_extensions import TypedDict

    def or_none(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            return None

    def supported(version: int) -> int:
        if version > LOG_FORMAT_VERSION:
            raise ValueError(
                f"was written by a newer Prowzi (log format {version}, this one reads "
                f"{LOG_FORMAT_VERSION}); upgrade to read it"
            )
        return version

    @with_config(ConfigDict(strict=True))
    class Header(TypedDict):
        v: Annotated[int, AfterValidator(supported)]
        pid: NotRequired[Annotated[int | None, WrapValidator(or_none)]]
        host: NotRequired[Annotated[str | None, WrapValidator(or_none)]]
        timestamp: NotRequired[Annotated[float | None, WrapValidator(or_none)]]
        boot: NotRequired[Annotated[str | None, WrapValidator(or_none)]]
        start_ticks: NotRequired[Annotated[int | None, WrapValidator(or_none)]]
        pidns: NotRequired[Annotated[int | None, WrapValidator(or_none)]]

    def header(fields: Header) -> LogHeader:
        return LogHeader(
            version=fields["v"],
            pid=fields.get("pid"),
            host=fields.get("host"),
            timestamp=fields.get("timestamp"),
            boot_id=fields.get("boot"),
            start_ticks=fields.get("start_ticks"),
            pid_namespace=fields.get("pidns"),
        )

    return TypeAdapter(Annotated[Header, AfterValidator(header)])  # type: ignore[arg-type]


def read_events(path: Path) -> list[Event]:
    """Every event of a finished log, strictly: any corrupt or truncated line is an error."""
    return EventLogReader(path).read_all()


def iter_events_lenient(path: Path) -> Iterator[Event]:
    """Every readable event of a log, skipping corrupt lines (with a warning).

    Used to resume recording a session whose log was damaged; readers that report to a person
    use :func:`read_events`, which refuses a corrupt log.
    """
    try:
        data = read_nofollow(path)
    except FileNotFoundError:
        return
    for line_no, line in enumerate(data.split(b"\n"), start=1):
        try:
            decoded = decode_line(line, f"event log {path} is corrupt: line {line_no}")
        except TelemetryError as exc:
            log.warning("%s; skipped", exc)
            continue
        if isinstance(decoded, Event):
            yield decoded

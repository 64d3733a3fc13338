"""The service's journal of accepted runs, so a restart knows which runs were interrupted.

One small JSON file, replaced atomically after every change of a run's state (by the run
manager, in a worker thread; changes made during one write are written by the next). It
lists each run's session id, state, kind and parameters (the prompt included: a run that
never started must be re-runnable). Finished runs beyond the newest :data:`KEEP_FINISHED`
are dropped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, TypeAdapter, ValidationError

from prowzi.errors import ProwziError
from prowzi.events import validation_reason
from prowzi.ids import validate_session_id
from prowzi.storage.files import atomic_write, ensure_private_dir, read_nofollow

log = logging.getLogger("prowzi.service")

JOURNAL_VERSION = 1
KEEP_FINISHED = 500

RunState = Literal["queued", "running", "completed", "failed", "cancelled", "interrupted"]
RUN_STATES: tuple[RunState, ...] = (
    "queued",
    "running",
    "completed",
    "failed",
    "cancelled",
    "interrupted",
)
FINISHED: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
RunKind = Literal["run", "resume"]


@dataclass(slots=True)
class JournalEntry:
    """One run as the journal keeps it; read back through :data:`_ENTRY` (pydantic, strict:
    a boolean is not a count, a session id is one Prowzi would make)."""

    __pydantic_config__: ClassVar[dict[str, Any]] = {"strict": True}
    session_id: Annotated[str, AfterValidator(validate_session_id)]
    state: RunState
    kind: RunKind
    prompt: str
    max_results_per_query: int
    created_at: float
    updated_at: float
    model: str | None = None
    """The LLM model the run was asked to use (one the server configures), if any."""
    max_cost_usd: float | None = None
    max_tokens: int | None = None


_ENTRY = TypeAdapter(JournalEntry)


class _JournalFile(BaseModel, strict=True):
    """The journal's envelope; its entries are read one by one, so a bad one is skipped."""

    version: int
    runs: list[Any]


class JournalUnreadableError(ProwziError):
    """The run journal exists but cannot be read; the service refuses to start over it."""


class RunJournal:
    """Reads and atomically rewrites ``<state_dir>/runs.json``."""

    def __init__(self, state_dir: Path, *, fsync: bool = True) -> None:
        self.path = state_dir / "runs.json"
        self._fsync = fsync

    def load(self) -> dict[str, JournalEntry]:
        """The journal's entries (none when there is no journal yet).

        A journal that cannot be read (truncated, not JSON, not a journal, a format this
        Prowzi does not know, a symlink) raises :class:`JournalUnreadableError` naming the
        file: it may hold interrupted runs and their prompts, so it is never treated as empty
        (which the next write would make it)."""
        try:
            data = json.loads(read_nofollow(self.path))
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise self._unreadable(exc.strerror or str(exc)) from exc
        except ValueError as exc:
            raise self._unreadable(f"not JSON ({exc})") from exc
        try:
            journal: _JournalFile | None = _JournalFile.model_validate(data)
        except ValidationError as exc:
            if any(error["loc"][:1] != ("version",) for error in exc.errors()):
                raise self._unreadable("not a run journal") from exc
            journal = None  # a journal, of a format this Prowzi does not know
        if journal is None or journal.version != JOURNAL_VERSION:
            raise self._unreadable(
                f"format {data.get('version')!r} is not this Prowzi's ({JOURNAL_VERSION})"
            )
        entries: dict[str, JournalEntry] = {}
        for item in journal.runs:
            try:
                # JSON again: strict JSON validation reads an object into the dataclass
                entry = _ENTRY.validate_json(json.dumps(item))
            except ValidationError as exc:
                log.warning("skipping a bad run journal entry: %s", validation_reason(exc))
                continue
            entries[entry.session_id] = entry
        return entries

    def _unreadable(self, reason: str) -> JournalUnreadableError:
        return JournalUnreadableError(
            f"the run journal {self.path} is unreadable: {reason}; it is left as it is "
            "(it may list interrupted runs): repair it, or move it aside to start afresh"
        )

    def save(self, entries: dict[str, JournalEntry]) -> None:
        """Prune ``entries`` and write them (both at once, in the caller's thread)."""
        self.write(self.snapshot(entries))

    @staticmethod
    def snapshot(entries: dict[str, JournalEntry]) -> list[JournalEntry]:
        """Drop finished runs beyond :data:`KEEP_FINISHED` from ``entries``, and copy the rest
        for :meth:`write`: cheap, so that an event loop can take it and hand the copy (which
        later state changes do not touch) to a thread for the file work."""
        finished = sorted(
            (e for e in entries.values() if e.state in FINISHED),
            key=lambda e: e.updated_at,
        )
        for entry in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del entries[entry.session_id]
        return [replace(e) for e in entries.values()]

    def write(self, entries: list[JournalEntry]) -> None:
        """Replace the journal with ``entries``, atomically (and durably, with ``fsync``)."""
        payload = json.dumps(
            {"version": JOURNAL_VERSION, "runs": [asdict(e) for e in entries]}
        ).encode()
        ensure_private_dir(self.path.parent)
        atomic_write(self.path, payload, durable=self._fsync)

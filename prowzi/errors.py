"""Prowzi's exceptions: one root users can catch, and a small taxonomy under it.

Stage failures are classified as *transient* (retried with backoff) or *permanent* (never
retried). Agents signal intent by raising :class:`TransientError` or :class:`PermanentError`;
other exceptions are classified by :func:`is_transient`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class ProwziError(Exception):
    """Root of every error Prowzi raises on purpose."""


class ConfigError(ProwziError, ValueError):
    """A setting has an invalid value; the message names the setting or variable."""


class InvalidInputError(ProwziError, ValueError):
    """A user-supplied value (prompt, parameter, id) is unusable."""


class InvalidIdentifierError(InvalidInputError):
    """A session id, stage name or checkpoint id is not of the permitted form."""


class OutputError(ProwziError):
    """A result (the document) could not be written where it was asked to go."""


class CorpusError(ProwziError):
    """The corpus directory is missing, unreadable or holds no usable document."""


class TransientError(ProwziError):
    """A failure worth retrying: rate limits, timeouts, flaky I/O."""


class PermanentError(ProwziError):
    """A failure that retrying cannot fix: bad input, a bug, a missing resource."""


class BudgetExceededError(PermanentError):
    """The run's budget (``--max-cost``, ``--max-tokens``) would be exceeded: the run stops,
    its completed stages checkpointed, resumable with a larger budget."""


class StageTimeoutError(TransientError):
    """A stage attempt exceeded ``stage_timeout_seconds``."""

    def __init__(self, stage: str, timeout: float) -> None:
        super().__init__(f"stage '{stage}' timed out after {timeout:g}s")
        self.stage = stage
        self.timeout = timeout


class WorkflowFailedError(ProwziError):
    """A stage failed for good; the run stopped after it. Completed stages are kept."""

    def __init__(self, session_id: str, stage: str, attempts: int, cause: BaseException) -> None:
        super().__init__(
            f"stage '{stage}' failed after {attempts} attempt(s) in session {session_id}: "
            f"{describe_exception(cause)}"
        )
        self.session_id = session_id
        self.stage = stage
        self.attempts = attempts
        self.cause = cause


class CheckpointError(ProwziError):
    """A checkpoint could not be written or read."""


class CheckpointNotFoundError(CheckpointError, LookupError):
    """No checkpoint matches the requested id, session or stage. ``saved_stages`` names the
    stages the session does have checkpoints of (none: the session has none at all)."""

    def __init__(self, message: str, saved_stages: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.saved_stages = list(saved_stages)


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint file failed verification and was not deserialised."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"checkpoint {path} refused: {reason}")
        self.path = str(path)
        self.reason = reason


class SessionLockedError(CheckpointError):
    """Another process holds the session's writer lock."""


class TelemetryError(ProwziError):
    """A telemetry record is missing or unreadable."""


class SessionNotFoundError(TelemetryError, LookupError):
    """No telemetry exists for the requested session."""


def describe_exception(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``: one line for events, telemetry and errors."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


_PERMANENT_BUILTINS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    NotImplementedError,
    AssertionError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether a stage failure is worth retrying.

    Explicit classes win. Programming and validation errors (``ValueError``, ``TypeError``,
    ``KeyError``, pydantic's ``ValidationError`` which subclasses ``ValueError``...) are
    permanent. Everything else (I/O, connection, timeouts, unknown library errors) is
    transient, as in Temporal and Prefect where retry is the default.
    """
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, PermanentError | ProwziError):
        return False
    return not isinstance(exc, _PERMANENT_BUILTINS)


def error_type(exc: BaseException) -> str:
    """A closed-set label for an error: ``timeout``, ``transient``, ``permanent`` or
    ``budget`` (a run stopped by its budget: permanent, but the user's choice, not a fault)."""
    if isinstance(exc, StageTimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, BudgetExceededError):
        return "budget"
    return "transient" if is_transient(exc) else "permanent"

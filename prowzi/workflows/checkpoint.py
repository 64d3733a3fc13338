"""Checkpoints: a verified, versioned, hash-chained snapshot of a run after a stage.

Each checkpoint is two blobs in a :class:`~prowzi.workflows.storage.CheckpointStore` (by
default files in ``checkpoint_dir``):

``<session>_<stage>.pkl``
    The checkpoint itself. Despite the name (kept from the design document, so existing
    tooling and habits still find the files) it is **not a pickle**: pickle runs code while it
    loads, and a checkpoint may come from anywhere. It is a small container::

        MAGIC (8) | header length (4, big-endian) | header | sha256 of all before (32)
        | body | HMAC-SHA256 of all before the body (32, only when a key is configured)

    The header is the :class:`CheckpointMetadata` as JSON, sealed by its own digest (so a
    flipped byte anywhere is caught, and caught before the header is parsed). The body is the
    workflow state as JSON (``model_dump`` of the pydantic models, except that a verified or
    rejected source that is one of the search's own is written as its index there), optionally
    zlib-compressed, together with the checkpoint id and the previous checkpoint's hash. The
    header records the body's size and sha256, so the HMAC covers the sealed header only and
    the body is hashed exactly once.

``<session>_<stage>.json``
    The same metadata, indented, for humans. It is derived from the ``.pkl`` header and never
    trusted: a missing or stale one is rewritten on load, and one edited to name another
    checkpoint (or to carry foreign keys) is refused.

Loading verifies before it deserialises: container magic (a real pickle is refused without
being touched), format version (newer: refused; older: migrated), size, sha256, HMAC when a key
is configured, the file's identity (a checkpoint copied from another session is refused) and
the link to the previous checkpoint. Only then is the body parsed, by pydantic, into Prowzi's
own result models; any other shape is refused. Every refusal is a
:class:`~prowzi.errors.CheckpointIntegrityError` naming the file.

Each checkpoint's ``previous_hash`` is the ``payload_sha256`` of the checkpoint before it in
the session (for a fork's first checkpoint, the parent's), which makes a session's checkpoints
a hash chain that :meth:`CheckpointManager.verify_chain` walks.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import hmac
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, get_args

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from prowzi import __version__
from prowzi.agents.base import RunParameters
from prowzi.agents.models import (
    RejectedSource,
    SearchAgentResult,
    Source,
    VerificationAgentResult,
    WorkflowState,
)
from prowzi.errors import (
    CheckpointError,
    CheckpointIntegrityError,
    CheckpointNotFoundError,
    InvalidInputError,
    SessionLockedError,
)
from prowzi.ids import split_checkpoint_id, validate_session_id, validate_stage_name
from prowzi.workflows.storage import (
    BlobInfo,
    BlobNotFoundError,
    CheckpointStore,
    LocalDirectoryStore,
    UnsafeBlobError,
    Verdict,
    paused_gc,
)

if TYPE_CHECKING:
    from prowzi.config import ProwziConfig

__all__ = ["FORMAT_VERSION", "CheckpointManager", "CheckpointMetadata", "WorkflowCheckpoint"]

log = logging.getLogger("prowzi.checkpoint")

FORMAT_VERSION = 2
"""The checkpoint format this Prowzi writes. Newer files are refused; older ones migrated.

Format 2 writes each verified or rejected source that is one of the search's own sources as
its index there (see :func:`_dump_state`); a format 1 body is a valid format 2 body."""

MAGIC = b"\x89PROWZI\n"
_LENGTH = struct.Struct(">I")
_PREFIX = len(MAGIC) + _LENGTH.size
_DIGEST_SIZE = 32
_MAC_SIZE = 32
_MAX_HEADER = 1 << 20
_MAX_BODY = 1 << 30
"""Upper bound on a decompressed body, so a crafted zlib stream cannot exhaust memory."""
_MAX_FILE = 1 << 30
"""Upper bound on a checkpoint file read into memory."""
_HEAD_READ = 4096
_ZLIB_LEVEL = 1
"""Fast over small: a save is on the run's critical path (level 1 is ~5x quicker than the
default 6 on a 100 KB state, for a ratio of about 4 instead of 5)."""
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_IDENTITY_KEYS = ("checkpoint_id", "session_id", "stage")

Compression = Literal["none", "zlib"]


class CheckpointMetadata(BaseModel):
    """What a checkpoint says about itself (the header of the ``.pkl``, the whole ``.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint_id: str = Field(description='"<session>_<stage>"')
    session_id: str
    stage: str
    completed_stages: list[str]
    created_at: AwareDatetime = Field(description="UTC, timezone-aware.")
    prompt: str
    parameters: dict[str, Any] = Field(description="RunParameters.model_dump() of the run.")
    prowzi_version: str
    format_version: int
    payload_size: int = Field(ge=0, description="Bytes of the body as stored.")
    payload_sha256: str = Field(description="sha256 of the body as stored (hex).")
    previous_hash: str | None = Field(
        description="payload_sha256 of the previous checkpoint in this session's chain "
        "(the parent's, for a fork's first checkpoint)."
    )
    compression: Compression
    parent_session_id: str | None = None
    signed: bool = Field(False, description="An HMAC-SHA256 trailer is present.")
    trace_id: str | None = None
    span_id: str | None = None


class WorkflowCheckpoint(WorkflowState):
    """A loaded, verified checkpoint: the workflow state it holds (every field of
    :class:`~prowzi.agents.models.WorkflowState`, by the same names) and its ``metadata``."""

    model_config = ConfigDict(extra="forbid")

    metadata: CheckpointMetadata

    def to_state(self) -> WorkflowState:
        return WorkflowState.model_construct(
            **{name: getattr(self, name) for name in WorkflowState.model_fields}
        )


_SourceIndex = Annotated[int, Field(ge=0, strict=True)]
"""A source written as its position in ``state.search.sources`` (format 2)."""


class _WireRejected(RejectedSource):
    source: Source | _SourceIndex  # type: ignore[assignment]


class _WireVerification(VerificationAgentResult):
    verified: list[Source | _SourceIndex]  # type: ignore[assignment]
    rejected: list[_WireRejected]  # type: ignore[assignment]


class _WireState(WorkflowState):
    verification: _WireVerification | None = None


class _Body(BaseModel):
    """The body's schema: the only shapes a checkpoint can make Prowzi build."""

    model_config = ConfigDict(extra="forbid")

    checkpoint_id: str
    previous_hash: str | None
    state: _WireState

    def state_fields(self, where: str) -> dict[str, Any]:
        """The state's fields, each source index replaced by the search's source it names
        (so a verified source is again the very object the search holds, as in the run)."""
        wire = self.state
        fields = dict(wire.__dict__)
        verification = wire.verification
        if verification is not None:
            pool = wire.search.sources if wire.search is not None else []
            try:
                verified = [v if isinstance(v, Source) else pool[v] for v in verification.verified]
                rejected = [
                    _rebuilt(
                        RejectedSource,
                        r.model_fields_set,
                        {
                            **r.__dict__,
                            "source": r.source if isinstance(r.source, Source) else pool[r.source],
                        },
                    )
                    for r in verification.rejected
                ]
            except IndexError:
                names = [v for v in verification.verified if not isinstance(v, Source)]
                names += [
                    r.source for r in verification.rejected if not isinstance(r.source, Source)
                ]
                raise CheckpointIntegrityError(
                    where,
                    f"the payload names search source {max(names)}, and the search has {len(pool)}",
                ) from None
            fields["verification"] = _rebuilt(
                VerificationAgentResult,
                verification.model_fields_set,
                {**verification.__dict__, "verified": verified, "rejected": rejected},
            )
        return fields


_M = TypeVar("_M", bound=BaseModel)


def _rebuilt(cls: type[_M], fields_set: set[str], values: dict[str, Any]) -> _M:
    """``cls.model_construct(fields_set, **values)`` given every field's value, for the models
    below (no private attributes, extra values or post-init to set up), at a fifth the cost."""
    obj = cls.__new__(cls)
    object.__setattr__(obj, "__dict__", values)
    object.__setattr__(obj, "__pydantic_fields_set__", fields_set)
    object.__setattr__(obj, "__pydantic_extra__", None)
    object.__setattr__(obj, "__pydantic_private__", None)
    return obj


for _cls in (RejectedSource, VerificationAgentResult, WorkflowCheckpoint, CheckpointMetadata):
    if _cls.__pydantic_post_init__ is not None or _cls.__private_attributes__:
        raise TypeError(f"_rebuilt cannot build {_cls.__name__}: post-init or private state")


def _unchanged(doc: dict[str, Any]) -> dict[str, Any]:
    return doc


@dataclass(frozen=True, slots=True)
class Migration:
    """Turns the header and the body (both plain JSON) of format ``v`` into format ``v + 1``.

    The halves are separate so that listing can migrate a header without reading the body.
    """

    header: Callable[[dict[str, Any]], dict[str, Any]] = _unchanged
    body: Callable[[dict[str, Any]], dict[str, Any]] = _unchanged


_MIGRATIONS: dict[int, Migration] = {1: Migration()}
"""Format version ``v`` -> the migration to ``v + 1``. Format 1 needs none: its bodies are
format 2 bodies that share no source."""


def _session_of(name: str) -> tuple[str, str] | None:
    """``"<session>_<stage>.pkl"`` -> (session, stage); None for any other blob name."""
    if not name.endswith(".pkl"):
        return None
    try:
        session, stage = split_checkpoint_id(name[:-4])
    except InvalidInputError:
        return None
    return (session, stage) if stage is not None else None


def _missing_migration(version: int) -> int | None:
    """The first format from which no migration leads on towards ``FORMAT_VERSION``."""
    return next((v for v in range(version, FORMAT_VERSION) if v not in _MIGRATIONS), None)


def _body_migrates(version: int) -> bool:
    """Whether a body of format ``version`` changes on its way to ``FORMAT_VERSION`` (else it
    is parsed as it stands, straight into the models)."""
    return any(_MIGRATIONS[v].body is not _unchanged for v in range(version, FORMAT_VERSION))


def _migrate_header(header: dict[str, Any]) -> dict[str, Any]:
    version = header["format_version"]
    for step in range(version, FORMAT_VERSION):
        header = _MIGRATIONS[step].header(dict(header))
        header["format_version"] = step + 1
    return header


def _earlier(completed: list[str], stage: str) -> list[str]:
    """The completed stages before ``stage``, latest first."""
    earlier = completed[: completed.index(stage)] if stage in completed else completed
    return earlier[::-1]


def _created_at(header: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(header["created_at"])
    except (KeyError, TypeError, ValueError):
        return None


def _saved_at(raw: bytes) -> float:
    """When an interrupted save was made, by its header (the earliest time when unreadable):
    several saves can await their rename's commit at a power loss, and a recovery publishes
    the older first, so a newer one never makes it look superseded."""
    try:
        header, _ = _unseal(raw, "")
    except CheckpointIntegrityError:
        return float("-inf")
    created = _created_at(header)
    return created.timestamp() if created is not None and created.tzinfo else float("-inf")


def _listed(meta: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A header (JSON form) as a listing row, with ``created_at`` an aware datetime; None
    unless it has the shape of this very checkpoint's header."""
    if not isinstance(meta, dict) or "invalid" in meta or meta.get("checkpoint_id") != name[:-4]:
        return None
    created = _created_at(meta)
    if (
        created is None
        or created.tzinfo is None
        or not isinstance(meta.get("session_id"), str)
        or not isinstance(meta.get("stage"), str)
        or not isinstance(meta.get("payload_sha256"), str)
        or f"{meta.get('session_id')}_{meta.get('stage')}" != name[:-4]
    ):
        return None
    version = meta.get("format_version")
    if type(version) is int and version < FORMAT_VERSION and _missing_migration(version) is None:
        meta = _migrate_header(meta)  # an index entry an older Prowzi wrote, as loads see it
    row = dict(meta)
    row["created_at"] = created
    return row


class _WriteBehind:
    """One daemon thread that writes what saves derive (the ``.json`` sidecar and the index
    record), in order, once the save has returned: a save waits only for its checkpoint.

    Both are derived from the checkpoint and never trusted, so a process killed before they
    are written loses nothing (a load rewrites the sidecar; a listing reads the header).
    Readers in this process :meth:`drain` first, and so does interpreter exit. Without a
    worker (none could be started, or it died) the jobs run in the thread that drains, and
    a fork waits for the job under way, so no child inherits a lock a job holds."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._jobs: deque[Callable[[], None]] = deque()
        self._submitted = 0
        self._completed = 0
        self._thread: threading.Thread | None = None
        self._running = threading.Lock()  # held while a job runs, and across a fork

    def submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            self._jobs.append(job)
            self._submitted += 1
            if self._thread is None or not self._thread.is_alive():
                thread = threading.Thread(
                    target=self._work, name="prowzi-checkpoint-metadata", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:  # no new thread now (say, at interpreter exit)
                    self._thread = None
                else:
                    self._thread = thread
            # Woken now, the worker writes while the caller goes on (in a run, while the
            # next save waits for its fdatasync): the end of the run has little left to wait for.
            self._cond.notify_all()
            inline = self._thread is None
        if inline:
            self.drain()

    def drain(self, timeout: float | None = None) -> bool:
        """Return once every job submitted before this call has run (True), or once
        ``timeout`` seconds have passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._thread is threading.current_thread():
                return True  # a job that reads: what it needs was written before it
            target = self._submitted
            if self._completed < target:
                self._cond.notify_all()  # harmless if the worker is awake already
            while self._completed < target:
                if self._jobs and (self._thread is None or not self._thread.is_alive()):
                    job = self._jobs.popleft()
                    self._cond.release()
                    try:
                        self._run(job)
                    finally:
                        self._cond.acquire()
                    continue
                wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if wait <= 0:
                    return False
                self._cond.wait(wait)  # and look again whether the worker is alive
        return True

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                job = self._jobs.popleft()
            self._run(job)

    def _run(self, job: Callable[[], None]) -> None:
        with self._running:
            try:
                job()
            except BaseException:  # a failed sidecar or index write costs a re-read, no more
                log.exception("could not write checkpoint metadata")
        with self._cond:
            self._completed += 1
            self._cond.notify_all()

    def before_fork(self) -> None:
        self._running.acquire()

    def after_fork_in_parent(self) -> None:
        self._running.release()


_BEHIND = _WriteBehind()
atexit.register(_BEHIND.drain, 10.0)
os.register_at_fork(
    before=_BEHIND.before_fork,
    after_in_parent=_BEHIND.after_fork_in_parent,
    after_in_child=_BEHIND._reset,  # the parent's jobs are the parent's to write
)


class CheckpointManager:
    """Writes, verifies, lists and prunes checkpoints, and holds per-session writer locks.

    ``checkpoint_dir``, ``fsync`` and ``spares`` configure the default
    :class:`~prowzi.workflows.storage.LocalDirectoryStore`; with ``store=`` that store decides
    durability and ``checkpoint_dir`` only names the location in messages. ``key`` turns on
    HMAC-SHA256 signing, and then unsigned or wrongly signed checkpoints are refused. One
    manager may be shared by threads, and processes may share a directory; the writers of one
    session coordinate through :meth:`session_lock`.
    """

    def __init__(
        self,
        checkpoint_dir: Path | str = Path("./prowzi_checkpoints"),
        *,
        key: bytes | str | None = None,
        compression: Compression = "none",
        fsync: bool = True,
        store: CheckpointStore | None = None,
        spares: bool = True,
    ) -> None:
        if compression not in ("none", "zlib"):
            raise ValueError(f"unknown checkpoint compression {compression!r}: use none or zlib")
        if key is not None and not key:
            raise ValueError("the checkpoint key is empty")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.compression: Compression = compression
        self.fsync = fsync
        self.store: CheckpointStore = (
            store
            if store is not None
            else LocalDirectoryStore(self.checkpoint_dir, fsync=fsync, spares=spares)
        )
        self._key = key.encode() if isinstance(key, str) else key
        self._rows: dict[str, tuple[str, dict[str, Any] | None, str]] = {}
        """Blob name -> (token, listing row or None when unreadable, session)."""
        self._readable: dict[str, dict[str, Any]] = {}
        self._sessions: dict[str, list[str]] = {}
        self._unreadable: dict[str, float] = {}
        self._newest_first: list[dict[str, Any]] | None = None
        self._generation: int | None = None
        self._heads: dict[str, tuple[str, str]] = {}
        """``.pkl`` name -> (store token, payload_sha256 its header records)."""
        self._sidecars: dict[str, tuple[str, str]] = {}
        """``.json`` name -> (its token, payload_sha256 of the header it was checked against or
        written from): a sidecar whose file has not changed since need not be read again."""
        self._mutex = threading.RLock()  # the caches above are shared by threads
        self._recovered = False

    @classmethod
    def from_config(cls, config: ProwziConfig) -> CheckpointManager:
        """The manager the settings describe (``PROWZI_CHECKPOINT_DIR``, ``_KEY``, ...)."""
        key = config.checkpoint_key.get_secret_value() if config.checkpoint_key else None
        return cls(
            config.checkpoint_dir,
            key=key,
            compression=config.checkpoint_compression,
            fsync=config.checkpoint_fsync,
            spares=config.checkpoint_spares,
        )

    # --- writing ------------------------------------------------------------------------

    def save(
        self,
        *,
        session_id: str,
        stage: str,
        state: WorkflowState,
        completed_stages: Sequence[str],
        parameters: RunParameters,
        parent_session_id: str | None = None,
        previous_hash: str | None = None,
        trace_id: str | None = None,
        span_id: str | None = None,
    ) -> CheckpointMetadata:
        """Write the checkpoint ``<session>_<stage>`` durably and atomically.

        ``previous_hash`` defaults to the hash of the session's checkpoint of the latest
        earlier completed stage (in a plain run: the session's latest checkpoint), so a
        re-run of a stage after time travel chains onto the stage before it.
        """
        validate_session_id(session_id)
        validate_stage_name(stage)
        completed = [validate_stage_name(s) for s in completed_stages]
        if parent_session_id is not None:
            validate_session_id(parent_session_id)
        if previous_hash is not None and not _SHA256_RE.fullmatch(previous_hash):
            raise InvalidInputError(f"invalid previous_hash {previous_hash!r}: not a sha256")
        if not isinstance(parameters, RunParameters):
            raise InvalidInputError(f"parameters must be RunParameters, not {parameters!r}")
        for label, value in (("trace_id", trace_id), ("span_id", span_id)):
            if value is not None and not isinstance(value, str):
                raise InvalidInputError(f"invalid {label} {value!r}: not a string")
        if self.compression not in ("none", "zlib"):
            raise InvalidInputError(f"unknown compression {self.compression!r}")
        self._recover()
        if previous_hash is None:
            previous_hash = self._chain_head(session_id, stage, completed)

        checkpoint_id = f"{session_id}_{stage}"
        body = [
            b'{"checkpoint_id":',
            orjson.dumps(checkpoint_id),
            b',"previous_hash":',
            orjson.dumps(previous_hash),
            b',"state":',
            _dump_state(state),
            b"}",
        ]
        if self.compression == "zlib":
            body = [zlib.compress(b"".join(body), _ZLIB_LEVEL)]
        digest = hashlib.sha256()
        size = 0
        for part in body:
            digest.update(part)
            size += len(part)
        created = datetime.now(UTC)
        # The header as CheckpointMetadata.model_dump(mode="json") gives it (a test holds
        # them equal), built directly: every value is this method's own or checked above.
        header_doc: dict[str, Any] = {
            "checkpoint_id": checkpoint_id,
            "session_id": session_id,
            "stage": stage,
            "completed_stages": completed,
            "created_at": created.isoformat().replace("+00:00", "Z"),
            "prompt": parameters.prompt,
            "parameters": parameters.model_dump(mode="json"),
            "prowzi_version": __version__,
            "format_version": FORMAT_VERSION,
            "payload_size": size,
            "payload_sha256": digest.hexdigest(),
            "previous_hash": previous_hash,
            "compression": self.compression,
            "parent_session_id": parent_session_id,
            "signed": self._key is not None,
            "trace_id": trace_id,
            "span_id": span_id,
        }
        metadata = _rebuilt(
            CheckpointMetadata,
            set(header_doc),
            {
                **header_doc,
                "completed_stages": list(completed),
                "created_at": created,
                "parameters": dict(header_doc["parameters"]),
            },
        )
        name = f"{checkpoint_id}.pkl"
        try:
            token = self.store.put(name, _sealed(header_doc, body, self._key), recoverable=True)
        except OSError as exc:
            raise CheckpointError(
                f"could not write checkpoint {checkpoint_id} to {self.store.describe(name)}: "
                f"{exc.strerror or exc}; the previous checkpoint is intact"
            ) from exc
        if token is not None:
            self._heads[name] = (token, metadata.payload_sha256)
        _BEHIND.submit(functools.partial(self._derive, name, token, header_doc))
        return metadata

    def _derive(self, name: str, token: str | None, header_doc: dict[str, Any]) -> None:
        """After a save (on the write-behind thread): index its metadata, write its sidecar;
        nothing when the checkpoint was replaced or removed since (its directory too)."""
        if token is not None:
            token = self.store.finish(name, token)
            if self.store.token(name) != token:
                return
            self._heads[name] = (token, header_doc["payload_sha256"])
            self.store.remember(name, token, header_doc)
        self._write_sidecar(name[:-4], header_doc)

    def _write_sidecar(self, checkpoint_id: str, header_doc: dict[str, Any]) -> None:
        # Derived data: not fsynced, and a failure only costs a rewrite on the next load.
        name = f"{checkpoint_id}.json"
        try:
            token = self.store.put(
                name, orjson.dumps(header_doc, option=orjson.OPT_INDENT_2) + b"\n", durable=False
            )
        except OSError as exc:
            self._sidecars.pop(name, None)
            log.warning("could not write the metadata of checkpoint %s: %s", checkpoint_id, exc)
            return
        self._sidecar_checked(name, header_doc, token)

    def _sidecar_checked(
        self, name: str, header_doc: dict[str, Any], token: str | None = None
    ) -> None:
        if token is None:
            token = self.store.token(name)
        if token is None:
            self._sidecars.pop(name, None)
        else:
            self._sidecars[name] = (token, header_doc["payload_sha256"])

    def _payload_sha(self, name: str) -> str | None:
        """The ``payload_sha256`` a checkpoint's sealed header records (what the next
        checkpoint links to). Remembered per file version (its store token): a file this
        manager wrote or read, unchanged since, is not read again."""
        token = self.store.token(name)
        if token is None:
            raise BlobNotFoundError(name)
        cached = self._heads.get(name)
        if cached is not None and cached[0] == token:
            return cached[1]
        sha = self._read_header(name).get("payload_sha256")
        if not isinstance(sha, str):
            return None
        self._heads[name] = (token, sha)  # the token read first: a later change misses
        return sha

    def _chain_head(self, session_id: str, stage: str, completed: list[str]) -> str | None:
        for prior in _earlier(completed, stage):
            name = f"{session_id}_{prior}.pkl"
            try:
                sha = self._payload_sha(name)
            except BlobNotFoundError:
                continue
            except (CheckpointIntegrityError, UnsafeBlobError) as exc:
                log.warning("not chaining onto a damaged checkpoint: %s", exc)
                continue
            if sha is not None:
                return sha
        return None

    # --- reading ------------------------------------------------------------------------

    def load_checkpoint(self, checkpoint_id: str, stage: str | None = None) -> WorkflowCheckpoint:
        """Verify, then load, a checkpoint.

        ``checkpoint_id`` is ``"<session>_<stage>"`` or a bare session id (then the session's
        latest checkpoint, or the one of ``stage`` when given).
        """
        session_id, named_stage = split_checkpoint_id(checkpoint_id)
        if stage is not None:
            validate_stage_name(stage)
            if named_stage is not None and named_stage != stage:
                raise InvalidInputError(
                    f"checkpoint id {checkpoint_id!r} names stage {named_stage!r}, "
                    f"but stage {stage!r} was asked for"
                )
        stage = stage or named_stage
        self._recover()
        _BEHIND.drain()  # this process's sidecars are on disk before one is checked
        if stage is None:
            latest = self.latest(session_id)
            self._refuse_newer_unreadable(session_id, latest)
            if latest is None:
                raise CheckpointNotFoundError(
                    f"no checkpoint for session {session_id} in {self._location()}"
                )
            stage = latest.stage
        name = f"{session_id}_{stage}.pkl"
        try:
            raw = self._read(name)
        except BlobNotFoundError:
            saved = [row["stage"] for row in reversed(self.list_checkpoints(session_id=session_id))]
            held = f"; session {session_id} has checkpoints of {', '.join(saved)}" if saved else ""
            raise CheckpointNotFoundError(
                f"no checkpoint {session_id}_{stage} in {self._location()}{held}", saved
            ) from None
        metadata, header_doc, fields = self._verified(name, raw, check_link=True)
        self._check_sidecar(metadata, header_doc)
        fields["metadata"] = metadata
        return _rebuilt(WorkflowCheckpoint, set(fields), fields)

    def _refuse_newer_unreadable(self, session_id: str, latest: CheckpointMetadata | None) -> None:
        """Resuming a session must not silently fall back past a checkpoint it cannot read."""
        for name in self._sessions.get(session_id, ()):
            # Checked against the file's own age, as its header cannot be trusted.
            modified = self._unreadable.get(name)
            if modified is None or (latest and modified < latest.created_at.timestamp()):
                continue
            try:
                raw = self._read(name)
            except BlobNotFoundError:
                continue
            self._verified(name, raw, check_link=False)  # raises the precise reason

    def _read(self, name: str) -> bytes:
        """A checkpoint file's bytes; anything that is not a plausible one is refused."""
        try:
            raw = self.store.get(name, max_bytes=_MAX_FILE + 1)
        except UnsafeBlobError as exc:
            raise CheckpointIntegrityError(self.store.describe(name), str(exc)) from None
        if len(raw) > _MAX_FILE:
            raise CheckpointIntegrityError(
                self.store.describe(name), f"larger than {_MAX_FILE >> 20} MiB: implausible"
            )
        return raw

    def _location(self) -> str:
        return str(self.checkpoint_dir)

    def _read_header(self, name: str) -> dict[str, Any]:
        raw = self.store.get(name, max_bytes=_HEAD_READ)
        if len(raw) >= _PREFIX and raw[: len(MAGIC)] == MAGIC:
            (length,) = _LENGTH.unpack_from(raw, len(MAGIC))
            if _PREFIX + length + _DIGEST_SIZE > len(raw) and length <= _MAX_HEADER:
                raw = self.store.get(name, max_bytes=_PREFIX + length + _DIGEST_SIZE)
        header, _ = self._parse_header(raw, self.store.describe(name))
        return header

    @staticmethod
    def _parse_header(raw: bytes, where: str) -> tuple[dict[str, Any], int]:
        """The sealed header and its length, once the format version is one this Prowzi
        reads (newer: refused; older: only with migrations for every step)."""
        header, length = _unseal(raw, where)
        version = header.get("format_version")
        if type(version) is not int:
            raise CheckpointIntegrityError(where, "the header has no format version")
        if version > FORMAT_VERSION:
            raise CheckpointIntegrityError(
                where,
                f"written in checkpoint format {version} by a newer Prowzi; this Prowzi "
                f"({__version__}) reads formats up to {FORMAT_VERSION}: upgrade Prowzi to load it",
            )
        missing = _missing_migration(version)
        if missing is not None:
            raise CheckpointIntegrityError(
                where,
                f"checkpoint format {version} is older than any this Prowzi can migrate "
                f"(no migration from format {missing})",
            )
        return header, length

    def _verified(
        self, name: str, raw: bytes, *, check_link: bool
    ) -> tuple[CheckpointMetadata, dict[str, Any], dict[str, Any]]:
        """Every check, then the body's deserialisation: (metadata, header JSON, the state's
        fields)."""
        where = self.store.describe(name)
        header, length = self._parse_header(raw, where)
        signed = header.get("signed") is True
        body_start, size, sha = _payload_span(raw, header, length, where)
        if self._key is not None:
            if not signed:
                raise CheckpointIntegrityError(
                    where, "unsigned, and a checkpoint key is configured (PROWZI_CHECKPOINT_KEY)"
                )
            mac = hmac.digest(self._key, raw[:body_start], "sha256")
            mac_start = body_start + size
            if not hmac.compare_digest(mac, raw[mac_start : mac_start + _MAC_SIZE]):
                raise CheckpointIntegrityError(
                    where, "HMAC signature mismatch: a different key, or the file was altered"
                )
        body = memoryview(raw)[body_start : body_start + size]
        _check_payload_sha(body, sha, where)

        version = header["format_version"]
        header = _migrate_header(header)
        try:
            metadata = CheckpointMetadata.model_validate(header)
        except ValidationError as exc:
            raise CheckpointIntegrityError(where, f"invalid header: {_first_error(exc)}") from None
        expected_session, expected_stage = name[:-4].rsplit("_", 1)
        if (metadata.session_id, metadata.stage, metadata.checkpoint_id) != (
            expected_session,
            expected_stage,
            name[:-4],
        ):
            raise CheckpointIntegrityError(
                where,
                f"it holds checkpoint {metadata.checkpoint_id!r} (session "
                f"{metadata.session_id!r}), not {name[:-4]!r}: copied from another session?",
            )
        if check_link:
            self._check_link(metadata, where)

        decoded = self._decompress(metadata, body, where)
        try:
            if _body_migrates(version):
                parsed = _Body.model_validate(self._migrate_body(version, decoded, where))
            else:
                parsed = _Body.model_validate_json(decoded)
        except ValidationError as exc:
            raise CheckpointIntegrityError(
                where, f"the payload is not a Prowzi workflow state: {_first_error(exc)}"
            ) from None
        if (parsed.checkpoint_id, parsed.previous_hash) != (
            metadata.checkpoint_id,
            metadata.previous_hash,
        ):
            raise CheckpointIntegrityError(
                where, f"the payload belongs to checkpoint {parsed.checkpoint_id!r}"
            )
        return metadata, header, parsed.state_fields(where)

    @staticmethod
    def _decompress(metadata: CheckpointMetadata, body: memoryview, where: str) -> bytes:
        if metadata.compression == "none":
            return bytes(body)
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(body, _MAX_BODY)
        except zlib.error as exc:
            raise CheckpointIntegrityError(where, f"undecodable zlib payload: {exc}") from None
        if inflater.unconsumed_tail:
            raise CheckpointIntegrityError(where, "the payload inflates beyond the size limit")
        if not inflater.eof:
            raise CheckpointIntegrityError(where, "truncated zlib payload")
        return data

    @staticmethod
    def _migrate_body(version: int, decoded: bytes, where: str) -> dict[str, Any]:
        # The bytes are verified by now; parsing into plain JSON values builds no objects.
        try:
            doc = orjson.loads(decoded)
        except orjson.JSONDecodeError as exc:
            raise CheckpointIntegrityError(where, f"unreadable payload: {exc}") from None
        if not isinstance(doc, dict):
            raise CheckpointIntegrityError(where, "the payload is not an object")
        migrated: dict[str, Any] = doc
        for step in range(version, FORMAT_VERSION):
            migrated = _MIGRATIONS[step].body(migrated)
        return migrated

    def _check_link(self, metadata: CheckpointMetadata, where: str) -> None:
        """The previous checkpoint must be present, unless this is the oldest one left."""
        previous = metadata.previous_hash
        if previous is None:
            return
        sessions = [metadata.session_id]
        if metadata.parent_session_id is not None:
            sessions.append(metadata.parent_session_id)
        # Usually the previous checkpoint is that of the latest earlier completed stage:
        # reading a header or two avoids listing the whole store.
        for prior in _earlier(metadata.completed_stages, metadata.stage):
            for session in sessions:
                try:
                    sha = self._payload_sha(f"{session}_{prior}.pkl")
                except (BlobNotFoundError, UnsafeBlobError, CheckpointIntegrityError):
                    continue
                if sha == previous:
                    return
        # Otherwise read every header of the session (and its parent): the files, not the
        # index, are the truth here, and a file rewritten in place may not show in the index.
        headers = [h for session in sessions for h in self._session_headers(session)]
        if any(h.get("payload_sha256") == previous for h in headers):
            return
        older = any(
            h.get("session_id") == metadata.session_id
            and (created := _created_at(h)) is not None
            and created < metadata.created_at
            for h in headers
        )
        if older:
            raise CheckpointIntegrityError(
                where,
                f"hash chain broken: its previous checkpoint ({previous[:16]}...) is not in the "
                "store; it was superseded by a re-run of an earlier stage, or a file was altered",
            )

    def _session_headers(self, session_id: str) -> list[dict[str, Any]]:
        self._session_rows(session_id)
        headers = []
        for name in self._sessions.get(session_id, ()):
            try:
                headers.append(_migrate_header(self._read_header(name)))
            except (BlobNotFoundError, UnsafeBlobError, CheckpointIntegrityError):
                continue
        return headers

    def _check_sidecar(self, metadata: CheckpointMetadata, header_doc: dict[str, Any]) -> None:
        """Rewrite a missing or stale ``.json``; refuse one edited to point elsewhere.

        A sidecar this manager wrote or checked, whose file is unchanged since (same inode,
        size and mtime: any rewrite or edit changes one), is not read again."""
        name = f"{metadata.checkpoint_id}.json"
        known = self._sidecars.get(name)
        if known is not None and known == (self.store.token(name), metadata.payload_sha256):
            return
        try:
            doc = orjson.loads(self.store.get(name))
        except (BlobNotFoundError, orjson.JSONDecodeError):
            doc = None
        except UnsafeBlobError as exc:
            raise CheckpointIntegrityError(
                self.store.describe(name),
                f"{exc}; the metadata file is derived from {metadata.checkpoint_id}.pkl: "
                "delete it and it is regenerated",
            ) from None
        if doc == header_doc:
            self._sidecar_checked(name, header_doc)
            return
        if isinstance(doc, dict):
            foreign = sorted(set(doc) - set(CheckpointMetadata.model_fields))
            moved = [k for k in _IDENTITY_KEYS if k in doc and doc[k] != header_doc[k]]
            if foreign or moved:
                if foreign:
                    what = f"unknown keys {foreign}"
                else:
                    key = moved[0]
                    what = f"{key} {doc[key]!r} where the payload says {header_doc[key]!r}"
                raise CheckpointIntegrityError(
                    self.store.describe(name),
                    f"the metadata file was edited ({what}); it is derived from "
                    f"{metadata.checkpoint_id}.pkl: delete it and it is regenerated",
                )
        self._write_sidecar(metadata.checkpoint_id, header_doc)

    # --- listing ------------------------------------------------------------------------

    def _rows_now(self, *, fresh: bool = True) -> dict[str, dict[str, Any]]:
        """Listing rows of every readable checkpoint, by blob name (cached per generation)."""
        self._recover()
        _BEHIND.drain()  # this process's saves are indexed
        with self._mutex:
            return self._rebuild_rows(fresh)

    def _rebuild_rows(self, fresh: bool) -> dict[str, dict[str, Any]]:
        generation = self.store.generation(fresh=fresh)
        if generation is not None and generation == self._generation:
            return self._readable
        rows: dict[str, dict[str, Any]] = {}
        known = self._rows
        current: dict[str, tuple[str, dict[str, Any] | None, str]] = {}
        sessions: dict[str, list[str]] = {}
        unreadable: dict[str, float] = {}
        with paused_gc():
            for blob in self.store.list(fresh=False):
                if not blob.name.endswith(".pkl"):
                    continue
                cached = known.get(blob.name)
                if cached is not None and cached[0] == blob.token:
                    row, session = cached[1], cached[2]
                else:
                    parsed = _session_of(blob.name)
                    if parsed is None:
                        continue
                    session = parsed[0]
                    row = _listed(blob.meta, blob.name) if blob.meta is not None else None
                    if row is None and (blob.meta is None or "invalid" not in blob.meta):
                        # Unknown to the store, or an index entry not of our making.
                        meta = self._index(blob)
                        row = _listed(meta, blob.name) if meta is not None else None
                sessions.setdefault(session, []).append(blob.name)
                current[blob.name] = (blob.token, row, session)
                if row is not None:
                    rows[blob.name] = row
                else:
                    unreadable[blob.name] = blob.modified
        self._rows, self._readable, self._newest_first = current, rows, None
        self._sessions, self._unreadable = sessions, unreadable
        # Reading headers above may have taught the store new meta: that is no change.
        self._generation = self.store.generation(fresh=False)
        return rows

    def _index(self, blob: BlobInfo) -> dict[str, Any] | None:
        """Read a checkpoint's header for the index (the store could not vouch for its meta)."""
        name = blob.name
        if _session_of(name) is None:
            return None
        where = self.store.describe(name)
        try:
            header = _migrate_header(self._read_header(name))
            metadata = CheckpointMetadata.model_validate(header)
            if metadata.checkpoint_id != name[:-4]:
                raise CheckpointIntegrityError(where, f"it holds {metadata.checkpoint_id!r}")
        except BlobNotFoundError:
            return None
        except (CheckpointIntegrityError, ValidationError) as exc:
            # Not remembered by the store: another Prowzi (with a migration) may read it.
            log.warning("skipping unreadable checkpoint %s: %s", where, exc)
            return {"invalid": str(exc)}
        meta = metadata.model_dump(mode="json")
        self.store.remember(name, blob.token, meta)
        return meta

    def list_checkpoints(
        self,
        session_id: str | None = None,
        stage: str | None = None,
        since: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Checkpoints, newest first, as dicts of their metadata (``created_at`` a datetime).

        Rows come from the store's index; a file is read (and, when unreadable, skipped and
        logged) only when the index cannot vouch for it. A file overwritten in place after it
        was indexed, without any rename in the directory, keeps its indexed row until it is
        next read: listing is a catalogue, not a verification. Loading always verifies, and
        says why a file is refused (:meth:`verify_chain` checks a whole session).
        """
        if session_id is not None:
            validate_session_id(session_id)
        if stage is not None:
            validate_stage_name(stage)
        if since is not None:
            since = since.astimezone(UTC)  # a naive datetime is local time, as in timestamp()
        with self._mutex:
            rows = self._rows_now()
            if self._newest_first is None:
                self._newest_first = sorted(
                    rows.values(), key=lambda row: row["created_at"], reverse=True
                )
            newest_first = self._newest_first
        with paused_gc():
            return [
                dict(row)
                for row in newest_first
                if (session_id is None or row["session_id"] == session_id)
                and (stage is None or row["stage"] == stage)
                and (since is None or row["created_at"] >= since)
            ]

    def has_session(self, session_id: str, stages: Iterable[str]) -> bool:
        """Whether ``session_id`` has a checkpoint file for any of ``stages``.

        One lookup per stage and no listing, so it stays cheap in a directory of thousands of
        sessions (a new run checks that its chosen id is not taken).
        """
        validate_session_id(session_id)
        return any(
            self.store.token(f"{session_id}_{validate_stage_name(stage)}.pkl") is not None
            for stage in stages
        )

    def latest(self, session_id: str) -> CheckpointMetadata | None:
        """The session's most recent checkpoint, or None."""
        validate_session_id(session_id)
        rows = list(self._session_rows(session_id).values())
        if not rows:
            return None
        return CheckpointMetadata.model_validate(max(rows, key=lambda r: r["created_at"]))

    def _session_rows(self, session_id: str) -> dict[str, dict[str, Any]]:
        """One session's readable rows, exact: its files are re-examined, so a file rewritten
        in place (which a directory listing cannot notice) is seen."""
        self._rows_now()
        for name in self._sessions.get(session_id, ()):
            self.store.refresh(name)
        rows = self._rows_now(fresh=False)
        return {n: rows[n] for n in self._sessions.get(session_id, ()) if n in rows}

    def verify_chain(self, session_id: str) -> None:
        """Verify every checkpoint of the session, and the chain from its latest back.

        Checkpoints off that chain (left behind when a stage was re-run after time travel) are
        verified individually. A chain may start late when older checkpoints were pruned.
        """
        validate_session_id(session_id)
        self._session_rows(session_id)
        names = sorted(self._sessions.get(session_id, ()))
        verified: list[CheckpointMetadata] = []
        for name in names:
            try:
                raw = self._read(name)
            except BlobNotFoundError:
                continue
            verified.append(self._verified(name, raw, check_link=False)[0])
        if not verified:
            raise CheckpointNotFoundError(
                f"no checkpoint for session {session_id} in {self._location()}"
            )
        by_hash = {m.payload_sha256: m for m in verified}
        current = max(verified, key=lambda m: m.created_at)
        seen: set[str] = set()
        while current.previous_hash is not None:
            seen.add(current.payload_sha256)
            where = self.store.describe(f"{current.checkpoint_id}.pkl")
            previous = by_hash.get(current.previous_hash)
            if previous is None:
                older = any(m.created_at < current.created_at for m in verified)
                if current.parent_session_id is not None and not older:
                    # A fork's first checkpoint links into its parent session (if still kept).
                    parent = self._session_headers(current.parent_session_id)
                    if not parent or any(
                        h.get("payload_sha256") == current.previous_hash for h in parent
                    ):
                        break
                    raise CheckpointIntegrityError(
                        where,
                        f"hash chain broken: the parent session {current.parent_session_id} "
                        f"has no checkpoint {current.previous_hash[:16]}...",
                    )
                if older:
                    raise CheckpointIntegrityError(
                        where,
                        f"hash chain broken: previous checkpoint {current.previous_hash[:16]}... "
                        "is missing",
                    )
                break
            if previous.payload_sha256 in seen or previous.created_at > current.created_at:
                raise CheckpointIntegrityError(where, "hash chain out of order")
            current = previous

    # --- locks and cleanup --------------------------------------------------------------

    # --- recovery -----------------------------------------------------------------------

    def _recover(self, *, force: bool = False, doomed: frozenset[str] = frozenset()) -> None:
        """Once per manager (and at every cleanup): let the store finish the saves a power
        loss interrupted (see :meth:`LocalDirectoryStore.recover`). Spares of the ``doomed``
        sessions (about to be deleted) are discarded, so none can come back later."""
        if self._recovered and not force:
            return
        with self._mutex:
            if self._recovered and not force:
                return
            self._recovered = True
            try:
                published = self.store.recover(
                    lambda data, publish: self._judge_interrupted(data, publish, doomed),
                    _saved_at,
                )
            except Exception as exc:  # best effort: never fail the command that triggered it
                log.warning("could not recover interrupted checkpoints: %s", exc)
                return
        for name in published:
            log.warning("recovered checkpoint %s, whose save a power loss interrupted", name)

    def _judge_interrupted(
        self, data: bytes, publish: Callable[[str], None], doomed: frozenset[str] = frozenset()
    ) -> Verdict:
        """A save a power loss cut short, found in a spare (see the store's ``recover``).

        Damaged (its write never completed, so its save never returned): discard. Intact but
        not something this Prowzi can vouch for (a newer format, another HMAC key): keep, for
        a Prowzi that can; never destroy what may be the only copy. Intact and verified:
        publish under its name, holding the session's lock, if it is still the newest
        checkpoint of its session; discard it if the session moved on without it (a re-run
        since), or is being deleted. A locked session is left for later.
        """
        if not _intact(data):
            return "discard"
        try:
            header, _ = self._parse_header(data, "an interrupted save")
            session_id, stage = split_checkpoint_id(header.get("checkpoint_id"))
        except (CheckpointIntegrityError, InvalidInputError):
            return "keep"
        if header.get("signed") is True and self._key is None:
            # Its signature may be torn (the file is whole-sized from the start, so a cut
            # write is not short); only a manager with the key can tell.
            return "keep"
        if stage is None:
            return "keep"
        if session_id in doomed:
            return "discard"
        name = f"{session_id}_{stage}.pkl"
        try:
            metadata = self._verified(name, data, check_link=False)[0]
        except CheckpointIntegrityError:
            return "keep"
        try:
            with self.store.lock(session_id, 0):
                for other in self._session_headers(session_id):
                    when = _created_at(other)
                    aware = when is not None and when.tzinfo is not None
                    if aware and when is not None and when >= metadata.created_at:
                        return "discard"
                publish(name)
                self._write_sidecar(metadata.checkpoint_id, metadata.model_dump(mode="json"))
                return "published"
        except SessionLockedError:
            return "keep"

    def close(self) -> None:
        """Finish writing the saves' metadata, and release the files the store holds open
        (spare files prepared for saves). The manager stays usable."""
        _BEHIND.drain()
        self.store.close()

    def flush(self) -> None:
        """Return once what every save of this process derives has been written: its
        ``.json`` and index entry (a save returns once its checkpoint is durable; these follow
        it in the background). A write that fails is logged: both are regenerated later."""
        _BEHIND.drain()

    def session_lock(self, session_id: str, timeout: float = 0) -> AbstractContextManager[None]:
        """The session's writer lock; :class:`SessionLockedError` names the holder."""
        validate_session_id(session_id)
        self._recover()  # before taking it: recovery needs the session's lock
        return self._holding(session_id, timeout)

    @contextlib.contextmanager
    def _holding(self, session_id: str, timeout: float) -> Iterator[None]:
        with self.store.lock(session_id, timeout):
            try:
                yield
            finally:
                _BEHIND.drain()  # all written before another process may clean the session up

    def is_locked(self, session_id: str) -> bool:
        return self.store.is_locked(validate_session_id(session_id))

    def lock_holder(self, session_id: str) -> str | None:
        """Who holds the session's writer lock (a running run or resume), or None."""
        return self.store.holder(validate_session_id(session_id))

    def cleanup(
        self,
        *,
        older_than: timedelta,
        keep_last: int = 0,
        dry_run: bool = False,
        on_running: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Delete sessions whose newest checkpoint is older than ``older_than``.

        The ``keep_last`` most recent sessions are kept whatever their age, and a session
        whose lock is held (a running workflow) is never touched: ``on_running`` hears of
        each such session that was old enough to go. Orphaned ``.json`` files and temporaries
        left by interrupted writes are removed too. Returns the deleted (or, with ``dry_run``,
        the deletable) checkpoint ids.
        """
        if older_than < timedelta(0):
            raise InvalidInputError("older_than must not be negative")
        if keep_last < 0:
            raise InvalidInputError("keep_last must not be negative")
        cutoff = datetime.now(UTC) - older_than
        self._recover(force=True)
        _BEHIND.drain()  # no sidecar of this process lands after its checkpoint is deleted
        if not dry_run:
            self.store.settle()  # no recovery may republish what is deleted below
        rows = self._rows_now()
        blobs = self.store.list(fresh=False)
        newest: dict[str, datetime] = {}
        names: dict[str, list[str]] = {}
        for blob in blobs:
            parsed = _session_of(blob.name)
            if parsed is None:
                continue
            row = rows.get(blob.name)
            when = row["created_at"] if row else datetime.fromtimestamp(blob.modified, UTC)
            session = parsed[0]
            newest[session] = max(newest.get(session, when), when)
            names.setdefault(session, []).append(blob.name)
        kept = set(sorted(newest, key=lambda s: newest[s], reverse=True)[:keep_last])
        if not dry_run:
            # First the spares of the sessions about to go (even ones this manager's key
            # could not vouch for): none may bring a deleted checkpoint back later.
            doomed = frozenset(
                session
                for session, stamp in newest.items()
                if session not in kept and stamp < cutoff and not self.store.is_locked(session)
            )
            if doomed:
                self._recover(force=True, doomed=doomed)
        deleted: list[str] = []
        for session, stamp in newest.items():
            if session in kept or stamp >= cutoff:
                continue
            ids = [name[:-4] for name in names[session]]
            if dry_run:
                if not self.store.is_locked(session):
                    deleted.extend(ids)
                elif on_running is not None:
                    on_running(session)
                continue
            try:
                with self.store.lock(session, 0):
                    for checkpoint_id in ids:
                        self.store.delete(f"{checkpoint_id}.pkl")
                        self.store.delete(f"{checkpoint_id}.json")
            except SessionLockedError:
                log.info("not cleaning up session %s: it is running", session)
                if on_running is not None:
                    on_running(session)
                continue
            deleted.extend(ids)
        if not dry_run:
            self._remove_orphans(blobs, cutoff)
            self.store.sweep_temporaries()
        return sorted(deleted)

    def _remove_orphans(self, blobs: Sequence[Any], cutoff: datetime) -> None:
        present = {b.name for b in blobs}
        for blob in blobs:
            if not blob.name.endswith(".json") or f"{blob.name[:-5]}.pkl" in present:
                continue
            if datetime.fromtimestamp(blob.modified, UTC) < cutoff:
                self.store.delete(blob.name)


def _unseal(raw: bytes, where: str) -> tuple[dict[str, Any], int]:
    """A container's header (a JSON object) and its length, after the structural checks
    that need neither the key nor the format version: magic, lengths, header digest."""
    if raw[: len(MAGIC)] != MAGIC:
        hint = ""
        if raw[:1] == b"\x80" or raw[:1] in (b"(", b"c", b"]", b"}"):
            hint = " (it looks like a pickle; Prowzi never unpickles checkpoint files)"
        raise CheckpointIntegrityError(where, f"not a Prowzi checkpoint container{hint}")
    if len(raw) < _PREFIX:
        raise CheckpointIntegrityError(where, "truncated header")
    (length,) = _LENGTH.unpack_from(raw, len(MAGIC))
    if length > _MAX_HEADER:
        raise CheckpointIntegrityError(where, f"header of {length} bytes is implausible")
    sealed = _PREFIX + length
    if len(raw) < sealed + _DIGEST_SIZE:
        raise CheckpointIntegrityError(where, "truncated header")
    if hashlib.sha256(raw[:sealed]).digest() != raw[sealed : sealed + _DIGEST_SIZE]:
        raise CheckpointIntegrityError(where, "header digest mismatch: corrupted or altered")
    try:
        header = orjson.loads(raw[_PREFIX : _PREFIX + length])
    except orjson.JSONDecodeError as exc:
        raise CheckpointIntegrityError(where, f"unreadable header: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointIntegrityError(where, "the header is not an object")
    return header, length


def _payload_span(
    raw: bytes, header: dict[str, Any], length: int, where: str
) -> tuple[int, int, str]:
    """(body start, body size, body sha256) the header records, once the file's length
    matches them (and the MAC, when signed). Zero bytes after the end are padding a save
    leaves until its write-behind cuts it (or for good, when the process died first); any
    other byte there is refused."""
    size, sha = header.get("payload_size"), header.get("payload_sha256")
    if type(size) is not int or size < 0 or not isinstance(sha, str):
        raise CheckpointIntegrityError(where, "the header lacks the payload's size or hash")
    body_start = _PREFIX + length + _DIGEST_SIZE
    expected = body_start + size + (_MAC_SIZE if header.get("signed") is True else 0)
    if len(raw) != expected and (
        len(raw) < expected or raw.count(0, expected) != len(raw) - expected
    ):
        problem = "truncated" if len(raw) < expected else "trailing bytes after the payload"
        raise CheckpointIntegrityError(
            where, f"{problem}: {len(raw)} bytes where the header implies {expected}"
        )
    if header.get("signed") is True and raw.count(0, expected - _MAC_SIZE, expected) == _MAC_SIZE:
        # Zeros where the signature goes: a write cut short inside a spare's zeros (a real
        # HMAC is all zeros with probability 2**-256).
        raise CheckpointIntegrityError(where, "truncated: its signature was never written")
    return body_start, size, sha


def _check_payload_sha(body: memoryview, sha: str, where: str) -> None:
    if hashlib.sha256(body).hexdigest() != sha:
        raise CheckpointIntegrityError(where, "payload sha256 mismatch: corrupted or altered")


def _intact(raw: bytes) -> bool:
    """Whether a container is whole and undamaged, judged by the checks that need neither
    the key nor the format version (so a newer Prowzi's file is not called damaged). False
    means a write that never completed, or damage."""
    try:
        header, length = _unseal(raw, "")
        if not isinstance(header.get("payload_size"), int):
            return True  # a shape this version does not know: not provably damaged
        start, size, sha = _payload_span(raw, header, length, "")
        _check_payload_sha(memoryview(raw)[start : start + size], sha, "")
    except CheckpointIntegrityError:
        return False
    return True


def _sealed(header_doc: dict[str, Any], body: list[bytes], key: bytes | None) -> list[bytes]:
    """The parts of a checkpoint's container (see the module docstring), in order."""
    header = orjson.dumps(header_doc)
    sealed = MAGIC + _LENGTH.pack(len(header)) + header
    prefix = sealed + hashlib.sha256(sealed).digest()
    mac = [hmac.digest(key, prefix, "sha256")] if key is not None else []
    return [prefix, *body, *mac]


def _seal(header_doc: dict[str, Any], body: bytes, key: bytes | None) -> bytes:
    """The container bytes of a checkpoint, whole."""
    return b"".join(_sealed(header_doc, [body], key))


def _plain_models(root: type[BaseModel]) -> frozenset[type[BaseModel]]:
    """The model classes reachable from ``root``'s fields that serialise exactly as their
    ``__dict__`` (what ``model_dump()`` gives for them): no serializers, computed fields,
    excluded fields or extra values."""
    found: set[type[BaseModel]] = set()
    pending: list[Any] = [root]
    while pending:
        tp = pending.pop()
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in found:
                continue
            found.add(tp)
            pending.extend(f.annotation for f in tp.model_fields.values())
        else:
            pending.extend(get_args(tp))
    return frozenset(
        cls
        for cls in found
        if not cls.model_computed_fields
        and cls.model_config.get("extra") != "allow"
        and not cls.__pydantic_decorators__.field_serializers
        and not cls.__pydantic_decorators__.model_serializers
        and not any(f.exclude for f in cls.model_fields.values())
    )


_PLAIN_MODELS = _plain_models(WorkflowState)


def _fields_of(obj: Any) -> Any:
    """orjson's hook for the state's own models: their field values, as ``model_dump()``
    would give them, without building the dicts first (a third of the time)."""
    if type(obj) in _PLAIN_MODELS:
        return obj.__dict__
    raise TypeError  # anything else (a subclass, a foreign value): the slow path


def _shared_fields(verification: VerificationAgentResult, index: dict[int, int]) -> Any:
    """The verification result's fields, with each verified or rejected source that is one
    of the search's (the very object) written as its position in ``state.search.sources``,
    given by ``index`` (``id`` -> position)."""
    values = dict(verification.__dict__)
    values["verified"] = [index.get(id(s), s) for s in verification.verified]
    values["rejected"] = [
        {**r.__dict__, "source": index.get(id(r.source), r.source)}
        if type(r) is RejectedSource
        else r
        for r in verification.rejected
    ]
    return values


_STATE_FIELDS = tuple(WorkflowState.model_fields)


def _dump_state(state: WorkflowState) -> bytes:
    """The state's fields as JSON: ``model_dump``'s, but with the sources the state's own
    verification result shares with the search written once (format 2). A state the fast
    encoding does not know is written in full, without sharing."""
    values = state.__dict__
    top = {name: values[name] for name in _STATE_FIELDS}
    search, verification = top["search"], top["verification"]
    if type(search) is SearchAgentResult and type(verification) is VerificationAgentResult:
        index = {id(s): j for j, s in enumerate(search.sources)}
        top["verification"] = _shared_fields(verification, index)
    with contextlib.suppress(TypeError):
        return orjson.dumps(top, default=_fields_of)
    # WorkflowState's serializer (not the state's: a subclass may carry more fields).
    serializer = WorkflowState.__pydantic_serializer__
    try:
        return orjson.dumps(serializer.to_python(state))
    except TypeError:
        # stage_metrics may hold values orjson does not know; pydantic's encoder does.
        return serializer.to_json(state)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "payload"
    return f"{loc}: {err['msg']} ({exc.error_count()} error(s))"

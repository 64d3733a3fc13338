"""Checkpoints: a verified, versioned, hash-chained, incremental snapshot of a run after a stage.

Each checkpoint is two blobs in a :class:`~prowzi.storage.blob.BlobStore` (by default files in
``checkpoint_dir``; ``s3://`` and ``az://`` locations work the same):

``<session>_<stage>.pkl``
    The checkpoint, in the container of :mod:`prowzi.storage.format` (despite the name, kept
    from the design document, it is **not a pickle**). Its header is the
    :class:`CheckpointMetadata`; its body holds the workflow state's fields as JSON, zstd
    compressed by default.
``<session>_<stage>.json``
    The same metadata, indented, for humans. Derived from the ``.pkl`` and never trusted: a
    missing or stale one is rewritten on load; one edited to name another checkpoint is refused.

**Incremental.** A checkpoint stores the fields its stages changed; a field unchanged since
the session's previous checkpoint is a reference (``refs``: the checkpoint that holds it and
the field's sha256). References always point at the checkpoint that holds the value, so a load
reads at most ``full_every`` blobs, and every ``full_every``-th checkpoint of a run is a full
snapshot. References stay inside one run of one session: the first checkpoint a process writes
for a session (a resume, a fork) is full, so a session never depends on another session, and
cleanup, which deletes whole sessions, can never delete a part a kept checkpoint needs.

**Verified before deserialised.** Container magic (a real pickle is refused untouched), format
version (newer: refused; older: migrated), size, sha256, HMAC when a key is configured, the
blob's identity (a checkpoint copied from another session is refused), the link to the
previous checkpoint, and for every referenced part the same checks plus the field's digest.
Only then is the body parsed, by pydantic, into Prowzi's own result models. Every refusal is a
:class:`~prowzi.errors.CheckpointIntegrityError` naming the blob.

**One writer per session.** :meth:`CheckpointManager.session_lock` takes the session's lease
(:mod:`prowzi.storage.lease`); while it is held every save first checks the lease's fencing
token, so a writer whose lease was taken over cannot overwrite its successor's checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_args

import orjson
import pydantic_core
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
from prowzi.storage import format as fmt
from prowzi.storage.blob import (
    BlobInfo,
    BlobNotFoundError,
    BlobStore,
    InMemoryBlobStore,
    UnsafeBlobError,
)
from prowzi.storage.catalog import Catalog, default_catalog_path
from prowzi.storage.format import FORMAT_VERSION, Compression
from prowzi.storage.lease import DEFAULT_TTL, HeldLease, SessionLeases
from prowzi.storage.local import LocalBlobStore

if TYPE_CHECKING:
    from prowzi.config import ProwziConfig

__all__ = ["FORMAT_VERSION", "CheckpointManager", "CheckpointMetadata", "WorkflowCheckpoint"]

log = logging.getLogger("prowzi.checkpoint")

_SHA256_RE_LEN = 64
_IDENTITY_KEYS = ("checkpoint_id", "session_id", "stage")
_BODY_KEYS = frozenset({"checkpoint_id", "previous_hash", "fields"})
DEFAULT_FULL_EVERY = 4
_HEADS_KEPT = 64
"""Sessions whose last checkpoint a manager remembers (to refer to); the oldest goes first."""


class FieldRef(BaseModel):
    """A state field held by an earlier checkpoint of the same session."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str
    sha256: str


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
    fields: dict[str, str] | None = Field(
        None, description="sha256 of each state field this checkpoint holds (format 3)."
    )
    refs: dict[str, FieldRef] = Field(
        default_factory=dict, description="State fields held by earlier checkpoints."
    )
    depth: int = Field(0, ge=0, description="Checkpoints since the last full snapshot.")
    lease_token: int | None = Field(None, description="The writer's fencing token.")


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


def _session_of(name: str) -> tuple[str, str] | None:
    """``"<session>_<stage>.pkl"`` -> (session, stage); None for any other blob name."""
    if not name.endswith(".pkl") or "/" in name:
        return None
    try:
        session, stage = split_checkpoint_id(name[:-4])
    except InvalidInputError:
        return None
    return (session, stage) if stage is not None else None


def _earlier(completed: list[str], stage: str) -> list[str]:
    """The completed stages before ``stage``, latest first."""
    earlier = completed[: completed.index(stage)] if stage in completed else completed
    return earlier[::-1]


_ROW_KEYS = frozenset(CheckpointMetadata.model_fields) | {"modified"}


def _plausible(row: dict[str, Any], name: str) -> bool:
    """Whether ``row`` has the shape of the listing row of the blob ``name``: every key of
    the metadata and ``modified``, the blob's very identity, an aware time."""
    checkpoint_id = name[:-4]
    created = _created_at(row)
    return (
        set(row) == _ROW_KEYS
        and type(row["modified"]) in (int, float)
        and row["checkpoint_id"] == checkpoint_id
        and isinstance(row["session_id"], str)
        and isinstance(row["stage"], str)
        and f"{row['session_id']}_{row['stage']}" == checkpoint_id
        and isinstance(row["payload_sha256"], str)
        and created is not None
    )


def _created_at(header: dict[str, Any]) -> datetime | None:
    try:
        created = datetime.fromisoformat(header["created_at"])
    except (KeyError, TypeError, ValueError):
        return None
    return created if created.tzinfo is not None else None


@dataclass(slots=True)
class _Head:
    """The last checkpoint this manager wrote for a session: what the next one may refer to."""

    checkpoint_id: str
    payload_sha256: str
    depth: int
    holders: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)
    """Field -> (checkpoint holding its value, the value's sha256, the value as encoded)."""


class CheckpointManager:
    """Writes, verifies, lists and prunes checkpoints, and holds per-session leases.

    ``checkpoint_dir`` and ``fsync`` configure the default local store; with ``store=`` that
    store is used and ``checkpoint_dir`` only names the location in messages. ``key`` turns on
    HMAC-SHA256 signing, and then unsigned or wrongly signed checkpoints are refused.
    ``compression`` is ``zstd`` (default), ``zlib`` or ``none``; ``full_every`` bounds how many
    checkpoints a load reads (every ``full_every``-th checkpoint of a run is a full snapshot;
    1 makes every checkpoint full). One manager may be shared by threads; processes and
    machines may share a store, and the writers of one session coordinate through
    :meth:`session_lock`.
    """

    def __init__(
        self,
        checkpoint_dir: Path | str = Path("./prowzi_checkpoints"),
        *,
        key: bytes | str | None = None,
        compression: Compression = "zstd",
        compression_level: int | None = None,
        fsync: bool = True,
        store: BlobStore | None = None,
        full_every: int = DEFAULT_FULL_EVERY,
        lease_ttl: float = DEFAULT_TTL,
        catalog: Path | None = None,
    ) -> None:
        if compression not in fmt.COMPRESSIONS:
            raise ValueError(
                f"unknown checkpoint compression {compression!r}: use none, zlib or zstd"
            )
        if key is not None and not key:
            raise ValueError("the checkpoint key is empty")
        if full_every < 1:
            raise ValueError("full_every must be at least 1")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.compression: Compression = compression
        self.compression_level = compression_level
        self.fsync = fsync
        self.full_every = full_every
        self.store: BlobStore = (
            store if store is not None else LocalBlobStore(self.checkpoint_dir, durable=fsync)
        )
        self.location = str(self.checkpoint_dir) if store is None else self.store.url
        self.leases = SessionLeases(self.store, ttl=lease_ttl)
        if catalog is None and isinstance(self.store, InMemoryBlobStore):
            # Its etags restart with every instance at the same url: a catalog kept on disk
            # would take one instance's rows for another's.
            self.catalog = Catalog(None)
        else:
            self.catalog = Catalog(catalog or default_catalog_path(self.store.url))
        self._key = key.encode() if isinstance(key, str) else key
        self._heads: dict[str, _Head] = {}
        self._memo: dict[str, tuple[str, dict[str, Any] | None]] = {}
        """Blob name -> (etag, listing row) as this manager last listed it."""
        self._held: dict[str, HeldLease] = {}

    @classmethod
    def from_config(cls, config: ProwziConfig) -> CheckpointManager:
        """The manager the settings describe (``PROWZI_CHECKPOINT_URL`` or ``_DIR``, ...)."""
        key = config.checkpoint_key.get_secret_value() if config.checkpoint_key else None
        url = config.checkpoint_url
        store = None
        if url:
            from prowzi.storage.remote import open_store

            store = open_store(url, durable=config.checkpoint_fsync)
        return cls(
            config.checkpoint_dir,
            key=key,
            compression=config.checkpoint_compression,
            compression_level=config.checkpoint_compression_level,
            fsync=config.checkpoint_fsync,
            store=store,
            full_every=config.checkpoint_full_every,
            lease_ttl=config.lease_ttl_seconds,
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
        re-run of a stage after time travel chains onto the stage before it. While this
        manager holds the session's lease, the save is refused
        (:class:`~prowzi.storage.lease.LeaseLostError`) once another writer took it over.
        """
        validate_session_id(session_id)
        validate_stage_name(stage)
        completed = [validate_stage_name(s) for s in completed_stages]
        if parent_session_id is not None:
            validate_session_id(parent_session_id)
        if previous_hash is not None and not _is_sha256(previous_hash):
            raise InvalidInputError(f"invalid previous_hash {previous_hash!r}: not a sha256")
        if not isinstance(parameters, RunParameters):
            raise InvalidInputError(f"parameters must be RunParameters, not {parameters!r}")
        for label, value in (("trace_id", trace_id), ("span_id", span_id)):
            if value is not None and not isinstance(value, str):
                raise InvalidInputError(f"invalid {label} {value!r}: not a string")
        if self.compression not in fmt.COMPRESSIONS:  # a public attribute, set after __init__
            raise InvalidInputError(
                f"unknown compression {self.compression!r}: use none, zlib or zstd"
            )
        checkpoint_id = f"{session_id}_{stage}"
        name = f"{checkpoint_id}.pkl"
        if previous_hash is None:
            try:
                previous_hash = self._chain_head(session_id, stage, completed)
            except OSError as exc:  # the store cannot be reached: nothing was written
                raise self._write_failed(checkpoint_id, name, exc) from exc
        encoded = _encode_fields(state)
        head = self._heads.pop(session_id, None)
        refs: dict[str, dict[str, str]] = {}
        depth = 0
        if (
            head is not None
            and head.payload_sha256 == previous_hash
            and head.depth + 1 < self.full_every
        ):
            depth = head.depth + 1
            for field_name, field_json in encoded.items():
                holder = head.holders.get(field_name)
                if holder is not None and holder[2] == field_json and field_json != b"null":
                    refs[field_name] = {"checkpoint": holder[0], "sha256": holder[1]}
        inline = [name for name in encoded if name not in refs]
        digests = {name: hashlib.sha256(encoded[name]).hexdigest() for name in inline}
        body = fmt.compress(
            b"".join(
                [
                    b'{"checkpoint_id":',
                    orjson.dumps(checkpoint_id),
                    b',"previous_hash":',
                    orjson.dumps(previous_hash),
                    b',"fields":{',
                    b",".join(b'"%s":%s' % (n.encode(), encoded[n]) for n in inline),
                    b"}}",
                ]
            ),
            self.compression,
            self.compression_level,
        )
        size, sha = fmt.body_digest(body)
        try:
            lease = self._fence(session_id)
        except OSError as exc:
            raise self._write_failed(checkpoint_id, name, exc) from exc
        created = datetime.now(UTC)
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
            "payload_sha256": sha,
            "previous_hash": previous_hash,
            "compression": self.compression,
            "parent_session_id": parent_session_id,
            "signed": self._key is not None,
            "trace_id": trace_id,
            "span_id": span_id,
            "fields": {name: digests[name] for name in inline},
            "refs": refs,
            "depth": depth,
            "lease_token": lease,
        }
        try:
            self.store.put(name, b"".join(fmt.seal(header_doc, body, self._key)))
        except OSError as exc:
            raise self._write_failed(checkpoint_id, name, exc) from exc
        holders = {n: (checkpoint_id, digests[n], encoded[n]) for n in inline}
        holders.update({n: (r["checkpoint"], r["sha256"], encoded[n]) for n, r in refs.items()})
        if len(self._heads) >= _HEADS_KEPT:  # sessions saved without a lock, long ago
            del self._heads[next(iter(self._heads))]
        self._heads[session_id] = _Head(checkpoint_id, sha, depth, holders)
        self._write_sidecar(checkpoint_id, header_doc)
        return CheckpointMetadata.model_validate(header_doc)

    def _write_failed(self, checkpoint_id: str, name: str, exc: OSError) -> CheckpointError:
        return CheckpointError(
            f"could not write checkpoint {checkpoint_id} to {self.store.describe(name)}: "
            f"{exc.strerror or exc}; the previous checkpoint is intact"
        )

    def _fence(self, session_id: str) -> int | None:
        """The fencing check before a write: this manager's lease token on the session (None
        when it holds no lease; then the caller coordinates writers itself)."""
        held = self._held.get(session_id)
        return held.check().token if held is not None else None

    def _write_sidecar(self, checkpoint_id: str, header_doc: dict[str, Any]) -> None:
        # Derived data: not fsynced, and a failure only costs a rewrite on the next load.
        name = f"{checkpoint_id}.json"
        try:
            self.store.put(
                name, orjson.dumps(header_doc, option=orjson.OPT_INDENT_2) + b"\n", durable=False
            )
        except OSError as exc:
            log.warning("could not write the metadata of checkpoint %s: %s", checkpoint_id, exc)

    def _chain_head(self, session_id: str, stage: str, completed: list[str]) -> str | None:
        head = self._heads.get(session_id)
        for prior in _earlier(completed, stage):
            if head is not None and head.checkpoint_id == f"{session_id}_{prior}":
                return head.payload_sha256
            try:
                sha = self._read_header(f"{session_id}_{prior}.pkl").get("payload_sha256")
            except BlobNotFoundError:
                continue
            except (CheckpointIntegrityError, UnsafeBlobError) as exc:
                log.warning("not chaining onto a damaged checkpoint: %s", exc)
                continue
            if isinstance(sha, str):
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
        if stage is None:
            latest = self._latest_or_refuse(session_id)
            if latest is None:
                raise CheckpointNotFoundError(
                    f"no checkpoint for session {session_id} in {self.location}"
                )
            stage = latest.stage
        name = f"{session_id}_{stage}.pkl"
        try:
            raw = self._read(name)
        except BlobNotFoundError:
            saved = [row["stage"] for row in reversed(self.list_checkpoints(session_id=session_id))]
            held = f"; session {session_id} has checkpoints of {', '.join(saved)}" if saved else ""
            raise CheckpointNotFoundError(
                f"no checkpoint {session_id}_{stage} in {self.location}{held}", saved
            ) from None
        # One read of each blob a load needs (itself, its parts, the previous checkpoint),
        # shared by the link check and the parts.
        blobs: dict[str, bytes] = {name: raw}

        def read(blob: str) -> bytes:
            if blob not in blobs:
                blobs[blob] = self._read(blob)
            return blobs[blob]

        metadata, header_doc, doc = self._verified(name, raw)
        self._check_link(metadata, self.store.describe(name), read)
        fields = self._resolve(metadata, doc, self.store.describe(name), read)
        self._check_sidecar(metadata, header_doc)
        fields["metadata"] = metadata
        return _rebuilt(WorkflowCheckpoint, set(fields), fields)

    def _read(self, name: str) -> bytes:
        """A checkpoint's bytes; anything that is not a plausible one is refused."""
        try:
            return self.store.get(name).data
        except UnsafeBlobError as exc:
            raise CheckpointIntegrityError(self.store.describe(name), str(exc)) from None

    def _read_header(self, name: str) -> dict[str, Any]:
        """A checkpoint's header (current format), checked as far as it goes without the
        body: for chaining and listing, never for loading."""
        raw = self._read(name)
        header, _ = fmt.read_header(raw, self.store.describe(name))
        return fmt.migrate_header(header)

    def _verified(
        self, name: str, raw: bytes
    ) -> tuple[CheckpointMetadata, dict[str, Any], dict[str, Any]]:
        """Every check of one blob, then its body parsed as plain JSON: (metadata, header
        as written, body)."""
        where = self.store.describe(name)
        sealed = fmt.unseal(raw, where, self._key)
        version = sealed.header["format_version"]
        header = fmt.migrate_header(sealed.header)
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
        decoded = fmt.decompress(sealed.body, metadata.compression, where)
        try:
            # pydantic's parser, not orjson's: it keeps an integer beyond 64 bits (which
            # stage_metrics may hold) an int, where orjson makes it a float.
            doc = pydantic_core.from_json(decoded, allow_inf_nan=False)
        except ValueError as exc:
            raise CheckpointIntegrityError(where, f"unreadable payload: {exc}") from None
        if not isinstance(doc, dict):
            raise CheckpointIntegrityError(where, "the payload is not an object")
        doc = fmt.migrate_body(version, doc)
        if (doc.get("checkpoint_id"), doc.get("previous_hash")) != (
            metadata.checkpoint_id,
            metadata.previous_hash,
        ):
            raise CheckpointIntegrityError(
                where, f"the payload belongs to checkpoint {doc.get('checkpoint_id')!r}"
            )
        if not isinstance(doc.get("fields"), dict):
            raise CheckpointIntegrityError(where, "the payload holds no state fields")
        unknown = sorted(set(doc) - _BODY_KEYS)
        if unknown:
            raise CheckpointIntegrityError(
                where, f"the payload is not a Prowzi workflow state: unknown keys {unknown}"
            )
        if metadata.fields is not None and set(metadata.fields) != set(doc["fields"]):
            raise CheckpointIntegrityError(where, "the payload's fields differ from its header's")
        return metadata, sealed.header, doc

    def _resolve(
        self,
        metadata: CheckpointMetadata,
        doc: dict[str, Any],
        where: str,
        read: Callable[[str], bytes],
    ) -> dict[str, Any]:
        """The state's fields: the body's own, and each referenced field from the checkpoint
        that holds it (verified whole, and holding that very value), validated into models."""
        values: dict[str, Any] = dict(doc["fields"])
        parts: dict[str, tuple[CheckpointMetadata, dict[str, Any]]] = {}
        for name, ref in metadata.refs.items():
            held = _session_of(f"{ref.checkpoint}.pkl")
            if name in values or held is None or held[0] != metadata.session_id:
                raise CheckpointIntegrityError(
                    where, f"field {name!r} refers to {ref.checkpoint!r}: not of this session"
                )
            if ref.checkpoint not in parts:
                blob = f"{ref.checkpoint}.pkl"
                try:
                    part, _, part_doc = self._verified(blob, read(blob))
                except BlobNotFoundError:
                    raise CheckpointIntegrityError(
                        where, f"its part {ref.checkpoint} is missing (field {name!r})"
                    ) from None
                parts[ref.checkpoint] = (part, part_doc)
            part, part_doc = parts[ref.checkpoint]
            if part.fields is None or part.fields.get(name) != ref.sha256:
                raise CheckpointIntegrityError(
                    where,
                    f"its part {ref.checkpoint} no longer holds field {name!r} as saved: "
                    "superseded by a re-run of that stage, or altered",
                )
            values[name] = part_doc["fields"][name]
        try:
            body = _Body.model_validate(
                {
                    "checkpoint_id": metadata.checkpoint_id,
                    "previous_hash": metadata.previous_hash,
                    "state": values,
                }
            )
        except ValidationError as exc:
            raise CheckpointIntegrityError(
                where, f"the payload is not a Prowzi workflow state: {_first_error(exc)}"
            ) from None
        return body.state_fields(where)

    def _check_link(
        self, metadata: CheckpointMetadata, where: str, read: Callable[[str], bytes]
    ) -> None:
        """The previous checkpoint must be present, unless this is the oldest one left.

        It is looked for first where a save puts it, the checkpoints of the earlier completed
        stages (the session's, then the parent's): that is usually one blob, and a part the
        load reads anyway. Only when it is not there is every header of the sessions read."""
        previous = metadata.previous_hash
        if previous is None:
            return
        sessions = [metadata.session_id]
        if metadata.parent_session_id is not None:
            sessions.append(metadata.parent_session_id)
        for session in sessions:
            for prior in _earlier(metadata.completed_stages, metadata.stage):
                blob = f"{session}_{prior}.pkl"
                try:
                    validate_stage_name(prior)  # the header is not trusted to name blobs
                    header, _ = fmt.read_header(read(blob), self.store.describe(blob))
                except (InvalidInputError, BlobNotFoundError, CheckpointIntegrityError):
                    continue
                if header.get("payload_sha256") == previous:
                    return
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
        """The headers of the session's blobs, read from the blobs (not the catalog)."""
        headers = []
        for blob in self.store.list(f"{session_id}_"):
            parsed = _session_of(blob.name)
            if parsed is None or parsed[0] != session_id:
                continue
            try:
                headers.append(self._read_header(blob.name))
            except (BlobNotFoundError, UnsafeBlobError, CheckpointIntegrityError):
                continue
        return headers

    def _check_sidecar(self, metadata: CheckpointMetadata, header_doc: dict[str, Any]) -> None:
        """Rewrite a missing or stale ``.json``; refuse one edited to point elsewhere."""
        name = f"{metadata.checkpoint_id}.json"
        try:
            doc = orjson.loads(self.store.get(name).data)
        except (BlobNotFoundError, orjson.JSONDecodeError):
            doc = None
        except UnsafeBlobError as exc:
            raise CheckpointIntegrityError(
                self.store.describe(name),
                f"{exc}; the metadata file is derived from {metadata.checkpoint_id}.pkl: "
                "delete it and it is regenerated",
            ) from None
        if doc == header_doc:
            return
        if isinstance(doc, dict):
            foreign = sorted(set(doc) - set(CheckpointMetadata.model_fields))
            moved = [k for k in _IDENTITY_KEYS if k in doc and doc[k] != header_doc.get(k)]
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

    def _rows(self) -> dict[str, dict[str, Any] | None]:
        """Every checkpoint blob's listing row (None when unreadable), through the catalog.

        The catalog is a file anyone who can write there can edit: a row that is not what
        :meth:`_index` makes of that very blob (another checkpoint's identity, a bad time,
        missing or foreign keys) means it was not of Prowzi's making, and the catalog is
        rebuilt. A blob the catalog calls unreadable is read again, so a catalog cannot hide
        a checkpoint (nor make a load of the session fall back to an older one)."""
        return self._listed_rows("")

    def _listed_rows(self, prefix: str) -> dict[str, dict[str, Any] | None]:
        """:meth:`_rows` of the blobs whose names start with ``prefix`` (a session's:
        ``"<session>_"``). Rows this manager has checked before, of blobs unchanged since
        (same etag), are not looked at again; a session's few blobs skip the catalog."""
        listing = [b for b in self.store.list(prefix) if _session_of(b.name) is not None]
        memo = self._memo
        known = list(zip((memo.get(b.name) for b in listing), listing, strict=True))
        if all(m is not None and m[0] == b.etag and m[1] for m, b in known):
            return {b.name: m[1] for m, b in known if m is not None}
        if prefix:
            rows = {
                b.name: m[1] if m is not None and m[0] == b.etag and m[1] else self._index(b)
                for m, b in known
            }
        else:
            rows = self.catalog.rows(listing, self._index)
            if any(row is not None and not _plausible(row, n) for n, row in rows.items()):
                log.warning(
                    "the checkpoint catalog %s was altered: rebuilding it", self.catalog.path
                )
                self._drop_catalog()
                rows = self.catalog.rows(listing, self._index)
            for blob in listing:
                row = rows.get(blob.name)
                if row is None or not _plausible(row, blob.name):
                    rows[blob.name] = self._index(blob)
            memo.clear()
        memo.update((b.name, (b.etag, rows[b.name])) for b in listing)
        return rows

    def _drop_catalog(self) -> None:
        """Forget the catalog's file: the next listing builds it again from the blobs."""
        path = self.catalog.path
        self.catalog.close()
        if path is not None:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    Path(f"{path}{suffix}").unlink()

    def _index(self, blob: BlobInfo) -> dict[str, Any] | None:
        """A checkpoint's header as a catalog row; None (and a warning) when unreadable."""
        where = self.store.describe(blob.name)
        try:
            metadata = CheckpointMetadata.model_validate(self._read_header(blob.name))
            row = metadata.model_dump(mode="json")
            row["modified"] = blob.modified
            if not _plausible(row, blob.name):
                raise CheckpointIntegrityError(where, f"it holds {metadata.checkpoint_id!r}")
        except BlobNotFoundError:
            return None
        except (CheckpointIntegrityError, ValidationError, UnsafeBlobError) as exc:
            log.warning("skipping unreadable checkpoint %s: %s", where, exc)
            return None
        return row

    def list_checkpoints(
        self,
        session_id: str | None = None,
        stage: str | None = None,
        since: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Checkpoints, newest first, as dicts of their metadata (``created_at`` a datetime).

        Rows come from the catalog, which reads a blob only when it has not seen that version
        of it; an unreadable blob is skipped and logged. Listing is a catalogue, not a
        verification: loading verifies, and says why a blob is refused."""
        if session_id is not None:
            validate_session_id(session_id)
        if stage is not None:
            validate_stage_name(stage)
        if since is not None:
            since = since.astimezone(UTC)  # a naive datetime is local time, as in timestamp()
        out = []
        rows = self._listed_rows(f"{session_id}_" if session_id is not None else "")
        for row in rows.values():
            if row is None:
                continue
            if session_id is not None and row["session_id"] != session_id:
                continue
            listed = {k: v for k, v in row.items() if k != "modified"}
            listed["created_at"] = datetime.fromisoformat(row["created_at"])
            if stage is not None and listed["stage"] != stage:
                continue
            if since is not None and listed["created_at"] < since:
                continue
            out.append(listed)
        out.sort(key=lambda r: r["created_at"], reverse=True)
        return out

    def has_session(self, session_id: str, stages: Iterable[str]) -> bool:
        """Whether ``session_id`` has a checkpoint blob for any of ``stages`` (one ``head``
        per stage, no listing: cheap in a store of thousands of sessions)."""
        validate_session_id(session_id)
        for stage in stages:
            try:
                if self.store.head(f"{session_id}_{validate_stage_name(stage)}.pkl") is not None:
                    return True
            except UnsafeBlobError:
                return True
        return False

    def latest(self, session_id: str) -> CheckpointMetadata | None:
        """The session's most recent readable checkpoint, or None."""
        validate_session_id(session_id)
        rows = self.list_checkpoints(session_id=session_id)
        return CheckpointMetadata.model_validate(rows[0]) if rows else None

    def _latest_or_refuse(self, session_id: str) -> CheckpointMetadata | None:
        """The latest checkpoint, but never silently past a newer one that is unreadable
        (resuming must not fall back over damage): that one's precise refusal is raised."""
        latest = self.latest(session_id)
        for name, row in self._listed_rows(f"{session_id}_").items():
            parsed = _session_of(name)
            if row is not None or parsed is None or parsed[0] != session_id:
                continue
            info = self.store.head(name)
            if info is None or (latest and info.modified < latest.created_at.timestamp()):
                continue
            self._verified(name, self._read(name))  # raises the precise reason
        return latest

    def verify_chain(self, session_id: str) -> None:
        """Verify every checkpoint of the session, and the chain from its latest back: each
        checkpoint on the chain loads whole (its parts included). Checkpoints off that chain
        (left behind when a stage was re-run after time travel) are verified as containers
        only: the parts they referred to may have been superseded by the re-run, which is
        what a load of one of them then says. A chain may start late when older ones were
        pruned."""
        validate_session_id(session_id)
        verified: list[CheckpointMetadata] = []
        for blob in self.store.list(f"{session_id}_"):
            parsed = _session_of(blob.name)
            if parsed is None or parsed[0] != session_id:
                continue
            try:
                raw = self._read(blob.name)
            except BlobNotFoundError:
                continue
            verified.append(self._verified(blob.name, raw)[0])
        if not verified:
            raise CheckpointNotFoundError(
                f"no checkpoint for session {session_id} in {self.location}"
            )
        by_hash = {m.payload_sha256: m for m in verified}
        current = max(verified, key=lambda m: m.created_at)
        seen: set[str] = set()
        while True:
            where = self.store.describe(f"{current.checkpoint_id}.pkl")
            self.load_checkpoint(current.checkpoint_id)  # its parts, too
            if current.previous_hash is None:
                break
            seen.add(current.payload_sha256)
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

    # --- leases and cleanup -------------------------------------------------------------

    def session_lock(self, session_id: str, timeout: float = 0) -> AbstractContextManager[None]:
        """Hold the session's lease (renewed in the background) for the ``with`` block;
        :class:`SessionLockedError` names the holder. Saves of the session made through this
        manager meanwhile carry its fencing token."""
        validate_session_id(session_id)
        return self._holding(session_id, timeout)

    @contextlib.contextmanager
    def _holding(self, session_id: str, timeout: float) -> Iterator[None]:
        if session_id in self._held:
            raise SessionLockedError(
                f"session {session_id} is locked: it is being written by "
                f"{self._held[session_id].lease.owner} (this process)"
            )
        held = self.leases.hold(session_id, timeout=timeout)
        self._held[session_id] = held
        try:
            yield
        finally:
            del self._held[session_id]
            self._heads.pop(session_id, None)  # the next writer starts with a full snapshot
            held.release()

    def is_locked(self, session_id: str) -> bool:
        return self.lock_holder(session_id) is not None

    def lock_holder(self, session_id: str) -> str | None:
        """Who holds the session's lease (a running run or resume), or None."""
        return self.leases.holder(validate_session_id(session_id))

    def cleanup(
        self,
        *,
        older_than: timedelta,
        keep_last: int = 0,
        dry_run: bool = False,
        on_running: Callable[[str], None] | None = None,
        on_error: Callable[[str, OSError], None] | None = None,
    ) -> list[str]:
        """Delete sessions whose newest checkpoint is older than ``older_than``.

        The ``keep_last`` most recent sessions are kept whatever their age, and a session
        whose lease is held (a running workflow) is never touched: ``on_running`` hears of
        each such session that was old enough to go. A session is deleted whole (its
        checkpoints never refer outside it). An entry that cannot be deleted is reported to
        ``on_error`` and the rest goes on. Orphaned ``.json`` files and temporaries left by
        interrupted writes are removed too. Returns the deleted (or, with ``dry_run``, the
        deletable) checkpoint ids.
        """
        from prowzi.workflows import retention

        cutoff = retention.cutoff(older_than, keep_last)
        # When a checkpoint was written is its blob's modification time: the listing has it,
        # so no checkpoint is read (a sweep over a large store stays cheap).
        newest: dict[str, float] = {}
        names: dict[str, list[str]] = {}
        blobs = self.store.list()
        for blob in blobs:
            parsed = _session_of(blob.name)
            if parsed is None:
                continue
            session = parsed[0]
            newest[session] = max(newest.get(session, blob.modified), blob.modified)
            names.setdefault(session, []).append(blob.name)
        kept = set(sorted(newest, key=lambda s: newest[s], reverse=True)[:keep_last])
        deleted: list[str] = []
        for session, stamp in newest.items():
            if session in kept or stamp >= cutoff:
                continue
            ids = [name[:-4] for name in names[session]]
            if dry_run:
                if not self.is_locked(session):
                    deleted.extend(ids)
                elif on_running is not None:
                    on_running(session)
                continue
            try:
                lease = self.leases.acquire(session)
            except SessionLockedError:
                log.info("not cleaning up session %s: it is running", session)
                if on_running is not None:
                    on_running(session)
                continue
            for checkpoint_id in ids:
                gone = self._delete(f"{checkpoint_id}.pkl", on_error)
                self._delete(f"{checkpoint_id}.json", on_error)
                if gone:
                    deleted.append(checkpoint_id)
            self.leases.release(lease)
            self._delete(SessionLeases.blob_name(session), on_error)
        if not dry_run:
            present = {b.name for b in blobs}
            for blob in blobs:
                orphan = blob.name.endswith(".json") and "/" not in blob.name
                old = blob.modified < cutoff
                if orphan and old and f"{blob.name[:-5]}.pkl" not in present:
                    self._delete(blob.name, on_error)
            if isinstance(self.store, LocalBlobStore):
                self.store.sweep_temporaries()
        return sorted(deleted)

    def _delete(self, name: str, on_error: Callable[[str, OSError], None] | None) -> bool:
        try:
            return self.store.delete(name)
        except OSError as exc:
            log.warning("could not delete %s: %s", self.store.describe(name), exc)
            if on_error is not None:
                on_error(self.store.describe(name), exc)
            return False

    def close(self) -> None:
        """Release what the manager holds open (its catalog). It stays usable."""
        self.catalog.close()


# --- the state codec ------------------------------------------------------------------


def _is_sha256(value: str) -> bool:
    return len(value) == _SHA256_RE_LEN and all(c in "0123456789abcdef" for c in value)


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


_STATE_FIELDS = tuple(WorkflowState.model_fields)


def _encode_fields(state: WorkflowState) -> dict[str, bytes]:
    """Each state field as JSON: ``model_dump``'s, but with the sources the state's own
    verification result shares with the search written once (as indices). A state the fast
    encoding does not know is written in full, without sharing."""
    values = state.__dict__
    top = {name: values[name] for name in _STATE_FIELDS}
    search, verification = top["search"], top["verification"]
    if type(search) is SearchAgentResult and type(verification) is VerificationAgentResult:
        index = {id(s): j for j, s in enumerate(search.sources)}
        top["verification"] = _shared_fields(verification, index)
    with contextlib.suppress(TypeError):
        return {name: orjson.dumps(value, default=_fields_of) for name, value in top.items()}
    # WorkflowState's serializer (not the state's: a subclass may carry more fields).
    plain = WorkflowState.__pydantic_serializer__.to_python(state, mode="json")
    encoded = {}
    for name in _STATE_FIELDS:
        try:
            encoded[name] = orjson.dumps(plain[name])
        except TypeError:  # stage_metrics may hold an integer beyond 64 bits
            encoded[name] = pydantic_core.to_json(plain[name])
    return encoded


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "payload"
    return f"{loc}: {err['msg']} ({exc.error_count()} error(s))"

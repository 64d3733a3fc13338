"""Retention: what finished sessions leave behind, deleted once it is old.

A session leaves checkpoints (the checkpoint store), telemetry (its session file, event log and
store copy), its webhook delivery log and, when the service ran it, a document in the service's
state directory. One function deletes them all for ``prowzi cleanup --older-than`` and for
``prowzi serve`` with ``PROWZI_RETENTION`` set, so the two never disagree on what "old" means:

- checkpoints go a session at a time, by their newest checkpoint
  (:meth:`CheckpointManager.cleanup`);
- telemetry goes by when it was last written (:meth:`TelemetryCollector.cleanup`);
- a document goes by its modification time (it is written once, when its run ends);
- the webhook delivery log goes a session at a time, by its newest record
  (:meth:`~prowzi.webhooks.outbox.Outbox.cleanup`); pending deliveries are work, never swept.

A running session (one whose lease is held) keeps everything. ``keep_last`` keeps the newest N
sessions of each kind whatever their age.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from prowzi.config import ProwziConfig
from prowzi.errors import InvalidIdentifierError, InvalidInputError
from prowzi.ids import validate_session_id

if TYPE_CHECKING:
    from prowzi.workflows.checkpoint import CheckpointManager
    from prowzi.workflows.telemetry import TelemetryCollector


def cutoff(older_than: timedelta, keep_last: int = 0) -> float:
    """When "older than ``older_than``" begins, in seconds since the epoch: what every sweep
    deletes was last written before it. ``InvalidInputError`` for a negative age or count."""
    if older_than < timedelta(0):
        raise InvalidInputError("older_than must not be negative")
    if keep_last < 0:
        raise InvalidInputError("keep_last must not be negative")
    return time.time() - older_than.total_seconds()


@dataclass(frozen=True)
class Policy:
    """What one sweep deletes: what was last written before ``cutoff`` (seconds since the
    epoch), but for the ``keep_last`` newest sessions of each kind and the ``running`` ones.
    ``failed(where, error)`` hears of each entry that could not be deleted."""

    cutoff: float
    keep_last: int
    dry_run: bool
    running: Callable[[str], bool]
    failed: Callable[[str, OSError], None]

    def old(self, written: Mapping[str, float], keep: Container[str] = ()) -> list[str]:
        """The sessions that go, newest first, of those last written at ``written[session]``
        (seconds since the epoch): written before the cutoff, not among the ``keep_last``
        newest, not in ``keep``, not running."""
        newest_first = sorted(written, key=written.__getitem__, reverse=True)
        return [
            session
            for session in newest_first[self.keep_last :]
            if written[session] < self.cutoff and session not in keep and not self.running(session)
        ]


@dataclass
class Swept:
    """What one sweep deleted (or, for a dry run, would delete), and what it could not."""

    checkpoints: list[str] = field(default_factory=list)
    """Checkpoint ids."""
    telemetry: list[str] = field(default_factory=list)
    """Session ids whose telemetry went."""
    documents: list[str] = field(default_factory=list)
    """Session ids whose service document went."""
    webhook_logs: list[str] = field(default_factory=list)
    """Session ids whose webhook delivery log went."""
    running: set[str] = field(default_factory=set)
    """Old enough to go, but running: kept."""
    errors: list[str] = field(default_factory=list)
    """``where: why`` of each entry that could not be deleted."""


def sweep(
    config: ProwziConfig,
    *,
    older_than: timedelta,
    keep_last: int = 0,
    dry_run: bool = False,
    documents_dir: Path | None = None,
    is_running: Callable[[str], bool] | None = None,
    manager: CheckpointManager | None = None,
    reader: TelemetryCollector | None = None,
) -> Swept:
    """Delete checkpoints, telemetry and (with ``documents_dir``) service documents of
    sessions older than ``older_than``, never a running session's. ``is_running`` adds what
    the caller knows to the leases (the service's own runs). A caller that sweeps again and
    again (the service) passes its ``manager`` and ``reader``, whose catalogs stay warm; else
    they are made from ``config``."""
    from prowzi.workflows.checkpoint import CheckpointManager
    from prowzi.workflows.telemetry import TelemetryCollector

    swept = Swept()

    def failed(where: str, exc: OSError) -> None:
        swept.errors.append(f"{where}: {exc.strerror or exc}")

    manager = manager or CheckpointManager.from_config(config)
    swept.checkpoints = manager.cleanup(
        older_than=older_than,
        keep_last=keep_last,
        dry_run=dry_run,
        on_running=swept.running.add,
        on_error=failed,
    )
    reader = reader or TelemetryCollector.reader(
        config.telemetry_dir, store=config.telemetry_url, checkpoints=config.checkpoint_location
    )
    swept.telemetry = reader.cleanup(
        older_than=older_than,
        keep_last=keep_last,
        dry_run=dry_run,
        is_running=is_running,
        on_running=swept.running.add,
        on_error=failed,
    )

    def running(session_id: str) -> bool:
        """Whether the session runs (kept, and reported as kept)."""
        if manager.is_locked(session_id) or (is_running is not None and is_running(session_id)):
            swept.running.add(session_id)
            return True
        return False

    policy = Policy(
        cutoff=cutoff(older_than, keep_last),
        keep_last=keep_last,
        dry_run=dry_run,
        running=running,
        failed=failed,
    )
    swept.webhook_logs = _sweep_webhook_log(config, policy)
    if documents_dir is not None:
        swept.documents = _sweep_documents(documents_dir, policy)
    return swept


def _sweep_webhook_log(config: ProwziConfig, policy: Policy) -> list[str]:
    """The webhook delivery log's part of a sweep (nothing when there is no outbox)."""
    from prowzi.storage.remote import open_store
    from prowzi.webhooks.outbox import Outbox

    outbox = Outbox(open_store(config.webhook_outbox_location))
    try:
        return outbox.cleanup(policy)
    except OSError as exc:  # the store cannot be listed: the rest of the sweep stands
        policy.failed(outbox.store.url, exc)
        return []


def _sweep_documents(directory: Path, policy: Policy) -> list[str]:
    """Delete ``<session>.md`` files in ``directory`` last written before the cutoff."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    except OSError as exc:
        policy.failed(str(directory), exc)
        return []
    documents: dict[str, Path] = {}
    written: dict[str, float] = {}
    for entry in entries:
        if not entry.name.endswith(".md"):
            continue
        try:
            session_id = validate_session_id(entry.name[:-3])
            written[session_id] = entry.stat(follow_symlinks=False).st_mtime
            documents[session_id] = Path(entry)
        except (InvalidIdentifierError, OSError):
            continue  # not one of ours, or gone since the listing
    deleted = policy.old(written)
    if not policy.dry_run:
        for session_id in deleted:
            try:
                documents[session_id].unlink(missing_ok=True)
            except OSError as exc:
                policy.failed(str(documents[session_id]), exc)
    return deleted

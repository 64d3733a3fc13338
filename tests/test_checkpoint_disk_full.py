"""Disk full: a save that cannot be written fails clearly and leaves the previous checkpoint
intact and resumable. The directory is a real, small tmpfs (mounting one needs root)."""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from shared import lease_held_by_a_child
from test_checkpoint_support import (
    STAGES,
    full_state,
    in_flight_writes,
    save_run,
    save_stage,
    state_after,
)

from prowzi.agents import models as m
from prowzi.errors import CheckpointError
from prowzi.workflows.checkpoint import CheckpointManager

SESSION = "disk-full-session"


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mountpoint)],
        check=True,
        capture_output=True,
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", "512k") as mountpoint:
        yield mountpoint


def big_state(kib: int) -> m.WorkflowState:
    """A state with a draft of about ``kib`` KiB that compression cannot shrink much."""
    state = full_state()
    assert state.draft is not None
    text = base64.b64encode(random.Random(kib).randbytes(kib * 1024)).decode()
    draft = state.draft.model_copy(update={"markdown": text})
    return state.model_copy(update={"draft": draft})


def fill(disk: Path, leave: int) -> Path:
    """Occupy all but at most ``leave`` bytes of the filesystem."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    filler = disk / "filler.bin"
    with filler.open("wb") as fh:
        try:
            fh.write(b"\0" * max(free - leave, 0))
            fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def temporaries(directory: Path) -> list[str]:
    """Leftovers of the failed write: temporaries, or spares holding part of it."""
    return [p.name for p in in_flight_writes(directory)]


def test_a_save_on_a_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(
    small_disk: Path,
) -> None:
    directory = small_disk / "checkpoints"
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:2])
    filler = fill(small_disk, 16 * 1024)

    with pytest.raises(CheckpointError, match=r"No space left on device.*previous checkpoint"):
        save_stage(manager, SESSION, "search", state=big_state(kib=64))

    assert temporaries(directory) == []
    assert not (directory / f"{SESSION}_search.pkl").exists()
    fresh = CheckpointManager(directory)
    assert fresh.load_checkpoint(SESSION).metadata.stage == "planning"
    fresh.verify_chain(SESSION)
    assert [r["stage"] for r in fresh.list_checkpoints()] == ["planning", "intent"]

    # once space is freed the run resumes and the chain continues unbroken
    filler.unlink()
    saved = save_stage(manager, SESSION, "search", state=big_state(kib=64))
    assert saved.payload_size > 32 * 1024  # more than the room the full disk had
    reader = CheckpointManager(directory)
    reader.verify_chain(SESSION)
    assert reader.load_checkpoint(SESSION).to_state() == big_state(kib=64)


def test_overwriting_a_checkpoint_on_a_full_disk_keeps_the_old_version(small_disk: Path) -> None:
    directory = small_disk / "checkpoints"
    manager = CheckpointManager(directory)
    (before,) = save_run(manager, SESSION, ("intent",))
    fill(small_disk, 8 * 1024)

    with pytest.raises(CheckpointError, match="No space left on device"):
        save_stage(manager, SESSION, "intent", state=big_state(kib=64))

    assert temporaries(directory) == []
    loaded = CheckpointManager(directory).load_checkpoint(f"{SESSION}_intent")
    assert loaded.metadata == before


def test_a_sidecar_the_full_disk_has_no_room_for_does_not_fail_the_save(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ``.json`` is derived from the checkpoint: the save succeeds without it, and a
    load writes it once there is room again."""
    directory = small_disk / "checkpoints"
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, ("intent",))
    filler = fill(small_disk, os.statvfs(small_disk).f_frsize)  # one block: the .pkl's
    saved = save_stage(manager, SESSION, "planning")
    assert "could not write the metadata" in caplog.text
    assert not (directory / f"{SESSION}_planning.json").exists()
    assert temporaries(directory) == []
    filler.unlink()
    assert CheckpointManager(directory).load_checkpoint(SESSION).metadata == saved
    assert (directory / f"{SESSION}_planning.json").is_file()


def kill_a_holder(directory: Path, session: str) -> None:
    """Take the session's lease in a child process, then kill it outright (SIGKILL): its
    lease record stays behind, naming a process that is gone."""
    with lease_held_by_a_child(directory, session):
        pass


def test_a_read_only_checkpoint_dir_can_still_be_listed_and_loaded(small_disk: Path) -> None:
    directory = small_disk / "checkpoints"
    writer = CheckpointManager(directory)
    save_run(writer, SESSION, STAGES[:2])
    writer.list_checkpoints()  # the writer's catalog knows them (a cache outside the store)
    writer.close()
    (directory / f"{SESSION}_intent.json").unlink()  # its regeneration will not be possible
    kill_a_holder(directory, SESSION)  # its lease record is left behind
    assert (directory / "leases" / f"{SESSION}.json").is_file()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        reader = CheckpointManager(directory)
        assert not reader.is_locked(SESSION) and reader.lock_holder(SESSION) is None
        assert [r["stage"] for r in reader.list_checkpoints()] == ["planning", "intent"]
        assert reader.load_checkpoint(f"{SESSION}_intent").intent is not None
        assert reader.load_checkpoint(SESSION).to_state() == state_after("planning")
        reader.verify_chain(SESSION)
        # with no catalog this machine could write either, it is kept in memory
        fresh_cache = CheckpointManager(directory, catalog=small_disk / "no-such-dir" / "c.db")
        assert [r["stage"] for r in fresh_cache.list_checkpoints()] == ["planning", "intent"]
        assert not (directory / f"{SESSION}_intent.json").exists()
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)

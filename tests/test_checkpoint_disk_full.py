"""Disk full: a save that cannot be written fails clearly and leaves the previous checkpoint
intact and resumable. The directory is a real, small tmpfs (mounting one needs root)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_checkpoint_support import STAGES, full_state, in_flight_writes, params, save_run

from prowzi.agents import models as m
from prowzi.errors import CheckpointError
from prowzi.workflows.checkpoint import CheckpointManager
from prowzi.workflows.storage import LocalDirectoryStore

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
    state = full_state()
    assert state.draft is not None
    draft = state.draft.model_copy(update={"markdown": "All work and no play. " * (kib * 47)})
    return state.model_copy(update={"draft": draft})


def fill(disk: Path, leave: int, *managers: CheckpointManager, keep_spares: bool = False) -> Path:
    """Occupy all but at most ``leave`` bytes of the filesystem, once the ``managers``' stores
    have prepared their spare files, whose zeros keep room for saves to come; unless
    ``keep_spares``, the stores are closed first (which removes them): no room is left."""
    for manager in managers:
        assert isinstance(manager.store, LocalDirectoryStore)
        manager.store.spares_ready()
        if not keep_spares:
            manager.store.close()
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
    filler = fill(small_disk, 16 * 1024, manager)

    with pytest.raises(CheckpointError, match=r"No space left on device.*previous checkpoint"):
        manager.save(
            session_id=SESSION,
            stage="search",
            state=big_state(kib=64),
            completed_stages=list(STAGES[:3]),
            parameters=params(),
        )

    assert temporaries(directory) == []
    assert not (directory / f"{SESSION}_search.pkl").exists()
    fresh = CheckpointManager(directory)
    assert fresh.load_checkpoint(SESSION).metadata.stage == "planning"
    fresh.verify_chain(SESSION)
    assert [r["stage"] for r in fresh.list_checkpoints()] == ["planning", "intent"]

    # once space is freed the run resumes and the chain continues unbroken
    filler.unlink()
    manager.save(
        session_id=SESSION,
        stage="search",
        state=big_state(kib=64),
        completed_stages=list(STAGES[:3]),
        parameters=params(),
    )
    CheckpointManager(directory).verify_chain(SESSION)


def test_overwriting_a_checkpoint_on_a_full_disk_keeps_the_old_version(small_disk: Path) -> None:
    directory = small_disk / "checkpoints"
    manager = CheckpointManager(directory)
    (before,) = save_run(manager, SESSION, ("intent",))
    fill(small_disk, 8 * 1024, manager)

    with pytest.raises(CheckpointError, match="No space left on device"):
        manager.save(
            session_id=SESSION,
            stage="intent",
            state=big_state(kib=64),
            completed_stages=["intent"],
            parameters=params(),
        )

    assert temporaries(directory) == []
    loaded = CheckpointManager(directory).load_checkpoint(f"{SESSION}_intent")
    assert loaded.metadata == before


def test_a_read_only_checkpoint_dir_can_still_be_listed_and_loaded(small_disk: Path) -> None:
    directory = small_disk / "checkpoints"
    writer = CheckpointManager(directory)
    save_run(writer, SESSION, STAGES[:2])
    writer.close()  # the spare files it holds open for writing would keep the mount busy
    (directory / f"{SESSION}_intent.json").unlink()  # its regeneration will not be possible
    # a holder killed outright leaves its owner file behind (its lock died with it)
    (directory / ".locks").mkdir(exist_ok=True)
    (directory / ".locks" / f"{SESSION}.lock").touch()
    (directory / ".locks" / f"{SESSION}.owner").write_text('{"pid": 1, "host": "h"}')
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        reader = CheckpointManager(directory)
        # probed through a read-only descriptor
        assert not reader.is_locked(SESSION) and reader.lock_holder(SESSION) is None
        assert [r["stage"] for r in reader.list_checkpoints()] == ["planning", "intent"]
        assert reader.load_checkpoint(f"{SESSION}_intent").intent is not None
        reader.verify_chain(SESSION)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)


def test_a_prepared_spare_keeps_room_for_a_save_when_the_disk_fills_up(small_disk: Path) -> None:
    """Spares are written full of zeros ahead of time (so a save allocates nothing): a save
    that fits in one still lands on a full disk, whole, and its padding is cut."""
    directory = small_disk / "checkpoints"
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:2])
    assert isinstance(manager.store, LocalDirectoryStore)
    assert manager.store.spares_ready() > 0
    fill(small_disk, 0, manager, keep_spares=True)

    saved = manager.save(
        session_id=SESSION,
        stage="search",
        state=full_state(),
        completed_stages=list(STAGES[:3]),
        parameters=params(),
    )
    manager.flush()
    pkl = directory / f"{SESSION}_search.pkl"
    fresh = CheckpointManager(directory)
    assert fresh.load_checkpoint(SESSION).metadata == saved
    fresh.verify_chain(SESSION)
    assert pkl.read_bytes().rstrip(b"\0") == pkl.read_bytes()  # the padding was cut


def test_the_room_spares_keep_is_given_up_for_a_save_larger_than_they_are(
    tmp_path: Path,
) -> None:
    """Spares only ever take an eighth of the free space, and a save that needs their room
    (it is larger than any of them, and the disk is full) gets it."""
    with tmpfs(tmp_path / "disk", "8m") as disk:
        store = LocalDirectoryStore(disk / "store")
        store.put("first.pkl", os.urandom(100_000), recoverable=True)
        ready = store.spares_ready()
        assert ready > 0
        sizes = [p.stat().st_size for p in (disk / "store" / ".spare").iterdir()]
        kept = sum(sizes)
        assert kept <= 8 * 1024 * 1024 // 8
        filler = disk / "filler.bin"
        with filler.open("wb") as fh, contextlib.suppress(OSError):
            fh.write(bytes(os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - 64 * 1024))
        with pytest.raises(OSError, match="No space left"):  # derived data: not for it
            store.put("first.json", bytes(200_000), durable=False)
        assert store.spares_ready() == ready
        large = os.urandom(kept // 2 + 100_000)  # fits only in the room the spares kept
        assert len(large) > max(sizes) and len(sizes) == ready >= 2
        token = store.put("large.pkl", large, recoverable=True)
        store.finish("large.pkl", token)
        assert store.get("large.pkl") == large
        store.close()

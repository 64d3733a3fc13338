"""The listing cache: a new manager (a new process) lists from it while the index is unchanged,
and never when a checkpoint was added, replaced or removed since."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from test_checkpoint_support import STAGES, save_run

from prowzi.workflows import checkpoint as cp
from prowzi.workflows.checkpoint import CheckpointManager
from prowzi.workflows.storage import LocalDirectoryStore

SESSION = "listing-session"


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    directory = tmp_path / "checkpoints"
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:3])
    save_run(manager, f"{SESSION}-2", STAGES[:2])
    return directory


def settled_listing(directory: Path) -> list[dict[str, object]]:
    """List once the directory's mtime is past the racy window (the cache is then written)."""
    time.sleep(0.06)
    rows = CheckpointManager(directory).list_checkpoints()
    assert CheckpointManager(directory).list_checkpoints() == rows
    return rows


def cache_of(directory: Path) -> Path:
    return directory / ".index" / cp._LISTING_CACHE


def no_index_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: LocalDirectoryStore, *, fresh: bool = True) -> int:
        raise AssertionError("the index was loaded")

    monkeypatch.setattr(LocalDirectoryStore, "generation", refuse)


def test_a_new_manager_lists_from_the_cache_without_loading_the_index(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = settled_listing(directory)
    assert cache_of(directory).exists()
    assert len(rows) == 5
    no_index_load(monkeypatch)
    fresh = CheckpointManager(directory)
    assert fresh.list_checkpoints() == rows
    assert fresh.list_checkpoints(session_id=SESSION, stage="planning") == [
        r for r in rows if r["session_id"] == SESSION and r["stage"] == "planning"
    ]
    since = rows[2]["created_at"]
    assert fresh.list_checkpoints(since=since) == rows[:3]  # type: ignore[arg-type]


def test_a_checkpoint_saved_since_is_listed(directory: Path) -> None:
    rows = settled_listing(directory)
    (meta,) = save_run(CheckpointManager(directory), "later", STAGES[:1])
    listed = CheckpointManager(directory).list_checkpoints()
    assert [r["checkpoint_id"] for r in listed] == [meta.checkpoint_id] + [
        r["checkpoint_id"] for r in rows
    ]


@pytest.mark.parametrize("change", ["removed", "added-by-hand", "replaced"])
def test_a_file_changed_by_hand_since_is_seen(directory: Path, change: str) -> None:
    rows = settled_listing(directory)
    victim = directory / f"{SESSION}_planning.pkl"
    if change == "removed":
        victim.unlink()
        expected = {r["checkpoint_id"] for r in rows} - {f"{SESSION}_planning"}
    elif change == "added-by-hand":
        (directory / "copy_intent.pkl").write_bytes(b"not a checkpoint")
        expected = {r["checkpoint_id"] for r in rows}
    else:
        other = directory / f"{SESSION}-2_planning.pkl"
        os.replace(other, directory / "moved.tmp")
        os.replace(directory / "moved.tmp", other)
        expected = {r["checkpoint_id"] for r in rows}
    listed = CheckpointManager(directory).list_checkpoints()
    assert {r["checkpoint_id"] for r in listed} == expected


@pytest.mark.parametrize(
    "content", [b"", b"{not json", b'{"format": 2}', b'{"format": 1, "identity": [1, 2]}']
)
def test_a_damaged_or_foreign_cache_is_ignored(directory: Path, content: bytes) -> None:
    rows = settled_listing(directory)
    cache_of(directory).write_bytes(content)
    assert CheckpointManager(directory).list_checkpoints() == rows


def test_a_cache_for_another_index_is_ignored(directory: Path) -> None:
    rows = settled_listing(directory)
    raw = cache_of(directory).read_bytes()
    save_run(CheckpointManager(directory), "later", STAGES[:1])
    settled_listing(directory)
    cache_of(directory).write_bytes(raw)  # the old rows, for the old index
    listed = CheckpointManager(directory).list_checkpoints()
    assert len(listed) == len(rows) + 1


def test_the_cache_round_trips_rows_exactly(directory: Path) -> None:
    rows = settled_listing(directory)
    identity = (1, 2, 3)
    assert cp._unpack_listing(cp._pack_listing(identity, rows), identity) == rows
    assert cp._unpack_listing(cp._pack_listing(identity, rows), (1, 2, 4)) is None


def test_a_file_rewritten_in_place_is_seen_once_its_session_is_read(directory: Path) -> None:
    settled_listing(directory)
    manager = CheckpointManager(directory)
    assert len(manager.list_checkpoints(session_id=SESSION)) == 3  # from the cache
    with (directory / f"{SESSION}_search.pkl").open("r+b") as fh:  # same inode, same directory
        fh.write(b"\x00" * 64)
    assert manager.latest(SESSION) is not None  # reading the session re-examines its files
    assert [r["stage"] for r in manager.list_checkpoints(session_id=SESSION)] == [
        "planning",
        "intent",
    ]

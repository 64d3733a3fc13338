"""Spare files: durable puts write into files prepared ahead of time, and a recovery finishes
the puts a power loss interrupted (and only those).

A power loss cannot be staged here, so the tests build what it leaves behind: a spare in
``.spare/`` holding a complete checkpoint whose rename never reached the disk, named with the
boot id of an earlier boot. A writer killed in *this* boot leaves the same file under the
current boot id; its page cache survived, so nothing it published was lost and its spare is
discarded, never published.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest
from test_checkpoint_support import STAGES, params, save_run, state_after

from prowzi.errors import CheckpointNotFoundError
from prowzi.workflows import storage
from prowzi.workflows.checkpoint import CheckpointManager
from prowzi.workflows.storage import LocalDirectoryStore

SESSION = "spare-session"
CURRENT_BOOT = storage._BOOT_ID or ""
EARLIER_BOOT = "0" * 16 if CURRENT_BOOT != "0" * 16 else "1" * 16

pytestmark = pytest.mark.skipif(not CURRENT_BOOT, reason="needs /proc's boot id (Linux)")


def spares(directory: Path) -> list[Path]:
    spare_dir = directory / ".spare"
    return sorted(spare_dir.iterdir()) if spare_dir.is_dir() else []


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def interrupted(directory: Path, stage: str, boot: str, *, pad: int = 4096) -> Path:
    """Turn the checkpoint of ``stage`` back into the spare it was before its rename,
    zero padding included, as a power loss after the put's fdatasync leaves it."""
    pkl = directory / f"{SESSION}_{stage}.pkl"
    spare = directory / ".spare" / f"{boot}-4242-0badcafe"
    spare.parent.mkdir(exist_ok=True, mode=0o700)
    spare.write_bytes(pkl.read_bytes() + bytes(pad))
    pkl.unlink()
    (directory / f"{SESSION}_{stage}.json").unlink()
    return spare


# --- the fast path --------------------------------------------------------------------


def test_a_durable_put_renames_a_prepared_spare_instead_of_creating_a_file(
    tmp_path: Path,
) -> None:
    store = LocalDirectoryStore(tmp_path / "store")
    with store.lock("writer"):
        wait_for(lambda: len(spares(tmp_path / "store")) >= 8)
        prepared = {p.stat().st_ino for p in spares(tmp_path / "store")}
        store.put("a_intent.pkl", b"checkpoint bytes", zero_padding_ok=True)
        store.put("a_intent.json", b"{}")
    blob = tmp_path / "store" / "a_intent.pkl"
    assert blob.stat().st_ino in prepared
    assert (tmp_path / "store" / "a_intent.json").stat().st_ino in prepared
    # the zeros the spare was prepared with are trimmed off in the background
    wait_for(lambda: blob.stat().st_size == len(b"checkpoint bytes"))
    assert store.get("a_intent.pkl") == b"checkpoint bytes"
    assert store.get("a_intent.json") == b"{}"
    # and the index follows the trimmed file, so a new process need not re-read it
    fresh = {b.name: b for b in LocalDirectoryStore(tmp_path / "store").list()}
    assert fresh["a_intent.pkl"].size == len(b"checkpoint bytes")


def test_without_zero_padding_ok_a_blob_never_shows_padding(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path / "store")
    with store.lock("writer"):
        wait_for(lambda: len(spares(tmp_path / "store")) >= 8)
        for i in range(20):
            store.put(f"b{i}.pkl", b"exact")
            assert store.get(f"b{i}.pkl") == b"exact"


def test_spares_are_removed_when_the_store_goes_away(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path / "store")
    with store.lock("writer"):
        wait_for(lambda: len(spares(tmp_path / "store")) >= 8)
    del store
    wait_for(lambda: not spares(tmp_path / "store"))


def test_a_forked_child_never_writes_into_its_parents_spares(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    store = LocalDirectoryStore(directory)
    with store.lock("writer"):
        wait_for(lambda: len(spares(directory)) >= 8)
        before = {p.name: p.stat().st_size for p in spares(directory)}
        pid = os.fork()
        if pid == 0:  # the child: its puts create their own files
            code = 1
            try:
                for i in range(30):
                    store.put(f"child{i}.pkl", b"from the child", zero_padding_ok=True)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        after = {p.name: p.stat().st_size for p in spares(directory)}
        assert after == before  # every spare still the parent's, untouched
        store.put("parent.pkl", b"from the parent", zero_padding_ok=True)
    assert store.get("child7.pkl") == b"from the child"


# --- recovery -------------------------------------------------------------------------


def test_a_save_cut_short_by_a_power_loss_is_published_on_the_next_use(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "checkpoints"
    save_run(CheckpointManager(directory), SESSION, STAGES[:3])
    expected = (directory / f"{SESSION}_search.pkl").read_bytes()
    spare = interrupted(directory, "search", EARLIER_BOOT)

    manager = CheckpointManager(directory)
    assert [r["stage"] for r in manager.list_checkpoints()] == ["search", "planning", "intent"]
    assert (directory / f"{SESSION}_search.pkl").read_bytes() == expected  # padding trimmed
    assert (directory / f"{SESSION}_search.json").exists()
    assert not spare.exists()
    assert manager.load_checkpoint(SESSION).search == state_after("search").search
    manager.verify_chain(SESSION)


def test_an_interrupted_save_older_than_the_file_in_place_is_discarded(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "checkpoints"
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:2])
    spare = interrupted(directory, "planning", EARLIER_BOOT)
    # the stage was saved again afterwards (a re-run): that newer file must win
    time.sleep(0.01)
    newer = manager.save(
        session_id=SESSION,
        stage="planning",
        state=state_after("planning"),
        completed_stages=list(STAGES[:2]),
        parameters=params(),
    )
    fresh = CheckpointManager(directory)
    assert fresh.load_checkpoint(f"{SESSION}_planning").metadata == newer
    assert not spare.exists()


def test_a_writer_killed_in_this_boot_leaves_nothing_to_publish(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    save_run(CheckpointManager(directory), SESSION, STAGES[:3])
    spare = interrupted(directory, "search", CURRENT_BOOT)
    manager = CheckpointManager(directory)
    assert [r["stage"] for r in manager.list_checkpoints()] == ["planning", "intent"]
    assert not spare.exists()


def test_a_spare_whose_owner_is_alive_is_left_alone(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    save_run(CheckpointManager(directory), SESSION, STAGES[:3])
    spare = interrupted(directory, "search", EARLIER_BOOT)
    fd = os.open(spare, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as its writer holds it
        CheckpointManager(directory).list_checkpoints()
        assert spare.exists()
        assert not (directory / f"{SESSION}_search.pkl").exists()
    finally:
        os.close(fd)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "zeros", "pickle"])
def test_a_damaged_interrupted_save_is_discarded_not_published(tmp_path: Path, damage: str) -> None:
    directory = tmp_path / "checkpoints"
    save_run(CheckpointManager(directory), SESSION, STAGES[:3])
    spare = interrupted(directory, "search", EARLIER_BOOT, pad=0)
    raw = bytearray(spare.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "flipped":
        raw[len(raw) // 2] ^= 0x01
    elif damage == "zeros":
        raw = bytearray(len(raw))
    else:
        raw = bytearray(b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")
    spare.write_bytes(bytes(raw))
    manager = CheckpointManager(directory)
    assert [r["stage"] for r in manager.list_checkpoints()] == ["planning", "intent"]
    assert not spare.exists()
    assert not (directory / f"{SESSION}_search.pkl").exists()
    assert not (tmp_path / "pwned").exists()


def test_an_interrupted_save_only_a_key_can_vouch_for_is_kept(tmp_path: Path) -> None:
    """Signed with another key (or unsigned, with a key configured): this reader cannot
    publish it, and must not destroy what may be the only copy."""
    directory = tmp_path / "checkpoints"
    save_run(CheckpointManager(directory, key="writer's key"), SESSION, STAGES[:3])
    spare = interrupted(directory, "search", EARLIER_BOOT)

    CheckpointManager(directory, key="another key").list_checkpoints()
    assert spare.exists()
    assert not (directory / f"{SESSION}_search.pkl").exists()

    owner = CheckpointManager(directory, key="writer's key")
    assert owner.latest(SESSION).stage == "search"  # type: ignore[union-attr]
    assert not spare.exists()


def test_a_spare_that_is_a_symlink_or_foreign_name_is_ignored(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    save_run(CheckpointManager(directory), SESSION, STAGES[:3])
    spare = interrupted(directory, "search", EARLIER_BOOT)
    target = tmp_path / "elsewhere.bin"
    spare.rename(target)
    link = directory / ".spare" / f"{EARLIER_BOOT}-1-00000000"
    link.symlink_to(target)
    foreign = directory / ".spare" / "not-a-spare-name"
    foreign.write_bytes(target.read_bytes())
    manager = CheckpointManager(directory)
    assert [r["stage"] for r in manager.list_checkpoints()] == ["planning", "intent"]
    assert link.is_symlink() and foreign.exists() and target.exists()
    with pytest.raises(CheckpointNotFoundError):  # nothing was published for that stage
        manager.load_checkpoint(f"{SESSION}_search")


def test_spares_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PROWZI_CHECKPOINT_SPARES=false: every save makes its own file and syncs the directory."""
    from prowzi.config import ProwziConfig

    monkeypatch.setenv("PROWZI_CHECKPOINT_SPARES", "false")
    config = ProwziConfig(checkpoint_dir=tmp_path / "checkpoints")
    manager = CheckpointManager.from_config(config)
    with manager.session_lock(SESSION):
        time.sleep(0.2)
        save_run(manager, SESSION, STAGES[:3])
    assert not (tmp_path / "checkpoints" / ".spare").exists()
    assert CheckpointManager(tmp_path / "checkpoints").latest(SESSION).stage == "search"  # type: ignore[union-attr]

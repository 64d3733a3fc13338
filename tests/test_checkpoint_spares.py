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
from datetime import timedelta
from pathlib import Path

import pytest
from test_checkpoint_support import STAGES, params, rewrite, save_run, state_after

from prowzi.workflows import checkpoint as cp
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


def interrupted(directory: Path, stage: str, boot: str, session: str = SESSION) -> Path:
    """Turn the checkpoint of ``stage`` back into the spare it was before its rename, as a
    power loss after the put's fdatasync (and before the rename's commit) leaves it."""
    cp._BEHIND.drain()  # the sidecar written in the background is there
    pkl = directory / f"{session}_{stage}.pkl"
    spare = directory / ".spare" / f"{boot}-4242-{os.urandom(4).hex()}"
    spare.parent.mkdir(exist_ok=True, mode=0o700)
    pkl.rename(spare)
    (directory / f"{session}_{stage}.json").unlink()
    return spare


# --- the fast path --------------------------------------------------------------------


def ready_spares(store: LocalDirectoryStore, directory: Path) -> set[int]:
    """Start the store's pool (a put does) and wait until it has spares; their inodes."""
    store.put("warm-up.pkl", b"{}", recoverable=True)
    pool = store._pool
    assert pool is not None
    # Handed to the pool only once the thread has made its whole batch (files come first).
    wait_for(lambda: len(pool._ready) >= 8)
    return {p.stat().st_ino for p in spares(directory)}


def test_a_recoverable_durable_put_renames_a_prepared_spare(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    store = LocalDirectoryStore(directory)
    prepared = ready_spares(store, directory)
    token = store.put("a_intent.pkl", b"checkpoint bytes", recoverable=True)
    store.put("a_intent.json", b"{}", durable=False)
    assert (directory / "a_intent.pkl").stat().st_ino in prepared
    # Spares are for checkpoints: a sidecar (written in the background) makes its own file.
    assert (directory / "a_intent.json").stat().st_ino not in prepared
    # The spare was written full of zeros beforehand (so the put allocated no blocks): they
    # stay after the blob until finish() cuts them.
    padded = store.get("a_intent.pkl")
    assert padded.startswith(b"checkpoint bytes") and len(padded) > len(b"checkpoint bytes")
    assert padded.count(0) == len(padded) - len(b"checkpoint bytes")
    assert token == store.token("a_intent.pkl")
    cut = store.finish("a_intent.pkl", token)
    assert cut != token and cut == store.token("a_intent.pkl")
    assert store.get("a_intent.pkl") == b"checkpoint bytes"
    assert store.finish("a_intent.pkl", cut) == cut  # nothing left to do
    assert store.get("a_intent.json") == b"{}"


def test_spares_hold_zeros_for_the_largest_put_and_a_larger_one_still_fits(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    store = LocalDirectoryStore(directory)
    blob = os.urandom(40_000)
    store.put("first.pkl", blob, recoverable=True)  # no spare yet: it teaches the pool
    assert store.spares_ready() >= 8
    sizes = {p.stat().st_size for p in spares(directory)}
    assert min(sizes) >= 40_000 * 5 // 4 and max(sizes) <= 80_000
    assert all(p.read_bytes().count(0) == p.stat().st_size for p in spares(directory))

    bigger = os.urandom(3 * 40_000)  # more than a spare holds: the put extends it
    token = store.put("bigger.pkl", bigger, recoverable=True)
    assert store.get("bigger.pkl") == bigger
    assert store.finish("bigger.pkl", token) == token  # no padding to cut


def test_spares_ready_get_more_zeros_when_the_puts_grow(tmp_path: Path) -> None:
    """A run's state grows stage by stage: the spares prepared for its first, small
    checkpoints are topped up once a larger one comes."""
    directory = tmp_path / "store"
    store = LocalDirectoryStore(directory)
    store.put("small.pkl", b"s" * 2000, recoverable=True)
    assert store.spares_ready() >= 8
    assert {p.stat().st_size for p in spares(directory)} == {storage._SPARE_GRAIN}
    store.put("large.pkl", os.urandom(40_000), recoverable=True)
    assert store.spares_ready() >= 8
    sizes = {p.stat().st_size for p in spares(directory)}
    assert min(sizes) >= 50_000, sizes
    assert all(p.read_bytes().count(0) == p.stat().st_size for p in spares(directory))


def test_a_store_cuts_the_padding_it_has_left_when_closed_or_when_too_much_is_left(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    store = LocalDirectoryStore(directory)
    ready_spares(store, directory)
    tokens = []
    for i in range(storage._UNTRIMMED_MAX + 5):
        tokens.append(store.put(f"p{i}.pkl", b"blob", recoverable=True))
        wait_for(lambda: store.spares_ready() > 0)
    exact = [i for i in range(storage._UNTRIMMED_MAX + 5) if store.get(f"p{i}.pkl") == b"blob"]
    assert exact == list(range(5))  # the oldest, cut by later puts
    # The finish their caller calls later still learns the token the cut gave them.
    assert [store.finish(f"p{i}.pkl", tokens[i]) for i in range(5)] == [
        store.token(f"p{i}.pkl") for i in range(5)
    ]
    store.close()
    assert all(store.get(f"p{i}.pkl") == b"blob" for i in range(storage._UNTRIMMED_MAX + 5))
    assert store.finish("p9.pkl", tokens[9]) == store.token("p9.pkl")


def test_a_finish_racing_an_early_cut_of_the_same_blob_learns_the_cut_token(
    tmp_path: Path,
) -> None:
    """The write-behind finishes a checkpoint while a save (too many cuts pending) or close
    cuts it early: whichever comes second still answers with the token after the cut."""
    import threading

    directory = tmp_path / "store"
    store = LocalDirectoryStore(directory)
    ready_spares(store, directory)
    stale = 0
    for i in range(100):
        name = f"race{i}.pkl"
        token = store.put(name, b"blob", recoverable=True)
        start = threading.Barrier(2)
        answers: list[str] = []

        def early(name: str = name, token: str = token, start: threading.Barrier = start) -> None:
            start.wait()
            store._finish(name, token, early=True)

        def finish(
            name: str = name,
            token: str = token,
            start: threading.Barrier = start,
            answers: list[str] = answers,
        ) -> None:
            start.wait()
            answers.append(store.finish(name, token))

        threads = [threading.Thread(target=early), threading.Thread(target=finish)]
        for thread in threads if i % 2 else reversed(threads):
            thread.start()
        for thread in threads:
            thread.join()
        stale += answers != [store.token(name)]
        wait_for(lambda: store.spares_ready() > 0)
    assert stale == 0


def test_spares_topped_up_are_few_at_a_time_so_puts_still_find_one(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    store = LocalDirectoryStore(directory)
    store.put("small.pkl", b"s" * 2000, recoverable=True)
    assert store.spares_ready() >= 20
    prepared = {p.stat().st_ino for p in spares(directory)}
    pool = store._pool
    assert pool is not None
    store.put("large.pkl", os.urandom(40_000), recoverable=True)  # the pool starts topping up
    store.put("next.pkl", os.urandom(40_000), recoverable=True)
    assert (directory / "next.pkl").stat().st_ino in prepared


def test_a_memoryview_of_wide_items_is_put_whole(tmp_path: Path) -> None:
    import array

    store = LocalDirectoryStore(tmp_path / "store")
    ready_spares(store, tmp_path / "store")
    words = array.array("I", range(1000))
    token = store.put("words.pkl", memoryview(words), recoverable=True)
    store.finish("words.pkl", token)
    assert store.get("words.pkl") == words.tobytes()
    store.put("plain.bin", memoryview(words))
    assert store.get("plain.bin") == words.tobytes()


def test_a_forked_child_leaves_its_parents_padding_alone(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    store = LocalDirectoryStore(directory)
    ready_spares(store, directory)
    token = store.put("parent.pkl", b"the parent's", recoverable=True)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:  # no descriptor of the parent's pending cuts stays open here
            code = 0 if not store._untrimmed else 3
            store.finish("parent.pkl", token)  # and nothing is cut from here
            code = code or (0 if len(store.get("parent.pkl")) > 12 else 4)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.finish("parent.pkl", token)
    assert store.get("parent.pkl") == b"the parent's"


def test_a_durable_put_that_is_not_recoverable_never_defers_its_rename(tmp_path: Path) -> None:
    """Only a caller that can recognise its blobs again may rely on a recovery."""
    directory = tmp_path / "store"
    store = LocalDirectoryStore(directory)
    prepared = ready_spares(store, directory)
    store.put("plain.bin", b"must be under its name when put returns")
    assert (directory / "plain.bin").stat().st_ino not in prepared


def test_a_spare_that_vanished_falls_back_to_a_new_file(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    store = LocalDirectoryStore(directory)
    ready_spares(store, directory)
    for spare in spares(directory):
        spare.unlink()  # as a careless cleanup of .spare/ would
    for i in range(30):
        token = store.put(f"x{i}.pkl", b"still saved", recoverable=True)
        store.finish(f"x{i}.pkl", token)
        assert store.get(f"x{i}.pkl") == b"still saved"


def test_spares_are_shared_by_the_stores_of_one_directory(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    stores = [LocalDirectoryStore(directory) for _ in range(20)]
    for i, store in enumerate(stores):
        store.put(f"s{i}.pkl", b"{}", recoverable=True)
    time.sleep(0.5)
    assert len(spares(directory)) <= 24


def test_a_planted_spare_directory_is_not_followed(tmp_path: Path) -> None:
    """``.spare`` replaced by a symlink elsewhere: saves work without it, and nothing
    outside the checkpoint directory is created or removed."""
    directory = tmp_path / "checkpoints"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / f"{EARLIER_BOOT}-1-00000000"
    victim.write_bytes(b"someone else's file")
    directory.mkdir(mode=0o700)
    (directory / ".spare").symlink_to(elsewhere)
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:3])
    time.sleep(0.3)
    assert CheckpointManager(directory).latest(SESSION).stage == "search"  # type: ignore[union-attr]
    assert sorted(p.name for p in elsewhere.iterdir()) == [victim.name]
    assert victim.read_bytes() == b"someone else's file"


def open_files() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the descriptor of the listing itself, closed by now
            continue
    return found


def test_close_leaves_no_spare_open_or_on_disk(tmp_path: Path) -> None:
    """Even when it lands while the background thread is creating a batch (a mount with
    files open for writing cannot be remounted read-only)."""
    for attempt in range(20):
        directory = tmp_path / f"store{attempt}"
        store = LocalDirectoryStore(directory)
        store.put("warm-up.pkl", b"{}", recoverable=True)  # starts the thread
        time.sleep(attempt * 0.0005)
        store.close()
        assert spares(directory) == []
        assert not [f for f in open_files() if f.startswith(str(directory))]


def test_a_forked_child_never_writes_into_its_parents_spares(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    store = LocalDirectoryStore(directory)
    ready_spares(store, directory)
    before = {p.name for p in spares(directory)}
    pid = os.fork()
    if pid == 0:  # the child: its puts create their own files
        code = 1
        try:
            for i in range(30):
                store.put(f"child{i}.pkl", b"from the child", recoverable=True)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert before <= {p.name for p in spares(directory)}  # all still there, unwritten
    assert all(p.read_bytes().count(0) == p.stat().st_size for p in spares(directory))
    # the child's own spares are full of zeros too, and it never cut them
    assert store.get("child7.pkl").rstrip(b"\0") == b"from the child"


# --- recovery -------------------------------------------------------------------------


@pytest.mark.parametrize("padding", [0, 30_000])
def test_a_save_cut_short_by_a_power_loss_is_published_on_the_next_use(
    tmp_path: Path, padding: int
) -> None:
    """With ``padding``, the power loss also came before the write-behind cut the spare's
    remaining zeros."""
    directory = tmp_path / "checkpoints"
    save_run(CheckpointManager(directory), SESSION, STAGES[:3])
    spare = interrupted(directory, "search", EARLIER_BOOT)
    expected = spare.read_bytes() + bytes(padding)
    spare.write_bytes(expected)

    manager = CheckpointManager(directory)
    assert [r["stage"] for r in manager.list_checkpoints()] == ["search", "planning", "intent"]
    assert (directory / f"{SESSION}_search.pkl").read_bytes() == expected
    assert (directory / f"{SESSION}_search.json").exists()
    assert not spare.exists()
    assert manager.load_checkpoint(SESSION).search == state_after("search").search
    manager.verify_chain(SESSION)


def test_several_saves_awaiting_their_renames_at_a_power_loss_are_all_published(
    tmp_path: Path,
) -> None:
    """A save's fdatasync commits no metadata, so the renames of several saves can await the
    filesystem's next commit together. The older is judged first, whatever order the spare
    directory lists them in: the newer never makes it look superseded."""
    for attempt in range(8):  # the directory's order differs with the random names
        directory = tmp_path / f"checkpoints-{attempt}"
        save_run(CheckpointManager(directory), SESSION, STAGES[:4])
        spares = [interrupted(directory, stage, EARLIER_BOOT) for stage in STAGES[1:4]]
        manager = CheckpointManager(directory)
        assert [r["stage"] for r in manager.list_checkpoints()] == list(reversed(STAGES[:4]))
        assert not any(spare.exists() for spare in spares)
        manager.verify_chain(SESSION)


def test_an_interrupted_save_the_session_moved_on_from_is_discarded(tmp_path: Path) -> None:
    """The stage was saved again afterwards, or later stages were: publishing the old save
    would roll the session back or break its chain."""
    directory = tmp_path / "checkpoints"
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:3])
    spare = interrupted(directory, "planning", EARLIER_BOOT)
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

    # a spare older than the session's latest checkpoint (of another stage) goes too
    spare = interrupted(directory, "intent", EARLIER_BOOT)
    CheckpointManager(directory).list_checkpoints()
    assert not spare.exists()
    assert not (directory / f"{SESSION}_intent.pkl").exists()


def test_a_writer_killed_in_this_boot_leaves_nothing_to_publish(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    save_run(CheckpointManager(directory), SESSION, STAGES[:3])
    spare = interrupted(directory, "search", CURRENT_BOOT)
    manager = CheckpointManager(directory)
    assert [r["stage"] for r in manager.list_checkpoints()] == ["planning", "intent"]
    assert not spare.exists()


def test_a_spare_whose_owner_is_alive_or_that_is_being_born_is_left_alone(
    tmp_path: Path,
) -> None:
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
    # a spare is created as .new-*, locked, then named: recovery never touches that name
    born = spare.with_name(".new-4242-0badcafe")
    spare.rename(born)
    CheckpointManager(directory).list_checkpoints()
    assert born.exists()


@pytest.mark.parametrize("damage", ["truncated", "flipped", "appended", "empty", "pickle"])
def test_a_damaged_interrupted_save_is_discarded_not_published(tmp_path: Path, damage: str) -> None:
    directory = tmp_path / "checkpoints"
    save_run(CheckpointManager(directory), SESSION, STAGES[:3])
    spare = interrupted(directory, "search", EARLIER_BOOT)
    raw = bytearray(spare.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "flipped":
        raw[len(raw) // 2] ^= 0x01
    elif damage == "appended":
        raw += b"\x00" * 10 + b"\x01"  # zeros alone are the spare's own padding
    elif damage == "empty":
        raw = bytearray()
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
    # Nor can a reader with no key: the signature may be torn (a spare is whole-sized
    # from the start, so a write cut short is not short), and only the key can tell.
    CheckpointManager(directory).list_checkpoints()
    assert spare.exists()
    assert not (directory / f"{SESSION}_search.pkl").exists()

    owner = CheckpointManager(directory, key="writer's key")
    assert owner.latest(SESSION).stage == "search"  # type: ignore[union-attr]
    assert not spare.exists()


def test_an_interrupted_save_in_a_newer_format_is_kept_for_a_newer_prowzi(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "checkpoints"
    save_run(CheckpointManager(directory), SESSION, STAGES[:3])
    pkl = directory / f"{SESSION}_search.pkl"
    rewrite(pkl, header={"format_version": cp.FORMAT_VERSION + 1, "new_field": 1})
    spare = interrupted(directory, "search", EARLIER_BOOT)
    CheckpointManager(directory).list_checkpoints()
    assert spare.exists()


def test_cleanup_discards_the_kept_spares_of_the_sessions_it_deletes(tmp_path: Path) -> None:
    """Else a manager with the right key would later publish one checkpoint of a deleted
    session."""
    directory = tmp_path / "checkpoints"
    save_run(CheckpointManager(directory, key="writer's key"), SESSION, STAGES[:3])
    save_run(CheckpointManager(directory, key="writer's key"), "recent", STAGES[:2])
    spare = interrupted(directory, "search", EARLIER_BOOT)
    kept = interrupted(directory, "planning", EARLIER_BOOT, session="recent")
    cleaner = CheckpointManager(directory, key="another key")
    deleted = cleaner.cleanup(older_than=timedelta(0), keep_last=1)
    assert deleted == [f"{SESSION}_intent", f"{SESSION}_planning"]
    assert not spare.exists()
    assert kept.exists()  # not a deleted session's: still recoverable
    owner = CheckpointManager(directory, key="writer's key")
    assert owner.latest(SESSION) is None
    assert owner.latest("recent").stage == "planning"  # type: ignore[union-attr]


def test_spares_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PROWZI_CHECKPOINT_SPARES=false: every save makes its own file and syncs the directory."""
    from prowzi.config import ProwziConfig

    monkeypatch.setenv("PROWZI_CHECKPOINT_SPARES", "false")
    config = ProwziConfig(checkpoint_dir=tmp_path / "checkpoints")
    manager = CheckpointManager.from_config(config)
    save_run(manager, SESSION, STAGES[:3])
    time.sleep(0.2)
    assert not (tmp_path / "checkpoints" / ".spare").exists()
    assert CheckpointManager(tmp_path / "checkpoints").latest(SESSION).stage == "search"  # type: ignore[union-attr]

"""Checkpoint stores: one conformance suite run against every store, then local-only behaviour."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_checkpoint_support import held_in_child

from prowzi.errors import InvalidIdentifierError, SessionLockedError
from prowzi.workflows.storage import (
    BlobNotFoundError,
    CheckpointStore,
    InMemoryStore,
    LocalDirectoryStore,
)

StoreFactory = Callable[[Path], CheckpointStore]

STORES: dict[str, StoreFactory] = {
    "local": lambda root: LocalDirectoryStore(root / "store"),
    "local-nofsync": lambda root: LocalDirectoryStore(root / "store", fsync=False),
    "memory": lambda root: InMemoryStore(),
}

BAD_NAMES = ["", "../escape", "a/b", "..", "a..b", "nul\x00byte", ".hidden", "x" * 256, "a\\b"]


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointStore:
    return STORES[request.param](tmp_path)


# --- conformance ------------------------------------------------------------------------


def test_put_then_get_returns_the_bytes(store: CheckpointStore) -> None:
    store.put("a_intent.pkl", b"\x00payload\xff")
    assert store.get("a_intent.pkl") == b"\x00payload\xff"


def test_get_of_a_missing_blob_raises_blob_not_found(store: CheckpointStore) -> None:
    with pytest.raises(BlobNotFoundError):
        store.get("missing.pkl")


def test_put_replaces_the_whole_blob(store: CheckpointStore) -> None:
    store.put("a.pkl", b"a much longer first version")
    store.put("a.pkl", b"short")
    assert store.get("a.pkl") == b"short"


def test_get_with_max_bytes_returns_a_prefix(store: CheckpointStore) -> None:
    store.put("a.pkl", b"0123456789")
    assert store.get("a.pkl", max_bytes=4) == b"0123"


def test_list_names_every_blob_with_size_and_meta(store: CheckpointStore) -> None:
    store.put("a.pkl", b"12345", meta={"stage": "intent"})
    store.put("b.json", b"{}")
    listed = {b.name: b for b in store.list()}
    assert set(listed) == {"a.pkl", "b.json"}
    assert listed["a.pkl"].size == 5
    assert listed["a.pkl"].meta == {"stage": "intent"}
    assert listed["b.json"].meta is None
    assert abs(listed["a.pkl"].modified - time.time()) < 60


def test_an_empty_store_lists_nothing(store: CheckpointStore) -> None:
    assert store.list() == []


def test_token_changes_when_the_blob_is_replaced(store: CheckpointStore) -> None:
    assert store.token("a.pkl") is None
    store.put("a.pkl", b"one")
    first = store.token("a.pkl")
    store.put("a.pkl", b"two")
    assert first is not None
    assert store.token("a.pkl") not in (None, first)
    assert {b.name: b.token for b in store.list()}["a.pkl"] == store.token("a.pkl")


def test_remember_sets_meta_only_for_the_same_content(store: CheckpointStore) -> None:
    store.put("a.pkl", b"one")
    token = store.token("a.pkl")
    assert token is not None
    store.remember("a.pkl", token, {"k": 1})
    assert store.list()[0].meta == {"k": 1}
    store.put("a.pkl", b"two")
    store.remember("a.pkl", token, {"k": 2})  # stale token: ignored
    assert store.list()[0].meta is None


def test_delete_removes_and_reports_whether_it_existed(store: CheckpointStore) -> None:
    store.put("a.pkl", b"x")
    assert store.delete("a.pkl") is True
    assert store.delete("a.pkl") is False
    assert store.list() == []
    with pytest.raises(BlobNotFoundError):
        store.get("a.pkl")


def test_generation_changes_with_every_write(store: CheckpointStore) -> None:
    before = store.generation()
    store.put("a.pkl", b"x")
    after_put = store.generation()
    store.delete("a.pkl")
    if before is not None:
        assert len({before, after_put, store.generation()}) == 3


@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_names_are_refused(store: CheckpointStore, name: str, tmp_path: Path) -> None:
    for call in (
        lambda: store.put(name, b"x"),
        lambda: store.get(name),
        lambda: store.delete(name),
        lambda: store.token(name),
        lambda: store.lock(name).__enter__(),
        lambda: store.is_locked(name),
    ):
        with pytest.raises(InvalidIdentifierError):
            call()
    assert not (tmp_path / "escape").exists()


def test_a_held_lock_refuses_a_second_holder_and_names_the_first(store: CheckpointStore) -> None:
    assert store.holder("session-1") is None
    with store.lock("session-1"):
        assert store.is_locked("session-1")
        with (
            pytest.raises(SessionLockedError, match=rf"session-1 .*pid {os.getpid()}") as info,
            store.lock("session-1"),
        ):
            pass
        assert str(info.value) == f"session session-1 is locked by {store.holder('session-1')}"
        assert not store.is_locked("session-2") and store.holder("session-2") is None
    assert not store.is_locked("session-1")
    assert store.holder("session-1") is None
    with store.lock("session-1", timeout=1):
        pass


def test_a_readers_probe_never_makes_a_writer_think_the_lock_is_taken(tmp_path: Path) -> None:
    """Readers (`prowzi sessions`, the service) probe a session's lock with a shared flock
    held for an instant; a writer that takes the lock without waiting must not mistake that
    for a holder."""
    import threading

    store = LocalDirectoryStore(tmp_path / "store", spares=False)
    with store.lock("probed"):
        pass  # the lock file exists from now on
    reader = LocalDirectoryStore(tmp_path / "store", spares=False)
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            reader.is_locked("probed")

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        for _ in range(2000):
            with store.lock("probed"):
                pass
    finally:
        stop.set()
        prober.join()


def test_lock_timeout_waits_for_the_holder(store: CheckpointStore) -> None:
    started = time.monotonic()
    with store.lock("s"), pytest.raises(SessionLockedError):
        store.lock("s", timeout=0.2).__enter__()
    assert time.monotonic() - started >= 0.2


# --- local directory ----------------------------------------------------------------------


def test_a_blob_put_in_parts_reads_back_whole(store: CheckpointStore) -> None:
    parts = [b"\x89head", b"", b"body " * 1000, b"mac"]
    token = store.put("a.pkl", parts, recoverable=True)
    assert store.get("a.pkl") == b"".join(parts)
    assert token == store.token("a.pkl")
    store.put("b.pkl", bytearray(b"a bytearray"))
    store.put("c.pkl", memoryview(b"a memoryview"))
    assert (store.get("b.pkl"), store.get("c.pkl")) == (b"a bytearray", b"a memoryview")


def test_a_short_vectored_write_is_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def first_part_only(fd: int, parts: list[bytes]) -> int:
        return os.write(fd, parts[0][:3])

    monkeypatch.setattr(os, "writev", first_part_only)
    store = LocalDirectoryStore(tmp_path / "store", spares=False)
    store.put("a.pkl", [b"first", b"second", b"third"])
    assert store.get("a.pkl") == b"firstsecondthird"


def local(tmp_path: Path) -> LocalDirectoryStore:
    return LocalDirectoryStore(tmp_path / "store")


def test_files_are_plain_files_named_after_the_blob(tmp_path: Path) -> None:
    store = local(tmp_path)
    store.put("s_intent.pkl", b"bytes")
    assert (tmp_path / "store" / "s_intent.pkl").read_bytes() == b"bytes"
    assert store.describe("s_intent.pkl") == str(tmp_path / "store" / "s_intent.pkl")


def test_reading_does_not_create_the_directory(tmp_path: Path) -> None:
    store = local(tmp_path)
    assert store.list() == []
    assert not store.is_locked("s")
    assert not (tmp_path / "store").exists()


def test_a_failed_put_leaves_the_old_blob_and_no_temporary(tmp_path: Path) -> None:
    store = local(tmp_path)
    store.put("a.pkl", b"old")
    (tmp_path / "store" / "b.pkl").mkdir()  # os.replace onto a directory fails
    with pytest.raises(OSError):
        store.put("b.pkl", b"new")
    assert store.get("a.pkl") == b"old"
    assert [p.name for p in (tmp_path / "store").iterdir() if p.name.startswith(".tmp")] == []


def test_stray_temporaries_are_not_listed_and_are_swept_when_old(tmp_path: Path) -> None:
    store = local(tmp_path)
    store.put("a.pkl", b"x")
    stray = tmp_path / "store" / ".tmp.a.pkl.dead"
    stray.write_bytes(b"torn")
    fresh = tmp_path / "store" / ".tmp.b.pkl.live"
    fresh.write_bytes(b"being written")
    old = time.time() - 7200
    os.utime(stray, (old, old))
    assert [b.name for b in store.list()] == ["a.pkl"]
    assert not stray.exists()  # a rescan removes temporaries abandoned long ago
    assert fresh.exists()  # a live writer's is left alone
    assert store.sweep_temporaries(max_age=3600) == []
    assert store.sweep_temporaries(max_age=0) == [fresh.name]


def test_files_added_or_removed_by_hand_are_seen_by_the_next_listing(tmp_path: Path) -> None:
    store = local(tmp_path)
    store.put("a.pkl", b"x", meta={"m": 1})
    store.put("b.pkl", b"y", meta={"m": 2})
    assert {b.name for b in store.list()} == {"a.pkl", "b.pkl"}
    (tmp_path / "store" / "b.pkl").unlink()
    (tmp_path / "store" / "c.pkl").write_bytes(b"by hand")
    listed = {b.name: b for b in store.list()}
    assert set(listed) == {"a.pkl", "c.pkl"}
    assert listed["a.pkl"].meta == {"m": 1}  # unchanged file: cached meta kept
    assert listed["c.pkl"].meta is None  # unknown content: no meta vouched for


def test_a_change_after_the_racy_window_is_seen_through_a_trusted_index(tmp_path: Path) -> None:
    store = local(tmp_path)
    store.put("a.pkl", b"x")
    time.sleep(0.06)  # past the racy window: the next scan's stamp is trusted
    store.list()
    assert store.list()[0].name == "a.pkl"
    (tmp_path / "store" / "a.pkl").unlink()
    assert store.list() == []


def test_another_store_object_sees_the_same_listing(tmp_path: Path) -> None:
    first = local(tmp_path)
    first.put("a.pkl", b"x", meta={"m": 1})
    time.sleep(0.06)
    first.list()
    second = local(tmp_path)
    assert [(b.name, b.meta) for b in second.list()] == [("a.pkl", {"m": 1})]
    first.put("b.pkl", b"y", meta={"m": 2})
    assert {b.name for b in second.list()} == {"a.pkl", "b.pkl"}


@pytest.mark.parametrize("damage", ["delete", "garbage", "torn-line"])
def test_a_lost_or_damaged_index_is_rebuilt_from_the_files(tmp_path: Path, damage: str) -> None:
    store = local(tmp_path)
    store.put("a.pkl", b"x", meta={"m": 1})
    store.put("b.pkl", b"y", meta={"m": 2})
    manifest = tmp_path / "store" / ".index" / "manifest.jsonl"
    if damage == "delete":
        manifest.unlink()
    elif damage == "garbage":
        manifest.write_bytes(b"\x00\xffnot json\n")
    else:
        with manifest.open("ab") as fh:
            fh.write(b'{"n": "zz.pkl", "t": \n')
    fresh = local(tmp_path)
    assert {b.name for b in fresh.list()} == {"a.pkl", "b.pkl"}


def test_the_lock_names_a_holder_in_another_process(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with held_in_child(
        f"""
        from prowzi.workflows.storage import LocalDirectoryStore
        LocalDirectoryStore({str(root)!r}).lock("shared-session")
        """
    ) as pid:
        store = LocalDirectoryStore(root)
        assert store.is_locked("shared-session")
        with pytest.raises(SessionLockedError) as info, store.lock("shared-session"):
            pass
        assert f"pid {pid}" in str(info.value)
        assert (
            str(info.value)
            == f"session shared-session is locked by {store.holder('shared-session')}"
        )
    assert not LocalDirectoryStore(root).is_locked("shared-session")
    with LocalDirectoryStore(root).lock("shared-session"):
        pass


def test_a_refusal_names_a_holder_that_has_only_just_taken_the_lock(tmp_path: Path) -> None:
    """Between taking the lock and writing who it is, a holder is anonymous for a moment: a
    refusal in that moment waits for the name rather than saying 'another process'."""
    import threading

    root = tmp_path / "store"
    store = LocalDirectoryStore(root)
    lock_path, owner = store._lock_paths("s")
    lock_path.parent.mkdir(parents=True)
    script = (
        "import fcntl, os, sys\n"
        "from prowzi.workflows.storage import _holder_description\n"
        "import orjson\n"
        f"fd = os.open({str(lock_path)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"  # the test's refusal is under way: now say who holds it
        f"open({str(owner)!r}, 'wb').write(orjson.dumps(_holder_description()))\n"
        "sys.stdin.readline()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    refusals: list[BaseException] = []

    def refused() -> None:
        try:
            with store.lock("s"):
                pass
        except SessionLockedError as exc:
            refusals.append(exc)

    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        assert child.stdin is not None and not owner.exists()
        attempt = threading.Thread(target=refused)
        attempt.start()
        child.stdin.write("\n")
        child.stdin.flush()
        attempt.join(timeout=30)
        (error,) = refusals
        assert f"locked by pid {child.pid} on " in str(error)
    finally:
        child.kill()
        child.wait(timeout=30)


def test_a_holder_killed_outright_leaves_no_holder_behind(tmp_path: Path) -> None:
    """SIGKILL skips the holder's clean-up: its owner file stays, but the lock died with it."""
    root = tmp_path / "store"
    script = (
        "import sys\n"
        "from prowzi.workflows.storage import LocalDirectoryStore\n"
        f"with LocalDirectoryStore({str(root)!r}).lock('s'):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    store = LocalDirectoryStore(root)
    assert (store.holder("s") or "").startswith(f"pid {child.pid} on ")
    child.kill()
    child.wait(timeout=30)
    assert (root / ".locks" / "s.owner").exists()
    assert store.holder("s") is None and not store.is_locked("s")


def test_the_index_log_is_compacted_as_it_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prowzi.workflows import storage

    monkeypatch.setattr(storage, "_COMPACT_MIN", 4096)
    store = LocalDirectoryStore(tmp_path / "store", fsync=False)
    for i in range(400):
        store.put(f"b{i % 20}.pkl", b"x" * i, meta={"i": i, "padding": "p" * 40})
    manifest = tmp_path / "store" / ".index" / "manifest.jsonl"
    assert manifest.stat().st_size < 3 * 4096
    listed = {b.name: b.meta for b in LocalDirectoryStore(tmp_path / "store").list()}
    assert len(listed) == 20
    assert listed["b19.pkl"] == {"i": 399, "padding": "p" * 40}


def test_a_new_checkpoint_directory_and_its_index_are_private(tmp_path: Path) -> None:
    import stat as stat_module

    from prowzi.agents.base import RunParameters
    from prowzi.agents.models import WorkflowState
    from prowzi.workflows.checkpoint import CheckpointManager

    root = tmp_path / "new" / "checkpoints"
    manager = CheckpointManager(root)
    with manager.session_lock("p-1"):  # a run takes its lock before its first save
        manager.save(
            session_id="p-1",
            stage="intent",
            state=WorkflowState(),
            completed_stages=["intent"],
            parameters=RunParameters(prompt="x"),
        )
    manager.list_checkpoints()
    for path in (root, root / ".index"):
        assert stat_module.S_IMODE(path.stat().st_mode) == 0o700, path
    for path in [*root.glob("*.pkl"), *(root / ".index").iterdir()]:
        assert stat_module.S_IMODE(path.stat().st_mode) & 0o077 == 0, path

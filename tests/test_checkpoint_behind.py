"""What a save derives (its ``.json`` and its index entry) is written behind it: a save waits
only for its checkpoint, and nothing derived is lost, misplaced or left half-done."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
from test_checkpoint_support import params, save_run, state_after

from prowzi.workflows import checkpoint as cp
from prowzi.workflows.checkpoint import CheckpointManager

SESSION = "behind-session"


@contextmanager
def writer_held() -> Iterator[None]:
    """Keep the write-behind thread busy until the block ends (then wait for it)."""
    started, release = threading.Event(), threading.Event()

    def block() -> None:
        started.set()
        release.wait(10)

    cp._BEHIND.submit(block)
    assert started.wait(10)
    try:
        yield
    finally:
        release.set()
        cp._BEHIND.drain()


def save(manager: CheckpointManager, stage: str = "intent") -> None:
    manager.save(
        session_id=SESSION,
        stage=stage,
        state=state_after(stage),
        completed_stages=[stage],
        parameters=params(),
    )


def manifest_names(directory: Path) -> set[str]:
    names: set[str] = set()
    for line in (directory / ".index" / "manifest.jsonl").read_bytes().splitlines():
        record = orjson.loads(line)
        names.update(entry[0] for entry in record.get("entries", []) if entry[4] is not None)
        if record.get("m") is not None:
            names.add(record["n"])
    return names


def test_a_save_returns_with_its_checkpoint_and_flush_waits_for_the_rest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    with writer_held():
        save(manager)
        assert (tmp_path / f"{SESSION}_intent.pkl").is_file()
        assert not (tmp_path / f"{SESSION}_intent.json").exists()
        finished = threading.Event()
        waiter = threading.Thread(target=lambda: (manager.flush(), finished.set()))
        waiter.start()
        assert not finished.wait(0.2)  # flush waits for the held writer
    waiter.join(10)
    assert finished.is_set()
    sidecar = orjson.loads((tmp_path / f"{SESSION}_intent.json").read_bytes())
    assert sidecar["checkpoint_id"] == f"{SESSION}_intent"
    assert f"{SESSION}_intent.pkl" in manifest_names(tmp_path)


def test_readers_in_the_process_wait_for_what_is_still_queued(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    other = CheckpointManager(tmp_path)
    results: dict[str, object] = {}
    readers = [
        threading.Thread(target=lambda: results.update(listed=other.list_checkpoints())),
        threading.Thread(target=lambda: results.update(loaded=other.load_checkpoint(SESSION))),
    ]
    with writer_held():
        save(manager)
        for reader in readers:
            reader.start()
        readers[0].join(0.2)
        assert results == {}  # both wait for the sidecar and the index entry
    for reader in readers:
        reader.join(10)
    listed = results["listed"]
    assert isinstance(listed, list) and [r["checkpoint_id"] for r in listed] == [
        f"{SESSION}_intent"
    ]
    loaded = results["loaded"]
    assert (
        isinstance(loaded, cp.WorkflowCheckpoint) and loaded.intent == state_after("intent").intent
    )


def test_releasing_the_session_lock_waits_for_the_sidecars(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    save_run(manager, SESSION, ("intent", "planning"))  # under the session's lock
    assert (tmp_path / f"{SESSION}_intent.json").is_file()
    assert (tmp_path / f"{SESSION}_planning.json").is_file()


def test_a_checkpoint_directory_removed_before_its_sidecar_is_not_brought_back(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "checkpoints"
    manager = CheckpointManager(directory)
    with writer_held():
        save(manager)
        directory.rename(tmp_path / "moved")
    assert not directory.exists()
    assert sorted(p.name for p in (tmp_path / "moved").iterdir() if p.suffix) == [
        f"{SESSION}_intent.pkl"
    ]


def test_a_checkpoint_replaced_before_its_sidecar_gets_the_newer_sidecar(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    with writer_held():
        save(manager)
        save(manager)  # the same stage again: only the second save's sidecar is written
    sidecar = orjson.loads((tmp_path / f"{SESSION}_intent.json").read_bytes())
    assert sidecar == manager.load_checkpoint(SESSION).metadata.model_dump(mode="json")


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    here = Path(__file__).parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_a_process_that_exits_after_a_save_has_written_the_sidecar(tmp_path: Path) -> None:
    proc = run_child(
        f"""
        from test_checkpoint_support import params, state_after
        from prowzi.workflows.checkpoint import CheckpointManager
        CheckpointManager({str(tmp_path)!r}).save(
            session_id={SESSION!r}, stage="intent", state=state_after("intent"),
            completed_stages=["intent"], parameters=params(),
        )
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / f"{SESSION}_intent.json").is_file()


def test_a_forked_child_writes_its_own_sidecars(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    started, release = threading.Event(), threading.Event()
    cp._BEHIND.submit(lambda: (started.set(), release.wait(10)))
    assert started.wait(10)
    save(manager, "intent")  # queued in the parent when the child is forked
    threading.Timer(0.2, release.set).start()  # the fork waits for the job under way
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                child = CheckpointManager(tmp_path / "child")
                save(child, "planning")
                child.flush()  # its own writer; the parent's queue is not the child's
                code = 0 if (tmp_path / "child" / f"{SESSION}_planning.json").is_file() else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
    manager.flush()
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / f"{SESSION}_intent.json").is_file()
    assert not (tmp_path / "child" / f"{SESSION}_intent.json").exists()


def test_a_fork_waits_for_the_job_under_way(tmp_path: Path) -> None:
    """A job holding a lock (as an index append holds the index's flock) is finished before
    a fork: a child never inherits the lock and holds it for its whole life."""
    lock_file = tmp_path / "lock"
    lock_file.touch()
    started = threading.Event()

    def locking_job() -> None:
        fd = os.open(lock_file, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        started.set()
        time.sleep(0.2)
        os.close(fd)

    cp._BEHIND.submit(locking_job)
    assert started.wait(10)
    pid = os.fork()
    if pid == 0:
        time.sleep(3)
        os._exit(0)
    try:
        probe = os.open(lock_file, os.O_RDWR)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: the child holds nothing
        finally:
            os.close(probe)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_without_a_worker_thread_saves_write_their_sidecars_themselves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp._BEHIND.drain()
    real_start = threading.Thread.start

    def refuse(self: threading.Thread) -> None:
        if self.name == "prowzi-checkpoint-metadata":
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", refuse)
    monkeypatch.setattr(cp._BEHIND, "_thread", None)
    manager = CheckpointManager(tmp_path)
    save(manager)
    assert (tmp_path / f"{SESSION}_intent.json").is_file()  # written before save returned
    assert [r["checkpoint_id"] for r in manager.list_checkpoints()] == [f"{SESSION}_intent"]


def test_a_job_that_raises_does_not_stop_the_writer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def exits() -> None:
        raise SystemExit(3)

    cp._BEHIND.submit(exits)
    manager = CheckpointManager(tmp_path)
    save(manager)
    manager.flush()
    assert (tmp_path / f"{SESSION}_intent.json").is_file()
    assert "could not write checkpoint metadata" in caplog.text


def test_drain_gives_up_after_its_timeout(tmp_path: Path) -> None:
    with writer_held():
        assert cp._BEHIND.drain(timeout=0.1) is False
    assert cp._BEHIND.drain(timeout=0.1) is True

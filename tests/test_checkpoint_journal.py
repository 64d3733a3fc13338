"""The write-ahead journal: one sync per durable save, and recovery after an OS crash.

An OS crash (power loss, kernel panic) is simulated by what it can do to files written without
their own fsync: a materialised checkpoint is missing, torn, or still the previous version.
The recovering manager runs in a "new boot" (``storage._BOOT_ID`` patched), with the writer's
journal lock released (the writer is gone).
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
from test_checkpoint_support import STAGES, rewrite, save_run, split

from prowzi.workflows import storage
from prowzi.workflows.checkpoint import CheckpointManager
from prowzi.workflows.storage import LocalDirectoryStore, read_journal

SESSION = "journal-session"


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"


def journals(directory: Path) -> list[Path]:
    return sorted((directory / storage.JOURNAL_DIR).glob("*.wal"))


def crash(manager: CheckpointManager) -> None:
    """The writer is gone (its journal lock is released), its journal left as it was."""
    store = manager.store
    assert isinstance(store, LocalDirectoryStore)
    journal = store._journal
    assert journal is not None
    journal.close()
    store._journal = None


def reboot(monkeypatch: pytest.MonkeyPatch, n: int = 1) -> None:
    """What follows runs in a new boot: journals written so far lived through an OS crash."""
    monkeypatch.setattr(storage, "_BOOT_ID", bytes([n]) * 16)


def loads_and_verifies(directory: Path, session: str = SESSION) -> CheckpointManager:
    manager = CheckpointManager(directory)
    for row in manager.list_checkpoints(session_id=session):
        manager.load_checkpoint(row["checkpoint_id"])
    manager.verify_chain(session)
    return manager


# --- one sync per save ------------------------------------------------------------------


def test_a_durable_save_syncs_once(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:1])  # creates the journal
    calls: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def counted(fd: int, _real=real, _name=name) -> None:  # type: ignore[no-untyped-def]
            calls.append(_name)
            _real(fd)

        monkeypatch.setattr(os, name, counted)
    save_run(manager, SESSION, STAGES[:2])
    assert calls == ["fdatasync", "fdatasync"]  # one per save, of its journal record
    monkeypatch.undo()
    (journal,) = journals(directory)
    parsed = read_journal(journal.read_bytes())
    assert parsed is not None
    assert [r.name for r in parsed[1]] == [
        f"{SESSION}_intent.pkl",
        f"{SESSION}_intent.pkl",
        f"{SESSION}_planning.pkl",
    ]
    assert parsed[1][-1].data == (directory / f"{SESSION}_planning.pkl").read_bytes()


def test_without_fsync_there_is_no_journal(directory: Path) -> None:
    save_run(CheckpointManager(directory, fsync=False), SESSION, STAGES[:2])
    assert not (directory / storage.JOURNAL_DIR).exists()


# --- recovery after an OS crash ---------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "torn", "empty", "previous-version"])
def test_a_lost_or_torn_checkpoint_is_restored_from_the_journal(
    directory: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:2])
    target = directory / f"{SESSION}_planning.pkl"
    first = target.read_bytes()
    saved = save_run(manager, SESSION, STAGES[:3])  # planning saved again: a newer version
    final = {p.name: p.read_bytes() for p in directory.glob("*.pkl")}
    crash(manager)
    reboot(monkeypatch)
    if damage == "missing":
        target.unlink()
    elif damage == "torn":
        target.write_bytes(final[target.name][:1000])
    elif damage == "empty":
        target.write_bytes(b"")
    else:
        target.write_bytes(first)  # the rename of the newer version was lost

    recovered = loads_and_verifies(directory)
    assert {p.name: p.read_bytes() for p in directory.glob("*.pkl")} == final
    assert recovered.load_checkpoint(SESSION).metadata == saved[-1]
    assert journals(directory) == []  # replayed, then removed


def test_a_torn_journal_tail_is_ignored(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:3])
    crash(manager)
    reboot(monkeypatch)
    (journal,) = journals(directory)
    parsed = read_journal(journal.read_bytes())
    assert parsed is not None
    size = sum(len(r.name) + len(r.data) for r in parsed[1]) + 36 + 30 * len(parsed[1])
    with journal.open("r+b") as fh:
        fh.truncate(size - 100)  # the last record (search) torn mid-write
    (directory / f"{SESSION}_intent.pkl").unlink()
    (directory / f"{SESSION}_search.pkl").unlink()  # its save never completed

    recovered = loads_and_verifies(directory)
    assert [r["stage"] for r in recovered.list_checkpoints()] == ["planning", "intent"]


def test_a_record_that_does_not_verify_never_replaces_or_restores_a_file(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:2])
    crash(manager)
    reboot(monkeypatch)
    (journal,) = journals(directory)
    raw = bytearray(journal.read_bytes())
    parsed = read_journal(bytes(raw))
    assert parsed is not None
    # Forge the planning record: a flipped byte in its body, the record's crc made consistent.
    record = parsed[1][-1]
    start = raw.find(record.data)
    forged = bytearray(record.data)
    forged[-20] ^= 0xFF
    raw[start : start + len(forged)] = forged
    end = start + len(forged)
    header = raw.rfind(storage._RECORD_MAGIC, 0, start)
    raw[end : end + 4] = storage._CRC.pack(storage.zlib.crc32(bytes(raw[header:end])))
    journal.write_bytes(bytes(raw))
    planning = directory / f"{SESSION}_planning.pkl"
    planning.unlink()
    intent = directory / f"{SESSION}_intent.pkl"
    valid_intent = intent.read_bytes()

    recovered = CheckpointManager(directory)
    assert not planning.exists()  # the forged record restored nothing
    assert intent.read_bytes() == valid_intent
    assert [r["stage"] for r in recovered.list_checkpoints()] == ["intent"]


def test_a_record_never_replaces_a_newer_valid_file(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:1])  # journaled
    # Saved again, later, by a writer without a journal (direct fsyncs): newer, and valid.
    direct = CheckpointManager(directory)
    direct.store._journal_failed = True  # type: ignore[attr-defined]
    (newer,) = save_run(direct, SESSION, STAGES[:1])
    before = (directory / f"{SESSION}_intent.pkl").read_bytes()
    crash(manager)
    reboot(monkeypatch)
    recovered = CheckpointManager(directory)
    assert journals(directory) == []
    assert (directory / f"{SESSION}_intent.pkl").read_bytes() == before
    assert recovered.load_checkpoint(SESSION).metadata == newer


def test_a_failed_save_is_not_resurrected_by_a_replay(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:1])
    (directory / f"{SESSION}_planning.pkl").mkdir()  # the rename onto it fails
    with pytest.raises(Exception, match="could not write checkpoint"):
        save_run(manager, SESSION, STAGES[:2])
    (directory / f"{SESSION}_planning.pkl").rmdir()
    crash(manager)
    reboot(monkeypatch)
    CheckpointManager(directory)
    assert not (directory / f"{SESSION}_planning.pkl").exists()


def test_cleanup_empties_the_journal_so_deleted_checkpoints_stay_deleted(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:2])
    assert manager.cleanup(older_than=timedelta(0)) == [
        f"{SESSION}_intent",
        f"{SESSION}_planning",
    ]
    crash(manager)
    reboot(monkeypatch)
    assert CheckpointManager(directory).list_checkpoints() == []


def test_a_dead_writers_journal_in_this_boot_is_absorbed(directory: Path) -> None:
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:2])
    files = {p.name: p.read_bytes() for p in directory.glob("*_*")}
    other = CheckpointManager(directory)
    assert len(journals(directory)) == 1  # its writer is alive: left alone
    crash(manager)
    other = CheckpointManager(directory)
    assert journals(directory) == []
    assert {p.name: p.read_bytes() for p in directory.glob("*_*")} == files
    assert len(other.list_checkpoints()) == 2


def test_the_journal_is_bounded(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "_JOURNAL_INITIAL", 8192)
    monkeypatch.setattr(storage, "_JOURNAL_MAX", 32768)
    manager = CheckpointManager(directory)
    for run in range(4):
        save_run(manager, f"{SESSION}-{run}")
    (journal,) = journals(directory)
    assert journal.stat().st_size <= 32768
    crash(manager)
    reboot(monkeypatch, 2)
    for path in directory.glob("*.pkl"):
        path.unlink()  # everything not yet checkpointed is lost ...
    recovered = CheckpointManager(directory)
    kept = {r["checkpoint_id"] for r in recovered.list_checkpoints()}
    assert kept  # ... and what the journal still holds comes back
    for checkpoint_id in kept:
        recovered.load_checkpoint(checkpoint_id)


def test_a_checkpoint_too_large_for_the_journal_is_written_directly(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "_JOURNAL_MAX", 4096)
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:2])
    loads_and_verifies(directory)


def test_journal_records_are_read_up_to_the_first_damage() -> None:
    assert read_journal(b"") is None
    assert read_journal(b"\x00" * 100) is None


# --- several writers ----------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_checkpoint_support import STAGES, params, state_after
    from prowzi.workflows.checkpoint import CheckpointManager

    manager = CheckpointManager({directory!r})
    print("ready", flush=True)
    run = 0
    while True:
        run += 1
        for i, stage in enumerate(STAGES):
            manager.save(
                session_id=f"{{sys.argv[1]}}-{{run}}",
                stage=stage,
                state=state_after(stage),
                completed_stages=list(STAGES[: i + 1]),
                parameters=params(),
            )
    """
)


def test_concurrent_writers_each_keep_a_journal_and_all_recover(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = WRITER.format(tests=str(Path(__file__).parent), directory=str(directory))
    children = [
        subprocess.Popen([sys.executable, "-c", script, f"w{n}"], stdout=subprocess.PIPE)
        for n in range(3)
    ]
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
    time.sleep(0.5)
    for child in children:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert len(journals(directory)) == 3
    records = {}
    for journal in journals(directory):
        parsed = read_journal(journal.read_bytes())
        assert parsed is not None
        for record in parsed[1]:
            records[record.name] = record.data
    # An OS crash loses every materialised file not yet checkpointed from the journals.
    for name in records:
        (directory / name).unlink(missing_ok=True)
    reboot(monkeypatch, 3)
    manager = CheckpointManager(directory)
    assert journals(directory) == []
    rows = manager.list_checkpoints()
    assert {f"{r['checkpoint_id']}.pkl" for r in rows} >= set(records)
    for row in rows:
        manager.load_checkpoint(row["checkpoint_id"])
    for session in {r["session_id"] for r in rows}:
        manager.verify_chain(session)


def test_records_are_judged_by_the_managers_own_checks_hmac_included(directory: Path) -> None:
    manager = CheckpointManager(directory, key="secret")
    (saved,) = save_run(manager, SESSION, STAGES[:1])
    target = directory / f"{SESSION}_intent.pkl"
    assert manager._journal_key(target.name, target.read_bytes()) == saved.created_at.timestamp()
    header, _ = split(target)
    assert header["signed"] is True
    rewrite(target, header={"prompt": "forged"})  # consistent, but unsigned
    assert manager._journal_key(target.name, target.read_bytes()) is None
    assert manager._journal_key("elsewhere_intent.pkl", target.read_bytes()) is None
    assert manager._journal_key("notes.txt", b"anything") is None


# --- spare files ----------------------------------------------------------------------------


def filled_spares(manager: CheckpointManager) -> list[str]:
    spares = manager.store._spares  # type: ignore[attr-defined]
    assert spares is not None
    deadline = time.monotonic() + 10
    while len(spares.ready) < storage._SPARES and time.monotonic() < deadline:
        time.sleep(0.01)
    return list(spares.ready)


@pytest.mark.parametrize("tamper", ["hard-link", "symlink", "not-empty", "swept"])
def test_a_spare_file_that_is_not_an_empty_private_file_is_never_written_through(
    directory: Path, tmp_path: Path, tamper: str
) -> None:
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:1])
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for spare in filled_spares(manager):
        os.unlink(spare)
        if tamper == "hard-link":
            os.link(victim, spare)
        elif tamper == "symlink":
            os.symlink(victim, spare)
        elif tamper == "not-empty":
            Path(spare).write_bytes(b"left over")
    save_run(manager, SESSION, STAGES[:3])
    assert victim.read_text() == "keep me"
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp")]
    loads_and_verifies(directory)


def test_spare_files_are_used_and_removed_with_their_store(directory: Path) -> None:
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, STAGES[:1])
    spares = filled_spares(manager)
    save_run(manager, SESSION, STAGES[:2])
    assert not all(os.path.exists(s) for s in spares)  # taken, renamed into place
    left = filled_spares(manager)
    assert left and all(os.path.exists(s) for s in left)
    del manager
    gc.collect()
    assert not any(os.path.exists(s) for s in left)

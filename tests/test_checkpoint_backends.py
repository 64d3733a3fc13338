"""Every checkpoint guarantee, on every backend: local files, S3 (moto's server) and Azure Blob
(Azurite), each a real server on loopback driven by real ``prowzi`` processes.

- kill -9 at random instants, then resume: the same document as an uninterrupted run, and the
  checkpoints that existed before the resume unchanged by it;
- tampered objects (edited in the bucket) are refused with a clear reason;
- two resumers of one session: exactly one runs; a writer whose lease was taken over has its
  next save refused by the fencing token, and its successor's checkpoint stays intact;
- a store unreachable during a save: a clear error, and the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from shared import PROMPT
from test_checkpoint_support import STAGES, save_run, save_stage, state_after

from prowzi.errors import CheckpointError, CheckpointIntegrityError
from prowzi.storage.blob import BlobStore
from prowzi.storage.lease import LeaseLostError, SessionLeases
from prowzi.storage.local import LocalBlobStore
from prowzi.storage.remote import open_store
from prowzi.workflows.checkpoint import CheckpointManager

TESTS = Path(__file__).parent
PROWZI = str(Path(sys.executable).parent / "prowzi")
SLOW = ",".join(f"{s}=engine_agents:slow" for s in STAGES)


@pytest.fixture(params=["local", "s3", "azure"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "checkpoints")
    else:
        yield request.getfixturevalue("s3_store" if request.param == "s3" else "azure_store")


def _env(tmp_path: Path, store: BlobStore, **extra: str) -> dict[str, str]:
    return {
        **os.environ,  # the emulator's credentials and endpoint, as the fixture set them
        "PYTHONPATH": str(TESTS),
        "PROWZI_CHECKPOINT_URL": store.url,
        "PROWZI_TELEMETRY_DIR": str(tmp_path / "telemetry"),
        **extra,
    }


def _prowzi(tmp_path: Path, store: BlobStore, *args: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PROWZI, *args],
        env=_env(tmp_path, store, **extra),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _cli(tmp_path: Path, store: BlobStore, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROWZI, *args],
        env=_env(tmp_path, store),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_kill_9_at_random_instants_then_resume_gives_the_same_document(
    tmp_path: Path, store: BlobStore
) -> None:
    code, err = _finish(_prowzi(tmp_path, store, "run", PROMPT, "--output", "reference.md"))
    assert code == 0, err
    expected = (tmp_path / "reference.md").read_text(encoding="utf-8")
    rng = random.Random(20261207)
    manager = CheckpointManager(store=store)
    resumed = 0
    for i in range(4):
        session = f"kill-{i}"
        proc = _prowzi(
            tmp_path,
            store,
            "run",
            PROMPT,
            "--enable-checkpoints",
            "--session-id",
            session,
            PROWZI_AGENTS=SLOW,
            PROWZI_TEST_DELAY="0.15",
        )
        time.sleep(rng.uniform(1.0, 2.0))  # start-up, then somewhere among the stages
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        before = {
            b.name: store.get(b.name).data
            for b in store.list(f"{session}_")
            if b.name.endswith(".pkl")
        }
        for name in before:
            assert manager.load_checkpoint(name[:-4]).metadata.session_id == session
        job = ["resume", session] if before else ["run", PROMPT, "--session-id", session]
        resumed += bool(before)
        code, err = _finish(
            _prowzi(tmp_path, store, *job, "--enable-checkpoints", "--output", f"{session}.md")
            if job[0] == "run"
            else _prowzi(tmp_path, store, *job, "--output", f"{session}.md")
        )
        assert code == 0, err
        assert (tmp_path / f"{session}.md").read_text(encoding="utf-8") == expected
        for name, data in before.items():
            assert store.get(name).data == data, f"{name} changed by the resume"
        manager.verify_chain(session)
        assert manager.latest(session).completed_stages == list(STAGES)  # type: ignore[union-attr]
    assert resumed >= 2, f"only {resumed} of the kills left a checkpoint to resume from"


def _saved_run(manager: CheckpointManager, session: str) -> None:
    save_run(manager, session)


def test_an_object_edited_in_the_store_is_refused(store: BlobStore) -> None:
    manager = CheckpointManager(store=store)
    _saved_run(manager, "tampered")
    name = "tampered_search.pkl"
    data = bytearray(store.get(name).data)
    data[-5] ^= 0x01  # in the payload
    store.put(name, bytes(data))
    with pytest.raises(CheckpointIntegrityError, match="payload sha256 mismatch"):
        manager.load_checkpoint("tampered_search")
    # a later checkpoint that refers to the edited part is refused too, naming it
    with pytest.raises(CheckpointIntegrityError, match="tampered_search"):
        CheckpointManager(store=store).load_checkpoint("tampered_verification")
    store.put("tampered_turnitin.pkl", b"\x80\x04\x95 a pickle, never unpickled")
    with pytest.raises(CheckpointIntegrityError, match="looks like a pickle"):
        manager.load_checkpoint("tampered_turnitin")


def test_two_resumers_of_one_session_exactly_one_runs(tmp_path: Path, store: BlobStore) -> None:
    code, err = _finish(
        _prowzi(tmp_path, store, "run", PROMPT, "--enable-checkpoints", "--session-id", "dup")
    )
    assert code == 0, err
    first = CheckpointManager(store=store).latest("dup")
    assert first is not None
    # Re-run from an earlier stage in place would fork; a plain resume of a complete session
    # runs nothing: hold the lease as a resume does and race a second resume against it.
    with CheckpointManager(store=store).session_lock("dup"):
        code, err = _finish(_prowzi(tmp_path, store, "resume", "dup"))
    assert code != 0
    assert "locked" in err and "pid" in err and "Traceback" not in err


def test_a_writer_whose_lease_was_taken_over_is_refused(store: BlobStore) -> None:
    stale = CheckpointManager(store=store, lease_ttl=0.5)
    successor = CheckpointManager(store=store)
    with stale.session_lock("fenced"):
        save_stage(stale, "fenced", "intent")
        held = stale._held["fenced"]
        held._stop.set()  # the writer stalls: its lease is no longer renewed
        held._thread.join()
        time.sleep(0.7)
        with successor.session_lock("fenced"):
            taken = save_stage(successor, "fenced", "planning")
            with pytest.raises(LeaseLostError, match="taken over"):
                save_stage(stale, "fenced", "planning", state=state_after("intent"))
    assert taken.lease_token is not None and taken.lease_token >= 2
    loaded = CheckpointManager(store=store).load_checkpoint("fenced_planning")
    assert loaded.metadata.payload_sha256 == taken.payload_sha256
    assert SessionLeases(store).holder("fenced") is None


def test_a_store_unreachable_during_a_save_fails_clearly_and_keeps_the_previous(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    manager = CheckpointManager(store=store)
    save_stage(manager, "cut", "intent")
    if isinstance(store, LocalBlobStore):
        (tmp_path / "gone").write_text("a disk that went away, as far as the writer can tell")
        broken: BlobStore = LocalBlobStore(tmp_path / "gone" / "checkpoints")
    else:
        with socket_closed() as port:
            for variable in ("AWS_ENDPOINT_URL",):
                if variable in os.environ:
                    monkeypatch.setenv(variable, f"http://127.0.0.1:{port}")
            connection = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
            if connection:
                monkeypatch.setenv(
                    "AZURE_STORAGE_CONNECTION_STRING",
                    ";".join(
                        f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1"
                        if part.startswith("BlobEndpoint=")
                        else part
                        for part in connection.split(";")
                    ),
                )
            broken = open_store(store.url)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="the previous checkpoint is intact"):
        save_stage(CheckpointManager(store=broken), "cut", "planning")
    assert time.monotonic() - started < 60
    assert manager.latest("cut").stage == "intent"  # type: ignore[union-attr]
    assert manager.load_checkpoint("cut").intent == state_after("intent").intent


class socket_closed:
    """A loopback port nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        from emulator_servers import free_port

        return free_port()

    def __exit__(self, *exc: object) -> None:
        return None


def test_every_checkpoint_command_works_against_the_store(tmp_path: Path, store: BlobStore) -> None:
    code, err = _finish(
        _prowzi(tmp_path, store, "run", PROMPT, "--enable-checkpoints", "--session-id", "cli")
    )
    assert code == 0, err
    listing = _cli(tmp_path, store, "checkpoints", "--session", "cli", "--json")
    assert listing.returncode == 0, listing.stderr
    assert sorted(line.count('"stage"') for line in listing.stdout.splitlines()) == [1] * 7
    # a fork with a changed parameter re-runs from search in a new session of the same store
    code, err = _finish(
        _prowzi(tmp_path, store, "resume", "cli", "--set", "max_results_per_query=3")
    )
    assert code == 0, err
    manager = CheckpointManager(store=store)
    forks = {row["session_id"] for row in manager.list_checkpoints()} - {"cli"}
    assert len(forks) == 1
    (fork,) = forks
    manager.verify_chain(fork)
    assert all(
        not row["refs"] or all(r["checkpoint"].startswith(fork) for r in row["refs"].values())
        for row in manager.list_checkpoints(session_id=fork)
    )
    show = _cli(tmp_path, store, "show", "cli", "--json")
    assert show.returncode == 0, show.stderr
    assert '"cli_turnitin.pkl' in show.stdout.replace(store.url.rstrip("/") + "/", '"')
    cleaned = _cli(tmp_path, store, "cleanup", "--older-than", "0s")
    assert cleaned.returncode == 0, cleaned.stderr
    assert manager.list_checkpoints() == []
    assert not [b.name for b in store.list() if b.name.endswith((".pkl", ".json"))]


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda data, other: data[:12] + bytes([data[12] ^ 1]) + data[13:], "header digest"),
        (lambda data, other: data[: len(data) // 2], "truncated"),
        (lambda data, other: data + b"\0\0\0\0", "trailing bytes"),
        (lambda data, other: other, "copied from another session"),
    ],
    ids=["header-flipped", "truncated", "trailing-bytes", "transplanted"],
)
def test_the_tampered_corpus_is_refused_in_any_store(
    store: BlobStore, edit: Any, reason: str
) -> None:
    manager = CheckpointManager(store=store)
    _saved_run(manager, "victim")
    _saved_run(manager, "donor")
    name = "victim_writing.pkl"
    store.put(name, edit(store.get(name).data, store.get("donor_writing.pkl").data))
    with pytest.raises(CheckpointIntegrityError, match=reason):
        CheckpointManager(store=store).load_checkpoint("victim_writing")
    with pytest.raises(CheckpointIntegrityError):
        CheckpointManager(store=store).verify_chain("victim")
    # the rest of the session, and the other session, still load
    assert CheckpointManager(store=store).load_checkpoint("victim_verification").verification
    CheckpointManager(store=store).verify_chain("donor")


def test_a_sidecar_edited_in_the_store_to_point_elsewhere_is_refused(store: BlobStore) -> None:
    manager = CheckpointManager(store=store)
    _saved_run(manager, "side")
    sidecar = orjson.loads(store.get("side_search.json").data)
    store.put("side_search.json", orjson.dumps({**sidecar, "session_id": "other"}))
    with pytest.raises(CheckpointIntegrityError, match="metadata file was edited"):
        CheckpointManager(store=store).load_checkpoint("side_search")


def test_a_garbled_lease_record_never_blocks_the_session(store: BlobStore) -> None:
    store.put(SessionLeases.blob_name("garbled"), b"{not json")
    manager = CheckpointManager(store=store)
    with manager.session_lock("garbled"):
        assert manager.lock_holder("garbled") is not None


def test_a_run_whose_lease_is_taken_over_stops_without_writing_again(tmp_path: Path) -> None:
    import asyncio

    from prowzi.agents.base import StageContext
    from prowzi.config import ProwziConfig
    from prowzi.testing import noop_agents
    from prowzi.workflows import ProwziOrchestrator

    store = LocalBlobStore(tmp_path / "checkpoints")
    agents = noop_agents()
    plain_search = agents["search"]

    async def search_then_taken_over(ctx: StageContext) -> Any:
        # another writer takes the session over (as after this one stalled past its ttl)
        name = SessionLeases.blob_name(ctx.session_id)
        blob = store.get(name)
        record = {**orjson.loads(blob.data), "token": 99, "owner": "the intruder", "pid": 1}
        store.put(name, orjson.dumps(record), if_match=blob.info.etag)
        return await plain_search(ctx)

    agents["search"] = search_then_taken_over
    config = ProwziConfig(
        enable_checkpointing=True, checkpoint_dir=tmp_path / "checkpoints", enable_telemetry=False
    )
    orchestrator = ProwziOrchestrator(config=config, agents=agents)
    with pytest.raises(LeaseLostError, match="taken over by the intruder"):
        asyncio.run(orchestrator.run_research(PROMPT, session_id="stolen"))
    saved = sorted(b.name for b in store.list("stolen_") if b.name.endswith(".pkl"))
    assert saved == ["stolen_intent.pkl", "stolen_planning.pkl"]

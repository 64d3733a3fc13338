"""Crash safety: a run killed with SIGKILL at random instants, including inside checkpoint
writes, leaves only checkpoints that load and verify, and resuming gives the same document as
a run that was never interrupted.

Children are forked from this (single-threaded) test process, so 100+ kills take seconds, not
minutes of interpreter start-up. Only the children run asyncio; the parent only reads files.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

from shared import PROMPT
from test_checkpoint_support import in_flight_writes

from prowzi.config import ProwziConfig
from prowzi.errors import SessionNotFoundError
from prowzi.workflows.checkpoint import CheckpointManager
from prowzi.workflows.telemetry import TelemetryCollector

KILLS = 110


def _config(checkpoints: Path, **settings: Any) -> ProwziConfig:
    return ProwziConfig(
        enable_checkpointing=True,
        checkpoint_dir=checkpoints,
        **{"enable_telemetry": False, **settings},
    )


def _fork(
    job: str,
    checkpoints: Path,
    session: str,
    document: Path | None = None,
    settings: dict[str, Any] | None = None,
) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        from prowzi.tracing import NullTracer
        from prowzi.workflows.orchestrator import ProwziOrchestrator

        config = _config(checkpoints, **(settings or {}))
        orch = ProwziOrchestrator(config=config, tracer=NullTracer())
        if job == "run":
            asyncio.run(orch.run_research(PROMPT, session_id=session, document_path=document))
        else:
            asyncio.run(orch.resume_from_checkpoint(session, document_path=document))
            if document is not None and not document.exists():
                # the session was already complete: write its document from the result
                result = asyncio.run(orch.resume_from_checkpoint(session))
                document.write_text(result.document, encoding="utf-8")
        code = 0
    finally:
        os._exit(code)


def _wait(pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("child did not finish in time")


def test_sigkill_at_random_instants_never_loses_or_corrupts(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    reference = tmp_path / "reference.md"
    started = time.perf_counter()
    assert _wait(_fork("run", tmp_path / "ref-checkpoints", "reference", reference)) == 0
    duration = time.perf_counter() - started
    expected = reference.read_text(encoding="utf-8")

    rng = random.Random(20261126)
    kills_in_write = 0
    resumed_from_checkpoint = 0
    for i in range(KILLS):
        session = f"crash-{i}"
        pid = _fork("run", checkpoints, session)
        if i % 3 == 0:
            # aim at a checkpoint write: kill as soon as one is under way
            deadline = time.monotonic() + duration * 2
            while time.monotonic() < deadline and not in_flight_writes(checkpoints, session):
                pass
        else:
            time.sleep(rng.uniform(0, duration * 1.1))
        in_write = bool(in_flight_writes(checkpoints, session))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills_in_write += in_write

        # Every checkpoint present loads and verifies, and the chain holds.
        manager = CheckpointManager(checkpoints)
        for pkl in sorted(checkpoints.glob(f"{session}_*.pkl")):
            checkpoint = manager.load_checkpoint(pkl.stem)
            assert checkpoint.metadata.session_id == session
        if manager.latest(session) is not None:
            manager.verify_chain(session)
            resumed_from_checkpoint += 1
            job = "resume"
        else:
            job = "run"
        document = tmp_path / f"{session}.md"
        assert _wait(_fork(job, checkpoints, session, document)) == 0, f"{job} of {session}"
        assert document.read_text(encoding="utf-8") == expected, session

    resumed = resumed_from_checkpoint
    print(f"{KILLS} kills, {kills_in_write} in a checkpoint write, {resumed} resumed")
    assert kills_in_write >= 5, f"only {kills_in_write} kills landed inside a checkpoint write"
    assert resumed_from_checkpoint >= KILLS // 3
    # Killed writers leave temporaries: listing ignores them, cleanup sweeps them, and every
    # session is still complete and verifiable afterwards.
    manager = CheckpointManager(checkpoints)
    assert len({row["session_id"] for row in manager.list_checkpoints()}) == KILLS
    manager.store.sweep_temporaries(max_age=0)
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp.")]
    # and the spares of killed writers (all of this boot) are gone after the first recovery
    assert not in_flight_writes(checkpoints)
    for i in range(KILLS):
        manager.verify_chain(f"crash-{i}")
        assert manager.latest(f"crash-{i}").completed_stages[-1] == "turnitin"  # type: ignore[union-attr]


RESUME_KILLS = 36


def _checked(checkpoints: Path, session: str) -> bool:
    """Every checkpoint of ``session`` present loads and verifies, and so does the chain;
    whether the session has any checkpoint."""
    manager = CheckpointManager(checkpoints)
    for pkl in sorted(checkpoints.glob(f"{session}_*.pkl")):
        assert manager.load_checkpoint(pkl.stem).metadata.session_id == session
    if manager.latest(session) is None:
        return False
    manager.verify_chain(session)
    return True


def test_sigkill_inside_resumes_with_an_interval_and_telemetry(tmp_path: Path) -> None:
    """The same promise when a resume is itself killed, checkpoints are saved every third
    stage, and telemetry is written: after every kill the checkpoints verify and the
    session's telemetry reads back; the last resume gives the uninterrupted document."""
    checkpoints = tmp_path / "checkpoints"
    telemetry = tmp_path / "telemetry"
    settings: dict[str, Any] = {
        "checkpoint_interval": 3,
        "enable_telemetry": True,
        "telemetry_dir": telemetry,
    }
    reference = tmp_path / "reference.md"
    started = time.perf_counter()
    assert _wait(_fork("run", tmp_path / "ref", "reference", reference, settings)) == 0
    duration = time.perf_counter() - started
    expected = reference.read_text(encoding="utf-8")

    rng = random.Random(20261127)
    killed_resumes = 0
    for i in range(RESUME_KILLS):
        session = f"again-{i}"
        job = "run"
        for _ in range(2):  # the run is killed, then so is what continues it
            pid = _fork(job, checkpoints, session, settings=settings)
            if rng.random() < 0.3:
                deadline = time.monotonic() + duration * 2
                while time.monotonic() < deadline and not in_flight_writes(checkpoints, session):
                    pass
            else:
                time.sleep(rng.uniform(0, duration))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            killed_resumes += job == "resume"
            saved = _checked(checkpoints, session)
            # (no telemetry at all: killed before its first event was written)
            with contextlib.suppress(SessionNotFoundError):
                TelemetryCollector(telemetry).load_session(session)
            job = "resume" if saved else "run"
        document = tmp_path / f"{session}.md"
        assert _wait(_fork(job, checkpoints, session, document, settings)) == 0, session
        assert document.read_text(encoding="utf-8") == expected, session
        assert _checked(checkpoints, session)
        assert TelemetryCollector(telemetry).load_session(session).status == "completed"

    print(f"{2 * RESUME_KILLS} kills, {killed_resumes} of them inside a resume")
    assert killed_resumes >= RESUME_KILLS // 4

"""Retention (issue 15 item 16): ``prowzi cleanup --older-than`` deletes what old sessions left
(checkpoints, telemetry, service documents), and ``prowzi serve`` with ``PROWZI_RETENTION``
does the same on its own; a running session keeps everything. Real ``prowzi`` processes, real
files, real HTTP on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from test_service import Service
from test_service_support import run_prowzi, subprocess_env

from prowzi.workflows.checkpoint import CheckpointManager

TWO_DAYS = 2 * 86400


def left_by(cwd: Path, sid: str) -> dict[str, bool]:
    """Which of a session's traces exist."""
    return {
        "telemetry": (cwd / "prowzi_telemetry" / f"{sid}.json").exists(),
        "events": (cwd / "prowzi_telemetry" / "events" / f"{sid}.jsonl").exists(),
        "document": (cwd / "prowzi_service" / "documents" / f"{sid}.md").exists(),
        "checkpoints": any((cwd / "prowzi_checkpoints").glob(f"{sid}_*.pkl")),
    }


EVERYTHING = {"telemetry": True, "events": True, "document": True, "checkpoints": True}


def age(cwd: Path, sid: str, seconds: float) -> None:
    """Make a session's telemetry and document look ``seconds`` old."""
    when = time.time() - seconds
    for path in (
        cwd / "prowzi_telemetry" / f"{sid}.json",
        cwd / "prowzi_telemetry" / "events" / f"{sid}.jsonl",
        cwd / "prowzi_service" / "documents" / f"{sid}.md",
    ):
        os.utime(path, (when, when))


def three_service_runs(cwd: Path) -> list[str]:
    service = Service(cwd, PROWZI_TEST_DELAY="0.01")
    try:
        sids = [service.start_run(f"topic {i}") for i in range(3)]
        for sid in sids:
            service.wait_state(sid, "completed")
    finally:
        service.stop()
    return sids


def test_cleanup_deletes_old_telemetry_and_documents_and_keeps_the_new_and_the_running(
    tmp_path: Path,
) -> None:
    old, held, new = three_service_runs(tmp_path)
    for sid in (old, held, new):
        assert left_by(tmp_path, sid) == EVERYTHING
    age(tmp_path, old, TWO_DAYS)
    age(tmp_path, held, TWO_DAYS)

    dry = run_prowzi(tmp_path, "cleanup", "--older-than", "1d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would delete telemetry of {old}" in dry.stdout
    assert f"would delete document of {old}" in dry.stdout
    assert left_by(tmp_path, old) == EVERYTHING  # a dry run deletes nothing

    manager = CheckpointManager(tmp_path / "prowzi_checkpoints")
    with manager.session_lock(held):  # a run in progress, held by this process
        done = run_prowzi(tmp_path, "cleanup", "--older-than", "1d")
    assert done.returncode == 0, done.stderr
    assert f"kept session {held}: it is running" in done.stderr
    assert done.stderr.splitlines()[-2:] == [
        "deleted telemetry of 1 session(s) and 1 document(s)",
        "deleted 0 checkpoint(s)",  # each kind goes by its own age: these are new
    ]
    gone = {"telemetry": False, "events": False, "document": False}
    assert left_by(tmp_path, old) == {**EVERYTHING, **gone}
    assert left_by(tmp_path, held) == EVERYTHING
    assert left_by(tmp_path, new) == EVERYTHING
    listed = run_prowzi(tmp_path, "sessions", "--json")
    assert {s["session_id"] for s in json.loads(listed.stdout)} == {held, new}

    # With no age limit, --keep-last keeps the newest session of each kind.
    everything = run_prowzi(tmp_path, "cleanup", "--older-than", "0s", "--keep-last", "1")
    assert everything.returncode == 0, everything.stderr
    assert left_by(tmp_path, new) == EVERYTHING
    assert not any(left_by(tmp_path, held).values())
    assert left_by(tmp_path, old) == dict.fromkeys(EVERYTHING, False)


def test_a_bad_retention_setting_stops_the_service_with_one_line(tmp_path: Path) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "prowzi.cli.main", "serve", "--port", "0"],
        cwd=tmp_path,
        env=subprocess_env(PROWZI_RETENTION="a week"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode != 0
    assert process.stderr.strip().splitlines() == [
        "error: invalid setting retention (PROWZI_RETENTION='a week'): invalid age 'a week': "
        "use a number and a unit, e.g. 30m, 12h, 7d"
    ]


def test_the_service_applies_its_retention_setting_and_never_to_a_running_run(
    tmp_path: Path,
) -> None:
    """With ``PROWZI_RETENTION=2s`` the service deletes a finished run's checkpoints,
    telemetry and document and forgets it (404, gone from its journal) about two seconds
    after it ended; a run that takes longer than that meanwhile completes untouched."""
    service = Service(tmp_path, PROWZI_RETENTION="2s", PROWZI_TEST_DELAY="0.5")
    try:
        slow = service.start_run("seven stages of half a second")
        info = service.wait_state(slow, "completed", "failed", timeout=60)
        assert info["state"] == "completed", info
        assert info["telemetry"]["success"] is True
        assert len(info["telemetry"]["stages"]) == 7
        assert service.client.get(f"/runs/{slow}/document").status_code == 200
        deadline = time.monotonic() + 20
        while service.client.get(f"/runs/{slow}").status_code != 404:
            assert time.monotonic() < deadline, "the finished run was never swept"
            time.sleep(0.1)
        while any(left_by(tmp_path, slow).values()):
            assert time.monotonic() < deadline, left_by(tmp_path, slow)
            time.sleep(0.1)
        # The journal is written by its writer task, a moment after the run is forgotten.
        journal = tmp_path / "prowzi_service" / "runs.json"
        while slow in {run["session_id"] for run in json.loads(journal.read_text())["runs"]}:
            assert time.monotonic() < deadline, "the journal still holds the swept run"
            time.sleep(0.1)
        assert slow not in {r["session_id"] for r in service.client.get("/runs").json()["runs"]}
    finally:
        service.stop()
    assert "Traceback" not in service.log()

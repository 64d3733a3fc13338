"""Resuming over HTTP (issue 15, items 11 and 12), with real ``prowzi`` processes and real HTTP
on loopback: a session a CLI process holds is refused at once (409, naming the holder) and
never recorded as failed; a run interrupted while still queued restarts from the beginning,
with the prompt and parameters its journal kept."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_service import Service
from test_service_support import run_prowzi, subprocess_env

# --- 11: a session a CLI process holds ------------------------------------------------------


def test_resuming_a_session_a_cli_run_holds_is_a_409_at_once_and_records_nothing(
    tmp_path: Path,
) -> None:
    sid = "cli-held"
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prowzi.cli.main",
            "run",
            "held by the command line",
            "--enable-checkpoints",
            "--session-id",
            sid,
            "--output",
            "cli.md",
        ],
        cwd=tmp_path,
        env=subprocess_env(PROWZI_TEST_DELAY="0.3"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    svc = Service(tmp_path)
    try:
        svc.wait_checkpoint(sid)  # the CLI run holds the lease and has something to resume
        assert cli.poll() is None, "the CLI run ended too soon for this test"
        started = time.monotonic()
        response = svc.client.post(f"/runs/{sid}/resume")
        assert time.monotonic() - started < 5
        assert response.status_code == 409, response.text
        detail = response.json()["detail"]
        assert detail == f"session {sid} is locked by pid {cli.pid} on " + detail.split(" on ")[-1]
        # Nothing was accepted: the service reports the CLI's run, running.
        assert svc.client.get(f"/runs/{sid}").json()["state"] == "running"
        assert cli.wait(60) == 0, cli.stderr.read() if cli.stderr else ""
        info = svc.wait_state(sid, "completed", "failed", "interrupted", timeout=30)
        assert info["state"] == "completed", info
        assert info["error"] is None
        assert info["telemetry"]["success"] is True
        journal = json.loads((tmp_path / "prowzi_service" / "runs.json").read_text())
        assert journal["runs"] == []  # the service records nothing for a run it did not start
        assert "failed" not in svc.log()
        # Once the CLI is done, the session is the service's to settle: complete, nothing to do.
        assert svc.client.post(f"/runs/{sid}/resume").status_code == 409
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        assert svc.stop() in (0, -signal.SIGTERM)


# --- 12: a run interrupted while queued -----------------------------------------------------


def test_a_run_interrupted_while_queued_restarts_from_the_beginning_when_resumed(
    tmp_path: Path,
) -> None:
    first = Service(tmp_path, "--max-concurrent", "1", "--max-queue", "5", PROWZI_TEST_DELAY="0.4")
    running = first.start_run("the one running")
    response = first.client.post(
        "/runs", json={"prompt": "the one waiting", "max_results_per_query": 7}
    )
    assert response.status_code == 202, response.text
    queued = response.json()["session_id"]
    assert response.json()["state"] == "queued"
    first.wait_checkpoint(running)
    assert first.stop() in (0, -signal.SIGTERM), first.log()
    assert not list((tmp_path / "prowzi_checkpoints").glob(f"{queued}_*"))

    second = Service(tmp_path, PROWZI_TEST_DELAY="0.01")
    try:
        assert second.client.get(f"/runs/{queued}").json()["state"] == "interrupted"
        response = second.client.post(f"/runs/{queued}/resume")
        assert response.status_code == 202, response.text
        info = second.wait_state(queued, "completed", "failed")
        assert info["state"] == "completed", info
        assert info["kind"] == "run"  # from the beginning: there was nothing to resume from
        assert info["prompt"] == "the one waiting"
        assert info["telemetry"]["success"] is True
        assert info["telemetry"]["prompt"] == "the one waiting"
        assert info["telemetry"]["metadata"]["parameters"]["max_results_per_query"] == 7
        assert second.client.get(f"/runs/{queued}/document").status_code == 200
        # The one that was running resumes from its checkpoint, as before.
        assert second.client.post(f"/runs/{running}/resume").status_code == 202
        assert second.wait_state(running, "completed", "failed")["state"] == "completed"
        # A session nobody ran still has no checkpoint to resume from.
        assert second.client.post("/runs/never-ran/resume").status_code == 404
    finally:
        second.stop()


def test_a_run_the_service_left_interrupted_and_the_cli_finished_shows_completed(
    tmp_path: Path,
) -> None:
    """The journal says interrupted; a ``prowzi resume`` from the CLI finished the run since.
    The service reports what telemetry says (completed), in ``GET /runs/{id}`` and the list."""
    first = Service(tmp_path, PROWZI_TEST_DELAY="0.4")
    sid = first.start_run("finished elsewhere")
    first.wait_checkpoint(sid)
    assert first.stop() in (0, -signal.SIGTERM), first.log()

    second = Service(tmp_path, PROWZI_TEST_DELAY="0.01")
    try:
        assert second.client.get(f"/runs/{sid}").json()["state"] == "interrupted"
        resumed = run_prowzi(tmp_path, "resume", sid, PROWZI_TEST_DELAY="0.01")
        assert resumed.returncode == 0, resumed.stderr
        assert second.client.get(f"/runs/{sid}").json()["state"] == "completed"
        listed = {r["session_id"]: r["state"] for r in second.client.get("/runs").json()["runs"]}
        assert listed[sid] == "completed"
    finally:
        second.stop()

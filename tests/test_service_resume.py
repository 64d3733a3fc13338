"""Resuming over HTTP (issue 15, item 11), with real ``prowzi`` processes and real HTTP on
loopback: a session a CLI process holds is refused at once (409, naming the holder) and
never recorded as failed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_service import Service
from test_service_support import subprocess_env

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

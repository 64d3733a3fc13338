"""``prowzi serve`` against a hostile or unlucky user (issue 15), over real processes and real
HTTP on loopback: one service per state directory, an unreadable journal left as it is and a
state directory that is a file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_service import Service, free_port
from test_service_support import subprocess_env


def serve_refused(cwd: Path, *args: str) -> tuple[int, str]:
    """Run ``prowzi serve`` expecting it not to start: its exit code and its stderr."""
    process = subprocess.run(
        [sys.executable, "-m", "prowzi.cli.main", "serve", "--port", str(free_port()), *args],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode != 0, process.stderr
    return process.returncode, process.stderr


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


# --- 1: one service owns one state directory --------------------------------------------------


def test_a_second_service_on_the_same_state_directory_refuses_to_start(tmp_path: Path) -> None:
    first = Service(tmp_path, PROWZI_TEST_DELAY="0.01")
    try:
        sid = first.start_run()
        first.wait_state(sid, "completed")
        journal = tmp_path / "prowzi_service" / "runs.json"
        before = journal.read_bytes()
        code, stderr = serve_refused(tmp_path)
        assert code == 1
        line = one_line(stderr)
        assert "prowzi_service is in use by another prowzi serve" in line
        assert f"pid {first.process.pid}" in line
        # The same directory named another way is the same directory.
        code, stderr = serve_refused(tmp_path, "--state-dir", str(tmp_path / "prowzi_service"))
        assert code == 1 and "in use" in one_line(stderr)
        # The first service and its journal are untouched.
        assert journal.read_bytes() == before
        assert first.client.get(f"/runs/{sid}").json()["state"] == "completed"
        assert first.client.get("/readyz").status_code == 200
    finally:
        assert first.stop() in (0, -signal.SIGTERM)
    # The lock goes with its holder, even a killed one: the next service starts.
    second = Service(tmp_path)
    assert second.stop(signal.SIGKILL) == -signal.SIGKILL
    third = Service(tmp_path)
    try:
        assert third.client.get(f"/runs/{sid}").json()["state"] == "completed"
    finally:
        third.stop()


# --- 2: an unreadable journal is never rewritten ------------------------------------------------


def _journal_with_runs(version: object) -> bytes:
    run = {
        "session_id": "20260101-000000-0000aaaa",
        "state": "running",
        "kind": "run",
        "prompt": "keep me",
        "max_results_per_query": 15,
        "created_at": 1.0,
        "updated_at": 2.0,
    }
    return json.dumps({"version": version, "runs": [run]}).encode()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (_journal_with_runs(2), "format 2 is not this Prowzi's (1)"),
        (_journal_with_runs(1)[:40], "not JSON"),
        (b"", "not JSON"),
        (b"[]", "not a run journal"),
    ],
    ids=["newer-version", "truncated", "empty", "not-a-journal"],
)
def test_an_unreadable_journal_stops_the_start_up_and_is_left_as_it_is(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    state = tmp_path / "prowzi_service"
    state.mkdir()
    journal = state / "runs.json"
    journal.write_bytes(content)
    code, stderr = serve_refused(tmp_path)
    assert code == 1
    line = one_line(stderr)
    assert f"the run journal {journal.relative_to(tmp_path)} is unreadable" in line
    assert reason in line
    assert journal.read_bytes() == content  # never rewritten empty
    # Moved aside, the service starts afresh, and leaves the moved file alone.
    journal.rename(state / "runs.json.bad")
    svc = Service(tmp_path)
    svc.stop()
    assert (state / "runs.json.bad").read_bytes() == content


# --- 13: --state-dir must be a directory --------------------------------------------------------


def test_a_state_dir_that_is_a_file_is_a_usage_error_at_start_up(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    code, stderr = serve_refused(tmp_path, "--state-dir", "a-file")
    assert code == 2
    assert one_line(stderr) == "error: --state-dir a-file exists and is not a directory"
    code, stderr = serve_refused(tmp_path, "--state-dir", "a-file/below")
    assert code == 2
    assert "--state-dir a-file/below cannot be used" in one_line(stderr)
    assert (tmp_path / "a-file").read_text() == "not a directory"

"""``prowzi serve`` against a hostile or unlucky user (issue 15), over real processes and real
HTTP on loopback: one service per state directory, an unreadable journal left as it is, a
state directory that is a file, hostile ``Last-Event-ID`` headers, booleans posing as counts
and a chunked body past the size limit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from emulator_servers import free_port
from test_service import Service
from test_service_support import run_prowzi, subprocess_env

from prowzi.service.app import MAX_BODY_BYTES


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


# --- 6, 15, 3: requests -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, str]]:
    """A service, and a completed run in it."""
    svc = Service(tmp_path_factory.mktemp("hardening"))
    sid = svc.start_run()
    svc.wait_state(sid, "completed")
    yield svc, sid
    svc.stop()


@pytest.mark.parametrize(
    "value",
    [b"9" * 5000, b"\xb2", b"1\xb2", "\u0663".encode(), b"abc", b"-1", b"1" * 19],
    ids=["5000-digits", "latin1-superscript", "digit-and-superscript", "utf8", "abc", "neg", "19"],
)
def test_a_hostile_last_event_id_is_a_400(served: tuple[Service, str], value: bytes) -> None:
    svc, sid = served
    for path in (f"/runs/{sid}/events", "/runs/20990101-000000-deadbeef/events"):
        response = svc.client.get(path, headers={"Last-Event-ID": value})
        assert response.status_code == 400, response.text
        assert "invalid Last-Event-ID" in response.json()["detail"]


def test_a_good_last_event_id_still_resumes_the_stream(served: tuple[Service, str]) -> None:
    svc, sid = served
    messages = svc.events(sid)
    assert svc.events(sid, last_event_id=messages[-3]["id"]) == messages[-2:]
    beyond = svc.events(sid, last_event_id=10**17)
    assert [m["event"] for m in beyond] == ["end"]


@pytest.mark.parametrize("value", [True, False, "3", 3.0, 2.5, None])
def test_max_results_per_query_must_be_an_integer(
    served: tuple[Service, str], value: object
) -> None:
    svc, _ = served
    response = svc.client.post("/runs", json={"prompt": "p", "max_results_per_query": value})
    assert response.status_code == 422, response.text
    assert "max_results_per_query" in response.json()["detail"]


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_chunked_body_meets_the_same_size_limit_and_is_not_held_in_memory(
    served: tuple[Service, str],
) -> None:
    svc, _ = served
    body_mib = 64

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(body_mib):
            yield b"x" * (1 << 20)
        yield b'"}'

    before = _peak_rss_kib(svc.process.pid)
    response = svc.client.post(
        "/runs", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 413, response.text[:200]
    assert f"larger than {MAX_BODY_BYTES} bytes" in response.json()["detail"]
    grown_mib = (_peak_rss_kib(svc.process.pid) - before) / 1024
    assert grown_mib < body_mib / 4, f"peak memory grew {grown_mib:.0f} MiB"
    # The same body with a Content-Length: the same answer.
    sized = svc.client.post(
        "/runs", content=b"".join(chunks()), headers={"Content-Type": "application/json"}
    )
    assert sized.status_code == 413
    assert sized.json() == response.json()
    # Exactly at the limit, chunked, a body is read (and judged on its content), one byte
    # over, refused.
    padding = b" " * (MAX_BODY_BYTES - len(b'{"prompt": "p"}'))
    for extra, status in ((b"", 202), (b" ", 413)):
        body = b'{"prompt": "p"}' + padding + extra
        framed = svc.client.post(
            "/runs",
            content=iter([body[:10], body[10:]]),
            headers={"Content-Type": "application/json"},
        )
        assert framed.request.headers["transfer-encoding"] == "chunked"
        assert framed.status_code == status, framed.text[:200]
    # The connection and the service go on.
    assert svc.client.get("/healthz").json() == {"status": "ok"}
    with httpx.Client(base_url=svc.url) as fresh:
        assert fresh.get("/readyz").status_code == 200


def test_a_symlink_planted_among_the_documents_is_never_served(tmp_path: Path) -> None:
    """Issue 15 item 7: ``documents/leak1.md -> a secret`` answers 404, not the secret."""
    secret = tmp_path / "secret.txt"
    secret.write_text("the key is planted-secret-value\n")
    svc = Service(tmp_path)
    try:
        sid = svc.start_run()
        svc.wait_state(sid, "completed")
        documents = tmp_path / "prowzi_service" / "documents"
        assert svc.client.get(f"/runs/{sid}/document").status_code == 200
        (documents / "leak1.md").symlink_to(secret)
        leaked = svc.client.get("/runs/leak1/document")
        assert leaked.status_code == 404 and "planted-secret" not in leaked.text
        own = documents / f"{sid}.md"
        own.unlink()
        own.symlink_to(secret)  # even in place of a real run's document
        replaced = svc.client.get(f"/runs/{sid}/document")
        assert replaced.status_code == 404 and "planted-secret" not in replaced.text
    finally:
        svc.stop()


# --- 4: one out-of-range timestamp ------------------------------------------------------------


def test_an_out_of_range_timestamp_marks_one_session_corrupt_for_the_cli_and_the_service(
    tmp_path: Path,
) -> None:
    """A session file whose ``started_at`` UTC cannot hold is that session's problem only:
    ``prowzi sessions`` lists it as corrupt beside the good one, ``show`` of it is a one-line
    error, and a service that did not run it lists it, answers 409 for it and for its resume,
    and serves the good session as before."""
    first = Service(tmp_path, PROWZI_TEST_DELAY="0.01")
    try:
        good, bad = first.start_run(), first.start_run()
        first.wait_state(good, "completed")
        first.wait_state(bad, "completed")
    finally:
        first.stop()
    path = tmp_path / "prowzi_telemetry" / f"{bad}.json"
    path.write_text(
        json.dumps({**json.loads(path.read_text()), "started_at": "0001-01-01T00:00:00+14:00"})
    )

    listed = run_prowzi(tmp_path, "sessions", "--json")
    assert listed.returncode == 0, listed.stderr
    statuses = {s["session_id"]: s["status"] for s in json.loads(listed.stdout)}
    assert statuses == {good: "completed", bad: "corrupt"}
    shown = run_prowzi(tmp_path, "show", bad)
    assert shown.returncode == 1
    assert "started_at" in one_line(shown.stderr) and "out of range" in shown.stderr
    assert run_prowzi(tmp_path, "show", good).returncode == 0

    # A service on another state directory knows these sessions from telemetry only.
    second = Service(tmp_path, "--state-dir", "other_state")
    try:
        runs = second.client.get("/runs")
        assert runs.status_code == 200, runs.text
        states = {r["session_id"]: r["state"] for r in runs.json()["runs"]}
        assert states == {good: "completed", bad: "corrupt"}
        one = second.client.get(f"/runs/{bad}")
        assert one.status_code == 409 and "out of range" in one.json()["detail"], one.text
        resumed = second.client.post(f"/runs/{bad}/resume")
        assert resumed.status_code == 409, resumed.text
        assert second.client.get(f"/runs/{good}").json()["state"] == "completed"
    finally:
        second.stop()
    assert "Traceback" not in second.log()

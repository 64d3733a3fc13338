"""``prowzi serve`` over real HTTP on loopback: start, list, get, follow (SSE: replay, resume,
keep-alives, a client that goes away), cancel, resume, bad requests, the queue, and SIGTERM
with runs in flight followed by a resuming restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from emulator_servers import free_port
from test_service_support import subprocess_env, wait_until_ready

from prowzi.testing import STAGES


class Service:
    """A ``prowzi serve`` subprocess in ``cwd``; or, with ``script``, a Python process that
    runs it (``{port}`` in the script is the port to listen on)."""

    def __init__(self, cwd: Path, *args: str, script: str | None = None, **env: str) -> None:
        self.cwd = cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = cwd / f"serve-{self.port}.log"
        self._log = self.log_path.open("wb")
        command: Sequence[str] = (
            [sys.executable, "-c", script.format(port=self.port)]
            if script is not None
            else [
                sys.executable,
                "-m",
                "prowzi.cli.main",
                "serve",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                *args,
            ]
        )
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=subprocess_env(**env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=30)
        wait_until_ready(f"{self.url}/readyz", self.process, "prowzi serve", self.log_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        finally:
            self.client.close()
            self._log.close()
        return code

    def start_run(self, prompt: str = "quantum computing") -> str:
        response = self.client.post("/runs", json={"prompt": prompt})
        assert response.status_code == 202, response.text
        return str(response.json()["session_id"])

    def events(self, session_id: str, last_event_id: int | None = None) -> list[dict[str, Any]]:
        """Follow the SSE stream to its end; each message as {id, event, data}."""
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
        messages: list[dict[str, Any]] = []
        current: dict[str, Any] = {}
        with self.client.stream("GET", f"/runs/{session_id}/events", headers=headers) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if not line:
                    if current:
                        messages.append(current)
                    current = {}
                elif line.startswith("id: "):
                    current["id"] = int(line[4:])
                elif line.startswith("event: "):
                    current["event"] = line[7:]
                elif line.startswith("data: "):
                    current["data"] = json.loads(line[6:])
        return messages

    def wait_state(self, session_id: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.client.get(f"/runs/{session_id}").json()
            if info.get("state") in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"{session_id} stuck in {info.get('state')}: {info}")
            time.sleep(0.05)

    def wait_checkpoint(self, session_id: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not list((self.cwd / "prowzi_checkpoints").glob(f"{session_id}_*.json")):
            if time.monotonic() > deadline:
                raise AssertionError(f"no checkpoint for {session_id}")
            time.sleep(0.05)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = Service(tmp_path, PROWZI_TEST_DELAY="0.02", PROWZI_TEST_FLAKY_STAGE="search")
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def shared_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One service for the tests that only send requests that start nothing."""
    svc = Service(tmp_path_factory.mktemp("shared"))
    yield svc
    svc.stop()


@pytest.fixture
def slow_service(tmp_path: Path) -> Iterator[Service]:
    svc = Service(tmp_path, "--max-concurrent", "1", "--max-queue", "1", PROWZI_TEST_DELAY="0.4")
    yield svc
    svc.stop()


def test_a_run_is_accepted_listed_streamed_to_completion_and_inspected(
    service: Service,
) -> None:
    response = service.client.post("/runs", json={"prompt": "quantum computing"})
    assert response.status_code == 202
    body = response.json()
    sid = body["session_id"]
    assert response.headers["location"] == f"/runs/{sid}"
    assert body["links"]["events"] == f"/runs/{sid}/events"
    assert sid in [r["session_id"] for r in service.client.get("/runs").json()["runs"]]

    messages = service.events(sid)
    kinds = [m["event"] for m in messages]
    assert kinds[0] == "workflow_started"
    assert kinds[-2:] == ["workflow_completed", "end"]
    assert messages[-1]["data"]["state"] == "completed"
    assert [m["id"] for m in messages[:-1]] == list(range(1, len(messages)))
    completed = [m["data"]["stage"] for m in messages if m["event"] == "stage_completed"]
    assert completed == list(STAGES)
    assert "stage_retrying" in kinds  # the flaky search stage

    # A reconnecting client resumes after the last id it saw.
    tail = service.events(sid, last_event_id=messages[-3]["id"])
    assert [m["event"] for m in tail] == ["workflow_completed", "end"]

    info = service.client.get(f"/runs/{sid}").json()
    assert info["state"] == "completed"
    assert info["stages_completed"] == info["stages_total"] == 7
    assert info["telemetry"]["success"] is True
    assert info["telemetry"]["total_retries"] == 1
    listed = service.client.get("/runs", params={"state": "completed"}).json()["runs"]
    assert [r["session_id"] for r in listed] == [sid]

    document = service.client.get(f"/runs/{sid}/document")
    assert document.status_code == 200
    assert document.headers["content-type"].startswith("text/markdown")
    assert document.text.startswith("# quantum computing")
    missing = service.client.get("/runs/no-such-run/document")
    assert missing.status_code == 404 and "no document for run no-such-run" in missing.text
    assert service.client.get("/runs/..%2Fetc/document").status_code in (400, 404)


def test_cancel_stops_a_run_after_checkpointing_and_resume_finishes_it(
    slow_service: Service,
) -> None:
    svc = slow_service
    sid = svc.start_run()
    svc.wait_checkpoint(sid)
    response = svc.client.post(f"/runs/{sid}/cancel")
    assert response.status_code == 202
    messages = svc.events(sid)
    assert messages[-1]["data"]["state"] == "cancelled"
    failed = [m for m in messages if m["event"] == "workflow_failed"]
    assert failed and failed[0]["data"]["cancelled"] is True
    saved = [m["data"]["stage"] for m in messages if m["event"] == "checkpoint_saved"]
    assert saved

    assert svc.client.post(f"/runs/{sid}/cancel").status_code == 409
    response = svc.client.post(f"/runs/{sid}/resume")
    assert response.status_code == 202, response.text
    svc.wait_state(sid, "completed")
    resumed = svc.events(sid)
    skipped = [m["data"]["stage"] for m in resumed if m["event"] == "stage_skipped"]
    assert skipped[: len(saved)] == list(STAGES[: len(skipped)])
    assert set(saved) <= set(skipped)
    assert resumed[-1]["data"]["state"] == "completed"
    assert svc.client.post(f"/runs/{sid}/resume").status_code == 409  # already complete


def test_the_queue_is_bounded_and_its_depth_is_a_metric(slow_service: Service) -> None:
    svc = slow_service
    running = svc.start_run("first")
    queued = svc.start_run("second")
    assert svc.client.get(f"/runs/{queued}").json()["state"] == "queued"
    full = svc.client.post("/runs", json={"prompt": "third"})
    assert full.status_code == 429
    assert "queued" in full.json()["detail"]
    assert full.headers["retry-after"]
    ready = svc.client.get("/readyz").json()
    assert ready == {"status": "ready", "active_runs": 1, "queued_runs": 1, "event_streams": 0}
    text = svc.client.get("/metrics").text
    assert "prowzi_service_queue_depth 1.0" in text
    assert "prowzi_service_active_runs 1.0" in text
    # Cancelling a queued run removes it from the queue without running it.
    assert svc.client.post(f"/runs/{queued}/cancel").status_code == 202
    assert svc.client.get(f"/runs/{queued}").json()["state"] == "cancelled"
    assert "prowzi_service_queue_depth 0.0" in svc.client.get("/metrics").text
    svc.client.post(f"/runs/{running}/cancel")


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("post", "/runs", {"prompt": ""}, 422, "prompt"),
        ("post", "/runs", {"prompt": "   "}, 422, "blank"),
        ("post", "/runs", {}, 422, "prompt: Field required"),
        (
            "post",
            "/runs",
            {"prompt": "p", "max_results_per_query": 0},
            422,
            "max_results_per_query",
        ),
        (
            "post",
            "/runs",
            {"prompt": "p", "document_path": "/etc/passwd"},
            422,
            "document_path: Extra inputs are not permitted",
        ),
        ("post", "/runs", {"prompt": "p", "corpus_dir": "/"}, 422, "corpus_dir"),
        ("post", "/runs", {"prompt": "x" * 10_001}, 422, "prompt"),
        ("post", "/runs", {"prompt": "x" * 70_000}, 413, "larger than"),
        ("get", "/runs/bad_id!", None, 400, "invalid session id"),
        ("get", "/runs/%2E%2E", None, 400, "invalid session id"),
        ("get", "/runs/%2E%2E%2Fetc/events", None, 404, "Not Found"),
        ("get", "/runs/20990101-000000-deadbeef", None, 404, "no run or session"),
        ("get", "/runs/20990101-000000-deadbeef/events", None, 404, "no run or session"),
        ("post", "/runs/20990101-000000-deadbeef/resume", None, 404, "no checkpoint"),
        ("post", "/runs/20990101-000000-deadbeef/cancel", None, 404, "no run"),
        ("post", "/runs/a..b/cancel", None, 400, "invalid session id"),
        ("get", "/runs?limit=0", None, 422, "limit"),
        ("get", "/runs?state=bogus", None, 422, "state"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_clear_message(
    shared_service: Service, method: str, path: str, body: Any, status: int, message: str
) -> None:
    response = shared_service.client.request(method, path, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_a_body_that_is_not_json_is_a_422(shared_service: Service) -> None:
    response = shared_service.client.post(
        "/runs", content=b"prompt=x", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert "invalid request" in response.json()["detail"]


def test_openapi_health_and_metrics(shared_service: Service) -> None:
    service = shared_service
    schema = service.client.get("/openapi.json").json()
    for path in (
        "/runs",
        "/runs/{session_id}",
        "/runs/{session_id}/events",
        "/runs/{session_id}/resume",
        "/runs/{session_id}/cancel",
        "/metrics",
        "/healthz",
        "/readyz",
    ):
        assert path in schema["paths"], path
    props = schema["components"]["schemas"]["RunRequest"]["properties"]
    # no path anywhere, and no API key: the model's key is the server's own setting
    assert set(props) == {"prompt", "max_results_per_query", "model", "max_cost_usd", "max_tokens"}
    assert service.client.get("/healthz").json() == {"status": "ok"}
    response = service.client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def _killed_after_its_last_checkpoint(cwd: Path, session_id: str) -> None:
    """A session whose process saved its last checkpoint and died before it logged its end:
    run to completion in a child process, then its record cut back to before the end."""
    script = (
        "import asyncio\n"
        "from pathlib import Path\n"
        "from prowzi.config import ProwziConfig\n"
        "from prowzi.testing import noop_agents\n"
        "from prowzi.workflows import ProwziOrchestrator\n"
        "from prowzi.tracing import NullTracer\n"
        "config = ProwziConfig(enable_checkpointing=True,\n"
        "    checkpoint_dir=Path('prowzi_checkpoints'), telemetry_dir=Path('prowzi_telemetry'))\n"
        "orch = ProwziOrchestrator(config=config, agents=noop_agents(), tracer=NullTracer())\n"
        f"asyncio.run(orch.run_research('x', session_id={session_id!r}))\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=cwd, env=subprocess_env(), check=True)
    from prowzi.workflows.telemetry import SessionRecorder, TelemetryCollector

    telemetry = TelemetryCollector(cwd / "prowzi_telemetry")
    log = telemetry.event_log_path(session_id)
    lines = log.read_bytes().splitlines(keepends=True)
    assert b"workflow_completed" in lines[-1]
    log.write_bytes(b"".join(lines[:-1]))
    stale = SessionRecorder.from_events(session_id, telemetry.read_events(session_id)).metrics
    assert stale is not None
    telemetry.session_path(session_id).write_text(json.dumps(stale.to_dict(), default=str))


def test_an_interrupted_session_with_every_checkpoint_is_settled_by_a_resume(
    tmp_path: Path,
) -> None:
    _killed_after_its_last_checkpoint(tmp_path, "almost")
    svc = Service(tmp_path)
    try:
        assert svc.client.get("/runs/almost").json()["state"] == "interrupted"
        response = svc.client.post("/runs/almost/resume")
        assert response.status_code == 202, response.text
        info = svc.wait_state("almost", "completed")
        assert info["telemetry"]["success"] is True
        assert svc.client.post("/runs/almost/resume").status_code == 409  # settled: complete
    finally:
        svc.stop()


def test_an_interrupted_session_whose_lock_a_resume_holds_is_reported_running(
    tmp_path: Path,
) -> None:
    """A resume elsewhere (the CLI) has taken the session's lock and not logged yet: the
    service reports it running, in a run's state and in the list and its filter alike."""
    from prowzi.workflows.checkpoint import CheckpointManager

    _killed_after_its_last_checkpoint(tmp_path, "taken")
    svc = Service(tmp_path)
    try:
        assert svc.client.get("/runs/taken").json()["state"] == "interrupted"
        with CheckpointManager(tmp_path / "prowzi_checkpoints").session_lock("taken"):
            assert svc.client.get("/runs/taken").json()["state"] == "running"
            listed = svc.client.get("/runs", params={"state": "running"}).json()["runs"]
            assert [run["session_id"] for run in listed] == ["taken"]
            assert svc.client.get("/runs", params={"state": "interrupted"}).json()["runs"] == []
        assert svc.client.get("/runs/taken").json()["state"] == "interrupted"
    finally:
        svc.stop()


def test_sigterm_checkpoints_runs_in_flight_and_a_restart_resumes_them(
    tmp_path: Path,
) -> None:
    first = Service(tmp_path, "--max-concurrent", "2", PROWZI_TEST_DELAY="0.4")
    sids = [first.start_run("alpha"), first.start_run("beta")]
    for sid in sids:
        first.wait_checkpoint(sid)
    followed: list[dict[str, Any]] = []
    follower = threading.Thread(target=lambda: followed.extend(first.events(sids[0])))
    follower.start()
    time.sleep(0.2)
    started = time.monotonic()
    code = first.stop(signal.SIGTERM)
    assert code in (0, -signal.SIGTERM), first.log()
    assert time.monotonic() - started < 20
    # An open event stream does not hold the shutdown up: it ends, saying why.
    follower.join(10)
    assert followed[-1] == {
        "event": "end",
        "data": {"session_id": sids[0], "state": "interrupted", "error": None},
    }
    assert "checkpoint_saved" in [m["event"] for m in followed]
    journal = json.loads((tmp_path / "prowzi_service" / "runs.json").read_text())
    assert {r["session_id"]: r["state"] for r in journal["runs"]} == dict.fromkeys(
        sids, "interrupted"
    )
    saved = {
        sid: sorted(p.name for p in (tmp_path / "prowzi_checkpoints").glob(f"{sid}_*.pkl"))
        for sid in sids
    }
    assert all(saved.values()), saved

    # A plain restart lists them as interrupted and does not touch them...
    second = Service(tmp_path, PROWZI_TEST_DELAY="0.01")
    for sid in sids:
        assert second.client.get(f"/runs/{sid}").json()["state"] == "interrupted"
    assert second.stop() in (0, -signal.SIGTERM)

    # ...one with --resume-interrupted resumes them to completion from their checkpoints.
    third = Service(tmp_path, "--resume-interrupted", PROWZI_TEST_DELAY="0.01")
    try:
        for sid in sids:
            info = third.wait_state(sid, "completed")
            assert info["kind"] == "resume"
            assert info["telemetry"]["success"] is True
            events = third.events(sid)
            assert "stage_skipped" in [m["event"] for m in events]
    finally:
        third.stop()


def test_a_service_finds_the_sessions_another_one_put_in_the_telemetry_store(
    tmp_path: Path,
) -> None:
    shared = f"file://{tmp_path / 'telemetry-store'}"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Service(tmp_path / "a", PROWZI_TELEMETRY_URL=shared)
    try:
        sid = first.start_run()
        first.wait_state(sid, "completed")
    finally:
        first.stop()
    second = Service(tmp_path / "b", PROWZI_TELEMETRY_URL=shared)
    try:
        assert not (tmp_path / "b" / "prowzi_telemetry" / f"{sid}.json").exists()
        info = second.client.get(f"/runs/{sid}")
        assert info.status_code == 200, info.text
        assert info.json()["state"] == "completed"
        listed = second.client.get("/runs").json()
        assert sid in json.dumps(listed)
    finally:
        second.stop()


@pytest.mark.parametrize("backend", ["s3_store", "azure_store"])
def test_the_service_checkpoints_to_an_object_store_and_resumes_from_it(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    from prowzi.workflows.checkpoint import CheckpointManager

    store = request.getfixturevalue(backend)  # sets the store's credentials in the environment
    svc = Service(tmp_path, PROWZI_CHECKPOINT_URL=store.url, PROWZI_TEST_DELAY="0.2")
    try:
        sid = svc.start_run()
        deadline = time.monotonic() + 30
        while not [b for b in store.list(f"{sid}_") if b.name.endswith(".pkl")]:
            assert time.monotonic() < deadline, "no checkpoint in the store"
            time.sleep(0.02)
        assert svc.client.post(f"/runs/{sid}/cancel").status_code == 202
        svc.wait_state(sid, "cancelled")
        saved = CheckpointManager(store=store).latest(sid)
        assert saved is not None
        assert not (tmp_path / "prowzi_checkpoints").exists()  # nothing local
        assert svc.client.post(f"/runs/{sid}/resume").status_code == 202
        svc.wait_state(sid, "completed")
    finally:
        svc.stop()
    manager = CheckpointManager(store=store)
    manager.verify_chain(sid)
    assert manager.latest(sid).completed_stages == list(STAGES)  # type: ignore[union-attr]


def test_a_run_this_process_did_not_execute_is_replayed_from_its_log_and_resumable(
    tmp_path: Path,
) -> None:
    first = Service(tmp_path)
    try:
        sid = first.start_run()
        first.wait_state(sid, "completed")
        live = first.events(sid)
    finally:
        first.stop()
    second = Service(tmp_path)  # its journal holds no unfinished run: sid is not a record
    try:
        replayed = second.events(sid)
        assert [m["event"] for m in replayed] == [m["event"] for m in live[:-1]] + ["end"]
        assert [m["id"] for m in replayed[:-1]] == list(range(1, len(replayed)))
        assert replayed[-1] == {"event": "end", "data": {"state": "replayed"}}
        tail = second.events(sid, last_event_id=replayed[-3]["id"])
        assert tail == replayed[-2:]
        assert second.client.get("/readyz").json()["event_streams"] == 0
    finally:
        second.stop()


def _open_streams(service: Service) -> int:
    return int(service.client.get("/readyz").json()["event_streams"])


def test_a_client_that_goes_away_mid_stream_is_noticed_while_the_run_goes_on(
    slow_service: Service,
) -> None:
    svc = slow_service
    sid = svc.start_run()
    assert _open_streams(svc) == 0
    with (
        httpx.Client(base_url=svc.url, timeout=30) as client,
        client.stream("GET", f"/runs/{sid}/events") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        assert next(lines) == "id: 1"
        assert next(lines) == "event: workflow_started"
        assert _open_streams(svc) == 1
    # The connection is closed mid-run: the server cancels the stream's generator.
    deadline = time.monotonic() + 10
    while _open_streams(svc) != 0:
        assert time.monotonic() < deadline, "the server still streams to a client that left"
        time.sleep(0.02)
    assert svc.client.get(f"/runs/{sid}").json()["state"] == "running"
    # The run was not disturbed, and another client can still follow it to its end.
    messages = svc.events(sid)
    assert messages[0]["event"] == "workflow_started"
    assert messages[-1]["data"]["state"] == "completed"
    assert _open_streams(svc) == 0


KEEPALIVE_SECONDS = 0.25
SERVE_WITH_KEEPALIVE = (
    "from pathlib import Path\n"
    "from prowzi.config import get_config\n"
    "from prowzi.service.app import ServiceSettings\n"
    "from prowzi.service.server import serve\n"
    f"settings = ServiceSettings(max_concurrent=1, keepalive_seconds={KEEPALIVE_SECONDS})\n"
    "serve(get_config(), settings, port={port}, log_level='warning')\n"
)


def test_an_idle_stream_gets_keepalive_comments_at_the_configured_interval(
    tmp_path: Path,
) -> None:
    svc = Service(tmp_path, script=SERVE_WITH_KEEPALIVE, PROWZI_TEST_DELAY="0.5")
    try:
        running = svc.start_run("first")
        queued = svc.start_run("second")  # waits for the slot: its stream is idle
        arrivals: list[tuple[float, str]] = []
        with (
            httpx.Client(base_url=svc.url, timeout=30) as client,
            client.stream("GET", f"/runs/{queued}/events") as response,
        ):
            assert response.status_code == 200
            opened = time.monotonic()
            for line in response.iter_lines():
                if line:
                    arrivals.append((time.monotonic() - opened, line))
                if time.monotonic() - opened > 8 * KEEPALIVE_SECONDS:
                    break
        assert svc.client.get(f"/runs/{queued}").json()["state"] == "queued"
        assert {line for _, line in arrivals} == {": keepalive"}, arrivals
        times = [t for t, _ in arrivals]
        assert len(times) >= 6, times
        gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
        assert all(KEEPALIVE_SECONDS * 0.6 < gap < KEEPALIVE_SECONDS * 2.5 for gap in gaps), gaps
        for sid in (queued, running):
            assert svc.client.post(f"/runs/{sid}/cancel").status_code == 202
    finally:
        svc.stop()

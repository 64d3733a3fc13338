"""Issue 15 item 17: replaying a large event log over SSE (a session this service did not run)
streams it a bounded chunk at a time, off the event loop: under several concurrent replays of
a ~58 MB log, ``/healthz`` keeps answering quickly, the service's memory grows by a bounded
amount, and every replay gets every event, in order, with its ids and the end message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from test_service import Service
from test_service_support import subprocess_env

from prowzi import events as ev
from prowzi.workflows.eventlog import HEADER_KIND, LOG_FORMAT_VERSION

# Latency assertions: run alone, after the parallel run (scripts/test).
pytestmark = pytest.mark.timing

SID = "20260101-000000-bigl0g00"
BULK = 150_000  # stage_completed records of ~390 bytes: a log of ~58 MB
REPLAYS = 5
PAD = "p" * 180

# A replay client in its own process (so its parsing does not slow this process's /healthz
# probe): it checks the stream as it arrives and prints what it saw, holding none of it.
CLIENT = r"""
import json, sys, httpx

url, sid, first_id = sys.argv[1], sys.argv[2], int(sys.argv[3])
expected_id, bulk_seen, kinds, end, size = first_id, 0, {}, None, 0
with httpx.Client(base_url=url, timeout=60) as client:
    with client.stream("GET", f"/runs/{sid}/events",
                       headers={"Last-Event-ID": str(first_id - 1)}) as response:
        assert response.status_code == 200, response.read()
        message_id, kind = None, None
        for line in response.iter_lines():
            size += len(line) + 1
            if line.startswith("id: "):
                message_id = int(line[4:])
                assert message_id == expected_id, (message_id, expected_id)
                expected_id += 1
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                kinds[kind] = kinds.get(kind, 0) + 1
                if kind == "stage_completed":
                    n = data["details"]["n"]
                    assert n == bulk_seen, (n, bulk_seen)
                    bulk_seen += 1
                elif kind == "end":
                    assert message_id is None or end is None
                    end = data
            elif not line:
                message_id = kind = None
print(json.dumps({"last_id": expected_id - 1, "bulk": bulk_seen, "kinds": kinds,
                  "end": end, "bytes": size}))
"""


def write_large_log(telemetry_dir: Path) -> int:
    """A finished session's log: a header, a run's start, BULK numbered stage_completed
    records, its completion, and a partial last line (cut by a crash). Returns its size."""
    events_dir = telemetry_dir / "events"
    events_dir.mkdir(parents=True)
    t0 = 1_767_225_600.0
    head = [
        {"event": HEADER_KIND, "v": LOG_FORMAT_VERSION, "pid": 1, "host": "elsewhere"},
        ev.WorkflowStarted(
            session_id=SID,
            timestamp=t0,
            prompt="a long run",
            parameters={"prompt": "a long run", "max_results_per_query": 15},
            stages=["search"],
        ).as_record(),
        ev.StageStarted(session_id=SID, timestamp=t0, stage="search", attempt=1).as_record(),
    ]
    record = ev.StageCompleted(
        session_id=SID,
        timestamp=t0,
        stage="search",
        attempt=1,
        duration_seconds=0.5,
        details={"n": 0, "pad": PAD},
    ).as_record()
    path = events_dir / f"{SID}.jsonl"
    with path.open("wb") as handle:
        handle.write(b"".join(orjson.dumps(r) + b"\n" for r in head))
        batch = []
        for n in range(BULK):
            record["details"] = {"n": n, "pad": PAD}
            record["timestamp"] = t0 + n / 1000
            batch.append(orjson.dumps(record) + b"\n")
            if len(batch) == 10_000:
                handle.write(b"".join(batch))
                batch.clear()
        handle.write(b"".join(batch))
        done = ev.WorkflowCompleted(
            session_id=SID, timestamp=t0 + BULK, duration_seconds=float(BULK)
        ).as_record()
        handle.write(orjson.dumps(done) + b"\n")
        handle.write(b'{"event": "stage_started", "session_id": "' + SID.encode())
    return path.stat().st_size


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def test_concurrent_replays_of_a_large_log_are_streamed_off_the_loop_in_bounded_memory(
    tmp_path: Path,
) -> None:
    size = write_large_log(tmp_path / "prowzi_telemetry")
    assert size > 50_000_000
    svc = Service(tmp_path)
    pid = svc.process.pid
    try:
        # a small replay first (the tail: Last-Event-ID near the end) loads what a replay
        # imports, so the baseline below is the service at rest, ready to replay
        tail = svc.events(SID, last_event_id=BULK + 1)
        assert [m["event"] for m in tail] == ["stage_completed", "workflow_completed", "end"]
        assert [m.get("id") for m in tail] == [BULK + 2, BULK + 3, None]
        assert tail[0]["data"]["details"]["n"] == BULK - 1
        assert tail[-1] == {"event": "end", "data": {"state": "replayed"}}
        baseline = memory_kib(pid)["VmRSS"]

        health: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=svc.url, timeout=30) as client:
                while not stop.is_set():
                    started = time.perf_counter()
                    response = client.get("/healthz")
                    health.append(time.perf_counter() - started)
                    assert response.status_code == 200
                    time.sleep(0.02)

        rss: list[int] = []

        def sample() -> None:
            while not stop.is_set():
                rss.append(memory_kib(pid)["VmRSS"])
                time.sleep(0.05)

        threads = [threading.Thread(target=probe), threading.Thread(target=sample)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        clients = [
            subprocess.Popen(
                [sys.executable, "-c", CLIENT, svc.url, SID, "1"],
                env=subprocess_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                # the clients parse at a lower priority: on a small machine their parsing
                # must not take the CPU from the service whose latency is measured
                preexec_fn=lambda: os.nice(10),
            )
            for _ in range(REPLAYS)
        ]
        try:
            results = [client.communicate(timeout=120) for client in clients]
        finally:
            for client in clients:
                if client.poll() is None:
                    client.kill()
            stop.set()
            for thread in threads:
                thread.join()
        elapsed = time.monotonic() - started
        peak = memory_kib(pid)["VmHWM"]
        growth_mb = (peak - baseline) / 1024
        worst = max(health)
        print(
            f"\n{REPLAYS} replays of a {size / 1e6:.1f} MB log in {elapsed:.1f} s; /healthz "
            f"{len(health)} probes, worst {worst * 1000:.0f} ms, median "
            f"{sorted(health)[len(health) // 2] * 1000:.1f} ms; RSS {baseline / 1024:.1f} MB "
            f"at rest, peak {peak / 1024:.1f} MB (+{growth_mb:.1f} MB); slowest probes (ms) "
            f"{[round(t * 1000) for t in sorted(health)[-5:]]}"
        )
        for client, (out, err) in zip(clients, results, strict=True):
            assert client.returncode == 0, err.decode()
            seen = json.loads(out)
            # every event (the header and the partial last line are not events), in order
            assert seen["kinds"] == {
                "workflow_started": 1,
                "stage_started": 1,
                "stage_completed": BULK,
                "workflow_completed": 1,
                "end": 1,
            }
            assert seen["bulk"] == BULK
            assert seen["last_id"] == BULK + 3
            assert seen["end"] == {"state": "replayed"}
        assert len(health) >= 20
        assert worst < 0.1, f"/healthz took {worst * 1000:.0f} ms during the replays"
        assert growth_mb < 50, f"the service grew by {growth_mb:.0f} MB replaying"
        assert svc.client.get("/readyz").json()["event_streams"] == 0
    finally:
        svc.stop()


def _sse(text: str) -> list[dict[str, Any]]:
    messages = []
    for block in text.split("\n\n"):
        message: dict[str, Any] = {}
        for line in block.splitlines():
            field, _, value = line.partition(": ")
            if field == "id":
                message["id"] = int(value)
            elif field == "event":
                message["event"] = value
            elif field == "data":
                message["data"] = json.loads(value)
        if message:
            messages.append(message)
    return messages


@pytest.mark.parametrize("chunk", [16, 100, 1000, 1 << 17])
def test_a_replay_read_in_small_chunks_keeps_ids_resumes_and_reports_a_corrupt_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Whatever the chunk size: ids count the events, Last-Event-ID resumes after one, a
    partial last line is ignored; a mistyped line in the first chunk is a 409 (the response
    has not begun), one further on ends the stream with an ``end`` saying so."""
    from fastapi.testclient import TestClient
    from telemetry_events import DOC_SESSION, doc_example_run

    from prowzi.config import get_config
    from prowzi.service import app as service_app
    from prowzi.service.app import ServiceSettings, create_app
    from prowzi.workflows.telemetry import TelemetryCollector

    monkeypatch.setattr(service_app, "_REPLAY_CHUNK", chunk)
    monkeypatch.chdir(tmp_path)
    config = get_config(telemetry_dir=tmp_path / "telemetry")
    collector = TelemetryCollector(config.telemetry_dir, background=False, fsync=False)
    run = doc_example_run()
    for event in run.events:
        collector.handle(event)
    collector.close()
    log = config.telemetry_dir / "events" / f"{DOC_SESSION}.jsonl"
    whole = log.read_text()
    kinds = [e.kind for e in run.events]
    app = create_app(config, ServiceSettings(state_dir=tmp_path / "state"))
    with TestClient(app) as client:
        url = f"/runs/{DOC_SESSION}/events"
        log.write_text(whole + '{"event": "stage_st')
        replayed = _sse(client.get(url).text)
        assert [m.get("event") for m in replayed] == [*kinds, "end"]
        assert [m.get("id") for m in replayed] == [*range(1, len(kinds) + 1), None]
        assert replayed[-1]["data"] == {"state": "replayed"}
        tail = _sse(client.get(url, headers={"Last-Event-ID": "5"}).text)
        assert tail == replayed[5:]

        lines = whole.splitlines()
        bad = json.loads(lines[-2])
        bad["timestamp"] = "soon"
        log.write_text("\n".join([*lines[:-2], json.dumps(bad), lines[-1]]) + "\n")
        response = client.get(url)
        if chunk >= len(whole):  # read before the response began
            assert response.status_code == 409, response.text
            assert f"line {len(lines) - 1} is not a valid event" in response.text
        else:
            assert response.status_code == 200
            messages = _sse(response.text)
            assert [m.get("event") for m in messages] == [*kinds[:-2], "end"]
            assert messages[-1]["data"]["state"] == "unreadable"
            assert f"line {len(lines) - 1} is not a valid event" in messages[-1]["data"]["error"]
        assert client.get("/readyz").json()["event_streams"] == 0

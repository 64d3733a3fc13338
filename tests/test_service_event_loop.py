"""Nothing blocks the service's event loop: with a checkpoint store whose every put takes
200 ms, ``/healthz`` and another run's Server-Sent Events keep answering within 50 ms.

The service runs in its own process on loopback (so that this process's threads, which
measure, do not share its interpreter lock), built by :func:`serve`: the real app, whose
orchestrator (through the app's ``orchestrator_factory``) checkpoints into a real
:class:`~prowzi.storage.local.LocalBlobStore` whose ``put`` first sleeps 200 ms. Several runs
checkpoint after each stage (a slow put each, plus their lease's) while

- a thread asks ``/healthz`` every 10 ms and times each answer, and
- a "ticker" run, whose first stage fails transiently every ~10 ms (100 retries, a 5-10 ms
  backoff), is followed over SSE: its ``stage_retrying`` events are timed as they arrive.

Both are measured from the ticker's first retry until the first of the other runs has made
its last save: while they save, not while they start or end (a run's end still writes its
document and final telemetry snapshot on the loop, in ``prowzi.workflows``). A save on the
loop stalls both for 200 ms and more (checked by making the saves synchronous: both
assertions then fail). A second test does the same for the service's run journal.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from emulator_servers import free_port
from prometheus_client import CollectorRegistry
from test_service_support import subprocess_env, wait_until_ready

from prowzi.agents.base import Agent, StageContext
from prowzi.config import ProwziConfig
from prowzi.errors import TransientError
from prowzi.observability.metrics import ProwziMetrics
from prowzi.service.journal import JournalEntry, RunJournal
from prowzi.service.runs import RunManager
from prowzi.storage.local import LocalBlobStore
from prowzi.testing import STAGES, noop_result

# Latency assertions: run alone, after the parallel run (scripts/test).
pytestmark = pytest.mark.timing

PUT_SECONDS = 0.2
LIMIT_SECONDS = 0.05
TICKS = 100
SAVERS = 3


# --- the service's side (in the child process) -------------------------------------------------


class SlowPutStore(LocalBlobStore):
    """A real local store, each of whose puts (checkpoints and leases) takes 200 ms more."""

    def put(self, name: str, data: bytes, **kwargs: Any) -> str:
        time.sleep(PUT_SECONDS)
        return super().put(name, data, **kwargs)


def agent(config: ProwziConfig) -> Agent:
    """The ticker run fails its first stage transiently (a retry event each time); the
    others do each stage in 100 ms, and are saved after each."""

    async def run(ctx: StageContext) -> Any:
        if ctx.params.prompt == "ticker":
            if ctx.stage == STAGES[0] and ctx.attempt <= TICKS:
                raise TransientError(f"tick {ctx.attempt}")
        else:
            await asyncio.sleep(0.1)
        return noop_result(ctx.stage, ctx)

    return run


def serve(port: int) -> None:
    """The service on 127.0.0.1:``port``, checkpointing into a :class:`SlowPutStore`."""
    import uvicorn

    from prowzi.config import get_config
    from prowzi.events import EventSink
    from prowzi.service.app import ServiceSettings, create_app
    from prowzi.tracing import NullTracer
    from prowzi.workflows.checkpoint import CheckpointManager
    from prowzi.workflows.orchestrator import ProwziOrchestrator

    config = get_config(enable_checkpointing=True)
    store = SlowPutStore(config.checkpoint_dir)

    def factory(sink: EventSink, metrics: ProwziMetrics) -> ProwziOrchestrator:
        # As the app's default factory, but for the checkpoint store.
        return ProwziOrchestrator(
            config=config,
            sinks=[metrics, sink],
            tracer=NullTracer(),
            on_sink_error=metrics.sink_error,
            checkpoint_manager=CheckpointManager(config.checkpoint_dir, store=store),
        )

    settings = ServiceSettings(max_concurrent=SAVERS + 1, state_dir=Path("prowzi_service"))
    app = create_app(config, settings, orchestrator_factory=factory)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")


# --- the test's side ---------------------------------------------------------------------------


def start_service(cwd: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = cwd / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", f"import test_service_event_loop as t; t.serve({port})"],
            cwd=cwd,
            env=subprocess_env(
                PROWZI_AGENTS=",".join(f"{s}=test_service_event_loop:agent" for s in STAGES),
                PROWZI_MAX_RETRIES=str(TICKS),
                PROWZI_RETRY_BACKOFF_BASE="0.005",
                PROWZI_RETRY_BACKOFF_MAX="0.01",
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wait_until_ready(f"{url}/readyz", process, "the service", log_path)
    return process, url, log_path


def poll_health(url: str, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    """(wall time, seconds to answer) of a /healthz every 10 ms until ``stop``."""
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            at = time.time()
            started = time.perf_counter()
            response = client.get("/healthz")
            elapsed = time.perf_counter() - started
            assert response.json() == {"status": "ok"}
            samples.append((at, elapsed))
            time.sleep(0.01)


def follow(url: str, session_id: str, arrivals: list[tuple[float, str, dict[str, Any]]]) -> None:
    """Each SSE message of the run as (arrival time, event, data), to the stream's end."""
    with (
        httpx.Client(base_url=url, timeout=30) as client,
        client.stream("GET", f"/runs/{session_id}/events") as response,
    ):
        assert response.status_code == 200
        kind = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                arrivals.append((time.perf_counter(), kind, json.loads(line[6:])))


def events(url: str, session_id: str) -> list[dict[str, Any]]:
    arrivals: list[tuple[float, str, dict[str, Any]]] = []
    follow(url, session_id, arrivals)
    return [{"event": kind, **data} for _, kind, data in arrivals]


def test_slow_checkpoint_puts_do_not_delay_health_checks_or_another_runs_events(
    tmp_path: Path,
) -> None:
    process, url, log_path = start_service(tmp_path)
    health: list[tuple[float, float]] = []
    stop = threading.Event()
    checker = threading.Thread(target=poll_health, args=(url, stop, health))
    # This process's collector, after the tests before, can pause its threads for 100 ms:
    # not while they measure the service's answers.
    gc.collect()
    gc.disable()
    try:
        checker.start()
        with httpx.Client(base_url=url, timeout=30) as client:
            savers = []
            for i in range(SAVERS):
                response = client.post("/runs", json={"prompt": f"saver {i}"})
                assert response.status_code == 202, response.text
                savers.append(response.json()["session_id"])
            response = client.post("/runs", json={"prompt": "ticker"})
            assert response.status_code == 202, response.text
            ticker = response.json()["session_id"]
        arrivals: list[tuple[float, str, dict[str, Any]]] = []
        follow(url, ticker, arrivals)
        saver_events = {sid: events(url, sid) for sid in savers}
    finally:
        stop.set()
        if checker.is_alive():
            checker.join(30)
        gc.enable()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log = log_path.read_text(errors="replace")

    # Every run finished; the savers saved after every stage, each save taking >= 200 ms.
    assert arrivals[-1][1:] == ("end", {"session_id": ticker, "state": "completed", "error": None})
    saves: list[tuple[float, float]] = []  # (start, end), wall time
    last_saves = []
    for sid, messages in saver_events.items():
        assert messages[-1]["event"] == "end" and messages[-1]["state"] == "completed", log
        saved = [m for m in messages if m["event"] == "checkpoint_saved"]
        assert [m["stage"] for m in saved] == list(STAGES), (sid, messages)
        assert all(m["duration_seconds"] >= PUT_SECONDS for m in saved)
        saves += [(m["timestamp"] - m["duration_seconds"], m["timestamp"]) for m in saved]
        last_saves.append(saved[-1]["timestamp"])

    # The window measured: the ticker's retries until one of the other runs has made its
    # last save (so none of them is starting or finishing meanwhile: only saving).
    ticks = [(at, data["timestamp"]) for at, kind, data in arrivals if kind == "stage_retrying"]
    assert len(ticks) == TICKS
    first = ticks[0][1]
    end = min(ticks[-1][1], *last_saves)
    window = [at for at, stamp in ticks if stamp <= end]
    overlapping = [s for s in saves if s[0] < end and s[1] > first]
    assert len(window) >= 10 and overlapping, (first, end, sorted(saves))

    # SSE: the ticker's events kept arriving every ~10 ms (their arrival here, not their
    # timestamps there), however many 200 ms puts were under way meanwhile.
    gaps = [b - a for a, b in itertools.pairwise(window)]
    print(
        f"\nSSE: {len(window)} events in {window[-1] - window[0]:.2f} s beside "
        f"{len(overlapping)} saves of >= {PUT_SECONDS * 1000:.0f} ms; gaps: largest "
        f"{max(gaps) * 1000:.1f} ms, median {sorted(gaps)[len(gaps) // 2] * 1000:.1f} ms"
    )
    # On failure, the gaps between the events' timestamps around the worst one too: regular
    # ones there mean the service sent them in time and this process stalled.
    worst = gaps.index(max(gaps))
    stamped = [b - a for a, b in itertools.pairwise([stamp for _, stamp in ticks])]
    assert max(gaps) < LIMIT_SECONDS, (sorted(gaps)[-5:], stamped[max(0, worst - 2) : worst + 3])

    # /healthz answered within 50 ms throughout the window.
    during = sorted(elapsed for at, elapsed in health if first <= at <= end)
    overall = sorted(elapsed for _, elapsed in health)
    print(
        f"/healthz: {len(during)} answers while saving: largest {during[-1] * 1000:.1f} ms, "
        f"median {during[len(during) // 2] * 1000:.1f} ms (over the whole test, starts "
        f"and ends of runs included: {len(overall)}, largest {overall[-1] * 1000:.1f} ms)"
    )
    assert during[-1] < LIMIT_SECONDS, during[-5:]

    # And the window was long, busy with saves throughout: most of the ticks, many saves.
    assert len(window) >= TICKS * 3 // 4, (len(window), first, end)
    assert len(overlapping) >= SAVERS * 2, (first, end, sorted(saves))
    assert len(during) >= 50


class SlowJournal(RunJournal):
    """The run journal on a disk where every write takes 200 ms."""

    def write(self, entries: list[JournalEntry]) -> None:
        time.sleep(PUT_SECONDS)
        super().write(entries)


def test_slow_journal_writes_do_not_block_the_loop_and_the_last_state_is_written(
    tmp_path: Path,
) -> None:
    """The run manager's journal is written off the loop (each state change of eight runs
    is one 200 ms write away), a request that waits for it sees its change on disk, and the
    states after shutdown are all there."""
    from test_service_runs import FakeOrchestrator

    journal = SlowJournal(tmp_path / "state", fsync=False)

    async def main() -> float:
        manager = RunManager(
            cast("Any", lambda sink: FakeOrchestrator(sink, 0.05)),
            journal,
            ProwziMetrics(CollectorRegistry()),
            max_concurrent=4,
        )
        await manager.start(resume_interrupted=False)
        largest = 0.0
        ticking = True

        async def tick() -> None:
            nonlocal largest
            last = time.perf_counter()
            while ticking:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                largest = max(largest, now - last)
                last = now

        ticker = asyncio.create_task(tick())
        for i in range(8):
            manager.submit(f"s{i}", "p", 15)
        await manager.journal_written()  # what POST /runs waits for before its 202
        on_disk = {e.session_id: e.state for e in journal.load().values()}
        assert sorted(on_disk) == [f"s{i}" for i in range(8)]
        while manager.active or manager.queue_depth:
            await asyncio.sleep(0.01)
        ticking = False
        await ticker
        await manager.close()
        return largest

    started = time.perf_counter()
    gc.collect()
    gc.disable()  # the collector's pauses would count as the loop's: not what is measured
    try:
        largest = asyncio.run(main())
    finally:
        gc.enable()
    print(f"\nloop: largest gap {largest * 1000:.1f} ms beside journal writes of 200 ms")
    assert largest < LIMIT_SECONDS
    assert {e.state for e in journal.load().values()} == {"completed"}
    assert time.perf_counter() - started > 2 * PUT_SECONDS  # the writes were slow indeed

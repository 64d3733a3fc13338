"""Webhook benchmarks (issue 18).

1. The cost a subscription adds to a run of seven no-op stages, per event: on the run's path
   (the time the run spends in the webhook sink: building the payload and the outbox write
   it waits for; target: median under 0.5 ms), and over the whole run (runs with and
   without a subscription, alternated, (with - without) / events: this adds the delivery
   threads' share of the CPU). With the outbox's fsyncs on (``PROWZI_CHECKPOINT_FSYNC=true``,
   the default) and off, beside the floor of one durable put on this disk; and with the
   outbox on tmpfs (``/dev/shm``), which leaves the sink's own cost without the disk's.
2. Delivery throughput: 1,000 deliveries queued over 10 sessions, sent by the worker to a
   receiver on loopback; deliveries per second and the latency of each POST.

The receiver is another process (``http.server``, answering 200), so its work does not share
this process's interpreter lock. Run: python benchmarks/bench_webhooks.py
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stats import report

from prowzi.config import ProwziConfig
from prowzi.testing import noop_agents
from prowzi.tracing import NullTracer
from prowzi.workflows.orchestrator import ProwziOrchestrator

PROMPT = "Write a research paper on quantum computing"
SECRET = "whsec_" + base64.b64encode(b"benchmark-webhook-secret-32bytes").decode()
EVENTS_PER_RUN = 9  # run.started, 7 x stage.completed, run.completed


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _serve(port: int) -> None:
    ThreadingHTTPServer(("127.0.0.1", port), _Handler).serve_forever()


def _receiver() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, __file__, "--receiver", str(port)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return process, f"http://127.0.0.1:{port}/hook"


def _config(work: Path, url: str | None, fsync: bool) -> ProwziConfig:
    settings: dict[str, object] = {}
    if url:
        settings = {
            "webhook_url": url,
            "webhook_secret": SECRET,
            "webhook_allow_private": True,
            "webhook_outbox": str(work / "outbox"),
        }
    return ProwziConfig(
        enable_checkpointing=False,
        enable_telemetry=False,
        checkpoint_dir=work / "checkpoints",
        checkpoint_fsync=fsync,
        **settings,
    )


class _Timed:
    """Wraps a sink: the time the run spends in it per event (handing it over and awaiting
    what it returns, which is what the run waits for)."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.name = sink.name
        self.times: list[float] = []

    async def handle(self, event: Any) -> None:
        t0 = time.perf_counter()
        result = self.sink.handle(event)
        if result is not None:
            await result
            self.times.append(time.perf_counter() - t0)


async def sink_cost(work: Path, url: str, fsync: bool, runs: int, delivering: bool) -> list[float]:
    """The webhook sink's own time per event on the run's path, with the delivery worker
    sending at the same time (its threads compete for the interpreter lock) or stopped."""
    from prowzi.webhooks import webhooks_for
    from prowzi.webhooks.sink import WebhookSink

    webhooks = webhooks_for(_config(work, url, fsync))
    if not delivering:
        webhooks.deliverer.stop()
    timed = _Timed(WebhookSink(webhooks))
    orchestrator = ProwziOrchestrator(
        config=_config(work, None, fsync),
        agents=noop_agents(),
        tracer=NullTracer(),
        sinks=[timed],
    )
    for _ in range(20):  # warm-up
        await orchestrator.run_research(PROMPT)
    timed.times.clear()
    for _ in range(runs):
        await orchestrator.run_research(PROMPT)
    return timed.times


async def run_cost(work: Path, url: str, fsync: bool, runs: int) -> list[float]:
    """What a subscription adds to a whole run, per event: runs with and without one,
    alternated; (with - without) / events. Includes the delivery threads' share of the CPU."""
    plain = ProwziOrchestrator(
        config=_config(work, None, fsync), agents=noop_agents(), tracer=NullTracer()
    )
    hooked = ProwziOrchestrator(
        config=_config(work, url, fsync), agents=noop_agents(), tracer=NullTracer()
    )
    for _ in range(20):  # warm-up
        await plain.run_research(PROMPT)
        await hooked.run_research(PROMPT)
    costs = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await plain.run_research(PROMPT)
        t1 = time.perf_counter()
        await hooked.run_research(PROMPT)
        t2 = time.perf_counter()
        costs.append(((t2 - t1) - (t1 - t0)) / EVENTS_PER_RUN)
    return costs


def durable_put_floor(work: Path, count: int) -> list[float]:
    from prowzi.storage.local import LocalBlobStore

    store = LocalBlobStore(work / "floor")
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        store.put(f"outbox/x/y/{i:08d}.json", b"x" * 600, create_only=True)
        times.append(time.perf_counter() - t0)
    return times


def throughput(work: Path, url: str, fsync: bool, count: int) -> tuple[float, list[float]]:
    from prowzi.webhooks import release, webhooks_for
    from prowzi.webhooks.outbox import LOG

    config = _config(work, url, fsync)
    webhooks = webhooks_for(config)
    (endpoint,) = webhooks.subscriptions()
    body = '{"version":1,"type":"stage.completed","data":{"session_id":"s"}}'
    webhooks.deliverer.stop()  # queue everything first, then time the sending alone
    release(webhooks)
    for i in range(count):
        webhooks.outbox.enqueue(endpoint, f"session-{i % 10}", "stage.completed", body)
    webhooks = webhooks_for(config)
    names = webhooks.outbox.pending_names()
    t0 = time.perf_counter()
    left = webhooks.deliverer.drain(names, 600)
    took = time.perf_counter() - t0
    assert not left, f"{len(left)} not delivered"
    latencies = [
        float(r["latency_seconds"])
        for r in webhooks.outbox.records()
        if r.get("latency_seconds") is not None and r["name"].startswith(LOG)
    ]
    release(webhooks)
    return count / took, latencies


def main() -> None:
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    receiver, url = _receiver()
    try:
        from prowzi.webhooks import close_all

        for fsync in (True, False):
            label = f"outbox fsync {'on' if fsync else 'off'}"
            for delivering in (False, True):
                with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
                    costs = asyncio.run(sink_cost(Path(tmp), url, fsync, 300, delivering))
                    close_all()
                report(
                    f"per event on the run's path, {label}, "
                    + ("delivering meanwhile" if delivering else "worker idle"),
                    costs,
                    "ms",
                    "< 0.5 ms",
                )
            with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
                costs = asyncio.run(run_cost(Path(tmp), url, fsync, 300))
                close_all()
            report(f"per event, whole run with vs without, {label}", costs, "ms")
        with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
            report(
                "floor: one durable (fsynced) put on this disk", durable_put_floor(Path(tmp), 200)
            )
        if Path("/dev/shm").is_dir():  # memory, no disk: what the sink costs besides the put
            with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
                costs = asyncio.run(sink_cost(Path(tmp), url, True, 300, False))
                close_all()
            report("per event on the run's path, outbox on tmpfs, worker idle", costs, "ms")
            with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
                report("floor: one put on tmpfs", durable_put_floor(Path(tmp), 200))
        for fsync in (True, False):
            with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
                rate, latencies = throughput(Path(tmp), url, fsync, 1000)
                label = f"outbox fsync {'on' if fsync else 'off'}"
                print(f"{'delivery throughput to loopback, ' + label:<58} {rate:9.0f} deliveries/s")
                report(f"latency of one POST to loopback, {label}", latencies)
    finally:
        receiver.terminate()
        receiver.wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--receiver"]:
        _serve(int(sys.argv[2]))
    else:
        main()

"""Real ``prowzi worker`` processes on a real ``redis-server`` for the worker tests and
benchmarks (no pytest here): a :class:`Fleet` shares one broker database, one checkpoint store,
one telemetry directory and one output directory, as workers on several machines share a
broker, an object store and a volume."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from prowzi.config import ProwziConfig, get_config

TESTS = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"


def wait_for(
    what: str, check: Callable[[], Any], timeout: float = 30.0, every: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    metrics_port: int

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker {self.name} exited:\n{self.text()[-3000:]}")
        return b" ready." in self.log.read_bytes()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def metrics(self) -> dict[str, float]:
        """Its /metrics, as ``{'name{labels}': value}``."""
        import urllib.request

        url = f"http://{LOOPBACK}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
        values = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Fleet:
    root: Path
    broker_url: str
    stage_delay: float = 0.0
    lease_ttl: float = 0.5
    run_time_limit: float = 6.0
    extra_env: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def telemetry(self) -> Path:
        return self.root / "telemetry"

    @property
    def documents(self) -> Path:
        return self.root / "documents"

    def env(self) -> dict[str, str]:
        from test_service_support import agents_setting

        env = {k: v for k, v in os.environ.items() if not k.startswith(("PROWZI_", "OTEL_"))}
        env.update(
            PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            PROWZI_BROKER_URL=self.broker_url,
            PROWZI_AGENTS=agents_setting(),
            PROWZI_TEST_DELAY=str(self.stage_delay),
            PROWZI_CHECKPOINT_DIR=str(self.checkpoints),
            PROWZI_TELEMETRY_DIR=str(self.telemetry),
            PROWZI_OUTPUT_DIR=str(self.documents),
            PROWZI_LEASE_TTL_SECONDS=str(self.lease_ttl),
            PROWZI_RUN_TIME_LIMIT_SECONDS=str(self.run_time_limit),
            PROWZI_CHECKPOINT_FSYNC="false",
            XDG_CACHE_HOME=str(self.root / "cache"),
        )
        env.update(self.extra_env)
        return env

    def config(self) -> ProwziConfig:
        """The settings the workers run with, for this process's submissions and reads."""
        env = self.env()
        return get_config(
            broker_url=self.broker_url,
            checkpoint_dir=self.checkpoints,
            telemetry_dir=self.telemetry,
            output_dir=self.documents,
            lease_ttl_seconds=self.lease_ttl,
            run_time_limit_seconds=self.run_time_limit,
            checkpoint_fsync=False,
            agents=env["PROWZI_AGENTS"],
        )

    def start(self, count: int = 1, *, concurrency: int = 2, wait: bool = True) -> list[Worker]:
        from emulator_servers import free_port

        for directory in (self.checkpoints, self.telemetry, self.documents):
            directory.mkdir(parents=True, exist_ok=True)
        started = []
        for _ in range(count):
            name = f"w{len(self.workers) + 1}"
            log = self.root / f"{name}.log"
            port = free_port()
            argv = [
                sys.executable, "-m", "prowzi.cli.main", "worker",
                "--concurrency", str(concurrency), "--loglevel", "INFO",
                "--hostname", f"{name}@%h", "--metrics-port", str(port),
            ]  # fmt: skip
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    argv, env=self.env(), cwd=self.root, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            worker = Worker(name, proc, log, port)
            self.workers.append(worker)
            started.append(worker)
        if wait:
            for worker in started:
                wait_for(f"worker {worker.name} to be ready", worker.ready, timeout=60)
        return started

    def stop(self) -> None:
        """After a test: kill what is left (a graceful stop is what some tests test)."""
        for worker in self.workers:
            if worker.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()
                worker.proc.wait(10)

    # --- reading what the workers did ----------------------------------------------------

    def events(self, session_id: str) -> list[dict[str, Any]]:
        path = self.telemetry / "events" / f"{session_id}.jsonl"
        if not path.exists():
            return []
        lines = path.read_bytes().splitlines()
        return [orjson.loads(line) for line in lines if line.strip()]

    def completions(self, session_id: str) -> int:
        return sum(1 for e in self.events(session_id) if e.get("event") == "workflow_completed")

    def checkpointed(self, session_id: str) -> list[str]:
        return sorted(
            p.name.removeprefix(f"{session_id}_").removesuffix(".pkl")
            for p in self.checkpoints.glob(f"{session_id}_*.pkl")
        )

    def done(self, session_ids: list[str]) -> bool:
        return all(self.completions(s) >= 1 for s in session_ids)

    def total(self, metric: str) -> float:
        """``metric`` summed over every live worker's /metrics."""
        return sum(w.metrics().get(metric, 0.0) for w in self.workers if w.proc.poll() is None)

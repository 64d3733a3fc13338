"""Celery workers on Redis (issue 19): scheduling overhead, throughput per worker process, and
a simulated fleet.

Real ``redis-server`` and real ``prowzi worker`` processes on loopback (tests/workers.py and
tests/emulator_servers.py, no pytest needed), no-op agents (tests/test_service_support.py):

1. **scheduling overhead**: from the moment a client submits a run to the moment its first
   stage starts on an idle worker (the ``stage_started`` event's timestamp; one machine, one
   clock). Target: median under 50 ms.
2. **throughput** with 1, 2 and 4 worker processes (``--concurrency 1`` each), no-op agents
   with no delay: runs completed per second, and the CPU seconds the workers spent per run.
3. **simulated fleet**: worker processes with several slots each and an artificial per-stage
   delay (a model call's wait): how throughput grows with slots until something else limits
   it; the report names that limit from what was measured (CPU per run against this
   machine's cores, against the broker's own CPU).

    python benchmarks/bench_workers.py            # the figures in the issue's note
    python benchmarks/bench_workers.py --quick    # fewer runs, for a smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stats import report  # noqa: E402
from emulator_servers import start_redis  # type: ignore[import-not-found]  # noqa: E402
from workers import Fleet, wait_for  # type: ignore[import-not-found]  # noqa: E402

from prowzi.workers.app import submit  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def redis_cpu(server: Any) -> float:
    return cpu_seconds(server.proc.pid)


def first_stage_start(fleet: Fleet, sid: str) -> float | None:
    for event in fleet.events(sid):
        if event.get("event") == "stage_started":
            return float(event["timestamp"])
    return None


def bench_overhead(root: Path, url: str, runs: int) -> float:
    fleet = Fleet(root=root / "overhead", broker_url=url + "/1", lease_ttl=5.0, run_time_limit=60)
    fleet.root.mkdir()
    try:
        fleet.start(1, concurrency=1)
        config = fleet.config()
        submit(config, "Write a warm-up report")  # the first run loads agents and caches
        time.sleep(1.0)
        samples = []
        for i in range(runs):
            submitted = time.time()
            sid = submit(config, f"Write report {i}")
            started = wait_for("the first stage", lambda s=sid: first_stage_start(fleet, s))
            samples.append(started - submitted)
            wait_for("the run to end", lambda s=sid: fleet.done([s]))
        return report(
            "submit -> first stage start (idle worker, no-op agents)",
            samples,
            target="median < 50 ms",
        )
    finally:
        fleet.stop()


def measure(
    fleet: Fleet, runs: int, redis: Any, label: str, *, slots: int
) -> tuple[float, float, float]:
    """Submit ``runs`` at once; (runs per second, worker CPU s per run, redis CPU s per run)."""
    config = fleet.config()
    pids = [w.proc.pid for w in fleet.workers]
    cpu0 = sum(cpu_seconds(p) for p in pids)
    redis0 = redis_cpu(redis)
    t0 = time.perf_counter()
    sessions = [submit(config, f"Write report {label} {i}") for i in range(runs)]
    # A run's document is written just before it completes: one directory listing per poll
    # keeps this process's own CPU out of the figures.
    wait_for(
        f"{runs} runs",
        lambda: len(os.listdir(fleet.documents)) >= runs,
        timeout=600,
        every=0.05,
    )
    elapsed = time.perf_counter() - t0
    wait_for("every completion to be logged", lambda: fleet.done(sessions), timeout=60)
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    redis_used = redis_cpu(redis) - redis0
    rate = runs / elapsed
    print(
        f"{label:<40} slots {slots:3d}: {rate:7.2f} runs/s  "
        f"worker CPU {cpu / runs * 1e3:6.1f} ms/run  "
        f"redis CPU {redis_used / runs * 1e3:5.2f} ms/run"
    )
    return rate, cpu / runs, redis_used / runs


def bench_throughput(root: Path, url: str, redis: Any, runs: int, db: int) -> None:
    print("\nthroughput, no-op agents without delay, --concurrency 1 per process")
    for processes in (1, 2, 4):
        fleet = Fleet(
            root=root / f"throughput-{processes}",
            broker_url=f"{url}/{db + processes}",
            lease_ttl=5.0,
            run_time_limit=120,
        )
        fleet.root.mkdir()
        try:
            fleet.start(processes, concurrency=1)
            measure(fleet, runs, redis, f"{processes} worker process(es)", slots=processes)
        finally:
            fleet.stop()


def bench_fleet(root: Path, url: str, redis: Any, delay: float, runs: int, quick: bool) -> None:
    print(f"\nsimulated fleet: no-op agents waiting {delay:g} s per stage, 4 slots per process")
    ideal_run = 7 * delay
    cores = os.cpu_count() or 1
    sizes = (1, 2, 4) if quick else (1, 2, 4, 8, 12)
    for index, processes in enumerate(sizes):
        fleet = Fleet(
            root=root / f"fleet-{processes}",
            broker_url=f"{url}/{10 + index}",
            stage_delay=delay,
            lease_ttl=5.0,
            run_time_limit=300,
        )
        fleet.root.mkdir()
        try:
            fleet.start(processes, concurrency=4)
            slots = processes * 4
            _, cpu, redis_cost = measure(
                fleet, max(runs, slots * 3), redis, f"{processes} process(es)", slots=slots
            )
            print(
                f"{'':<40}   waiting alone would allow {slots / ideal_run:7.2f} runs/s; "
                f"this machine's {cores} cores allow {cores / cpu:6.2f} runs/s; "
                f"redis alone {1 / redis_cost if redis_cost else float('inf'):8.0f} runs/s"
            )
        finally:
            fleet.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke test)")
    args = parser.parse_args()
    runs = 10 if args.quick else 40
    with tempfile.TemporaryDirectory(prefix="prowzi-bench-workers-") as tmp:
        root = Path(tmp)
        (root / "redis").mkdir()
        with start_redis(root / "redis") as redis:
            url = redis.url.rsplit("/", 1)[0]
            bench_overhead(root, url, 10 if args.quick else 30)
            bench_throughput(root, url, redis, runs, db=2)
            bench_fleet(root, url, redis, 0.1, runs, args.quick)


if __name__ == "__main__":
    main()

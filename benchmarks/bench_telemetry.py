"""Telemetry benchmarks: per-event sink overhead, ``prowzi sessions`` over many sessions, and
``prowzi --help`` cold start.

    /work/venv/bin/python benchmarks/bench_telemetry.py [--runs 400] [--sessions 10000]

Targets (issues 4 and 14): sink median <= 50 us per event (p95 reported); ``prowzi sessions``
over 10,000 sessions <= 300 ms as a whole command, settings read by pydantic-settings included;
``prowzi --help`` <= 300 ms. Each figure is the median (and p95) of separate measurements; the
process timings start a fresh interpreter each time, so they include Python's own start-up.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from _stats import percentile

from prowzi import events as ev
from prowzi.testing import STAGES
from prowzi.workflows.telemetry import TelemetryCollector

PROWZI = [sys.executable, "-m", "prowzi.cli.main"]


def report(name: str, seconds: Sequence[float], unit: str, target: float | None = None) -> bool:
    scale = {"us": 1e6, "ms": 1e3}[unit]
    median = statistics.median(seconds) * scale
    p95 = percentile(seconds, 95) * scale
    verdict = ""
    ok = True
    if target is not None:
        ok = median <= target
        verdict = f"  target median <= {target:g} {unit}: {'PASS' if ok else 'FAIL'}"
    print(
        f"{name:<46} n={len(seconds):<6} median={median:9.1f} {unit}  "
        f"p95={p95:9.1f} {unit}  max={max(seconds) * scale:9.1f} {unit}{verdict}"
    )
    return ok


def run_events(
    session_id: str, t0: float, prompt: str = "Write a research paper"
) -> list[ev.Event]:
    """The events of one successful run, as the orchestrator emits them with checkpoints on."""
    events: list[ev.Event] = [
        ev.WorkflowStarted(
            session_id=session_id,
            timestamp=t0,
            prompt=prompt,
            parameters={"prompt": prompt, "max_results_per_query": 15},
            stages=STAGES,
            trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        )
    ]
    now = t0
    for stage in STAGES:
        events.append(ev.StageStarted(session_id=session_id, timestamp=now, stage=stage))
        now += 1.5
        events.append(
            ev.StageCompleted(
                session_id=session_id,
                timestamp=now,
                stage=stage,
                duration_seconds=1.5,
                details={"sources_count": 48, "queries": 9},
            )
        )
        events.append(
            ev.CheckpointSaved(
                session_id=session_id,
                timestamp=now,
                stage=stage,
                checkpoint_id=f"{session_id}_{stage}",
                path=f"prowzi_checkpoints/{session_id}_{stage}.pkl",
                size_bytes=40_000,
                duration_seconds=0.05,
            )
        )
    events.append(
        ev.WorkflowCompleted(
            session_id=session_id, timestamp=now, duration_seconds=now - t0, document_path="p.md"
        )
    )
    return events


def bench_sink(directory: Path, runs: int, pace: float) -> dict[str, list[float]]:
    """Time ``collector.handle(event)`` for every event of ``runs`` runs, by event kind.

    ``pace`` seconds pass between events (a real stage takes seconds; 0 is back-to-back).
    """
    collector = TelemetryCollector(directory)  # production settings: background, fsync
    timings: dict[str, list[float]] = {}
    clock = time.perf_counter
    for i in range(runs):
        for event in run_events(f"bench-{i:05d}", 1_700_000_000.0 + i * 60):
            start = clock()
            collector.handle(event)
            elapsed = clock() - start
            timings.setdefault(event.kind, []).append(elapsed)
            if pace:
                time.sleep(pace)
    collector.close()
    if collector.errors:
        raise SystemExit(f"the collector counted {collector.errors} errors: {collector.last_error}")
    return timings


def bench_floor(directory: Path, runs: int) -> list[float]:
    """What any sink that logs an event must do, paced like the paced sink run: the machine's
    floor for one event after a millisecond of idling (cold caches, a busy CPU)."""
    import orjson

    timings = []
    clock = time.perf_counter
    fd = os.open(directory / "floor.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for i in range(runs):
            for event in run_events(f"floor-{i:05d}", 1_700_000_000.0):
                start = clock()
                os.write(fd, orjson.dumps(event.as_record()) + b"\n")
                timings.append(clock() - start)
                time.sleep(0.001)
    finally:
        os.close(fd)
    return timings


def make_sessions(directory: Path, count: int) -> None:
    collector = TelemetryCollector(directory, background=False, fsync=False)
    for i in range(count):
        for event in run_events(f"s-{i:06d}", 1_600_000_000.0 + i * 60, prompt=f"topic {i}"):
            if not isinstance(event, ev.StageStarted | ev.CheckpointSaved):
                collector.handle(event)
    collector.close()


def time_command(
    argv: list[str], env: dict[str, str], repeat: int, cwd: Path, *, warm_up: bool = True
) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU (user + system) seconds of ``repeat`` runs of a fresh process.

    CPU time is reported beside wall time because it barely moves when other processes load
    the machine, while wall time does.
    """
    wall, cpu = [], []
    if warm_up:
        # fills the OS page cache and writes bytecode, as on an installed system
        subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
        wall.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return wall, cpu


def report_command(
    name: str,
    argv: list[str],
    env: dict[str, str],
    repeat: int,
    cwd: Path,
    target: float | None = None,
) -> bool:
    wall, cpu = time_command(argv, env, repeat, cwd)
    ok = report(f"  {name}", wall, "ms", target=target)
    report("    (CPU time, user + system)", cpu, "ms")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400, help="runs fed to the sink")
    parser.add_argument("--sessions", type=int, default=10_000, help="sessions to list")
    parser.add_argument("--repeat", type=int, default=20, help="process timings per command")
    parser.add_argument(
        "--sessions-dir", help="keep the stored sessions here (reused by the next run)"
    )
    args = parser.parse_args()
    ok = True
    root = Path(tempfile.mkdtemp(prefix="prowzi-bench-"))
    os.environ["XDG_CACHE_HOME"] = str(root / "cache")  # the session index, a cache of ours
    try:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, files under {root}\n")
        print("Sink overhead per event (TelemetryCollector.handle, background snapshots, fsync on)")
        timings = bench_sink(root / "sink", args.runs, 0.0)
        every = [t for values in timings.values() for t in values]
        ok &= report("  all events, back-to-back", every, "us", target=50)
        for kind in ("stage_started", "stage_completed", "checkpoint_saved"):
            report(f"    {kind}", timings[kind], "us")
        report("    workflow_started (creates the log file)", timings["workflow_started"], "us")
        report("    workflow_completed (final snapshot, sync)", timings["workflow_completed"], "us")
        runs = max(1, args.runs // 10)
        paced = bench_sink(root / "sink-paced", runs, 0.001)
        report(
            "  all events, 1 ms apart (cold caches)", [t for v in paced.values() for t in v], "us"
        )
        report(
            "    floor: as_record + orjson + os.write, 1 ms apart", bench_floor(root, runs), "us"
        )

        print(f"\n`prowzi sessions` over {args.sessions:,} stored sessions (whole command)")
        print(f"  load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        telemetry = Path(args.sessions_dir) if args.sessions_dir else root / "telemetry"
        if not (telemetry / f"s-{args.sessions - 1:06d}.json").exists():
            start = time.perf_counter()
            make_sessions(telemetry, args.sessions)
            print(f"  (recorded {args.sessions:,} sessions in {time.perf_counter() - start:.1f}s)")
        env = {**os.environ, "PROWZI_TELEMETRY_DIR": str(telemetry), "COLUMNS": "120"}
        # an installed package has its bytecode compiled; a development shell that sets
        # PYTHONDONTWRITEBYTECODE would otherwise make every run compile every module again
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        index = TelemetryCollector(telemetry).index_path  # the SQLite session index
        for suffix in ("", "-wal", "-shm"):
            Path(f"{index}{suffix}").unlink(missing_ok=True)
        subprocess.run([*PROWZI, "--help"], env=env, check=True, stdout=subprocess.DEVNULL)
        cold, _ = time_command([*PROWZI, "sessions"], env, 1, root, warm_up=False)
        print(f"  first run without an index (reads every file, writes it): {cold[0] * 1e3:.0f} ms")
        collector = TelemetryCollector(telemetry)
        listing = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            collector.list_sessions()
            listing.append(time.perf_counter() - start)
        report("  TelemetryCollector.list_sessions() in-process", listing, "ms")
        ok &= report_command("prowzi sessions", [*PROWZI, "sessions"], env, args.repeat, root, 300)
        report_command(
            "prowzi sessions --limit 10000 --json",
            [*PROWZI, "sessions", "--limit", "10000", "--json"],
            env,
            args.repeat,
            root,
        )
        report_command(
            "floor: start, import typer + config, get_config()",
            [sys.executable, "-c", "import typer, prowzi.config; prowzi.config.get_config()"],
            env,
            args.repeat,
            root,
        )
        report_command(
            "floor: start, import typer, read what sessions reads",
            [
                sys.executable,
                "-c",
                "import typer, prowzi.config as c; c.TelemetryLocation.load(); "
                "c.CheckpointLocation.load()",
            ],
            env,
            args.repeat,
            root,
        )

        print("\n`prowzi --help` cold start (a fresh interpreter each time)")
        ok &= report_command("prowzi --help", [*PROWZI, "--help"], env, args.repeat, root, 300)
        report_command(
            "floor: python -c pass", [sys.executable, "-c", "pass"], env, args.repeat, root
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\nall targets met" if ok else "\nSOME TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Engine benchmarks (issue 2).

1. Orchestration overhead: seven no-op agents, checkpoints and telemetry off, tracing off.
   Per-stage cost = run duration / 7. Target: median at most 0.2 ms per stage.
2. The offline end-to-end run on the sample corpus, as `prowzi run` does it in-process
   (index warm), and the whole command in a fresh process (index cold and warm).

Run: python benchmarks/bench_engine.py
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stats import report

from prowzi.config import ProwziConfig
from prowzi.testing import noop_agents
from prowzi.tracing import NullTracer
from prowzi.workflows.orchestrator import ProwziOrchestrator

PROMPT = "Write a research paper on quantum computing"


async def overhead(runs: int) -> list[float]:
    config = ProwziConfig(enable_checkpointing=False, enable_telemetry=False)
    orch = ProwziOrchestrator(config=config, agents=noop_agents(), tracer=NullTracer())
    for _ in range(50):  # warm-up
        await orch.run_research(PROMPT)
    per_stage = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await orch.run_research(PROMPT)
        per_stage.append((time.perf_counter() - t0) / 7)
    return per_stage


async def end_to_end(runs: int, workdir: Path) -> list[float]:
    config = ProwziConfig(
        enable_checkpointing=False, enable_telemetry=False, index_dir=workdir / "index"
    )
    orch = ProwziOrchestrator(config=config, tracer=NullTracer())
    await orch.run_research(PROMPT)  # builds the index once
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await orch.run_research(PROMPT)
        times.append(time.perf_counter() - t0)
    return times


def command(runs: int, workdir: Path, cold: bool) -> list[float]:
    prowzi = str(Path(sys.executable).parent / "prowzi")
    times = []
    for i in range(runs):
        if cold:
            shutil.rmtree(workdir / "index", ignore_errors=True)
        env = {**os.environ, "PROWZI_INDEX_DIR": str(workdir / "index")}
        t0 = time.perf_counter()
        subprocess.run(
            [prowzi, "run", PROMPT, "--output", str(workdir / f"doc{i}.md")],
            cwd=workdir,
            env=env,
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    per_stage = asyncio.run(overhead(2000))
    report("orchestration overhead per stage (7 no-op agents)", per_stage, "ms", "median <= 0.2 ms")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report(
            "end-to-end run, sample corpus, in-process, warm index",
            asyncio.run(end_to_end(20, work)),
            "ms",
        )
        report("`prowzi run` whole command, cold index", command(5, work, cold=True), "s", "< 10 s")
        report(
            "`prowzi run` whole command, warm index", command(5, work, cold=False), "s", "< 10 s"
        )


if __name__ == "__main__":
    main()

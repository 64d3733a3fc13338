"""Seven no-op stages end to end with checkpoints on: Prowzi beside LangGraph (issue 3).

Prowzi: ``ProwziOrchestrator`` with the seven no-op agents of :mod:`prowzi.testing`,
checkpointing every stage (durable: fsync on), telemetry and tracing off.
LangGraph: a seven-node ``StateGraph`` whose nodes each write a small value, compiled with
``SqliteSaver`` (WAL, synchronous=FULL: durable), invoked with ``durability="sync"`` (each step's
checkpoint is written before the next step, as Prowzi does) and, for reference, with
LangGraph's default ``"async"`` durability.

Both write to a scratch directory under the current directory (a user's checkpoints live
beside their project; file creation in /tmp costs far more on some machines).
Runs alternate between the two, so load on the machine weighs on both alike.
Target: the Prowzi run no slower than LangGraph's.

Run: python benchmarks/bench_run_vs_langgraph.py [--runs N]   (needs: pip install -e ".[bench]")
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stats import report
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph

from prowzi.config import ProwziConfig
from prowzi.testing import STAGES, noop_agents
from prowzi.tracing import NullTracer
from prowzi.workflows.orchestrator import ProwziOrchestrator

PROMPT = "Write a research paper on quantum computing"


class GraphState(TypedDict, total=False):
    intent: dict[str, Any]
    planning: dict[str, Any]
    search: dict[str, Any]
    verification: dict[str, Any]
    writing: dict[str, Any]
    evaluation: dict[str, Any]
    turnitin: dict[str, Any]


def build_graph(db: Path) -> Any:
    builder = StateGraph(GraphState)
    previous = START
    for stage in STAGES:

        def node(state: GraphState, stage: str = stage) -> dict[str, Any]:
            return {stage: {"stage": stage, "ok": True}}

        builder.add_node(stage, node)
        builder.add_edge(previous, stage)
        previous = stage
    builder.add_edge(previous, END)
    conn = sqlite3.connect(db, check_same_thread=False)
    conn.execute("PRAGMA synchronous=FULL")
    return builder.compile(checkpointer=SqliteSaver(conn))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix=".bench-run-", dir=Path.cwd()))
    try:
        config = ProwziConfig(
            enable_checkpointing=True,
            checkpoint_dir=scratch / "prowzi",
            enable_telemetry=False,
            checkpoint_fsync=True,
        )
        orchestrator = ProwziOrchestrator(config=config, agents=noop_agents(), tracer=NullTracer())
        graph = build_graph(scratch / "langgraph.sqlite")
        loop = asyncio.new_event_loop()
        prowzi_times: list[float] = []
        lg_sync: list[float] = []
        lg_async: list[float] = []
        for i in range(args.runs + 10):
            t0 = time.perf_counter()
            loop.run_until_complete(orchestrator.run_research(PROMPT, session_id=f"run-{i}"))
            t1 = time.perf_counter()
            graph.invoke({}, {"configurable": {"thread_id": f"sync-{i}"}}, durability="sync")
            t2 = time.perf_counter()
            graph.invoke({}, {"configurable": {"thread_id": f"async-{i}"}})
            t3 = time.perf_counter()
            if i >= 10:  # warm-up
                prowzi_times.append(t1 - t0)
                lg_sync.append(t2 - t1)
                lg_async.append(t3 - t2)
        loop.close()
        print(f"seven no-op stages, checkpoint after each, durable; {args.runs} runs each")
        p = report("Prowzi run (7 checkpoints, fsync on)", prowzi_times, "ms")
        s = report("LangGraph 7-node graph, SqliteSaver, durability=sync", lg_sync, "ms")
        a = report("LangGraph 7-node graph, SqliteSaver, default (async)", lg_async, "ms")
        print(f"ratio Prowzi / LangGraph sync : {p / s:.2f}  (target <= 1)")
        print(f"ratio Prowzi / LangGraph async: {p / a:.2f}")
        ckpts = sum(1 for _ in (scratch / "prowzi").glob("*.pkl"))
        print(
            f"(Prowzi wrote {ckpts} checkpoints; median per checkpoint "
            f"{statistics.median(prowzi_times) / 7 * 1e3:.3f} ms including the stage loop)"
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

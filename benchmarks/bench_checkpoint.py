"""Checkpoint save/load/list benchmark, side by side with LangGraph's SqliteSaver.

Run: ``python benchmarks/bench_checkpoint.py [--iterations N] [--sessions N] [--dir PATH]``

Both sides are durable: Prowzi with fsync on (file fdatasync, rename, directory fsync),
SqliteSaver in its own setup (WAL, synchronous=FULL: an fsync per commit). Both write a new
checkpoint per iteration and read back the latest. The state is a realistic ~100 KB
:class:`WorkflowState` built from the result models; LangGraph gets the same data as plain
dicts in ``channel_values`` (what its serializer handles natively).

Targets (issue 3): save median <= 1.0 ms and no slower than SqliteSaver.put; load with
verification median <= 0.3 ms; list_checkpoints over 10,000 sessions <= 50 ms.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prowzi.agents import models as m
from prowzi.agents.base import RunParameters
from prowzi.workflows.checkpoint import CheckpointManager

STAGES = ("intent", "planning", "search", "verification", "writing", "evaluation", "turnitin")
_TEXT = (
    "quantum error correction surface code logical qubit decoherence fidelity topological "
    "superconducting transmon entanglement gate threshold fault tolerant algorithm variational "
    "eigensolver annealing photonic trapped ion benchmark noise model syndrome decoder lattice "
    "the of and a in to is for with that on by as are from this be at which"
)
WORDS = _TEXT.split()


def _sentence(r: random.Random, n: int = 16) -> str:
    return " ".join(r.choice(WORDS) for _ in range(n)).capitalize() + "."


def _paragraph(r: random.Random, k: int = 5) -> str:
    return " ".join(_sentence(r) for _ in range(k))


def realistic_state(seed: int = 7, n_sources: int = 24) -> m.WorkflowState:
    """A full run's state: 24 sources with abstracts and text, a six-section draft..."""
    r = random.Random(seed)
    intent = m.IntentAnalysis(
        prompt="Write a research paper on quantum computing",
        document_type="research_paper",
        field="physics",
        topic="quantum computing",
        keywords=["quantum", "qubit", "error correction", "fault tolerance"],
    )
    plan = m.ResearchPlan(
        title="Quantum Computing: Error Correction and the Road to Fault Tolerance",
        sections=[
            m.PlannedSection(
                title=f"Section {i}: {_sentence(r, 4)}",
                purpose=_sentence(r),
                queries=[_sentence(r, 4) for _ in range(3)],
            )
            for i in range(6)
        ],
    )
    sources = [
        m.Source(
            source_id=f"corpus/papers/doc{i:03d}.md",
            title=_sentence(r, 8),
            authors=["A. Researcher", "B. Scientist", "C. Engineer"],
            year=2000 + i % 24,
            url=f"https://example.org/papers/{i}",
            doi=f"10.1000/example.{i}",
            abstract=_paragraph(r, 2),
            text=_paragraph(r, 6),
            score=round(r.random() * 10, 3),
            queries=[_sentence(r, 4)],
        )
        for i in range(n_sources)
    ]
    search = m.SearchAgentResult(
        queries=[
            m.QueryResult(query=_sentence(r, 4), source_ids=[s.source_id for s in sources[:10]])
            for _ in range(12)
        ],
        sources=sources,
        corpus=m.CorpusInfo(path="/data/corpus", documents=5000, fingerprint="ab" * 16),
    )
    verification = m.VerificationAgentResult(
        verified=sources[:16],
        rejected=[m.RejectedSource(source=s, reasons=["low relevance"]) for s in sources[16:]],
        relevance_threshold=0.15,
    )
    sections = [
        m.DraftSection(title=f"Section {i}", text=_paragraph(r, 8), citations=[1, 2, 3])
        for i in range(6)
    ]
    draft = m.WritingAgentResult(
        title=plan.title,
        markdown="\n\n".join(f"## {s.title}\n\n{s.text}" for s in sections),
        sections=sections,
        references=[
            m.Reference(number=i + 1, source_id=s.source_id, title=s.title, authors=s.authors)
            for i, s in enumerate(sources[:16])
        ],
        word_count=4200,
        revision=1,
    )
    evaluation = m.EvaluationAgentResult(
        score=0.81,
        threshold=0.75,
        passed=True,
        criteria=[
            m.RubricScore(criterion=c, score=0.8, weight=1.0, note=_sentence(r))
            for c in ("coverage", "citations", "structure", "clarity")
        ],
        recommendations=[_sentence(r) for _ in range(3)],
    )
    turnitin = m.TurnitinAgentResult(
        similarity_ratio=0.04,
        flagged=[
            m.FlaggedPassage(text=_sentence(r), source_id=sources[1].source_id, start=10, end=120)
        ],
        k=5,
        window=4,
    )
    return m.WorkflowState(
        intent=intent,
        plan=plan,
        search=search,
        verification=verification,
        draft=draft,
        evaluation=evaluation,
        initial_evaluation=evaluation,
        turnitin=turnitin,
        stage_metrics={s: {"duration_seconds": 1.5, "attempts": 1} for s in STAGES},
    )


def timed(fn: Callable[[int], Any], iterations: int, warmup: int = 20) -> list[float]:
    for i in range(warmup):
        fn(-1 - i)
    out = []
    for i in range(iterations):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1e3, p95 * 1e3


def row(label: str, samples: list[float], target: str = "") -> float:
    med, p95 = summary(samples)
    print(f"  {label:<44} median {med:8.3f} ms   p95 {p95:8.3f} ms   {target}")
    return med


def bench_prowzi(root: Path, state: m.WorkflowState, iterations: int) -> tuple[float, float]:
    manager = CheckpointManager(root / "prowzi", fsync=True)
    params = RunParameters(prompt="Write a research paper on quantum computing")

    def save(i: int) -> None:
        stage = STAGES[i % len(STAGES)]
        manager.save(
            session_id=f"bench-{i // len(STAGES) + 1000}",
            stage=stage,
            state=state,
            completed_stages=STAGES[: i % len(STAGES) + 1],
            parameters=params,
        )

    saves = timed(save, iterations)
    last = f"bench-{(iterations - 1) // len(STAGES) + 1000}_{STAGES[(iterations - 1) % 7]}"
    loaded = manager.load_checkpoint(last)
    if loaded.to_state() != state:
        raise SystemExit("round trip changed the state")
    loads = timed(lambda i: manager.load_checkpoint(last), iterations)
    print("Prowzi CheckpointManager (fsync on)")
    save_med = row("save", saves, "(target <= 1.0 ms)")
    load_med = row("load_checkpoint (verify + rebuild models)", loads, "(target <= 0.3 ms)")
    size = (root / "prowzi" / f"{last}.pkl").stat().st_size
    print(f"  checkpoint file: {size / 1024:.1f} KiB")
    return save_med, load_med


def bench_langgraph(root: Path, state: m.WorkflowState, iterations: int) -> tuple[float, float]:
    from langgraph.checkpoint.base import empty_checkpoint
    from langgraph.checkpoint.sqlite import SqliteSaver

    conn = sqlite3.connect(root / "langgraph.sqlite", check_same_thread=False)
    saver = SqliteSaver(conn)
    saver.setup()
    values = {name: value for name, value in state.model_dump().items()}
    config: dict[str, Any] = {"configurable": {"thread_id": "bench", "checkpoint_ns": ""}}
    counter = iter(range(10**9))

    def put(i: int) -> None:
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = values
        checkpoint["channel_versions"] = {name: next(counter) for name in values}
        saver.put(config, checkpoint, {"source": "loop", "step": i}, {})  # type: ignore[arg-type]

    puts = timed(put, iterations)
    gets = timed(lambda i: saver.get_tuple(config), iterations)  # type: ignore[arg-type]
    tup = saver.get_tuple(config)  # type: ignore[arg-type]
    if tup is None or tup.checkpoint["channel_values"]["draft"] != values["draft"]:
        raise SystemExit("LangGraph round trip changed the state")
    synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
    journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    print(f"LangGraph SqliteSaver (journal_mode={journal}, synchronous={synchronous})")
    put_med = row("put", puts)
    get_med = row("get_tuple (no integrity check)", gets)
    conn.close()
    return put_med, get_med


def bench_list(root: Path, state: m.WorkflowState, sessions: int) -> float:
    directory = root / "listing"
    small = m.WorkflowState(intent=state.intent, plan=state.plan)
    params = RunParameters(prompt="Write a research paper on quantum computing")
    writer = CheckpointManager(directory, fsync=False)  # setup speed only
    start = time.perf_counter()
    for i in range(sessions):
        writer.save(
            session_id=f"s{i:06d}",
            stage=STAGES[i % 7],
            state=small,
            completed_stages=STAGES[: i % 7 + 1],
            parameters=params,
        )
    print(f"list_checkpoints over {sessions} sessions ({time.perf_counter() - start:.1f}s setup)")
    time.sleep(0.1)  # let the directory's mtime age past the index's racy window
    first = time.perf_counter()
    rows = CheckpointManager(directory).list_checkpoints()
    first_ms = (time.perf_counter() - first) * 1e3
    if len(rows) != sessions:
        raise SystemExit(f"listed {len(rows)} of {sessions}")
    print(f"  first listing after the writes (index check) {first_ms:8.3f} ms")
    warm = CheckpointManager(directory)
    warm_med = row(
        "list_checkpoints (same manager)",
        timed(lambda i: warm.list_checkpoints(), 30, 2),
        "(target <= 50 ms)",
    )
    row(
        "list_checkpoints (new manager each time)",
        timed(lambda i: CheckpointManager(directory).list_checkpoints(), 30, 2),
    )
    row(
        "list_checkpoints(session_id=...)",
        timed(lambda i: warm.list_checkpoints(session_id="s000042"), 30, 2),
    )
    return warm_med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (a temp dir)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prowzi-bench-", dir=args.dir))
    try:
        state = realistic_state()
        print(
            f"state: {len(state.model_dump_json()) / 1024:.1f} KiB of JSON; "
            f"{args.iterations} iterations; scratch {root}"
        )
        save_med, load_med = bench_prowzi(root, state, args.iterations)
        put_med, get_med = bench_langgraph(root, state, args.iterations)
        list_med = bench_list(root, state, args.sessions)
        print("Ratios (Prowzi / LangGraph; below 1 is faster)")
        print(f"  save / SqliteSaver.put        {save_med / put_med:6.2f}")
        print(f"  load / SqliteSaver.get_tuple  {load_med / get_med:6.2f}")
        print("Targets")
        save_ok = save_med <= min(1.0, put_med)
        print(f"  save <= 1.0 ms and <= put     {'met' if save_ok else 'MISSED'}")
        print(f"  load <= 0.3 ms                {'met' if load_med <= 0.3 else 'MISSED'}")
        print(f"  list <= 50 ms                 {'met' if list_med <= 50 else 'MISSED'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Helpers for the checkpoint tests: states built from the real result models, saving runs,
and taking checkpoint files apart and re-sealing them (what a forger without the key can do)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from shared import PROMPT, STAGES

from prowzi.agents import models as m
from prowzi.agents.base import RunParameters
from prowzi.storage import format as fmt
from prowzi.workflows.checkpoint import CheckpointManager, CheckpointMetadata


def params(**changes: object) -> RunParameters:
    return RunParameters(prompt=PROMPT, **changes)


def full_state() -> m.WorkflowState:
    """Every field set, with nested models, unicode and numbers."""
    source = m.Source(
        source_id="corpus/shor.md",
        title="Polynomial-time algorithms for prime factorization — Shor",
        authors=["P. W. Shor"],
        year=1997,
        doi="10.1137/S0097539795293172",
        abstract="A quantum computer can factor integers in polynomial time. ψ ⟩",
        text="The algorithm uses the quantum Fourier transform. " * 20,
        score=7.25,
        queries=["quantum factoring"],
    )
    draft = m.WritingAgentResult(
        title="Quantum computing",
        markdown="# Quantum computing\n\nShor's algorithm [1] factors integers.",
        sections=[m.DraftSection(title="Intro", text="Shor's algorithm [1].", citations=[1])],
        references=[m.Reference(number=1, source_id=source.source_id, title=source.title)],
        word_count=6,
        revision=1,
    )
    evaluation = m.EvaluationAgentResult(
        score=0.8,
        threshold=0.75,
        passed=True,
        criteria=[m.RubricScore(criterion="coverage", score=0.8, weight=1.0)],
    )
    return m.WorkflowState(
        intent=m.IntentAnalysis(
            prompt=PROMPT,
            document_type="research_paper",
            field="physics",
            topic="quantum computing",
            keywords=["quantum", "qubit"],
        ),
        plan=m.ResearchPlan(
            title="Quantum computing",
            sections=[m.PlannedSection(title="Intro", queries=["quantum factoring"])],
        ),
        search=m.SearchAgentResult(
            queries=[m.QueryResult(query="quantum factoring", source_ids=[source.source_id])],
            sources=[source],
            corpus=m.CorpusInfo(path="/corpus", documents=1, fingerprint="f" * 32),
        ),
        verification=m.VerificationAgentResult(verified=[source], relevance_threshold=0.15),
        draft=draft,
        evaluation=evaluation,
        initial_evaluation=evaluation.model_copy(update={"score": 0.7, "passed": False}),
        turnitin=m.TurnitinAgentResult(similarity_ratio=0.01, k=5, window=4),
        stage_metrics={"intent": {"duration_seconds": 0.5, "attempt": 1}},
    )


def state_after(stage: str) -> m.WorkflowState:
    """The state a run holds after ``stage``: the full state cut to the fields written so far."""
    fields = {
        "intent": ("intent",),
        "planning": ("intent", "plan"),
        "search": ("intent", "plan", "search"),
        "verification": ("intent", "plan", "search", "verification"),
        "writing": ("intent", "plan", "search", "verification", "draft"),
        "evaluation": (
            "intent",
            "plan",
            "search",
            "verification",
            "draft",
            "evaluation",
            "initial_evaluation",
        ),
    }.get(stage)
    state = full_state()
    if fields is None:
        return state
    return m.WorkflowState(**{name: getattr(state, name) for name in fields})


def save_stage(
    manager: CheckpointManager,
    session_id: str,
    stage: str,
    state: m.WorkflowState | None = None,
    parameters: RunParameters | None = None,
    completed_stages: list[str] | None = None,
    **kwargs: Any,
) -> CheckpointMetadata:
    """Save the checkpoint after ``stage``, holding ``state`` (by default the state after
    it), with ``parameters`` (by default ``params()``) and ``completed_stages`` (by default
    those of STAGES up to ``stage``)."""
    if completed_stages is None:
        completed_stages = list(STAGES[: STAGES.index(stage) + 1])
    return manager.save(
        session_id=session_id,
        stage=stage,
        state=state_after(stage) if state is None else state,
        completed_stages=completed_stages,
        parameters=params() if parameters is None else parameters,
        **kwargs,
    )


def save_run(
    manager: CheckpointManager, session_id: str, stages: tuple[str, ...] = STAGES, **kwargs: Any
) -> list[CheckpointMetadata]:
    """Save a checkpoint after each of ``stages``, as the orchestrator does (holding the
    session's lease)."""
    saved = []
    with manager.session_lock(session_id):
        for i, stage in enumerate(stages):
            saved.append(
                save_stage(
                    manager, session_id, stage, completed_stages=list(stages[: i + 1]), **kwargs
                )
            )
    return saved


def split(path: Path) -> tuple[dict[str, Any], bytes]:
    """A checkpoint file's header (as JSON) and body (as stored)."""
    raw = path.read_bytes()
    header, start = fmt.read_header(raw, str(path))
    return header, raw[start : start + header["payload_size"]]


def rewrite(
    path: Path,
    *,
    header: dict[str, Any] | None = None,
    body: bytes | None = None,
    key: bytes | None = None,
) -> None:
    """Re-encode a checkpoint with a changed header or body and a *consistent* size, hash and
    header digest: what a forger without the key can do."""
    old_header, old_body = split(path)
    new_header = {**old_header, **(header or {})}
    new_body = old_body if body is None else body
    new_header["payload_size"] = len(new_body)
    new_header["payload_sha256"] = hashlib.sha256(new_body).hexdigest()
    new_header["signed"] = key is not None
    path.write_bytes(b"".join(fmt.seal(new_header, new_body, key)))


def body_of(path: Path) -> dict[str, Any]:
    """A checkpoint's body, decompressed and parsed."""
    header, body = split(path)
    result: dict[str, Any] = orjson.loads(
        fmt.decompress(memoryview(body), header["compression"], str(path))
    )
    return result


def encode_body(doc: dict[str, Any], compression: str = "zstd") -> bytes:
    """A body as a writer would store it."""
    return fmt.compress(orjson.dumps(doc), compression)  # type: ignore[arg-type]


def in_flight_writes(directory: Path, session: str = "") -> list[Path]:
    """Temporaries of checkpoint writes under way (or cut short) of ``session`` (any session
    when empty)."""
    if not directory.exists():
        return []
    return [p for p in directory.iterdir() if p.name.startswith(f".tmp.{session}")]


@contextmanager
def held_in_child(holding: str) -> Iterator[int]:
    """Run ``with <holding>:`` in a child Python process (imports included in ``holding``'s
    preamble lines), yield the child's pid while it holds it, then let it go."""
    *preamble, statement = textwrap.dedent(holding).strip().splitlines()
    script = "\n".join(
        [
            "import sys",
            *preamble,
            f"with {statement}:",
            '    print("held", flush=True)',
            "    sys.stdin.readline()",
        ]
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        yield child.pid
    finally:
        assert child.stdin is not None
        child.stdin.write("\n")
        child.stdin.close()
        child.wait(timeout=30)

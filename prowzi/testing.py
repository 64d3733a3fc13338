"""Helpers for testing code that uses Prowzi: agents that do nothing, quickly.

``noop_agents()`` returns an agent per research stage that produces a minimal, valid result
without touching a corpus, so the engine (retries, checkpoints, telemetry) can be exercised
and benchmarked on its own. ``noop`` is the same as a ``PROWZI_AGENTS`` factory, for a real
``prowzi`` process: ``PROWZI_AGENTS="intent=prowzi.testing:noop,planning=prowzi.testing:noop,..."``.
"""

from __future__ import annotations

from pydantic import BaseModel

from prowzi.agents import models as m
from prowzi.agents.base import Agent, StageContext
from prowzi.config import ProwziConfig


def _draft(ctx: StageContext) -> m.WritingAgentResult:
    title = ctx.params.prompt
    return m.WritingAgentResult(
        title=title,
        markdown=f"# {title}\n\nNo content: produced by a no-op agent.\n",
        word_count=8,
    )


def _evaluation(score: float) -> m.EvaluationAgentResult:
    return m.EvaluationAgentResult(score=score, threshold=0.0, passed=True)


def noop_result(stage: str, ctx: StageContext) -> BaseModel:
    """A minimal valid result for ``stage``."""
    if stage == "intent":
        return m.IntentAnalysis(
            prompt=ctx.params.prompt, document_type="report", field="general", topic="noop"
        )
    if stage == "planning":
        return m.ResearchPlan(title="noop", sections=[m.PlannedSection(title="Introduction")])
    if stage == "search":
        return m.SearchAgentResult(corpus=m.CorpusInfo(path="", documents=0, fingerprint=""))
    if stage == "verification":
        return m.VerificationAgentResult()
    if stage == "writing":
        return _draft(ctx)
    if stage == "evaluation":
        draft = ctx.state.draft if ctx.state.draft is not None else _draft(ctx)
        return m.EvaluationStageResult(
            initial_evaluation=_evaluation(1.0), evaluation=_evaluation(1.0), draft=draft
        )
    if stage == "turnitin":
        return m.TurnitinAgentResult(similarity_ratio=0.0, k=5, window=4)
    raise ValueError(f"no no-op result for stage {stage!r}")


class NoopAgent:
    """An agent that returns :func:`noop_result` for its stage."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    async def __call__(self, ctx: StageContext) -> BaseModel:
        return noop_result(self.stage, ctx)


STAGES = ("intent", "planning", "search", "verification", "writing", "evaluation", "turnitin")


def noop_agents() -> dict[str, Agent]:
    """One no-op agent per research stage."""
    return {stage: NoopAgent(stage) for stage in STAGES}


async def _noop(ctx: StageContext) -> BaseModel:
    return noop_result(ctx.stage, ctx)


def noop(config: ProwziConfig) -> Agent:
    """A ``PROWZI_AGENTS`` factory: the no-op agent of whichever stage it is named for."""
    return _noop


def noop_setting() -> str:
    """The ``PROWZI_AGENTS`` value that makes every research stage a no-op."""
    return ",".join(f"{stage}=prowzi.testing:noop" for stage in STAGES)

"""The stage table: the only place the engine learns what the stages are.

Each stage declares the state fields and run parameters it reads, and the state fields it
writes. That is what lets a resume with changed parameters re-run only the stages whose
inputs changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from prowzi.agents import models as m
from prowzi.ids import validate_stage_name


@dataclass(frozen=True, slots=True)
class StageSpec:
    name: str
    result_type: type[BaseModel]
    writes: tuple[str, ...]
    reads: tuple[str, ...] = ()
    params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_stage_name(self.name)
        if not self.writes:
            raise ValueError(f"stage {self.name} writes nothing")

    def unpack(self, result: BaseModel) -> dict[str, Any]:
        """The state fields this stage's result sets."""
        if not isinstance(result, self.result_type):
            raise TypeError(
                f"agent for stage '{self.name}' returned {type(result).__name__}, "
                f"expected {self.result_type.__name__}"
            )
        if len(self.writes) == 1:
            return {self.writes[0]: result}
        return {name: getattr(result, name) for name in self.writes}


RESEARCH_STAGES: tuple[StageSpec, ...] = (
    StageSpec("intent", m.IntentAnalysis, writes=("intent",), params=("prompt",)),
    StageSpec("planning", m.ResearchPlan, writes=("plan",), reads=("intent",)),
    StageSpec(
        "search",
        m.SearchAgentResult,
        writes=("search",),
        reads=("intent", "plan"),
        params=("max_results_per_query", "corpus_dir", "providers", "fetch_full_text"),
    ),
    StageSpec(
        "verification",
        m.VerificationAgentResult,
        writes=("verification",),
        reads=("search",),
        params=("relevance_threshold",),
    ),
    StageSpec(
        "writing",
        m.WritingAgentResult,
        writes=("draft",),
        reads=("intent", "plan", "verification"),
    ),
    StageSpec(
        "evaluation",
        m.EvaluationStageResult,
        writes=("initial_evaluation", "evaluation", "draft"),
        reads=("plan", "verification", "draft"),
        params=("evaluation_threshold",),
    ),
    StageSpec(
        "turnitin",
        m.TurnitinAgentResult,
        writes=("turnitin",),
        reads=("draft", "verification"),
    ),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in RESEARCH_STAGES)

"""Typed stage results (pydantic v2) and the workflow state that holds them.

Every stage agent returns one of these models. Each model's ``telemetry_details()`` gives the
small, human-readable summary that telemetry records and the monitor shows.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def telemetry_details(self) -> dict[str, Any]:
        return {}


# --- intent -------------------------------------------------------------------------------


class IntentAnalysis(_Result):
    prompt: str
    document_type: str = Field(description="research_paper, literature_review, essay, report...")
    field: str = Field(description="Academic field, e.g. computer_science, physics.")
    topic: str = Field(description="The subject of the document, in the prompt's words.")
    keywords: list[str] = Field(default_factory=list)

    def telemetry_details(self) -> dict[str, Any]:
        return {"document_type": self.document_type, "field": self.field, "topic": self.topic}


# --- planning -----------------------------------------------------------------------------


class PlannedSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str
    purpose: str = ""
    queries: list[str] = Field(default_factory=list)


class ResearchPlan(_Result):
    title: str
    sections: list[PlannedSection]

    @property
    def queries(self) -> list[str]:
        """Every planned query, in order, without repeats."""
        return list(dict.fromkeys(q for s in self.sections for q in s.queries))

    def telemetry_details(self) -> dict[str, Any]:
        return {"sections": len(self.sections), "queries": len(self.queries)}


# --- search -------------------------------------------------------------------------------


class SourcePassage(BaseModel):
    """A passage of a source that a query matched, with where it sits in the document."""

    model_config = ConfigDict(extra="forbid")

    text: str
    page: int | None = Field(None, description="1-based page number (PDF).")
    section: str | None = Field(None, description="The heading the passage sits under.")
    score: float = 0.0

    def locator(self) -> str:
        """``p. 12``, ``§ Basic Logging Tutorial`` or ``""``."""
        if self.page is not None:
            return f"p. {self.page}"
        return f"§ {self.section}" if self.section else ""


class Source(BaseModel):
    """One document found in the corpus (or by an online provider)."""

    model_config = ConfigDict(extra="forbid")

    source_id: str = Field(description="Stable id within the corpus (relative path[#record]).")
    title: str
    authors: list[str] = Field(default_factory=list)
    year: int | None = None
    url: str | None = None
    doi: str | None = None
    abstract: str = ""
    text: str = ""
    score: float = Field(0.0, description="Best BM25 relevance over the queries (higher=better).")
    queries: list[str] = Field(default_factory=list, description="Queries that found it.")
    origin: str = Field("corpus", description="'corpus' or the online provider's name.")
    arxiv_id: str | None = None
    metadata_source: dict[str, str] = Field(
        default_factory=dict, description="Where each metadata field came from."
    )
    location: str | None = Field(None, description="The corpus file, when there is one.")
    passages: list[SourcePassage] = Field(
        default_factory=list, description="The passages the queries matched, best first."
    )


class QueryResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str
    source_ids: list[str] = Field(default_factory=list)


class CorpusInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    documents: int
    fingerprint: str
    sample: bool = False


class SkippedFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    reason: str


class SearchAgentResult(_Result):
    queries: list[QueryResult] = Field(default_factory=list)
    sources: list[Source] = Field(default_factory=list)
    corpus: CorpusInfo
    message: str | None = Field(None, description="Set when the corpus covers the topic thinly.")
    providers: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per online provider: results, queries, requests by outcome, error.",
    )
    skipped: list[SkippedFile] = Field(
        default_factory=list, description="Corpus files that could not be used, with reasons."
    )

    def origins(self) -> dict[str, int]:
        """How many sources came from each origin (the corpus, each provider)."""
        counts: dict[str, int] = {}
        for source in self.sources:
            counts[source.origin] = counts.get(source.origin, 0) + 1
        return dict(sorted(counts.items()))

    def telemetry_details(self) -> dict[str, Any]:
        details: dict[str, Any] = {
            "sources_count": len(self.sources),
            "queries": len(self.queries),
            "sources_by_origin": self.origins(),
        }
        if self.providers:  # online providers (issue 16 item 4)
            details["providers"] = self.providers
            warnings = [
                f"{n} failed: {p['error']}" for n, p in self.providers.items() if "error" in p
            ]
            if warnings:
                details["warnings"] = warnings
        if self.skipped:
            details["skipped_files"] = len(self.skipped)
        if self.message:
            details["message"] = self.message
        return details


# --- verification -------------------------------------------------------------------------


class RejectedSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Source
    reasons: list[str]


class SourceWarning(BaseModel):
    """A verified source with incomplete metadata: still citable, the gap said out loud."""

    model_config = ConfigDict(extra="forbid")

    source_id: str
    warnings: list[str]


class VerificationAgentResult(_Result):
    verified: list[Source] = Field(default_factory=list)
    rejected: list[RejectedSource] = Field(default_factory=list)
    relevance_threshold: float = 0.0
    warnings: list[SourceWarning] = Field(default_factory=list)

    def telemetry_details(self) -> dict[str, Any]:
        details: dict[str, Any] = {"verified": len(self.verified), "rejected": len(self.rejected)}
        if self.warnings:
            details["warnings"] = len(self.warnings)
        return details


# --- writing ------------------------------------------------------------------------------


class Reference(BaseModel):
    model_config = ConfigDict(extra="forbid")

    number: int
    source_id: str
    title: str
    authors: list[str] = Field(default_factory=list)
    year: int | None = None
    url: str | None = None
    doi: str | None = None
    origin: str = "corpus"
    metadata_source: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def to(cls, source: Source, number: int) -> Reference:
        """Reference ``number``, to ``source``: its other fields are the source's own."""
        return cls(number=number, **source.model_dump(include=cls.model_fields.keys() - {"number"}))

    def describe(self) -> str:
        """One line for ``prowzi show``: the reference, where it is, and where each of its
        metadata fields came from."""
        where = f"corpus {self.source_id}" if self.origin == "corpus" else self.origin
        fields = ", ".join(f"{k} from {v}" for k, v in sorted(self.metadata_source.items()))
        year = self.year or "n.d."
        return f"[{self.number}] {self.title} ({year}); {where}" + (f"; {fields}" if fields else "")


class DraftSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str
    text: str
    citations: list[int] = Field(default_factory=list)


class WritingAgentResult(_Result):
    title: str
    markdown: str
    sections: list[DraftSection] = Field(default_factory=list)
    references: list[Reference] = Field(default_factory=list)
    word_count: int = 0
    revision: int = Field(0, description="0 for the first draft, 1 after one revision pass.")

    def telemetry_details(self) -> dict[str, Any]:
        return {
            "words": self.word_count,
            "references": len(self.references),
            "revision": self.revision,
        }


# --- evaluation ---------------------------------------------------------------------------


class RubricScore(BaseModel):
    model_config = ConfigDict(extra="forbid")

    criterion: str
    score: float = Field(ge=0, le=1)
    weight: float = Field(ge=0)
    note: str = ""


class EvaluationAgentResult(_Result):
    score: float = Field(ge=0, le=1)
    threshold: float = Field(ge=0, le=1)
    passed: bool
    criteria: list[RubricScore] = Field(default_factory=list)
    recommendations: list[str] = Field(default_factory=list)

    unsupported_share: float | None = Field(
        None, description="Share of cited sentences their cited passages do not support."
    )

    @classmethod
    def graded(
        cls,
        score: float,
        threshold: float,
        criteria: list[RubricScore],
        recommendations: list[str],
        unsupported_share: float | None,
    ) -> EvaluationAgentResult:
        """A grading's result, the rubric's or a model's: it passes when ``score`` reaches
        ``threshold``."""
        return cls(
            score=score,
            threshold=threshold,
            passed=score >= threshold,
            criteria=criteria,
            recommendations=recommendations,
            unsupported_share=unsupported_share,
        )

    def telemetry_details(self) -> dict[str, Any]:
        details: dict[str, Any] = {"score": round(self.score, 3), "passed": self.passed}
        if self.unsupported_share is not None:
            details["unsupported_share"] = round(self.unsupported_share, 4)
        return details


class EvaluationStageResult(_Result):
    """What the evaluation stage writes: both evaluations and the (possibly revised) draft."""

    initial_evaluation: EvaluationAgentResult
    evaluation: EvaluationAgentResult
    draft: WritingAgentResult

    def telemetry_details(self) -> dict[str, Any]:
        details: dict[str, Any] = {
            "initial_score": round(self.initial_evaluation.score, 3),
            "score": round(self.evaluation.score, 3),
            "revised": self.draft.revision > 0,
        }
        if self.evaluation.unsupported_share is not None:
            details["unsupported_share"] = round(self.evaluation.unsupported_share, 4)
        details["reference_sources"] = [r.describe() for r in self.draft.references]
        return details


# --- turnitin -----------------------------------------------------------------------------


class FlaggedPassage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    source_id: str
    start: int = Field(description="Character offset of the passage in the draft.")
    end: int
    shared_fingerprints: int = 0


class TurnitinAgentResult(_Result):
    similarity_ratio: float = Field(ge=0, le=1)
    flagged: list[FlaggedPassage] = Field(default_factory=list)
    excluded_quoted_fingerprints: int = 0
    k: int = Field(description="k-gram length in tokens.")
    window: int = Field(description="Winnowing window size.")

    def telemetry_details(self) -> dict[str, Any]:
        return {"similarity": round(self.similarity_ratio, 4), "flagged": len(self.flagged)}


# --- the workflow state -------------------------------------------------------------------


class WorkflowState(BaseModel):
    """The typed state of one run: what each stage has produced so far."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    intent: IntentAnalysis | None = None
    plan: ResearchPlan | None = None
    search: SearchAgentResult | None = None
    verification: VerificationAgentResult | None = None
    draft: WritingAgentResult | None = None
    evaluation: EvaluationAgentResult | None = None
    initial_evaluation: EvaluationAgentResult | None = None
    turnitin: TurnitinAgentResult | None = None
    stage_metrics: dict[str, Any] = Field(default_factory=dict)

    @property
    def document(self) -> str:
        """The current markdown document ("" if the writing stage has not run)."""
        return self.draft.markdown if self.draft is not None else ""


STATE_FIELDS: tuple[str, ...] = (
    "intent",
    "plan",
    "search",
    "verification",
    "draft",
    "evaluation",
    "initial_evaluation",
    "turnitin",
)

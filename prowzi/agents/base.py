"""The agent protocol: an async callable from a :class:`StageContext` to a typed result."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from prowzi.agents.models import WorkflowState
from prowzi.config.settings import provider_list

if TYPE_CHECKING:
    from prowzi.config import ProwziConfig

AttributeValue = str | bool | int | float


class RunParameters(BaseModel):
    """The parameters of one run. Stages declare which of these they read, so a resume with
    changed parameters re-runs exactly the stages whose inputs changed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    max_results_per_query: int = Field(15, ge=1, le=1000)
    corpus_dir: str | None = None
    relevance_threshold: float = Field(0.15, ge=0, le=1)
    evaluation_threshold: float = Field(0.75, ge=0, le=1)
    output_path: str | None = Field(
        None,
        description="Where the run was asked to write its document, as given. Not a stage "
        "input (no stage reads it, changing it forks nothing): it is recorded so that a "
        "resume in place writes there again from the checkpoint, never from telemetry.",
    )
    # Online providers (issue 16 item 4): search inputs, so a resume keeps them.
    providers: Annotated[tuple[str, ...], BeforeValidator(provider_list)] | None = Field(
        None, description="Online providers the search stage queries (None: the configured)."
    )
    fetch_full_text: bool | None = Field(
        None, description="Fetch open-access full text of provider results (None: configured)."
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("the prompt is empty")
        if len(value) > 10_000:
            raise ValueError("the prompt is longer than 10000 characters")
        return value


class StageObserver(Protocol):
    """Receives what an agent says about its work (span attributes and events)."""

    def set_attribute(self, key: str, value: AttributeValue | list[str]) -> None: ...

    def add_event(self, name: str, attributes: dict[str, AttributeValue]) -> None: ...


class _NullObserver:
    def set_attribute(self, key: str, value: AttributeValue | list[str]) -> None:
        return None

    def add_event(self, name: str, attributes: dict[str, AttributeValue]) -> None:
        return None


NULL_OBSERVER: StageObserver = _NullObserver()


@dataclass(frozen=True, slots=True)
class ModelCall:
    """One request to a language model (or one answer replayed from the cache).

    ``outcome`` is ``ok``, ``cached``, ``rate_limited`` or ``error``; ``model`` is the
    configured model name (a bounded label), tokens as the server's ``usage`` reported them."""

    model: str
    outcome: str
    duration_seconds: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


def model_call_details(calls: list[ModelCall]) -> dict[str, Any]:
    """What a stage attempt's model calls add to its telemetry details (nothing without any):
    answered calls, cached answers, failed requests, tokens and cost."""
    if not calls:
        return {}
    return {
        "llm_calls": sum(c.outcome == "ok" for c in calls),
        "llm_cached_calls": sum(c.outcome == "cached" for c in calls),
        "llm_failed_requests": sum(c.outcome in ("rate_limited", "error") for c in calls),
        "input_tokens": sum(c.input_tokens for c in calls),
        "output_tokens": sum(c.output_tokens for c in calls),
        "cost_usd": round(sum(c.cost_usd for c in calls), 6),
    }


def format_model_usage(details: Iterable[Mapping[str, Any]]) -> str | None:
    """``"1234 tokens (1000 in, 234 out), $0.0123, 3 cached"`` summed over stage details
    (of completed attempts); None when no model was called."""
    rows = [d for d in details if "llm_calls" in d]
    if not rows:
        return None
    tokens_in = sum(int(d.get("input_tokens", 0)) for d in rows)
    tokens_out = sum(int(d.get("output_tokens", 0)) for d in rows)
    cost = sum(float(d.get("cost_usd", 0.0)) for d in rows)
    cached = sum(int(d.get("llm_cached_calls", 0)) for d in rows)
    return (
        f"{tokens_in + tokens_out} tokens ({tokens_in} in, {tokens_out} out), "
        f"${cost:.4f}, {cached} cached"
    )


@dataclass(slots=True)
class StageContext:
    """Everything one stage attempt may read. Agents must not mutate ``state``."""

    session_id: str
    stage: str
    attempt: int
    params: RunParameters
    state: WorkflowState
    config: ProwziConfig
    observer: StageObserver = NULL_OBSERVER
    details: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] = field(default_factory=dict)
    """Facts this attempt adds to its ``stage_completed`` details, beside its result's."""
    model_calls: list[ModelCall] = field(default_factory=list)
    """The model calls of this attempt, for telemetry details and metrics."""

    def annotate(self, key: str, value: AttributeValue | list[str]) -> None:
        """Record a fact about this attempt (``prowzi.<stage>.<key>`` on the span)."""
        self.details[key] = value
        self.observer.set_attribute(f"prowzi.{self.stage}.{key}", value)

    def event(self, name: str, **attributes: AttributeValue) -> None:
        """Record a moment in this attempt (a span event)."""
        self.observer.add_event(name, attributes)


Agent = Callable[[StageContext], Awaitable[BaseModel]]
"""Any async callable ``agent(ctx) -> result``; the result type is the stage's model."""

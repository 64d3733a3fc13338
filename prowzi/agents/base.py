"""The agent protocol: an async callable from a :class:`StageContext` to a typed result."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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

    def annotate(self, key: str, value: AttributeValue | list[str]) -> None:
        """Record a fact about this attempt (``prowzi.<stage>.<key>`` on the span)."""
        self.details[key] = value
        self.observer.set_attribute(f"prowzi.{self.stage}.{key}", value)

    def event(self, name: str, **attributes: AttributeValue) -> None:
        """Record a moment in this attempt (a span event)."""
        self.observer.add_event(name, attributes)


Agent = Callable[[StageContext], Awaitable[BaseModel]]
"""Any async callable ``agent(ctx) -> result``; the result type is the stage's model."""

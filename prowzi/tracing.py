"""The engine's view of tracing: a run span, and one child span per stage attempt.

The stage loop runs each attempt *inside* its span, so spans opened by agent code become its
children. The OpenTelemetry implementation lives in :mod:`prowzi.observability.otel`;
:class:`NullTracer` is used when tracing is off.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

from prowzi.agents.base import AttributeValue


class StageSpan(Protocol):
    """One stage attempt's span, as the engine and agents see it."""

    trace_id: str | None
    span_id: str | None

    def set_attribute(self, key: str, value: AttributeValue | list[str]) -> None: ...

    def add_event(self, name: str, attributes: dict[str, AttributeValue]) -> None: ...

    def record_failure(self, exc: BaseException, error_type: str) -> None: ...


class RunSpan(Protocol):
    """The root span of one run (or one resume of a run)."""

    trace_id: str | None
    span_id: str | None

    def stage(self, stage: str, attempt: int) -> AbstractContextManager[StageSpan]: ...

    def add_event(self, name: str, attributes: dict[str, AttributeValue]) -> None: ...

    def record_failure(self, exc: BaseException, error_type: str) -> None: ...


class RunTracer(Protocol):
    def run(
        self,
        session_id: str,
        *,
        prompt: str,
        attributes: dict[str, AttributeValue],
        link_trace_id: str | None = None,
        link_span_id: str | None = None,
    ) -> AbstractContextManager[RunSpan]:
        """Open a run's root span; ``link_*`` names the original run's span on a resume."""
        ...


class _NullSpan:
    trace_id: str | None = None
    span_id: str | None = None

    def set_attribute(self, key: str, value: AttributeValue | list[str]) -> None:
        return None

    def add_event(self, name: str, attributes: dict[str, AttributeValue]) -> None:
        return None

    def record_failure(self, exc: BaseException, error_type: str) -> None:
        return None

    @contextmanager
    def stage(self, stage: str, attempt: int) -> Iterator[StageSpan]:
        yield self


_NULL_SPAN = _NullSpan()


class NullTracer:
    """Tracing switched off: spans cost a generator and nothing else."""

    @contextmanager
    def run(
        self,
        session_id: str,
        *,
        prompt: str,
        attributes: dict[str, Any],
        link_trace_id: str | None = None,
        link_span_id: str | None = None,
    ) -> Iterator[RunSpan]:
        yield _NULL_SPAN

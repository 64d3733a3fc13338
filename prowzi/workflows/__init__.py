"""The engine: orchestrator, stage table, events, checkpoints and telemetry.

``ProwziOrchestrator`` is imported lazily so that light modules (events, ids) stay cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prowzi.workflows.orchestrator import ProwziOrchestrator, ResearchResult

__all__ = ["ProwziOrchestrator", "ResearchResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from prowzi.workflows import orchestrator

        return getattr(orchestrator, name)
    raise AttributeError(f"module 'prowzi.workflows' has no attribute {name!r}")

"""An event sink for tests: it keeps every event the orchestrator emits."""

from __future__ import annotations

from typing import Any

from prowzi.events import Event


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.events: list[Event] = []

    def handle(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type[Event]) -> list[Any]:
        """The recorded events of one type, in order."""
        return [e for e in self.events if isinstance(e, kind)]

"""The webhook payload: small, stable, versioned; never the document itself.

Shaped as the Standard Webhooks specification suggests (``type``, ``timestamp``, ``data``),
with ``version`` beside them::

    {"version": 1, "type": "stage.completed", "timestamp": "2026-12-07T05:01:02.345678Z",
     "data": {"session_id": "...", "stage": "search", "attempt": 1, "duration_seconds": 1.2,
              "details": {"sources": 48}, "links": {"run": "/runs/<id>", ...}}}
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from prowzi.events import (
    CheckpointSaved,
    Event,
    StageCompleted,
    StageEvent,
    StageFailed,
    StageRetrying,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
)

PAYLOAD_VERSION = 1
_MAX_DETAILS = 20
_MAX_TEXT = 200


def _summary(details: dict[str, Any]) -> dict[str, Any]:
    """Scalars only, short strings, a few keys: a summary, not the stage's result."""
    summary: dict[str, Any] = {}
    for key, value in details.items():
        if len(summary) >= _MAX_DETAILS:
            break
        if isinstance(value, bool | int | float) or value is None:
            summary[str(key)] = value
        elif isinstance(value, str):
            summary[str(key)] = value[:_MAX_TEXT]
    return summary


def _links(session_id: str, base: str | None) -> dict[str, str]:
    prefix = (base or "").rstrip("/")
    run = f"{prefix}/runs/{session_id}"
    return {"run": run, "events": f"{run}/events", "document": f"{run}/document"}


def build_payload(event: Event, event_type: str, *, link_base: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"session_id": event.session_id}
    if isinstance(event, StageEvent):
        data["stage"] = event.stage
        data["attempt"] = event.attempt
    if isinstance(event, StageCompleted):
        data["duration_seconds"] = round(event.duration_seconds, 6)
        data["details"] = _summary(event.details)
    elif isinstance(event, StageFailed | StageRetrying):
        data["duration_seconds"] = round(event.duration_seconds, 6)
        data["error"] = event.error[:_MAX_TEXT]
        data["error_type"] = event.error_type
        if isinstance(event, StageRetrying):
            data["retry_in_seconds"] = round(event.delay_seconds, 3)
    elif isinstance(event, CheckpointSaved):
        data["stage"] = event.stage
        data["checkpoint_id"] = event.checkpoint_id
        data["completed_stages"] = list(event.completed_stages)
    elif isinstance(event, WorkflowStarted):
        data["stages"] = list(event.stages)
        if event.parent_session_id:
            data["parent_session_id"] = event.parent_session_id
        if event.resumed_from:
            data["resumed_from"] = event.resumed_from
    elif isinstance(event, WorkflowCompleted):
        data["duration_seconds"] = round(event.duration_seconds, 6)
    elif isinstance(event, WorkflowFailed):
        data["duration_seconds"] = round(event.duration_seconds, 6)
        data["stage"] = event.stage
        data["error"] = event.error[:_MAX_TEXT]
        data["error_type"] = event.error_type
    data["links"] = _links(event.session_id, link_base)
    when = datetime.fromtimestamp(event.timestamp, UTC).isoformat().replace("+00:00", "Z")
    return {"version": PAYLOAD_VERSION, "type": event_type, "timestamp": when, "data": data}


def encode_payload(payload: dict[str, Any]) -> str:
    return orjson.dumps(payload).decode()


def test_payload() -> dict[str, Any]:
    """What ``prowzi webhooks test`` sends."""
    when = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return {
        "version": PAYLOAD_VERSION,
        "type": "webhook.test",
        "timestamp": when,
        "data": {"message": "a test delivery from Prowzi"},
    }

"""The design document's configuration, run and progress-callback samples, verbatim."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from design_samples import reader_namespace, run_sample, sample

from prowzi.config import ProwziConfig


def test_programmatic_configuration_sample() -> None:
    ns = reader_namespace()
    asyncio.run(run_sample(sample("Programmatic Configuration"), ns))
    config = ns["config"]
    assert isinstance(config, ProwziConfig)
    assert config.enable_checkpointing is True and config.enable_telemetry is True
    assert config.checkpoint_dir == Path("./my_checkpoints")


def test_environment_variables_set_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROWZI_ENABLE_CHECKPOINTING", "true")
    monkeypatch.setenv("PROWZI_CHECKPOINT_DIR", "/tmp/cps")
    monkeypatch.setenv("PROWZI_ENABLE_TELEMETRY", "false")
    monkeypatch.setenv("PROWZI_MAX_RETRIES", "7")
    from prowzi.config import get_config

    config = get_config()
    assert config.enable_checkpointing and not config.enable_telemetry
    assert config.checkpoint_dir == Path("/tmp/cps") and config.max_retries == 7


def test_running_with_checkpoints_and_custom_progress_callback_samples(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []

    async def send_to_datadog(stage: str, payload: dict[str, Any]) -> None:
        sent.append((stage, payload))

    ns = reader_namespace()
    ns["send_to_datadog"] = send_to_datadog

    async def session() -> None:
        await run_sample(sample("1. Running Workflows with Checkpoints"), ns)
        await run_sample(sample("Custom Progress Callbacks"), ns)

    asyncio.run(session())
    first = ns["session_id"]
    assert f"Workflow completed. Session: {first}" in capsys.readouterr().out
    # checkpoints after each stage, in the default directory
    checkpoints = Path("./prowzi_checkpoints")
    for stage in ("intent", "planning", "search", "verification", "writing", "turnitin"):
        assert (checkpoints / f"{first}_{stage}.pkl").is_file()
        assert (checkpoints / f"{first}_{stage}.json").is_file()
    # the callback saw every stage complete, with payloads
    result = ns["result"]
    assert result.metadata["session_id"] != first
    completed = {stage for stage, payload in sent if payload.get("status") == "completed"}
    assert {"intent", "search", "writing", "evaluation", "turnitin"} <= completed
    assert "## References" in result.document

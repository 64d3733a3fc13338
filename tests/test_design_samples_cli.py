"""The design document's shell samples, run verbatim in bash."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from design_samples import reader_namespace, run_sample, sample
from pydantic import BaseModel

from prowzi.agents.base import StageContext
from prowzi.config import ProwziConfig
from prowzi.errors import PermanentError, WorkflowFailedError
from prowzi.workflows import ProwziOrchestrator


async def _broken_writer(ctx: StageContext) -> BaseModel:
    raise PermanentError("the writer is broken")


def test_cli_commands_sample(tmp_path: Path) -> None:
    # The sample resumes, shows and monitors session abc123-def456: one that was interrupted.
    config = ProwziConfig(enable_checkpointing=True)
    broken = ProwziOrchestrator(config=config, agents={"writing": _broken_writer})
    with pytest.raises(WorkflowFailedError):
        asyncio.run(broken.run_research("Write about AI safety", session_id="abc123-def456"))

    script = sample("4. CLI Commands", language="bash")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PROWZI_ENABLE_CHECKPOINTING": "true",
    }
    proc = subprocess.run(
        ["bash", "-e", "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert "Session:" in out  # the new run
    assert "abc123-def456" in out  # listed, shown, monitored
    assert "completed" in out.lower()
    assert Path("abc123-def456.md").read_text(encoding="utf-8").count("## References") == 1


def test_environment_variables_sample(tmp_path: Path) -> None:
    script = sample("Environment Variables", language="bash") + (
        '\npython -c "from prowzi.config import get_config; c = get_config(); '
        'print(c.enable_checkpointing, c.checkpoint_dir, c.enable_telemetry)"'
    )
    proc = subprocess.run(
        ["bash", "-e", "-c", script],
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "/path/to/checkpoints", "True"]


def test_best_practice_enable_checkpointing_sample() -> None:
    ns = reader_namespace()

    async def session() -> None:
        await run_sample(sample("Programmatic Configuration"), ns)
        ns["config"].enable_checkpointing = False
        await run_sample(sample("1. Enable Checkpointing for Long Workflows"), ns)

    asyncio.run(session())
    assert ns["config"].enable_checkpointing is True

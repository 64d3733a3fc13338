"""Agent factories for tests that drive real ``prowzi`` processes through ``PROWZI_AGENTS``.

``PROWZI_AGENTS="search=engine_agents:slow"`` (with ``tests/`` on ``PYTHONPATH``) wraps the
default agent of a stage. Behaviour is tuned by environment variables so one factory serves
many tests:

- ``PROWZI_TEST_DELAY``: seconds ``slow`` and ``flaky`` sleep before running (default 0.3);
- ``PROWZI_TEST_FAIL_MARKER``: a file; while it exists, ``failing`` raises a transient error;
- ``PROWZI_TEST_PROGRESS``: a file to which ``slow`` appends each stage it completes.

``lose_checkpoint_dir`` moves the checkpoint directory away and leaves a file in its place, so
every later save fails for real (a disk that went away, as far as the run can tell).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from pydantic import BaseModel

from prowzi.agents import default_agents
from prowzi.agents.base import Agent, StageContext
from prowzi.config import ProwziConfig
from prowzi.errors import TransientError


def slow(config: ProwziConfig) -> Agent:
    """Wraps every default agent it is named for: sleeps, then runs it."""
    delay = float(os.environ.get("PROWZI_TEST_DELAY", "0.3"))
    agents = default_agents(config)

    progress = os.environ.get("PROWZI_TEST_PROGRESS")

    async def agent(ctx: StageContext) -> BaseModel:
        await asyncio.sleep(delay)
        result = await agents[ctx.stage](ctx)
        if progress:
            with open(progress, "a", encoding="utf-8") as handle:
                handle.write(ctx.stage + "\n")
        return result

    return agent


def flaky(config: ProwziConfig) -> Agent:
    """Like ``slow``, but the first attempt of each stage fails with a transient error, so a
    retry shows in telemetry and in the monitor."""
    delay = float(os.environ.get("PROWZI_TEST_DELAY", "0.3"))
    agents = default_agents(config)

    async def agent(ctx: StageContext) -> BaseModel:
        await asyncio.sleep(delay)
        if ctx.attempt == 1:
            raise TransientError("Rate limit exceeded")
        return await agents[ctx.stage](ctx)

    return agent


def failing(config: ProwziConfig) -> Agent:
    """Fails transiently while ``PROWZI_TEST_FAIL_MARKER`` names an existing file."""
    agents = default_agents(config)
    marker = os.environ.get("PROWZI_TEST_FAIL_MARKER")

    async def agent(ctx: StageContext) -> BaseModel:
        if marker and Path(marker).exists():
            raise TransientError(f"injected failure in {ctx.stage}")
        return await agents[ctx.stage](ctx)

    return agent


def blocking(config: ProwziConfig) -> Agent:
    """Announces itself in ``PROWZI_TEST_PROGRESS`` (as ``blocked:<stage>``), then blocks a
    worker thread for ``PROWZI_TEST_BLOCK`` seconds (default 30) before running the default."""
    import time

    seconds = float(os.environ.get("PROWZI_TEST_BLOCK", "30"))
    progress = os.environ.get("PROWZI_TEST_PROGRESS")
    agents = default_agents(config)

    async def agent(ctx: StageContext) -> BaseModel:
        if progress:
            with open(progress, "a", encoding="utf-8") as handle:
                handle.write(f"blocked:{ctx.stage}\n")
        await asyncio.to_thread(time.sleep, seconds)
        return await agents[ctx.stage](ctx)

    return agent


def lose_checkpoint_dir(config: ProwziConfig) -> Agent:
    """Before running the default agent, moves the checkpoint directory aside (to
    ``<dir>.moved``) and puts a file where it was: the saves after this stage fail."""
    agents = default_agents(config)

    async def agent(ctx: StageContext) -> BaseModel:
        directory = config.checkpoint_dir
        if directory.is_dir():
            directory.rename(directory.with_name(directory.name + ".moved"))
            directory.write_text("not a directory any more\n", encoding="utf-8")
        return await agents[ctx.stage](ctx)

    return agent

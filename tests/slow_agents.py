"""Slow agents for the real-terminal monitor tests, loaded through ``PROWZI_AGENTS``.

``PROWZI_AGENTS="intent=slow_agents:slow,search=slow_agents:flaky,..."`` with ``tests/`` on
``PYTHONPATH``. Each wraps the default agent of its stage:

- ``slow``: sleeps ``PROWZI_TEST_STAGE_DELAY`` seconds (default 0.8), then runs the default;
- ``flaky``: like ``slow``, but the first attempt of each stage fails with a transient error,
  so the monitor shows a retry.
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from prowzi.agents import default_agents
from prowzi.agents.base import Agent, StageContext
from prowzi.config import ProwziConfig
from prowzi.errors import TransientError


def _delay() -> float:
    return float(os.environ.get("PROWZI_TEST_STAGE_DELAY", "0.8"))


def slow(config: ProwziConfig) -> Agent:
    agents = default_agents(config)
    delay = _delay()

    async def agent(ctx: StageContext) -> BaseModel:
        await asyncio.sleep(delay)
        return await agents[ctx.stage](ctx)

    return agent


def flaky(config: ProwziConfig) -> Agent:
    agents = default_agents(config)
    delay = _delay()

    async def agent(ctx: StageContext) -> BaseModel:
        await asyncio.sleep(delay)
        if ctx.attempt == 1:
            raise TransientError("Rate limit exceeded")
        return await agents[ctx.stage](ctx)

    return agent

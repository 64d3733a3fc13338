"""No-op agents for the worker tests and benchmarks, loaded by worker processes through
``PROWZI_AGENTS`` (this directory on ``PYTHONPATH``). Each stage sleeps
``PROWZI_TEST_STAGE_DELAY`` seconds first (a test's knob, not a Prowzi setting), so a run
lasts long enough to be killed in the middle."""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from prowzi.agents.base import StageContext
from prowzi.config import ProwziConfig
from prowzi.testing import noop_result
from prowzi.workflows.stages import STAGE_NAMES


class SlowNoop:
    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.delay = float(os.environ.get("PROWZI_TEST_STAGE_DELAY", "0"))

    async def __call__(self, ctx: StageContext) -> BaseModel:
        if self.delay:
            await asyncio.sleep(self.delay)
        return noop_result(self.stage, ctx)


def _make(stage: str):  # type: ignore[no-untyped-def]
    def make(config: ProwziConfig) -> SlowNoop:
        return SlowNoop(stage)

    return make


for _stage in STAGE_NAMES:
    globals()[_stage] = _make(_stage)

AGENTS = ",".join(f"{stage}=worker_agents:{stage}" for stage in STAGE_NAMES)
"""The ``PROWZI_AGENTS`` value that gives every stage its slow no-op agent."""

"""Agents for tests that drive real ``prowzi`` processes (``prowzi serve``, ``prowzi run``).

Named through ``PROWZI_AGENTS`` with ``tests/`` on ``PYTHONPATH`` (see :func:`agents_setting`).
Each stage returns the no-op result of :mod:`prowzi.testing`, so these tests exercise the
service and its telemetry, not the research algorithms. Behaviour comes from the environment:

- ``PROWZI_TEST_DELAY``: seconds every stage attempt sleeps (default 0);
- ``PROWZI_TEST_FLAKY_STAGE``: this stage fails transiently on its first attempt;
- ``PROWZI_TEST_FAIL_STAGE``: this stage fails permanently;
- ``PROWZI_TEST_FAIL_MARKER``: while this file exists, every stage fails permanently.

This module holds no tests; pytest collects it and finds none.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel
from shared import PROWZI_CLI

from prowzi.agents.base import Agent, StageContext
from prowzi.config import ProwziConfig
from prowzi.errors import PermanentError, TransientError
from prowzi.testing import STAGES, noop_result

TESTS_DIR = Path(__file__).resolve().parent


def agent(config: ProwziConfig) -> Agent:
    delay = float(os.environ.get("PROWZI_TEST_DELAY", "0"))
    flaky = os.environ.get("PROWZI_TEST_FLAKY_STAGE")
    failing = os.environ.get("PROWZI_TEST_FAIL_STAGE")
    marker = os.environ.get("PROWZI_TEST_FAIL_MARKER")

    async def run(ctx: StageContext) -> BaseModel:
        ctx.annotate("test_agent", True)
        if delay:
            await asyncio.sleep(delay)
        if marker and Path(marker).exists():
            raise PermanentError(f"injected failure in {ctx.stage} (marker present)")
        if ctx.stage == failing:
            raise PermanentError(f"injected failure in {ctx.stage}")
        if ctx.stage == flaky and ctx.attempt == 1:
            ctx.event("prowzi.test.flaky", stage=ctx.stage)
            raise TransientError(f"injected transient failure in {ctx.stage}")
        return noop_result(ctx.stage, ctx)

    return run


def agents_setting() -> str:
    """The ``PROWZI_AGENTS`` value that routes every stage to :func:`agent`."""
    return ",".join(f"{stage}=test_service_support:agent" for stage in STAGES)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a ``prowzi`` subprocess using these agents."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROWZI_", "OTEL_"))}
    pythonpath = [str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    env.update(
        PYTHONPATH=os.pathsep.join(pythonpath),
        PROWZI_AGENTS=agents_setting(),
        PROWZI_RETRY_BACKOFF_BASE="0.01",
        PROWZI_RETRY_BACKOFF_MAX="0.05",
    )
    env.update(extra)
    return env


def run_prowzi(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``prowzi ARGS`` in ``cwd`` as a real process with these agents, to its end."""
    return subprocess.run(
        [*PROWZI_CLI, *args],
        cwd=cwd,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_until_ready(
    url: str,
    process: subprocess.Popen[Any],
    what: str,
    log: Path | None = None,
    interval: float = 0.05,
) -> None:
    """Until ``url`` answers 200: a server ``process`` has started. If it exits first, or
    does not answer within 30 s, it is killed and ``RuntimeError`` says so (with ``log``)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            shown = "" if log is None else ":\n" + log.read_text(errors="replace")
            raise RuntimeError(f"{what} did not start{shown}")
        time.sleep(interval)

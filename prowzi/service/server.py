"""Run the service under uvicorn with a graceful SIGTERM.

On SIGTERM (or SIGINT) the service stops accepting runs and cancels the runs in flight at
once, so that their Server-Sent Events streams end and uvicorn's wait for open connections is
short; the orchestrator checkpoints each cancelled run's completed stages as it unwinds, the
journal marks them interrupted, and the process exits. A later start lists them as interrupted
and, with ``resume_interrupted``, resumes them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from prowzi.service.app import ServiceSettings, create_app
from prowzi.service.journal import RunJournal
from prowzi.service.runs import RunManager
from prowzi.service.state import StateDirectory

if TYPE_CHECKING:
    from prowzi.config import ProwziConfig

log = logging.getLogger("prowzi.service")


class _Server(uvicorn.Server):
    """uvicorn's server, telling the run manager about a shutdown signal immediately."""

    def __init__(self, config: uvicorn.Config, manager: RunManager) -> None:
        super().__init__(config)
        self._manager = manager
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._manager.begin_shutdown)
        super().handle_exit(sig, frame)


def serve(
    config: ProwziConfig,
    settings: ServiceSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> None:
    """Serve until SIGTERM/SIGINT; returns after the runs in flight were checkpointed.

    Before anything listens, the state directory is locked for the service's lifetime (one
    service owns one state directory) and its run journal is read: a directory another
    service holds, a path that is not a directory or a journal that cannot be read stop the
    start-up with an error (:class:`~prowzi.errors.ProwziError`) and leave the files as they
    are."""
    state = StateDirectory(settings.state_dir)
    state.acquire()
    try:
        RunJournal(settings.state_dir).load()  # unreadable: refuse now, before serving
        _serve(config, settings, host=host, port=port, log_level=log_level)
    finally:
        state.release()


def _serve(
    config: ProwziConfig, settings: ServiceSettings, *, host: str, port: int, log_level: str
) -> None:
    from prowzi.workflows.composition import build_tracer, shutdown_tracer

    tracer = build_tracer()
    app = create_app(config, settings, tracer=tracer)
    server = _Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            lifespan="on",
            timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout),
        ),
        app.state.manager,
    )
    try:
        server.run()
    finally:
        shutdown_tracer(tracer)

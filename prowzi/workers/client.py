"""The workers seen from a front end (``prowzi serve`` with a broker): submit a run, follow its
events wherever it runs, cancel it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from prowzi.events import Event

if TYPE_CHECKING:
    from prowzi.config import ProwziConfig
    from prowzi.tracing import RunTracer


class RemoteRuns:
    """Runs executed by ``prowzi worker`` processes on ``config.broker_url``."""

    def __init__(self, config: ProwziConfig, tracer: RunTracer | None = None) -> None:
        import redis.asyncio

        from prowzi.workers.streams import connect

        if not config.broker_url:
            raise ValueError("RemoteRuns needs a broker_url")
        self.config = config
        self.tracer = tracer
        self._redis = connect(config.broker_url)
        # No socket timeout on the follower's client: a blocking read waits by design.
        self._async = redis.asyncio.Redis.from_url(config.broker_url, socket_connect_timeout=2)

    def submit(self, session_id: str, prompt: str, max_results_per_query: int) -> str:
        """Enqueue the run; returns the session's event stream position before it, to follow
        from (blocking I/O: call it from a worker thread)."""
        from prowzi.workers.app import submit
        from prowzi.workers.streams import stream_position

        position = stream_position(self._redis, session_id)
        submit(
            self.config,
            prompt,
            session_id=session_id,
            max_results_per_query=max_results_per_query,
            tracer=self.tracer,
        )
        return position

    async def follow(self, session_id: str, after: str = "0") -> AsyncIterator[Event]:
        """The run's events after stream entry ``after``, to the run's end."""
        from prowzi.workers.streams import follow_run_async

        async for event in follow_run_async(self._async, session_id, after=after):
            yield event

    def cancel(self, session_id: str) -> None:
        """Ask the worker running the session (or the one that will) to cancel it; the
        request lasts as long as a run may (blocking I/O: call it from a worker thread)."""
        from prowzi.workers.app import visibility_timeout
        from prowzi.workers.streams import request_cancel

        request_cancel(self._redis, session_id, visibility_timeout(self.config))

    async def close(self) -> None:
        await self._async.aclose()
        self._redis.close()


__all__ = ["RemoteRuns"]

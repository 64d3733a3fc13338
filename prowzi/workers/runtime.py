"""What a worker process does with a delivered run.

One worker process (``prowzi worker``) has one asyncio loop on a thread of its own and one
orchestrator; Celery's thread pool (``--concurrency`` slots) hands each delivered run to that
loop and waits for it. Why threads, not Celery's default process pool: runs wait on models
and stores, not on the CPU, and a SIGTERM must reach the runs to checkpoint them, which the
main process can only do for runs it holds itself. Scale CPU with more worker processes
(replicas), each with its own slots.

A delivery (:func:`execute`):

1. takes the session's lease (:meth:`~prowzi.workflows.orchestrator.ProwziOrchestrator.deliver`).
   Held by a live worker: the delivery is a **duplicate**, counted, acknowledged, nothing run.
   Expired, or its worker gone: the run is **taken over** and continues from its last
   checkpoint. Every stage already checkpointed: nothing runs (**already complete**).
2. runs under the run's time limit (``PROWZI_RUN_TIME_LIMIT_SECONDS``), enforced here with
   ``asyncio.timeout`` because a thread pool cannot kill a task (Celery's own time limits need
   its process pool); the run checkpoints as it is stopped.
3. watches for a cancellation requested through the broker (the service's cancel); the run is
   cancelled, checkpointing first, and acknowledged.
4. on SIGTERM to the worker, every run is marked requeued in its event stream, cancelled (each
   checkpoints its completed stages), its lease released, and its message rejected back to the
   queue; another worker continues it from the checkpoint.

A ``kill -9`` does none of this: the message stays unacknowledged until Redis's visibility
timeout gives it to another worker, which finds the lease of a dead writer and takes over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from prowzi.errors import ConfigError, SessionLockedError, WorkflowFailedError
from prowzi.events import WorkflowFailed
from prowzi.storage.lease import LeaseLostError

if TYPE_CHECKING:
    from celery import Celery
    from prometheus_client import CollectorRegistry

    from prowzi.config import ProwziConfig
    from prowzi.observability.metrics import MetricsServer, WorkerMetrics
    from prowzi.workers.streams import RedisEventStream
    from prowzi.workflows.orchestrator import ProwziOrchestrator

log = logging.getLogger("prowzi.workers")

CANCEL_POLL_SECONDS = 0.25
"""How often a run checks whether its cancellation was requested through the broker."""


class Requeue(Exception):
    """The worker is stopping: the run was checkpointed and goes back to the queue."""


class WorkerRuntime:
    """One worker process's loop, orchestrator, metrics and runs in flight."""

    def __init__(self, config: ProwziConfig, *, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import CollectorRegistry

        from prowzi.observability.metrics import WorkerMetrics
        from prowzi.workers.streams import RedisEventStream, connect
        from prowzi.workflows.composition import build_metrics
        from prowzi.workflows.orchestrator import ProwziOrchestrator

        if not config.broker_url:
            raise ConfigError("no broker configured: set PROWZI_BROKER_URL")
        self.config = config
        self.name = f"{socket.gethostname()} pid {os.getpid()}"
        self.registry = registry if registry is not None else CollectorRegistry()
        self.run_metrics = build_metrics(self.registry)
        self.redis = connect(config.broker_url)
        self.metrics: WorkerMetrics = WorkerMetrics(self.registry, self._queue_depth)
        self.orchestrator: ProwziOrchestrator = ProwziOrchestrator(
            config=config, sinks=[self.run_metrics], on_sink_error=self.run_metrics.sink_error
        )
        self.orchestrator.agents  # noqa: B018  (a bad agent setting stops the worker at start)
        self.queues: tuple[str, ...] = ()
        self.stopping = threading.Event()
        self._runs: dict[str, asyncio.Task[Any]] = {}
        self._cancelled: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="prowzi-worker-loop", daemon=True
        )
        self._thread.start()
        self.metrics_server: MetricsServer | None = None
        self._stream: RedisEventStream | None = next(
            (s for s in self.orchestrator.event_sinks() if isinstance(s, RedisEventStream)), None
        )

    # --- metrics ----------------------------------------------------------------------------

    def _queue_depth(self) -> float:
        from prowzi.workers.app import QUEUE

        return float(sum(self.redis.llen(q) for q in (self.queues or (QUEUE,))))

    def serve_metrics(self, port: int, host: str) -> MetricsServer:
        from prowzi.observability.metrics import serve_metrics

        self.metrics_server = serve_metrics(self.registry, port, host)
        return self.metrics_server

    # --- deliveries -------------------------------------------------------------------------

    def execute(
        self,
        session_id: str,
        prompt: str,
        max_results_per_query: int,
        trace: Mapping[str, str] | None,
        queued_at: float | None,
    ) -> str:
        """Run one delivery to its end (called on a Celery pool thread); returns its outcome,
        or raises :class:`Requeue` when the worker is stopping."""
        if self.stopping.is_set():
            raise Requeue(session_id)
        future: Future[str] = asyncio.run_coroutine_threadsafe(
            self._deliver(session_id, prompt, max_results_per_query, trace, queued_at), self._loop
        )
        outcome = future.result()
        if self._stream is not None:
            self._stream.flush()  # followers elsewhere see the run's end before the ack
        if outcome == "requeued":
            raise Requeue(session_id)
        return outcome

    async def _deliver(
        self,
        sid: str,
        prompt: str,
        max_results_per_query: int,
        trace: Mapping[str, str] | None,
        queued_at: float | None,
    ) -> str:
        from prowzi.observability.otel import continue_trace
        from prowzi.workers.streams import cancel_requested

        task = asyncio.current_task()
        assert task is not None
        orchestrator = self.orchestrator
        leases = orchestrator.checkpoint_manager.leases
        if await asyncio.to_thread(cancel_requested, self.redis, sid):
            # Cancelled while queued: nothing ran, but followers elsewhere hear the run ended.
            if self._stream is not None:
                self._stream.handle(
                    WorkflowFailed(
                        session_id=sid,
                        timestamp=time.time(),
                        duration_seconds=0.0,
                        stage=None,
                        error="cancelled before it started",
                        error_type="cancelled",
                        cancelled=True,
                    )
                )
            self.metrics.deliveries.labels("cancelled").inc()
            return "cancelled"
        if sid in self._runs:
            # This worker runs the session already: a duplicate delivery. (It must not replace
            # the run's entry: SIGTERM and cancels reach runs through it.)
            log.info("%s: duplicate delivery: this worker is running it", sid)
            self.metrics.deliveries.labels("duplicate").inc()
            return "duplicate"
        self._runs[sid] = task
        self.metrics.in_flight.inc()
        watcher = asyncio.get_running_loop().create_task(self._watch_cancel(sid, task))
        lease = await asyncio.to_thread(leases.status, sid)
        outcome = "failed"
        try:
            with continue_trace(orchestrator.tracer, trace, session_id=sid, queued_at=queued_at):
                async with asyncio.timeout(self.config.run_time_limit_seconds):
                    result = await orchestrator.deliver(
                        prompt,
                        session_id=sid,
                        max_results_per_query=max_results_per_query,
                        document_path=self.config.output_dir / f"{sid}.md",
                        metadata={"worker": self.name, "lease_found": lease},
                    )
            outcome = "already_complete" if result is None else "completed"
        except LeaseLostError:
            self.metrics.leases_lost.inc()
        except SessionLockedError as exc:
            log.info("%s: duplicate delivery: %s", sid, exc)
            outcome = "duplicate"
        except WorkflowFailedError as exc:
            log.warning("%s failed: %s", sid, exc)
        except TimeoutError:
            log.warning("%s stopped: over its time limit", sid)
        except asyncio.CancelledError:
            if sid in self._cancelled:
                task.uncancel()
                outcome = "cancelled"
            elif self.stopping.is_set():
                task.uncancel()
                outcome = "requeued"
            else:
                raise
        finally:
            watcher.cancel()
            self._runs.pop(sid, None)
            self._cancelled.discard(sid)
            self.metrics.in_flight.dec()
        if outcome != "duplicate" and lease in ("expired", "dead"):
            self.metrics.takeovers.labels("expired" if lease == "expired" else "holder_gone").inc()
        self.metrics.deliveries.labels(outcome).inc()
        return outcome

    async def _watch_cancel(self, sid: str, task: asyncio.Task[Any]) -> None:
        from prowzi.workers.streams import cancel_requested

        while True:
            await asyncio.sleep(CANCEL_POLL_SECONDS)
            try:
                requested = await asyncio.to_thread(cancel_requested, self.redis, sid)
            except Exception as exc:  # the broker is away: the run goes on
                log.debug("cannot check %s for a cancellation: %s", sid, exc)
                continue
            if requested:
                self._cancelled.add(sid)
                task.cancel()
                return

    # --- shutdown ---------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM: hand every run back (requeued, then cancelled: each checkpoints)."""
        if self.stopping.is_set():
            return
        self.stopping.set()

        def cancel_all() -> None:
            for sid, task in list(self._runs.items()):
                if self._stream is not None:
                    self._stream.control(sid, "requeued")
                task.cancel()

        self._loop.call_soon_threadsafe(cancel_all)

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self._stream is not None:
            self._stream.flush()
        from prowzi.workflows.composition import shutdown_tracer

        shutdown_tracer(self.orchestrator.tracer)
        self._loop.call_soon_threadsafe(self._loop.stop)


_RUNTIME: WorkerRuntime | None = None


def register_task(app: Celery) -> None:
    """The run task, on ``app``: the body every delivery of a queued run executes."""
    from celery.exceptions import Reject

    @app.task(name="prowzi.run", bind=True)  # type: ignore[untyped-decorator]
    def run(
        self: Any,
        session_id: str,
        prompt: str,
        max_results_per_query: int = 15,
        trace: dict[str, str] | None = None,
        queued_at: float | None = None,
    ) -> dict[str, str]:
        if _RUNTIME is None:  # pragma: no cover - only a worker started by run_worker runs tasks
            raise Reject("no Prowzi worker runtime in this process", requeue=True)
        try:
            outcome = _RUNTIME.execute(session_id, prompt, max_results_per_query, trace, queued_at)
        except Requeue:
            raise Reject("the worker is stopping; the run was checkpointed", requeue=True) from None
        return {"session_id": session_id, "outcome": outcome, "worker": _RUNTIME.name}


def run_worker(
    config: ProwziConfig,
    *,
    concurrency: int,
    queues: list[str],
    loglevel: str,
    metrics_port: int | None,
    metrics_host: str,
    hostname: str | None = None,
) -> None:
    """Start a Celery worker in this process (``prowzi worker``) until it is stopped."""
    global _RUNTIME
    from celery import signals

    from prowzi.workers.app import make_app

    app = make_app(config)
    register_task(app)
    runtime = _RUNTIME = WorkerRuntime(config)
    runtime.queues = tuple(queues)
    if metrics_port is not None:
        server = runtime.serve_metrics(metrics_port, metrics_host)
        log.warning("metrics on http://%s:%d/metrics", metrics_host, server.port)

    def shutting_down(**_: Any) -> None:
        runtime.stop()

    signals.worker_shutting_down.connect(shutting_down, weak=False)
    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency}",
        f"--queues={','.join(queues)}",
        f"--loglevel={loglevel}",
        # Mingle and gossip synchronise worker state Prowzi does not use (it coordinates
        # through leases); without them a worker starts in a fraction of a second.
        "--without-mingle",
        "--without-gossip",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    try:
        app.worker_main(argv)
    finally:
        runtime.close()
        _RUNTIME = None


__all__ = ["WorkerRuntime", "register_task", "run_worker"]

"""The Celery application of ``prowzi worker``, and enqueuing a run.

Why Celery on Redis: a maintained, widely deployed distributed task queue, so Prowzi does not
grow a home-made one. What Prowzi needs from it is small: deliver each run at least once to one
of many worker processes, give a run back when its worker dies, and let operators scale,
inspect and route workers with tools they already know. Exactly-once *execution* is Prowzi's
own job, done by the session lease (:mod:`prowzi.storage.lease`) in
:meth:`~prowzi.workflows.orchestrator.ProwziOrchestrator.deliver`, because no broker gives it.

A queued run is a message naming the session id (also the task id), the prompt and its
parameters, the submitter's trace context and the time it was queued. JSON only: a worker
never unpickles what a broker hands it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prowzi.errors import ConfigError
from prowzi.ids import new_session_id, validate_session_id

if TYPE_CHECKING:
    from celery import Celery

    from prowzi.config import ProwziConfig
    from prowzi.tracing import RunTracer

QUEUE = "prowzi"
"""The default queue (``prowzi worker --queues`` may consume others too)."""
TASK_NAME = "prowzi.run"


def visibility_timeout(config: ProwziConfig) -> float:
    """How long Redis keeps a delivered, unacknowledged run before delivering it again.

    Longer than the longest allowed run (:attr:`run_time_limit_seconds`, which the worker
    enforces) plus two lease periods: a live run is never handed to a second worker by the
    timeout alone, and by the time a dead worker's run comes back its lease has run out, so the
    new worker takes it over at once."""
    return config.run_time_limit_seconds + 2 * config.lease_ttl_seconds


def celery_settings(config: ProwziConfig) -> dict[str, Any]:
    """Celery's settings for long, costly runs; why each one is what it is, beside it."""
    visibility = visibility_timeout(config)
    return {
        "broker_url": config.broker_url,
        "task_default_queue": QUEUE,
        # JSON only: a message from the broker is never unpickled.
        "task_serializer": "json",
        "accept_content": ["json"],
        # No result backend: a run's outcome is its telemetry and checkpoints, which any
        # machine can read; a second copy in Redis would only grow.
        "task_ignore_result": True,
        # Acknowledge a run when it ends, not when it is received: a worker that dies mid-run
        # leaves its message unacknowledged, so Redis delivers it again and the lease decides
        # who continues it.
        "task_acks_late": True,
        # A worker child that is lost (killed, out of memory) rejects its message back to the
        # queue instead of acknowledging a run that never finished. (That is Celery's process
        # pool; `prowzi worker` runs threads, so a lost worker is a lost process, and its
        # unacknowledged messages come back after the visibility timeout below.)
        "task_reject_on_worker_lost": True,
        # One message per free slot: a run takes minutes, and a worker that reserved more
        # would sit on runs that idle workers could start now.
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {
            # See visibility_timeout(): longer than the longest run, so only dead workers'
            # runs are delivered again by it.
            "visibility_timeout": visibility,
            # How often a worker looks for such runs (Redis has no timer of its own): one
            # cheap sorted-set query each time (throttle 1: kombu's default only queries on
            # every tenth tick, which would delay a dead worker's runs tenfold).
            "unacked_restore_interval": max(0.5, min(10.0, visibility / 4)),
            "unacked_restore_throttle": 1,
        },
        # A broker restart must not cancel runs in flight: their checkpoints and leases are in
        # the store, not in Redis, and the redelivery that may follow ends as a duplicate.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # A worker started before Redis (compose, a rollout) waits for it instead of exiting.
        "broker_connection_retry_on_startup": True,
        # Logging is Prowzi's (PROWZI_LOG_LEVEL, one format for every command), not Celery's.
        "worker_hijack_root_logger": False,
    }


def make_app(config: ProwziConfig) -> Celery:
    """A Celery app on ``config.broker_url``; :class:`ConfigError` when none is set."""
    if not config.broker_url:
        raise ConfigError("no broker configured: set PROWZI_BROKER_URL (redis://host:6379/0)")
    from celery import Celery

    app = Celery("prowzi", set_as_current=False)
    app.conf.update(celery_settings(config))
    return app


_APPS: dict[tuple[str, float], Celery] = {}


def _app_for(config: ProwziConfig) -> Celery:
    """One app (and connection pool) per broker, reused by every submission."""
    key = (str(config.broker_url), visibility_timeout(config))
    app = _APPS.get(key)
    if app is None:
        app = _APPS[key] = make_app(config)
    return app


def submit(
    config: ProwziConfig,
    prompt: str,
    *,
    session_id: str | None = None,
    max_results_per_query: int = 15,
    tracer: RunTracer | None = None,
    queue: str = QUEUE,
) -> str:
    """Enqueue a run for the workers and return its session id (the task id too, so a
    submission retried by a client is the same task, and the lease runs it once).

    The submitter's trace context travels with the message: with a tracer, a ``send`` span
    here becomes the parent of the run's spans on the worker."""
    sid = validate_session_id(session_id) if session_id is not None else new_session_id()
    from prowzi.observability.otel import submit_span
    from prowzi.tracing import NullTracer

    app = _app_for(config)
    with submit_span(tracer if tracer is not None else NullTracer(), sid) as carrier:
        app.send_task(
            TASK_NAME,
            kwargs={
                "session_id": sid,
                "prompt": prompt,
                "max_results_per_query": max_results_per_query,
                "trace": carrier,
                "queued_at": time.time(),
            },
            task_id=sid,
            queue=queue,
        )
    return sid


__all__ = ["QUEUE", "TASK_NAME", "celery_settings", "make_app", "submit", "visibility_timeout"]

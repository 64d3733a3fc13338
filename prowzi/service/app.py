"""The Prowzi HTTP API (FastAPI): start, list, inspect, follow, resume and cancel runs.

No endpoint accepts a filesystem path: runs write where the service's configuration says.
Session ids in URLs are validated with :mod:`prowzi.ids` before anything is looked up.
The service's own file and store work (telemetry reads and lease probes, the run journal,
documents served, resume plans) runs in worker threads, never on the event loop, so a slow
disk or store does not hold up other requests and event streams.
Server-Sent Events are ``sse-starlette``'s :class:`EventSourceResponse`: it frames the
messages, sends the keep-alive comments and notices a client that goes away (the stream's
generator is then cancelled; ``/readyz`` counts the streams open). A recorded event log is
replayed a bounded chunk at a time, read, parsed and encoded in a worker thread, so a log of
any size takes the same memory and leaves the event loop free.
Errors are JSON objects with a ``detail`` message: 400 for a malformed id (or Last-Event-ID),
404 for an unknown run, 409 for a request that does not fit the run's state, 413 for a body over
64 KiB however it is framed, 422 for an invalid body (read strictly: a boolean is not a count),
429 when the queue is full, 503 while shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prowzi import __version__
from prowzi.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    InvalidIdentifierError,
    InvalidInputError,
    SessionNotFoundError,
    TelemetryError,
)
from prowzi.events import EventSink
from prowzi.ids import new_session_id, validate_session_id
from prowzi.observability.metrics import ProwziMetrics, render
from prowzi.service.journal import RUN_STATES, JournalEntry, RunJournal
from prowzi.service.runs import (
    QueueFullError,
    RunConflictError,
    RunManager,
    RunRecord,
    ServiceUnavailableError,
)
from prowzi.storage.files import read_nofollow
from prowzi.workflows.composition import build_metrics, build_tracer, llm_models

if TYPE_CHECKING:
    from prowzi.config import ProwziConfig
    from prowzi.tracing import RunTracer
    from prowzi.webhooks import Webhooks
    from prowzi.workflows.eventlog import EventLogReader
    from prowzi.workflows.orchestrator import ProwziOrchestrator
    from prowzi.workflows.telemetry import TelemetryCollector

log = logging.getLogger("prowzi.service")

MAX_BODY_BYTES = 64 * 1024


@dataclass(slots=True)
class ServiceSettings:
    """How the service runs; ``prowzi serve`` fills it from its options."""

    max_concurrent: int = 2
    max_queue: int = 100
    resume_interrupted: bool = False
    state_dir: Path = field(default_factory=lambda: Path("./prowzi_service"))
    shutdown_timeout: float = 30.0
    keepalive_seconds: float = 15.0
    """Interval of the keep-alive comments on an event stream (0: none)."""


# --- request and response bodies ------------------------------------------------------------


_TAKEN_ON = ("running", "completed")
"""Telemetry states that overrule a run the journal left interrupted: a resume elsewhere (the
CLI) took it on since. (Telemetry says failed for the interruption itself: that does not.)"""


class RunRequest(BaseModel):
    """Start a run. Unknown fields (such as a path) are refused, and values are read
    strictly: a boolean or a string is not a count."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=10_000, description="The research prompt.")
    max_results_per_query: int = Field(15, ge=1, le=1000)
    model: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Run the LLM agents with this model: one the server's configuration "
        "names (PROWZI_LLM_MODEL, _STAGE_MODELS, _PRICES). The server's API key is used; a "
        "request never carries one.",
    )
    max_cost_usd: float | None = Field(None, ge=0, description="Budget of model calls, USD.")
    max_tokens: int | None = Field(None, ge=0, description="Budget of model calls, tokens.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is blank")
        return value.strip()


class RunAccepted(BaseModel):
    session_id: str
    state: str
    links: dict[str, str]


class RunInfo(BaseModel):
    session_id: str
    state: str = Field(description=f"one of {', '.join(RUN_STATES)} or running (telemetry)")
    prompt: str = ""
    kind: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    trace_id: str | None = None
    stages_completed: int | None = None
    stages_total: int | None = None
    telemetry: dict[str, Any] | None = Field(
        None, description="The session's telemetry record (GET /runs/{id} only)."
    )


class RunList(BaseModel):
    runs: list[RunInfo]


def _links(session_id: str) -> dict[str, str]:
    base = f"/runs/{session_id}"
    return {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel"}


def _session(session_id: str) -> str:
    return validate_session_id(session_id)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


# --- the application ------------------------------------------------------------------------


def create_app(
    config: ProwziConfig,
    settings: ServiceSettings | None = None,
    *,
    registry: CollectorRegistry | None = None,
    tracer: RunTracer | None = None,
    orchestrator_factory: Callable[[EventSink, ProwziMetrics], ProwziOrchestrator] | None = None,
) -> FastAPI:
    """The service for ``config``. Checkpointing is switched on: the service promises that a
    run interrupted by a shutdown resumes where it stopped."""
    settings = settings or ServiceSettings()
    config = config.model_copy(update={"enable_checkpointing": True})
    metrics = build_metrics(registry, config)

    hub: list[Webhooks] = []

    def webhooks() -> Webhooks:
        """The service's webhooks (its subscriptions, outbox and delivery worker), started
        at the first use: at start-up when there is anything to deliver or anyone to
        deliver to, else at the first subscription."""
        if not hub:
            from prowzi.webhooks import webhooks_for

            hub.append(webhooks_for(config))
            metrics.watch_webhooks(hub[0].deliverer)
        return hub[0]

    def default_factory(sink: EventSink, metrics: ProwziMetrics) -> ProwziOrchestrator:
        from prowzi.workflows.orchestrator import ProwziOrchestrator

        return ProwziOrchestrator(
            config=config,
            sinks=[metrics, sink],
            tracer=tracer if tracer is not None else build_tracer(),
            on_sink_error=metrics.sink_error,
        )

    def llm_factory(sink: EventSink, entry: JournalEntry) -> ProwziOrchestrator:
        from prowzi.workflows.orchestrator import ProwziOrchestrator

        run_config = config.model_copy(
            update={
                "llm_model": entry.model or config.llm_model,
                "llm_max_cost_usd": entry.max_cost_usd,
                "llm_max_tokens": entry.max_tokens,
            }
        )
        return ProwziOrchestrator(
            config=run_config,
            sinks=[metrics, sink],
            tracer=tracer if tracer is not None else build_tracer(),
            on_sink_error=metrics.sink_error,
        )

    factory = orchestrator_factory or default_factory
    remote = None
    if config.broker_url:
        # With a broker the workers run the runs; documents are where they write them.
        from prowzi.workers.client import RemoteRuns

        remote = RemoteRuns(config, tracer if tracer is not None else build_tracer())
    manager = RunManager(
        lambda sink: factory(sink, metrics),
        RunJournal(settings.state_dir),
        metrics,
        max_concurrent=settings.max_concurrent,
        max_queue=settings.max_queue,
        shutdown_timeout=settings.shutdown_timeout,
        documents_dir=settings.state_dir / "documents" if remote is None else config.output_dir,
        remote=remote,
        llm_orchestrator_factory=llm_factory if orchestrator_factory is None else None,
    )
    telemetry_reader: list[TelemetryCollector] = []

    def telemetry() -> TelemetryCollector:
        if not telemetry_reader:
            from prowzi.workflows.telemetry import TelemetryCollector

            telemetry_reader.append(
                TelemetryCollector.reader(
                    config.telemetry_dir,
                    store=config.telemetry_url,
                    checkpoints=config.checkpoint_location,
                )
            )
        return telemetry_reader[0]

    async def _interrupted(sid: str) -> bool:
        """Whether the session's telemetry says its writer died before it finished."""
        reader = telemetry()

        def status() -> str:
            return reader.status_of(reader.load_session(sid))

        try:
            # Files, and the store's lease record: in a worker thread.
            return await asyncio.to_thread(status) == "interrupted"
        except TelemetryError:
            return False

    async def retain(age: timedelta) -> None:
        """Apply ``PROWZI_RETENTION``: delete what finished sessions older than ``age`` left
        (:func:`prowzi.workflows.retention.sweep`) and forget their runs; at start-up, then
        every quarter of ``age`` (at least a second apart, at most an hour)."""
        from prowzi.workflows.checkpoint import CheckpointManager
        from prowzi.workflows.retention import sweep

        period = min(max(age.total_seconds() / 4, 1.0), 3600.0)
        job = partial(
            sweep,
            config,
            older_than=age,
            documents_dir=manager.documents_dir,
            is_running=manager.is_active,
            manager=CheckpointManager.from_config(config),
            reader=telemetry(),
        )
        # A thread of its own: a sweep lists the whole store, and the memory a thread frees
        # stays with that thread's allocator arena. Sweeps taking turns on the shared pool
        # would leave a sweep's worth of memory behind in each of its threads.
        thread = ThreadPoolExecutor(1, thread_name_prefix="prowzi-retention")
        try:
            while True:
                try:
                    swept = await asyncio.get_running_loop().run_in_executor(thread, job)
                    forgotten = manager.expire(time.time() - age.total_seconds())
                    counts = (swept.checkpoints, swept.telemetry, swept.documents)
                    if any(counts) or swept.webhook_logs or forgotten:
                        log.info(
                            "retention: deleted %d checkpoint(s), the telemetry of %d "
                            "session(s), %d document(s) and the webhook delivery log of %d "
                            "session(s); forgot %d run(s)",
                            *map(len, counts),
                            len(swept.webhook_logs),
                            len(forgotten),
                        )
                    for problem in swept.errors:
                        log.warning("retention: could not delete %s", problem)
                except Exception as exc:  # a sweep that fails is retried; the service goes on
                    log.warning("retention: the sweep failed: %s", exc)
                await asyncio.sleep(period)
        finally:
            thread.shutdown(wait=False, cancel_futures=True)

    async def start_webhooks_if_wanted() -> None:
        """Start the webhooks if there is anyone to deliver to or anything to deliver."""
        from prowzi.webhooks import wanted

        if await asyncio.to_thread(wanted, config):
            await asyncio.to_thread(webhooks)

    async def look_for_webhooks() -> None:
        """Until the webhooks run, look every few seconds whether they are wanted now
        (subscriptions another service made, an outbox that could not be read)."""
        while not hub:
            await asyncio.sleep(_WEBHOOKS_LOOK_SECONDS)
            try:
                await start_webhooks_if_wanted()
            except Exception as exc:  # the extra is missing, say: said once, not again
                log.warning("webhooks: cannot start: %s", exc)
                return

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Started with the service when wanted: it delivers what earlier processes left.
        await start_webhooks_if_wanted()
        looking = None if hub else asyncio.create_task(look_for_webhooks(), name="prowzi-webhooks")
        interrupted = await manager.start(resume_interrupted=settings.resume_interrupted)
        if interrupted:
            log.warning(
                "%d run(s) were interrupted by the last shutdown: %s%s",
                len(interrupted),
                ", ".join(interrupted),
                "; resuming them"
                if settings.resume_interrupted
                else "; resume with POST /runs/{id}/resume or start with --resume-interrupted",
            )
        sweeper = (
            asyncio.create_task(retain(config.retention), name="prowzi-retention")
            if config.retention is not None
            else None
        )
        try:
            yield
        finally:
            for task in (sweeper, looking):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await manager.close()
            if remote is not None:
                await remote.close()
            if hub:
                from prowzi.webhooks import release

                await asyncio.to_thread(release, hub[0])

    app = FastAPI(
        title="Prowzi",
        version=__version__,
        summary="Durable, observable research runs over HTTP.",
        lifespan=lifespan,
    )
    app.state.manager = manager
    app.state.metrics = metrics
    streams = _StreamCount()
    app.state.event_streams = streams

    # --- errors ---------------------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse(
            {"detail": "invalid request: " + "; ".join(problems), "errors": problems},
            status_code=422,
        )

    @app.exception_handler(InvalidIdentifierError)
    async def _bad_id(request: Request, exc: InvalidIdentifierError) -> JSONResponse:
        return _error(400, str(exc))

    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)

    from prowzi.service.webhooks_api import webhook_router

    app.include_router(webhook_router(webhooks, config.webhook_allow_private))

    # --- runs -----------------------------------------------------------------------------

    @app.post("/runs", status_code=202, response_model=RunAccepted, tags=["runs"])
    async def start_run(body: RunRequest) -> Any:
        """Queue a run; it starts as soon as a slot is free. Returns its session id."""
        session_id = new_session_id()
        llm: dict[str, Any] = {}
        if body.model is not None or body.max_cost_usd is not None or body.max_tokens is not None:
            allowed = llm_models(config)
            if body.model is None and not config.llm_model:
                return _error(400, "a budget needs a model: no model is configured")
            if body.model is not None and body.model not in allowed:
                offered = ", ".join(allowed) or "none (PROWZI_LLM_MODEL is not set)"
                return _error(400, f"model {body.model!r} is not configured; configured: {offered}")
            llm = {
                "model": body.model,
                "max_cost_usd": body.max_cost_usd,
                "max_tokens": body.max_tokens,
            }
        try:
            record = manager.submit(session_id, body.prompt, body.max_results_per_query, **llm)
        except ServiceUnavailableError as exc:
            return _error(503, str(exc), {"Retry-After": "30"})
        except QueueFullError as exc:
            return _error(429, str(exc), {"Retry-After": "10"})
        await manager.journal_written()  # accepted means journaled
        return JSONResponse(
            RunAccepted(
                session_id=session_id, state=record.state, links=_links(session_id)
            ).model_dump(),
            status_code=202,
            headers={"Location": f"/runs/{session_id}"},
        )

    @app.get("/runs", response_model=RunList, tags=["runs"])
    async def list_runs(
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        state: Annotated[
            Literal["queued", "running", "completed", "failed", "cancelled", "interrupted"] | None,
            Query(),
        ] = None,
    ) -> RunList:
        """This process's runs, then the sessions in telemetry, newest first."""
        runs: dict[str, RunInfo] = {}
        for record in sorted(
            manager.records.values(), key=lambda r: r.entry.created_at, reverse=True
        ):
            runs[record.session_id] = RunInfo(**record.summary())
        try:
            sessions = await asyncio.to_thread(telemetry().list_sessions, limit=limit)
        except TelemetryError as exc:
            log.warning("cannot list telemetry sessions: %s", exc)
            sessions = []
        for summary in sessions:
            info = runs.get(summary.session_id)
            if info is None:
                data = summary.to_dict()
                runs[summary.session_id] = RunInfo(
                    session_id=summary.session_id,
                    state=data["status"],
                    prompt=summary.prompt,
                    error=summary.error,
                    stages_completed=summary.stages_completed,
                    stages_total=summary.stages_total,
                )
            else:
                info.stages_completed = summary.stages_completed
                info.stages_total = summary.stages_total
                if info.state == "interrupted" and summary.status in _TAKEN_ON:
                    info.state = summary.status
        selected = [r for r in runs.values() if state is None or r.state == state]
        return RunList(runs=selected[:limit])

    @app.get("/runs/{session_id}", response_model=RunInfo, tags=["runs"])
    async def get_run(session_id: str) -> Any:
        """A run's state and its telemetry record (stages, durations, retries, trace id)."""
        sid = _session(session_id)
        reader = telemetry()
        try:
            metrics = await asyncio.to_thread(reader.load_session, sid)
        except SessionNotFoundError:
            metrics = None
        except TelemetryError as exc:
            if sid not in manager.records:
                return _error(409, f"session {sid} has unreadable telemetry: {exc}")
            metrics = None
        # The record as it is now, after the read: not one the run has moved on from.
        record = manager.records.get(sid)
        info = RunInfo(**record.summary()) if record is not None else None
        if info is None and metrics is None:
            return _error(404, f"no run or session {sid}")
        if metrics is not None:
            data = metrics.to_dict()
            if info is None or info.state == "interrupted":
                # A session this process did not run, or one it left interrupted that a
                # resume elsewhere may have taken on: its log, and perhaps a lease, tell.
                state = await asyncio.to_thread(reader.status_of, metrics)
                if info is None:
                    info = RunInfo(session_id=sid, state=state, prompt=metrics.prompt)
                elif state in _TAKEN_ON:
                    info.state = state
            info.telemetry = data
            info.stages_completed = metrics.completed_stage_count
            info.stages_total = metrics.stage_total
            if info.trace_id is None and isinstance(data["metadata"].get("trace_id"), str):
                info.trace_id = data["metadata"]["trace_id"]
        return info

    @app.get(
        "/runs/{session_id}/document",
        tags=["runs"],
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/markdown": {}}}, 404: {"description": "no document"}},
    )
    async def get_document(session_id: str) -> Response:
        """The run's cited markdown document, once the run has completed."""
        sid = _session(session_id)
        path = manager.document_path(sid)
        text = None
        if path is not None:
            try:
                # Never through a symlink planted among the documents (nor a FIFO, nor a
                # directory): only the regular file the run wrote is served.
                data = await asyncio.to_thread(read_nofollow, path)
                text = data.decode("utf-8")
            except FileNotFoundError:
                pass
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("not serving %s: %s", path, exc)
        if text is None:
            record = manager.records.get(sid)
            state = f" (state: {record.state})" if record is not None else ""
            return _error(404, f"no document for run {sid}{state}")
        return PlainTextResponse(text, media_type="text/markdown; charset=utf-8")

    @app.get(
        "/runs/{session_id}/events",
        tags=["runs"],
        response_class=EventSourceResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def run_events(
        session_id: str,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> Any:
        """Server-Sent Events: the run's events so far, then live ones until it finishes.

        Each message has ``id`` (a sequence number; send it back as ``Last-Event-ID`` to
        resume a stream), ``event`` (the event kind) and ``data`` (the event as JSON). A
        final ``end`` message carries the run's state. A run this process did not execute
        replays its recorded event log, a chunk at a time (its ``end`` says ``replayed``, or
        ``unreadable`` with the error when a line past the first chunk is corrupt). A quiet
        stream gets a ``: keepalive`` comment every ``keepalive_seconds``.
        """
        sid = _session(session_id)
        after = _last_event_id(last_event_id)
        if after is None:
            return _error(400, "invalid Last-Event-ID: send back the id of a message received")
        record = manager.records.get(sid)
        stream: AsyncIterator[ServerSentEvent] | AsyncIterator[bytes]
        if record is not None:
            stream = _follow(streams, manager, record, after)
        else:
            try:
                async with streams.replay_turn:
                    replay = await asyncio.to_thread(_LogReplay.open, telemetry(), sid, after)
            except SessionNotFoundError:
                return _error(404, f"no run or session {sid}")
            except TelemetryError as exc:
                return _error(409, f"session {sid} has no readable event log: {exc}")
            stream = _replay(streams, replay)
        return EventSourceResponse(
            stream,
            headers={"Cache-Control": "no-cache"},
            sep="\n",
            ping=settings.keepalive_seconds,
            ping_message_factory=_keepalive,
            # On SIGTERM the run manager ends every followed run (the streams send their
            # ``end`` message); sse-starlette cancels a stream only after this long.
            shutdown_grace_period=settings.shutdown_timeout,
        )

    @app.post(
        "/runs/{session_id}/resume", status_code=202, response_model=RunAccepted, tags=["runs"]
    )
    async def resume_run(session_id: str) -> Any:
        """Resume a session from its latest checkpoint (completed stages are not re-run).

        A session complete in its checkpoints has nothing to resume (409), unless its record
        says it was interrupted (killed after its last checkpoint): the resume then runs
        nothing and records it completed."""
        sid = _session(session_id)
        try:
            record = await manager.resume(sid, settle_complete=await _interrupted(sid))
        except ServiceUnavailableError as exc:
            return _error(503, str(exc), {"Retry-After": "30"})
        except QueueFullError as exc:
            return _error(429, str(exc), {"Retry-After": "10"})
        except CheckpointNotFoundError:
            return _error(404, f"session {sid} has no checkpoint to resume from")
        except RunConflictError as exc:
            return _error(409, str(exc))
        except (CheckpointError, InvalidInputError) as exc:
            return _error(409, f"cannot resume session {sid}: {exc}")
        await manager.journal_written()
        return JSONResponse(
            RunAccepted(session_id=sid, state=record.state, links=_links(sid)).model_dump(),
            status_code=202,
            headers={"Location": f"/runs/{sid}"},
        )

    @app.post(
        "/runs/{session_id}/cancel", status_code=202, response_model=RunAccepted, tags=["runs"]
    )
    async def cancel_run(session_id: str) -> Any:
        """Cancel a queued or running run; a running one checkpoints its completed stages."""
        sid = _session(session_id)
        try:
            record = manager.cancel(sid)
        except LookupError:
            return _error(404, f"no run {sid} in this service")
        except RunConflictError as exc:
            return _error(409, str(exc))
        await manager.journal_written()
        return JSONResponse(
            RunAccepted(session_id=sid, state=record.state, links=_links(sid)).model_dump(),
            status_code=202,
        )

    # --- operations -----------------------------------------------------------------------

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics_endpoint(request: Request) -> Response:
        """Prometheus metrics; OpenMetrics (with exemplars) when the scraper asks for it."""
        body, content_type = render(metrics.registry, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> Any:
        """Ready for new runs (503 while starting or shutting down)."""
        if not manager.accepting:
            return _error(503, "not accepting runs")
        return {
            "status": "ready",
            "active_runs": manager.active,
            "queued_runs": manager.queue_depth,
            "event_streams": streams.open,
        }

    return app


_WEBHOOKS_LOOK_SECONDS = 5.0
"""How often a service without webhooks looks whether the outbox now wants them."""

_EVENT_ID_DIGITS = 18
"""A Last-Event-ID longer than this is no id the service sent (ids count a run's events)."""


def _last_event_id(value: str | None) -> int | None:
    """The sequence number a reconnecting client sends back (0 when it sends none); ``None``
    for anything that is not one: only ASCII digits, at most :data:`_EVENT_ID_DIGITS`."""
    if not value:
        return 0
    if len(value) > _EVENT_ID_DIGITS or not (value.isascii() and value.isdigit()):
        return None
    return int(value)


class _BodyLimit:
    """ASGI middleware: a request body larger than ``limit`` bytes is answered 413, however
    it is framed. A ``Content-Length`` above the limit is refused before the body is read;
    a body without one (``Transfer-Encoding: chunked``) is counted as it arrives and refused
    as soon as it passes the limit, so memory never holds more than ``limit`` bytes of it.
    A body within the limit is handed on unchanged, then the connection's later messages
    (such as a disconnect, which event streams watch for)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.isdigit()) or int(length) > self.limit:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server delivers no more than that
            return
        if "transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body
            return
        received: list[Message] = []
        total = 0
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                break  # the client went away: the app sees it
            total += len(message.get("body", b""))
            if total > self.limit:
                received.clear()
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return received.pop(0) if received else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _error(413, f"request body larger than {self.limit} bytes")
        await response(scope, receive, send)


class _StreamCount:
    """The event streams open: each stream's generator holds one while it runs, so a client
    that goes away (the generator is cancelled) is seen here as soon as the server sees it."""

    def __init__(self) -> None:
        self.open = 0
        # Replays take turns at the worker threads: parsing holds the GIL, so more at once
        # would not be faster, only make the event loop wait longer for its turn.
        self.replay_turn = asyncio.Semaphore(_REPLAY_WORKERS)

    @contextmanager
    def held(self, session_id: str) -> Iterator[None]:
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1
            log.debug("event stream of %s closed; %d open", session_id, self.open)


def _message(seq: int | None, kind: str, data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(
        json.dumps(data, default=str),
        id=None if seq is None else str(seq),
        event=kind,
        sep="\n",
    )


def _keepalive() -> ServerSentEvent:
    return ServerSentEvent(comment="keepalive", sep="\n")


async def _follow(
    streams: _StreamCount, manager: RunManager, record: RunRecord, after: int
) -> AsyncIterator[ServerSentEvent]:
    with streams.held(record.session_id):
        async for item in manager.follow(record, after):
            yield _message(*item)
        yield _message(
            None,
            "end",
            {"session_id": record.session_id, "state": record.state, "error": record.error},
        )


_REPLAY_CHUNK = 1 << 17
"""Bytes of an event log a replay reads, parses and sends at a time: its memory is about this
(times a small factor for the parsed events and their messages), whatever the log's size."""


_REPLAY_WORKERS = 1
"""Replays reading, parsing and encoding at once (each in a worker thread)."""


class _LogReplay:
    """The recorded event log of a session this process did not run, turned into SSE messages
    one chunk of the log at a time. :meth:`next_batch` does blocking work (reading, parsing,
    encoding) and runs in a worker thread; the event loop only sends its bytes."""

    def __init__(self, session_id: str, reader: EventLogReader, after: int) -> None:
        self.session_id = session_id
        self.reader = reader
        self.after = after
        self.seq = 0
        self.done = False
        self.error: str | None = None
        self.first: bytes = b""

    @classmethod
    def open(cls, telemetry: TelemetryCollector, session_id: str, after: int) -> _LogReplay:
        """A replay with its first chunk already read: a missing log
        (:class:`SessionNotFoundError`) or one unreadable from the start
        (:class:`TelemetryError`) is known before the response begins."""
        replay = cls(session_id, telemetry.follow(session_id), after)
        replay.first = replay.next_batch()
        if replay.error is not None:
            raise TelemetryError(replay.error)
        return replay

    def next_batch(self) -> bytes:
        """The messages of the next chunk of the log, encoded (empty when the chunk held none
        to send); sets :attr:`done` when the log has been read to its end, or to a line it
        cannot read (:attr:`error` says why; the messages before that line are returned)."""
        out = bytearray()
        try:
            # each event is let go before the next is parsed: none lives long enough for the
            # garbage collector to keep (and later scan) it, so collections stay short
            for event in self.reader.iter_poll(_REPLAY_CHUNK):
                self.seq += 1
                if self.seq > self.after:
                    data = event.as_record()
                    out += _message(self.seq, str(data.get("event", "event")), data).encode()
        except TelemetryError as exc:
            self.error = str(exc)
            self.done = True
            return bytes(out)
        if self.reader.caught_up:
            self.done = True
            if self.reader.partial_bytes:
                log.warning("event log of %s ends with a partial line; ignored", self.session_id)
        return bytes(out)


async def _replay(streams: _StreamCount, replay: _LogReplay) -> AsyncIterator[bytes]:
    """Send a log's messages as they are read, a chunk at a time (read in worker threads), so
    neither the log's size nor the number of replays holds up the event loop or fills memory."""
    with streams.held(replay.session_id):
        batch, replay.first = replay.first, b""
        while True:
            if batch:
                yield batch
            if replay.done:
                break
            async with streams.replay_turn:
                batch = await asyncio.to_thread(replay.next_batch)
        if replay.error is not None:
            log.warning("replay of %s stopped: %s", replay.session_id, replay.error)
            yield _message(None, "end", {"state": "unreadable", "error": replay.error}).encode()
        else:
            yield _message(None, "end", {"state": "replayed"}).encode()

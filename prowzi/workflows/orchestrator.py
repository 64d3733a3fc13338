"""The orchestrator: runs the stage table with retries, timeouts, checkpoints and events.

A run walks the stage table in order. Each stage attempt runs inside its own span, under a
per-stage timeout; transient failures are retried with exponential backoff and jitter,
permanent ones are not. Every step is an event on one :class:`EventBus`; telemetry, metrics
and the user's progress callback are sinks on it. Completed stages are checkpointed every
``checkpoint_interval`` stages, at the end, and before the run stops for any reason (a stage
that failed for good, cancellation, SIGINT/SIGTERM), so no completed stage is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import (
    AbstractContextManager,
    asynccontextmanager,
    nullcontext,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from prowzi import __version__
from prowzi.agents.base import (
    Agent,
    RunParameters,
    StageContext,
    model_call_details,
)
from prowzi.agents.models import WorkflowState
from prowzi.config import ProwziConfig, get_config
from prowzi.errors import (
    InvalidInputError,
    OutputError,
    StageTimeoutError,
    TransientError,
    WorkflowFailedError,
    describe_exception,
    error_type,
    is_transient,
)
from prowzi.events import (
    SINK_TIMEOUT_SECONDS,
    CallbackSink,
    CheckpointFailed,
    CheckpointSaved,
    EventBus,
    EventSink,
    ProgressCallback,
    SinkErrorHook,
    StageCompleted,
    StageFailed,
    StageRetrying,
    StageSkipped,
    StageStarted,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
)
from prowzi.ids import new_session_id, split_checkpoint_id, validate_session_id
from prowzi.storage.files import SHARED_FILE, atomic_write
from prowzi.storage.lease import LeaseLostError
from prowzi.tracing import RunSpan, RunTracer
from prowzi.workflows import composition
from prowzi.workflows.stages import RESEARCH_STAGES, StageSpec

if TYPE_CHECKING:
    from prowzi.workflows.checkpoint import (
        CheckpointManager,
        CheckpointMetadata,
        WorkflowCheckpoint,
    )

log = logging.getLogger("prowzi.orchestrator")

PARAMETER_NAMES: tuple[str, ...] = tuple(
    name for name in RunParameters.model_fields if name != "output_path"
)
"""The run parameters a resume may change (``output_path`` is where, not what, a run writes)."""


class ResearchResult(WorkflowState):
    """What a run returns: every stage result, and ``metadata`` (``session_id`` and more)."""

    metadata: dict[str, Any]


StageMode = Literal["run", "restore"]


@dataclass(slots=True)
class PlannedStage:
    stage: str
    mode: StageMode
    reasons: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ResumePlan:
    """What a resume would do, computed without running anything."""

    source_session_id: str
    checkpoint_id: str
    session_id: str
    fork: bool
    complete: bool
    changed_parameters: dict[str, tuple[Any, Any]]
    stages: list[PlannedStage]
    latest_checkpoint_id: str | None = None
    """The source session's latest checkpoint when planned (a fork from an earlier one is
    time travel)."""
    output_path: str | None = None
    """Where the source session's run was asked to write its document, as its verified
    checkpoint records it (None for a checkpoint written before it was recorded)."""

    @property
    def rerun(self) -> list[str]:
        return [s.stage for s in self.stages if s.mode == "run"]

    @property
    def restored(self) -> list[str]:
        return [s.stage for s in self.stages if s.mode == "restore"]

    def describe(self, *, session_ids: bool = True) -> list[str]:
        """Human-readable lines: which stages are restored, which re-run, and why.

        ``session_ids=False`` leaves a fork's new id out (a dry run's id is not the one a
        later run gets)."""
        lines = [f"resume {self.checkpoint_id}"]
        if self.complete:
            lines.append(f"session {self.source_session_id} is already complete; nothing to run")
            return lines
        if self.fork:
            new = f"new session {self.session_id}" if session_ids else "a new session"
            lines.append(f"forks {new} (parent {self.source_session_id}): {self.fork_reason()}")
        for name, (old, new) in self.changed_parameters.items():
            lines.append(f"parameter {name}: {old!r} -> {new!r}")
        for planned in self.stages:
            if planned.mode == "restore":
                lines.append(f"  {planned.stage}: restored from checkpoint")
            else:
                lines.append(f"  {planned.stage}: run ({'; '.join(planned.reasons)})")
        return lines

    def fork_reason(self) -> str:
        """Why the resume forks instead of continuing the session in place."""
        reasons = []
        if self.changed_parameters:
            reasons.append("its parameters change")
        if self.latest_checkpoint_id not in (None, self.checkpoint_id):
            reasons.append(
                f"{self.checkpoint_id} is older than the session's latest checkpoint "
                f"({self.latest_checkpoint_id}), which stays as it is"
            )
        return "; ".join(reasons) or "the resume changes the session's history"


@dataclass(slots=True)
class _Run:
    session_id: str
    params: RunParameters
    state: WorkflowState
    plan: list[PlannedStage]
    callback: ProgressCallback | None
    document_path: Path | None
    completed: list[str] = field(default_factory=list)
    parent_session_id: str | None = None
    resumed_from: str | None = None
    restored_from: dict[str, str] = field(default_factory=dict)
    previous_hash: str | None = None
    link_trace_id: str | None = None
    link_span_id: str | None = None
    force_checkpoints: bool = False
    extra_metadata: dict[str, Any] = field(default_factory=dict)
    """Added to the run's ``workflow_started`` metadata (a worker names itself there)."""


@dataclass(slots=True)
class _Outcome:
    """A completed stage attempt: the state it sets and the event that announces it."""

    updates: dict[str, Any]
    metrics: dict[str, Any]
    event: StageCompleted


class _StageFailure(Exception):
    def __init__(self, stage: str, attempts: int, cause: BaseException) -> None:
        super().__init__(stage)
        self.stage = stage
        self.attempts = attempts
        self.cause = cause


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and is_transient(exc)


class ProwziOrchestrator:
    """Runs the research workflow.

    ``agents`` replaces the agents of some stages (``{"search": my_agent}``); the defaults run
    the rest. ``sinks`` adds event sinks (metrics, webhooks) beside the configured telemetry.
    ``tracer``, ``checkpoint_manager`` and ``sleep`` are injectable for tests and services;
    ``sink_timeout`` bounds how long an asynchronous sink or callback may take per event.
    """

    def __init__(
        self,
        config: ProwziConfig | None = None,
        agents: Mapping[str, Agent] | None = None,
        *,
        sinks: Iterable[EventSink] = (),
        tracer: RunTracer | None = None,
        checkpoint_manager: CheckpointManager | None = None,
        stages: Sequence[StageSpec] = RESEARCH_STAGES,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_sink_error: SinkErrorHook | None = None,
        sink_timeout: float = SINK_TIMEOUT_SECONDS,
    ) -> None:
        self.config = config if config is not None else get_config()
        self.stages: tuple[StageSpec, ...] = tuple(stages)
        self._agent_overrides = dict(agents or {})
        self._agents: dict[str, Agent] | None = None
        self._extra_sinks = list(sinks)
        self._tracer = tracer
        self._checkpoints = checkpoint_manager
        self._sleep = sleep
        self._on_sink_error = on_sink_error
        self._sink_timeout = sink_timeout
        self._config_sinks: tuple[tuple[Any, ...], list[EventSink]] | None = None

    # --- wiring -------------------------------------------------------------------------

    @property
    def agents(self) -> dict[str, Agent]:
        if self._agents is None:
            self._agents = composition.resolve_agents(
                self.config, self.stages, self._agent_overrides
            )
        return self._agents

    @property
    def tracer(self) -> RunTracer:
        if self._tracer is None:
            self._tracer = composition.build_tracer()
        return self._tracer

    @property
    def checkpoint_manager(self) -> CheckpointManager:
        if self._checkpoints is None:
            self._checkpoints = composition.build_checkpoint_manager(self.config)
        return self._checkpoints

    def event_sinks(self) -> list[EventSink]:
        """The sinks every run of this orchestrator feeds (the configured ones, then
        ``sinks``); a run's progress callback is added per run."""
        return self._sinks()

    def _sinks(self) -> list[EventSink]:
        key = (
            self.config.enable_telemetry,
            self.config.telemetry_dir,
            self.config.telemetry_url,
            self.config.broker_url,
            self.config.webhook_url,
            self.config.webhooks,
        )
        if self._config_sinks is None or self._config_sinks[0] != key:
            self._config_sinks = (key, composition.build_sinks(self.config))
        return [*self._config_sinks[1], *self._extra_sinks]

    def _parameters(self, **values: Any) -> RunParameters:
        try:
            return RunParameters(**values)
        except ValidationError as exc:
            raise InvalidInputError(_describe_parameter_error(exc)) from None

    def _new_parameters(
        self,
        prompt: str,
        max_results_per_query: int,
        corpus_dir: Path | str | None,
        document_path: Path | str | None,
    ) -> RunParameters:
        """A new run's parameters: the arguments, the rest from the config."""
        corpus = corpus_dir if corpus_dir is not None else self.config.corpus_dir
        return self._parameters(
            prompt=prompt,
            max_results_per_query=max_results_per_query,
            corpus_dir=str(corpus) if corpus is not None else None,
            relevance_threshold=self.config.relevance_threshold,
            evaluation_threshold=self.config.evaluation_threshold,
            output_path=str(document_path) if document_path is not None else None,
            providers=tuple(self.config.providers),
            fetch_full_text=self.config.fetch_full_text,
        )

    # --- public API ---------------------------------------------------------------------

    async def run_research(
        self,
        prompt: str,
        max_results_per_query: int = 15,
        progress_callback: ProgressCallback | None = None,
        *,
        session_id: str | None = None,
        document_path: Path | str | None = None,
        corpus_dir: Path | str | None = None,
    ) -> ResearchResult:
        """Run every stage for ``prompt`` and return the result.

        Raises :class:`InvalidInputError` for bad arguments and :class:`WorkflowFailedError`
        when a stage fails for good (after checkpointing the stages that completed).
        """
        params = self._new_parameters(prompt, max_results_per_query, corpus_dir, document_path)
        if session_id is not None:
            sid = validate_session_id(session_id)
            # Refused with checkpointing off too: a run without checkpoints would still
            # overwrite the session's document and mix two runs in its telemetry.
            await asyncio.to_thread(
                self._refuse_existing, sid, strict=self.config.enable_checkpointing
            )
        else:
            sid = new_session_id()
        self.agents  # noqa: B018  (resolve agents before any event: a bad override fails fast)
        run = self._new_run(sid, params, progress_callback, document_path)
        return await self._execute(run, lock=True)

    def _new_run(
        self,
        sid: str,
        params: RunParameters,
        callback: ProgressCallback | None,
        document_path: Path | str | None,
    ) -> _Run:
        return _Run(
            session_id=sid,
            params=params,
            state=WorkflowState(),
            plan=[PlannedStage(s.name, "run", ["new run"]) for s in self.stages],
            callback=callback,
            document_path=Path(document_path) if document_path is not None else None,
        )

    async def deliver(
        self,
        prompt: str,
        *,
        session_id: str,
        max_results_per_query: int = 15,
        document_path: Path | str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ResearchResult | None:
        """Bring session ``session_id`` to completion, however often it is called: the body
        of a queued task, which a queue may deliver more than once.

        It takes the session's lease first (:class:`~prowzi.errors.SessionLockedError` when
        a live writer holds it: this delivery is a duplicate), then, under that lease, runs
        the session from the start when it has no checkpoint, continues it from its latest
        checkpoint when it has one (its writer died; ``prompt`` and ``max_results_per_query``
        are then the checkpoint's), and returns None without running or
        recording anything when every stage is already checkpointed. Checkpoints are always
        on. ``metadata`` goes into the run's ``workflow_started`` event."""
        sid = validate_session_id(session_id)
        self.agents  # noqa: B018
        manager = self.checkpoint_manager
        async with _off_loop(manager.session_lock(sid)):
            latest = await asyncio.to_thread(manager.latest, sid)
            if latest is None:
                params = self._new_parameters(prompt, max_results_per_query, None, document_path)
                run = self._new_run(sid, params, None, document_path)
                run.force_checkpoints = True
            else:
                plan, checkpoint = await asyncio.to_thread(self._plan, sid, None, {}, None)
                if plan.complete:
                    return None
                document = Path(document_path) if document_path is not None else None
                run = self._resumed_run(plan, checkpoint, None, document)
            run.extra_metadata = dict(metadata or {})
            return await self._execute(run, lock=False)

    def plan_resume(
        self,
        checkpoint_id: str,
        *,
        stage: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        fork_session_id: str | None = None,
        **changes: Any,
    ) -> ResumePlan:
        """What :meth:`resume_from_checkpoint` would do with these arguments (a dry run).

        Pass the same ``fork_session_id`` to both to know a fork's session id in advance.
        """
        plan, _ = self._plan(
            checkpoint_id, stage, {**(parameters or {}), **changes}, fork_session_id
        )
        return plan

    async def resume_from_checkpoint(
        self,
        checkpoint_id: str,
        *,
        stage: str | None = None,
        progress_callback: ProgressCallback | None = None,
        document_path: Path | str | None = None,
        parameters: Mapping[str, Any] | None = None,
        fork_session_id: str | None = None,
        **changes: Any,
    ) -> ResearchResult:
        """Continue a session from its latest checkpoint, or from ``stage``'s (time travel).

        ``checkpoint_id`` is a session id or ``"<session>_<stage>"``. Changed parameters (as
        keywords such as ``max_results_per_query=30``, or a ``parameters`` mapping) fork a new
        session that records its parent, and re-run only the stages whose inputs changed.
        Resuming a completed session returns its result without re-running anything.
        A fork gets ``fork_session_id`` if given, else a new id.
        """
        source_session, _ = split_checkpoint_id(checkpoint_id)
        manager = self.checkpoint_manager
        document = Path(document_path) if document_path is not None else None
        # Plan under the session's lock, so no other writer moves it meanwhile. Resuming in
        # place keeps the lock for the run; a fork writes only its own session, so it
        # releases the parent and takes the fork's lock instead.
        async with _off_loop(manager.session_lock(source_session)):
            plan, checkpoint = await asyncio.to_thread(
                self._plan, checkpoint_id, stage, {**(parameters or {}), **changes}, fork_session_id
            )
            if plan.complete:
                return await self._no_op_resume(plan, checkpoint, progress_callback, document)
            run = self._resumed_run(plan, checkpoint, progress_callback, document)
            self.agents  # noqa: B018
            if not plan.fork:
                return await self._execute(run, lock=False)
        return await self._execute(run, lock=True)

    async def _no_op_resume(
        self,
        plan: ResumePlan,
        checkpoint: WorkflowCheckpoint,
        callback: ProgressCallback | None,
        document: Path | None,
    ) -> ResearchResult:
        """A resume of a complete session: nothing runs. The document is written first, so
        a failure to write it records nothing; then the resume is recorded as a run whose
        stages were all restored (as a workflow engine records a re-run served from its
        cache), so telemetry ends complete even when the run that got this far was killed
        before it could say so."""
        run = self._resumed_run(plan, checkpoint, callback, document)
        if document is not None:
            await asyncio.to_thread(_write_atomic, document, run.state.document)
        result = await self._execute(run, lock=False, write_document=False)
        result.metadata.update(
            already_complete=True,
            checkpoint_id=checkpoint.metadata.checkpoint_id,
            resume_plan=plan.describe(),
        )
        return result

    def _resumed_run(
        self,
        plan: ResumePlan,
        checkpoint: WorkflowCheckpoint,
        callback: ProgressCallback | None,
        document: Path | None,
    ) -> _Run:
        meta = checkpoint.metadata
        # a complete plan runs nothing: no changed parameter was used
        changed = {} if plan.complete else {k: v[1] for k, v in plan.changed_parameters.items()}
        output = {"output_path": str(document) if document is not None else None}
        params = self._parameters(**{**meta.parameters, **changed, **output})
        state = checkpoint.to_state()
        specs = {s.name: s for s in self.stages}
        kept = {f for p in plan.stages if p.mode == "restore" for f in specs[p.stage].writes}
        for planned in plan.stages:
            if planned.mode == "run":
                # What was computed with other inputs must not outlive a failed resume; a
                # field a restored stage produced stays (the re-run stage reads it).
                for name in specs[planned.stage].writes:
                    if name not in kept:
                        setattr(state, name, None)
                state.stage_metrics.pop(planned.stage, None)
        restored = [s.stage for s in plan.stages if s.mode == "restore"]
        return _Run(
            session_id=plan.session_id,
            params=params,
            state=state,
            plan=plan.stages,
            callback=callback,
            document_path=document,
            completed=restored,
            parent_session_id=meta.session_id if plan.fork else meta.parent_session_id,
            resumed_from=meta.checkpoint_id,
            restored_from=dict.fromkeys(restored, meta.checkpoint_id),
            previous_hash=meta.payload_sha256 if plan.fork else None,
            link_trace_id=meta.trace_id,
            link_span_id=meta.span_id,
            force_checkpoints=True,
        )

    # --- resume planning ----------------------------------------------------------------

    def _plan(
        self,
        checkpoint_id: str,
        stage: str | None,
        changes: Mapping[str, Any],
        fork_session_id: str | None = None,
    ) -> tuple[ResumePlan, WorkflowCheckpoint]:
        if fork_session_id is not None:
            validate_session_id(fork_session_id)
            self._refuse_existing(fork_session_id)
        unknown = sorted(set(changes) - set(PARAMETER_NAMES))
        if unknown:
            raise InvalidInputError(
                f"unknown parameter(s) {', '.join(unknown)}; "
                f"parameters are {', '.join(PARAMETER_NAMES)}"
            )
        session, named_stage = split_checkpoint_id(checkpoint_id)
        if stage is not None and named_stage is not None and stage != named_stage:
            raise InvalidInputError(
                f"checkpoint id {checkpoint_id!r} names stage '{named_stage}', "
                f"but stage '{stage}' was asked for"
            )
        wanted_stage = stage or named_stage
        if wanted_stage is not None and wanted_stage not in {s.name for s in self.stages}:
            raise InvalidInputError(f"unknown stage '{wanted_stage}'")
        manager = self.checkpoint_manager
        checkpoint = manager.load_checkpoint(session, stage=wanted_stage)
        meta = checkpoint.metadata
        old = self._parameters(**meta.parameters)
        new = self._parameters(**{**meta.parameters, **changes})
        changed = {
            name: (getattr(old, name), getattr(new, name))
            for name in PARAMETER_NAMES
            if getattr(old, name) != getattr(new, name)
        }
        latest = manager.latest(session)
        time_travel = latest is not None and latest.checkpoint_id != meta.checkpoint_id
        fork = bool(changed) or time_travel

        stages = _plan_stages(self.stages, set(meta.completed_stages), set(changed))
        complete = not any(s.mode == "run" for s in stages)
        plan = ResumePlan(
            source_session_id=meta.session_id,
            checkpoint_id=meta.checkpoint_id,
            session_id=(fork_session_id or new_session_id())
            if fork and not complete
            else meta.session_id,
            fork=fork and not complete,
            complete=complete,
            changed_parameters=changed,
            stages=stages,
            latest_checkpoint_id=latest.checkpoint_id if latest is not None else None,
            output_path=old.output_path,
        )
        return plan, checkpoint

    def _refuse_existing(self, session_id: str, *, strict: bool = True) -> None:
        """A new session (a run with a chosen id, or a fork) must not overwrite another.

        ``strict=False`` (a run that will not checkpoint) only logs a store that cannot be
        read: the run does not need the store, so it is not failed for it."""
        stages = [s.name for s in self.stages]
        try:
            exists = self.checkpoint_manager.has_session(session_id, stages)
        except Exception as exc:
            if strict:
                raise
            log.warning(
                "could not check whether session %s already has checkpoints (%s); "
                "checkpointing is off, so the run goes on",
                session_id,
                exc,
            )
            return
        if exists:
            raise InvalidInputError(
                f"session {session_id} already exists (it has checkpoints); continue it with "
                f"`prowzi resume {session_id}` or choose another session id"
            )

    # --- the stage loop -----------------------------------------------------------------

    def _lock(
        self, session_id: str, lock: bool, checkpointing: bool
    ) -> AbstractContextManager[Any]:
        if lock and checkpointing:
            return self.checkpoint_manager.session_lock(session_id)
        return nullcontext()

    async def _execute(
        self, run: _Run, *, lock: bool, write_document: bool = True
    ) -> ResearchResult:
        sinks = self._sinks()
        if run.callback is not None:
            sinks.append(CallbackSink(run.callback))
        bus = EventBus(sinks, on_error=self._on_sink_error, timeout=self._sink_timeout)
        checkpointing = self.config.enable_checkpointing or run.force_checkpoints
        interval = self.config.checkpoint_interval
        started = time.perf_counter()
        sid = run.session_id

        async with _off_loop(self._lock(sid, lock, checkpointing)):
            with self.tracer.run(
                sid,
                prompt=run.params.prompt,
                attributes={"prowzi.resumed": run.resumed_from is not None},
                link_trace_id=run.link_trace_id,
                link_span_id=run.link_span_id,
            ) as run_span:
                await bus.emit(
                    WorkflowStarted(
                        session_id=sid,
                        timestamp=time.time(),
                        prompt=run.params.prompt,
                        parameters=run.params.model_dump(),
                        stages=tuple(s.name for s in self.stages),
                        trace_id=run_span.trace_id,
                        parent_session_id=run.parent_session_id,
                        resumed_from=run.resumed_from,
                        metadata={
                            "prowzi_version": __version__,
                            "output_path": str(run.document_path) if run.document_path else None,
                            **run.extra_metadata,
                        },
                    )
                )
                specs = {s.name: s for s in self.stages}
                pending: list[str] = []  # completed stages not yet in a checkpoint
                last_run = max((i for i, p in enumerate(run.plan) if p.mode == "run"), default=-1)
                current: str | None = None
                try:
                    for index, planned in enumerate(run.plan):
                        spec = specs[planned.stage]
                        if planned.mode == "restore":
                            await bus.emit(
                                StageSkipped(
                                    session_id=sid,
                                    timestamp=time.time(),
                                    stage=spec.name,
                                    details={"checkpoint": run.restored_from.get(spec.name)},
                                )
                            )
                            continue
                        current = spec.name
                        outcome = await self._run_stage(spec, run, bus, run_span)
                        # The result is part of the run before anyone hears the stage completed,
                        # so a cancellation while the event is delivered cannot lose it.
                        for name, value in outcome.updates.items():
                            setattr(run.state, name, value)
                        run.state.stage_metrics[spec.name] = outcome.metrics
                        if spec.name not in run.completed:
                            run.completed.append(spec.name)
                        pending.append(spec.name)
                        current = None
                        await bus.emit(outcome.event)
                        if checkpointing and (len(pending) >= interval or index == last_run):
                            await self._checkpoint(run, pending, bus, run_span)
                    if checkpointing and pending:  # a save failed on the way: one more try
                        await self._checkpoint(run, pending, bus, run_span, again=True)
                    if run.document_path is not None and write_document:
                        await asyncio.to_thread(
                            _write_atomic, run.document_path, run.state.document
                        )
                except BaseException as exc:
                    if checkpointing and pending and not isinstance(exc, LeaseLostError):
                        # Save completed work before the run stops, whatever stopped it.
                        await self._checkpoint(run, pending, bus, run_span)
                    cancelled = not isinstance(exc, Exception)
                    cause = exc.cause if isinstance(exc, _StageFailure) else exc
                    failed_stage = exc.stage if isinstance(exc, _StageFailure) else current
                    run_span.record_failure(cause, "cancelled" if cancelled else error_type(cause))
                    await bus.emit(
                        WorkflowFailed(
                            session_id=sid,
                            timestamp=time.time(),
                            duration_seconds=time.perf_counter() - started,
                            stage=failed_stage,
                            error=describe_exception(cause),
                            error_type="cancelled" if cancelled else error_type(cause),
                            cancelled=cancelled,
                        )
                    )
                    if isinstance(exc, _StageFailure):
                        raise WorkflowFailedError(sid, exc.stage, exc.attempts, exc.cause) from (
                            exc.cause
                        )
                    raise
                duration = time.perf_counter() - started
                await bus.emit(
                    WorkflowCompleted(
                        session_id=sid,
                        timestamp=time.time(),
                        duration_seconds=duration,
                        document_path=str(run.document_path) if run.document_path else None,
                    )
                )
        metadata = _result_metadata(
            session_id=sid,
            duration_seconds=duration,
            completed_stages=list(run.completed),
            parameters=run.params.model_dump(),
            trace_id=run_span.trace_id,
            parent_session_id=run.parent_session_id,
            resumed_from=run.resumed_from,
            restored_stages=sorted(run.restored_from),
            document_path=str(run.document_path) if run.document_path else None,
        )
        if bus.errors:
            metadata["sink_errors"] = dict(bus.errors)
        if checkpointing and pending:  # stages a save failed to cover
            metadata["unsaved_stages"] = list(pending)
        return ResearchResult(
            **{name: getattr(run.state, name) for name in WorkflowState.model_fields},
            metadata=metadata,
        )

    async def _checkpoint(
        self, run: _Run, pending: list[str], bus: EventBus, run_span: RunSpan, again: bool = False
    ) -> bool:
        """Save the state after ``pending[-1]``; on success ``pending`` is emptied at once.
        ``again``: the last try, after a failed save."""
        manager = self.checkpoint_manager
        stage = pending[-1]
        started = time.perf_counter()
        save = asyncio.ensure_future(
            asyncio.to_thread(
                manager.save,
                session_id=run.session_id,
                stage=stage,
                state=run.state,
                completed_stages=list(run.completed),
                parameters=run.params,
                parent_session_id=run.parent_session_id,
                previous_hash=run.previous_hash,
                trace_id=run_span.trace_id,
                span_id=run_span.span_id,
            )
        )

        def saved(meta: CheckpointMetadata) -> CheckpointSaved:
            return CheckpointSaved(
                session_id=run.session_id,
                timestamp=time.time(),
                stage=stage,
                checkpoint_id=meta.checkpoint_id,
                path=manager.store.describe(f"{meta.checkpoint_id}.pkl"),
                size_bytes=meta.payload_size,
                duration_seconds=time.perf_counter() - started,
                completed_stages=tuple(meta.completed_stages),
            )

        try:
            # In a worker thread, so a slow store never stalls the loop; shielded, and awaited
            # to its end even when cancelled, so a cancellation (SIGTERM, a service cancel)
            # cannot leave the failure path racing a second save of the same stage. A save
            # that completes is announced even then: telemetry lists every checkpoint.
            try:
                meta = await asyncio.shield(save)
            except asyncio.CancelledError:
                await asyncio.wait([save])
                if not save.cancelled() and save.exception() is None:
                    pending.clear()
                    run.previous_hash = None
                    await bus.emit(saved(save.result()))
                raise
        except Exception as exc:  # disk full, permissions, a store error: the run goes on
            log.error(
                "checkpoint of %s after %s failed%s: %s",
                run.session_id,
                stage,
                " again" if again else "",
                exc,
            )
            await bus.emit(
                CheckpointFailed(
                    session_id=run.session_id,
                    timestamp=time.time(),
                    stage=stage,
                    error=describe_exception(exc),
                )
            )
            if isinstance(exc, LeaseLostError):
                # Another writer took the session over: this run must not write it any more.
                pending.clear()
                raise
            return False
        # Bookkeeping before any await: the save is done whatever happens to this task now.
        pending.clear()
        run.previous_hash = None  # the chain now continues inside this session
        await bus.emit(saved(meta))
        return True

    async def _run_stage(
        self, spec: StageSpec, run: _Run, bus: EventBus, run_span: RunSpan
    ) -> _Outcome:
        config = self.config
        agent = self.agents[spec.name]
        sid = run.session_id
        # Facts about the latest failed attempt, for the retry and failure events.
        last: dict[str, Any] = {"attempt": 0, "duration": 0.0, "trace": None, "span": None}

        async def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            delay = state.next_action.sleep if state.next_action is not None else 0.0
            # tenacity only sleeps after a failed attempt, so there is always an exception
            failure = exc if exc is not None else TransientError("unknown failure")
            kind = error_type(failure)
            await bus.emit(
                StageRetrying(
                    session_id=sid,
                    timestamp=time.time(),
                    stage=spec.name,
                    attempt=state.attempt_number,
                    duration_seconds=last["duration"],
                    error=describe_exception(failure),
                    error_type=kind,
                    delay_seconds=delay,
                    trace_id=last["trace"],
                    span_id=last["span"],
                )
            )
            run_span.add_event(
                "prowzi.stage.retry",
                {
                    "prowzi.stage": spec.name,
                    "prowzi.attempt": state.attempt_number,
                    "prowzi.retry.delay_seconds": delay,
                    "error.type": kind,
                },
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(config.max_retries + 1),
            wait=wait_exponential_jitter(
                multiplier=config.retry_backoff_base,
                max=config.retry_backoff_max,
                jitter=config.retry_backoff_base,
            ),
            retry=retry_if_exception(_retryable),
            before_sleep=before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    number = attempt.retry_state.attempt_number
                    last["attempt"] = number
                    return await self._attempt(spec, agent, run, number, bus, run_span, last)
        except Exception as exc:
            await bus.emit(
                StageFailed(
                    session_id=sid,
                    timestamp=time.time(),
                    stage=spec.name,
                    attempt=last["attempt"],
                    duration_seconds=last["duration"],
                    error=describe_exception(exc),
                    error_type=error_type(exc),
                    trace_id=last["trace"],
                    span_id=last["span"],
                )
            )
            raise _StageFailure(spec.name, last["attempt"], exc) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    async def _attempt(
        self,
        spec: StageSpec,
        agent: Agent,
        run: _Run,
        number: int,
        bus: EventBus,
        run_span: RunSpan,
        last: dict[str, Any],
    ) -> _Outcome:
        timeout = self.config.stage_timeout_seconds
        with run_span.stage(spec.name, number) as span:
            await bus.emit(
                StageStarted(
                    session_id=run.session_id,
                    timestamp=time.time(),
                    stage=spec.name,
                    attempt=number,
                    trace_id=span.trace_id,
                    span_id=span.span_id,
                )
            )
            ctx = StageContext(
                session_id=run.session_id,
                stage=spec.name,
                attempt=number,
                params=run.params,
                state=run.state,
                config=self.config,
                observer=span,
            )
            t0 = time.perf_counter()
            try:
                try:
                    async with asyncio.timeout(timeout) as scope:
                        result = await agent(ctx)
                finally:
                    if ctx.model_calls:
                        bus.notify("observe_model_calls", spec.name, list(ctx.model_calls))
                updates = spec.unpack(result)
            except Exception as exc:
                last["duration"] = time.perf_counter() - t0
                last["trace"], last["span"] = span.trace_id, span.span_id
                failure: Exception = exc
                if isinstance(exc, TimeoutError) and scope.expired():
                    failure = StageTimeoutError(spec.name, timeout)
                span.record_failure(failure, error_type(failure))
                if failure is exc:
                    raise
                raise failure from None
            duration = time.perf_counter() - t0
            return _Outcome(
                updates=updates,
                metrics={
                    "attempts": number,
                    "duration_seconds": duration,
                    "completed_at": datetime.now(UTC).isoformat(),
                },
                event=StageCompleted(
                    session_id=run.session_id,
                    timestamp=time.time(),
                    stage=spec.name,
                    attempt=number,
                    duration_seconds=duration,
                    details={
                        **_details(result),
                        **ctx.telemetry,
                        **model_call_details(ctx.model_calls),
                    },
                    trace_id=span.trace_id,
                    span_id=span.span_id,
                ),
            )


def _plan_stages(
    specs: Sequence[StageSpec], completed: set[str], changed: set[str]
) -> list[PlannedStage]:
    """Which stages a resume re-runs, and why; the rest are restored from the checkpoint.

    A stage re-runs when it never completed, when a parameter it reads changed, or when a
    state field it reads is recomputed by an earlier re-run stage. And a stage that rewrites
    a field it reads (evaluation revises the draft) left its own output in the checkpoint: to
    run it again, the stage that first produced that field must run again too. The two rules
    feed each other, so they are applied until nothing changes.
    """
    reasons: dict[str, list[str]] = {}
    for spec in specs:
        if spec.name not in completed:
            reasons[spec.name] = ["not completed in the checkpoint"]
        elif spec.params and (hit := [p for p in spec.params if p in changed]):
            reasons[spec.name] = [f"parameter {p} changed" for p in hit]
    while True:
        before = {name: list(why) for name, why in reasons.items()}
        dirty: set[str] = set()
        for spec in specs:
            recomputed = [f for f in spec.reads if f in dirty]
            if recomputed and spec.name not in reasons:
                reasons[spec.name] = [f"input {f} is recomputed" for f in recomputed]
            if spec.name in reasons:
                dirty.update(spec.writes)
        for index, spec in enumerate(specs):
            if spec.name not in reasons or spec.name not in completed:
                continue
            for field_name in sorted(set(spec.reads) & set(spec.writes)):
                producer = next(
                    (s for s in reversed(specs[:index]) if field_name in s.writes), None
                )
                if producer is not None and producer.name not in reasons:
                    reasons[producer.name] = [
                        f"{spec.name} re-runs and replaced its {field_name} in the checkpoint"
                    ]
        if reasons == before:
            break
    return [
        PlannedStage(s.name, "run", reasons[s.name])
        if s.name in reasons
        else PlannedStage(s.name, "restore")
        for s in specs
    ]


def _result_metadata(
    *,
    session_id: str,
    duration_seconds: float,
    completed_stages: list[str],
    parameters: dict[str, Any],
    trace_id: str | None,
    parent_session_id: str | None,
    resumed_from: str | None,
    restored_stages: list[str],
    document_path: str | None,
) -> dict[str, Any]:
    """The keys every result's ``metadata`` has, whether the run ran or was already done."""
    return {
        "session_id": session_id,
        "duration_seconds": duration_seconds,
        "completed_stages": completed_stages,
        "parameters": parameters,
        "trace_id": trace_id,
        "parent_session_id": parent_session_id,
        "resumed_from": resumed_from,
        "restored_stages": restored_stages,
        "document_path": document_path,
    }


def _details(result: BaseModel) -> dict[str, Any]:
    method = getattr(result, "telemetry_details", None)
    if callable(method):
        details = method()
        if isinstance(details, dict):
            return details
    return {}


def _describe_parameter_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "parameters"
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid run parameter " + "; ".join(parts)


@asynccontextmanager
async def _off_loop(manager: AbstractContextManager[Any]) -> AsyncIterator[Any]:
    """``with manager:`` whose enter and exit (store and lease I/O) run in a worker thread,
    so a slow store never stalls the event loop (and every other run and stream on it)."""
    value = await asyncio.to_thread(manager.__enter__)
    try:
        yield value
    except BaseException as exc:
        if not await asyncio.to_thread(manager.__exit__, type(exc), exc, exc.__traceback__):
            raise
    else:
        await asyncio.to_thread(manager.__exit__, None, None, None)


def _write_atomic(path: Path, text: str) -> None:
    """Write the document to ``path`` durably (:func:`prowzi.storage.files.atomic_write`).

    Raises :class:`OutputError` naming ``path`` (not the temporary) if it cannot be written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text.encode("utf-8"), mode=SHARED_FILE)
    except OSError as exc:
        raise OutputError(f"cannot write the document to {path}: {exc.strerror or exc}") from exc


__all__ = [
    "PlannedStage",
    "ProwziOrchestrator",
    "ResearchResult",
    "ResumePlan",
]

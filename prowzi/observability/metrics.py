"""Prometheus metrics for runs, stages and checkpoints, fed by the event stream.

:class:`ProwziMetrics` is an :class:`~prowzi.events.EventSink` (``name="metrics"``)
on an injected :class:`~prometheus_client.CollectorRegistry`. Every label value comes from a
closed set: stage names outside the known stages become ``other``, sink names outside the known
sinks become ``other``; no session id or prompt ever becomes a label. Every label combination
is created up front, so the number of series is fixed from the first scrape: 200 runs leave
it where one run did, and a dashboard sees zeros rather than gaps.

Getting metrics out: :func:`render` (OpenMetrics when the scraper asks for it, which is what
makes exemplars visible), :func:`serve_metrics` (``/metrics`` for ``prowzi run
--metrics-port``) and :func:`push_metrics` (a batch run's push to a Pushgateway).
"""

from __future__ import annotations

import functools
import gzip
import itertools
import logging
import platform
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.exposition import choose_encoder, pushadd_to_gateway
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.exposition import ALLOWUTF8
from prometheus_client.registry import Collector

from prowzi.events import (
    CheckpointFailed,
    CheckpointSaved,
    Event,
    StageCompleted,
    StageFailed,
    StageRetrying,
    StageSkipped,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
)

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from prowzi.agents.base import ModelCall

log = logging.getLogger("prowzi.metrics")


class WebhookOutbox(Protocol):
    """What :meth:`ProwziMetrics.watch_webhooks` reads (the webhook delivery worker)."""

    observers: list[Any]

    def depth(self) -> int: ...

    def oldest_pending_age(self) -> float: ...


OTHER = "other"
RUN_OUTCOMES = ("success", "failure", "cancelled")
STAGE_OUTCOMES = ("completed", "failed", "retrying", "skipped")
ERROR_TYPES = ("transient", "timeout", "permanent")
CHECKPOINT_OUTCOMES = ("success", "failure")
EVALUATION_PHASES = ("initial", "final")
LLM_OUTCOMES = ("ok", "rate_limited", "error", "cached")
TOKEN_TYPES = ("input", "output")
KNOWN_SINKS = (
    "telemetry",
    "event_log",
    "callback",
    "metrics",
    "webhook",
    "monitor",
    "service",
    "redis_stream",
)
"""Sink names counted under their own label value; any other name is counted as ``other``."""

RUN_DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
WEBHOOK_OUTCOMES = ("delivered", "retrying", "failed", "disabled")
"""How a webhook delivery attempt ended: delivered (2xx), retrying (it will be tried again),
failed (a 4xx, a refused address, or the retry schedule used up), disabled (410 Gone)."""


def _one_two_five(low: float, high: float) -> tuple[float, ...]:
    """The 1-2.5-5 series (1, 2.5, 5 times each power of ten) from ``low`` to ``high``."""
    steps = (round(m * 10.0**e, 12) for e in range(-6, 6) for m in (1, 2.5, 5))
    return tuple(int(v) if v == int(v) else v for v in steps if low <= v <= high)


STAGE_DURATION_BUCKETS = (*_one_two_five(0.005, 10), 30, 60, 120, 300, 600)
LLM_CALL_DURATION_BUCKETS = (*_one_two_five(0.001, 10), 30, 60, 120, 300)
CHECKPOINT_DURATION_BUCKETS = _one_two_five(0.0005, 2.5)
CHECKPOINT_SIZE_BUCKETS = tuple(1024 * 4**i for i in range(10))  # 1 KiB .. 256 MiB
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
SIMILARITY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)
PROVIDER_DURATION_BUCKETS = (*_one_two_five(0.001, 10), 30, 60)

TIMESTAMP_GAUGES = (
    "prowzi_stage_last_completed_timestamp_seconds",
    "prowzi_last_run_success_timestamp_seconds",
)
SERVICE_GAUGES = ("prowzi_service_queue_depth", "prowzi_service_active_runs")
WEBHOOK_LATENCY_BUCKETS = _one_two_five(0.001, 10)


class ProwziMetrics:
    """The metric families of the contract, and the sink that updates them from events."""

    name = "metrics"

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        stages: Iterable[str] | None = None,
        sinks: Iterable[str] = KNOWN_SINKS,
        models: Iterable[str] = (),
    ) -> None:
        from prowzi import __version__

        if stages is None:
            # The engine's stage table, read here: observability imports no engine module
            # at import time (the engine's composition root imports observability).
            from prowzi.workflows.stages import STAGE_NAMES

            stages = STAGE_NAMES
        # A fresh registry by default, never the process-global one.
        registry = CollectorRegistry() if registry is None else registry
        self.registry = registry
        self._stages = frozenset(stages)
        self._sinks = frozenset(sinks)
        stage_labels = (*sorted(self._stages), OTHER)
        sink_labels = (*sorted(self._sinks), OTHER)
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._models = frozenset(models)
        model_labels = (*sorted(self._models), OTHER)

        build_info = Gauge(
            "prowzi_build_info",
            "Prowzi build information; always 1.",
            ("version", "python_version"),
            registry=registry,
        )
        build_info.labels(__version__, platform.python_version()).set(1)

        self.runs_started = Counter(
            "prowzi_runs_started", "Runs started, resumes included.", registry=registry
        )
        runs_completed = Counter(
            "prowzi_runs_completed", "Runs finished, by outcome.", ("outcome",), registry=registry
        )
        run_duration = Histogram(
            "prowzi_run_duration_seconds",
            "Wall-clock duration of a run (or a resume), by outcome.",
            ("outcome",),
            buckets=RUN_DURATION_BUCKETS,
            registry=registry,
        )
        self.runs_in_progress = Gauge(
            "prowzi_runs_in_progress", "Runs started and not yet finished.", registry=registry
        )
        stage_executions = Counter(
            "prowzi_stage_executions",
            "Stage attempts and skips, by stage and outcome.",
            ("stage", "outcome"),
            registry=registry,
        )
        stage_duration = Histogram(
            "prowzi_stage_duration_seconds",
            "Duration of a stage attempt (completed, retried or failed); exemplars carry the "
            "attempt's trace_id and span_id.",
            ("stage",),
            buckets=STAGE_DURATION_BUCKETS,
            registry=registry,
        )
        stage_retries = Counter(
            "prowzi_stage_retries",
            "Stage attempts that failed and were retried, by stage and error type.",
            ("stage", "error_type"),
            registry=registry,
        )
        self.stage_last_completed = Gauge(
            "prowzi_stage_last_completed_timestamp_seconds",
            "Unix time at which a stage last completed (0: none yet).",
            registry=registry,
        )
        self.last_run_success = Gauge(
            "prowzi_last_run_success_timestamp_seconds",
            "Unix time at which a run last succeeded (0: none yet).",
            registry=registry,
        )
        checkpoint_writes = Counter(
            "prowzi_checkpoint_writes",
            "Checkpoint writes, by outcome.",
            ("outcome",),
            registry=registry,
        )
        self.checkpoint_write_duration = Histogram(
            "prowzi_checkpoint_write_duration_seconds",
            "Time to write one checkpoint durably.",
            buckets=CHECKPOINT_DURATION_BUCKETS,
            registry=registry,
        )
        self.checkpoint_size = Histogram(
            "prowzi_checkpoint_size_bytes",
            "Size of one written checkpoint.",
            buckets=CHECKPOINT_SIZE_BUCKETS,
            registry=registry,
        )
        sink_errors = Counter(
            "prowzi_telemetry_sink_errors",
            "Event sink failures (the run went on), by sink.",
            ("sink",),
            registry=registry,
        )
        evaluation_score = Histogram(
            "prowzi_evaluation_score",
            "Evaluation score of the first draft (initial) and the final document (final).",
            ("phase",),
            buckets=SCORE_BUCKETS,
            registry=registry,
        )
        self.turnitin_similarity = Histogram(
            "prowzi_turnitin_similarity_ratio",
            "Share of the document's fingerprints found in its sources.",
            buckets=SIMILARITY_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "prowzi_service_queue_depth",
            "Runs accepted by the service and waiting for a slot.",
            registry=registry,
        )
        self.active_runs = Gauge(
            "prowzi_service_active_runs", "Runs the service is executing.", registry=registry
        )
        # Online search providers (issue 16 item 4): fed by prowzi.sources.observe, not events.
        from prowzi.config.settings import PROVIDER_NAMES
        from prowzi.sources.observe import REQUEST_OUTCOMES

        provider_labels = (*PROVIDER_NAMES, OTHER)
        provider_requests = Counter(
            "prowzi_provider_requests",
            "Requests to online search providers, by provider and outcome (cached: answered "
            "by the on-disk cache, nothing sent).",
            ("provider", "outcome"),
            registry=registry,
        )
        provider_duration = Histogram(
            "prowzi_provider_request_duration_seconds",
            "Duration of one provider request (a cached answer's too), by provider.",
            ("provider",),
            buckets=PROVIDER_DURATION_BUCKETS,
            registry=registry,
        )
        self._provider_requests = _bound(provider_requests, provider_labels, REQUEST_OUTCOMES)
        self._provider_duration = {p: provider_duration.labels(p) for p in provider_labels}

        # Model calls (prowzi.llm): the model label is a configured model or "other".
        llm_tokens = Counter(
            "prowzi_llm_tokens",
            "Tokens of model calls as the server's usage reported them, by stage, model and "
            "type (input or output); cached answers count none.",
            ("stage", "model", "type"),
            registry=registry,
        )
        llm_cost = Counter(
            "prowzi_llm_cost_usd",
            "Cost of model calls in US dollars at the configured prices, by stage and model.",
            ("stage", "model"),
            registry=registry,
        )
        llm_calls = Counter(
            "prowzi_llm_calls",
            "Model requests by outcome: ok, rate_limited (HTTP 429), error (5xx, timeouts, "
            "refusals, malformed answers) and cached (answered from the cache, not sent).",
            ("stage", "model", "outcome"),
            registry=registry,
        )
        llm_duration = Histogram(
            "prowzi_llm_call_duration_seconds",
            "Duration of one model request (or cache lookup), by stage and model.",
            ("stage", "model"),
            buckets=LLM_CALL_DURATION_BUCKETS,
            registry=registry,
        )
        self._llm_tokens = _bound(llm_tokens, stage_labels, model_labels, TOKEN_TYPES)
        self._llm_cost = _bound(llm_cost, stage_labels, model_labels)
        self._llm_calls = _bound(llm_calls, stage_labels, model_labels, LLM_OUTCOMES)
        self._llm_duration = _bound(llm_duration, stage_labels, model_labels)
        webhook_deliveries = Counter(
            "prowzi_webhook_deliveries",
            "Webhook delivery attempts, by event type and outcome.",
            ("event_type", "outcome"),
            registry=registry,
        )
        self.webhook_latency = Histogram(
            "prowzi_webhook_delivery_duration_seconds",
            "Time from sending a webhook to its receiver's answer (or the attempt's failure).",
            buckets=WEBHOOK_LATENCY_BUCKETS,
            registry=registry,
        )
        self.webhook_outbox_depth = Gauge(
            "prowzi_webhook_outbox_depth",
            "Webhook deliveries waiting in the outbox.",
            registry=registry,
        )
        self.webhook_oldest_pending = Gauge(
            "prowzi_webhook_outbox_oldest_pending_age_seconds",
            "Age of the oldest webhook delivery waiting in the outbox (0: none).",
            registry=registry,
        )

        # Children are bound once: every label value exists from the start (fixed series
        # count, zeros instead of gaps) and handling an event costs dictionary lookups only.
        self._runs_completed = {o: runs_completed.labels(o) for o in RUN_OUTCOMES}
        self._run_duration = {o: run_duration.labels(o) for o in RUN_OUTCOMES}
        self._stage_executions = _bound(stage_executions, stage_labels, STAGE_OUTCOMES)
        self._stage_duration = {s: stage_duration.labels(s) for s in stage_labels}
        self._stage_retries = _bound(stage_retries, stage_labels, ERROR_TYPES)
        self._checkpoint_writes = {o: checkpoint_writes.labels(o) for o in CHECKPOINT_OUTCOMES}
        self._sink_errors = {s: sink_errors.labels(s) for s in sink_labels}
        self._evaluation_score = {p: evaluation_score.labels(p) for p in EVALUATION_PHASES}
        from prowzi.events import WEBHOOK_EVENT_TYPES

        self._webhook_deliveries = _bound(
            webhook_deliveries, (*WEBHOOK_EVENT_TYPES, OTHER), WEBHOOK_OUTCOMES
        )

    # --- the sink ---------------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        if isinstance(event, StageCompleted):
            stage = self._stage(event.stage)
            self._stage_executions[stage, "completed"].inc()
            self._observe_stage(stage, event.duration_seconds, event.trace_id, event.span_id)
            self.stage_last_completed.set(event.timestamp)
            self._quality(event.stage, event.details)
        elif isinstance(event, StageRetrying):
            stage = self._stage(event.stage)
            self._stage_executions[stage, "retrying"].inc()
            self._stage_retries[stage, _error_type(event.error_type)].inc()
            self._observe_stage(stage, event.duration_seconds, event.trace_id, event.span_id)
        elif isinstance(event, StageFailed):
            stage = self._stage(event.stage)
            self._stage_executions[stage, "failed"].inc()
            self._observe_stage(stage, event.duration_seconds, event.trace_id, event.span_id)
        elif isinstance(event, StageSkipped):
            self._stage_executions[self._stage(event.stage), "skipped"].inc()
        elif isinstance(event, CheckpointSaved):
            self._checkpoint_writes["success"].inc()
            self.checkpoint_write_duration.observe(event.duration_seconds)
            self.checkpoint_size.observe(event.size_bytes)
        elif isinstance(event, CheckpointFailed):
            self._checkpoint_writes["failure"].inc()
        elif isinstance(event, WorkflowStarted):
            self.runs_started.inc()
            with self._lock:
                if event.session_id not in self._active:
                    self._active.add(event.session_id)
                    self.runs_in_progress.inc()
        elif isinstance(event, WorkflowCompleted):
            self._finish(event.session_id, "success", event.duration_seconds)
            self.last_run_success.set(event.timestamp)
        elif isinstance(event, WorkflowFailed):
            outcome = "cancelled" if event.cancelled else "failure"
            self._finish(event.session_id, outcome, event.duration_seconds)

    def observe_model_calls(self, stage: str, calls: Iterable[ModelCall]) -> None:
        """Count a stage attempt's model calls (the orchestrator hands them over)."""
        stage = self._stage(stage)
        for call in calls:
            model = call.model if call.model in self._models else OTHER
            outcome = call.outcome if call.outcome in LLM_OUTCOMES else "error"
            self._llm_calls[stage, model, outcome].inc()
            self._llm_duration[stage, model].observe(max(call.duration_seconds, 0.0))
            if call.input_tokens:
                self._llm_tokens[stage, model, "input"].inc(call.input_tokens)
            if call.output_tokens:
                self._llm_tokens[stage, model, "output"].inc(call.output_tokens)
            if call.cost_usd:
                self._llm_cost[stage, model].inc(call.cost_usd)

    def delivery(self, event_type: str, outcome: str, seconds: float | None) -> None:
        """A webhook delivery attempt (the delivery worker's observer hook)."""
        child = self._webhook_deliveries.get((event_type, outcome))
        if child is None:
            child = self._webhook_deliveries[
                OTHER, outcome if outcome in WEBHOOK_OUTCOMES else "failed"
            ]
        child.inc()
        if seconds is not None:
            self.webhook_latency.observe(max(seconds, 0.0))

    def watch_webhooks(self, deliverer: WebhookOutbox) -> None:
        """Count ``deliverer``'s attempts, and read its outbox depth and oldest pending age
        at each scrape."""
        deliverer.observers.append(self)
        self.webhook_outbox_depth.set_function(deliverer.depth)
        self.webhook_oldest_pending.set_function(deliverer.oldest_pending_age)

    def provider_request(self, provider: str, outcome: str, seconds: float) -> None:
        """A :class:`~prowzi.sources.observe.RequestObserver`: count one provider request."""
        name = provider if (provider, outcome) in self._provider_requests else OTHER
        child = self._provider_requests.get((name, outcome))
        if child is None:
            return  # an outcome outside the closed set is not a series
        child.inc()
        self._provider_duration[name].observe(max(seconds, 0.0))

    def sink_error(self, sink_name: str, exc: BaseException) -> None:
        """``EventBus(on_error=...)`` hook: count a failing sink under a closed-set name."""
        self._sink_errors[sink_name if sink_name in self._sinks else OTHER].inc()

    # --- helpers ----------------------------------------------------------------------------

    def _stage(self, stage: str) -> str:
        return stage if stage in self._stages else OTHER

    def _observe_stage(
        self, stage: str, seconds: float, trace_id: str | None, span_id: str | None
    ) -> None:
        child = self._stage_duration[stage]
        if trace_id:
            exemplar = {"trace_id": trace_id}
            if span_id:
                exemplar["span_id"] = span_id
            child.observe(max(seconds, 0.0), exemplar)
        else:
            child.observe(max(seconds, 0.0))

    def _finish(self, session_id: str, outcome: str, seconds: float) -> None:
        self._runs_completed[outcome].inc()
        self._run_duration[outcome].observe(max(seconds, 0.0))
        with self._lock:
            if session_id in self._active:
                self._active.discard(session_id)
                self.runs_in_progress.dec()

    def _quality(self, stage: str, details: Mapping[str, Any]) -> None:
        if stage == "evaluation":
            for key, phase in (("initial_score", "initial"), ("score", "final")):
                value = _ratio(details.get(key))
                if value is not None:
                    self._evaluation_score[phase].observe(value)
        elif stage == "turnitin":
            value = _ratio(details.get("similarity"))
            if value is not None:
                self.turnitin_similarity.observe(value)


_Family = TypeVar("_Family", Counter, Gauge, Histogram)


def _bound(family: _Family, *values: Iterable[str]) -> dict[tuple[str, ...], _Family]:
    """The children of ``family`` for every combination of label values (one iterable per
    label, in the family's label order), keyed by their label values."""
    return {labels: family.labels(*labels) for labels in itertools.product(*values)}


def _error_type(value: str) -> str:
    return value if value in ERROR_TYPES else "transient"


def _ratio(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0.0 <= value <= 1.0 else None


# --- exposition -----------------------------------------------------------------------------

OPENMETRICS_ACCEPT = "application/openmetrics-text; version=1.0.0"


def render(registry: Collector, accept: str | None = None) -> tuple[bytes, str]:
    """The registry's exposition and its content type, chosen from an ``Accept`` header.

    prometheus_client negotiates: scrapers that ask for OpenMetrics (Prometheus does) get its
    OpenMetrics generator's output, exemplars included; others get the classic text format,
    which has no exemplars.
    """
    encoder, content_type = choose_encoder(accept or "")
    if content_type != _OPENMETRICS_UNDERSCORES:
        return encoder(registry), content_type
    # What prometheus_client lacks: its "underscores" escaping rewrites every sample name
    # character by character even when nothing needs escaping, which doubles the cost of a
    # scrape (Prometheus 2 asks for it). Where every name is a classic Prometheus name, its
    # "allow-utf-8" escaping writes the same bytes at half the cost, so the generator is
    # asked for that; any other name keeps the negotiated escaping.
    families = _Collected(list(registry.collect()))
    if families.classic_names():
        return _openmetrics(families, escaping=ALLOWUTF8, version="1.0.0"), content_type
    return encoder(families), content_type


_OPENMETRICS_UNDERSCORES = (
    "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"
)
_openmetrics = cast("Callable[..., bytes]", openmetrics.generate_latest)  # untyped upstream
_CLASSIC_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@functools.lru_cache(maxsize=4096)
def _classic(name: str) -> bool:
    return _CLASSIC_NAME.fullmatch(name) is not None


class _Collected(Collector):
    """The families of one ``collect()``, handed on to the generator."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)

    def classic_names(self) -> bool:
        return all(
            _classic(family.name)
            and all(
                _classic(sample.name) and all(map(_classic, sample.labels))
                for sample in family.samples
            )
            for family in self._families
        )


def _metrics_app(registry: Collector) -> WSGIApplication:
    """The WSGI app of :class:`MetricsServer`: ``/metrics`` (and ``/``) answers with
    :func:`render`'s exposition, as the service's does (prometheus_client's own app would
    skip its cheaper escaping), gzipped when the scraper accepts it (Prometheus does); any
    other path is a 404, not a scrape."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"only /metrics is served here\n"]
        body, content_type = render(registry, environ.get("HTTP_ACCEPT"))
        headers = [("Content-Type", content_type)]
        if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    return app


class MetricsServer:
    """prometheus_client's ``/metrics`` server on a daemon thread; :meth:`close` stops it
    (idempotent)."""

    def __init__(self, registry: Collector, port: int, host: str = "127.0.0.1") -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        # Set before anyone is told the port: only /metrics is served.
        self._server.set_app(_metrics_app(registry))
        self.host = host
        self.port: int = self._server.server_address[1]
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(registry: Collector, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread.

    ``port=0`` picks a free port (``handle.port``). The default host is loopback; pass
    ``"0.0.0.0"`` for a scraper on another machine or container.
    """
    return MetricsServer(registry, port, host)


class _PushView(Collector):
    """The families a batch run pushes: all but the service gauges and unset timestamps."""

    def __init__(self, registry: Collector) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if family.name in SERVICE_GAUGES:
                continue
            if family.name in TIMESTAMP_GAUGES and not any(s.value for s in family.samples):
                continue
            yield family


DEFAULT_PUSH_JOB = "prowzi_batch"


def push_metrics(
    registry: Collector,
    url: str,
    *,
    job: str = DEFAULT_PUSH_JOB,
    grouping_key: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> None:
    """Push a batch run's metrics to the Pushgateway at ``url``.

    Grouping: one group per ``{job, instance}`` (instance defaults to the host name), never
    per session, so the gateway holds a bounded number of groups. Runs from one instance share
    the group, and the push is a POST, which replaces only the families it carries. A run that
    did not succeed never set ``prowzi_last_run_success_timestamp_seconds``, so it leaves that
    family out and the previous run's last success survives; the same holds for the last
    completed stage. Counters and histograms describe the last run pushed (a Pushgateway keeps
    no history); alert on the timestamps and on ``push_time_seconds``.

    Raises ``OSError`` (e.g. ``URLError``) when the gateway cannot be reached.
    """
    key = {"instance": socket.gethostname()}
    if grouping_key:
        key.update(grouping_key)
    pushadd_to_gateway(
        url, job=job, registry=_PushView(registry), grouping_key=key, timeout=timeout
    )


DELIVERY_OUTCOMES = (
    "completed",
    "failed",
    "cancelled",
    "duplicate",
    "already_complete",
    "requeued",
)
TAKEOVER_REASONS = ("expired", "holder_gone")


class WorkerMetrics:
    """A worker's own families (``prowzi worker``), beside the run metrics in the same registry.

    - ``prowzi_worker_queue_depth``: messages waiting in the broker queue, read at scrape time
      (``queue_depth``, a callable, so a scrape sees the broker as it is);
    - ``prowzi_worker_runs_in_flight``: runs this worker is executing now;
    - ``prowzi_worker_deliveries_total{outcome}``: what each delivery of a run ended as
      (``duplicate``: another live worker held the session's lease);
    - ``prowzi_worker_lease_takeovers_total{reason}``: sessions continued from a checkpoint
      whose writer's lease had ``expired`` or whose writer was gone (``holder_gone``);
    - ``prowzi_worker_leases_lost_total``: runs stopped because their lease ran out and was
      taken over while they ran.
    """

    def __init__(
        self, registry: CollectorRegistry, queue_depth: Callable[[], float] | None = None
    ) -> None:
        self.queue_depth = Gauge(
            "prowzi_worker_queue_depth",
            "Runs waiting in the broker queue (read from the broker at scrape time).",
            registry=registry,
        )
        if queue_depth is not None:
            self.queue_depth.set_function(_never_raising(queue_depth))
        self.in_flight = Gauge(
            "prowzi_worker_runs_in_flight", "Runs this worker is executing.", registry=registry
        )
        self.deliveries = Counter(
            "prowzi_worker_deliveries_total",
            "Deliveries of a run to this worker, by what they ended as.",
            ("outcome",),
            registry=registry,
        )
        for outcome in DELIVERY_OUTCOMES:
            self.deliveries.labels(outcome)
        self.takeovers = Counter(
            "prowzi_worker_lease_takeovers_total",
            "Sessions this worker continued after their writer's lease expired or it died.",
            ("reason",),
            registry=registry,
        )
        for reason in TAKEOVER_REASONS:
            self.takeovers.labels(reason)
        self.leases_lost = Counter(
            "prowzi_worker_leases_lost_total",
            "Runs stopped here because another worker took their expired lease over.",
            registry=registry,
        )


def _never_raising(read: Callable[[], float]) -> Callable[[], float]:
    """A scrape-time reading that reports NaN instead of failing the scrape (a broker that
    is down must not hide every other metric)."""

    def reading() -> float:
        try:
            return float(read())
        except Exception as exc:
            log.warning("cannot read the queue depth: %s", exc)
            return float("nan")

    return reading


__all__ = [
    "KNOWN_SINKS",
    "MetricsServer",
    "ProwziMetrics",
    "WorkerMetrics",
    "push_metrics",
    "render",
    "serve_metrics",
]

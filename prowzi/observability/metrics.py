"""Prometheus metrics for runs, stages and checkpoints, fed by the event stream.

:class:`ProwziMetrics` is an :class:`~prowzi.workflows.events.EventSink` (``name="metrics"``)
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
import logging
import platform
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder, pushadd_to_gateway
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as _om_generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _float_to_go_string

from prowzi.workflows.events import (
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
from prowzi.workflows.stages import STAGE_NAMES

log = logging.getLogger("prowzi.metrics")

OTHER = "other"
RUN_OUTCOMES = ("success", "failure", "cancelled")
STAGE_OUTCOMES = ("completed", "failed", "retrying", "skipped")
ERROR_TYPES = ("transient", "timeout", "permanent")
CHECKPOINT_OUTCOMES = ("success", "failure")
EVALUATION_PHASES = ("initial", "final")
KNOWN_SINKS = (
    "telemetry",
    "event_log",
    "callback",
    "metrics",
    "webhook",
    "monitor",
    "service",
)
"""Sink names counted under their own label value; any other name is counted as ``other``."""

RUN_DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
STAGE_DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
)
CHECKPOINT_DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
)
CHECKPOINT_SIZE_BUCKETS = tuple(1024 * 4**i for i in range(10))  # 1 KiB .. 256 MiB
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
SIMILARITY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)

TIMESTAMP_GAUGES = (
    "prowzi_stage_last_completed_timestamp_seconds",
    "prowzi_last_run_success_timestamp_seconds",
)
SERVICE_GAUGES = ("prowzi_service_queue_depth", "prowzi_service_active_runs")


class ProwziMetrics:
    """The metric families of the contract, and the sink that updates them from events."""

    name = "metrics"

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        stages: Iterable[str] = STAGE_NAMES,
        sinks: Iterable[str] = KNOWN_SINKS,
    ) -> None:
        from prowzi import __version__

        # A fresh registry by default, never the process-global one.
        registry = CollectorRegistry() if registry is None else registry
        self.registry = registry
        self._stages = frozenset(stages)
        self._sinks = frozenset(sinks)
        stage_labels = (*sorted(self._stages), OTHER)
        sink_labels = (*sorted(self._sinks), OTHER)
        self._active: set[str] = set()
        self._lock = threading.Lock()

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

        # Children are bound once: every label value exists from the start (fixed series
        # count, zeros instead of gaps) and handling an event costs dictionary lookups only.
        self._runs_completed = {o: runs_completed.labels(o) for o in RUN_OUTCOMES}
        self._run_duration = {o: run_duration.labels(o) for o in RUN_OUTCOMES}
        self._stage_executions = {
            (s, o): stage_executions.labels(s, o) for s in stage_labels for o in STAGE_OUTCOMES
        }
        self._stage_duration = {s: stage_duration.labels(s) for s in stage_labels}
        self._stage_retries = {
            (s, e): stage_retries.labels(s, e) for s in stage_labels for e in ERROR_TYPES
        }
        self._checkpoint_writes = {o: checkpoint_writes.labels(o) for o in CHECKPOINT_OUTCOMES}
        self._sink_errors = {s: sink_errors.labels(s) for s in sink_labels}
        self._evaluation_score = {p: evaluation_score.labels(p) for p in EVALUATION_PHASES}

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

    Scrapers that ask for OpenMetrics (Prometheus does) get it, exemplars included; others get
    the classic text format, which has no exemplars.
    """
    encoder, content_type = choose_encoder(accept or "")
    if content_type.startswith("application/openmetrics-text") and "escaping=underscores" in (
        content_type
    ):
        return openmetrics_exposition(registry), content_type
    return encoder(registry), content_type


# prometheus_client leaves these untyped.
_go_float = cast("Callable[[float], str]", _float_to_go_string)
_openmetrics_latest = cast("Callable[[Collector], bytes]", _om_generate_latest)

# Names prometheus_client's underscore escaping leaves unchanged (it maps ':' to '_' too).
_PLAIN_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_value(v)}"' for k, v in sorted(labels.items())) + "}"


@functools.lru_cache(maxsize=4096)
def _plain_names(name: str, label_names: tuple[str, ...]) -> bool:
    return all(_PLAIN_NAME.fullmatch(n) for n in (name, *label_names))


def _plain(name: str, labels: Mapping[str, str]) -> bool:
    return _plain_names(name, tuple(labels))


def openmetrics_exposition(registry: Collector) -> bytes:
    """OpenMetrics 1.0 text, byte for byte what prometheus_client writes for these families.

    prometheus_client escapes every name character by character for UTF-8 name support,
    which makes a scrape after many runs cost several milliseconds. Prowzi's names are all
    classic Prometheus names, so they are written as they are; a registry holding any other
    name, or native histograms, falls back to prometheus_client's writer.
    """
    families = list(registry.collect())
    for family in families:
        if not _PLAIN_NAME.fullmatch(family.name):
            return _openmetrics_latest(registry)
        for sample in family.samples:
            if sample.native_histogram is not None or not _plain(sample.name, sample.labels):
                return _openmetrics_latest(registry)
    out: list[str] = []
    for family in families:
        name = family.name
        out.append(f"# HELP {name} {_escape_value(family.documentation)}\n")
        out.append(f"# TYPE {name} {family.type}\n")
        if family.unit:
            out.append(f"# UNIT {name} {family.unit}\n")
        for sample in family.samples:
            line = f"{sample.name}{_labels(sample.labels)} {_go_float(sample.value)}"
            if sample.timestamp is not None:
                line += f" {sample.timestamp}"
            exemplar = sample.exemplar
            if exemplar is not None:
                line += f" # {_labels(exemplar.labels)} {_go_float(exemplar.value)}"
                if exemplar.timestamp is not None:
                    line += f" {exemplar.timestamp}"
            out.append(line + "\n")
    out.append("# EOF\n")
    return "".join(out).encode("utf-8")


class MetricsServer:
    """A background ``/metrics`` endpoint; :meth:`close` stops it (idempotent)."""

    def __init__(self, registry: Collector, port: int, host: str = "127.0.0.1") -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body, content_type = render(registry, self.headers.get("Accept"))
                except Exception:
                    log.exception("rendering metrics failed")
                    self.send_error(500)
                    return
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="prowzi-metrics", daemon=True
        )
        self._thread.start()
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


__all__ = [
    "KNOWN_SINKS",
    "MetricsServer",
    "ProwziMetrics",
    "push_metrics",
    "render",
    "serve_metrics",
]

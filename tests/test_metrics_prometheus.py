"""A real Prometheus (Debian's, exemplar storage on) scrapes ``prowzi serve`` while runs execute.

Through Prometheus's HTTP API the test finds every metric family of the contract with its
label set, label values from closed sets only, and a stage-duration exemplar whose trace id is
the trace of spans the service exported to an OTLP receiver on loopback.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from emulator_servers import free_port
from otlp_receiver import OtlpReceiver
from test_service import Service
from test_service_support import wait_until_ready

from prowzi.events import WEBHOOK_EVENT_TYPES
from prowzi.testing import STAGES

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is missing")

# family -> label names (besides job and instance; histograms add le on _bucket)
FAMILIES: dict[str, set[str]] = {
    "prowzi_build_info": {"version", "python_version"},
    "prowzi_runs_started_total": set(),
    "prowzi_runs_completed_total": {"outcome"},
    "prowzi_run_duration_seconds": {"outcome"},
    "prowzi_runs_in_progress": set(),
    "prowzi_stage_executions_total": {"stage", "outcome"},
    "prowzi_stage_duration_seconds": {"stage"},
    "prowzi_stage_retries_total": {"stage", "error_type"},
    "prowzi_stage_last_completed_timestamp_seconds": set(),
    "prowzi_last_run_success_timestamp_seconds": set(),
    "prowzi_checkpoint_writes_total": {"outcome"},
    "prowzi_checkpoint_write_duration_seconds": set(),
    "prowzi_checkpoint_size_bytes": set(),
    "prowzi_telemetry_sink_errors_total": {"sink"},
    "prowzi_evaluation_score": {"phase"},
    "prowzi_turnitin_similarity_ratio": set(),
    "prowzi_service_queue_depth": set(),
    "prowzi_service_active_runs": set(),
    "prowzi_webhook_deliveries_total": {"event_type", "outcome"},
    "prowzi_webhook_delivery_duration_seconds": set(),
    "prowzi_webhook_outbox_depth": set(),
    "prowzi_webhook_outbox_oldest_pending_age_seconds": set(),
}
HISTOGRAMS = {
    "prowzi_run_duration_seconds",
    "prowzi_stage_duration_seconds",
    "prowzi_checkpoint_write_duration_seconds",
    "prowzi_checkpoint_size_bytes",
    "prowzi_evaluation_score",
    "prowzi_turnitin_similarity_ratio",
    "prowzi_webhook_delivery_duration_seconds",
}
CLOSED = {
    "stage": {*STAGES, "other"},
    "outcome": {
        *("success", "failure", "cancelled", "completed", "failed", "retrying", "skipped"),
        *("delivered", "disabled"),  # webhook deliveries
    },
    "error_type": {"transient", "timeout", "permanent"},
    "phase": {"initial", "final"},
    "event_type": {*WEBHOOK_EVENT_TYPES, "other"},
}


class Prometheus:
    def __init__(self, workdir: Path, target: str) -> None:
        assert PROMETHEUS is not None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: prowzi\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self._log = (workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--enable-feature=exemplar-storage",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=10)
        wait_until_ready(f"{self.url}/-/ready", self.process, "prometheus", interval=0.1)

    def api(self, path: str, **params: Any) -> Any:
        response = self.client.get(f"/api/v1/{path}", params=params)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def value(self, query: str) -> float | None:
        result = self.api("query", query=query)["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, query: str, timeout: float = 30) -> None:
        """Until ``query`` has a value (the target was scraped)."""
        deadline = time.monotonic() + timeout
        while self.value(query) is None:
            assert time.monotonic() < deadline, f"prometheus never had {query}"
            time.sleep(0.2)

    def stage_duration_exemplars(self) -> list[dict[str, str]]:
        """The labels of the stage-duration exemplars stored in the last five minutes."""
        now = time.time()
        exemplar_sets = self.api(
            "query_exemplars",
            query="prowzi_stage_duration_seconds_bucket",
            start=str(now - 300),
            end=str(now + 5),
        )
        return [e["labels"] for s in exemplar_sets for e in s["exemplars"]]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(20)
        self.client.close()
        self._log.close()


def test_prometheus_scrapes_every_family_and_an_exemplar_links_to_a_trace(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    marker = tmp_path / "fail-now"
    service = Service(
        tmp_path,
        "--max-concurrent",
        "2",
        PROWZI_TEST_DELAY="0.3",
        PROWZI_TEST_FLAKY_STAGE="search",
        PROWZI_TEST_FAIL_MARKER=str(marker),
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        OTEL_SERVICE_NAME="prowzi-e2e",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{service.port}")
    try:
        # Runs execute while Prometheus scrapes: two succeed (with a retried search), one is
        # cancelled after its first checkpoint.
        prometheus.wait_for("prowzi_runs_in_progress")
        ok = [service.start_run("alpha"), service.start_run("beta")]
        cancelled = service.start_run("gamma")
        service.wait_state(ok[0], "running", "completed")
        service.wait_checkpoint(cancelled)
        response = service.client.post(f"/runs/{cancelled}/cancel")
        assert response.status_code == 202, response.text
        for sid in ok:
            service.wait_state(sid, "completed")
        # One run fails for good.
        marker.touch()
        failed = service.start_run("delta")
        service.wait_state(failed, "failed")

        deadline = time.monotonic() + 30
        while prometheus.value('prowzi_runs_completed_total{outcome="failure"}') != 1:
            assert time.monotonic() < deadline, "prometheus did not see the failed run"
            time.sleep(0.2)
        assert prometheus.value('prowzi_runs_completed_total{outcome="success"}') == 2
        assert prometheus.value('prowzi_runs_completed_total{outcome="cancelled"}') == 1
        assert prometheus.value("prowzi_runs_started_total") == 4
        assert (
            prometheus.value('prowzi_stage_retries_total{stage="search",error_type="transient"}')
            == 2
        )
        assert prometheus.value('prowzi_evaluation_score_count{phase="final"}') == 2
        assert prometheus.value("prowzi_last_run_success_timestamp_seconds") > 0  # type: ignore[operator]

        series = prometheus.api("series", **{"match[]": '{__name__=~"prowzi_.*"}'})
        by_family: dict[str, list[dict[str, str]]] = {}
        for labels in series:
            name = labels["__name__"]
            for suffix in ("_bucket", "_count", "_sum", "_created"):
                if name.removesuffix(suffix) in HISTOGRAMS:
                    name = name.removesuffix(suffix)
            by_family.setdefault(name, []).append(labels)
        for family, expected in FAMILIES.items():
            assert family in by_family, f"{family} not scraped"
            for labels in by_family[family]:
                names = set(labels) - {"__name__", "job", "instance", "le"}
                assert names == expected, (family, labels)
                for key, allowed in CLOSED.items():
                    if key in labels:
                        assert labels[key] in allowed, (family, labels)

        # Exemplars: a stage-duration exemplar carries the trace id of exported spans.
        trace_ids = {labels["trace_id"] for labels in prometheus.stage_duration_exemplars()}
        assert trace_ids, "no exemplars stored"
        receiver.received.wait(10)
        deadline = time.monotonic() + 10
        exported: set[str] = set()
        while not trace_ids & exported and time.monotonic() < deadline:
            exported = receiver.trace_ids
            time.sleep(0.2)
        assert trace_ids & exported, (trace_ids, exported)
        for request in receiver.requests:
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                assert resource["service.name"] == "prowzi-e2e"
        names = {
            span.name
            for request in receiver.requests
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        }
        assert {f"invoke_agent prowzi.{stage}" for stage in STAGES} <= names
        assert "invoke_workflow prowzi.research" in names
        # ...and the run's telemetry names the same trace.
        telemetry_traces = {service.client.get(f"/runs/{sid}").json()["trace_id"] for sid in ok}
        assert trace_ids & telemetry_traces
    finally:
        prometheus.close()
        service.stop()


def fed_registry() -> Any:
    """A registry after a few runs of events, each stage attempt with its trace exemplar."""
    from prometheus_client import CollectorRegistry
    from test_metrics import feed, run_events

    from prowzi.observability.metrics import ProwziMetrics

    registry = CollectorRegistry()
    metrics = ProwziMetrics(registry)
    for i, outcome in enumerate(("success", "failure", "cancelled")):
        feed(metrics, run_events(f"run-{i}", outcome=outcome, trace_id=f"{i + 1:032x}"))
    return registry


def exposed_exemplars(registry: Any) -> set[tuple[str, str]]:
    """(trace_id, span_id) of the stage-duration exemplars in the OpenMetrics exposition."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    from prowzi.observability.metrics import render

    body, _ = render(registry, "application/openmetrics-text; version=1.0.0")
    return {
        (s.exemplar.labels["trace_id"], s.exemplar.labels["span_id"])
        for family in text_string_to_metric_families(body.decode())
        if family.name == "prowzi_stage_duration_seconds"
        for s in family.samples
        if s.exemplar is not None
    }


def test_promtool_lints_the_exposition() -> None:
    """promtool (2.42) lints the classic text format only; the OpenMetrics output, exemplars
    included, is parsed by a real Prometheus in the next test."""
    from test_stack_support import require_tool

    from prowzi.observability.metrics import render

    body, content_type = render(fed_registry(), None)
    assert content_type.startswith("text/plain")
    result = subprocess.run(
        [require_tool("promtool"), "check", "metrics"],
        input=body,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_parses_the_openmetrics_of_serve_metrics_and_keeps_its_exemplars(
    tmp_path: Path,
) -> None:
    """``prowzi run --metrics-port``'s endpoint (prometheus_client's server), scraped for real."""
    from prowzi.observability.metrics import serve_metrics

    registry = fed_registry()
    with serve_metrics(registry, 0) as server:
        prometheus = Prometheus(tmp_path, f"127.0.0.1:{server.port}")
        try:
            prometheus.wait_for("prowzi_runs_started_total")
            (target,) = prometheus.api("targets")["activeTargets"]
            assert target["health"] == "up" and target["lastError"] == "", target
            assert prometheus.value("prowzi_runs_started_total") == 3
            assert prometheus.value('prowzi_runs_completed_total{outcome="cancelled"}') == 1
            stored = {
                (labels["trace_id"], labels["span_id"])
                for labels in prometheus.stage_duration_exemplars()
            }
            assert stored and stored == exposed_exemplars(registry)
        finally:
            prometheus.close()

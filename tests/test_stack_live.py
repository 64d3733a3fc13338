"""Every PromQL expression of the stack, against a real Prometheus that scraped a real Prowzi.

Debian's ``prometheus`` (exemplar storage on, the repository's rule file loaded) scrapes a real
``prowzi serve`` on loopback every second while it executes real runs with Prowzi's default
agents: some succeed, some succeed after an injected transient failure of the search stage
(a retry), some fail for good at verification (a failed run). Spans go to a small OTLP/HTTP
receiver on loopback. Then, through Prometheus's HTTP API:

- every metric name the dashboards, rules and datasources read is in Prowzi's exposition;
- every dashboard query and Tempo "metrics for this span" query parses and returns data;
- every alerting and recording rule parses, is loaded, and evaluates without error;
- the dashboard variables find the instance and the stages;
- a stage-duration exemplar carries the trace id of a span Prowzi exported.

Nothing here talks to anything but 127.0.0.1. A missing tool fails the test; it never skips.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from emulator_servers import RedisServer, free_port
from otlp_receiver import OtlpReceiver
from shared import STAGES
from test_stack_support import (
    CONTRACT,
    DOOMED_MARKER,
    FLAKY_MARKER,
    PROMETHEUS_CONFIG,
    PROMETHEUS_SYNTHETIC,
    RULES_FILE,
    alert_rules,
    dashboards,
    expand_tags,
    grafana_to_promql,
    metric_names,
    prometheus_queries,
    require_tool,
    rule_groups,
    traces_to_metrics_queries,
)

TESTS_DIR = Path(__file__).resolve().parent
PROMPTS = [
    "Write a research paper on quantum computing",
    "Survey the evidence on climate change adaptation",
    "Review machine learning methods for protein folding",
    f"{FLAKY_MARKER} Write a research paper on renewable energy storage",
    f"{FLAKY_MARKER} Summarise research on sleep and memory",
    f"{DOOMED_MARKER} Write a research paper on ocean acidification",
    f"{DOOMED_MARKER} Review the literature on urban heat islands",
]
SUCCESSES = 5
FAILURES = 2
RUN_TIMEOUT = 240.0

pytestmark = pytest.mark.timeout(600)


# --- an OTLP/HTTP trace receiver on loopback ---------------------------------------------------


# --- processes ---------------------------------------------------------------------------------


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{url} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


@dataclass
class Stack:
    prowzi: str
    prometheus: str
    instance: str
    started: float
    receiver: OtlpReceiver

    def api(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.prometheus}/api/v1/{path}", params=params, timeout=30)
        body = response.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        return list(data["result"]) if isinstance(data["result"], list) else [data["result"]]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0


def prometheus_config(prowzi_target: str, worker_target: str) -> dict[str, Any]:
    """The repository's prometheus.yml, pointed at the test's Prowzi and its idle
    ``prowzi worker``, scraping every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES_FILE)]
    config.pop("alerting", None)  # no Alertmanager in the test
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "prowzi"]
    job.pop("file_sd_configs")
    job["scrape_interval"] = "1s"
    job["static_configs"] = [{"targets": [prowzi_target]}]
    (workers,) = [j for j in config["scrape_configs"] if j["job_name"] == "prowzi-worker"]
    workers.pop("dns_sd_configs")
    workers["scrape_interval"] = "1s"
    workers["static_configs"] = [{"targets": [worker_target]}]
    config["scrape_configs"] = [job, workers]
    return config


@pytest.fixture
def stack(tmp_path: Path, receiver: OtlpReceiver) -> Iterator[Stack]:
    prometheus_bin = require_tool("prometheus")
    require_tool("promtool")
    prowzi_port, prometheus_port = free_port(), free_port()
    instance = f"127.0.0.1:{prowzi_port}"

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROWZI_", "OTEL_"))}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
        PROWZI_AGENTS=",".join(f"{stage}=test_stack_support:agent" for stage in STAGES),
        PROWZI_CHECKPOINT_DIR=str(tmp_path / "checkpoints"),
        PROWZI_TELEMETRY_DIR=str(tmp_path / "telemetry"),
        PROWZI_INDEX_DIR=str(tmp_path / "index"),
        PROWZI_ENABLE_CHECKPOINTING="true",
        PROWZI_MAX_RETRIES="2",
        PROWZI_RETRY_BACKOFF_BASE="0.05",
        PROWZI_RETRY_BACKOFF_MAX="0.1",
        OTEL_SERVICE_NAME="prowzi",
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        OTEL_BSP_SCHEDULE_DELAY="200",
    )
    prowzi_log = tmp_path / "prowzi.log"
    prowzi = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prowzi.cli.main",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(prowzi_port),
            "--state-dir",
            str(tmp_path / "service"),
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=tmp_path,
        stdout=prowzi_log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    # A `prowzi worker` on a real redis-server, idle: the stack's worker panels and alerts
    # read its families (the runs here go through the service's own slots).
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis = RedisServer(redis_dir)
    redis.start()
    worker_port = free_port()
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prowzi.cli.main",
            "worker",
            "--concurrency=1",
            f"--metrics-port={worker_port}",
        ],
        env={**env, "PROWZI_BROKER_URL": redis.url},
        cwd=tmp_path,
        stdout=(tmp_path / "worker.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(
        yaml.safe_dump(prometheus_config(instance, f"127.0.0.1:{worker_port}")), encoding="utf-8"
    )
    check = subprocess.run(
        ["promtool", "check", "config", str(config_file)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    prometheus_log = tmp_path / "prometheus.log"
    prometheus = subprocess.Popen(
        [
            prometheus_bin,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
            "--enable-feature=exemplar-storage",
            "--log.level=warn",
        ],
        cwd=tmp_path,
        stdout=prometheus_log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        prowzi_url = f"http://{instance}"
        prometheus_url = f"http://127.0.0.1:{prometheus_port}"
        _wait_http(f"{prowzi_url}/readyz", prowzi, prowzi_log, 60)
        _wait_http(f"{prometheus_url}/-/ready", prometheus, prometheus_log, 60)
        _wait_http(f"http://127.0.0.1:{worker_port}/metrics", worker, tmp_path / "worker.log", 60)
        yield Stack(prowzi_url, prometheus_url, instance, time.time(), receiver)
    finally:
        _stop(prometheus)
        _stop(prowzi)
        _stop(worker)
        redis.stop()


def run_workload(stack: Stack) -> None:
    """Start the runs, spread out, once Prometheus scrapes Prowzi; wait until it has seen every
    run finish. Counters must rise between scrapes, or rates and increases would all be 0."""
    deadline = time.monotonic() + 30
    while stack.value('up{job="prowzi"}') != 1:
        assert time.monotonic() < deadline, "Prometheus never scraped Prowzi"
        time.sleep(0.2)
    time.sleep(2)  # a few samples of the idle state first
    for prompt in PROMPTS:
        response = httpx.post(f"{stack.prowzi}/runs", json={"prompt": prompt}, timeout=30)
        assert response.status_code == 202, response.text
        time.sleep(1.5)
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        done = stack.value("sum(prowzi_runs_completed_total)")
        running = stack.value("sum(prowzi_runs_in_progress)")
        if done >= len(PROMPTS) and running == 0:
            break
        time.sleep(1)
    else:
        pytest.fail(
            f"runs did not finish in {RUN_TIMEOUT}s: {httpx.get(stack.prowzi + '/runs').text}"
        )
    time.sleep(4)  # a few more scrapes and rule evaluations after the last run


def _values(result: list[dict[str, Any]]) -> Iterator[float]:
    for series in result:
        for _, value in series.get("values", [series.get("value", [0, "NaN"])]):
            yield float(value)


def _failures(results: dict[str, str]) -> str:
    return "\n".join(f"- {where}: {why}" for where, why in results.items())


def test_every_stack_expression_against_prometheus_scraping_prowzi(stack: Stack) -> None:
    run_workload(stack)
    elapsed = max(int(time.time() - stack.started) + 5, 30)

    # The workload did what the panels are meant to show.
    assert stack.value('sum(prowzi_runs_completed_total{outcome="success"})') == SUCCESSES
    assert stack.value('sum(prowzi_runs_completed_total{outcome="failure"})') == FAILURES
    assert stack.value('sum(prowzi_stage_retries_total{stage="search"})') >= 2
    assert (
        stack.value('sum(prowzi_stage_executions_total{stage="verification", outcome="failed"})')
        == FAILURES
    )
    assert stack.value('sum(prowzi_checkpoint_writes_total{outcome="success"})') > 0
    assert stack.value("sum(prowzi_evaluation_score_count)") > 0
    assert stack.value("sum(prowzi_turnitin_similarity_ratio_count)") > 0

    # 1. Every metric name used anywhere in the stack is in Prowzi's exposition.
    exposed = set(stack.api("label/__name__/values"))
    used: set[str] = set()
    for query in prometheus_queries():
        used |= metric_names(query.expr.replace("$", ""))
    for rule in (r for g in rule_groups() for r in g["rules"]):
        used |= metric_names(rule["expr"])
    for query in traces_to_metrics_queries():
        used |= metric_names(expand_tags(query))
    recorded = {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}
    missing = sorted(used - exposed - {"ALERTS"})
    assert not missing, f"not in Prowzi's exposition (or Prometheus): {missing}"
    assert recorded <= exposed, "recording rules have not produced their series"
    families = {
        name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for name in exposed
    }
    assert set(CONTRACT) <= families, sorted(set(CONTRACT) - families)
    assert used - recorded - PROMETHEUS_SYNTHETIC <= exposed

    # 2. Every dashboard query parses and returns data, as Grafana would run it.
    problems: dict[str, str] = {}
    end = time.time()
    for query in prometheus_queries():
        expr = grafana_to_promql(query.expr, rate="1m", range_=f"{elapsed}s")
        params: dict[str, Any] = {"query": expr}
        if query.instant:
            response = httpx.get(f"{stack.prometheus}/api/v1/query", params=params, timeout=30)
        else:
            params.update(start=stack.started, end=end, step="1s")
            response = httpx.get(
                f"{stack.prometheus}/api/v1/query_range", params=params, timeout=30
            )
        body = response.json()
        if body.get("status") != "success":
            problems[str(query)] = f"{body.get('errorType')}: {body.get('error')} in {expr}"
        elif not body["data"]["result"]:
            problems[str(query)] = f"no data for {expr}"
        elif not any(math.isfinite(v) for v in _values(body["data"]["result"])):
            problems[str(query)] = f"only NaN/Inf for {expr}"
        if query.exemplar:
            exemplars = httpx.get(
                f"{stack.prometheus}/api/v1/query_exemplars",
                params={"query": expr, "start": stack.started, "end": end},
                timeout=30,
            ).json()
            if exemplars.get("status") != "success" or not exemplars["data"]:
                problems[f"{query} (exemplars)"] = f"no exemplars: {exemplars}"
    assert not problems, "dashboard queries:\n" + _failures(problems)

    # 3. The Tempo datasource's "metrics for this span" queries.
    for query in traces_to_metrics_queries():
        result = stack.query(expand_tags(query))
        assert result, f"no data: {query}"

    # 4. Every rule expression parses and returns a result (or an empty one), and Prometheus
    #    loaded and evaluated every rule of the file without error.
    for rule in (r for g in rule_groups() for r in g["rules"]):
        stack.query(rule["expr"])  # asserts status == success
    loaded = {
        (rule.get("name"), rule["type"]): rule
        for group in stack.api("rules")["groups"]
        for rule in group["rules"]
    }
    for rule in alert_rules():
        entry = loaded.get((rule["alert"], "alerting"))
        assert entry is not None, f"{rule['alert']} not loaded"
        assert entry["health"] == "ok", f"{rule['alert']}: {entry.get('lastError')}"
    for record in {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}:
        entry = loaded.get((record, "recording"))
        assert entry is not None and entry["health"] == "ok", record
    # The injected failures (2 of 7 runs, both at verification) meet the conditions of the
    # failure-ratio alerts on real data: they are pending (their `for` has not elapsed), and
    # nothing else is.
    expected = {"ProwziRunFailureRatioHigh", "ProwziStageErrorRatioHigh"}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        active = {a["labels"]["alertname"]: a for a in stack.api("alerts")["alerts"]}
        if expected <= set(active):
            break
        time.sleep(0.5)
    assert set(active) == expected, sorted(active)
    assert all(a["state"] == "pending" for a in active.values())
    assert active["ProwziStageErrorRatioHigh"]["labels"]["stage"] == "verification"
    assert active["ProwziRunFailureRatioHigh"]["labels"]["instance"] == stack.instance

    # 5. Dashboard variables: label_values() finds the instance and the stages.
    for dashboard in dashboards().values():
        for variable in dashboard["templating"]["list"]:
            if variable["type"] != "query":
                continue
            definition = variable["definition"]
            inner = definition.removeprefix("label_values(").removesuffix(")")
            selector, label = (part.strip() for part in inner.rsplit(",", 1))
            values = stack.api(f"label/{label}/values", **{"match[]": grafana_to_promql(selector)})
            assert values, f"{definition} finds nothing"
            if label == "instance":
                assert stack.instance in values
            if label == "stage":
                assert set(STAGES) <= set(values)

    # 6. A stage-duration exemplar links to a trace Prowzi exported.
    deadline = time.monotonic() + 10
    exemplar_ids: set[str] = set()
    while time.monotonic() < deadline:
        data = stack.api(
            "query_exemplars",
            query="prowzi_stage_duration_seconds_bucket",
            start=stack.started,
            end=time.time(),
        )
        exemplar_ids = {
            e["labels"]["trace_id"]
            for series in data
            for e in series["exemplars"]
            if "trace_id" in e["labels"]
        }
        if exemplar_ids & stack.receiver.trace_ids:
            break
        time.sleep(0.5)
    assert exemplar_ids, "no trace_id exemplar on prowzi_stage_duration_seconds"
    assert exemplar_ids & stack.receiver.trace_ids, "exemplar trace ids match no exported span"

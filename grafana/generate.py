#!/usr/bin/env python3
"""Generate Prowzi's Grafana dashboards (grafana/dashboards/*.json).

The dashboards are code: edit this file, then run

    python grafana/generate.py          # rewrite the JSON files
    python grafana/generate.py --check  # exit 1 if the committed JSON is stale (CI runs this)

The output uses Grafana's classic dashboard JSON model (schemaVersion 39), with datasources
referenced by the uids provisioned in deploy/grafana/provisioning/datasources/datasources.yml.
Every dashboard is templated by ``instance`` and ``stage``; every panel has a title, a unit
and a description. Only the standard library is used, so the check needs no extra packages.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
SCHEMA_VERSION = 39

PROMETHEUS = {"type": "prometheus", "uid": "prometheus"}
TEMPO = {"type": "tempo", "uid": "tempo"}

# Selectors shared by every query; Grafana expands $instance / $stage into regexes.
INST = 'instance=~"$instance"'
STAGE = 'stage=~"$stage"'
JOB = 'job="prowzi"'
RATE = "$__rate_interval"
RANGE = "$__range"


def sel(metric: str, *matchers: str, stage: bool = False) -> str:
    """``metric{instance=~"$instance"[, stage=~"$stage"], ...}``."""
    parts = [INST, *([STAGE] if stage else []), *matchers]
    return f"{metric}{{{', '.join(parts)}}}"


def rate(series: str, window: str = RATE) -> str:
    return f"rate({series}[{window}])"


def increase(series: str, window: str = RANGE) -> str:
    return f"increase({series}[{window}])"


def sum_by(labels: str, inner: str) -> str:
    return f"sum by ({labels}) ({inner})" if labels else f"sum({inner})"


def hq(q: float, labels: str, inner: str) -> str:
    """``histogram_quantile`` over buckets summed by ``labels`` (``le`` added)."""
    group = f"{labels}, le" if labels else "le"
    return f"histogram_quantile({q}, sum by ({group}) ({inner}))"


ZERO = "on() vector(0)"


# --- building blocks -----------------------------------------------------------------------


@dataclass
class Query:
    expr: str
    legend: str = ""
    instant: bool = False
    fmt: str = "time_series"  # time_series | table | heatmap
    exemplar: bool = False

    def to_target(self, ref_id: str) -> dict[str, Any]:
        return {
            "datasource": PROMETHEUS,
            "refId": ref_id,
            "expr": self.expr,
            "legendFormat": self.legend or "__auto",
            "range": not self.instant,
            "instant": self.instant,
            "format": self.fmt,
            "exemplar": self.exemplar,
            "editorMode": "code",
        }


@dataclass
class Panel:
    kind: str
    title: str
    description: str
    unit: str
    queries: list[Query] = field(default_factory=list)
    width: int = 12
    height: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    overrides: list[dict[str, Any]] = field(default_factory=list)
    transformations: list[dict[str, Any]] = field(default_factory=list)
    raw_targets: list[dict[str, Any]] | None = None
    datasource: dict[str, str] = field(default_factory=lambda: dict(PROMETHEUS))


@dataclass
class Row:
    title: str
    panels: list[Panel]


def _targets(panel: Panel) -> list[dict[str, Any]]:
    if panel.raw_targets is not None:
        return panel.raw_targets
    return [q.to_target(chr(ord("A") + i)) for i, q in enumerate(panel.queries)]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    defaults.update(panel.defaults)
    body: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": panel.datasource,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": _targets(panel),
        "fieldConfig": {"defaults": defaults, "overrides": panel.overrides},
        "options": panel.options,
    }
    if panel.transformations:
        body["transformations"] = panel.transformations
    return body


def _layout(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """Rows stacked top to bottom; panels flow left to right, wrapping at 24 columns."""
    panels: list[dict[str, Any]] = []
    panel_id = 1
    y = 0
    for row in rows:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id += 1
        y += 1
        x = 0
        line_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x = 0
                y += line_height
                line_height = 0
            panels.append(_panel_json(panel, panel_id, x, y))
            panel_id += 1
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return panels


def _variables() -> list[dict[str, Any]]:
    def query_var(name: str, label: str, query: str, description: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "description": description,
            "type": "query",
            "datasource": PROMETHEUS,
            "definition": query,
            "query": {"query": query, "refId": f"{name}-variable"},
            "refresh": 2,  # on time range change
            "regex": "",
            "sort": 1,
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [],
            "hide": 0,
        }

    return [
        query_var(
            "instance",
            "Instance",
            "label_values(prowzi_build_info, instance)",
            "Prowzi processes scraped by Prometheus (the `instance` target label).",
        ),
        query_var(
            "stage",
            "Stage",
            'label_values(prowzi_stage_executions_total{instance=~"$instance"}, stage)',
            "Workflow stages (intent, planning, search, verification, writing, evaluation, "
            "turnitin; `other` collects unknown stage names).",
        ),
    ]


MIN_RUN_DURATION = {
    "name": "min_run_duration",
    "label": "Runs longer than",
    "description": "Only runs whose trace lasted longer than this appear in the Slowest runs "
    "table (a TraceQL duration).",
    "type": "custom",
    "query": "0s,1s,10s,30s,1m,5m,15m,1h",
    "current": {"selected": True, "text": "0s", "value": "0s"},
    "options": [],
    "multi": False,
    "includeAll": False,
    "hide": 0,
}


def _dashboard(
    uid: str,
    title: str,
    description: str,
    rows: list[Row],
    extra_variables: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["prowzi"],
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "links": [
            {
                "type": "dashboards",
                "title": "Prowzi dashboards",
                "tags": ["prowzi"],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
                "icon": "external link",
                "targetBlank": False,
                "tooltip": "",
                "url": "",
            }
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": _variables() + (extra_variables or [])},
        "panels": _layout(rows),
    }


def timeseries(title: str, description: str, unit: str, *queries: Query, **kw: Any) -> Panel:
    kw.setdefault(
        "options",
        {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    )
    kw.setdefault("defaults", {"custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10}})
    return Panel("timeseries", title, description, unit, list(queries), **kw)


def stat(title: str, description: str, unit: str, *queries: Query, **kw: Any) -> Panel:
    kw.setdefault("width", 6)
    kw.setdefault("height", 5)
    kw.setdefault(
        "options",
        {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        },
    )
    return Panel("stat", title, description, unit, list(queries), **kw)


def heatmap(title: str, description: str, unit: str, query: Query, **kw: Any) -> Panel:
    kw.setdefault(
        "options",
        {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
            "filterValues": {"le": 1e-9},
            "legend": {"show": True},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": True},
            "yAxis": {"axisPlacement": "left", "unit": unit},
        },
    )
    return Panel("heatmap", title, description, unit, [query], **kw)


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for value, color in steps],
    }


def count_stat(
    title: str,
    description: str,
    expr: str,
    legend: str,
    *steps: tuple[float | None, str],
    **kw: Any,
) -> Panel:
    """A whole-number stat of one instant query (a count, or an increase over the range)."""
    return stat(
        title,
        description,
        "short",
        Query(expr, legend=legend, instant=True),
        defaults={"decimals": 0, "thresholds": thresholds(*steps)},
        **kw,
    )


def last_time_stat(title: str, description: str, metric: str, legend: str, **kw: Any) -> Panel:
    """How long ago a ``*_timestamp_seconds`` gauge last moved (its newest non-zero value)."""
    return stat(
        title,
        description,
        "dateTimeFromNow",
        Query(f"max({sel(metric)} > 0) * 1000", legend=legend, instant=True),
        defaults={"thresholds": thresholds((None, "green"))},
        **kw,
    )


def quantiles(
    metric: str, qs: Iterable[float] = (0.5, 0.95), *, idle_zero: bool = False
) -> list[Query]:
    """Quantiles of a histogram. With ``idle_zero``, 0 while it observes nothing (a quantile of
    no observations is NaN): for histograms that stay empty in many deployments."""
    queries = []
    for q in qs:
        expr = hq(q, "", rate(sel(f"{metric}_bucket")))
        if idle_zero:
            expr = f"({expr} >= 0) or (0 * {sum_by('', rate(sel(f'{metric}_count')))})"
        queries.append(Query(expr, legend=f"p{round(q * 100)}"))
    return queries


# --- the dashboards --------------------------------------------------------------------------


def overview() -> dict[str, Any]:
    runs_success = sum_by("", increase(sel("prowzi_runs_completed_total", 'outcome="success"')))
    runs_finished = sum_by(
        "", increase(sel("prowzi_runs_completed_total", 'outcome=~"success|failure"'))
    )
    runs = Row(
        "Runs",
        [
            timeseries(
                "Runs per minute",
                "Runs started, and runs finished by outcome (success, failure, cancelled), per "
                "minute. prowzi_runs_started_total and prowzi_runs_completed_total.",
                "opm",
                Query(sum_by("", rate(sel("prowzi_runs_started_total"))) + " * 60", "started"),
                Query(
                    sum_by("outcome", rate(sel("prowzi_runs_completed_total"))) + " * 60",
                    legend="{{outcome}}",
                ),
                width=12,
            ),
            stat(
                "Success ratio",
                "Share of the runs finished in the selected time range that succeeded; "
                "cancelled runs are left out. Red below 90%.",
                "percentunit",
                Query(
                    f"({runs_success} or {ZERO}) / {runs_finished}",
                    legend="success ratio",
                    instant=True,
                ),
                defaults={
                    "min": 0,
                    "max": 1,
                    "decimals": 1,
                    "thresholds": thresholds((None, "red"), (0.9, "orange"), (0.97, "green")),
                },
            ),
            stat(
                "Runs in progress",
                "Runs started and not yet finished, now (prowzi_runs_in_progress).",
                "short",
                Query(sum_by("", sel("prowzi_runs_in_progress")), legend="in progress"),
                defaults={"decimals": 0, "thresholds": thresholds((None, "blue"))},
            ),
            timeseries(
                "Run duration p50 and p95",
                "Median and 95th percentile of the wall time of finished runs, all outcomes "
                "(prowzi_run_duration_seconds).",
                "s",
                *quantiles("prowzi_run_duration_seconds"),
                width=12,
            ),
            last_time_stat(
                "Last successful run",
                "When the most recent successful run finished, on any selected instance "
                "(prowzi_last_run_success_timestamp_seconds). Alert "
                "ProwziNoSuccessfulRunForADay fires after a day without one.",
                "prowzi_last_run_success_timestamp_seconds",
                "last success",
            ),
            count_stat(
                "Runs started in range",
                "Runs started in the selected time range (prowzi_runs_started_total).",
                sum_by("", increase(sel("prowzi_runs_started_total"))),
                "started",
                (None, "blue"),
            ),
        ],
    )
    service = Row(
        "Service",
        [
            timeseries(
                "Queue depth and active runs",
                "Runs waiting for a slot (prowzi_service_queue_depth) and runs executing "
                "(prowzi_service_active_runs) in `prowzi serve`. A queue that keeps growing "
                "means runs arrive faster than the concurrency limit lets them finish.",
                "short",
                Query(
                    sum_by("instance", sel("prowzi_service_queue_depth")),
                    legend="queued {{instance}}",
                ),
                Query(
                    sum_by("instance", sel("prowzi_service_active_runs")),
                    legend="active {{instance}}",
                ),
                width=12,
            ),
            count_stat(
                "Firing Prowzi alerts",
                "Prowzi alerts firing in Prometheus now (ALERTS series); details in "
                "Alertmanager and deploy/RUNBOOK.md.",
                'count(ALERTS{alertname=~"Prowzi.+", alertstate="firing"}) or on() vector(0)',
                "firing",
                (None, "green"),
                (1, "red"),
            ),
            Panel(
                "table",
                "Build info",
                "Version and Python version of each scraped Prowzi process (prowzi_build_info).",
                "none",
                [
                    Query(
                        f"max by (instance, version, python_version) ({sel('prowzi_build_info')})",
                        instant=True,
                        fmt="table",
                    )
                ],
                width=6,
                height=5,
                options={"showHeader": True, "cellHeight": "sm"},
                transformations=[
                    {
                        "id": "organize",
                        "options": {"excludeByName": {"Time": True, "Value": True}},
                    }
                ],
            ),
        ],
    )
    traces = Row("Traces", [slowest_runs_panel()])
    return _dashboard(
        "prowzi-overview",
        "Prowzi / Overview",
        "Runs: throughput, success, duration, what is in flight, and the slowest traces.",
        [runs, service, workers_row(), traces],
        extra_variables=[MIN_RUN_DURATION],
    )


def workers_row() -> Row:
    """`prowzi worker` processes (Celery on Redis): the queue, what each worker runs, and how
    deliveries end (duplicates, lease takeovers)."""
    return Row(
        "Workers",
        [
            timeseries(
                "Broker queue depth",
                "Runs waiting in the Redis queue for a worker (prowzi_worker_queue_depth, read "
                "from the broker by every worker at scrape time, so the maximum over workers). "
                "Alert ProwziWorkerQueueBacklogGrowing fires when it keeps growing.",
                "short",
                Query(f"max({sel('prowzi_worker_queue_depth')})", legend="queued"),
                width=8,
            ),
            timeseries(
                "Runs in flight per worker",
                "Runs each worker process is executing (prowzi_worker_runs_in_flight); a worker "
                "that disappears from here stopped being scraped (alert ProwziWorkersDown).",
                "short",
                Query(
                    sum_by("instance", sel("prowzi_worker_runs_in_flight")),
                    legend="{{instance}}",
                ),
                width=8,
            ),
            timeseries(
                "Deliveries by outcome",
                "What each delivery of a queued run ended as, per minute "
                "(prowzi_worker_deliveries_total): duplicate = another live worker held the "
                "session's lease; requeued = handed back by a worker that was stopping.",
                "short",
                Query(
                    sum_by("outcome", rate(sel("prowzi_worker_deliveries_total"))) + " * 60",
                    legend="{{outcome}}",
                ),
                width=8,
            ),
            timeseries(
                "Lease takeovers and leases lost",
                "Sessions continued by another worker after their worker's lease expired or "
                "it died (prowzi_worker_lease_takeovers_total), and runs stopped because their "
                "lease was taken over (prowzi_worker_leases_lost_total), per hour. Alert "
                "ProwziLeaseTakeovers fires when workers keep dying mid-run.",
                "short",
                Query(
                    sum_by("reason", rate(sel("prowzi_worker_lease_takeovers_total"))) + " * 3600",
                    legend="takeover: {{reason}}",
                ),
                Query(
                    sum_by("", rate(sel("prowzi_worker_leases_lost_total"))) + " * 3600",
                    legend="lease lost",
                ),
                width=12,
            ),
            count_stat(
                "Workers up",
                'Worker processes Prometheus scrapes successfully now (up{job="prowzi-worker"}).',
                'sum(up{job="prowzi-worker"}) or on() vector(0)',
                "up",
                (None, "red"),
                (1, "green"),
            ),
        ],
    )


def slowest_runs_panel() -> Panel:
    query = (
        '{ resource.service.name = "prowzi" && name = "invoke_workflow prowzi.research"'
        " && duration > $min_run_duration }"
        ' && { span.prowzi.stage =~ "$stage" }'
        " | select(span.prowzi.session_id, span.prowzi.status)"
    )
    target = {
        "datasource": TEMPO,
        "refId": "A",
        "queryType": "traceql",
        "query": query,
        "limit": 100,
        "tableType": "traces",
    }
    return Panel(
        "table",
        "Slowest runs (traces)",
        "The 20 slowest of the latest 100 Prowzi runs in the time range (Tempo, TraceQL), "
        "longer than the 'Runs longer than' selector and touching the selected stages: each row "
        "is a run's trace (root span `invoke_workflow prowzi.research`); open the trace id to "
        "see its stage attempts, retries and what each agent did.",
        "ms",
        raw_targets=[target],
        datasource=dict(TEMPO),
        width=24,
        height=10,
        options={
            "showHeader": True,
            "cellHeight": "sm",
            "sortBy": [{"displayName": "Duration", "desc": True}],
        },
        transformations=[
            {"id": "sortBy", "options": {"sort": [{"field": "Duration", "desc": True}]}},
            {"id": "limit", "options": {"limitField": 20}},
        ],
    )


FAILED = 'outcome="failed"'
FINISHED = 'outcome=~"completed|failed"'
FINAL = 'phase="final"'


def executions(*matchers: str) -> str:
    return sel("prowzi_stage_executions_total", *matchers, stage=True)


def stages() -> dict[str, Any]:
    stage_buckets = sel("prowzi_stage_duration_seconds_bucket", stage=True)
    retry_series = sel("prowzi_stage_retries_total", stage=True)
    throughput = Row(
        "Throughput and errors",
        [
            timeseries(
                "Stage executions by outcome",
                "Stage attempts per second by stage and outcome: completed, retrying (failed, "
                "will be retried), failed (gave up), skipped (prowzi_stage_executions_total).",
                "ops",
                Query(sum_by("stage, outcome", rate(executions())), "{{stage}} {{outcome}}"),
            ),
            timeseries(
                "Stage error ratio",
                "Per stage, the share of finished executions that failed for good: failed / "
                "(completed + failed). Retried attempts that later succeed do not count; see "
                "Retries. Alert ProwziStageErrorRatioHigh fires above 10%.",
                "percentunit",
                Query(
                    f"({sum_by('stage', rate(executions(FAILED)))}"
                    f" or 0 * {sum_by('stage', rate(executions()))})"
                    f" / {sum_by('stage', rate(executions(FINISHED)))}",
                    legend="{{stage}}",
                ),
                defaults={
                    "min": 0,
                    "max": 1,
                    "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10},
                },
            ),
        ],
    )
    latency = Row(
        "Latency",
        [
            heatmap(
                "Stage duration heatmap",
                "Distribution of stage attempt durations over time (prowzi_stage_duration_seconds "
                "buckets). Exemplar dots carry the attempt's trace_id: click one to open the "
                "trace in Tempo.",
                "s",
                Query(
                    sum_by("le", rate(stage_buckets)),
                    legend="{{le}}",
                    fmt="heatmap",
                    exemplar=True,
                ),
            ),
            timeseries(
                "Stage p95 duration vs objective",
                "95th percentile of stage attempt durations per stage, with exemplars, against "
                "each stage's objective (prowzi:stage_duration_seconds:p95_objective, dashed). "
                "Alert ProwziStageLatencyAboveObjective fires when p95 stays above it.",
                "s",
                Query(
                    hq(0.95, "stage", rate(stage_buckets)),
                    legend="{{stage}} p95",
                    exemplar=True,
                ),
                Query(
                    f"max by (stage) (prowzi:stage_duration_seconds:p95_objective{{{STAGE}}})",
                    legend="{{stage}} objective",
                ),
                overrides=[
                    {
                        "matcher": {"id": "byRegexp", "options": ".* objective"},
                        "properties": [
                            {
                                "id": "custom.lineStyle",
                                "value": {"fill": "dash", "dash": [10, 10]},
                            }
                        ],
                    }
                ],
            ),
        ],
    )
    retries = Row(
        "Retries",
        [
            timeseries(
                "Retries by stage and error type",
                "Retries per minute by stage and error type (transient, timeout, permanent) "
                "(prowzi_stage_retries_total). Alert ProwziRetryStorm fires when retries are "
                "many and a large share of a stage's attempts.",
                "opm",
                Query(
                    sum_by("stage, error_type", rate(retry_series)) + " * 60",
                    legend="{{stage}} {{error_type}}",
                ),
                width=16,
            ),
            last_time_stat(
                "Last stage completion",
                "When any stage attempt last completed (prowzi_stage_last_completed_timestamp_"
                "seconds). With runs in progress and this getting old, ProwziRunStuck fires.",
                "prowzi_stage_last_completed_timestamp_seconds",
                "last completion",
                width=8,
                height=8,
            ),
        ],
    )

    def table_query(expr: str) -> Query:
        return Query(expr, instant=True, fmt="table")

    summary = Row(
        "Per-stage summary",
        [
            Panel(
                "table",
                "Per-stage summary",
                "One row per stage over the selected time range: executions, final failures, "
                "error ratio, retries and p95 duration.",
                "short",
                [
                    table_query(sum_by("stage", increase(executions(FINISHED)))),
                    table_query(sum_by("stage", increase(executions(FAILED)))),
                    table_query(
                        f"{sum_by('stage', increase(executions(FAILED)))}"
                        f" / {sum_by('stage', increase(executions(FINISHED)))}"
                    ),
                    table_query(sum_by("stage", increase(retry_series))),
                    table_query(hq(0.95, "stage", increase(stage_buckets))),
                ],
                width=24,
                height=9,
                defaults={"decimals": 2},
                options={
                    "showHeader": True,
                    "cellHeight": "sm",
                    "sortBy": [{"displayName": "stage", "desc": False}],
                },
                transformations=[
                    {"id": "merge", "options": {}},
                    {
                        "id": "organize",
                        "options": {
                            "excludeByName": {"Time": True},
                            "renameByName": {
                                "Value #A": "executions",
                                "Value #B": "failed",
                                "Value #C": "error ratio",
                                "Value #D": "retries",
                                "Value #E": "p95 duration",
                            },
                        },
                    },
                ],
                overrides=[
                    {
                        "matcher": {"id": "byName", "options": "error ratio"},
                        "properties": [{"id": "unit", "value": "percentunit"}],
                    },
                    {
                        "matcher": {"id": "byName", "options": "p95 duration"},
                        "properties": [{"id": "unit", "value": "s"}],
                    },
                    {
                        "matcher": {"id": "byRegexp", "options": "executions|failed|retries"},
                        "properties": [{"id": "decimals", "value": 0}],
                    },
                ],
            )
        ],
    )
    return _dashboard(
        "prowzi-stages",
        "Prowzi / Stages",
        "Per-stage throughput, errors, latency (with exemplars linking to traces) and retries.",
        [throughput, latency, retries, summary, language_model()],
    )


LIMITED = 'outcome="rate_limited"'
SENT = 'outcome!="cached"'


def language_model() -> Row:
    """Tokens, cost and rate limits of the LLM agents' model calls (prowzi_llm_*)."""
    calls = sel("prowzi_llm_calls_total", stage=True)
    limited = sum_by("model", rate(sel("prowzi_llm_calls_total", LIMITED, stage=True)))
    sent = sum_by("model", rate(sel("prowzi_llm_calls_total", SENT, stage=True)))
    durations = sel("prowzi_llm_call_duration_seconds_bucket", stage=True)
    durations_count = sel("prowzi_llm_call_duration_seconds_count", stage=True)
    return Row(
        "Language model",
        [
            timeseries(
                "Tokens per minute",
                "Input and output tokens of model calls per minute by stage and type, as the "
                "server's usage reported them (prowzi_llm_tokens_total; cached answers count "
                "none).",
                "short",
                Query(
                    sum_by("stage, type", rate(sel("prowzi_llm_tokens_total", stage=True)))
                    + " * 60",
                    legend="{{stage}} {{type}}",
                ),
                width=8,
            ),
            timeseries(
                "Cost per hour",
                "US dollars per hour of model calls by stage and model at the configured "
                "prices, PROWZI_LLM_PRICES (prowzi_llm_cost_usd_total).",
                "currencyUSD",
                Query(
                    sum_by("stage, model", rate(sel("prowzi_llm_cost_usd_total", stage=True)))
                    + " * 3600",
                    legend="{{stage}} {{model}}",
                ),
                width=8,
            ),
            timeseries(
                "Model requests by outcome",
                "Model requests per second by outcome: ok, rate_limited (HTTP 429), error, "
                "cached (answered from the cache, not sent) (prowzi_llm_calls_total).",
                "reqps",
                Query(sum_by("model, outcome", rate(calls)), "{{model}} {{outcome}}"),
                width=8,
            ),
            timeseries(
                "Rate-limited share",
                "Per model, the share of requests sent that were answered HTTP 429 (0 while "
                "none are sent). Alert ProwziLlmRateLimited fires above 20% for 10 minutes.",
                "percentunit",
                Query(
                    f"({limited} / ({sent} > 0)) or (0 * {sent})",
                    legend="{{model}}",
                ),
                defaults={"min": 0, "max": 1},
                width=12,
            ),
            timeseries(
                "Model call p95 duration",
                "95th percentile of one model request's duration by stage, 0 while there are "
                "none (prowzi_llm_call_duration_seconds).",
                "s",
                Query(
                    f"({hq(0.95, 'stage', rate(durations))} >= 0)"
                    f" or (0 * {sum_by('stage', rate(durations_count))})",
                    legend="{{stage}} p95",
                ),
                width=12,
            ),
        ],
    )


def health() -> dict[str, Any]:
    failed_writes = sum_by("", increase(sel("prowzi_checkpoint_writes_total", 'outcome="failure"')))
    checkpoints = Row(
        "Checkpoints",
        [
            timeseries(
                "Checkpoint writes by outcome",
                "Checkpoint writes per second, successful and failed "
                "(prowzi_checkpoint_writes_total). Any failure fires "
                "ProwziCheckpointWriteFailures.",
                "ops",
                Query(
                    sum_by("outcome", rate(sel("prowzi_checkpoint_writes_total"))),
                    legend="{{outcome}}",
                ),
                width=8,
            ),
            timeseries(
                "Checkpoint write latency",
                "Median, 95th and 99th percentile of the time to write one checkpoint, fsync "
                "included (prowzi_checkpoint_write_duration_seconds).",
                "s",
                *quantiles("prowzi_checkpoint_write_duration_seconds", qs=(0.5, 0.95, 0.99)),
                width=8,
            ),
            timeseries(
                "Checkpoint size",
                "Median and 95th percentile size of a written checkpoint "
                "(prowzi_checkpoint_size_bytes).",
                "bytes",
                *quantiles("prowzi_checkpoint_size_bytes"),
                width=8,
            ),
            timeseries(
                "Checkpoint bytes written",
                "Bytes of checkpoint data written per second "
                "(the sum of prowzi_checkpoint_size_bytes).",
                "Bps",
                Query(
                    sum_by("", rate(sel("prowzi_checkpoint_size_bytes_sum"))),
                    legend="written",
                ),
                width=12,
            ),
            count_stat(
                "Failed checkpoint writes in range",
                "Checkpoint writes that failed in the selected time range. Anything above zero "
                "means runs were not protected against a crash for a while.",
                failed_writes + f" or {ZERO}",
                "failed",
                (None, "green"),
                (1, "red"),
            ),
            count_stat(
                "Checkpoint writes in range",
                "Checkpoint writes (all outcomes) in the selected time range.",
                sum_by("", increase(sel("prowzi_checkpoint_writes_total"))),
                "writes",
                (None, "blue"),
            ),
        ],
    )
    sinks = Row(
        "Telemetry sinks",
        [
            timeseries(
                "Sink errors by sink",
                "Errors raised by event sinks (telemetry files, event log, callbacks, webhooks, "
                "...) per minute (prowzi_telemetry_sink_errors_total). A failing sink never "
                "fails a run, but what it records is incomplete.",
                "opm",
                Query(
                    sum_by("sink", rate(sel("prowzi_telemetry_sink_errors_total"))) + " * 60",
                    legend="{{sink}}",
                ),
                width=16,
            ),
            count_stat(
                "Sink errors in range",
                "Sink errors in the selected time range, all sinks. Any error fires "
                "ProwziTelemetrySinkErrors.",
                sum_by("", increase(sel("prowzi_telemetry_sink_errors_total"))) + f" or {ZERO}",
                "errors",
                (None, "green"),
                (1, "orange"),
                width=8,
                height=8,
            ),
        ],
    )
    webhooks = Row(
        "Webhooks",
        [
            timeseries(
                "Webhook deliveries by outcome",
                "Webhook delivery attempts per minute by outcome "
                "(prowzi_webhook_deliveries_total): delivered (2xx), retrying (to be tried "
                "again), failed (a 4xx, a refused address or the retry schedule used up), "
                "disabled (the endpoint answered 410 Gone).",
                "opm",
                Query(
                    sum_by("outcome", rate(sel("prowzi_webhook_deliveries_total"))) + " * 60",
                    legend="{{outcome}}",
                ),
                width=8,
            ),
            timeseries(
                "Webhook outbox",
                "Deliveries waiting in the outbox (prowzi_webhook_outbox_depth, left axis) and "
                "the age of the oldest (prowzi_webhook_outbox_oldest_pending_age_seconds). "
                "A growing outbox fires ProwziWebhookOutboxGrowing.",
                "short",
                Query(sum_by("instance", sel("prowzi_webhook_outbox_depth")), legend="pending"),
                Query(
                    f"max({sel('prowzi_webhook_outbox_oldest_pending_age_seconds')})",
                    legend="oldest age (s)",
                ),
                width=8,
            ),
            timeseries(
                "Webhook delivery latency",
                "Median and 95th percentile of the time from sending a webhook to the "
                "receiver's answer (prowzi_webhook_delivery_duration_seconds).",
                "s",
                *quantiles("prowzi_webhook_delivery_duration_seconds", idle_zero=True),
                width=8,
            ),
        ],
    )
    scrape = Row(
        "Scrape health",
        [
            timeseries(
                "Prowzi target up",
                "1 when Prometheus's last scrape of the Prowzi target succeeded, 0 when it "
                "failed (`up`). ProwziTargetDown fires after 2 minutes at 0.",
                "bool_yes_no",
                Query(f"up{{{JOB}, {INST}}}", legend="{{instance}}"),
                width=8,
                defaults={
                    "min": 0,
                    "max": 1,
                    "custom": {"drawStyle": "line", "lineWidth": 2, "fillOpacity": 10},
                },
            ),
            timeseries(
                "Scrape duration",
                "How long Prometheus takes to scrape Prowzi's /metrics "
                "(scrape_duration_seconds). It should stay far below the scrape timeout.",
                "s",
                Query(f"scrape_duration_seconds{{{JOB}, {INST}}}", legend="{{instance}}"),
                width=8,
            ),
            timeseries(
                "Series per scrape",
                "Samples in each scrape of Prowzi (scrape_samples_scraped). Prowzi's labels come "
                "from closed sets, so this stays flat however many runs execute.",
                "short",
                Query(f"scrape_samples_scraped{{{JOB}, {INST}}}", legend="{{instance}}"),
                width=8,
            ),
        ],
    )
    return _dashboard(
        "prowzi-health",
        "Prowzi / Checkpoints & telemetry health",
        "Checkpoint writes, latency and size; event-sink errors; webhook deliveries and "
        "their outbox; and Prometheus's view of the Prowzi scrape target.",
        [checkpoints, sinks, webhooks, scrape],
    )


def mean_score(phase: str) -> str:
    matcher = f'phase="{phase}"'
    return (
        f"{sum_by('', increase(sel('prowzi_evaluation_score_sum', matcher)))}"
        f" / {sum_by('', increase(sel('prowzi_evaluation_score_count', matcher)))}"
    )


def quality() -> dict[str, Any]:
    evaluation = Row(
        "Evaluation",
        [
            timeseries(
                "Evaluation score p50 by phase",
                "Median evaluation score (0-1) of drafts: `initial` is the first draft, `final` "
                "the draft after any revision (prowzi_evaluation_score).",
                "percentunit",
                Query(
                    hq(0.5, "phase", rate(sel("prowzi_evaluation_score_bucket"))),
                    legend="{{phase}} p50",
                ),
                width=12,
                defaults={
                    "min": 0,
                    "max": 1,
                    "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10},
                },
            ),
            stat(
                "Mean evaluation score",
                "Mean evaluation score per phase over the selected time range.",
                "percentunit",
                Query(
                    f"{sum_by('phase', increase(sel('prowzi_evaluation_score_sum')))}"
                    f" / {sum_by('phase', increase(sel('prowzi_evaluation_score_count')))}",
                    legend="{{phase}}",
                    instant=True,
                ),
                defaults={
                    "min": 0,
                    "max": 1,
                    "decimals": 1,
                    "thresholds": thresholds((None, "red"), (0.6, "orange"), (0.75, "green")),
                },
            ),
            stat(
                "Revision gain",
                "Mean final score minus mean initial score over the selected time range: what "
                "the revision pass adds.",
                "percentunit",
                Query(
                    f"{mean_score('final')} - {mean_score('initial')}",
                    legend="gain",
                    instant=True,
                ),
                defaults={"decimals": 1, "thresholds": thresholds((None, "orange"), (0, "green"))},
            ),
            heatmap(
                "Final evaluation score distribution",
                "How final evaluation scores are distributed over time "
                "(prowzi_evaluation_score buckets, phase final).",
                "percentunit",
                Query(
                    sum_by("le", increase(sel("prowzi_evaluation_score_bucket", FINAL), RATE)),
                    legend="{{le}}",
                    fmt="heatmap",
                ),
                width=24,
            ),
        ],
    )
    originality = Row(
        "Originality",
        [
            timeseries(
                "Turnitin similarity p50 and p95",
                "Median and 95th percentile similarity (0-1) of final documents to their "
                "sources, as measured by the turnitin stage (prowzi_turnitin_similarity_ratio). "
                "Lower is more original.",
                "percentunit",
                *quantiles("prowzi_turnitin_similarity_ratio"),
                width=12,
                defaults={
                    "min": 0,
                    "max": 1,
                    "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10},
                },
            ),
            stat(
                "Mean similarity",
                "Mean turnitin similarity over the selected time range.",
                "percentunit",
                Query(
                    f"{sum_by('', increase(sel('prowzi_turnitin_similarity_ratio_sum')))}"
                    f" / {sum_by('', increase(sel('prowzi_turnitin_similarity_ratio_count')))}",
                    legend="mean",
                    instant=True,
                ),
                defaults={
                    "min": 0,
                    "max": 1,
                    "decimals": 1,
                    "thresholds": thresholds((None, "green"), (0.25, "orange"), (0.4, "red")),
                },
            ),
            count_stat(
                "Documents checked in range",
                "Documents the turnitin stage measured in the selected time range.",
                sum_by("", increase(sel("prowzi_turnitin_similarity_ratio_count"))),
                "documents",
                (None, "blue"),
            ),
        ],
    )
    return _dashboard(
        "prowzi-quality",
        "Prowzi / Quality",
        "What the runs produced: evaluation scores before and after revision, and turnitin "
        "similarity.",
        [evaluation, originality],
    )


DASHBOARDS = {
    "prowzi-overview.json": overview,
    "prowzi-stages.json": stages,
    "prowzi-health.json": health,
    "prowzi-quality.json": quality,
}


def render() -> dict[str, str]:
    """File name -> the exact JSON text the generator produces."""
    return {
        name: json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON files are stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = OUT_DIR / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(name)
        else:
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    extra = sorted(p.name for p in OUT_DIR.glob("*.json") if p.name not in DASHBOARDS)
    if stale or (args.check and extra):
        print(
            "stale dashboards: "
            + ", ".join(stale + [f"{e} (not generated)" for e in extra])
            + "; run: python grafana/generate.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

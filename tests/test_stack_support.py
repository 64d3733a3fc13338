"""Shared helpers for the compose-stack tests (``test_stack_*.py``), and a test agent.

- The metric contract Prowzi's dashboards and alert rules may use, and a small PromQL scanner
  that lists the metric names an expression reads.
- Loaders for the dashboards, alert rules and Grafana datasources in the repository.
- :func:`agent`, a factory named by ``PROWZI_AGENTS`` in the live test: it runs Prowzi's default
  agents and injects failures chosen by markers in the prompt (``[flaky]``: the search stage
  fails transiently on its first attempt; ``[doomed]``: verification fails permanently).

This module holds no tests; pytest collects it and finds none.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from pydantic import BaseModel

    from prowzi.agents.base import Agent, StageContext
    from prowzi.config import ProwziConfig

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE_FILE = REPO / "docker-compose.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"
RULES_FILE = DEPLOY / "rules" / "prowzi.rules.yml"
RULE_TESTS_FILE = DEPLOY / "tests" / "prowzi.rules.test.yml"
RUNBOOK = DEPLOY / "RUNBOOK.md"
DATASOURCES_FILE = DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yml"
DASHBOARD_PROVIDERS_FILE = DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARD_DIR = REPO / "grafana" / "dashboards"
DASHBOARD_SCHEMA = Path(__file__).resolve().parent / "stack_grafana_dashboard.schema.json"

# The metric contract (issue 5): family name -> type.
CONTRACT: dict[str, str] = {
    "prowzi_build_info": "gauge",
    "prowzi_runs_started_total": "counter",
    "prowzi_runs_completed_total": "counter",
    "prowzi_run_duration_seconds": "histogram",
    "prowzi_runs_in_progress": "gauge",
    "prowzi_stage_executions_total": "counter",
    "prowzi_stage_duration_seconds": "histogram",
    "prowzi_stage_retries_total": "counter",
    "prowzi_stage_last_completed_timestamp_seconds": "gauge",
    "prowzi_last_run_success_timestamp_seconds": "gauge",
    "prowzi_checkpoint_writes_total": "counter",
    "prowzi_checkpoint_write_duration_seconds": "histogram",
    "prowzi_checkpoint_size_bytes": "histogram",
    "prowzi_telemetry_sink_errors_total": "counter",
    "prowzi_evaluation_score": "histogram",
    "prowzi_turnitin_similarity_ratio": "histogram",
    "prowzi_service_queue_depth": "gauge",
    "prowzi_service_active_runs": "gauge",
    # prowzi worker (issue 19)
    "prowzi_worker_queue_depth": "gauge",
    "prowzi_worker_runs_in_flight": "gauge",
    "prowzi_worker_deliveries_total": "counter",
    "prowzi_worker_lease_takeovers_total": "counter",
    "prowzi_worker_leases_lost_total": "counter",
    # the LLM back end (issue 17)
    "prowzi_llm_tokens_total": "counter",
    "prowzi_llm_cost_usd_total": "counter",
    "prowzi_llm_calls_total": "counter",
    "prowzi_llm_call_duration_seconds": "histogram",
    # webhooks (issue 18)
    "prowzi_webhook_deliveries_total": "counter",
    "prowzi_webhook_delivery_duration_seconds": "histogram",
    "prowzi_webhook_outbox_depth": "gauge",
    "prowzi_webhook_outbox_oldest_pending_age_seconds": "gauge",
}
# Series Prometheus itself writes for every scrape target, and for alerts.
PROMETHEUS_SYNTHETIC = frozenset(
    {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS"}
)
REQUIRED_ALERTS = frozenset(
    {
        "ProwziRunFailureRatioHigh",
        "ProwziStageErrorRatioHigh",
        "ProwziStageLatencyAboveObjective",
        "ProwziRunStuck",
        "ProwziRetryStorm",
        "ProwziNoSuccessfulRunForADay",
        "ProwziTargetDown",
        "ProwziTelemetrySinkErrors",
        "ProwziCheckpointWriteFailures",
        "ProwziWorkerQueueBacklogGrowing",
        "ProwziWorkersDown",
        "ProwziLeaseTakeovers",
        "ProwziLlmRateLimited",
        "ProwziWebhookOutboxGrowing",
    }
)


def contract_series_names() -> set[str]:
    """Every series name the contract exposes (histograms as _bucket, _sum and _count)."""
    names: set[str] = set()
    for name, kind in CONTRACT.items():
        if kind == "histogram":
            names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        else:
            names.add(name)
    return names


def require_tool(name: str) -> str:
    """The path of a command-line tool; the test fails (never skips) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not installed; the stack tests need Debian's prometheus, "
            "prometheus-alertmanager and docker-compose packages (scripts/test installs them)"
        )
    return path


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# --- PromQL -----------------------------------------------------------------------------------

_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "inf",
        "nan",
        "atan2",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:$.])([A-Za-z_:][A-Za-z0-9_:]*)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a lexical scan, enough for our rules)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group(1)
        if re.match(r"\s*\(", text[match.end() :]):  # a function call
            continue
        if word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def grafana_to_promql(expr: str, *, rate: str = "1m", range_: str = "10m") -> str:
    """Expand the Grafana variables our dashboards use, as Grafana would with "All" selected."""
    return (
        expr.replace("$__rate_interval", rate)
        .replace("$__range", range_)
        .replace("$__interval", "15s")
        .replace("$instance", ".*")
        .replace("$stage", ".*")
    )


# --- repository content -----------------------------------------------------------------------


def rule_groups() -> list[dict[str, Any]]:
    return list(load_yaml(RULES_FILE)["groups"])


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def recording_rule_names() -> set[str]:
    return {r["record"] for group in rule_groups() for r in group["rules"] if "record" in r}


def dashboards() -> dict[str, dict[str, Any]]:
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(DASHBOARD_DIR.glob("*.json"))
    }


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every non-row panel, including those inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str
    instant: bool
    exemplar: bool

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref_id}"


def _datasource_type(panel: dict[str, Any], target: dict[str, Any]) -> str:
    source = target.get("datasource") or panel.get("datasource") or {}
    return str(source.get("type", ""))


def prometheus_queries() -> list[PanelQuery]:
    """Every Prometheus query of every dashboard panel."""
    queries = []
    for name, dashboard in dashboards().items():
        for panel in iter_panels(dashboard):
            for target in panel.get("targets", []):
                if _datasource_type(panel, target) != "prometheus":
                    continue
                queries.append(
                    PanelQuery(
                        dashboard=name,
                        panel=panel["title"],
                        ref_id=target["refId"],
                        expr=target["expr"],
                        instant=bool(target.get("instant")),
                        exemplar=bool(target.get("exemplar")),
                    )
                )
    return queries


def tempo_queries() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    found = []
    for name, dashboard in dashboards().items():
        for panel in iter_panels(dashboard):
            for target in panel.get("targets", []):
                if _datasource_type(panel, target) == "tempo":
                    found.append((name, panel, target))
    return found


def datasources() -> dict[str, dict[str, Any]]:
    """Provisioned datasources by uid."""
    return {ds["uid"]: ds for ds in load_yaml(DATASOURCES_FILE)["datasources"]}


def traces_to_metrics_queries() -> list[str]:
    """The PromQL the Tempo datasource runs from a span ("Metrics for this span")."""
    tempo = datasources()["tempo"]
    return [q["query"] for q in tempo["jsonData"]["tracesToMetrics"]["queries"]]


def expand_tags(query: str) -> str:
    """``$__tags`` as Grafana fills it for a span with ``prowzi.stage=search``."""
    return query.replace("$__tags", 'stage="search"')


# --- the test agent ---------------------------------------------------------------------------

FLAKY_MARKER = "[flaky]"
DOOMED_MARKER = "[doomed]"


def agent(config: ProwziConfig) -> Agent:
    """Prowzi's default agents, with failures injected by prompt markers."""
    from prowzi.agents import default_agents
    from prowzi.errors import PermanentError, TransientError

    defaults = default_agents(config)

    async def run(ctx: StageContext) -> BaseModel:
        prompt = ctx.params.prompt
        if FLAKY_MARKER in prompt and ctx.stage == "search" and ctx.attempt == 1:
            raise TransientError("injected transient failure (stack live test)")
        if DOOMED_MARKER in prompt and ctx.stage == "verification":
            raise PermanentError("injected permanent failure (stack live test)")
        return await defaults[ctx.stage](ctx)

    return run

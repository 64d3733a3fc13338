"""Grafana dashboards: generated JSON is current, validates against the dashboard schema, every
panel has a title, a unit and a description, dashboards are templated by instance and stage,
and every metric they read is in Prowzi's metric contract."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from types import ModuleType
from typing import Any

import jsonschema
import pytest
from test_stack_support import (
    CONTRACT,
    DASHBOARD_DIR,
    DASHBOARD_SCHEMA,
    PROMETHEUS_SYNTHETIC,
    REPO,
    contract_series_names,
    dashboards,
    datasources,
    iter_panels,
    metric_names,
    prometheus_queries,
    recording_rule_names,
    tempo_queries,
)

GENERATOR = REPO / "grafana" / "generate.py"
DASHBOARD_NAMES = [
    "prowzi-health.json",
    "prowzi-overview.json",
    "prowzi-quality.json",
    "prowzi-stages.json",
]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prowzi_grafana_generate", GENERATOR)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_the_committed_dashboards_are_what_the_generator_produces() -> None:
    rendered = _generator().render()
    assert sorted(rendered) == DASHBOARD_NAMES
    assert sorted(p.name for p in DASHBOARD_DIR.glob("*.json")) == DASHBOARD_NAMES
    for name, text in rendered.items():
        committed = (DASHBOARD_DIR / name).read_text(encoding="utf-8")
        assert committed == text, f"{name} is stale: run `python grafana/generate.py`"


def test_the_generator_check_mode_passes() -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_the_schema_is_a_valid_json_schema() -> None:
    schema = json.loads(DASHBOARD_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)


def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(DASHBOARD_SCHEMA.read_text("utf-8")))


@pytest.mark.parametrize("name", DASHBOARD_NAMES)
def test_dashboard_validates_against_the_grafana_schema(name: str) -> None:
    errors = sorted(_validator().iter_errors(dashboards()[name]), key=lambda e: e.json_path)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors[:10])


def test_the_schema_rejects_what_grafana_would_not_load() -> None:
    good = dashboards()["prowzi-overview.json"]
    validator = _validator()
    assert validator.is_valid(good)
    for mutate in (
        lambda d: d.pop("schemaVersion"),
        lambda d: d["panels"][1].pop("gridPos"),
        lambda d: d["panels"][1]["gridPos"].update(w=25),
        lambda d: d["panels"][1].update(titel="typo"),
        lambda d: d["templating"]["list"][0].update(type="nonsense"),
        lambda d: d["panels"][1]["targets"][0].pop("refId"),
    ):
        bad = json.loads(json.dumps(good))
        mutate(bad)
        assert not validator.is_valid(bad)


def _panels() -> list[tuple[str, dict[str, Any]]]:
    return [(name, p) for name, d in dashboards().items() for p in iter_panels(d)]


@pytest.mark.parametrize(
    "panel", [p for _, p in _panels()], ids=[f"{n}:{p['title']}" for n, p in _panels()]
)
def test_every_panel_has_title_unit_description_and_queries(panel: dict[str, Any]) -> None:
    assert panel["title"].strip()
    assert panel["description"].strip()
    assert panel["fieldConfig"]["defaults"]["unit"].strip()
    assert panel["targets"], "a panel without queries"


def test_panel_ids_are_unique_and_panels_do_not_overlap() -> None:
    for name, dashboard in dashboards().items():
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), name
        cells: set[tuple[int, int]] = set()
        for panel in dashboard["panels"]:
            g = panel["gridPos"]
            assert g["x"] + g["w"] <= 24, (name, panel["title"])
            mine = {
                (x, y)
                for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])
            }
            assert not cells & mine, f"{name}: '{panel['title']}' overlaps another panel"
            cells |= mine


@pytest.mark.parametrize("name", DASHBOARD_NAMES)
def test_dashboard_is_templated_by_instance_and_stage(name: str) -> None:
    variables = {v["name"]: v for v in dashboards()[name]["templating"]["list"]}
    assert {"instance", "stage"} <= set(variables)
    for var in ("instance", "stage"):
        assert variables[var]["type"] == "query"
        assert variables[var]["datasource"]["uid"] == "prometheus"
        assert variables[var]["includeAll"] and variables[var]["multi"]
        assert variables[var]["definition"].startswith("label_values(")


def test_every_prowzi_selector_is_filtered_by_instance() -> None:
    for query in prometheus_queries():
        for match in re.finditer(r"(prowzi_\w+)\{([^}]*)\}", query.expr):
            assert 'instance=~"$instance"' in match.group(2), f"{query}: {match.group(0)}"


STAGE_LABELLED = re.compile(
    r"(prowzi_stage_(?:executions_total|retries_total|duration_seconds_\w+)"
    r"|prowzi:stage_duration_seconds:\w+)\{([^}]*)\}"
)


def test_stage_labelled_series_follow_the_stage_variable() -> None:
    for query in prometheus_queries():
        for match in STAGE_LABELLED.finditer(query.expr):
            assert 'stage=~"$stage"' in match.group(2), f"{query}: {match.group(0)}"


def test_the_stages_dashboard_is_filtered_by_stage() -> None:
    """Every panel of the Stages dashboard follows the stage selector, except the one gauge
    that has no stage label."""
    for panel in iter_panels(dashboards()["prowzi-stages.json"]):
        if panel["title"] == "Last stage completion":
            continue
        assert all('stage=~"$stage"' in t["expr"] for t in panel["targets"]), panel["title"]


def test_dashboards_use_only_contract_metrics() -> None:
    allowed = contract_series_names() | PROMETHEUS_SYNTHETIC | recording_rule_names()
    used: set[str] = set()
    for query in prometheus_queries():
        names = metric_names(query.expr.replace("$", ""))
        assert names, f"{query} reads no metric"
        assert names <= allowed, f"{query}: unknown {sorted(names - allowed)}"
        used |= names
    # Every contract family is on some dashboard.
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert set(CONTRACT) - families == set(), sorted(set(CONTRACT) - families)


def test_every_datasource_a_dashboard_names_is_provisioned() -> None:
    provisioned = datasources()
    for name, dashboard in dashboards().items():
        refs = [v["datasource"] for v in dashboard["templating"]["list"] if "datasource" in v]
        for panel in iter_panels(dashboard):
            refs.append(panel["datasource"])
            refs.extend(t["datasource"] for t in panel["targets"] if "datasource" in t)
        for ref in refs:
            assert ref["uid"] in provisioned, f"{name}: unknown datasource {ref}"
            assert provisioned[ref["uid"]]["type"] == ref["type"], f"{name}: {ref}"


def _titles(name: str) -> set[str]:
    return {p["title"] for p in iter_panels(dashboards()[name])}


def test_the_panels_the_issue_asks_for_exist() -> None:
    assert {
        "Runs per minute",
        "Success ratio",
        "Runs in progress",
        "Run duration p50 and p95",
        "Last successful run",
        "Slowest runs (traces)",
    } <= _titles("prowzi-overview.json")
    assert {
        "Stage executions by outcome",
        "Stage error ratio",
        "Stage duration heatmap",
        "Retries by stage and error type",
        "Per-stage summary",
    } <= _titles("prowzi-stages.json")
    assert {
        "Checkpoint write latency",
        "Checkpoint size",
        "Checkpoint bytes written",
        "Sink errors by sink",
        "Prowzi target up",
        "Scrape duration",
    } <= _titles("prowzi-health.json")
    assert {
        "Evaluation score p50 by phase",
        "Turnitin similarity p50 and p95",
    } <= _titles("prowzi-quality.json")


def test_the_stage_heatmap_shows_exemplars() -> None:
    panel = next(
        p for p in iter_panels(dashboards()["prowzi-stages.json"]) if p["type"] == "heatmap"
    )
    (target,) = panel["targets"]
    assert target["exemplar"] is True
    assert target["format"] == "heatmap"
    assert "prowzi_stage_duration_seconds_bucket" in target["expr"]


def test_the_traces_panel_queries_tempo_with_traceql() -> None:
    found = tempo_queries()
    assert found, "no Tempo panel"
    for name, panel, target in found:
        assert target["queryType"] == "traceql"
        query = target["query"]
        # Balanced braces and quotes, and the run's root span name from prowzi's tracer.
        assert query.count("{") == query.count("}")
        assert query.count('"') % 2 == 0
        assert 'name = "invoke_workflow prowzi.research"' in query
        assert 'resource.service.name = "prowzi"' in query
        assert "duration > $min_run_duration" in query
        variables = {v["name"] for v in dashboards()[name]["templating"]["list"]}
        assert {"stage", "min_run_duration"} <= variables
        assert panel["fieldConfig"]["defaults"]["unit"] == "ms"
        sort = [t for t in panel["transformations"] if t["id"] == "sortBy"]
        assert sort and sort[0]["options"]["sort"][0] == {"field": "Duration", "desc": True}


def test_the_traceql_names_match_prowzis_tracer() -> None:
    """The span name and attributes the traces panel filters on are the ones Prowzi emits."""
    from prowzi.observability import otel

    source = (REPO / "prowzi" / "observability" / "otel.py").read_text(encoding="utf-8")
    assert otel.WORKFLOW_NAME == "prowzi.research"
    assert 'f"invoke_workflow {WORKFLOW_NAME}"' in source
    for attribute in ("prowzi.stage", "prowzi.session_id", "prowzi.status"):
        assert f'"{attribute}"' in source

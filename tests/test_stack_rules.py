"""Prometheus configuration and alert rules: promtool checks, rule unit tests, alert hygiene,
and the metric contract (every metric name a rule reads is one Prowzi exposes)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_stack_support import (
    DEPLOY,
    PROMETHEUS_CONFIG,
    PROMETHEUS_SYNTHETIC,
    REQUIRED_ALERTS,
    RULE_TESTS_FILE,
    RULES_FILE,
    RUNBOOK,
    alert_rules,
    contract_series_names,
    expand_tags,
    load_yaml,
    metric_names,
    recording_rule_names,
    require_tool,
    traces_to_metrics_queries,
)


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_promtool_check_config_resolves_the_rule_files_from_the_repository() -> None:
    promtool = require_tool("promtool")
    result = run(promtool, "check", "config", PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    # The rule glob must match the rule file: "0 rule files found" would pass silently.
    assert "1 rule files found" in result.stdout, result.stdout


def test_promtool_check_config_from_another_directory(tmp_path: Path) -> None:
    """Relative paths resolve against the config file, not the working directory."""
    promtool = require_tool("promtool")
    result = run(promtool, "check", "config", PROMETHEUS_CONFIG, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    result = run(promtool, "check", "rules", RULES_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    promtool = require_tool("promtool")
    result = run(promtool, "test", "rules", RULE_TESTS_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_broken_rule_makes_the_unit_tests_fail(tmp_path: Path) -> None:
    """The unit tests really exercise the rules: raising a threshold breaks a firing case."""
    promtool = require_tool("promtool")
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    broken = RULES_FILE.read_text(encoding="utf-8").replace("> 0.25", "> 0.75", 1)
    assert broken != RULES_FILE.read_text(encoding="utf-8")
    (tmp_path / "rules" / RULES_FILE.name).write_text(broken, encoding="utf-8")
    shutil.copy(RULE_TESTS_FILE, tmp_path / "tests" / RULE_TESTS_FILE.name)
    result = run(promtool, "test", "rules", tmp_path / "tests" / RULE_TESTS_FILE.name)
    assert result.returncode != 0
    assert "ProwziRunFailureRatioHigh" in result.stdout + result.stderr


def test_every_required_alert_exists_once() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert sorted(set(names)) == sorted(names), "duplicate alert names"
    assert set(names) == REQUIRED_ALERTS


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_has_severity_summary_description_and_runbook(rule: dict) -> None:
    assert rule["labels"]["severity"] in {"critical", "warning"}
    annotations = rule["annotations"]
    for key in ("summary", "description", "runbook_url"):
        assert annotations.get(key, "").strip(), f"{rule['alert']} lacks {key}"
    url = annotations["runbook_url"]
    assert url == f"deploy/RUNBOOK.md#{rule['alert'].lower()}"


def _runbook_anchors() -> set[str]:
    anchors = set()
    for line in RUNBOOK.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if match:
            # GitHub's anchor: lower case, punctuation dropped, spaces to hyphens.
            text = re.sub(r"[^\w\- ]", "", match.group(1).lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_every_alert_has_its_runbook_section() -> None:
    anchors = _runbook_anchors()
    for rule in alert_rules():
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in anchors, f"RUNBOOK.md has no section '{rule['alert']}'"
    # ... and the runbook documents no alert that does not exist.
    documented = {a for a in anchors if a.startswith("prowzi") and a != "prowzi-runbook"}
    assert documented == {r["alert"].lower() for r in alert_rules()}


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for group in load_yaml(RULE_TESTS_FILE)["tests"]:
        for case in group.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    assert fires >= REQUIRED_ALERTS, f"no firing case for {sorted(REQUIRED_ALERTS - fires)}"
    assert silent >= REQUIRED_ALERTS, f"no silent case for {sorted(REQUIRED_ALERTS - silent)}"


def test_rule_tests_load_the_repository_rule_file() -> None:
    files = load_yaml(RULE_TESTS_FILE)["rule_files"]
    assert [(RULE_TESTS_FILE.parent / f).resolve() for f in files] == [RULES_FILE.resolve()]


def test_metric_name_scanner() -> None:
    assert metric_names(
        'sum by (job, le) (rate(a_bucket{x="y", stage=~"$stage"}[5m])) / on (job) group_left '
        'b:rec offset 5m > bool 2 and absent(up{job="p"}) or vector(0) '
        "unless min_over_time(timestamp(c)[1d:10m])"
    ) == {"a_bucket", "b:rec", "up", "c"}


def _allowed_names() -> set[str]:
    return contract_series_names() | PROMETHEUS_SYNTHETIC | recording_rule_names()


@pytest.mark.parametrize(
    "rule",
    [r for g in load_yaml(RULES_FILE)["groups"] for r in g["rules"]],
    ids=lambda r: r.get("alert") or r.get("record"),
)
def test_rules_use_only_contract_metrics(rule: dict) -> None:
    names = metric_names(rule["expr"])
    if "alert" in rule:
        assert names, "an alert that reads no metric"
    assert names <= _allowed_names(), f"unknown metrics {sorted(names - _allowed_names())}"


def test_recording_rules_only_define_prowzi_level_names() -> None:
    for name in recording_rule_names():
        assert re.fullmatch(r"prowzi:[a-z_]+:[a-z0-9_]+", name), name


def test_traces_to_metrics_queries_use_contract_metrics() -> None:
    for query in traces_to_metrics_queries():
        names = metric_names(expand_tags(query))
        assert names and names <= contract_series_names(), query


def test_rule_files_mounted_in_compose_are_the_repository_rules() -> None:
    compose = load_yaml(DEPLOY.parent / "docker-compose.yml")
    volumes = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/rules:/etc/prometheus/rules:ro" in volumes
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == ["rules/*.rules.yml"]

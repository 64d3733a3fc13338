"""The compose stack's files: docker-compose accepts the compose file; every service is pinned
and health-checked; no secret is in the file; every mounted config file exists in the
repository and parses (Prometheus with promtool, Alertmanager with amtool, the collector, Tempo
and Grafana's provisioning with schemas and cross-file consistency checks)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from test_stack_support import (
    COMPOSE_FILE,
    DASHBOARD_DIR,
    DASHBOARD_PROVIDERS_FILE,
    DATASOURCES_FILE,
    DEPLOY,
    PROMETHEUS_CONFIG,
    REPO,
    load_yaml,
    require_tool,
)

SERVICES = {
    "prowzi",
    "worker",
    "redis",
    "otel-collector",
    "tempo",
    "prometheus",
    "alertmanager",
    "grafana",
}


def compose_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GRAFANA_ADMIN_PASSWORD"}
    env.update(extra)
    return env


def docker_compose(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    binary = require_tool("docker-compose")
    return subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "--project-directory", str(REPO), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=compose_env(**env),
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The compose file as docker-compose resolves it (variables filled in)."""
    import yaml

    result = docker_compose("config", GRAFANA_ADMIN_PASSWORD="not-a-real-password")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


# --- docker-compose ----------------------------------------------------------------------------


def test_docker_compose_config_accepts_the_file() -> None:
    result = docker_compose("config", "-q", GRAFANA_ADMIN_PASSWORD="not-a-real-password")
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_a_grafana_admin_password() -> None:
    """No default secret: the password must come from the environment."""
    result = docker_compose("config", "-q")
    assert result.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in result.stderr


def test_the_stack_has_its_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == SERVICES


def test_every_image_is_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: {image} is not pinned"
        assert re.search(r"\d", tag), f"{name}: {image} has no version in its tag"
    for dockerfile in (DEPLOY / "Dockerfile", DEPLOY / "otel-collector.Dockerfile"):
        for line in dockerfile.read_text(encoding="utf-8").splitlines():
            if line.startswith("FROM "):
                base = line.split()[1]
                assert re.search(r":[^:]*\d", base) and ":latest" not in base, line


def test_every_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no health check"
        assert check["test"][0] in {"CMD", "CMD-SHELL"}
        assert not check.get("disable")
        for key in ("interval", "timeout", "retries"):
            assert key in check, f"{name}: healthcheck lacks {key}"


def test_health_checks_probe_the_ports_the_configs_listen_on(compose: dict[str, Any]) -> None:
    def probe(name: str) -> str:
        return " ".join(compose["services"][name]["healthcheck"]["test"])

    collector = load_yaml(DEPLOY / "otel-collector.yml")
    port = collector["extensions"]["health_check"]["endpoint"].rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}/" in probe("otel-collector")
    tempo = load_yaml(DEPLOY / "tempo.yml")
    assert f"127.0.0.1:{tempo['server']['http_listen_port']}/ready" in probe("tempo")
    assert "127.0.0.1:9090/-/ready" in probe("prometheus")
    assert "127.0.0.1:9093/-/ready" in probe("alertmanager")
    assert "127.0.0.1:3000/api/health" in probe("grafana")
    assert "127.0.0.1:8000/healthz" in probe("prowzi")
    assert "127.0.0.1:9100/metrics" in probe("worker")
    assert "ping" in probe("redis")


def test_no_secret_is_written_in_the_compose_file(resolved: dict[str, Any]) -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    suspicious = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY|CHECKPOINT_KEY)", re.I)
    raw = load_yaml(COMPOSE_FILE)
    for name, service in raw["services"].items():
        env = service.get("environment", {})
        assert isinstance(env, dict), f"{name}: use a mapping for environment"
        for key, value in env.items():
            if suspicious.search(key) and not key.endswith("_USER"):
                # Only a reference to the caller's environment, with no default.
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", str(value)), f"{name}: {key}"
    assert "not-a-real-password" not in text
    assert resolved["services"]["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_prowzi_keeps_checkpoints_and_telemetry_on_named_volumes(compose: dict[str, Any]) -> None:
    prowzi = compose["services"]["prowzi"]
    env = prowzi["environment"]
    mounts = dict(v.split(":")[:2][::-1] for v in prowzi["volumes"])  # target -> source
    for var, volume in (
        ("PROWZI_CHECKPOINT_DIR", "prowzi-checkpoints"),
        ("PROWZI_TELEMETRY_DIR", "prowzi-telemetry"),
    ):
        assert mounts[env[var]] == volume, var
        assert volume in compose["volumes"]
    assert str(env["PROWZI_ENABLE_CHECKPOINTING"]).lower() == "true"
    assert prowzi["command"][:3] == ["serve", "--host=0.0.0.0", "--port=8000"]
    # The service's run journal survives a restart too, so interrupted runs are resumed.
    assert "--state-dir=/var/lib/prowzi/service" in prowzi["command"]
    assert mounts["/var/lib/prowzi/service"] == "prowzi-service"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"


def test_worker_replicas_share_the_store_and_broker_with_the_service(
    compose: dict[str, Any],
) -> None:
    prowzi, worker = compose["services"]["prowzi"], compose["services"]["worker"]
    assert worker["image"] == prowzi["image"]
    assert worker["command"][0] == "worker"
    assert "--metrics-host=0.0.0.0" in worker["command"]
    assert "--metrics-port=9100" in worker["command"]
    assert worker["deploy"]["replicas"] >= 2
    assert worker["environment"]["PROWZI_BROKER_URL"] == "redis://redis:6379/0"
    assert worker["environment"] == prowzi["environment"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in worker["volumes"]}
    service_mounts = {v.split(":")[1]: v.split(":")[0] for v in prowzi["volumes"]}
    env = worker["environment"]
    for var in ("PROWZI_CHECKPOINT_DIR", "PROWZI_TELEMETRY_DIR", "PROWZI_OUTPUT_DIR"):
        assert mounts[env[var]] == service_mounts[env[var]], var
    # A worker stopped by compose checkpoints and requeues its runs inside the grace period.
    assert worker["stop_grace_period"] == "60s"
    redis = compose["services"]["redis"]
    assert "--appendonly" in redis["command"] and "/data" in redis["volumes"][0]


def test_prometheus_finds_every_worker_replica_by_dns() -> None:
    config = load_yaml(DEPLOY / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "prowzi-worker"]
    (sd,) = job["dns_sd_configs"]
    assert sd == {"names": ["worker"], "type": "A", "port": 9100, "refresh_interval": "30s"}


def test_the_prowzi_dockerfile_runs_prowzi_serve_on_port_8000() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert 'ENTRYPOINT ["prowzi"]' in text
    assert 'CMD ["serve", "--host", "0.0.0.0", "--port", "8000", ' in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert re.search(r"^USER (?!root)", text, re.M), "the service must not run as root"


def test_prometheus_runs_with_exemplar_storage_rules_and_alertmanager(
    compose: dict[str, Any],
) -> None:
    command = compose["services"]["prometheus"]["command"]
    assert "--enable-feature=exemplar-storage" in command
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"]
    targets = [
        t
        for am in config["alerting"]["alertmanagers"]
        for sc in am["static_configs"]
        for t in sc["targets"]
    ]
    assert targets == ["alertmanager:9093"]


def _scrape_targets() -> dict[str, list[str]]:
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs: dict[str, list[str]] = {}
    for job in config["scrape_configs"]:
        targets = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        for sd in job.get("file_sd_configs", []):
            for file in sd["files"]:
                for group in load_yaml(PROMETHEUS_CONFIG.parent / file):
                    targets.extend(group["targets"])
        jobs[job["job_name"]] = targets
    return jobs


def test_prometheus_scrapes_prowzi_and_the_collector() -> None:
    jobs = _scrape_targets()
    assert jobs["prowzi"] == ["prowzi:8000"]
    collector = load_yaml(DEPLOY / "otel-collector.yml")
    port = collector["service"]["telemetry"]["metrics"]["address"].rsplit(":", 1)[1]
    assert jobs["otel-collector"] == [f"otel-collector:{port}"]


# --- every mounted file exists and parses ------------------------------------------------------


def _bind_mounts(compose: dict[str, Any]) -> list[tuple[str, Path, str]]:
    mounts = []
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                mounts.append((name, (REPO / source).resolve(), target))
    return mounts


def test_every_bind_mount_exists_in_the_repository(compose: dict[str, Any]) -> None:
    mounts = _bind_mounts(compose)
    assert len(mounts) >= 8
    for service, source, _ in mounts:
        assert source.exists(), f"{service} mounts {source}, which is not in the repository"
        assert REPO in source.parents


def _mounted_files(compose: dict[str, Any]) -> list[Path]:
    files = []
    for _, source, _ in _bind_mounts(compose):
        files.extend(
            sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        )
    return files


def test_every_mounted_file_has_a_checker(compose: dict[str, Any]) -> None:
    """Each file the stack mounts is covered by one of the checks below."""
    checked = {
        PROMETHEUS_CONFIG,
        DEPLOY / "rules" / "prowzi.rules.yml",
        DEPLOY / "targets" / "prowzi.yml",
        DEPLOY / "alertmanager.yml",
        DEPLOY / "otel-collector.yml",
        DEPLOY / "tempo.yml",
        DATASOURCES_FILE,
        DASHBOARD_PROVIDERS_FILE,
        *DASHBOARD_DIR.glob("*.json"),  # test_stack_dashboards.py
    }
    for path in _mounted_files(compose):
        assert path in checked, f"{path} is mounted but nothing checks it"


def test_promtool_checks_the_mounted_prometheus_config() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_amtool_checks_the_alertmanager_config() -> None:
    amtool = require_tool("amtool")
    result = subprocess.run(
        [amtool, "check-config", str(DEPLOY / "alertmanager.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_routes_every_severity_and_holds_no_credentials() -> None:
    config = load_yaml(DEPLOY / "alertmanager.yml")
    receivers = {r["name"] for r in config["receivers"]}
    assert config["route"]["receiver"] in receivers
    for route in config["route"]["routes"]:
        assert route["receiver"] in receivers
    severities = {m for r in config["route"]["routes"] for m in r["matchers"]}
    assert {'severity="critical"', 'severity="warning"'} <= severities
    text = (DEPLOY / "alertmanager.yml").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        assert not re.search(r"(password|api_key|api_url|token|secret)\s*:", line, re.I), line


NAME = {"type": "string", "pattern": r"^[a-z_]+(/[\w.-]+)?$"}
COLLECTOR_SCHEMA = {
    "type": "object",
    "required": ["receivers", "exporters", "service"],
    "additionalProperties": False,
    "properties": {
        "extensions": {"type": "object", "propertyNames": NAME},
        "receivers": {"type": "object", "minProperties": 1, "propertyNames": NAME},
        "processors": {"type": "object", "propertyNames": NAME},
        "exporters": {"type": "object", "minProperties": 1, "propertyNames": NAME},
        "connectors": {"type": "object", "propertyNames": NAME},
        "service": {
            "type": "object",
            "required": ["pipelines"],
            "additionalProperties": False,
            "properties": {
                "extensions": {"type": "array", "items": NAME},
                "pipelines": {
                    "type": "object",
                    "minProperties": 1,
                    "propertyNames": {"pattern": r"^(traces|metrics|logs)(/[\w.-]+)?$"},
                    "additionalProperties": {
                        "type": "object",
                        "required": ["receivers", "exporters"],
                        "additionalProperties": False,
                        "properties": {
                            "receivers": {"type": "array", "minItems": 1, "items": NAME},
                            "processors": {"type": "array", "items": NAME},
                            "exporters": {"type": "array", "minItems": 1, "items": NAME},
                        },
                    },
                },
                "telemetry": {"type": "object"},
            },
        },
    },
}


def test_the_collector_config_is_well_formed_and_wired() -> None:
    config = load_yaml(DEPLOY / "otel-collector.yml")
    jsonschema.validate(config, COLLECTOR_SCHEMA)
    service = config["service"]
    for ext in service.get("extensions", []):
        assert ext in config["extensions"], ext
    for pipeline in service["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"{component} is not defined under {kind}"
    # OTLP in on the ports Prowzi and the compose file use; traces out to Tempo's OTLP port.
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    exporter_names = service["pipelines"]["traces"]["exporters"]
    assert exporter_names == ["otlp/tempo"]
    tempo = load_yaml(DEPLOY / "tempo.yml")
    tempo_grpc = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert config["exporters"]["otlp/tempo"]["endpoint"] == "tempo:" + tempo_grpc.rsplit(":")[1]
    assert config["exporters"]["otlp/tempo"]["tls"]["insecure"] is True
    if "memory_limiter" in service["pipelines"]["traces"].get("processors", []):
        assert service["pipelines"]["traces"]["processors"][0] == "memory_limiter"


TEMPO_SCHEMA = {
    "type": "object",
    "required": ["server", "distributor", "storage"],
    "additionalProperties": False,
    "properties": {
        "stream_over_http_enabled": {"type": "boolean"},
        "target": {"type": "string"},
        "server": {
            "type": "object",
            "required": ["http_listen_port"],
            "properties": {
                "http_listen_port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "grpc_listen_port": {"type": "integer"},
                "log_level": {"enum": ["debug", "info", "warn", "error"]},
            },
            "additionalProperties": False,
        },
        "distributor": {
            "type": "object",
            "required": ["receivers"],
            "properties": {"receivers": {"type": "object", "minProperties": 1}},
        },
        "ingester": {"type": "object"},
        "compactor": {"type": "object"},
        "querier": {"type": "object"},
        "query_frontend": {"type": "object"},
        "metrics_generator": {"type": "object"},
        "overrides": {"type": "object"},
        "usage_report": {"type": "object"},
        "storage": {
            "type": "object",
            "required": ["trace"],
            "properties": {
                "trace": {
                    "type": "object",
                    "required": ["backend", "wal"],
                    "properties": {
                        "backend": {"enum": ["local", "s3", "gcs", "azure"]},
                        "wal": {
                            "type": "object",
                            "required": ["path"],
                            "properties": {"path": {"type": "string"}},
                        },
                        "local": {
                            "type": "object",
                            "required": ["path"],
                            "properties": {"path": {"type": "string"}},
                        },
                    },
                }
            },
        },
    },
}


def test_the_tempo_config_is_well_formed_and_stores_on_its_volume(compose: dict[str, Any]) -> None:
    config = load_yaml(DEPLOY / "tempo.yml")
    jsonschema.validate(config, TEMPO_SCHEMA)
    trace = config["storage"]["trace"]
    volume_targets = {
        v.split(":")[1] for v in compose["services"]["tempo"]["volumes"] if not v.startswith(".")
    }
    assert volume_targets == {"/var/tempo"}
    for path in (trace["wal"]["path"], trace["local"]["path"]):
        assert path.startswith("/var/tempo/"), path
    assert "-config.file=/etc/tempo/tempo.yml" in compose["services"]["tempo"]["command"]


DATASOURCES_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "datasources"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": 1},
        "deleteDatasources": {"type": "array"},
        "datasources": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "type", "uid", "access", "url"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "type": {"enum": ["prometheus", "tempo", "loki", "alertmanager"]},
                    "uid": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,40}$"},
                    "access": {"enum": ["proxy", "direct"]},
                    "url": {"type": "string", "pattern": r"^https?://"},
                    "isDefault": {"type": "boolean"},
                    "editable": {"type": "boolean"},
                    "orgId": {"type": "integer"},
                    "version": {"type": "integer"},
                    "jsonData": {"type": "object"},
                },
            },
        },
    },
}


def test_grafana_datasources_link_exemplars_to_tempo_and_traces_to_prometheus(
    compose: dict[str, Any],
) -> None:
    config = load_yaml(DATASOURCES_FILE)
    jsonschema.validate(config, DATASOURCES_SCHEMA)
    by_uid = {ds["uid"]: ds for ds in config["datasources"]}
    prometheus = next(ds for ds in by_uid.values() if ds["type"] == "prometheus")
    tempo = next(ds for ds in by_uid.values() if ds["type"] == "tempo")
    assert sum(bool(ds.get("isDefault")) for ds in by_uid.values()) == 1
    # URLs name compose services and the ports they listen on.
    assert prometheus["url"] == "http://prometheus:9090"
    port = load_yaml(DEPLOY / "tempo.yml")["server"]["http_listen_port"]
    assert tempo["url"] == f"http://tempo:{port}"
    for ds in (prometheus, tempo):
        host = re.match(r"https?://([^:/]+)", ds["url"]).group(1)  # type: ignore[union-attr]
        assert host in compose["services"], ds["url"]
    (destination,) = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert destination["name"] == "trace_id"  # the exemplar label Prowzi writes
    assert destination["datasourceUid"] == tempo["uid"]
    to_metrics = tempo["jsonData"]["tracesToMetrics"]
    assert to_metrics["datasourceUid"] == prometheus["uid"]
    assert to_metrics["queries"] and all("$__tags" in q["query"] for q in to_metrics["queries"])
    assert {"key": "prowzi.stage", "value": "stage"} in to_metrics["tags"]


PROVIDERS_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "providers"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": 1},
        "providers": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "type", "options"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "orgId": {"type": "integer"},
                    "folder": {"type": "string"},
                    "folderUid": {"type": "string"},
                    "type": {"const": "file"},
                    "disableDeletion": {"type": "boolean"},
                    "allowUiUpdates": {"type": "boolean"},
                    "updateIntervalSeconds": {"type": "integer", "minimum": 1},
                    "options": {
                        "type": "object",
                        "required": ["path"],
                        "additionalProperties": False,
                        "properties": {
                            "path": {"type": "string"},
                            "foldersFromFilesStructure": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def test_grafana_dashboard_provider_reads_the_mounted_dashboards(compose: dict[str, Any]) -> None:
    config = load_yaml(DASHBOARD_PROVIDERS_FILE)
    jsonschema.validate(config, PROVIDERS_SCHEMA)
    mounts = {
        source: target for service, source, target in _bind_mounts(compose) if service == "grafana"
    }
    (provider,) = config["providers"]
    assert mounts[DASHBOARD_DIR.resolve()] == provider["options"]["path"]
    assert mounts[DATASOURCES_FILE.parent.resolve()] == "/etc/grafana/provisioning/datasources"
    assert (
        mounts[DASHBOARD_PROVIDERS_FILE.parent.resolve()] == "/etc/grafana/provisioning/dashboards"
    )
    home = compose["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (DASHBOARD_DIR / home.rsplit("/", 1)[1]).exists()


def test_the_targets_file_is_valid_file_service_discovery() -> None:
    groups = load_yaml(DEPLOY / "targets" / "prowzi.yml")
    jsonschema.validate(
        groups,
        {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["targets"],
                "additionalProperties": False,
                "properties": {
                    "targets": {
                        "type": "array",
                        "items": {"type": "string", "pattern": r"^[\w.-]+:\d+$"},
                    },
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
        },
    )


@pytest.mark.parametrize(
    ("severity", "receiver"), [("critical", "prowzi-critical"), ("warning", "prowzi-default")]
)
def test_amtool_routes_each_severity_to_its_receiver(severity: str, receiver: str) -> None:
    amtool = require_tool("amtool")
    result = subprocess.run(
        [
            amtool,
            "config",
            "routes",
            "test",
            f"--config.file={DEPLOY / 'alertmanager.yml'}",
            f"--verify.receivers={receiver}",
            f"severity={severity}",
            "alertname=ProwziRunStuck",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_build_context_sends_what_the_dockerfile_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    for line in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert source.rstrip("/") in included, source
                assert (REPO / source).exists(), source

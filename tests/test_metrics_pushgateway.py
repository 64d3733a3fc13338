"""Debian's prometheus-pushgateway receives batch runs' metrics (``prowzi run --pushgateway``),
and a failed run does not overwrite the last success of an earlier one."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from emulator_servers import free_port
from test_service_support import subprocess_env

PUSHGATEWAY = shutil.which("prometheus-pushgateway")
pytestmark = pytest.mark.skipif(PUSHGATEWAY is None, reason="prometheus-pushgateway missing")


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    assert PUSHGATEWAY is not None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "pushgateway.log").open("wb")
    process = subprocess.Popen(
        [PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("pushgateway did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def prowzi_run(tmp_path: Path, pushgateway: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "prowzi.cli.main",
            "run",
            "quantum computing",
            "--pushgateway",
            pushgateway,
        ],
        cwd=tmp_path,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def groups(pushgateway: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(pushgateway + "/api/v1/metrics", timeout=5) as response:
        data: list[dict[str, Any]] = json.load(response)["data"]
    return data


def sample(group: dict[str, Any], family: str, **labels: str) -> float:
    for metric in group[family]["metrics"]:
        if all(metric["labels"].get(k) == v for k, v in labels.items()):
            return float(metric["value"])
    raise AssertionError(f"{family}{labels} not in the group")


def test_batch_runs_push_to_one_bounded_group_keeping_the_last_success(
    tmp_path: Path, pushgateway: str
) -> None:
    ok = prowzi_run(tmp_path, pushgateway, PROWZI_TEST_FLAKY_STAGE="search")
    assert ok.returncode == 0, ok.stderr
    (group,) = groups(pushgateway)
    assert group["labels"]["job"] == "prowzi_batch"
    assert group["labels"]["instance"] == socket.gethostname()
    assert sample(group, "prowzi_runs_completed_total", outcome="success") == 1
    assert sample(group, "prowzi_stage_retries_total", stage="search", error_type="transient") == 1
    assert (
        sample(group, "prowzi_stage_executions_total", stage="turnitin", outcome="completed") == 1
    )
    success_at = sample(group, "prowzi_last_run_success_timestamp_seconds")
    assert time.time() - 120 < success_at <= time.time()
    assert "prowzi_service_queue_depth" not in group

    failed = prowzi_run(tmp_path, pushgateway, PROWZI_TEST_FAIL_STAGE="writing")
    assert failed.returncode != 0
    (group,) = groups(pushgateway)  # the same group: no per-run series in the gateway
    assert sample(group, "prowzi_runs_completed_total", outcome="failure") == 1
    assert sample(group, "prowzi_runs_completed_total", outcome="success") == 0
    assert sample(group, "prowzi_stage_executions_total", stage="writing", outcome="failed") == 1
    # The failed run never succeeded, so it left the earlier success in place.
    assert sample(group, "prowzi_last_run_success_timestamp_seconds") == success_at

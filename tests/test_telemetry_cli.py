"""``prowzi sessions``, ``show``, ``monitor`` and ``replay``, including bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from telemetry_events import DOC_SESSION, STAGES, RunScript, doc_example_run
from typer.testing import CliRunner

from prowzi.cli.main import app
from prowzi.workflows.telemetry import TelemetryCollector

TELEMETRY = Path("prowzi_telemetry")  # the default telemetry_dir, under each test's cwd


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()


def record(run: RunScript, directory: Path = TELEMETRY) -> None:
    collector = TelemetryCollector(directory, background=False, fsync=False)
    for event in run.events:
        collector.handle(event)
    collector.close()


def three_sessions() -> None:
    record(doc_example_run())
    failed = RunScript("older-failed", t0=1_600_000_000.0).start(prompt="an old topic")
    failed.stage("intent", 1.0).fail_stage("planning", 2.0, "planner down")
    record(failed.failed("planning", "planner down"))
    record(RunScript("newest-running", t0=1_800_000_000.0).start().stage("intent", 1.0))


def one_line_error(result: object, code: int, fragment: str) -> None:
    stderr: str = result.stderr  # type: ignore[attr-defined]
    assert result.exit_code == code, (result.exit_code, stderr)  # type: ignore[attr-defined]
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert fragment in stderr
    assert "Traceback" not in result.output  # type: ignore[attr-defined]


# --- sessions ------------------------------------------------------------------------------


def test_sessions_lists_newest_first(cli: CliRunner) -> None:
    three_sessions()
    result = cli.invoke(app, ["sessions"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.index("newest-running") < out.index(DOC_SESSION) < out.index("older-failed")
    assert "running" in out and "completed" in out and "failed" in out
    assert "7/7" in out and "1/7" in out


def test_sessions_json_limit_and_status(cli: CliRunner) -> None:
    three_sessions()
    rows = json.loads(cli.invoke(app, ["sessions", "--json"]).stdout)
    assert [r["session_id"] for r in rows] == ["newest-running", DOC_SESSION, "older-failed"]
    assert rows[1]["status"] == "completed" and rows[1]["total_retries"] == 1
    limited = json.loads(cli.invoke(app, ["sessions", "--json", "--limit", "1"]).stdout)
    assert [r["session_id"] for r in limited] == ["newest-running"]
    failed = json.loads(cli.invoke(app, ["sessions", "--json", "--status", "failed"]).stdout)
    assert [r["session_id"] for r in failed] == ["older-failed"]
    assert failed[0]["failed_stages"] == ["planning"]


def test_sessions_with_a_bad_status_is_a_usage_error(cli: CliRunner) -> None:
    one_line_error(cli.invoke(app, ["sessions", "--status", "weird"]), 2, "unknown status")


def test_sessions_with_no_sessions(cli: CliRunner) -> None:
    result = cli.invoke(app, ["sessions"])
    assert result.exit_code == 0 and "No sessions recorded" in result.stdout


def test_sessions_lists_good_sessions_and_marks_a_corrupt_one(cli: CliRunner) -> None:
    three_sessions()
    (TELEMETRY / "broken-one.json").write_text('{"session_id": "broken-one", "prom')
    result = cli.invoke(app, ["sessions"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    broken = next(line for line in result.stdout.splitlines() if "broken-one" in line)
    assert "CORRUPT" in broken and "truncated JSON" in broken
    for good in ("newest-running", DOC_SESSION, "older-failed"):
        assert good in result.stdout
    rows = json.loads(cli.invoke(app, ["sessions", "--json"]).stdout)
    assert {r["session_id"]: r["status"] for r in rows}["broken-one"] == "corrupt"


def test_sessions_reads_the_configured_directory(cli: CliRunner, tmp_path: Path) -> None:
    record(doc_example_run(), tmp_path / "elsewhere")
    rows = json.loads(
        cli.invoke(
            app, ["sessions", "--json"], env={"PROWZI_TELEMETRY_DIR": str(tmp_path / "elsewhere")}
        ).stdout
    )
    assert [r["session_id"] for r in rows] == [DOC_SESSION]


# --- show ----------------------------------------------------------------------------------


def test_show_prints_attempts_errors_durations_checkpoints_and_document(cli: CliRunner) -> None:
    record(doc_example_run())
    checkpoints = Path("prowzi_checkpoints")
    checkpoints.mkdir()
    for stage in ("intent", "planning"):
        (checkpoints / f"{DOC_SESSION}_{stage}.pkl").write_bytes(b"x")
    (checkpoints / "other-session_intent.pkl").write_bytes(b"x")
    result = cli.invoke(app, ["show", DOC_SESSION], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "✓ completed" in out and "Write a research paper..." in out
    assert "Rate limit exceeded" in out and "retrying" in out
    assert "5.20s" in out and "8.10s" in out
    assert f"prowzi_checkpoints/{DOC_SESSION}_intent.pkl" in out
    assert f"prowzi_checkpoints/{DOC_SESSION}_planning.pkl" in out
    assert "other-session" not in out
    assert "paper.md" in out and f"events/{DOC_SESSION}.jsonl" in out


def test_show_json(cli: CliRunner) -> None:
    record(doc_example_run())
    data = json.loads(cli.invoke(app, ["show", DOC_SESSION, "--json"]).stdout)
    assert data["status"] == "completed" and data["document_path"] == "paper.md"
    assert data["session"]["session_id"] == DOC_SESSION and data["checkpoints"] == []
    assert [s["status"] for s in data["session"]["stages"]][2:4] == ["retrying", "completed"]


def test_show_an_unknown_session(cli: CliRunner) -> None:
    one_line_error(cli.invoke(app, ["show", "no-such-session"]), 1, "no telemetry for session")


def test_show_a_hostile_id(cli: CliRunner) -> None:
    one_line_error(cli.invoke(app, ["show", "../../etc/passwd"]), 2, "invalid session id")


@pytest.mark.parametrize(
    ("content", "reason"), [('{"session_id": "abc', "truncated JSON"), ("nonsense", "not JSON")]
)
def test_show_a_corrupt_session_file(cli: CliRunner, content: str, reason: str) -> None:
    record(doc_example_run())
    (TELEMETRY / f"{DOC_SESSION}.json").write_text(content)
    result = cli.invoke(app, ["show", DOC_SESSION])
    one_line_error(result, 1, reason)
    assert f"prowzi show {DOC_SESSION} --rebuild" in result.stderr
    rebuilt = cli.invoke(app, ["show", DOC_SESSION, "--rebuild"])
    assert rebuilt.exit_code == 0 and "✓ completed" in rebuilt.stdout
    assert cli.invoke(app, ["show", DOC_SESSION]).exit_code == 0


def test_rebuild_refuses_a_corrupt_event_log(cli: CliRunner) -> None:
    record(doc_example_run())
    log = TELEMETRY / "events" / f"{DOC_SESSION}.jsonl"
    lines = log.read_text().splitlines()
    lines[3] = lines[3][: len(lines[3]) // 2]  # a line cut in the middle of the log
    log.write_text("\n".join(lines) + "\n")
    one_line_error(cli.invoke(app, ["show", DOC_SESSION, "--rebuild"]), 1, "line 4 is not JSON")


def _mistyped_line(value: object, directory: Path = TELEMETRY) -> Path:
    """Record the design document's run, then give its fourth line's timestamp ``value``."""
    record(doc_example_run(), directory)
    log = directory / "events" / f"{DOC_SESSION}.jsonl"
    lines = log.read_text().splitlines()
    line = json.loads(lines[3])
    line["timestamp"] = value
    lines[3] = json.dumps(line)
    log.write_text("\n".join(lines) + "\n")
    return log


MISTYPED = pytest.mark.parametrize("value", ["soon", 1e20, True, None])
"""Issue 15 item 5: event-log fields of the wrong type, or a time no date can hold."""


@MISTYPED
def test_a_mistyped_event_is_a_corrupt_line_for_every_reader(cli: CliRunner, value: object) -> None:
    """A line whose fields have the wrong type is refused as a line that is not JSON is: a
    one-line error naming the line, never a traceback."""
    _mistyped_line(value)
    reason = "line 4 is not a valid event: "
    one_line_error(cli.invoke(app, ["show", DOC_SESSION, "--rebuild"]), 1, reason)
    one_line_error(cli.invoke(app, ["monitor", DOC_SESSION]), 1, reason)
    one_line_error(cli.invoke(app, ["replay", DOC_SESSION, "--speed", "1000"]), 1, reason)
    (TELEMETRY / f"{DOC_SESSION}.json").unlink()  # show derives the record from the log
    one_line_error(cli.invoke(app, ["show", DOC_SESSION]), 1, reason)


# --- monitor and replay ----------------------------------------------------------------------


def test_monitor_a_finished_session_shows_its_final_state(cli: CliRunner) -> None:
    record(doc_example_run())
    result = cli.invoke(app, ["monitor", DOC_SESSION], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "Stages: 7/7 completed" in result.stdout and "Success: ✓" in result.stdout


def test_monitor_a_session_whose_log_is_gone(cli: CliRunner) -> None:
    record(doc_example_run())
    (TELEMETRY / "events" / f"{DOC_SESSION}.jsonl").unlink()
    result = cli.invoke(app, ["monitor", DOC_SESSION])
    assert result.exit_code == 0 and "Success: ✓" in result.stdout


def test_monitor_an_unknown_session(cli: CliRunner) -> None:
    one_line_error(cli.invoke(app, ["monitor", "nope"]), 1, "no telemetry for session 'nope'")
    waited = cli.invoke(app, ["monitor", "nope", "--wait", "0.2", "--poll", "0.05"])
    one_line_error(waited, 1, "no telemetry for session 'nope'")


def test_monitor_waits_for_a_session_to_start(cli: CliRunner) -> None:
    def later() -> None:
        time.sleep(0.3)
        record(doc_example_run())

    thread = threading.Thread(target=later)
    thread.start()
    result = cli.invoke(app, ["monitor", DOC_SESSION, "--wait", "30", "--poll", "0.05"])
    thread.join()
    assert result.exit_code == 0, result.output
    assert "Success: ✓" in result.stdout


def test_monitor_a_corrupt_event_log(cli: CliRunner) -> None:
    record(doc_example_run())
    log = TELEMETRY / "events" / f"{DOC_SESSION}.jsonl"
    log.write_text(log.read_text().replace('{"event":"stage_started"', "garbage", 1))
    one_line_error(cli.invoke(app, ["monitor", DOC_SESSION]), 1, "is not JSON")


def test_replay_plays_a_session_back(cli: CliRunner) -> None:
    run = RunScript("quick").start()
    for name in STAGES:
        run.stage(name, 0.01)
    record(run.complete())
    result = cli.invoke(app, ["replay", "quick", "--speed", "100"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "replay ×100" in result.stdout and "Success: ✓" in result.stdout


def test_replay_a_truncated_event_log(cli: CliRunner) -> None:
    record(doc_example_run())
    log = TELEMETRY / "events" / f"{DOC_SESSION}.jsonl"
    log.write_bytes(log.read_bytes()[:-25])
    one_line_error(cli.invoke(app, ["replay", DOC_SESSION]), 1, "is truncated")


def test_replay_with_a_bad_speed(cli: CliRunner) -> None:
    record(doc_example_run())
    one_line_error(cli.invoke(app, ["replay", DOC_SESSION, "--speed", "0"]), 2, "--speed")


# --- the real executable ---------------------------------------------------------------------


def test_errors_from_the_real_command_are_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prowzi.cli.main", "show", "missing-session"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: no telemetry for session 'missing-session'")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_the_command_modules_import_nothing_heavy() -> None:
    code = (
        "import sys, prowzi.cli.telemetry_cmds, prowzi.cli.main\n"
        "heavy = [m for m in ('rich.live', 'orjson', 'prowzi.workflows.telemetry',"
        " 'prowzi.cli.monitor') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_session_whose_process_is_gone_is_reported_interrupted(cli: CliRunner) -> None:
    """A run killed outright leaves its record 'running'; readers report it interrupted once
    its process is gone (and running while it lives)."""
    script = (
        "import sys\n"
        "from telemetry_events import RunScript\n"
        "from prowzi.workflows.telemetry import TelemetryCollector\n"
        f"collector = TelemetryCollector({str(TELEMETRY.resolve())!r}, background=False)\n"
        "for event in RunScript('gone', t0=1_900_000_000.0).start().stage('intent', 1.0).events:\n"
        "    collector.handle(event)\n"
        "print('recorded', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "recorded"
        (live,) = json.loads(cli.invoke(app, ["sessions", "--json"]).stdout)
        assert live["status"] == "running"
    finally:
        child.kill()
        child.wait(timeout=30)
    (row,) = json.loads(cli.invoke(app, ["sessions", "--json"]).stdout)
    assert row["status"] == "interrupted" and row["stages_completed"] == 1
    running = cli.invoke(app, ["sessions", "--json", "--status", "running"]).stdout
    interrupted = cli.invoke(app, ["sessions", "--json", "--status", "interrupted"]).stdout
    assert json.loads(running) == [] and [r["session_id"] for r in json.loads(interrupted)] == [
        "gone"
    ]
    shown = cli.invoke(app, ["show", "gone"], env={"COLUMNS": "120"})
    assert shown.exit_code == 0 and "interrupted: its process is gone" in shown.stdout
    assert json.loads(cli.invoke(app, ["show", "gone", "--json"]).stdout)["status"] == "interrupted"
    # a resume has taken the session's lock and not logged anything yet: it is running
    from prowzi.workflows.checkpoint import CheckpointManager

    with CheckpointManager(Path("prowzi_checkpoints")).session_lock("gone"):
        (starting,) = json.loads(cli.invoke(app, ["sessions", "--json"]).stdout)
        shown_json = json.loads(cli.invoke(app, ["show", "gone", "--json"]).stdout)
        only = json.loads(cli.invoke(app, ["sessions", "--json", "--status", "interrupted"]).stdout)
        live = json.loads(cli.invoke(app, ["sessions", "--json", "--status", "running"]).stdout)
    assert starting["status"] == shown_json["status"] == "running" and only == []
    assert [r["session_id"] for r in live] == ["gone"]  # the filter agrees with the column
    # telemetry commands never fail over the checkpoint setting they only probe with
    Path("not-a-directory").write_text("")
    odd = {"PROWZI_CHECKPOINT_DIR": "not-a-directory"}
    listed = cli.invoke(app, ["sessions", "--json"], env=odd)
    assert listed.exit_code == 0 and json.loads(listed.stdout)[0]["status"] == "interrupted"
    assert cli.invoke(app, ["replay", "gone", "--speed", "1000"], env=odd).exit_code == 0

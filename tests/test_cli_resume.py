"""``prowzi resume``, ``checkpoints`` and ``cleanup``: real processes where signals, locks
held by another process or exit codes of the entry point are the point (signals save completed
work; one writer per session), typer's ``CliRunner`` where only the command's output is."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner, Result

from prowzi.agents.base import StageContext
from prowzi.cli.main import app
from prowzi.config import ProwziConfig
from prowzi.errors import PermanentError, WorkflowFailedError
from prowzi.tracing import NullTracer
from prowzi.workflows import ProwziOrchestrator
from prowzi.workflows.checkpoint import CheckpointManager

TESTS = Path(__file__).resolve().parent
PROWZI = str(Path(sys.executable).parent / "prowzi")
ALL_SLOW = ",".join(
    f"{s}=engine_agents:slow"
    for s in ("intent", "planning", "search", "verification", "writing", "evaluation", "turnitin")
)


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(TESTS),
        "PROWZI_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "PROWZI_TELEMETRY_DIR": str(tmp_path / "telemetry"),
        **extra,
    }


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_completed_stages_then_resume_finishes(
    tmp_path: Path, signum: int, code: int
) -> None:
    progress = tmp_path / "progress"
    proc = subprocess.Popen(
        [
            PROWZI,
            "run",
            "Write a research paper on quantum computing",
            "--enable-checkpoints",
            "--session-id",
            "sig",
        ],
        env=env(
            tmp_path,
            PROWZI_AGENTS=ALL_SLOW,
            PROWZI_TEST_DELAY="0.3",
            PROWZI_TEST_PROGRESS=str(progress),
            PROWZI_CHECKPOINT_INTERVAL="10",  # nothing would be saved before the end...
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if progress.exists() and len(progress.read_text().split()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signum)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert "prowzi resume sig" in err
    done = progress.read_text().split()
    manager = CheckpointManager(tmp_path / "checkpoints")
    latest = manager.latest("sig")
    # ...but the stages completed before the signal were saved on the way out
    assert latest is not None and latest.completed_stages == done

    resumed = _prowzi(tmp_path, "resume", "sig", timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "sig.md").read_text(encoding="utf-8").count("## References") == 1
    manager.verify_chain("sig")


async def _broken_writer(ctx: StageContext) -> BaseModel:
    raise PermanentError("the writer is broken")


def test_two_resumes_of_one_session_exactly_one_runs(tmp_path: Path) -> None:
    config = ProwziConfig(
        enable_checkpointing=True,
        checkpoint_dir=tmp_path / "checkpoints",
        telemetry_dir=tmp_path / "telemetry",
    )
    orch = ProwziOrchestrator(
        config=config, agents={"writing": _broken_writer}, tracer=NullTracer()
    )
    with pytest.raises(WorkflowFailedError):
        asyncio.run(orch.run_research("Write a research paper on AI safety", session_id="dup"))

    slow = env(tmp_path, PROWZI_AGENTS=ALL_SLOW, PROWZI_TEST_DELAY="0.5")
    procs = [
        subprocess.Popen(
            [PROWZI, "resume", "dup"],
            env=slow,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(err for code, err in results if code != 0)
    assert "Traceback" not in loser
    assert "locked" in loser.lower() and "pid" in loser.lower(), loser
    manager = CheckpointManager(tmp_path / "checkpoints")
    manager.verify_chain("dup")
    assert manager.latest("dup").completed_stages[-1] == "turnitin"  # type: ignore[union-attr]


def test_cli_dry_run_prints_the_plan_and_runs_nothing(tmp_path: Path) -> None:
    config = ProwziConfig(
        enable_checkpointing=True,
        checkpoint_dir=tmp_path / "checkpoints",
        telemetry_dir=tmp_path / "telemetry",
    )
    orch = ProwziOrchestrator(config=config, tracer=NullTracer())
    asyncio.run(orch.run_research("Write a research paper on AI safety", session_id="plan"))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    proc = _prowzi(tmp_path, "resume", "plan", "--dry-run", "--set", "max_results_per_query=4")
    assert proc.returncode == 0, proc.stderr
    assert "parameter max_results_per_query: 15 -> 4" in proc.stdout
    assert "search: run (parameter max_results_per_query changed)" in proc.stdout
    assert "intent: restored from checkpoint" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before

    bad = _prowzi(tmp_path, "resume", "plan", "--set", "max_results_per_query=zero")
    assert (
        bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    )
    complete = _prowzi(tmp_path, "resume", "plan")
    assert complete.returncode == 0 and "already complete" in complete.stdout


def _sessions(tmp_path: Path, *ids: str) -> CheckpointManager:
    from prowzi.testing import noop_agents

    config = ProwziConfig(
        enable_checkpointing=True,
        checkpoint_dir=tmp_path / "checkpoints",
        enable_telemetry=False,
    )
    orch = ProwziOrchestrator(config=config, agents=noop_agents(), tracer=NullTracer())
    for sid in ids:
        asyncio.run(orch.run_research("x", session_id=sid))
        time.sleep(0.01)  # distinct creation times: "newest" is well defined
    return CheckpointManager(tmp_path / "checkpoints")


def _failing(stage: str, marker: Path) -> dict[str, str]:
    """Settings for a run whose ``stage`` fails at once (no retries) while the file
    ``marker`` exists; it is made here."""
    marker.touch()
    return {
        "PROWZI_AGENTS": f"{stage}=engine_agents:failing",
        "PROWZI_TEST_FAIL_MARKER": str(marker),
        "PROWZI_MAX_RETRIES": "0",
    }


def _prowzi(
    tmp_path: Path, *args: str, timeout: float = 60, **extra: str
) -> subprocess.CompletedProcess[str]:
    """``prowzi ARGS`` in ``tmp_path`` as a real process with the ``env`` of this module
    (``extra`` on top), to its end."""
    return subprocess.run(
        [PROWZI, *args],
        env=env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


def _invoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> Result:
    """A command run in this process, in ``tmp_path``; an exception it lets out fails the
    test."""
    monkeypatch.chdir(tmp_path)
    settings = {k: v for k, v in env(tmp_path).items() if k.startswith("PROWZI_")}
    result = CliRunner().invoke(app, list(args), env=settings)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_cli_checkpoints_lists_with_filters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sessions(tmp_path, "one", "two")
    rows = _invoke(tmp_path, monkeypatch, "checkpoints", "--session", "two", "--json")
    assert rows.exit_code == 0, rows.stderr
    listed = [line for line in rows.stdout.splitlines() if line]
    assert len(listed) == 7 and all('"session_id":"two"' in line for line in listed)
    sidecar = json.loads((tmp_path / "checkpoints" / "two_intent.json").read_text())
    as_listed = {json.loads(line)["checkpoint_id"]: json.loads(line) for line in listed}
    assert as_listed["two_intent"]["created_at"] == sidecar["created_at"]  # same spelling, "Z"
    one_stage = _invoke(tmp_path, monkeypatch, "checkpoints", "--stage", "search")
    assert sorted(line.split()[0] for line in one_stage.stdout.splitlines()) == [
        "one_search",
        "two_search",
    ]
    assert all(
        re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", line.split()[1])
        for line in one_stage.stdout.splitlines()
    )
    recent = _invoke(tmp_path, monkeypatch, "checkpoints", "--since", "1h")
    assert len(recent.stdout.splitlines()) == 14
    bad = _invoke(tmp_path, monkeypatch, "checkpoints", "--session", "../x")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


@pytest.mark.parametrize("as_json", [False, True])
def test_a_listing_whose_reader_went_away_stops_quietly(tmp_path: Path, as_json: bool) -> None:
    """``prowzi checkpoints | head -1``: the closed pipe is not reported as an error."""
    _sessions(tmp_path, "one", "two")
    args = [PROWZI, "checkpoints", *(["--json"] if as_json else [])]
    proc = subprocess.Popen(
        args, env=env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before it writes anything: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) != 0
    assert err == ""


def test_cli_cleanup_keeps_newest_and_running_sessions(tmp_path: Path) -> None:
    manager = _sessions(tmp_path, "old-a", "old-b", "running", "newest")
    dry = _prowzi(tmp_path, "cleanup", "--older-than", "0s", "--keep-last", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would delete old-a_intent" in dry.stdout
    assert len(manager.list_checkpoints()) == 28  # a dry run deletes nothing
    with manager.session_lock("running"):  # a run in progress, held by this process
        looked = _prowzi(tmp_path, "cleanup", "--older-than", "0s", "--keep-last", "1", "--dry-run")
        done = _prowzi(tmp_path, "cleanup", "--older-than", "0s", "--keep-last", "1")
    for proc in (looked, done):
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.splitlines()[0].startswith(
            f"kept session running: it is running (locked by pid {os.getpid()} on "
        )
    assert "would delete running_" not in looked.stdout
    assert done.stderr.splitlines()[-1] == "deleted 14 checkpoint(s)"
    left = {
        row["session_id"] for row in CheckpointManager(tmp_path / "checkpoints").list_checkpoints()
    }
    assert left == {"running", "newest"}
    bad = _prowzi(tmp_path, "cleanup", "--older-than", "seven days")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "seven days" in bad.stderr


def test_cli_cleanup_reports_what_it_could_not_delete_and_deletes_the_rest(
    tmp_path: Path,
) -> None:
    manager = _sessions(tmp_path, "blocked", "other")
    sidecar = tmp_path / "checkpoints" / "blocked_intent.json"
    sidecar.unlink()
    sidecar.mkdir()  # a directory where a sidecar should be
    (sidecar / "keep").write_text("not Prowzi's")
    done = _prowzi(tmp_path, "cleanup", "--older-than", "0s")
    assert done.returncode == 1
    assert f"could not delete {sidecar}: " in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == "deleted 14 checkpoint(s)"
    assert manager.list_checkpoints() == []
    assert (sidecar / "keep").is_file()


def test_a_forked_resume_uses_one_session_id_throughout(tmp_path: Path) -> None:
    _sessions(tmp_path, "base")
    proc = _prowzi(tmp_path, "resume", "base", "--set", "max_results_per_query=4")
    assert proc.returncode == 0, proc.stderr
    planned = re.search(r"forks new session (\S+) \(parent base\)", proc.stdout)
    ran = re.search(r"Session: (\S+)", proc.stdout)
    assert planned is not None and ran is not None
    assert planned.group(1) == ran.group(1)
    assert (tmp_path / f"{planned.group(1)}.md").is_file()
    manager = CheckpointManager(tmp_path / "checkpoints")
    assert manager.latest(planned.group(1)).parent_session_id == "base"  # type: ignore[union-attr]


def test_resume_in_place_writes_where_the_first_run_was_asked_to(tmp_path: Path) -> None:
    marker = tmp_path / "fail-while-this-exists"
    first = _prowzi(
        tmp_path,
        "run",
        "Write about quantum computing",
        "--enable-checkpoints",
        "--session-id",
        "out",
        "--output",
        "papers/mine.md",
        **_failing("writing", marker),
    )
    assert first.returncode == 1
    lines = first.stderr.splitlines()
    assert lines[-2].startswith("error: stage 'writing' failed")
    assert lines[-1] == "completed stages are checkpointed; continue with: prowzi resume out"
    marker.unlink()
    resumed = _prowzi(tmp_path, "resume", "out")
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "papers" / "mine.md").read_text(encoding="utf-8").count("## References")
    assert not (tmp_path / "out.md").exists()
    from prowzi.workflows.telemetry import TelemetryCollector

    session = TelemetryCollector(tmp_path / "telemetry").load_session("out")
    assert session.success is True
    assert "error" not in session.metadata  # the failed attempt's error is not left behind
    assert session.metadata["output_path"] == "papers/mine.md"


def _failed_at_writing(tmp_path: Path, session: str, *output: str) -> None:
    marker = tmp_path / "fail-while-this-exists"
    first = _prowzi(
        tmp_path,
        "run",
        "Write about quantum computing",
        "--session-id",
        session,
        *output,
        **_failing("writing", marker),
        PROWZI_ENABLE_CHECKPOINTING="true",
    )
    assert first.returncode == 1, first.stderr
    marker.unlink()


@pytest.mark.parametrize(
    ("output", "expected"), [(("--output", "papers/mine.md"), "papers/mine.md"), ((), "red.md")]
)
def test_telemetry_cannot_redirect_where_a_resume_writes(
    tmp_path: Path, output: tuple[str, ...], expected: str
) -> None:
    """The session's telemetry file is not signed: an ``output_path`` edited in it must not
    choose the file a resume overwrites. The resume writes where the run was asked to (as
    its checkpoint records it), else ``<session>.md``."""
    _failed_at_writing(tmp_path, "red", *output)
    telemetry = tmp_path / "telemetry" / "red.json"
    record = json.loads(telemetry.read_text(encoding="utf-8"))
    record["metadata"]["output_path"] = "victim.cfg"
    telemetry.write_text(json.dumps(record), encoding="utf-8")
    victim = tmp_path / "victim.cfg"
    victim.write_text("precious = true\n", encoding="utf-8")

    resumed = _prowzi(tmp_path, "resume", "red")
    assert resumed.returncode == 0, resumed.stderr
    assert victim.read_text(encoding="utf-8") == "precious = true\n"
    assert f"Document: {expected}" in resumed.stdout
    assert (tmp_path / expected).read_text(encoding="utf-8").count("## References") == 1


def test_resume_without_checkpoints_explains_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = _invoke(tmp_path, monkeypatch, "resume", "never-checkpointed")
    assert proc.exit_code == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "--enable-checkpoints" in proc.stderr


def test_resume_from_a_stage_without_a_checkpoint_names_the_ones_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = _sessions(tmp_path, "sparse")
    for stage in ("intent", "search"):
        manager.store.delete(f"sparse_{stage}.pkl")
    for args in (("sparse", "--from-stage", "search"), ("sparse_search",)):
        proc = _invoke(tmp_path, monkeypatch, "resume", *args, "--dry-run")
        assert proc.exit_code == 1
        assert proc.stderr.count("\n") == 1 and "--enable-checkpoints" not in proc.stderr
        assert proc.stderr.startswith("error: no checkpoint sparse_search in ")
        assert proc.stderr.rstrip().endswith(
            "session sparse has checkpoints of planning, verification, writing, evaluation, "
            "turnitin"
        )


def test_sigterm_does_not_wait_for_an_agent_blocked_in_a_thread(tmp_path: Path) -> None:
    progress = tmp_path / "progress"
    proc = subprocess.Popen(
        [
            PROWZI,
            "run",
            "Write about quantum computing",
            "--enable-checkpoints",
            "--session-id",
            "blocked",
        ],
        env=env(
            tmp_path,
            PROWZI_AGENTS="search=engine_agents:blocking",
            PROWZI_TEST_BLOCK="60",
            PROWZI_TEST_PROGRESS=str(progress),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
        progress.exists() and "blocked:search" in progress.read_text()
    ):
        time.sleep(0.02)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert time.monotonic() - signalled < 10, "the process waited for the blocked thread"
    assert proc.returncode == 143, err
    assert "continue with: prowzi resume blocked" in err
    latest = CheckpointManager(tmp_path / "checkpoints").latest("blocked")
    assert latest is not None and latest.completed_stages == ["intent", "planning"]


def test_no_resume_hint_when_nothing_was_saved(tmp_path: Path) -> None:
    failing = _failing("intent", tmp_path / "fail")
    proc = _prowzi(
        tmp_path, "run", "x", "--enable-checkpoints", "--session-id", "nothing", **failing
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith("error: stage 'intent' failed")
    assert "prowzi resume" not in proc.stderr


def test_resuming_a_complete_session_writes_its_document(tmp_path: Path) -> None:
    _sessions(tmp_path, "finished")
    proc = _prowzi(tmp_path, "resume", "finished", "--output", "again.md")
    assert proc.returncode == 0, proc.stderr
    assert "already complete" in proc.stdout
    assert (tmp_path / "again.md").read_text(encoding="utf-8").startswith("# x")


def test_a_run_whose_saves_fail_says_which_stages_are_not_checkpointed(tmp_path: Path) -> None:
    """The checkpoint directory is replaced by a file during evaluation (a real failure of
    every later save): the run still writes its document, and says what a resume would redo."""
    proc = _prowzi(
        tmp_path,
        "run",
        "x y",
        "--enable-checkpoints",
        "--session-id",
        "lost",
        timeout=120,
        PROWZI_AGENTS="evaluation=engine_agents:lose_checkpoint_dir",
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "lost.md").is_file()
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warning == [
        "warning: stages evaluation, turnitin completed but could not be checkpointed (the save "
        "failed: see the errors above); a resume of this session would run them again"
    ]
    assert proc.stderr.count("checkpoint of lost after turnitin failed again") == 1
    assert "lost_evaluation.pkl: Not a directory; the previous checkpoint is intact" in proc.stderr
    # once the directory is back, the session resumes from the last checkpoint that was saved
    checkpoints = tmp_path / "checkpoints"
    checkpoints.unlink()
    (tmp_path / "checkpoints.moved").rename(checkpoints)
    plan = _prowzi(tmp_path, "resume", "lost", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert re.search(r"evaluation: run", plan.stdout) and re.search(r"turnitin: run", plan.stdout)
    assert re.search(r"writing: restore", plan.stdout)


def test_resuming_a_running_session_says_so_before_any_plan(tmp_path: Path) -> None:
    manager = _sessions(tmp_path, "busy")
    with manager.session_lock("busy"):  # a run in progress, held by this process
        refused = _prowzi(tmp_path, "resume", "busy", "--from-stage", "search")
        planned = _prowzi(tmp_path, "resume", "busy", "--from-stage", "search", "--dry-run")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith(f"error: session busy is locked by pid {os.getpid()} on ")
    assert refused.stderr.count("\n") == 1
    assert planned.returncode == 0, planned.stderr
    lines = planned.stdout.splitlines()
    assert lines[1] == (
        "forks a new session (parent busy): busy_search is older than the session's latest "
        "checkpoint (busy_turnitin), which stays as it is"
    )
    assert lines[-1].startswith(f"note: session busy is locked by pid {os.getpid()} on ")
    free = _prowzi(tmp_path, "resume", "busy", "--from-stage", "search", "--dry-run")
    assert free.returncode == 0 and "note:" not in free.stdout


def test_worker_threads_run_calls_bounded_and_never_hold_up_the_exit() -> None:
    """The executor behind ``asyncio.to_thread`` in a command: results and errors come back,
    no more than ``max_workers`` calls run at once, calls not started by shutdown are
    cancelled, and a call blocked for good does not keep the process alive."""
    import threading

    from prowzi.cli._threads import DaemonThreads

    executor = DaemonThreads(max_workers=2)
    assert executor.submit(pow, 2, 10).result(timeout=10) == 1024
    with pytest.raises(ZeroDivisionError):
        executor.submit(lambda: 1 / 0).result(timeout=10)
    gate = threading.Event()
    running: list[int] = []
    lock = threading.Lock()
    peak = [0]

    def hold(n: int) -> int:
        with lock:
            running.append(n)
            peak[0] = max(peak[0], len(running))
        gate.wait(10)
        with lock:
            running.remove(n)
        return n

    futures = [executor.submit(hold, n) for n in range(5)]
    time.sleep(0.2)
    assert peak[0] == 2 and sum(f.running() for f in futures) == 2
    executor.shutdown(wait=False, cancel_futures=True)
    gate.set()
    finished = [f for f in futures if not f.cancelled()]
    assert len(finished) == 2 and all(f.result(timeout=10) in range(5) for f in finished)
    assert sum(f.cancelled() for f in futures) == 3
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(pow, 2, 2)

    code = (
        "import asyncio, time\n"
        "from prowzi.cli._threads import DaemonThreads\n"
        "loop = asyncio.new_event_loop()\n"
        "loop.set_default_executor(DaemonThreads(max_workers=2))\n"
        "async def main():\n"
        "    asyncio.get_running_loop().run_in_executor(None, time.sleep, 60)\n"
        "    await asyncio.sleep(0.1)\n"
        "loop.run_until_complete(main())\n"
        "raise SystemExit(7)\n"
    )
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert proc.returncode == 7, proc.stderr
    assert time.monotonic() - started < 10

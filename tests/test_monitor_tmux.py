"""The monitor in a real terminal: tmux runs ``prowzi run`` in one window and ``prowzi monitor``
in another, with slow agents (tests/engine_agents.py), and the test reads the screens.

Each test uses its own tmux server (``-L``), so nothing touches a user's tmux.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from shared import PROMPT, STAGES

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

TESTS = Path(__file__).parent
EXIT_MARK = "EXITED-WITH="


class Tmux:
    def __init__(self, socket: str, env: dict[str, str], cwd: Path) -> None:
        self.socket = socket
        self.env = env
        self.cwd = cwd

    def _tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return result.stdout

    def _command(self, argv: list[str]) -> str:
        # the shell stays after the command so the last screen can be read
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        line = " ".join(shlex.quote(a) for a in argv)
        cwd = shlex.quote(str(self.cwd))
        return f"cd {cwd} && env {exports} {line}; echo {EXIT_MARK}$?; sleep 600"

    def start(self, window: str, argv: list[str]) -> None:
        command = self._command(argv)
        if self._has_session():
            self._tmux("new-window", "-d", "-t", "prowzi", "-n", window, command)
        else:
            self._tmux(
                "new-session", "-d", "-s", "prowzi", "-n", window, "-x", "110", "-y", "40", command
            )

    def _has_session(self) -> bool:
        return (
            subprocess.run(
                ["tmux", "-L", self.socket, "has-session", "-t", "prowzi"],
                capture_output=True,
                timeout=30,
            ).returncode
            == 0
        )

    def screen(self, window: str) -> str:
        return self._tmux("capture-pane", "-p", "-t", f"prowzi:{window}")

    def keys(self, window: str, *keys: str) -> None:
        self._tmux("send-keys", "-t", f"prowzi:{window}", *keys)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    bin_dir = Path(sys.executable).parent
    agents = ",".join(
        f"{stage}=engine_agents:{'flaky' if stage == 'search' else 'slow'}" for stage in STAGES
    )
    env = {
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": str(TESTS),
        "PROWZI_AGENTS": agents,
        "PROWZI_TEST_DELAY": "0.8",
        "PROWZI_RETRY_BACKOFF_BASE": "0.3",
        "PROWZI_TELEMETRY_DIR": str(tmp_path / "telemetry"),
        "PROWZI_INDEX_DIR": str(tmp_path / ".index"),
        "TERM": "xterm-256color",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }
    session = Tmux(f"prowzi-test-{os.getpid()}-{time.monotonic_ns()}", env, tmp_path)
    try:
        yield session
    finally:
        session.kill()


def watch(tmux: Tmux, window: str, done: Callable[[str], bool], timeout: float = 90.0) -> list[str]:
    """Screens of ``window``, captured every 0.1 s until ``done(screen)`` or the timeout."""
    screens: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        screen = tmux.screen(window)
        if not screens or screen != screens[-1]:
            screens.append(screen)
        if done(screen):
            return screens
        time.sleep(0.1)
    raise AssertionError(f"timed out; last screen of {window}:\n{screens[-1] if screens else ''}")


def wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


def status_of(screen: str, stage: str) -> str | None:
    match = re.search(rf"│\s*{stage}\s+(\S+ \w+)", screen)
    return match.group(1) if match else None


def exited(screen: str) -> bool:
    return EXIT_MARK in screen


def test_monitor_follows_a_run_in_another_terminal(tmux: Tmux) -> None:
    session_id = "tmux-run-1"
    # attached before the run starts: it waits for the session to appear
    tmux.start("monitor", ["prowzi", "monitor", session_id, "--wait", "60"])
    tmux.start("run", ["prowzi", "run", PROMPT, "--session-id", session_id])

    screens = watch(tmux, "monitor", exited)

    final = screens[-1]
    assert f"{EXIT_MARK}0" in final
    assert f"Session: {session_id}" in final
    assert "Stages: 7/7 completed" in final and "Success: ✓" in final
    assert "Total Retries: 1" in final
    assert all(status_of(final, stage) == "✓ completed" for stage in STAGES)
    assert any("Success: In Progress" in s for s in screens)
    # stages seen running, then completed, in order on the live screen
    for stage in ("planning", "writing", "turnitin"):
        seen = [status_of(s, stage) for s in screens]
        assert "… running" in seen, (stage, seen)
        assert seen.index("… running") < seen.index("✓ completed")
    retries = [status_of(s, "search") for s in screens]
    assert "⟳ retrying" in retries or "… running" in retries
    run_screen = watch(tmux, "run", exited)[-1]
    assert f"{EXIT_MARK}0" in run_screen and f"Session: {session_id}" in run_screen


def test_ctrl_c_detaches_the_monitor_and_leaves_the_run_alone(tmux: Tmux, tmp_path: Path) -> None:
    session_id = "tmux-run-2"
    tmux.start("run", ["prowzi", "run", PROMPT, "--session-id", session_id])
    wait_for(tmp_path / "telemetry" / "events" / f"{session_id}.jsonl")
    tmux.start("monitor", ["prowzi", "monitor", session_id])
    watch(tmux, "monitor", lambda s: "Success: In Progress" in s)
    tmux.keys("monitor", "C-c")
    detached = watch(tmux, "monitor", exited)[-1]
    assert "Detached; the run goes on." in detached and "Traceback" not in detached
    run_screen = watch(tmux, "run", exited)[-1]
    assert f"{EXIT_MARK}0" in run_screen
    again = subprocess.run(
        [sys.executable, "-m", "prowzi.cli.main", "show", session_id, "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **tmux.env},
        timeout=60,
        check=True,
    )
    assert '"status": "completed"' in again.stdout


def test_run_with_monitor_draws_in_process(tmux: Tmux) -> None:
    tmux.start("run", ["prowzi", "run", PROMPT, "--session-id", "tmux-run-3", "--monitor"])
    screens = watch(tmux, "run", exited)
    final = screens[-1]
    assert f"{EXIT_MARK}0" in final
    assert "Session: tmux-run-3" in final and "Success: ✓" in final
    assert any("Success: In Progress" in s for s in screens)
    seen = [status_of(s, "writing") for s in screens]
    assert "… running" in seen and seen.index("… running") < seen.index("✓ completed")

"""What the tests share: the stages (Prowzi's own table, via prowzi.testing), the design
document's prompt, the prowzi command run as a process, a process that holds a session's lease,
a user's own corpus and the base of the fake HTTP servers. This module holds no tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

from prowzi.testing import STAGES

PROMPT = "Write a research paper on quantum computing"

# The prowzi command as a process of this interpreter.
PROWZI_CLI = (sys.executable, "-m", "prowzi.cli.main")


def run_cli(
    *args: str, env: Mapping[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``prowzi ARGS`` in ``cwd`` as a real process, to its end, its output captured as text;
    ``env`` on top of this process's environment."""
    return subprocess.run(
        [*PROWZI_CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
        cwd=cwd,
    )


@contextmanager
def lease_held_by_a_child(store: str | os.PathLike[str], session: str) -> Iterator[int]:
    """A child process that holds the session's lease in the checkpoint store ``store`` for
    the ``with`` block (its pid is the value); it is killed outright (SIGKILL) at the end, so
    its lease record stays behind, naming a process that is gone."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from prowzi.workflows.checkpoint import CheckpointManager\n"
            f"with CheckpointManager({os.fspath(store)!r}).session_lock({session!r}):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        yield child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)


class LoopbackServer:
    """``with`` it, ``handler`` is served on 127.0.0.1 at ``port`` (a free one) by a threaded
    HTTP server (``server_class``) from a daemon thread: the base of the tests' fake servers."""

    def __init__(
        self,
        handler: type[BaseHTTPRequestHandler],
        server_class: type[ThreadingHTTPServer] = ThreadingHTTPServer,
    ) -> None:
        self._httpd = server_class(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def write_corpus(folder: Path, files: dict[str, str]) -> Path:
    """Make the folder ``folder`` holding ``files`` (name to text, written as UTF-8): a user's
    own corpus. The folder must not exist yet."""
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


__all__ = [
    "PROMPT",
    "PROWZI_CLI",
    "STAGES",
    "LoopbackServer",
    "lease_held_by_a_child",
    "run_cli",
    "write_corpus",
]

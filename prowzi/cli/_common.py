"""What every command shares: one-line errors, exit codes, configuration loading."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer

if TYPE_CHECKING:
    from prowzi.config import ProwziConfig

T = TypeVar("T")

EXIT_FAILURE = 1
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print ``error: message`` on stderr (one line) and exit with ``code``."""
    first = " ".join(str(message).split("\n")[:1]).strip()
    typer.echo(f"error: {first}", err=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn Prowzi's errors into one-line messages and non-zero exits, never tracebacks."""
    from prowzi.errors import (
        ConfigError,
        CorpusError,
        InvalidInputError,
        ProwziError,
    )

    try:
        yield
    except BrokenPipeError:
        raise  # the reader went away: main() stops quietly
    except (ConfigError, InvalidInputError, CorpusError) as exc:
        fail(str(exc), EXIT_USAGE)
    except ProwziError as exc:
        fail(str(exc), EXIT_FAILURE)
    except OSError as exc:
        fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))


def load_config() -> ProwziConfig:
    """The configuration from the environment; a bad variable exits with a one-line error."""
    from prowzi.config import get_config
    from prowzi.errors import ConfigError

    try:
        config = get_config()
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    logging.basicConfig(
        level=config.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    return config


class Interrupted(Exception):
    """The command was stopped by SIGINT or SIGTERM; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; SIGINT or SIGTERM cancel it (so the engine saves completed stages) and
    raise :class:`Interrupted`. A second signal exits at once.

    Unlike :func:`asyncio.run`, an interrupted run does not wait for agent work still going on
    in worker threads (a thread cannot be stopped, only abandoned): they are daemon threads
    (:class:`~prowzi.cli._threads.DaemonThreads`), so the process can exit while they run.
    """
    import asyncio
    import signal

    from prowzi.cli._threads import DaemonThreads

    received: list[int] = []
    loop = asyncio.new_event_loop()
    executor = DaemonThreads(max_workers=min(32, (os.cpu_count() or 1) + 4))
    loop.set_default_executor(executor)

    async def main() -> T:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - run_until_complete always makes a task
            raise RuntimeError("no current task")
        for signum in (signal.SIGINT, signal.SIGTERM):

            def cancel(signum: int = signum) -> None:
                if received:
                    # the second signal: the user means now, without the cleanup the first
                    # one is waiting for (os._exit is the documented way to skip it)
                    os.write(2, b"error: interrupted again; exiting now\n")
                    os._exit(128 + signum)
                received.append(signum)
                task.cancel()

            loop.add_signal_handler(signum, cancel)
        return await coro

    try:
        return loop.run_until_complete(main())
    except asyncio.CancelledError:
        if received:
            raise Interrupted(received[0]) from None
        raise
    finally:
        try:
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            if leftovers:
                loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            executor.shutdown(wait=not received, cancel_futures=True)
            loop.close()


def exit_interrupted(exc: Interrupted, resume_hint: str | None) -> NoReturn:
    """Leave after SIGINT/SIGTERM with ``128 + signal``, printing ``resume_hint`` if any.

    Agent work still running in a worker thread is abandoned (the run's state was saved
    first); the exit hooks (telemetry, tracing) run as on any exit.
    """
    if resume_hint:
        typer.echo(f"interrupted: {resume_hint}", err=True)
    raise typer.Exit(128 + exc.signum)


def exit_failed(exc: Exception, resume_hint: str | None) -> NoReturn:
    """Leave after a run failed for good: the error, then how to continue (if anything was
    saved), and exit 1."""
    typer.echo(f"error: {exc}", err=True)
    if resume_hint:
        typer.echo(resume_hint, err=True)
    raise typer.Exit(1)


def resume_hint(config: ProwziConfig, session_id: str, parent: str | None = None) -> str | None:
    """How to continue ``session_id`` if it has a checkpoint (else ``parent``), or None."""
    if not (config.enable_checkpointing or parent):
        return None
    from prowzi.workflows.checkpoint import CheckpointManager

    manager = CheckpointManager.from_config(config)
    for candidate in (session_id, parent):
        if candidate and manager.latest(candidate) is not None:
            return f"completed stages are checkpointed; continue with: prowzi resume {candidate}"
    return None


def warn_unsaved(metadata: dict[str, Any]) -> None:
    """After a run that finished although checkpoint saves failed: say which stages a resume
    of the session would have to run again."""
    unsaved = metadata.get("unsaved_stages")
    if unsaved:
        typer.echo(
            f"warning: stages {', '.join(unsaved)} completed but could not be checkpointed "
            "(the save failed: see the errors above); a resume of this session would run "
            "them again",
            err=True,
        )


def check_output(path: Path) -> Path:
    """Refuse an output path that cannot take a file, before any work is done."""
    if path.is_dir():
        fail(f"--output {path} is a directory; name a file", EXIT_USAGE)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        fail(f"--output {path}: {parent} is not a directory", EXIT_USAGE)
    return path


def drain_webhooks(config: ProwziConfig) -> None:
    """Wait a bounded time for this run's webhook deliveries to the settings' endpoints;
    leave the rest in the outbox. (What a run writes for the service's subscriptions, the
    service sends.)"""
    from prowzi.webhooks import drain

    pending = drain(config)
    if pending:
        typer.echo(
            f"warning: {pending} webhook deliveries still pending after "
            f"{config.webhook_drain_seconds:g}s; they stay in the outbox for the next Prowzi "
            "process or the service (`prowzi webhooks list --pending`)",
            err=True,
        )

"""What every command shares: one-line errors, exit codes, configuration loading."""

from __future__ import annotations

import logging
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
EXIT_INTERRUPTED = 130


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
    raise :class:`Interrupted`."""
    import asyncio
    import signal

    received: list[int] = []

    async def main() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - asyncio.run always runs main() as a task
            raise RuntimeError("no current task")
        for signum in (signal.SIGINT, signal.SIGTERM):

            def cancel(signum: int = signum) -> None:
                received.append(signum)
                task.cancel()

            loop.add_signal_handler(signum, cancel)
        return await coro

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if received:
            raise Interrupted(received[0]) from None
        raise


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

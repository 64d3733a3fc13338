"""``prowzi worker``: a Celery worker that runs queued runs (needs ``prowzi[workers]``)."""

from __future__ import annotations

from typing import Annotated

import typer

from prowzi.cli._common import fail, load_config, user_errors

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)


def worker(
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency", "-c", min=1, max=256, help="Runs this worker executes at once."
        ),
    ] = 2,
    queues: Annotated[
        str, typer.Option("--queues", "-Q", help="Comma-separated queues to consume.")
    ] = "prowzi",
    loglevel: Annotated[
        str, typer.Option("--loglevel", "-l", help="DEBUG, INFO, WARNING or ERROR.")
    ] = "INFO",
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", min=0, max=65535, help="Serve /metrics on this port."),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="Interface for /metrics (0.0.0.0 in a container).")
    ] = "127.0.0.1",
    hostname: Annotated[
        str | None, typer.Option("--hostname", help="The worker's Celery node name.")
    ] = None,
) -> None:
    """Run queued runs from the broker (PROWZI_BROKER_URL) until SIGTERM.

    Each delivered run takes its session's lease first: a run another worker is running is a
    duplicate and is dropped; a run whose worker died continues from its last checkpoint.
    SIGTERM checkpoints the runs in flight and returns them to the queue.
    """
    config = load_config()
    with user_errors():
        level = loglevel.upper()
        if level not in _LEVELS:
            fail(f"invalid --loglevel {loglevel!r}: use one of {', '.join(_LEVELS)}", 2)
        names = [q.strip() for q in queues.split(",") if q.strip()]
        if not names:
            fail("invalid --queues: name at least one queue", 2)
        if not config.broker_url:
            fail("no broker configured: set PROWZI_BROKER_URL (e.g. redis://localhost:6379/0)", 2)
        try:
            from prowzi.workers.runtime import run_worker
        except ImportError as exc:
            fail(f"prowzi worker needs Celery: pip install 'prowzi[workers]' ({exc})", 2)
        run_worker(
            config,
            concurrency=concurrency,
            queues=names,
            loglevel=level,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            hostname=hostname,
        )

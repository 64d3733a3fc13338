"""``prowzi serve``: the HTTP API, with /metrics, health checks and graceful shutdown."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prowzi.cli._common import load_config, user_errors


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    max_concurrent: Annotated[
        int, typer.Option("--max-concurrent", min=1, max=256, help="Runs executed at once.")
    ] = 2,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue", min=0, max=100_000, help="Runs waiting beyond those (429 when full)."
        ),
    ] = 100,
    resume_interrupted: Annotated[
        bool,
        typer.Option(
            "--resume-interrupted",
            help="On start, resume the runs the last shutdown interrupted.",
        ),
    ] = False,
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="Where the service journals its runs.")
    ] = Path("./prowzi_service"),
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            "--shutdown-timeout", min=0.0, help="Seconds to wait for runs to checkpoint on exit."
        ),
    ] = 30.0,
    log_level: Annotated[
        str, typer.Option("--log-level", help="uvicorn log level (debug, info, warning, error).")
    ] = "info",
) -> None:
    """Serve the Prowzi HTTP API (OpenAPI at /docs and /openapi.json).

    Runs are checkpointed. SIGTERM stops accepting runs, checkpoints the runs in flight and
    exits; a restart lists them as interrupted (resumed with --resume-interrupted).
    """
    config = load_config()
    with user_errors():
        if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
        from prowzi.service.app import ServiceSettings
        from prowzi.service.server import serve as run_server

        settings = ServiceSettings(
            max_concurrent=max_concurrent,
            max_queue=max_queue,
            resume_interrupted=resume_interrupted,
            state_dir=state_dir,
            shutdown_timeout=shutdown_timeout,
        )
        run_server(config, settings, host=host, port=port, log_level=log_level)

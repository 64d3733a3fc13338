"""``prowzi sessions``, ``show``, ``monitor`` and ``replay``: reading recorded runs.

Everything goes through :class:`~prowzi.workflows.telemetry.TelemetryCollector` on the
configured ``telemetry_dir`` (``PROWZI_TELEMETRY_DIR``) and, when set, the telemetry store
(``PROWZI_TELEMETRY_URL``), where ``sessions`` and ``show`` also find sessions recorded on
other machines. rich and the telemetry modules are
imported inside the commands, so ``prowzi --help`` stays fast.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from prowzi.cli._common import EXIT_USAGE, fail, user_errors

if TYPE_CHECKING:
    from pathlib import Path

    from rich.console import Console

    from prowzi.config.paths import DirectorySetting
    from prowzi.workflows.telemetry import TelemetryCollector, WorkflowMetrics


def register(app: typer.Typer) -> None:
    app.command("sessions")(sessions)
    app.command("show")(show)
    app.command("monitor")(monitor)
    app.command("replay")(replay)


def _collector() -> TelemetryCollector:
    """The collector the commands read with (:meth:`TelemetryCollector.reader`): a session
    whose log shows a writer that is gone is still running while a live writer holds its
    lease (a resume of an interrupted session takes it before it logs anything)."""
    from prowzi.workflows.telemetry import TelemetryCollector

    return TelemetryCollector.reader(
        _directory("telemetry_dir"), store=_telemetry_url(), checkpoints=_checkpoint_location()
    )


def _telemetry_url() -> str | None:
    """The store that also holds the session files (``PROWZI_TELEMETRY_URL``), or None."""
    from prowzi.config.paths import telemetry_url
    from prowzi.errors import ConfigError

    try:
        return telemetry_url()
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def _checkpoint_location() -> Path | str | None:
    """Where the checkpoint store (and its leases) is; None when the setting is unusable: a
    command that reads telemetry alone never fails over it."""
    from prowzi.config.paths import checkpoint_location
    from prowzi.errors import ConfigError

    try:
        return checkpoint_location()
    except ConfigError:
        return None


def _directory(field: DirectorySetting) -> Path:
    """A directory setting, without building the whole configuration (start-up time)."""
    from prowzi.config.paths import directory_setting
    from prowzi.errors import ConfigError

    try:
        return directory_setting(field)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def _console() -> Console:
    from rich.console import Console

    return Console(highlight=False)


def _print_json(data: Any) -> None:
    import orjson

    sys.stdout.buffer.write(orjson.dumps(data, default=str, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"
    return f"{seconds:.2f}s"


def sessions(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most N.")] = 20,
    status: Annotated[
        str | None,
        typer.Option(
            help="Only sessions with this status: running, interrupted (its process is gone), "
            "completed, failed, corrupt."
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead.")] = False,
) -> None:
    """List recorded sessions, newest first. Unreadable session files are marked corrupt."""
    with user_errors():
        rows = _collector().list_sessions(limit=limit, status=status)
        if json_output:
            _print_json([row.to_dict() for row in rows])
            return
        if not rows:
            typer.echo("No sessions recorded" + (f" with status {status}." if status else "."))
            return
        # a plain table: listing is the command people run most, so it does without rich
        table = [["Session", "Status", "Started (UTC)", "Duration", "Stages", "Retries", "Prompt"]]
        for row in rows:
            started = row.started_at.strftime("%Y-%m-%d %H:%M") if row.started_at else ""
            if row.status == "corrupt":
                table.append(
                    [row.session_id, "CORRUPT", started, "", "", "", row.error or "unreadable"]
                )
                continue
            table.append(
                [
                    row.session_id,
                    row.status,
                    started,
                    _duration(row.total_duration_seconds),
                    f"{row.stages_completed}/{row.stages_total}",
                    str(row.total_retries),
                    " ".join(row.prompt.split()),
                ]
            )
        _print_table(table, right=(3, 4, 5))


_STATUS_COLOURS = {
    "completed": "32",
    "failed": "31",
    "running": "36",
    "interrupted": "33",
    "CORRUPT": "1;31",
}


def _print_table(table: list[list[str]], right: tuple[int, ...]) -> None:
    """Columns padded to fit; the last one is cut with an ellipsis to the terminal's width."""
    import os
    import shutil

    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    room = shutil.get_terminal_size((100, 24)).columns - sum(widths) - 2 * len(widths)
    colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    lines = []
    for n, row in enumerate(table):
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=False))
        ]
        if colour and n > 0 and row[1] in _STATUS_COLOURS:
            cells[1] = f"\033[{_STATUS_COLOURS[row[1]]}m{cells[1]}\033[0m"
        last = row[-1]
        if len(last) > max(room, 8):
            last = last[: max(room, 8) - 1] + "…"
        lines.append("  ".join([*cells, last]).rstrip())
    typer.echo("\n".join(lines))


def _load(collector: TelemetryCollector, session_id: str, rebuild: bool) -> WorkflowMetrics:
    from prowzi.workflows.telemetry import CorruptSessionError

    if rebuild:
        return collector.rebuild_session(session_id)
    try:
        return collector.load_session(session_id)
    except CorruptSessionError as exc:
        hint = (
            f"; rebuild it from its event log with: prowzi show {session_id} --rebuild"
            if exc.has_event_log
            else "; it has no event log to rebuild it from"
        )
        fail(f"{exc}{hint}")


def _checkpoints(session_id: str) -> list[str]:
    """Where the session's checkpoints are (``<location>/<session>_<stage>.pkl``), oldest
    first, in whichever store the settings name; none when it cannot be read."""
    from prowzi.config.paths import checkpoint_location
    from prowzi.errors import ConfigError
    from prowzi.storage.remote import open_store

    try:
        store = open_store(checkpoint_location())
        blobs = [b for b in store.list(f"{session_id}_") if b.name.endswith(".pkl")]
    except (ConfigError, OSError):
        return []  # telemetry alone still shows
    return [store.describe(b.name) for b in sorted(blobs, key=lambda b: b.modified)]


def show(
    session_id: Annotated[str, typer.Argument(help="The session to show.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead.")] = False,
    rebuild: Annotated[
        bool,
        typer.Option("--rebuild", help="Rewrite the session file from its event log first."),
    ] = False,
) -> None:
    """Show a session: its stage attempts, errors, durations, checkpoints and document."""
    with user_errors():
        from prowzi.ids import validate_session_id

        validate_session_id(session_id)
        collector = _collector()
        metrics = _load(collector, session_id, rebuild)
        checkpoints = _checkpoints(session_id)
        log_path = collector.event_log_path(session_id)
        document = metrics.metadata.get("document_path")
        status = collector.status_of(metrics)
        if json_output:
            _print_json(
                {
                    "status": status,
                    "session": metrics.to_dict(),
                    "checkpoints": checkpoints,
                    "document_path": document,
                    "event_log": str(log_path) if log_path.exists() else None,
                }
            )
            return
        _print_session(metrics, status, checkpoints, log_path if log_path.exists() else None)


def _print_session(
    metrics: WorkflowMetrics, status: str, checkpoints: list[str], log_path: Path | None
) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from prowzi.cli.monitor import counts_text
    from prowzi.workflows.telemetry import format_timestamp

    console = _console()
    outcome = {
        "completed": "✓ completed",
        "failed": "✗ failed",
        "running": "… running",
        "interrupted": "✗ interrupted: its process is gone"
        + (f" (continue it: prowzi resume {metrics.session_id})" if checkpoints else ""),
    }
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold", no_wrap=True)
    head.add_column()
    head.add_row("Session", metrics.session_id)
    head.add_row("Status", outcome.get(status, status))
    head.add_row("Prompt", metrics.prompt)
    head.add_row("Started", format_timestamp(metrics.started_at))
    completed = metrics.completed_at
    head.add_row("Completed", format_timestamp(completed) if completed else "-")
    head.add_row("Duration", _duration(metrics.total_duration_seconds))
    head.add_row("Stages", f"{metrics.completed_stage_count}/{metrics.stage_total} completed")
    head.add_row("Retries", str(metrics.total_retries))
    from prowzi.agents.base import format_model_usage

    usage = format_model_usage(r.details for r in metrics.stages if r.status == "completed")
    if usage:
        head.add_row("Model usage", usage)
    head.add_row("Failed stages", ", ".join(metrics.failed_stages) or "-")
    if metrics.metadata.get("error"):
        head.add_row("Error", str(metrics.metadata["error"]))
    head.add_row("Document", str(metrics.metadata.get("document_path") or "-"))
    for key in ("trace_id", "parent_session_id", "resumed_from", "run_session_id"):
        if metrics.metadata.get(key):
            head.add_row(key.replace("_", " ").capitalize(), str(metrics.metadata[key]))
    head.add_row("Event log", str(log_path) if log_path else "-")
    console.print(head)

    table = Table(
        title="Stage attempts",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
    )
    table.add_column("Stage", no_wrap=True)
    table.add_column("Status", no_wrap=True)
    table.add_column("Attempt", justify="right")
    table.add_column("Duration", justify="right", no_wrap=True)
    table.add_column("At (UTC)", no_wrap=True)
    table.add_column("Details / error", overflow="fold", ratio=1, min_width=10)
    styles = {"completed": "green", "failed": "red", "retrying": "yellow", "skipped": "blue"}
    references: list[str] = []
    for record in metrics.stages:
        details = dict(record.details)
        listed = details.pop("reference_sources", None)
        if isinstance(listed, list):
            references = [str(r) for r in listed]  # the last evaluation's draft wins
        info = (
            Text(record.error or "", style="red")
            if record.error
            else Text(
                "\n".join(
                    f"{k}: {counts_text(v) if isinstance(v, dict) else v}"
                    for k, v in details.items()
                )
            )
        )
        table.add_row(
            record.stage,
            Text(record.status, style=styles.get(record.status, "cyan")),
            str(record.attempt),
            _duration(record.duration_seconds),
            record.timestamp.strftime("%H:%M:%S.%f")[:-3],
            info,
        )
    console.print(table)
    if references:
        # Each reference with where it is and where its metadata came from (issue 16).
        console.print(Text("References", style="bold"))
        for line in references:
            console.print(Text(f"  {line}"))
    console.print(Text("Checkpoints", style="bold"))
    if not checkpoints:
        console.print("  none")
    for path in checkpoints:
        console.print(f"  {path}")


def monitor(
    session_id: Annotated[str, typer.Argument(help="The session to watch.")],
    poll: Annotated[
        float, typer.Option("--poll", min=0.02, max=10.0, help="Seconds between log reads.")
    ] = 0.2,
    wait: Annotated[
        float,
        typer.Option(
            "--wait", min=0, help="Wait up to this many seconds for the session to start."
        ),
    ] = 0.0,
) -> None:
    """Follow a session live until it ends; Ctrl-C detaches and the run goes on.

    On a finished session, show its final state and exit. Works from another terminal than
    the run's: it reads the session's event log.
    """
    with user_errors():
        import time

        from prowzi.cli.monitor import WorkflowMonitor, follow_session
        from prowzi.ids import validate_session_id

        validate_session_id(session_id)
        collector = _collector()
        console = _console()
        log_path = collector.event_log_path(session_id)
        deadline = time.monotonic() + wait
        try:
            while not (log_path.exists() or collector.session_path(session_id).exists()):
                if time.monotonic() >= deadline:
                    break  # load_session below says it is unknown
                time.sleep(poll)
        except KeyboardInterrupt:
            return
        view = WorkflowMonitor(session_id, console=console)
        if not log_path.exists() and _follow_from_broker(session_id, view, wait):
            return
        if not log_path.exists():
            # recorded without a log (or the log was removed): the file is all there is
            view.show(collector.load_session(session_id))
            console.print(view.render())
            return
        reader = collector.follow(session_id)
        view.apply_all(reader.poll())
        if view.finished:
            console.print(view.render())
            return
        try:
            with view:
                follow_session(
                    reader,
                    view,
                    poll_interval=poll,
                    writer_lock=lambda: collector.writer_alive(session_id),
                )
        except KeyboardInterrupt:
            console.print("Detached; the run goes on.")


def _follow_from_broker(session_id: str, view: Any, wait: float) -> bool:
    """Follow a run on another machine's worker through its Redis event stream (with
    ``PROWZI_BROKER_URL``); False when there is no broker or no stream for the session."""
    import time

    from prowzi.config.paths import broker_url

    with user_errors():
        broker = broker_url()
    if not broker:
        return False
    from redis.exceptions import RedisError

    from prowzi.workers.streams import connect, follow_run, stream_key

    client = connect(broker, timeout=10)
    deadline = time.monotonic() + wait
    try:
        while not client.exists(stream_key(session_id)):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        events = follow_run(client, session_id, block=0.5)
        try:
            with view:
                for event in events:
                    view.apply(event)
        except KeyboardInterrupt:
            view.console.print("Detached; the run goes on.")
            return True
    except (OSError, RedisError) as exc:
        from prowzi.http import redacted

        fail(f"cannot follow {session_id} through {redacted(broker)}: {exc}", 1)
    return True


def replay(
    session_id: Annotated[str, typer.Argument(help="The session to play back.")],
    speed: Annotated[
        float, typer.Option("--speed", help="Playback speed: 2 is twice as fast as the run.")
    ] = 1.0,
) -> None:
    """Play a recorded session's events back through the monitor."""
    with user_errors():
        from prowzi.cli.monitor import ReplayClock, WorkflowMonitor, replay_session
        from prowzi.ids import validate_session_id

        validate_session_id(session_id)
        if not speed > 0:
            fail(f"invalid --speed {speed:g}: use a number above 0", EXIT_USAGE)
        events = _collector().read_events(session_id)
        if not events:
            fail(f"the event log of session {session_id!r} holds no events")
        clock = ReplayClock(speed)
        clock.at(events[0].timestamp)
        view = WorkflowMonitor(
            session_id, console=_console(), clock=clock, label=f"replay ×{speed:g}"
        )
        try:
            with view:
                replay_session(events, view, speed=speed, clock=clock)
        except KeyboardInterrupt:
            view.console.print("Replay stopped.")

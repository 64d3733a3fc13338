"""``prowzi resume``, ``prowzi checkpoints`` and ``prowzi cleanup``."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from prowzi.cli._common import (
    EXIT_USAGE,
    Interrupted,
    check_output,
    drain_webhooks,
    exit_failed,
    exit_interrupted,
    fail,
    load_config,
    resume_hint,
    run_async,
    user_errors,
    warn_unsaved,
)
from prowzi.cli._llm_options import (
    DocumentOutput,
    LlmModel,
    MaxCost,
    MaxTokens,
    NoCache,
    apply_llm_options,
)


def register(app: typer.Typer) -> None:
    app.command("resume")(resume)
    app.command("checkpoints")(checkpoints)
    app.command("cleanup")(cleanup)


def _parse_sets(values: list[str]) -> dict[str, str]:
    changes: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--set expects key=value, got {item!r}", EXIT_USAGE)
        changes[key.strip().replace("-", "_")] = value
    return changes


def resume(
    checkpoint_id: Annotated[str, typer.Argument(help="A session id, or <session>_<stage>.")],
    from_stage: Annotated[
        str | None, typer.Option("--from-stage", help="Resume from this stage's checkpoint.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would run, and why; run nothing.")
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="<key=value>",
            help="Change a run parameter, e.g. max_results_per_query=30 (forks a new session); "
            "repeatable.",
        ),
    ] = None,
    output: DocumentOutput = None,
    llm: LlmModel = None,
    max_cost: MaxCost = None,
    max_tokens: MaxTokens = None,
    no_cache: NoCache = False,
) -> None:
    """Continue a session from its latest (or a named) checkpoint."""
    config = load_config()
    with user_errors():
        apply_llm_options(config, llm, max_cost, max_tokens, no_cache)
    changes = _parse_sets(set_ or [])
    if output is not None:
        check_output(output)
    with user_errors():
        from prowzi.errors import CheckpointNotFoundError, WorkflowFailedError
        from prowzi.ids import new_session_id, split_checkpoint_id
        from prowzi.workflows.orchestrator import ProwziOrchestrator

        orchestrator = ProwziOrchestrator(config=config)
        if not dry_run:
            orchestrator.agents  # noqa: B018  (a bad agent or model setting fails first)
        session, _ = split_checkpoint_id(checkpoint_id)
        holder = orchestrator.checkpoint_manager.lock_holder(session)
        if holder is not None and not dry_run:
            fail(f"session {session} is locked by {holder}")  # before printing any plan
        fork_id = new_session_id()  # used only if the resume forks
        try:
            plan = orchestrator.plan_resume(
                checkpoint_id, stage=from_stage, parameters=changes, fork_session_id=fork_id
            )
        except CheckpointNotFoundError as exc:
            if exc.saved_stages:
                fail(str(exc))  # the session has checkpoints, just not the one asked for
            fail(
                f"{exc} (checkpoints are written by runs started with --enable-checkpoints "
                "or PROWZI_ENABLE_CHECKPOINTING=true)"
            )
        for line in plan.describe(session_ids=not dry_run):
            typer.echo(line)
        if dry_run:
            if holder is not None:
                typer.echo(
                    f"note: session {session} is locked by {holder}; a resume must wait "
                    "until that run ends"
                )
            return
        document = output or _previous_output(config, plan)
        if plan.complete:
            # nothing runs, but the document is (re)written from the checkpoint: a run whose
            # final write failed must still be able to produce it
            run_async(orchestrator.resume_from_checkpoint(checkpoint_id, document_path=document))
            typer.echo(f"Document: {document}")
            return
        try:
            result = run_async(
                orchestrator.resume_from_checkpoint(
                    checkpoint_id,
                    stage=from_stage,
                    parameters=changes,
                    fork_session_id=fork_id,
                    document_path=document,
                )
            )
        except Interrupted as exc:
            exit_interrupted(exc, resume_hint(config, plan.session_id, plan.source_session_id))
        except WorkflowFailedError as exc:
            exit_failed(exc, resume_hint(config, plan.session_id, plan.source_session_id))
        finally:
            drain_webhooks(config)
        typer.echo(f"Session: {result.metadata['session_id']}")
        typer.echo(f"Document: {document}")
        warn_unsaved(result.metadata)


def _previous_output(config: Any, plan: Any) -> Path:
    """Where the document goes: the path the session's first run asked for when resuming in
    place, as the session's verified checkpoint records it, else ``<session>.md`` in the
    output directory. Never from telemetry: its files are not signed, and a write target
    taken from them could be redirected onto any file."""
    default: Path = config.output_dir / f"{plan.session_id}.md"
    recorded = plan.output_path
    if plan.fork or not isinstance(recorded, str) or not recorded:
        return default
    path = Path(recorded)
    # Only a path inside the working directory (a service's document, recorded absolute,
    # is its own, not this command's).
    if path.is_absolute() or ".." in path.parts:
        return default
    return check_output(path)


def checkpoints(
    session: Annotated[str | None, typer.Option(help="Only this session.")] = None,
    stage: Annotated[str | None, typer.Option(help="Only this stage.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Only checkpoints newer than this age, e.g. 2h or 7d.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """List checkpoints, newest first."""
    config = load_config()
    with user_errors():
        from datetime import UTC, datetime

        import orjson

        from prowzi.ids import validate_session_id, validate_stage_name
        from prowzi.workflows.checkpoint import CheckpointManager

        if session is not None:
            validate_session_id(session)
        if stage is not None:
            validate_stage_name(stage)
        cutoff = datetime.now(UTC) - parse_age(since) if since else None
        manager = CheckpointManager.from_config(config)
        rows = manager.list_checkpoints(session_id=session, stage=stage, since=cutoff)
        for row in rows:
            # Times as the .json files write them (UTC, "Z").
            if as_json:
                typer.echo(orjson.dumps(row, default=str, option=orjson.OPT_UTC_Z).decode())
            else:
                created = row["created_at"]
                stamp = orjson.dumps(created, option=orjson.OPT_UTC_Z).decode().strip('"')
                typer.echo(f"{row['checkpoint_id']:<48} {stamp}")
        if not rows and not as_json:
            typer.echo("no checkpoints", err=True)


def parse_age(text: str) -> timedelta:
    """An ``--older-than`` or ``--since`` value; a bad one is a usage error."""
    from prowzi.config.locations import parse_age as parse

    try:
        return parse(text)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)


def cleanup(
    older_than: Annotated[
        str,
        typer.Option("--older-than", help="Delete what sessions older than this left, e.g. 7d."),
    ],
    keep_last: Annotated[
        int, typer.Option("--keep-last", min=0, help="Always keep the N newest sessions.")
    ] = 0,
    state_dir: Annotated[
        Path,
        typer.Option("--state-dir", help="The service state directory whose documents go too."),
    ] = Path("prowzi_service"),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go.")] = False,
) -> None:
    """Delete old sessions' checkpoints, telemetry, service documents and webhook delivery
    logs. A running session keeps everything; pending webhook deliveries are never deleted."""
    age = parse_age(older_than)
    config = load_config()
    with user_errors():
        from prowzi.workflows.checkpoint import CheckpointManager
        from prowzi.workflows.retention import sweep

        swept = sweep(
            config,
            older_than=age,
            keep_last=keep_last,
            dry_run=dry_run,
            documents_dir=state_dir / "documents",
        )
        verb = "would delete" if dry_run else "deleted"
        for checkpoint_id in swept.checkpoints:
            typer.echo(f"{verb} {checkpoint_id}")
        for session_id in swept.telemetry:
            typer.echo(f"{verb} telemetry of {session_id}")
        for session_id in swept.documents:
            typer.echo(f"{verb} document of {session_id}")
        for session_id in swept.webhook_logs:
            typer.echo(f"{verb} webhook delivery log of {session_id}")
        manager = CheckpointManager.from_config(config)
        for session in sorted(swept.running):
            holder = manager.lock_holder(session) or "another process"
            typer.echo(f"kept session {session}: it is running (locked by {holder})", err=True)
        for problem in swept.errors:
            typer.echo(f"could not delete {problem}", err=True)
        if swept.telemetry or swept.documents:
            typer.echo(
                f"{verb} telemetry of {len(swept.telemetry)} session(s) and "
                f"{len(swept.documents)} document(s)",
                err=True,
            )
        if swept.webhook_logs:
            typer.echo(
                f"{verb} the webhook delivery log of {len(swept.webhook_logs)} session(s)",
                err=True,
            )
        typer.echo(f"{verb} {len(swept.checkpoints)} checkpoint(s)", err=True)
        if swept.errors:
            raise typer.Exit(1)

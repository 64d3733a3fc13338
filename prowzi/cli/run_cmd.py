"""``prowzi run``: turn a prompt into a cited document."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from prowzi.cli._common import (
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

if TYPE_CHECKING:
    from prowzi.workflows.orchestrator import ResearchResult


def register(app: typer.Typer) -> None:
    app.command("run")(run)


def run(
    prompt: Annotated[
        str,
        typer.Argument(help="What to write, e.g. 'Write a research paper on quantum computing'."),
    ],
    max_results: Annotated[
        int, typer.Option("--max-results", help="Results per search query (1-1000).")
    ] = 15,
    corpus: Annotated[
        Path | None,
        typer.Option(help="Directory of .md/.txt/.json/.jsonl documents (default: the sample)."),
    ] = None,
    output: DocumentOutput = None,
    enable_checkpoints: Annotated[
        bool, typer.Option("--enable-checkpoints", help="Checkpoint after stages (resumable).")
    ] = False,
    session_id: Annotated[
        str | None, typer.Option("--session-id", help="Use this session id instead of a new one.")
    ] = None,
    monitor: Annotated[bool, typer.Option("--monitor", help="Show the live monitor.")] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", min=0, max=65535, help="Serve /metrics while running."),
    ] = None,
    pushgateway: Annotated[
        str | None,
        typer.Option(
            "--pushgateway", help="Push metrics here at the end (PROWZI_PUSHGATEWAY_URL)."
        ),
    ] = None,
    providers: Annotated[
        str | None,
        typer.Option(
            "--providers",
            help="Online providers to search beside the corpus, e.g. crossref,arxiv "
            "(crossref, arxiv, openalex, semanticscholar, pubmed; PROWZI_PROVIDERS).",
        ),
    ] = None,
    fetch_full_text: Annotated[
        bool,
        typer.Option(
            "--fetch-full-text", help="Fetch the open-access full text (arXiv PDFs) of results."
        ),
    ] = False,
    submit: Annotated[
        bool,
        typer.Option(
            "--submit",
            help="Enqueue the run for `prowzi worker` (PROWZI_BROKER_URL); print its session id.",
        ),
    ] = False,
    llm: LlmModel = None,
    max_cost: MaxCost = None,
    max_tokens: MaxTokens = None,
    no_cache: NoCache = False,
) -> None:
    """Run the research workflow for PROMPT and write a cited markdown document."""
    config = load_config()
    with user_errors():
        apply_llm_options(config, llm, max_cost, max_tokens, no_cache)
        from prowzi.ids import new_session_id, validate_session_id

        if not prompt.strip():
            fail("the prompt is empty", 2)
        if not 1 <= max_results <= 1000:
            fail(f"invalid --max-results {max_results}: use a number from 1 to 1000", 2)
        if submit:
            _submit(config, prompt, max_results, session_id, corpus, output, monitor, metrics_port)
            return
        if corpus is not None:
            config.corpus_dir = corpus
        if config.corpus_dir is not None:
            from prowzi.agents.corpus import check_corpus

            check_corpus(config.corpus_dir, config.index_dir)
        if enable_checkpoints:
            config.enable_checkpointing = True
        _online_providers(config, providers, fetch_full_text)
        sid = validate_session_id(session_id) if session_id is not None else new_session_id()
        document = check_output(output if output is not None else config.output_dir / f"{sid}.md")
        _execute(config, prompt, max_results, sid, document, monitor, metrics_port, pushgateway)


def _online_providers(config: Any, providers: str | None, fetch_full_text: bool) -> None:
    """Apply ``--providers`` and ``--fetch-full-text`` (issue 16 item 4)."""
    from prowzi.errors import ConfigError

    if providers is not None:
        try:
            config.providers = providers
        except ConfigError as exc:
            detail = str(exc).split(": ", 1)[-1].split("): ", 1)[-1]
            fail(f"invalid --providers {providers!r}: {detail}", 2)
    if fetch_full_text:
        config.fetch_full_text = True
    if config.providers:
        from prowzi.sources import require_providers

        require_providers()


def _submit(
    config: Any,
    prompt: str,
    max_results: int,
    session_id: str | None,
    *local_only: object,
) -> None:
    """Enqueue the run; the worker uses its own corpus, output directory and metrics."""
    from prowzi.ids import validate_session_id

    if any(option not in (None, False) for option in local_only):
        fail(
            "--submit runs on a worker: --corpus, --output, --monitor and --metrics-port are "
            "the worker's settings (follow it with `prowzi monitor SESSION`)",
            2,
        )
    if not config.broker_url:
        fail("--submit needs a broker: set PROWZI_BROKER_URL (e.g. redis://localhost:6379/0)", 2)
    sid = validate_session_id(session_id) if session_id is not None else None
    try:
        from prowzi.workers.app import submit
    except ImportError as exc:
        fail(f"--submit needs Celery: pip install 'prowzi[workers]' ({exc})", 2)
    from prowzi.workflows.composition import build_tracer, shutdown_tracer

    tracer = build_tracer()
    try:
        sid = submit(
            config, prompt, session_id=sid, max_results_per_query=max_results, tracer=tracer
        )
    except Exception as exc:  # the broker is down or refuses: one line, nothing queued
        from prowzi.errors import describe_exception
        from prowzi.http import redacted

        broker = redacted(config.broker_url)
        fail(f"cannot submit the run to {broker}: {describe_exception(exc)}", 1)
    finally:
        shutdown_tracer(tracer)
    typer.echo(sid)


def _execute(
    config: Any,
    prompt: str,
    max_results: int,
    sid: str,
    document: Path,
    monitor: bool,
    metrics_port: int | None,
    pushgateway: str | None,
) -> None:
    from prowzi.errors import WorkflowFailedError
    from prowzi.workflows.orchestrator import ProwziOrchestrator

    push_url = pushgateway or config.pushgateway_url
    sinks: list[Any] = []
    metrics = None
    server = None
    if metrics_port is not None or push_url:
        from prowzi.observability.metrics import serve_metrics
        from prowzi.workflows.composition import build_metrics

        metrics = build_metrics(config=config)
        sinks.append(metrics)
        if config.webhooks_configured:
            from prowzi.webhooks import webhooks_for

            metrics.watch_webhooks(webhooks_for(config).deliverer)
        if metrics_port is not None:
            server = serve_metrics(metrics.registry, metrics_port)
    orchestrator = ProwziOrchestrator(
        config=config,
        sinks=sinks,
        on_sink_error=metrics.sink_error if metrics is not None else None,
    )
    orchestrator.agents  # noqa: B018  (a bad agent override fails before the run is announced)
    callback = None
    live = None
    if monitor:
        from prowzi.cli.monitor import live_monitor

        callback, live = live_monitor(sid)
    typer.echo(f"session: {sid}", err=True)
    interrupted: Interrupted | None = None
    try:
        coro = orchestrator.run_research(
            prompt,
            max_results_per_query=max_results,
            progress_callback=callback,
            session_id=sid,
            document_path=document,
        )
        if live is not None:
            with live:
                result = run_async(coro)
        else:
            result = run_async(coro)
    except Interrupted as exc:
        interrupted = exc
    except WorkflowFailedError as exc:
        exit_failed(exc, resume_hint(config, sid))
    finally:
        drain_webhooks(config)
        if metrics is not None and push_url:
            from prowzi.observability.metrics import push_metrics

            try:
                push_metrics(metrics.registry, push_url)
            except OSError as push_error:
                typer.echo(f"warning: could not push metrics to {push_url}: {push_error}", err=True)
        if server is not None:
            server.close()
    if interrupted is not None:
        exit_interrupted(interrupted, resume_hint(config, sid))
    _summary(result, document)


def _summary(result: ResearchResult, document: Path) -> None:
    typer.echo(f"Session: {result.metadata['session_id']}")
    if result.draft is not None:
        typer.echo(
            f"Document: {document} ({result.draft.word_count} words, "
            f"{len(result.draft.references)} references)"
        )
    if result.search is not None and result.search.message:
        typer.echo(f"Note: {result.search.message}")
    if result.verification is not None:
        typer.echo(
            f"Sources: {len(result.verification.verified)} verified, "
            f"{len(result.verification.rejected)} rejected"
        )
    if result.evaluation is not None:
        initial = result.initial_evaluation
        before = (
            f" (first draft {initial.score:.2f})"
            if initial and initial.score != result.evaluation.score
            else ""
        )
        typer.echo(f"Evaluation: {result.evaluation.score:.2f}{before}")
    if result.turnitin is not None:
        typer.echo(f"Similarity: {result.turnitin.similarity_ratio:.1%}")
    typer.echo(f"Duration: {result.metadata['duration_seconds']:.2f}s")
    warn_unsaved(result.metadata)

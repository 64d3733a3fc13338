"""What an agent reads from a run: its parameters first, the configuration as the fallback.

The orchestrator fills every parameter from the configuration when the caller leaves it out, so
for a normal run the two agree. An agent called directly with bare parameters still honours the
configuration rather than silently using a built-in default.
"""

from __future__ import annotations

from prowzi.agents.base import StageContext


def corpus_dir(ctx: StageContext) -> str | None:
    """The corpus to search: ``params.corpus_dir``, else ``config.corpus_dir``, else None (the
    sample corpus)."""
    if ctx.params.corpus_dir:
        return ctx.params.corpus_dir
    configured = ctx.config.corpus_dir
    return str(configured) if configured is not None else None


def relevance_threshold(ctx: StageContext) -> float:
    if "relevance_threshold" in ctx.params.model_fields_set:
        return ctx.params.relevance_threshold
    return ctx.config.relevance_threshold


def evaluation_threshold(ctx: StageContext) -> float:
    if "evaluation_threshold" in ctx.params.model_fields_set:
        return ctx.params.evaluation_threshold
    return ctx.config.evaluation_threshold


def providers(ctx: StageContext) -> list[str]:
    """The online providers to search (issue 16 item 4): ``params.providers``, else
    ``config.providers``."""
    if ctx.params.providers is not None:
        return list(ctx.params.providers)
    return list(ctx.config.providers)


def fetch_full_text(ctx: StageContext) -> bool:
    if ctx.params.fetch_full_text is not None:
        return ctx.params.fetch_full_text
    return ctx.config.fetch_full_text

"""The options ``prowzi run`` and ``prowzi resume`` share: the LLM options (``--llm``,
budgets, cache) and where the document goes (``--output``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from prowzi.config import ProwziConfig

LlmModel = Annotated[
    str | None,
    typer.Option(
        "--llm",
        metavar="MODEL",
        help="Use the LLM agents with this model (PROWZI_LLM_MODEL; server: PROWZI_LLM_BASE_URL).",
    ),
]
MaxCost = Annotated[
    float | None,
    typer.Option("--max-cost", metavar="USD", min=0, help="Stop when model calls would cost more."),
]
MaxTokens = Annotated[
    int | None,
    typer.Option("--max-tokens", metavar="N", min=0, help="Stop when model calls would use more."),
]
NoCache = Annotated[
    bool, typer.Option("--no-cache", help="Neither read nor write the model answer cache.")
]
DocumentOutput = Annotated[
    Path | None, typer.Option(help="Where to write the document (default: <session>.md).")
]


def apply_llm_options(
    config: ProwziConfig,
    llm: str | None,
    max_cost: float | None,
    max_tokens: int | None,
    no_cache: bool,
) -> None:
    """Set the options on ``config`` (validated: a bad value is a one-line ConfigError)."""
    if llm is not None:
        config.llm_model = llm
    if max_cost is not None:
        config.llm_max_cost_usd = max_cost
    if max_tokens is not None:
        config.llm_max_tokens = max_tokens
    if no_cache:
        config.llm_cache = False
    if not config.llm_model and (max_cost is not None or max_tokens is not None):
        from prowzi.errors import ConfigError

        raise ConfigError(
            "a budget (--max-cost, --max-tokens) needs a model: pass --llm MODEL or set "
            "PROWZI_LLM_MODEL"
        )

"""Stage agents and their result models.

:func:`default_agents` gives the offline defaults: real retrieval and text algorithms over a
local corpus (the bundled sample when none is configured), deterministic for a given corpus, no
network and no API keys. :func:`check_corpus` validates a corpus directory up front.

Both are imported on first use, so code that needs only the result models (the stage table,
checkpoint readers, the CLI's ``--help``) does not load the agents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prowzi.agents.corpus import check_corpus
    from prowzi.agents.defaults import default_agents

__all__ = ["check_corpus", "default_agents"]


def __getattr__(name: str) -> Any:
    if name == "default_agents":
        from prowzi.agents.defaults import default_agents

        return default_agents
    if name == "check_corpus":
        from prowzi.agents.corpus import check_corpus

        return check_corpus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

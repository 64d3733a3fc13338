"""Stage agents and their result models.

:func:`default_agents` gives the offline defaults: real retrieval and text algorithms over a
local corpus (the bundled sample when none is configured), deterministic for a given corpus, no
network and no API keys. :func:`check_corpus` validates a corpus directory up front.
"""

from __future__ import annotations

from prowzi.agents.corpus import check_corpus
from prowzi.agents.defaults import default_agents

__all__ = ["check_corpus", "default_agents"]

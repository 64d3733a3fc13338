"""The offline default agent for each of the seven stages.

Each agent explains its work through its stage context: ``ctx.annotate`` sets span attributes
``prowzi.<stage>.<key>`` (and telemetry details), ``ctx.event`` adds span events.

============  =============================================  ==============================
stage         attributes                                     events
============  =============================================  ==============================
intent        document_type, field, topic, keywords
planning      sections, queries                              planning.section
search        corpus, corpus_documents, corpus_sample,       search.query (results, top),
              corpus_fingerprint, index, index_built,        search.source (score, origin),
              files_indexed, passages, origins,              corpus.skipped (path, reason),
              queries, sources_found, max_results_per_query, search.provider (results,
              uncovered_words, message; with online          requests by outcome),
              providers: providers, provider_sources         search.provider_failed (error)
verification  relevance_threshold, verified, rejected,       verification.rejected (reasons),
              warnings                                       verification.warning (warnings)
writing       words, sections, references, quotations,       writing.section
              citations
evaluation    threshold, initial_score, score, revised,      evaluation.criterion,
              passed, unsupported_share                      evaluation.revised
turnitin      similarity_ratio, flagged, flagged_sources,    turnitin.flagged (offsets)
              excluded_quoted_fingerprints, k, window,
              sources_compared
============  =============================================  ==============================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prowzi.agents.base import Agent
from prowzi.agents.evaluation import EvaluationAgent
from prowzi.agents.intent import IntentAgent
from prowzi.agents.planning import PlanningAgent
from prowzi.agents.search import SearchAgent
from prowzi.agents.turnitin import TurnitinAgent
from prowzi.agents.verification import VerificationAgent
from prowzi.agents.writing import WritingAgent

if TYPE_CHECKING:
    from prowzi.config import ProwziConfig


def default_agents(config: ProwziConfig) -> dict[str, Agent]:
    """The offline default agents, keyed by stage name.

    Like every agent factory (see the ``agents`` setting), this takes the configuration; the
    default agents hold no state of their own and read each run's settings when they run: the
    corpus and thresholds from ``ctx.params`` (falling back to ``ctx.config``), the index
    directory from ``ctx.config``. So assigning ``config.index_dir`` after building an
    orchestrator is honoured.
    """
    del config  # nothing to capture: see the docstring
    return {
        "intent": IntentAgent(),
        "planning": PlanningAgent(),
        "search": SearchAgent(),
        "verification": VerificationAgent(),
        "writing": WritingAgent(),
        "evaluation": EvaluationAgent(),
        "turnitin": TurnitinAgent(),
    }

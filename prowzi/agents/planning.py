"""The planning stage: an outline of sections and the search queries for each.

Every plan has an Introduction, a Background, topic sections, a section on open problems (named
for the document type) and a Conclusion. Topic sections come from a small table of facets for
subjects the planner knows (quantum computing, AI safety, machine learning, climate, genome
editing, renewable energy); for any other subject they come from the prompt's own key phrases
plus methods and applications. The plan depends on the intent alone, so it is deterministic.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from prowzi.agents import _text
from prowzi.agents.base import StageContext
from prowzi.agents.models import IntentAnalysis, PlannedSection, ResearchPlan
from prowzi.errors import PermanentError


@dataclass(frozen=True, slots=True)
class _Facet:
    title: str
    query: str


@dataclass(frozen=True, slots=True)
class _FacetGroup:
    triggers: tuple[tuple[str, ...], ...]
    """Each trigger is a set of word stems that must all occur in the topic."""
    facets: tuple[_Facet, ...]


_FACET_GROUPS: tuple[_FacetGroup, ...] = (
    _FacetGroup(
        triggers=(
            ("ai", "safety"),
            ("alignment",),
            ("ai", "risk"),
            ("safe", "ai"),
            ("artificial", "intelligence", "safety"),
            ("ai", "alignment"),
        ),
        facets=(
            _Facet(
                "Specifying Objectives and Reward Hacking",
                "reward specification hacking gaming objective side effects",
            ),
            _Facet("Learning from Human Feedback", "human feedback preferences reward model"),
            _Facet(
                "Robustness and Adversarial Examples",
                "adversarial examples robustness distribution shift",
            ),
            _Facet("Interpretability", "interpretability explanations circuits features"),
            _Facet(
                "Oversight, Control and Corrigibility",
                "scalable oversight corrigibility debate shutdown control",
            ),
        ),
    ),
    _FacetGroup(
        triggers=(("quantum",),),
        facets=(
            _Facet("Quantum Algorithms", "quantum algorithms factoring search speedup"),
            _Facet(
                "Error Correction and Fault Tolerance",
                "quantum error correction fault tolerance threshold codes",
            ),
            _Facet(
                "Physical Qubits and Hardware",
                "qubits hardware superconducting trapped ions implementation",
            ),
            _Facet(
                "Near-Term Devices and Quantum Advantage",
                "noisy intermediate scale variational supremacy advantage",
            ),
            _Facet(
                "Cryptography and Security", "cryptography key distribution post-quantum security"
            ),
        ),
    ),
    _FacetGroup(
        triggers=(
            ("machine", "learn"),
            ("deep", "learn"),
            ("neural",),
            ("language", "model"),
            ("artificial", "intelligence"),
            ("ai",),
        ),
        facets=(
            _Facet("Architectures", "neural network architectures transformer convolutional"),
            _Facet("Training and Data", "training data optimisation scale"),
            _Facet("Safety and Reliability", "safety robustness reliability"),
        ),
    ),
    _FacetGroup(
        triggers=(("climate",), ("global", "warm"), ("greenhouse",)),
        facets=(
            _Facet(
                "The Greenhouse Effect and Climate Sensitivity",
                "greenhouse carbon dioxide radiative sensitivity",
            ),
            _Facet("Observations and Records", "observations measurements temperature record"),
            _Facet("Models and Projections", "climate models projections scenarios"),
            _Facet("Impacts and Risks", "impacts risks sea level extremes"),
        ),
    ),
    _FacetGroup(
        triggers=(("crispr",), ("gene", "edit"), ("genome", "edit"), ("cas9",)),
        facets=(
            _Facet("The CRISPR-Cas9 Mechanism", "cas9 guide rna cleavage bacterial immunity"),
            _Facet("Editing Human Cells", "human cells genome engineering multiplex"),
            _Facet("Base and Prime Editing", "base editing prime editing double strand breaks"),
            _Facet("Ethics and Safety", "ethics safety off-target germline"),
        ),
    ),
    _FacetGroup(
        triggers=(
            ("renewable",),
            ("solar",),
            ("wind", "power"),
            ("wind", "energy"),
            ("clean", "energy"),
            ("photovoltaic",),
        ),
        facets=(
            _Facet("Solar Photovoltaics", "solar photovoltaic cells efficiency perovskite"),
            _Facet("Wind, Water and Whole-System Plans", "wind water solar system plans"),
            _Facet("Energy Storage", "storage batteries lithium"),
            _Facet("Costs and Deployment", "costs deployment grid integration"),
        ),
    ),
)

_TOPIC_SECTIONS = {"essay": 3, "overview": 3, "report": 4}
_DEFAULT_TOPIC_SECTIONS = 5

_OPEN_PROBLEMS = {
    "literature_review": "Gaps in the Literature",
    "survey": "Gaps in the Literature",
    "essay": "Counterarguments and Limitations",
    "report": "Challenges and Risks",
}
_DEFAULT_OPEN_PROBLEMS = "Challenges and Open Problems"

_TITLES = {
    "research_paper": "{topic}: State of Research and Open Problems",
    "literature_review": "{topic}: A Review of the Literature",
    "survey": "A Survey of {topic}",
    "essay": "On {topic}",
    "report": "{topic}: A Report",
    "overview": "{topic}: An Overview",
}


def _facets_for(intent: IntentAnalysis) -> tuple[_Facet, ...]:
    stems = set(_text.stems(" ".join([intent.topic, *intent.keywords])))
    for group in _FACET_GROUPS:
        if any(all(_text.stem(t) in stems for t in trigger) for trigger in group.triggers):
            return group.facets
    topic_words = set(_text.words(intent.topic))
    phrases = [k for k in intent.keywords if " " in k and set(k.split()) != topic_words]
    generic = [_Facet(_text.title_case(p), p) for p in phrases[:3]]
    short = _short(intent.topic, _MAX_QUERY_TOPIC_WORDS)
    generic.append(_Facet("Methods and Approaches", f"{short} methods approaches"))
    generic.append(_Facet("Applications and Evidence", f"{short} applications results"))
    return tuple(generic)


_MAX_QUERY_TOPIC_WORDS = 12
_MAX_TITLE_TOPIC_WORDS = 14


def _short(topic: str, limit: int) -> str:
    """A long topic (a pasted paragraph) cut to its first ``limit`` words for queries and
    titles; the intent keeps it whole."""
    parts = topic.split()
    return topic if len(parts) <= limit else " ".join(parts[:limit]).rstrip(",;:") + "…"


def make_plan(intent: IntentAnalysis) -> ResearchPlan:
    topic = _short(intent.topic, _MAX_QUERY_TOPIC_WORDS)
    display = _text.title_case(_short(intent.topic, _MAX_TITLE_TOPIC_WORDS))
    facets = _facets_for(intent)[
        : _TOPIC_SECTIONS.get(intent.document_type, _DEFAULT_TOPIC_SECTIONS)
    ]
    sections = [
        PlannedSection(
            title="Introduction",
            purpose=f"What {topic} is and why it matters.",
            queries=[topic, f"{topic} overview introduction"],
        ),
        PlannedSection(
            title="Background",
            purpose=f"The origins and foundations of {topic}.",
            queries=[f"{topic} history foundations origins theory"],
        ),
    ]
    for facet in facets:
        sections.append(
            PlannedSection(
                title=facet.title,
                purpose=f"{facet.title} in the context of {topic}.",
                queries=[facet.query],
            )
        )
    sections.append(
        PlannedSection(
            title=_OPEN_PROBLEMS.get(intent.document_type, _DEFAULT_OPEN_PROBLEMS),
            purpose=f"What remains unsolved or contested about {topic}.",
            queries=[f"{topic} challenges limitations open problems obstacles risks"],
        )
    )
    sections.append(
        PlannedSection(
            title="Conclusion",
            purpose="What the sources, taken together, establish.",
            queries=[],
        )
    )
    title = _TITLES.get(intent.document_type, "{topic}").format(topic=display)
    return ResearchPlan(title=title, sections=sections)


class PlanningAgent:
    """Reads ``state.intent``; writes a :class:`ResearchPlan`."""

    async def __call__(self, ctx: StageContext) -> ResearchPlan:
        intent = ctx.state.intent
        if intent is None:
            raise PermanentError("planning needs the intent stage's result")
        plan = await asyncio.to_thread(make_plan, intent)
        ctx.annotate("sections", [s.title for s in plan.sections])
        ctx.annotate("queries", plan.queries)
        for section in plan.sections:
            ctx.event("planning.section", title=section.title, queries=len(section.queries))
        return plan

"""The intent stage: what kind of document the prompt asks for, in which field, on what topic.

Rule-based and deterministic: the document type comes from the words naming it ("literature
review", "essay"...), the topic from what follows "on"/"about" (or the prompt without its
instruction words), keywords from runs of content words (phrases) and the words themselves, and
the field from a small weighted lexicon of word stems.
"""

from __future__ import annotations

import asyncio
import re

from prowzi.agents import _text
from prowzi.agents.base import StageContext
from prowzi.agents.models import IntentAnalysis

_DOCUMENT_TYPES: tuple[tuple[str, str], ...] = (
    ("literature_review", r"literature review|review of (?:the )?literature|systematic review"),
    ("survey", r"\bsurvey\b"),
    ("research_paper", r"research paper|scientific (?:paper|article)|journal article|\bthesis\b"),
    ("essay", r"\bessay\b"),
    ("report", r"\breport\b|white ?paper|\bbriefing\b"),
    ("literature_review", r"\breview\b"),
    ("overview", r"\boverview\b|\bprimer\b|\bintroduction to\b|\bexplainer\b"),
    ("research_paper", r"\bpaper\b|\barticle\b"),
)
DEFAULT_DOCUMENT_TYPE = "research_paper"

_TOPIC_AFTER = re.compile(
    r"\b(?:on|about|regarding|concerning|into|covering|exploring|examining|of)\s+(?P<topic>.+)$",
    re.I | re.S,
)
_LENGTH = re.compile(
    r"\b(?:in|of|with|under|around)\s+(?:about\s+|around\s+|roughly\s+)?\d+\s+(?:words|pages)\b",
    re.I,
)
_AUDIENCE = re.compile(
    r"\s+for\s+(?:an?\s+|the\s+)?(?:\w+\s+){0,2}"
    r"(?:audience|readers|students|beginners|policymakers|experts|executives|public|class|course)"
    r"\b.*$",
    re.I | re.S,
)
_LEADING = re.compile(r"^(?:the|a|an|how|why|what|whether)\s+", re.I)

# Weighted stems per field. Order matters only to break ties, deterministically.
_FIELD_LEXICON: tuple[tuple[str, dict[str, int]], ...] = (
    (
        "computer_science",
        {
            "comput": 2,
            "computing": 2,
            "computer": 2,
            "algorithm": 2,
            "software": 2,
            "ai": 3,
            "artificial": 1,
            "intelligence": 1,
            "machine": 1,
            "learn": 1,
            "learning": 1,
            "neural": 2,
            "network": 1,
            "cryptography": 1,
            "data": 1,
            "robot": 2,
            "language": 1,
            "alignment": 2,
            "llm": 3,
            "transformer": 2,
            "program": 1,
        },
    ),
    (
        "physics",
        {
            "quantum": 2,
            "qubit": 3,
            "particle": 2,
            "relativity": 3,
            "photon": 2,
            "superconduct": 2,
            "superconducting": 2,
            "entanglement": 3,
            "physic": 3,
            "physics": 3,
            "optic": 2,
            "laser": 2,
            "cosmology": 3,
            "gravity": 3,
        },
    ),
    (
        "biology",
        {
            "gene": 3,
            "genome": 3,
            "genetic": 3,
            "crispr": 4,
            "cas9": 4,
            "cell": 2,
            "protein": 3,
            "dna": 3,
            "rna": 3,
            "evolution": 2,
            "biology": 3,
            "organism": 2,
            "edit": 1,
        },
    ),
    (
        "medicine",
        {
            "disease": 3,
            "clinical": 3,
            "patient": 3,
            "cancer": 3,
            "vaccine": 3,
            "health": 2,
            "drug": 2,
            "therapy": 3,
            "medicine": 3,
            "medical": 3,
        },
    ),
    (
        "environmental_science",
        {
            "climate": 4,
            "warm": 2,
            "warming": 2,
            "carbon": 2,
            "emission": 2,
            "atmosphere": 3,
            "ocean": 2,
            "ecosystem": 3,
            "biodiversity": 3,
            "pollution": 3,
            "greenhouse": 3,
        },
    ),
    (
        "energy",
        {
            "energy": 3,
            "solar": 3,
            "wind": 2,
            "renewable": 3,
            "battery": 3,
            "batterie": 3,
            "photovoltaic": 3,
            "grid": 2,
            "power": 1,
            "fuel": 2,
            "hydrogen": 2,
        },
    ),
    (
        "economics",
        {
            "economic": 3,
            "economy": 3,
            "economics": 3,
            "market": 2,
            "finance": 3,
            "financial": 3,
            "trade": 2,
            "inflation": 3,
            "labour": 2,
            "labor": 2,
            "price": 2,
        },
    ),
    (
        "philosophy",
        {"ethic": 3, "ethics": 3, "moral": 3, "philosophy": 3, "consciousness": 3},
    ),
    (
        "history",
        {"history": 3, "war": 2, "empire": 3, "medieval": 3, "century": 2, "ancient": 3},
    ),
)


def detect_document_type(prompt: str) -> str:
    lowered = prompt.lower()
    for name, pattern in _DOCUMENT_TYPES:
        if re.search(pattern, lowered):
            return name
    return DEFAULT_DOCUMENT_TYPE


def extract_topic(prompt: str) -> str:
    """The subject of the prompt, in its own words."""
    text = " ".join(prompt.split())
    text = _LENGTH.sub("", text)
    text = re.sub(r"[.!?;:]+$", "", text).strip()
    match = _TOPIC_AFTER.search(text)
    if match and _text.content_words(match.group("topic")):
        topic = match.group("topic")
    else:
        tokens = text.split()
        while tokens and (
            tokens[0].lower().strip(",") in _text.INSTRUCTION_WORDS
            or tokens[0].lower() in _text.STOPWORDS
        ):
            tokens.pop(0)
        topic = " ".join(tokens) or text
    topic = _AUDIENCE.sub("", topic)
    topic = re.sub(r"^[\"'“‘]+|[\"'”’,.]+$", "", topic.strip()).strip()
    while True:
        stripped = _LEADING.sub("", topic)
        if stripped == topic or not stripped:
            break
        topic = stripped
    return topic or prompt.strip()


def extract_keywords(topic: str, limit: int = 12) -> list[str]:
    """Phrases (runs of two to four content words) first, then the content words."""
    ignore = _text.STOPWORDS | _text.INSTRUCTION_WORDS
    phrases: list[str] = []
    singles: list[str] = []
    run: list[str] = []
    for chunk in re.split(r"[,;:()\[\]/]|\s[-–—]\s", topic):
        for word in [*_text.words(chunk), ""]:
            if word and word not in ignore and not (word.isdigit() and len(word) < 3):
                run.append(word)
                singles.append(word)
                continue
            if len(run) >= 2:
                phrases.append(" ".join(run[:4]))
            run = []
    return _text.unique(phrases + singles)[:limit]


def detect_field(keywords: list[str]) -> str:
    stems = [_text.stem(w) for k in keywords for w in k.split()]
    words = [w for k in keywords for w in k.split()]
    best, best_score = "general", 0
    for name, lexicon in _FIELD_LEXICON:
        score = sum(lexicon.get(s, 0) for s in _text.unique(stems + words))
        if score > best_score:
            best, best_score = name, score
    return best


def analyse(prompt: str) -> IntentAnalysis:
    topic = extract_topic(prompt)
    keywords = extract_keywords(topic) or extract_keywords(prompt)
    return IntentAnalysis(
        prompt=prompt,
        document_type=detect_document_type(prompt),
        field=detect_field(keywords),
        topic=topic,
        keywords=keywords,
    )


class IntentAgent:
    """Reads ``params.prompt``; writes an :class:`IntentAnalysis`."""

    async def __call__(self, ctx: StageContext) -> IntentAnalysis:
        result = await asyncio.to_thread(analyse, ctx.params.prompt)
        ctx.annotate("document_type", result.document_type)
        ctx.annotate("field", result.field)
        ctx.annotate("topic", result.topic)
        ctx.annotate("keywords", result.keywords)
        return result

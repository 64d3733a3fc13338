"""The LLM agents: intent, planning, writing and evaluation with a language model.

Search, verification and turnitin stay algorithmic. Each agent returns the same result model
as its offline counterpart, so checkpoints, resume and the document are unchanged.

- **intent** and **planning** ask for a typed answer (``response_format`` ``json_schema``, the
  schema built from a pydantic model below) and validate it;
- **writing** writes each planned section from the verified sources found for it, numbered in
  the prompt and fitted to the model's context by a token budget, whole sentences only; the
  answer passes the integrity gates (:mod:`prowzi.llm.gates`), and the references are made by
  Prowzi from the verified sources that the surviving citations name;
- **evaluation** scores the draft on the offline rubric's criteria (typed answer, 0-10 each,
  weighted as :data:`prowzi.agents.evaluation.WEIGHTS`); below the threshold one revision
  pass rewrites each section with the recommendations, through the same gates, and the
  revised draft is scored again.

An answer that does not validate, or was cut off at the token limit, is asked for once more
with the reason; if it is still unusable the attempt fails as transient (the stage's retries
apply). Facts for telemetry (``citations_dropped``, ``quotes_dropped``,
``unsupported_citations``, ``reasks``) go into the stage's details.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prowzi.agents import _draft, _settings
from prowzi.agents.base import Agent, StageContext
from prowzi.agents.evaluation import WEIGHTS
from prowzi.agents.evaluation import evaluate as measure
from prowzi.agents.models import (
    DraftSection,
    EvaluationAgentResult,
    EvaluationStageResult,
    IntentAnalysis,
    PlannedSection,
    ResearchPlan,
    RubricScore,
    Source,
    WritingAgentResult,
)
from prowzi.agents.writing import ReferenceBook, assemble, notes_for
from prowzi.errors import PermanentError
from prowzi.llm import gates
from prowzi.llm.client import (
    ChatAnswer,
    InvalidAnswer,
    LlmClient,
    LlmTransientError,
    build_client,
    estimate_tokens,
)

if TYPE_CHECKING:
    from prowzi.config import ProwziConfig

M = TypeVar("M", bound=BaseModel)

_Short = Annotated[str, Field(min_length=1, max_length=60)]


class IntentAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    document_type: Literal[
        "research_paper", "literature_review", "survey", "essay", "report", "overview"
    ]
    field: str = Field(min_length=1, max_length=40)
    topic: str = Field(min_length=1, max_length=120)
    keywords: list[Annotated[str, Field(min_length=1, max_length=30)]] = Field(
        min_length=1, max_length=6
    )


class SectionAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: _Short
    purpose: str = Field(max_length=120)
    queries: list[_Short] = Field(min_length=1, max_length=2)


class PlanAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=100)
    sections: list[SectionAnswer] = Field(min_length=2, max_length=6)


Score = Literal[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


class CriterionAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    score: Score
    note: str = Field(max_length=100)


class EvaluationAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    coverage: CriterionAnswer
    citations: CriterionAnswer
    density: CriterionAnswer
    length: CriterionAnswer
    structure: CriterionAnswer
    recommendations: list[Annotated[str, Field(max_length=120)]] = Field(max_length=3)


def strict_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of ``model`` with every ``$ref`` inlined (servers with grammar-based
    decoding, such as llama.cpp's, support local references unevenly) and titles dropped."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {
                k: ({p: inline(v) for p, v in sub.items()} if k == "properties" else inline(sub))
                for k, sub in node.items()
                if k != "title"
            }
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    result: dict[str, Any] = inline(schema)
    return result


def answer_token_bound(schema: dict[str, Any]) -> int:
    """An upper bound on the tokens of a JSON answer the schema allows (bounded strings and
    arrays, as every answer schema here has), so a typed answer is never cut off by a limit
    smaller than the schema itself permits. About 3 characters a token, plus spacing."""

    def chars(node: dict[str, Any]) -> int:
        if "enum" in node:
            return max(len(json.dumps(v)) for v in node["enum"])
        kind = node.get("type")
        if kind == "object":
            props = node.get("properties", {})
            return 2 + sum(len(k) + 6 + chars(v) for k, v in props.items())
        if kind == "array":
            return 2 + int(node.get("maxItems", 10)) * (chars(node.get("items", {})) + 2)
        if kind == "string":
            return 2 + int(node.get("maxLength", 200)) * 2  # escapes, unusual characters
        return 24

    return chars(schema) // 3 + 32


class _Agent:
    """What the four agents share: the client and the typed, re-asked call."""

    def __init__(self, client: LlmClient) -> None:
        self.client = client

    async def aclose(self) -> None:
        """Close the shared client's connections (the service does, after a run)."""
        await self.client.aclose()

    async def ask(
        self, ctx: StageContext, messages: list[dict[str, str]], answer_type: type[M]
    ) -> M:
        """A typed answer: ``json_schema`` output, validated, re-asked once (module doc)."""
        schema = strict_schema(answer_type)
        limit = answer_token_bound(schema)

        def accept(answer: ChatAnswer) -> M:
            if answer.finish_reason == "length":
                raise InvalidAnswer(
                    "the answer was cut off at the token limit (finish_reason length); "
                    "answer more briefly",
                    answer.content,
                )
            try:
                # strict=False: a raw newline inside a string (small models write them) is
                # still that string; anything else that is not JSON is refused
                data = json.loads(answer.content, strict=False)
            except json.JSONDecodeError as exc:
                raise InvalidAnswer(f"the answer is not JSON ({exc})", answer.content) from None
            try:
                return answer_type.model_validate(data)
            except ValidationError as exc:
                raise InvalidAnswer(_describe_invalid(exc), answer.content) from None

        result: M = await self._with_reask(
            ctx,
            messages,
            accept,
            lambda m: self.client.request(
                ctx,
                m,
                schema=schema,
                schema_name=answer_type.__name__,
                max_tokens=max(self.client.settings.max_output_tokens, limit),
            ),
        )
        return result

    async def write(self, ctx: StageContext, messages: list[dict[str, str]]) -> str:
        """A prose answer; one cut off at the token limit keeps its complete sentences."""

        def accept(answer: ChatAnswer) -> str:
            text = answer.content.strip()
            if answer.finish_reason == "length":
                ctx.telemetry["truncated_answers"] = ctx.telemetry.get("truncated_answers", 0) + 1
                sentences = _draft.split_sentences(text)
                if sentences and not sentences[-1].rstrip('"”)]').endswith((".", "!", "?")):
                    sentences = sentences[:-1]
                text = " ".join(sentences)
            if not text:
                raise InvalidAnswer("the answer is empty; write the section", answer.content)
            return text

        text: str = await self._with_reask(
            ctx, messages, accept, lambda m: self.client.request(ctx, m)
        )
        return text

    async def _with_reask(
        self,
        ctx: StageContext,
        messages: list[dict[str, str]],
        accept: Any,
        make_request: Any,
    ) -> Any:
        try:
            return await self.client.chat(ctx, make_request(messages), accept)
        except InvalidAnswer as first:
            ctx.telemetry["reasks"] = ctx.telemetry.get("reasks", 0) + 1
            ctx.event("llm.reask", reason=first.reason)
            again = [
                *messages,
                {"role": "assistant", "content": first.content},
                {
                    "role": "user",
                    "content": f"That answer cannot be used: {first.reason}. "
                    "Answer again, following the instructions and the schema exactly.",
                },
            ]
            try:
                return await self.client.chat(ctx, make_request(again), accept)
            except InvalidAnswer as second:
                raise LlmTransientError(
                    f"the model's answer stayed unusable after one re-ask: {second.reason}"
                ) from None


def _describe_invalid(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)[:3]
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'answer'}: {e['msg']}" for e in errors]
    return "the answer does not match the schema (" + "; ".join(parts) + ")"


# --- intent and planning -------------------------------------------------------------------


class LlmIntentAgent(_Agent):
    async def __call__(self, ctx: StageContext) -> IntentAnalysis:
        messages = [
            {
                "role": "system",
                "content": "You classify a request for a piece of academic writing. Give the "
                "document type, the academic field (snake_case, such as computer_science), "
                "the topic in the request's own words, and up to 6 search keywords. "
                "Answer with JSON only.",
            },
            {"role": "user", "content": ctx.params.prompt},
        ]
        answer = await self.ask(ctx, messages, IntentAnswer)
        intent = IntentAnalysis(
            prompt=ctx.params.prompt,
            document_type=answer.document_type,
            field=answer.field.strip(),
            topic=answer.topic.strip(),
            keywords=list(dict.fromkeys(k.strip() for k in answer.keywords if k.strip())),
        )
        ctx.annotate("document_type", intent.document_type)
        ctx.annotate("field", intent.field)
        ctx.annotate("topic", intent.topic)
        ctx.annotate("keywords", intent.keywords)
        return intent


class LlmPlanningAgent(_Agent):
    async def __call__(self, ctx: StageContext) -> ResearchPlan:
        intent = ctx.state.intent
        if intent is None:
            raise PermanentError("planning needs the intent stage's result")
        messages = [
            {
                "role": "system",
                "content": "You plan an academic document. Give its title and 2 to 6 sections: "
                "the first 'Introduction', the last 'Conclusion'. For each section give its "
                "purpose in one short sentence and 1 or 2 short search queries (a few keywords "
                "each) that find sources for it. Answer with JSON only.",
            },
            {
                "role": "user",
                "content": f"A {intent.document_type.replace('_', ' ')} on {intent.topic} "
                f"(field: {intent.field}; keywords: {', '.join(intent.keywords)}).",
            },
        ]
        answer = await self.ask(ctx, messages, PlanAnswer)
        sections: list[PlannedSection] = []
        seen: set[str] = set()
        for section in answer.sections:
            title = " ".join(section.title.split()).strip("# ")
            key = _draft.normalise_heading(title)
            if not key or key in seen or _draft.is_references_heading(title):
                continue
            seen.add(key)
            queries = list(dict.fromkeys(" ".join(q.split()) for q in section.queries))
            sections.append(
                PlannedSection(title=title, purpose=section.purpose.strip(), queries=queries)
            )
        if not sections:
            raise LlmTransientError("the model's plan has no usable section")
        plan = ResearchPlan(title=" ".join(answer.title.split()), sections=sections)
        ctx.annotate("sections", len(plan.sections))
        ctx.annotate("queries", len(plan.queries))
        for planned in plan.sections:
            ctx.event("planning.section", title=planned.title, queries=len(planned.queries))
        return plan


# --- writing ------------------------------------------------------------------------------

_WRITER = (
    "You write one section of a {kind} on {topic}. Use only the numbered sources given. "
    "After every statement taken from a source, cite it with its number in square brackets, "
    "such as [1] or [1, 2]; never cite a number that is not listed. Quote a source only word "
    "for word, in double quotes, with its citation. Do not write headings or a reference "
    "list. Write one to three paragraphs of plain prose."
)


def _sources_for(section: PlannedSection, verified: list[Source], limit: int) -> list[Source]:
    """The verified sources this section's queries found, best first; the best overall for a
    section whose queries found none (an introduction, a conclusion)."""
    queries = set(section.queries)
    found = [s for s in verified if queries.intersection(s.queries)]
    pool = found or list(verified)
    return sorted(pool, key=lambda s: (-s.score, s.source_id))[:limit]


def fit_sources(sources: list[Source], budget_tokens: int) -> tuple[dict[int, Source], str]:
    """Sources numbered from 1 and their prompt text, within ``budget_tokens``: each source
    gets an equal share, filled with whole sentences (never cut mid-sentence)."""
    numbered: dict[int, Source] = {}
    blocks: list[str] = []
    share = budget_tokens // max(1, len(sources))
    for number, source in enumerate(sources, 1):
        year = f", {source.year}" if source.year else ""
        authors = ", ".join(source.authors[:3]) or "unknown authors"
        head = f"[{number}] {source.title} ({authors}{year})"
        used = estimate_tokens(head)
        kept: list[str] = []
        from prowzi.agents import _text

        for sentence in _text.sentences(f"{source.abstract}\n\n{source.text}"):
            cost = estimate_tokens(sentence)
            if used + cost > share:
                break
            kept.append(sentence)
            used += cost
        if not kept and used > share:
            continue
        numbered[number] = source
        blocks.append(head + "\n" + " ".join(kept))
    return numbered, "\n\n".join(blocks)


class _Writer(_Agent):
    """Writes (or revises) every planned section through the gates."""

    async def sections(
        self,
        ctx: StageContext,
        intent: IntentAnalysis | None,
        plan: ResearchPlan,
        verified: list[Source],
        *,
        previous: dict[str, str] | None = None,
        recommendations: list[str] | None = None,
    ) -> tuple[list[DraftSection], ReferenceBook, gates.GateReport]:
        settings = self.client.settings
        budget = max(256, settings.context_tokens - settings.max_output_tokens - 600)
        kind = (intent.document_type if intent else "research_paper").replace("_", " ")
        topic = intent.topic if intent else plan.title

        async def one(section: PlannedSection) -> tuple[str, dict[int, Source], gates.GateReport]:
            numbered, sources_text = fit_sources(_sources_for(section, verified, 6), budget)
            parts = [f"Section: {section.title}"]
            if section.purpose:
                parts.append(f"Purpose: {section.purpose}")
            if previous is not None:
                parts.append(
                    "Revise the current text of this section"
                    + (
                        " following these recommendations: " + "; ".join(recommendations)
                        if recommendations
                        else ""
                    )
                    + ".\nCurrent text:\n"
                    + previous.get(section.title, "(missing: write it)")
                )
            parts.append("Sources:\n" + (sources_text or "(none: write without citations)"))
            messages = [
                {"role": "system", "content": _WRITER.format(kind=kind, topic=topic)},
                {"role": "user", "content": "\n\n".join(parts)},
            ]
            text = await self.write(ctx, messages)
            gated, report = gates.gate_section(text, numbered)
            return gated, numbered, report

        results = await asyncio.gather(*(one(s) for s in plan.sections))
        book = ReferenceBook()
        total = gates.GateReport()
        out: list[DraftSection] = []
        for planned, (text, numbered, report) in zip(plan.sections, results, strict=True):
            total.add(report)
            mapping = {n: book.cite(numbered[n]) for n in _draft.cited_numbers(text)}
            final = gates.renumber(text, mapping)
            out.append(
                DraftSection(
                    title=planned.title,
                    text=final,
                    citations=sorted(set(_draft.cited_numbers(final))),
                )
            )
        ctx.telemetry["citations_dropped"] = (
            ctx.telemetry.get("citations_dropped", 0) + total.citations_dropped
        )
        ctx.telemetry["quotes_dropped"] = (
            ctx.telemetry.get("quotes_dropped", 0) + total.quotes_dropped
        )
        ctx.telemetry["unsupported_citations"] = (
            ctx.telemetry.get("unsupported_citations", 0) + total.unsupported_citations
        )
        ctx.annotate("citations_dropped", ctx.telemetry["citations_dropped"])
        ctx.annotate("quotes_dropped", ctx.telemetry["quotes_dropped"])
        ctx.annotate("unsupported_citations", ctx.telemetry["unsupported_citations"])
        ctx.annotate("support_threshold", gates.SUPPORT_THRESHOLD)
        for sentence in total.unsupported[:20]:
            ctx.event("writing.unsupported_citation", sentence=sentence)
        return out, book, total


def _needs(ctx: StageContext) -> tuple[ResearchPlan, list[Source], bool, str | None]:
    plan, verification = ctx.state.plan, ctx.state.verification
    if plan is None or verification is None:
        raise PermanentError(f"{ctx.stage} needs the planning and verification stages' results")
    search = ctx.state.search
    return (
        plan,
        list(verification.verified),
        search.corpus.sample if search is not None else False,
        search.message if search is not None else None,
    )


class LlmWritingAgent(_Writer):
    async def __call__(self, ctx: StageContext) -> WritingAgentResult:
        plan, verified, sample, message = _needs(ctx)
        sections, book, _ = await self.sections(ctx, ctx.state.intent, plan, verified)
        draft = assemble(plan.title, sections, book.references(), notes_for(sample, message))
        ctx.annotate("words", draft.word_count)
        ctx.annotate("sections", len(draft.sections))
        ctx.annotate("references", len(draft.references))
        return draft


# --- evaluation ---------------------------------------------------------------------------


class LlmEvaluationAgent(_Writer):
    async def evaluate(
        self,
        ctx: StageContext,
        draft: WritingAgentResult,
        plan: ResearchPlan,
        threshold: float,
        verified: list[Source],
    ) -> EvaluationAgentResult:
        """The model grades what a reader judges; support (whether each cited sentence's
        passage says what it does) is measured, as the offline rubric measures it."""
        intent = ctx.state.intent
        measured = measure(
            draft,
            plan,
            {s.source_id for s in verified},
            intent.document_type if intent else None,
            threshold,
            sources=verified,
        )
        support = next(c for c in measured.criteria if c.criterion == "support")
        kind = (intent.document_type if intent else "research_paper").replace("_", " ")
        settings = self.client.settings
        budget_chars = 4 * max(256, settings.context_tokens - settings.max_output_tokens - 600)
        text = draft.markdown
        if len(text) > budget_chars:  # whole paragraphs only
            text = text[: text.rfind("\n\n", 0, budget_chars)] or text[:budget_chars]
        messages = [
            {
                "role": "system",
                "content": f"You grade a draft {kind} against a rubric. Score each criterion "
                "from 0 (absent) to 10 (excellent) with a one-sentence note: coverage (the "
                "planned sections are present and substantive), citations (statements cite "
                "the numbered references), density (most sentences carry a citation), length "
                "(long enough for the document type), structure (title, introduction first, "
                "conclusion last, references at the end). Then give up to 3 concrete "
                "recommendations. Answer with JSON only.",
            },
            {
                "role": "user",
                "content": "Planned sections: "
                + "; ".join(s.title for s in plan.sections)
                + "\n\nDraft:\n"
                + text,
            },
        ]
        answer = await self.ask(ctx, messages, EvaluationAnswer)
        criteria = [
            support
            if name == "support"
            else RubricScore(
                criterion=name,
                score=getattr(answer, name).score / 10,
                weight=weight,
                note=getattr(answer, name).note,
            )
            for name, weight in WEIGHTS.items()
        ]
        score = sum(c.score * c.weight for c in criteria) / sum(WEIGHTS.values())
        recommendations = [r.strip() for r in answer.recommendations if r.strip()]
        if support.score < 1.0:
            recommendations += [r for r in measured.recommendations if r.startswith("cite only")]
        return EvaluationAgentResult.graded(
            score, threshold, criteria, recommendations, measured.unsupported_share
        )

    async def __call__(self, ctx: StageContext) -> EvaluationStageResult:
        draft = ctx.state.draft
        plan, verified, sample, message = _needs(ctx)
        if draft is None:
            raise PermanentError("evaluation needs the writing stage's result")
        threshold = _settings.evaluation_threshold(ctx)
        initial = await self.evaluate(ctx, draft, plan, threshold, verified)
        ctx.annotate("threshold", threshold)
        ctx.annotate("initial_score", initial.score)
        if initial.passed:
            result = EvaluationStageResult(
                initial_evaluation=initial, evaluation=initial, draft=draft
            )
        else:
            previous = {s.title: s.text for s in draft.sections}
            sections, book, _ = await self.sections(
                ctx,
                ctx.state.intent,
                plan,
                verified,
                previous=previous,
                recommendations=initial.recommendations,
            )
            revised = assemble(
                draft.title,
                sections,
                book.references(),
                notes_for(sample, message),
                revision=draft.revision + 1,
            )
            final = await self.evaluate(ctx, revised, plan, threshold, verified)
            result = EvaluationStageResult(
                initial_evaluation=initial, evaluation=final, draft=revised
            )
            ctx.event(
                "evaluation.revised",
                revision=revised.revision,
                words=revised.word_count,
                recommendations="; ".join(initial.recommendations),
            )
        ctx.annotate("score", result.evaluation.score)
        ctx.annotate("revised", result.draft is not draft)
        ctx.annotate("passed", result.evaluation.passed)
        return result


def llm_agents(config: ProwziConfig, *, check: bool = True) -> dict[str, Agent]:
    """The LLM agents for intent, planning, writing and evaluation, sharing one client (and
    so one cache, one concurrency limit and one budget per session). ``check`` asks the
    server first, so a wrong URL or key fails before the run starts."""
    client = build_client(config, check=check)
    return {
        "intent": LlmIntentAgent(client),
        "planning": LlmPlanningAgent(client),
        "writing": LlmWritingAgent(client),
        "evaluation": LlmEvaluationAgent(client),
    }

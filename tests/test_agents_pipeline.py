"""The offline default agents, stage by stage and end to end."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from shared import write_corpus

from prowzi.agents import default_agents
from prowzi.agents._draft import cited_numbers, cited_quotations, quotations
from prowzi.agents.base import AttributeValue, RunParameters, StageContext
from prowzi.agents.corpus import CorpusIndex, load_corpus, sample_corpus_dir
from prowzi.agents.evaluation import evaluate, run_evaluation
from prowzi.agents.intent import analyse
from prowzi.agents.models import (
    DraftSection,
    EvaluationStageResult,
    Reference,
    SearchAgentResult,
    Source,
    WorkflowState,
)
from prowzi.agents.planning import make_plan
from prowzi.agents.search import anchors_for
from prowzi.agents.turnitin import K, W, check_similarity, kgram_hashes, winnow
from prowzi.agents.verification import verify
from prowzi.agents.writing import assemble, write_draft
from prowzi.config import ProwziConfig
from prowzi.errors import CorpusError, PermanentError
from prowzi.workflows.stages import RESEARCH_STAGES, STAGE_NAMES

QUANTUM = "Write a research paper on quantum computing"


class Recorder:
    """A stage observer that keeps what agents report."""

    def __init__(self) -> None:
        self.attributes: dict[str, AttributeValue | list[str]] = {}
        self.events: list[tuple[str, dict[str, AttributeValue]]] = []

    def set_attribute(self, key: str, value: AttributeValue | list[str]) -> None:
        self.attributes[key] = value

    def add_event(self, name: str, attributes: dict[str, AttributeValue]) -> None:
        self.events.append((name, dict(attributes)))


def make_config(tmp_path: Path) -> ProwziConfig:
    return ProwziConfig(index_dir=tmp_path / "index", enable_telemetry=False)


def run_stage(
    stage: str,
    state: WorkflowState,
    params: RunParameters,
    config: ProwziConfig,
    observer: Recorder | None = None,
) -> BaseModel:
    ctx = StageContext(
        session_id="test",
        stage=stage,
        attempt=1,
        params=params,
        state=state,
        config=config,
        observer=observer or Recorder(),
    )
    agent = default_agents(config)[stage]

    async def call() -> BaseModel:
        return await agent(ctx)

    return asyncio.run(call())


def run_all(
    prompt: str, config: ProwziConfig, observers: dict[str, Recorder] | None = None, **params: Any
) -> WorkflowState:
    state = WorkflowState()
    run_params = RunParameters(prompt=prompt, **params)
    for spec in RESEARCH_STAGES:
        observer = Recorder()
        if observers is not None:
            observers[spec.name] = observer
        result = run_stage(spec.name, state, run_params, config, observer)
        for name, value in spec.unpack(result).items():
            setattr(state, name, value)
    return state


@pytest.fixture(scope="module")
def quantum_state(tmp_path_factory: pytest.TempPathFactory) -> WorkflowState:
    return run_all(QUANTUM, make_config(tmp_path_factory.mktemp("q")))


def source_text(source: Source) -> str:
    return f"{source.title}\n{source.abstract}\n{source.text}"


def test_default_agents_cover_every_stage(tmp_path: Path) -> None:
    agents = default_agents(make_config(tmp_path))
    assert tuple(agents) == STAGE_NAMES
    assert all(callable(a) for a in agents.values())


# --- intent and planning ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "document_type", "field", "topic", "keywords"),
    [
        (
            QUANTUM,
            "research_paper",
            "computer_science",
            "quantum computing",
            ["quantum computing", "quantum", "computing"],
        ),
        (
            "Write a literature review about AI safety in large language models",
            "literature_review",
            "computer_science",
            "AI safety in large language models",
            ["ai safety", "large language models", "ai", "safety", "large", "language", "models"],
        ),
        (
            "Write a short essay on the impact of CRISPR gene editing on medicine for a general "
            "audience.",
            "essay",
            "biology",
            "impact of CRISPR gene editing on medicine",
            ["crispr gene editing", "crispr", "gene", "editing", "medicine"],
        ),
        (
            "Survey of renewable energy storage in 2000 words",
            "survey",
            "energy",
            "renewable energy storage",
            ["renewable energy storage", "renewable", "energy", "storage"],
        ),
        (
            "climate sensitivity",
            "research_paper",
            "environmental_science",
            "climate sensitivity",
            ["climate sensitivity", "climate", "sensitivity"],
        ),
    ],
)
def test_intent_reads_type_field_topic_and_keywords(
    prompt: str, document_type: str, field: str, topic: str, keywords: list[str]
) -> None:
    intent = analyse(prompt)
    assert (intent.document_type, intent.field, intent.topic) == (document_type, field, topic)
    assert intent.keywords == keywords


def test_plan_has_framing_and_topic_sections_with_queries() -> None:
    plan = make_plan(analyse(QUANTUM))
    titles = [s.title for s in plan.sections]
    assert titles[0] == "Introduction"
    assert titles[1] == "Background"
    assert titles[-2] == "Challenges and Open Problems"
    assert titles[-1] == "Conclusion"
    assert "Error Correction and Fault Tolerance" in titles
    assert all(s.queries for s in plan.sections[:-1])
    assert len(plan.queries) == len(set(plan.queries))


def test_plan_for_an_unknown_subject_uses_its_own_phrases() -> None:
    plan = make_plan(analyse("Write an essay on urban beekeeping and honey bee colony health"))
    titles = [s.title for s in plan.sections]
    assert "Urban Beekeeping" in titles
    assert "Honey Bee Colony Health" in titles
    assert titles[-2] == "Counterarguments and Limitations"


# --- search -------------------------------------------------------------------------------


def test_search_honours_max_results_and_merges_per_source(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    state = WorkflowState()
    params = RunParameters(prompt=QUANTUM, max_results_per_query=2)
    state.intent = analyse(QUANTUM)
    state.plan = make_plan(state.intent)
    recorder = Recorder()
    result = run_stage("search", state, params, config, recorder)
    assert isinstance(result, SearchAgentResult)
    assert [q.query for q in result.queries] == state.plan.queries
    assert all(1 <= len(q.source_ids) <= 2 for q in result.queries)
    ids = [s.source_id for s in result.sources]
    assert len(ids) == len(set(ids))
    assert set(ids) == {i for q in result.queries for i in q.source_ids}
    with CorpusIndex.open(sample_corpus_dir(), tmp_path / "index") as index:
        for source in result.sources:
            finders = [q.query for q in result.queries if source.source_id in q.source_ids]
            assert source.queries == finders
            scores = [
                h.score
                for q in finders
                for h in index.search(q, 2, ["quantum", "computing"])
                if h.document.source_id == source.source_id
            ]
            assert source.score == max(scores)
    assert [s.score for s in result.sources] == sorted(
        (s.score for s in result.sources), reverse=True
    )
    assert result.corpus.sample and result.message is None
    assert recorder.attributes["prowzi.search.max_results_per_query"] == 2
    assert recorder.attributes["prowzi.search.sources_found"] == len(ids)
    query_events = [e for e in recorder.events if e[0] == "search.query"]
    assert [e[1]["query"] for e in query_events] == state.plan.queries


def test_a_topic_the_corpus_lacks_gets_an_honest_empty_result(tmp_path: Path) -> None:
    state = run_all("Write an essay on medieval basket weaving", make_config(tmp_path))
    assert state.search is not None and state.draft is not None
    assert state.search.sources == []
    assert state.search.message is not None
    assert "no document about 'medieval basket weaving'" in state.search.message
    assert "none were invented" in state.search.message
    assert state.draft.references == []
    assert cited_numbers(state.draft.markdown) == []
    assert state.search.message in state.draft.markdown
    assert state.evaluation is not None and not state.evaluation.passed


def test_a_partly_covered_topic_says_which_words_are_missing(tmp_path: Path) -> None:
    state = run_all("Write a report on quantum basket weaving", make_config(tmp_path))
    assert state.search is not None and state.search.message is not None
    assert "thinly" in state.search.message
    assert "'basket'" in state.search.message and "'weaving'" in state.search.message


def test_a_bad_corpus_fails_search_with_a_corpus_error(tmp_path: Path) -> None:
    state = WorkflowState()
    state.intent = analyse(QUANTUM)
    state.plan = make_plan(state.intent)
    params = RunParameters(prompt=QUANTUM, corpus_dir=str(tmp_path / "nowhere"))
    with pytest.raises(CorpusError, match="not found"):
        run_stage("search", state, params, make_config(tmp_path))


def test_stages_without_their_inputs_fail_permanently(tmp_path: Path) -> None:
    params = RunParameters(prompt=QUANTUM)
    for stage in ("planning", "search", "verification", "writing", "evaluation", "turnitin"):
        with pytest.raises(PermanentError):
            run_stage(stage, WorkflowState(), params, make_config(tmp_path))


# --- verification -------------------------------------------------------------------------


def src(source_id: str, score: float, **fields: Any) -> Source:
    values: dict[str, Any] = {
        "title": f"Title of {source_id}",
        "authors": ["A. Author"],
        "year": 2020,
    }
    values.update(fields)
    return Source(source_id=source_id, score=score, **values)


def test_verification_removes_duplicates_weak_and_incomplete_sources_with_reasons() -> None:
    sources = [
        src("best.md", 10.0, doi="10.1/x", url="https://www.example.org/paper/"),
        src("same-doi.md", 9.0, doi="10.1/X"),
        src("same-url.md", 8.0, url="http://example.org/paper"),
        src("same-title.md", 7.0, title="title of best.md!"),
        src("weak.md", 1.0),
        src("anonymous.md", 6.0, authors=[], year=None),
        src("fine.md", 5.0),
        # An incomplete copy must not displace the complete one it duplicates.
        src("incomplete-first.md", 4.5, title="Shared", authors=[], year=None),
        src("complete-second.md", 4.0, title="Shared"),
    ]
    result = verify(sources, relevance_threshold=0.15)
    # Issue 16: a source with no author and no year is citable ("n.d."), with warnings.
    assert [s.source_id for s in result.verified] == [
        "best.md",
        "anonymous.md",
        "fine.md",
        "complete-second.md",
    ]
    reasons = {r.source.source_id: r.reasons for r in result.rejected}
    assert reasons["same-doi.md"] == ["duplicate of best.md (same DOI)"]
    assert reasons["same-url.md"] == ["duplicate of best.md (same URL)"]
    assert reasons["same-title.md"] == ["duplicate of best.md (same title)"]
    assert reasons["weak.md"] == ["relevance 0.10 of the best score is below the threshold 0.15"]
    assert "anonymous.md" not in reasons
    assert reasons["incomplete-first.md"] == ["duplicate of complete-second.md (same title)"]
    warnings = {w.source_id: w.warnings for w in result.warnings}
    assert warnings == {"anonymous.md": ["no authors", "no year (cited as n.d.)"]}
    assert result.relevance_threshold == 0.15


def test_verification_threshold_comes_from_the_run_parameters(tmp_path: Path) -> None:
    state = WorkflowState()
    state.search = SearchAgentResult(
        sources=[src("a.md", 10.0), src("b.md", 4.0), src("c.md", 2.0)],
        corpus={"path": "x", "documents": 3, "fingerprint": "f"},
    )
    recorder = Recorder()
    result = run_stage(
        "verification",
        state,
        RunParameters(prompt="x", relevance_threshold=0.5),
        make_config(tmp_path),
        recorder,
    )
    assert [s.source_id for s in result.verified] == ["a.md"]  # type: ignore[attr-defined]
    assert recorder.attributes["prowzi.verification.rejected"] == 2
    rejected = [e[1]["source_id"] for e in recorder.events if e[0] == "verification.rejected"]
    assert rejected == ["b.md", "c.md"]


# --- writing ------------------------------------------------------------------------------


def test_every_citation_resolves_and_every_reference_is_a_verified_corpus_source(
    quantum_state: WorkflowState,
) -> None:
    draft, verification = quantum_state.draft, quantum_state.verification
    assert draft is not None and verification is not None
    body, _, references_block = draft.markdown.partition("\n## References\n")
    numbers = {r.number for r in draft.references}
    assert numbers == set(range(1, len(draft.references) + 1))
    cited = cited_numbers(body)
    assert cited and set(cited) == numbers
    listed = [int(n) for n in re.findall(r"^\[(\d+)\]", references_block, re.M)]
    assert listed == sorted(numbers)
    verified = {s.source_id for s in verification.verified}
    corpus_ids = {d.source_id for d in load_corpus(sample_corpus_dir()).documents}
    for ref in draft.references:
        assert ref.source_id in verified
        assert ref.source_id in corpus_ids
        assert f"`{ref.source_id}`" in references_block


def test_quoted_text_is_verbatim_from_the_cited_source_and_cited(
    quantum_state: WorkflowState,
) -> None:
    draft, verification = quantum_state.draft, quantum_state.verification
    assert draft is not None and verification is not None
    sources = {s.source_id: s for s in verification.verified}
    refs = {r.number: sources[r.source_id] for r in draft.references}
    body = draft.markdown.split("\n## References\n")[0]
    spans = quotations(body)
    assert len(spans) >= 15
    assert cited_quotations(body) == spans
    for start, end in spans:
        quote = body[start + 1 : end - 1]
        number = cited_numbers(body[end : end + 8])[0]
        normalised = " ".join(source_text(refs[number]).split())
        assert quote in normalised, quote


def test_the_draft_has_the_planned_sections(quantum_state: WorkflowState) -> None:
    draft, plan = quantum_state.draft, quantum_state.plan
    assert draft is not None and plan is not None
    headings = re.findall(r"^## (.+)$", draft.markdown, re.M)
    assert headings == [s.title for s in plan.sections] + ["References"]
    assert draft.markdown.startswith(f"# {plan.title}\n")
    assert "sample corpus" in draft.markdown
    assert draft.word_count > 700
    for section in draft.sections:
        assert section.citations == sorted(set(cited_numbers(section.text)))


# --- evaluation ---------------------------------------------------------------------------


def test_a_good_draft_passes_without_revision(quantum_state: WorkflowState) -> None:
    assert quantum_state.initial_evaluation is not None and quantum_state.evaluation is not None
    assert quantum_state.initial_evaluation.passed
    assert quantum_state.evaluation == quantum_state.initial_evaluation
    assert quantum_state.draft is not None and quantum_state.draft.revision == 0
    criteria = {c.criterion: c.score for c in quantum_state.evaluation.criteria}
    # Issue 16 adds the support criterion: the cited passage must support the sentence.
    assert set(criteria) == {"coverage", "citations", "support", "density", "length", "structure"}
    assert criteria["support"] == 1.0
    assert quantum_state.evaluation.unsupported_share == 0.0
    assert 0 <= quantum_state.evaluation.score <= 1


def test_revision_runs_once_when_the_score_is_below_threshold(tmp_path: Path) -> None:
    observers: dict[str, Recorder] = {}
    state = run_all(
        QUANTUM,
        make_config(tmp_path),
        observers,
        max_results_per_query=1,
        evaluation_threshold=0.99,
    )
    assert state.initial_evaluation is not None and state.evaluation is not None
    assert state.initial_evaluation.score < 0.99
    assert state.draft is not None and state.draft.revision == 1
    assert state.evaluation.score > state.initial_evaluation.score
    assert observers["evaluation"].attributes["prowzi.evaluation.revised"] is True
    assert any(e[0] == "evaluation.revised" for e in observers["evaluation"].events)


def test_revision_fixes_dangling_citations_and_adds_missing_sections(
    quantum_state: WorkflowState,
) -> None:
    draft, plan = quantum_state.draft, quantum_state.plan
    verification, intent = quantum_state.verification, quantum_state.intent
    assert draft and plan and verification and intent
    kept = [draft.sections[0], draft.sections[2]]
    broken_text = kept[1].text + ' A stray claim cites nothing real [42]. Another "copied" [1].'
    sections = [kept[0], DraftSection(title=kept[1].title, text=broken_text)]
    outsider = Reference(
        number=len(draft.references) + 1, source_id="elsewhere.md", title="Not verified"
    )
    broken = assemble(draft.title, sections, [*draft.references, outsider], [])
    verified_ids = {s.source_id for s in verification.verified}
    before = evaluate(
        broken, plan, verified_ids, intent.document_type, 0.75, list(verification.verified)
    )
    assert not before.passed
    assert any("do not resolve: [42]" in r for r in before.recommendations)
    assert any("missing section" in r for r in before.recommendations)

    result = run_evaluation(broken, plan, intent, list(verification.verified), 0.75)
    assert isinstance(result, EvaluationStageResult)
    assert result.initial_evaluation == before
    revised = result.draft
    assert revised.revision == 1
    assert "[42]" not in revised.markdown and "stray claim" not in revised.markdown
    assert [s.title for s in revised.sections] == [s.title for s in plan.sections]
    assert {r.source_id for r in revised.references} <= verified_ids
    body = revised.markdown.split("\n## References\n")[0]
    assert set(cited_numbers(body)) == {r.number for r in revised.references}
    assert result.evaluation.score > before.score
    assert result.evaluation.passed
    # The conclusion describes the revised document, not the broken one.
    assert f"drawing on {len(revised.references)} verified sources" in revised.markdown


# --- turnitin -----------------------------------------------------------------------------


def similarity_sources() -> list[Source]:
    return [
        Source(
            source_id="bees.md",
            title="Bees",
            authors=["B. Keeper"],
            year=2001,
            abstract="Honey bees communicate the direction and distance of flowers to their "
            "nest mates through a waggle dance performed on the vertical comb.",
            text="",
        ),
        Source(
            source_id="ants.md",
            title="Ants",
            authors=["A. Hill"],
            year=2002,
            abstract="Ant colonies find short paths between the nest and food by laying "
            "and following pheromone trails that evaporate over time.",
            text="",
        ),
    ]


def draft_of(body: str) -> str:
    refs = [
        Reference(number=1, source_id="bees.md", title="Bees"),
        Reference(number=2, source_id="ants.md", title="Ants"),
    ]
    return assemble("Insects", [DraftSection(title="Introduction", text=body)], refs, []).markdown


def test_winnowing_flags_a_copied_passage_with_its_offsets() -> None:
    copied = (
        "Ant colonies find short paths between the nest and food by laying and following "
        "pheromone trails"
    )
    markdown = draft_of(
        f"Insects are remarkable. {copied} that evaporate over time. "
        "We wrote this sentence ourselves about something else entirely."
    )
    result = check_similarity(markdown, similarity_sources())
    assert (result.k, result.window) == (K, W)
    assert len(result.flagged) == 1
    passage = result.flagged[0]
    assert passage.source_id == "ants.md"
    assert markdown[passage.start : passage.end] == passage.text
    assert passage.text.startswith("Ant colonies") and "evaporate over time" in passage.text
    assert passage.shared_fingerprints >= 1
    assert 0.3 < result.similarity_ratio < 1


def test_quoted_and_cited_text_is_excluded_but_quoted_uncited_text_is_not() -> None:
    quote = (
        "Honey bees communicate the direction and distance of flowers to their nest mates "
        "through a waggle dance"
    )
    cited = check_similarity(
        draft_of(f'Keeper writes that "{quote}" [1]. Bees matter.'), similarity_sources()
    )
    assert cited.flagged == []
    assert cited.similarity_ratio == 0
    assert cited.excluded_quoted_fingerprints > 0
    uncited = check_similarity(
        draft_of(f'Keeper writes that "{quote}". Bees matter.'), similarity_sources()
    )
    assert [p.source_id for p in uncited.flagged] == ["bees.md"]
    assert uncited.similarity_ratio > 0


def test_the_default_draft_reproduces_no_source_unmarked(quantum_state: WorkflowState) -> None:
    assert quantum_state.turnitin is not None
    assert quantum_state.turnitin.flagged == []
    assert quantum_state.turnitin.similarity_ratio == 0
    assert quantum_state.turnitin.excluded_quoted_fingerprints > 50


# --- end to end ---------------------------------------------------------------------------


def test_two_runs_give_the_same_result(tmp_path: Path) -> None:
    first = run_all(QUANTUM, make_config(tmp_path / "one"))
    second = run_all(QUANTUM, make_config(tmp_path / "two"))  # a fresh index
    third = run_all(QUANTUM, make_config(tmp_path / "one"))  # the reused index
    assert first.model_dump() == second.model_dump() == third.model_dump()


def test_the_sample_run_takes_well_under_a_second_of_cpu(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    start = time.process_time()
    run_all(QUANTUM, config)  # builds the index
    cold = time.process_time() - start
    start = time.process_time()
    run_all(QUANTUM, config)
    warm = time.process_time() - start
    assert cold < 1.0
    assert warm < 0.5


def test_agents_explain_their_work(tmp_path: Path) -> None:
    observers: dict[str, Recorder] = {}
    state = run_all(QUANTUM, make_config(tmp_path), observers)
    assert state.plan and state.verification and state.draft
    attributes = {stage: o.attributes for stage, o in observers.items()}
    assert attributes["intent"]["prowzi.intent.topic"] == "quantum computing"
    assert attributes["planning"]["prowzi.planning.queries"] == state.plan.queries
    assert attributes["search"]["prowzi.search.index_built"] is True
    assert str(attributes["search"]["prowzi.search.index"]).startswith(str(tmp_path / "index"))
    verified = attributes["verification"]["prowzi.verification.verified"]
    assert verified == len(state.verification.verified)
    assert attributes["writing"]["prowzi.writing.references"] == len(state.draft.references)
    assert "prowzi.evaluation.initial_score" in attributes["evaluation"]
    assert attributes["turnitin"]["prowzi.turnitin.similarity_ratio"] == 0
    for stage, recorded in attributes.items():
        assert all(key.startswith(f"prowzi.{stage}.") for key in recorded)


def test_a_users_own_corpus_of_md_json_and_jsonl(tmp_path: Path) -> None:
    corpus = write_corpus(
        tmp_path / "reefs",
        {
            "bleaching.md": (
                "---\nauthors: [R. Coral, S. Diver]\nyear: 2016\nurl: https://example.org/bleach\n"
                "---\n# Coral Reef Bleaching\n\nMarine heatwaves cause coral reef bleaching when "
                "corals expel their symbiotic algae. Repeated bleaching leaves reefs little time "
                "to recover.\n"
            ),
            "records.json": json.dumps(
                {
                    "records": [
                        {
                            "title": "Reef Fish Diversity",
                            "authors": ["F. Fin"],
                            "year": 2012,
                            "abstract": "Coral reefs shelter a quarter of marine fish species. "
                            "Reef structure provides the shelter that many juvenile fish need.",
                        },
                    ]
                }
            ),
            "more.jsonl": json.dumps(
                {
                    "id": "acid",
                    "title": "Ocean Acidification and Reefs",
                    "doi": "10.9/acid",
                    "authors": ["P. H. Low"],
                    "year": 2019,
                    "text": "Ocean acidification slows the growth of coral reef skeletons. "
                    "Lower carbonate saturation makes building reefs harder.",
                }
            )
            + "\n",
            "unrelated.txt": "Sourdough bread needs a lively starter culture.\n",
        },
    )
    state = run_all("Write a report on coral reefs", make_config(tmp_path), corpus_dir=str(corpus))
    assert state.search is not None and state.draft is not None
    assert not state.search.corpus.sample
    assert state.search.corpus.documents == 4
    assert "sample corpus" not in state.draft.markdown
    ids = {r.source_id for r in state.draft.references}
    assert ids == {"bleaching.md", "records.json#1", "more.jsonl#acid"}
    assert "https://doi.org/10.9/acid" in state.draft.markdown
    body = state.draft.markdown.split("\n## References\n")[0]
    assert set(cited_numbers(body)) == {r.number for r in state.draft.references}


def test_a_prompt_without_a_subject_finds_nothing(tmp_path: Path) -> None:
    state = run_all("Write about it", make_config(tmp_path))
    assert state.search is not None and state.search.sources == []
    assert state.search.message is not None and "names no subject" in state.search.message


def test_every_agent_does_its_work_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPU work runs in a worker thread, so the loop stays responsive and timeouts can fire."""
    calls: list[str] = []
    real = asyncio.to_thread

    async def recording(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        calls.append(func.__name__)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", recording)
    ticks = 0

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    async def search_while_ticking() -> None:
        state = WorkflowState()
        state.intent = analyse(QUANTUM)
        state.plan = make_plan(state.intent)
        ctx = StageContext(
            session_id="t",
            stage="search",
            attempt=1,
            params=RunParameters(prompt=QUANTUM),
            state=state,
            config=make_config(tmp_path),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(ticker(stop))
        await default_agents(ctx.config)["search"](ctx)
        stop.set()
        await task

    asyncio.run(search_while_ticking())
    assert calls == ["run_search"]
    assert ticks > 1
    calls.clear()
    run_all(QUANTUM, make_config(tmp_path))
    assert calls == [
        "analyse",
        "make_plan",
        "run_search",
        "verify",
        "write_draft",
        "run_evaluation",
        "check_similarity",
    ]


def test_generic_topic_words_alone_do_not_qualify_a_document(tmp_path: Path) -> None:
    assert anchors_for(analyse("Write an essay on climate change and global warming")) == [
        "climate",
        "warming",
    ]
    assert anchors_for(analyse("Write an essay on global change")) == ["global", "change"]
    state = run_all("Write an essay about climate change and global warming", make_config(tmp_path))
    assert state.search is not None
    climate = {"hansen1988", "ipcc2021", "manabe1967", "mann1999", "keeling1960"}
    found = {s.source_id for s in state.search.sources}
    assert found and found <= {f"other_topics.json#{c}" for c in climate}


def test_a_very_long_prompt_is_planned_with_short_queries(tmp_path: Path) -> None:
    filler = " ".join(f"aspect{i} of qubits" for i in range(400))
    prompt = f"Write a report on quantum computing hardware, considering {filler}"
    state = run_all(prompt, make_config(tmp_path))
    assert state.plan is not None and state.draft is not None
    assert all(len(q.split()) <= 20 for q in state.plan.queries)
    assert len(state.plan.title.split()) <= 20
    assert state.draft.references


def test_a_custom_drafts_bibliography_and_numbered_list_are_understood(
    quantum_state: WorkflowState,
) -> None:
    draft, plan, verification = (
        quantum_state.draft,
        quantum_state.plan,
        quantum_state.verification,
    )
    assert draft and plan and verification
    body = draft.markdown.split("\n## References\n")[0]
    entries = "\n".join(f"{r.number}. {r.title}" for r in draft.references)
    custom = draft.model_copy(update={"markdown": f"{body}\n## Bibliography\n\n{entries}\n"})
    verified = {s.source_id for s in verification.verified}
    result = evaluate(custom, plan, verified, "research_paper", 0.75)
    assert result.score == 1.0
    similarity = check_similarity(custom.markdown, list(verification.verified))
    assert similarity.flagged == []


def test_winnowing_guarantees_a_shared_fingerprint_for_long_matches() -> None:
    """Schleimer et al.'s guarantee: a shared run of K + W - 1 tokens shares a fingerprint."""
    rng = random.Random(7)
    vocabulary = [f"w{i}" for i in range(50)]
    for _ in range(200):
        shared = [rng.choice(vocabulary) for _ in range(K + W - 1)]
        a = [rng.choice(vocabulary) for _ in range(rng.randrange(0, 30))] + shared
        b = shared + [rng.choice(vocabulary) for _ in range(rng.randrange(0, 30))]
        prints_a = {h for h, _ in winnow(kgram_hashes(a))}
        prints_b = {h for h, _ in winnow(kgram_hashes(b))}
        assert prints_a & prints_b
    assert kgram_hashes(["too", "short"]) == []
    assert winnow([]) == []


def test_the_document_does_not_depend_on_the_hash_seed(tmp_path: Path) -> None:
    """Set iteration order changes with PYTHONHASHSEED; the output must not."""
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from prowzi.agents import default_agents\n"
        "from prowzi.agents.base import RunParameters, StageContext\n"
        "from prowzi.agents.models import WorkflowState\n"
        "from prowzi.config import ProwziConfig\n"
        "from prowzi.workflows.stages import RESEARCH_STAGES\n"
        "config = ProwziConfig(index_dir=Path(sys.argv[1]), enable_telemetry=False)\n"
        "agents, state = default_agents(config), WorkflowState()\n"
        "params = RunParameters(prompt=sys.argv[2], evaluation_threshold=0.99,\n"
        "                       max_results_per_query=1)\n"
        "for spec in RESEARCH_STAGES:\n"
        "    ctx = StageContext(session_id='s', stage=spec.name, attempt=1, params=params,\n"
        "                       state=state, config=config)\n"
        "    for name, value in spec.unpack(asyncio.run(agents[spec.name](ctx))).items():\n"
        "        setattr(state, name, value)\n"
        "print(state.model_dump_json())\n"
    )
    outputs = []
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / seed), QUANTUM],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]
    assert '"revision":1' in outputs[0]


def test_parameters_win_and_the_configuration_is_the_fallback(tmp_path: Path) -> None:
    corpus = write_corpus(
        tmp_path / "own",
        {
            "qubits.md": "# Qubits\n\nA qubit is a quantum bit of information.\n",
        },
    )
    config = make_config(tmp_path)
    config.corpus_dir = corpus
    config.relevance_threshold = 0.9
    config.evaluation_threshold = 0.2
    state = WorkflowState()
    state.intent = analyse(QUANTUM)
    state.plan = make_plan(state.intent)
    bare = RunParameters(prompt=QUANTUM)
    search = run_stage("search", state, bare, config)
    assert isinstance(search, SearchAgentResult)
    assert search.corpus.path == str(corpus)
    state.search = search
    verification = run_stage("verification", state, bare, config)
    assert verification.relevance_threshold == 0.9  # type: ignore[attr-defined]
    explicit = RunParameters(
        prompt=QUANTUM, corpus_dir=str(sample_corpus_dir()), relevance_threshold=0.3
    )
    search = run_stage("search", state, explicit, config)
    assert isinstance(search, SearchAgentResult) and search.corpus.sample
    state.search = search
    verification = run_stage("verification", state, explicit, config)
    assert verification.relevance_threshold == 0.3  # type: ignore[attr-defined]


def test_sources_without_recorded_queries_are_still_used(quantum_state: WorkflowState) -> None:
    """A custom search agent may not say which query found a source."""
    assert quantum_state.verification and quantum_state.plan
    bare = [s.model_copy(update={"queries": []}) for s in quantum_state.verification.verified]
    draft = write_draft(quantum_state.intent, quantum_state.plan, bare)
    assert len(draft.references) >= 10
    # Issue 16: the conclusion names sources without citing them (no passage says it).
    assert all(s.citations for s in draft.sections[:-1])

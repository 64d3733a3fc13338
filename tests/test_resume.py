"""Resume: continue, fork on changed parameters, time travel, dry run, completed sessions."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from design_samples import reader_namespace, run_sample, sample
from pydantic import BaseModel
from recording import Recorder
from shared import PROMPT
from shared import STAGES as SHARED_STAGES

from prowzi.agents.base import StageContext
from prowzi.config import ProwziConfig
from prowzi.errors import (
    CheckpointNotFoundError,
    InvalidInputError,
    PermanentError,
    WorkflowFailedError,
)
from prowzi.events import StageCompleted, StageSkipped, WorkflowStarted
from prowzi.tracing import NullTracer
from prowzi.workflows import ProwziOrchestrator
from prowzi.workflows.checkpoint import CheckpointManager
from prowzi.workflows.telemetry import TelemetryCollector

STAGES = list(SHARED_STAGES)


async def broken_writer(ctx: StageContext) -> BaseModel:
    raise PermanentError("the writer is broken")


def make(
    tmp_path: Path, agents: dict[str, Any] | None = None, **settings: Any
) -> tuple[ProwziOrchestrator, Recorder]:
    config = ProwziConfig(
        enable_checkpointing=True,
        checkpoint_dir=tmp_path / "checkpoints",
        telemetry_dir=tmp_path / "telemetry",
        **settings,
    )
    recorder = Recorder()
    return ProwziOrchestrator(
        config=config, agents=agents, sinks=[recorder], tracer=NullTracer()
    ), recorder


@pytest.fixture(scope="module")
def reference_document(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("reference")
    orch, _ = make(tmp)
    return asyncio.run(orch.run_research(PROMPT)).document


def failed_session(tmp_path: Path, **settings: Any) -> str:
    orch, _ = make(tmp_path, {"writing": broken_writer}, **settings)
    with pytest.raises(WorkflowFailedError) as info:
        asyncio.run(orch.run_research(PROMPT, session_id="s-1"))
    assert info.value.stage == "writing"
    return "s-1"


def test_resume_after_failure_restores_completed_stages_and_matches_uninterrupted_run(
    tmp_path: Path, reference_document: str
) -> None:
    sid = failed_session(tmp_path)
    manager = CheckpointManager(tmp_path / "checkpoints")
    latest = manager.latest(sid)
    assert latest is not None and latest.completed_stages == STAGES[:4]
    orch, rec = make(tmp_path)
    result = asyncio.run(orch.resume_from_checkpoint(checkpoint_id=sid))
    assert result.metadata["session_id"] == sid
    assert result.document == reference_document
    skipped = [e for e in rec.events if isinstance(e, StageSkipped)]
    assert [e.stage for e in skipped] == STAGES[:4]
    assert all(e.details["checkpoint"] == f"{sid}_verification" for e in skipped)
    ran = [e.stage for e in rec.events if isinstance(e, StageCompleted)]
    assert ran == STAGES[4:]
    manager.verify_chain(sid)


def test_interval_above_one_still_saves_completed_stages_when_a_stage_fails(tmp_path: Path) -> None:
    sid = failed_session(tmp_path, checkpoint_interval=3)
    manager = CheckpointManager(tmp_path / "checkpoints")
    stages = sorted(row["stage"] for row in manager.list_checkpoints(session_id=sid))
    # interval 3 saves after search; verification completed later and is saved on failure
    assert stages == ["search", "verification"]
    assert manager.latest(sid).completed_stages == STAGES[:4]  # type: ignore[union-attr]


def test_changed_parameter_forks_and_reruns_only_affected_stages(
    tmp_path: Path,
) -> None:
    orch, _ = make(tmp_path)
    first = asyncio.run(orch.run_research(PROMPT, session_id="base"))
    plan = orch.plan_resume("base", relevance_threshold=0.5)
    assert plan.fork and plan.session_id != "base"
    assert plan.restored == ["intent", "planning", "search"]
    assert plan.rerun == ["verification", "writing", "evaluation", "turnitin"]
    reasons = {s.stage: s.reasons for s in plan.stages}
    assert reasons["verification"] == ["parameter relevance_threshold changed"]
    assert reasons["writing"] == ["input verification is recomputed"]
    orch2, rec = make(tmp_path)
    result = asyncio.run(orch2.resume_from_checkpoint("base", relevance_threshold=0.5))
    child = result.metadata["session_id"]
    assert child != "base" and result.metadata["parent_session_id"] == "base"
    assert result.metadata["parameters"]["relevance_threshold"] == 0.5
    assert [e.stage for e in rec.events if isinstance(e, StageCompleted)] == plan.rerun
    manager = CheckpointManager(tmp_path / "checkpoints")
    assert manager.latest(child).parent_session_id == "base"  # type: ignore[union-attr]
    manager.verify_chain(child)
    # the parent is untouched
    assert manager.latest("base").completed_stages == STAGES  # type: ignore[union-attr]
    assert first.document


def test_max_results_change_reruns_from_search(tmp_path: Path) -> None:
    orch, _ = make(tmp_path)
    asyncio.run(orch.run_research(PROMPT, session_id="base"))
    plan = orch.plan_resume("base", parameters={"max_results_per_query": "3"})
    assert plan.restored == ["intent", "planning"]
    assert plan.changed_parameters == {"max_results_per_query": (15, 3)}
    assert plan.fork_reason() == "its parameters change"


def test_dry_run_plans_without_running_or_writing(tmp_path: Path) -> None:
    sid = failed_session(tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    orch, rec = make(tmp_path)
    plan = orch.plan_resume(sid)
    assert not plan.fork and plan.rerun == STAGES[4:]
    text = "\n".join(plan.describe())
    assert "writing: run (not completed in the checkpoint)" in text
    assert "intent: restored from checkpoint" in text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert rec.events == []


def test_resuming_a_completed_session_returns_its_result_without_rerunning(
    tmp_path: Path, reference_document: str
) -> None:
    orch, _ = make(tmp_path)
    asyncio.run(orch.run_research(PROMPT, session_id="done"))
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    orch2, rec = make(tmp_path)
    result = asyncio.run(orch2.resume_from_checkpoint("done"))
    assert result.metadata["already_complete"] is True
    assert result.document == reference_document
    # nothing ran: the resume is recorded as every stage skipped (from the final checkpoint)
    kinds = [type(e).__name__ for e in rec.events]
    assert kinds == ["WorkflowStarted", *["StageSkipped"] * len(STAGES), "WorkflowCompleted"]
    skipped = [e for e in rec.events if isinstance(e, StageSkipped)]
    assert {e.details["checkpoint"] for e in skipped} == {"done_turnitin"}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == files
    telemetry = TelemetryCollector(tmp_path / "telemetry").load_session("done")
    assert telemetry.status == "completed" and telemetry.metadata["runs"] == 2


def test_time_travel_from_a_named_stage_forks(tmp_path: Path, reference_document: str) -> None:
    orch, _ = make(tmp_path)
    asyncio.run(orch.run_research(PROMPT, session_id="tt"))
    for checkpoint_id, stage in (("tt_search", None), ("tt", "search")):
        plan = orch.plan_resume(checkpoint_id, stage=stage)
        assert plan.fork and plan.restored == ["intent", "planning", "search"]
        assert plan.describe()[1] == (
            f"forks new session {plan.session_id} (parent tt): tt_search is older than the "
            "session's latest checkpoint (tt_turnitin), which stays as it is"
        )
    result = asyncio.run(orch.resume_from_checkpoint("tt_search"))
    assert result.metadata["parent_session_id"] == "tt"
    assert result.document == reference_document


def test_bad_resume_requests_are_refused(tmp_path: Path) -> None:
    orch, _ = make(tmp_path)
    with pytest.raises(CheckpointNotFoundError):
        orch.plan_resume("never-ran")
    asyncio.run(orch.run_research(PROMPT, session_id="ok"))
    with pytest.raises(InvalidInputError, match="unknown parameter"):
        orch.plan_resume("ok", parameters={"colour": "red"})
    with pytest.raises(InvalidInputError, match="max_results_per_query"):
        orch.plan_resume("ok", max_results_per_query=0)
    with pytest.raises(InvalidInputError):
        orch.plan_resume("../ok")
    with pytest.raises(InvalidInputError, match="unknown stage"):
        orch.plan_resume("ok", stage="polishing")


def test_checkpoint_interval_control_sample() -> None:
    ns = reader_namespace()
    ns["ProwziOrchestrator"] = ProwziOrchestrator  # imported by the document's first sample

    async def session() -> None:
        await run_sample(sample("Programmatic Configuration"), ns)
        await run_sample(sample("Checkpoint Interval Control"), ns)
        ns["result"] = await ns["orchestrator"].run_research(prompt=PROMPT)

    asyncio.run(session())
    assert ns["config"].checkpoint_interval == 2
    sid = ns["result"].metadata["session_id"]
    saved = sorted(p.stem.removeprefix(f"{sid}_") for p in Path("./my_checkpoints").glob("*.pkl"))
    # every 2 stages, and always at the end
    assert saved == sorted(["planning", "verification", "evaluation", "turnitin"])


def test_resuming_from_checkpoint_sample() -> None:
    # An interrupted session "abc123-def456" in the default checkpoint directory.
    config = ProwziConfig(enable_checkpointing=True)
    broken = ProwziOrchestrator(config=config, agents={"writing": broken_writer})
    with pytest.raises(WorkflowFailedError):
        asyncio.run(broken.run_research(PROMPT, session_id="abc123-def456"))
    ns = reader_namespace()

    async def session() -> None:
        await run_sample(sample("1. Running Workflows with Checkpoints"), ns)
        await run_sample(sample("2. Resuming from Checkpoint"), ns)

    asyncio.run(session())
    result = ns["result"]
    assert result.metadata["session_id"] == "abc123-def456"
    assert result.metadata["restored_stages"] == sorted(STAGES[:4])
    assert "## References" in result.document


def test_restored_stages_are_skipped_in_the_session_telemetry(tmp_path: Path) -> None:
    from prowzi.workflows.telemetry import TelemetryCollector

    sid = failed_session(tmp_path)
    orch, _ = make(tmp_path)
    asyncio.run(orch.resume_from_checkpoint(sid))
    metrics = TelemetryCollector(output_dir=tmp_path / "telemetry").load_session(sid)
    skipped = [s for s in metrics.stages if s.status == "skipped"]
    assert [s.stage for s in skipped] == STAGES[:4]
    assert all(s.details["checkpoint"] == f"{sid}_verification" for s in skipped)
    assert metrics.success is True
    assert [s.stage for s in metrics.stages if s.status == "completed"][-3:] == STAGES[-3:]


def test_a_complete_session_whose_document_was_not_written_can_get_it(tmp_path: Path) -> None:
    from prowzi.errors import OutputError

    orch, _ = make(tmp_path)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    with pytest.raises(OutputError, match=str(blocked / "doc.md")):
        asyncio.run(orch.run_research(PROMPT, session_id="nodoc", document_path=blocked / "doc.md"))
    latest = CheckpointManager(tmp_path / "checkpoints").latest("nodoc")
    assert latest is not None and latest.completed_stages == STAGES  # nothing was lost
    target = tmp_path / "ok.md"
    result = asyncio.run(orch.resume_from_checkpoint("nodoc", document_path=target))
    assert result.metadata["already_complete"] is True
    assert target.read_text(encoding="utf-8") == result.document
    assert {"duration_seconds", "completed_stages", "session_id"} <= result.metadata.keys()


def test_a_no_op_resume_that_cannot_write_its_document_records_nothing(tmp_path: Path) -> None:
    from prowzi.errors import OutputError

    orch, _ = make(tmp_path)
    asyncio.run(orch.run_research(PROMPT, session_id="kept"))
    orch2, rec = make(tmp_path)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    with pytest.raises(OutputError):
        asyncio.run(orch2.resume_from_checkpoint("kept", document_path=blocked / "doc.md"))
    assert rec.events == []
    telemetry = TelemetryCollector(tmp_path / "telemetry").load_session("kept")
    assert telemetry.status == "completed" and telemetry.metadata["runs"] == 1


def test_a_no_op_resume_records_the_parameters_its_result_was_made_with(
    tmp_path: Path,
) -> None:
    """A change no stage reads leaves nothing to run: the session is recorded with the
    parameters its checkpoints were made with, not the unused new ones."""
    import dataclasses

    from prowzi.workflows.stages import RESEARCH_STAGES

    deaf = tuple(dataclasses.replace(spec, params=()) for spec in RESEARCH_STAGES)
    orch, _ = make(tmp_path)
    asyncio.run(orch.run_research(PROMPT, session_id="deaf"))
    config = orch.config
    rec = Recorder()
    again = ProwziOrchestrator(config=config, stages=deaf, sinks=[rec], tracer=NullTracer())
    plan = again.plan_resume("deaf", parameters={"max_results_per_query": 7})
    assert plan.complete and not plan.fork
    result = asyncio.run(again.resume_from_checkpoint("deaf", max_results_per_query=7))
    assert result.metadata["parameters"]["max_results_per_query"] == 15
    started = [e for e in rec.events if isinstance(e, WorkflowStarted)]
    assert [e.parameters["max_results_per_query"] for e in started] == [15]


def test_an_existing_session_is_never_overwritten(tmp_path: Path) -> None:
    orch, _ = make(tmp_path)
    asyncio.run(orch.run_research(PROMPT, session_id="taken"))
    asyncio.run(orch.run_research("Write about AI safety", session_id="other"))
    with pytest.raises(InvalidInputError, match="session taken already exists"):
        asyncio.run(orch.run_research("something else", session_id="taken"))
    with pytest.raises(InvalidInputError, match="session other already exists"):
        orch.plan_resume("taken", max_results_per_query=4, fork_session_id="other")
    manager = CheckpointManager(tmp_path / "checkpoints")
    manager.verify_chain("other")
    assert manager.load_checkpoint("other").metadata.prompt == "Write about AI safety"


def test_cancelled_while_a_completion_is_delivered_keeps_that_stage(tmp_path: Path) -> None:
    async def cancel_after_planning(stage: str, payload: dict[str, Any]) -> None:
        if stage == "planning" and payload["status"] == "completed":
            raise asyncio.CancelledError

    orch, _ = make(tmp_path)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(
            orch.run_research(PROMPT, session_id="cx", progress_callback=cancel_after_planning)
        )
    latest = CheckpointManager(tmp_path / "checkpoints").latest("cx")
    assert latest is not None and latest.completed_stages == ["intent", "planning"]


class FlakyDisk(CheckpointManager):
    """Refuses the save of ``stage`` ``times`` times, as a full disk would."""

    def __init__(self, directory: Path, stage: str, times: int) -> None:
        super().__init__(directory)
        self.refuse, self.times = stage, times

    def save(self, **kwargs: Any) -> Any:
        if kwargs["stage"] == self.refuse and self.times > 0:
            self.times -= 1
            raise OSError(28, "No space left on device")
        return super().save(**kwargs)


@pytest.mark.parametrize(("times", "unsaved"), [(1, None), (5, ["turnitin"])])
def test_a_failed_final_save_is_tried_again_and_reported_if_it_still_fails(
    tmp_path: Path, times: int, unsaved: list[str] | None
) -> None:
    config = ProwziConfig(
        enable_checkpointing=True, checkpoint_dir=tmp_path / "cp", enable_telemetry=False
    )
    manager = FlakyDisk(tmp_path / "cp", "turnitin", times)
    orch = ProwziOrchestrator(config=config, checkpoint_manager=manager, tracer=NullTracer())
    result = asyncio.run(orch.run_research(PROMPT, session_id="disk"))
    assert result.metadata.get("unsaved_stages") == unsaved
    latest = CheckpointManager(tmp_path / "cp").latest("disk")
    assert latest is not None
    assert latest.stage == ("turnitin" if unsaved is None else "evaluation")


def test_rerunning_a_stage_that_revised_its_input_reruns_that_inputs_producer(
    tmp_path: Path,
) -> None:
    orch, _ = make(tmp_path)
    asyncio.run(orch.run_research(PROMPT, session_id="eval"))
    plan = orch.plan_resume("eval", evaluation_threshold=0.99)
    assert plan.restored == ["intent", "planning", "search", "verification"]
    assert plan.rerun == ["writing", "evaluation", "turnitin"]
    reasons = {s.stage: s.reasons for s in plan.stages}
    assert reasons["writing"] == ["evaluation re-runs and replaced its draft in the checkpoint"]
    forked = asyncio.run(orch.resume_from_checkpoint("eval", evaluation_threshold=0.99))

    fresh_orch, _ = make(tmp_path / "fresh", evaluation_threshold=0.99)
    fresh = asyncio.run(fresh_orch.run_research(PROMPT))
    assert forked.document == fresh.document
    assert forked.initial_evaluation == fresh.initial_evaluation


def test_the_checkpoint_records_where_the_run_writes_and_a_resume_cannot_change_it(
    tmp_path: Path,
) -> None:
    """The output path is a verified field of the checkpoint (telemetry is never trusted for
    a write target); it is not a parameter a resume may change, and a fork records its own."""
    orch, _ = make(tmp_path, {"writing": broken_writer})
    with pytest.raises(WorkflowFailedError):
        asyncio.run(orch.run_research(PROMPT, session_id="w", document_path="papers/w.md"))
    manager = CheckpointManager(tmp_path / "checkpoints")
    assert manager.latest("w").parameters["output_path"] == "papers/w.md"  # type: ignore[union-attr]
    assert orch.plan_resume("w").output_path == "papers/w.md"
    with pytest.raises(InvalidInputError, match="unknown parameter"):
        orch.plan_resume("w", parameters={"output_path": "victim.cfg"})
    resumed, _ = make(tmp_path)
    result = asyncio.run(
        resumed.resume_from_checkpoint(
            "w", parameters={"max_results_per_query": 3}, document_path=tmp_path / "fork.md"
        )
    )
    fork = result.metadata["session_id"]
    assert manager.latest(fork).parameters["output_path"] == str(tmp_path / "fork.md")  # type: ignore[union-attr]
    assert (tmp_path / "fork.md").is_file()

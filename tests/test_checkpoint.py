"""CheckpointManager: format, chain, listing, sidecars, signing, versions, ids, locks, cleanup."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from design_samples import reader_namespace, run_sample, sample
from test_checkpoint_support import (
    STAGES,
    body_of,
    full_state,
    held_in_child,
    params,
    rewrite,
    save_run,
    split,
    state_after,
)

from prowzi import __version__
from prowzi.agents import models as m
from prowzi.config import ProwziConfig
from prowzi.errors import (
    CheckpointIntegrityError,
    CheckpointNotFoundError,
    InvalidIdentifierError,
    InvalidInputError,
    SessionLockedError,
)
from prowzi.workflows import checkpoint as cp
from prowzi.workflows.checkpoint import (
    FORMAT_VERSION,
    CheckpointManager,
    CheckpointMetadata,
    WorkflowCheckpoint,
)
from prowzi.workflows.storage import InMemoryStore, LocalDirectoryStore

SESSION = "20261126-143501-9f3a1c2b"


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"


@pytest.fixture
def manager(directory: Path) -> CheckpointManager:
    return CheckpointManager(directory)


# --- format -----------------------------------------------------------------------------


def test_save_writes_a_pkl_and_a_json_named_after_session_and_stage(
    manager: CheckpointManager, directory: Path
) -> None:
    meta = manager.save(
        session_id=SESSION,
        stage="intent",
        state=state_after("intent"),
        completed_stages=["intent"],
        parameters=params(),
    )
    assert meta.checkpoint_id == f"{SESSION}_intent"
    assert (directory / f"{SESSION}_intent.pkl").is_file()  # durable when save returns
    manager.flush()  # the .json is derived, and written in the background
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) == [
        f"{SESSION}_intent.json",
        f"{SESSION}_intent.pkl",
    ]
    sidecar = orjson.loads((directory / f"{SESSION}_intent.json").read_bytes())
    assert sidecar == meta.model_dump(mode="json")


def test_metadata_records_what_the_issue_lists(manager: CheckpointManager) -> None:
    before = datetime.now(UTC)
    meta = manager.save(
        session_id=SESSION,
        stage="planning",
        state=state_after("planning"),
        completed_stages=["intent", "planning"],
        parameters=params(max_results_per_query=30),
        trace_id="ab" * 16,
        span_id="cd" * 8,
    )
    header, body = split(manager.checkpoint_dir / f"{SESSION}_planning.pkl")
    assert header == meta.model_dump(mode="json")
    assert meta.session_id == SESSION and meta.stage == "planning"
    assert meta.completed_stages == ["intent", "planning"]
    assert meta.created_at.tzinfo is not None and before <= meta.created_at <= datetime.now(UTC)
    assert meta.prompt == params().prompt
    assert meta.parameters == params(max_results_per_query=30).model_dump()
    assert meta.prowzi_version == __version__
    assert meta.format_version == FORMAT_VERSION == 2
    assert meta.compression == "none"
    assert meta.previous_hash is None
    assert meta.signed is False
    assert (meta.trace_id, meta.span_id) == ("ab" * 16, "cd" * 8)
    assert len(body) == meta.payload_size
    assert hashlib.sha256(body).hexdigest() == meta.payload_sha256


def test_the_pkl_is_not_a_pickle(manager: CheckpointManager) -> None:
    save_run(manager, SESSION, ("intent",))
    raw = (manager.checkpoint_dir / f"{SESSION}_intent.pkl").read_bytes()
    assert raw.startswith(cp.MAGIC)
    assert b"\x80" not in raw[:2]


def test_a_loaded_checkpoint_equals_the_saved_state(manager: CheckpointManager) -> None:
    state = full_state()
    meta = manager.save(
        session_id=SESSION,
        stage="turnitin",
        state=state,
        completed_stages=list(STAGES),
        parameters=params(),
    )
    loaded = manager.load_checkpoint(f"{SESSION}_turnitin")
    assert isinstance(loaded, WorkflowCheckpoint)
    assert loaded.metadata == meta
    assert loaded.to_state() == state
    assert loaded.draft == state.draft
    assert loaded.initial_evaluation == state.initial_evaluation
    assert loaded.stage_metrics == state.stage_metrics


def test_stage_metrics_with_values_orjson_cannot_encode_still_save(
    manager: CheckpointManager,
) -> None:
    state = state_after("intent").model_copy(update={"stage_metrics": {"big": 2**70}})
    manager.save(
        session_id=SESSION,
        stage="intent",
        state=state,
        completed_stages=["intent"],
        parameters=params(),
    )
    assert manager.load_checkpoint(SESSION).stage_metrics == {"big": 2**70}


def save_complete(manager: CheckpointManager, state: m.WorkflowState) -> None:
    """Save ``state`` as the checkpoint after the last stage of a complete run."""
    manager.save(
        session_id=SESSION,
        stage="turnitin",
        state=state,
        completed_stages=list(STAGES),
        parameters=params(),
    )


def verified_state() -> m.WorkflowState:
    """The full state with four search sources: three verified (the search's own objects, as
    the verification agent keeps them) and one rejected."""
    state = full_state()
    assert state.search is not None
    first = state.search.sources[0]
    sources = [first, *(first.model_copy(update={"source_id": f"corpus/{i}.md"}) for i in "abc")]
    verification = m.VerificationAgentResult(
        verified=sources[:3],
        rejected=[m.RejectedSource(source=sources[3], reasons=["off topic"])],
        relevance_threshold=0.15,
    )
    search = state.search.model_copy(update={"sources": sources})
    return state.model_copy(update={"search": search, "verification": verification})


def _unshared(doc: dict[str, Any]) -> dict[str, Any]:
    """A format 2 state document with every source index replaced by the source it names."""
    verification, search = doc.get("verification"), doc.get("search")
    if verification is not None:
        pool = search["sources"] if search is not None else []
        verification["verified"] = [
            pool[v] if isinstance(v, int) else v for v in verification["verified"]
        ]
        for rejected in verification["rejected"]:
            if isinstance(rejected["source"], int):
                rejected["source"] = pool[rejected["source"]]
    return doc


def test_the_fast_state_encoding_is_model_dump_with_shared_sources_written_once(
    manager: CheckpointManager,
) -> None:
    # _dump_state hands orjson the models' __dict__: apart from the sources it shares, it
    # must be model_dump's JSON exactly (the slow path writes that, and format 1 did).
    state = verified_state().model_copy(update={"stage_metrics": {"intent": {"when": 1.5}}})
    encoded = cp._dump_state(state)
    assert _unshared(orjson.loads(encoded)) == state.model_dump()
    assert len(encoded) < 0.9 * len(orjson.dumps(state.model_dump()))
    for stage in STAGES[:3]:  # nothing to share before verification: byte for byte
        partial = state_after(stage)
        assert cp._dump_state(partial) == orjson.dumps(partial.model_dump())
    assert m.WorkflowState in cp._PLAIN_MODELS and m.Source in cp._PLAIN_MODELS


def test_verified_sources_are_the_search_sources_again_after_a_load(
    manager: CheckpointManager,
) -> None:
    """In a run, verification keeps the search's Source objects; a checkpoint writes each once
    and a load gives back one object per source, shared as it was."""
    state = verified_state()
    assert state.search is not None and state.verification is not None
    copied = state.verification.verified[0].model_copy()  # equal, but not the search's own
    verification = state.verification.model_copy(
        update={"verified": [copied, *state.verification.verified[1:]]}
    )
    state = state.model_copy(update={"verification": verification})
    save_complete(manager, state)
    body = body_of(manager.checkpoint_dir / f"{SESSION}_turnitin.pkl")["state"]["verification"]
    assert isinstance(body["verified"][0], dict)  # a distinct object stays distinct
    assert all(isinstance(v, int) for v in body["verified"][1:])
    assert all(isinstance(r["source"], int) for r in body["rejected"])
    loaded = manager.load_checkpoint(SESSION)
    assert loaded.to_state() == state
    assert loaded.search is not None and loaded.verification is not None
    loaded_sources = loaded.search.sources
    assert all(any(v is s for s in loaded_sources) for v in loaded.verification.verified[1:])
    assert not any(loaded.verification.verified[0] is s for s in loaded_sources)
    assert all(any(r.source is s for s in loaded_sources) for r in loaded.verification.rejected)
    assert type(loaded.verification) is m.VerificationAgentResult
    assert type(loaded.verification.rejected[0]) is m.RejectedSource
    # The rebuilt models behave as validated ones do.
    assert loaded.verification.model_fields_set == verification.model_fields_set
    assert loaded.verification.rejected[0].model_fields_set == {"source", "reasons"}
    assert loaded.verification.model_dump() == verification.model_dump()
    assert m.VerificationAgentResult.model_validate(loaded.verification) == verification
    changed = loaded.verification.model_copy(update={"relevance_threshold": 0.5})
    assert changed.relevance_threshold == 0.5 and changed.verified == verification.verified
    assert "relevance_threshold=0.15" in repr(loaded.verification)


def test_only_the_state_s_own_verification_shares_sources(manager: CheckpointManager) -> None:
    """A verification result elsewhere (stage_metrics holds anything) is written in full."""
    state = verified_state()
    state = state.model_copy(update={"stage_metrics": {"copy": state.verification}})
    save_complete(manager, state)
    loaded = manager.load_checkpoint(SESSION)
    assert state.verification is not None
    assert loaded.stage_metrics == {"copy": state.verification.model_dump()}
    assert loaded.verification == state.verification


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"trace_id": 5}, "invalid trace_id 5: not a string"),
        ({"span_id": b"x"}, "invalid span_id b'x': not a string"),
        ({"parameters": {"prompt": "p"}}, "parameters must be RunParameters"),
    ],
)
def test_a_save_refuses_values_its_header_cannot_hold(
    manager: CheckpointManager, change: dict[str, Any], match: str
) -> None:
    arguments: dict[str, Any] = {
        "session_id": SESSION,
        "stage": "intent",
        "state": state_after("intent"),
        "completed_stages": ["intent"],
        "parameters": params(),
    }
    with pytest.raises(InvalidInputError, match=match):
        manager.save(**{**arguments, **change})
    manager.compression = "lz4"  # type: ignore[assignment]
    with pytest.raises(InvalidInputError, match="unknown compression 'lz4'"):
        manager.save(**arguments)
    assert manager.list_checkpoints() == []


def test_a_format_1_checkpoint_loads_and_chains(manager: CheckpointManager) -> None:
    """Format 1 wrote every source in full: such a file still loads, lists and verifies."""
    save_run(manager, SESSION, ("intent", "planning", "search", "verification"))
    path = manager.checkpoint_dir / f"{SESSION}_verification.pkl"
    body = body_of(path)
    body["state"] = _unshared(body["state"])
    rewrite(path, header={"format_version": 1}, body=orjson.dumps(body))
    # Indexed as the older Prowzi did (its header, format 1, in the index): listed as
    # migrated, as every load sees it.
    index = LocalDirectoryStore(manager.checkpoint_dir)
    index.list()
    index.remember(path.name, index.token(path.name) or "", split(path)[0])
    older = CheckpointManager(manager.checkpoint_dir)
    assert [r["format_version"] for r in older.list_checkpoints()] == [FORMAT_VERSION] * 4
    assert older.load_checkpoint(SESSION).to_state() == state_after("verification")
    older.verify_chain(SESSION)


class _Annotated(m.Source):
    """A subclass with a field the declared type lacks: model_dump leaves it out."""

    note: str = "kept out"


def test_values_the_fast_encoding_does_not_know_take_the_slow_path(
    manager: CheckpointManager,
) -> None:
    state = full_state()
    assert state.search is not None
    source = _Annotated(**state.search.sources[0].model_dump())
    search = state.search.model_copy(update={"sources": [source, *state.search.sources[1:]]})
    metrics = {"model": m.CorpusInfo(path="/c", documents=1, fingerprint="f"), "set": {1}}
    odd = state.model_copy(update={"search": search, "stage_metrics": metrics})
    # The subclass is written as its declared type, and the set as a list, as pydantic does.
    assert cp._dump_state(odd) == odd.model_dump_json().encode()
    assert b"kept out" not in cp._dump_state(odd)
    save_complete(manager, odd)
    loaded = manager.load_checkpoint(SESSION)
    assert loaded.search is not None and loaded.search.sources == state.search.sources
    assert loaded.stage_metrics == {
        "model": {"path": "/c", "documents": 1, "fingerprint": "f", "sample": False},
        "set": [1],
    }


def test_zlib_compression_is_recorded_and_round_trips(directory: Path) -> None:
    manager = CheckpointManager(directory, compression="zlib")
    state = full_state()
    meta = manager.save(
        session_id=SESSION,
        stage="turnitin",
        state=state,
        completed_stages=list(STAGES),
        parameters=params(),
    )
    assert meta.compression == "zlib"
    assert meta.payload_size < len(state.model_dump_json())
    assert CheckpointManager(directory).load_checkpoint(SESSION).to_state() == state


def test_an_unknown_compression_is_refused(directory: Path) -> None:
    with pytest.raises(ValueError, match="compression"):
        CheckpointManager(directory, compression="lz4")  # type: ignore[arg-type]


def test_an_in_memory_store_serves_the_manager_too(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "unused", store=InMemoryStore())
    save_run(manager, SESSION)
    assert manager.load_checkpoint(SESSION).metadata.stage == "turnitin"
    assert len(manager.list_checkpoints()) == 7
    manager.verify_chain(SESSION)
    assert not (tmp_path / "unused").exists()


# --- loading by id ----------------------------------------------------------------------


def test_a_bare_session_id_loads_the_latest_checkpoint(manager: CheckpointManager) -> None:
    save_run(manager, SESSION, STAGES[:3])
    assert manager.load_checkpoint(SESSION).metadata.stage == "search"


def test_a_stage_can_be_named_in_the_id_or_as_an_argument(manager: CheckpointManager) -> None:
    save_run(manager, SESSION, STAGES[:3])
    assert manager.load_checkpoint(f"{SESSION}_intent").metadata.stage == "intent"
    assert manager.load_checkpoint(SESSION, stage="planning").plan is not None
    assert manager.load_checkpoint(f"{SESSION}_planning", "planning").metadata.stage == "planning"
    with pytest.raises(InvalidInputError, match="names stage"):
        manager.load_checkpoint(f"{SESSION}_planning", "search")


def test_missing_checkpoints_raise_not_found(manager: CheckpointManager) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint for session"):
        manager.load_checkpoint("nosuchsession")
    save_run(manager, SESSION, ("intent", "planning"))
    with pytest.raises(CheckpointNotFoundError) as info:
        manager.load_checkpoint(SESSION, stage="search")
    assert str(info.value) == (
        f"no checkpoint {SESSION}_search in {manager.checkpoint_dir}; "
        f"session {SESSION} has checkpoints of intent, planning"
    )


def test_latest_returns_the_newest_metadata_or_none(manager: CheckpointManager) -> None:
    assert manager.latest(SESSION) is None
    saved = save_run(manager, SESSION, STAGES[:2])
    assert manager.latest(SESSION) == saved[-1]


# --- hash chain -------------------------------------------------------------------------


def test_each_checkpoint_links_to_the_previous_ones_hash(manager: CheckpointManager) -> None:
    saved = save_run(manager, SESSION)
    assert saved[0].previous_hash is None
    for before, after in itertools.pairwise(saved):
        assert after.previous_hash == before.payload_sha256
    manager.verify_chain(SESSION)


def test_the_chain_skips_stages_without_a_checkpoint(manager: CheckpointManager) -> None:
    # checkpoint_interval=2: checkpoints after planning and verification only
    first = manager.save(
        session_id=SESSION,
        stage="planning",
        state=state_after("planning"),
        completed_stages=["intent", "planning"],
        parameters=params(),
    )
    second = manager.save(
        session_id=SESSION,
        stage="verification",
        state=state_after("verification"),
        completed_stages=list(STAGES[:4]),
        parameters=params(),
    )
    assert second.previous_hash == first.payload_sha256
    manager.verify_chain(SESSION)


def test_a_fork_chains_onto_its_parent(manager: CheckpointManager) -> None:
    parent = save_run(manager, SESSION, STAGES[:3])
    fork = "fork-1"
    first = manager.save(
        session_id=fork,
        stage="verification",
        state=state_after("verification"),
        completed_stages=list(STAGES[:4]),
        parameters=params(relevance_threshold=0.3),
        parent_session_id=SESSION,
        previous_hash=parent[-1].payload_sha256,
    )
    second = manager.save(
        session_id=fork,
        stage="writing",
        state=state_after("writing"),
        completed_stages=list(STAGES[:5]),
        parameters=params(relevance_threshold=0.3),
        parent_session_id=SESSION,
    )
    assert first.parent_session_id == SESSION
    assert second.previous_hash == first.payload_sha256
    manager.verify_chain(fork)
    assert manager.load_checkpoint(f"{fork}_verification").metadata.previous_hash == (
        parent[-1].payload_sha256
    )
    # the parent's checkpoint it links to is replaced: the fork's chain is broken
    manager.save(
        session_id=SESSION,
        stage="search",
        state=state_after("search").model_copy(update={"stage_metrics": {"x": 1}}),
        completed_stages=list(STAGES[:3]),
        parameters=params(),
    )
    with pytest.raises(CheckpointIntegrityError, match=f"parent session {SESSION}"):
        manager.verify_chain(fork)
    # ...but a parent that was cleaned up altogether leaves the fork verifiable
    for path in manager.checkpoint_dir.glob(f"{SESSION}_*"):
        path.unlink()
    manager.verify_chain(fork)


def test_a_malformed_previous_hash_is_refused(manager: CheckpointManager) -> None:
    with pytest.raises(InvalidInputError, match="previous_hash"):
        manager.save(
            session_id=SESSION,
            stage="intent",
            state=state_after("intent"),
            completed_stages=["intent"],
            parameters=params(),
            previous_hash="../../etc",
        )


def test_verify_chain_detects_a_missing_link(manager: CheckpointManager) -> None:
    save_run(manager, SESSION, STAGES[:3])
    (manager.checkpoint_dir / f"{SESSION}_planning.pkl").unlink()
    with pytest.raises(CheckpointIntegrityError, match="chain broken"):
        manager.verify_chain(SESSION)
    with pytest.raises(CheckpointIntegrityError, match="chain broken"):
        manager.load_checkpoint(f"{SESSION}_search")


def test_a_chain_whose_oldest_checkpoints_were_pruned_still_verifies(
    manager: CheckpointManager,
) -> None:
    save_run(manager, SESSION, STAGES[:3])
    (manager.checkpoint_dir / f"{SESSION}_intent.pkl").unlink()
    manager.verify_chain(SESSION)
    assert manager.load_checkpoint(f"{SESSION}_planning").plan is not None


def test_verify_chain_verifies_every_file(manager: CheckpointManager) -> None:
    save_run(manager, SESSION, STAGES[:3])
    path = manager.checkpoint_dir / f"{SESSION}_intent.pkl"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointIntegrityError, match="sha256"):
        manager.verify_chain(SESSION)


def test_verify_chain_of_an_unknown_session_raises_not_found(manager: CheckpointManager) -> None:
    with pytest.raises(CheckpointNotFoundError):
        manager.verify_chain("nobody")


def test_a_replayed_older_checkpoint_of_the_same_stage_breaks_the_chain(
    manager: CheckpointManager,
) -> None:
    save_run(manager, SESSION, STAGES[:2])
    planning = manager.checkpoint_dir / f"{SESSION}_planning.pkl"
    old_planning = planning.read_bytes()
    save_run(manager, SESSION, STAGES[:3])  # a second run rewrites all three
    planning.write_bytes(old_planning)
    with pytest.raises(CheckpointIntegrityError, match="chain"):
        manager.verify_chain(SESSION)


# --- sidecar .json ----------------------------------------------------------------------


def test_a_missing_json_is_regenerated_and_never_hides_the_checkpoint(
    manager: CheckpointManager,
) -> None:
    (meta,) = save_run(manager, SESSION, ("intent",))
    sidecar = manager.checkpoint_dir / f"{SESSION}_intent.json"
    sidecar.unlink()
    assert [
        c["checkpoint_id"] for c in CheckpointManager(manager.checkpoint_dir).list_checkpoints()
    ] == [meta.checkpoint_id]
    manager.load_checkpoint(SESSION)
    assert orjson.loads(sidecar.read_bytes()) == meta.model_dump(mode="json")


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"prompt": "an older prompt"}'])
def test_a_stale_or_torn_json_is_regenerated(manager: CheckpointManager, content: bytes) -> None:
    (meta,) = save_run(manager, SESSION, ("intent",))
    sidecar = manager.checkpoint_dir / f"{SESSION}_intent.json"
    sidecar.write_bytes(content)
    manager.load_checkpoint(SESSION)
    assert orjson.loads(sidecar.read_bytes()) == meta.model_dump(mode="json")


def test_a_json_of_an_earlier_save_of_the_same_stage_is_regenerated(
    manager: CheckpointManager,
) -> None:
    save_run(manager, SESSION, ("intent",))
    sidecar = manager.checkpoint_dir / f"{SESSION}_intent.json"
    old = sidecar.read_bytes()
    (meta,) = save_run(manager, SESSION, ("intent",))
    sidecar.write_bytes(old)
    manager.load_checkpoint(SESSION)
    assert orjson.loads(sidecar.read_bytes()) == meta.model_dump(mode="json")


# --- signing ----------------------------------------------------------------------------


def test_with_a_key_checkpoints_are_signed_and_verified(directory: Path) -> None:
    manager = CheckpointManager(directory, key="s3cret")
    (meta,) = save_run(manager, SESSION, ("intent",))
    assert meta.signed
    assert CheckpointManager(directory, key=b"s3cret").load_checkpoint(SESSION).intent is not None


def test_with_a_key_an_unsigned_checkpoint_is_refused(directory: Path) -> None:
    save_run(CheckpointManager(directory), SESSION, ("intent",))
    with pytest.raises(CheckpointIntegrityError, match="unsigned") as info:
        CheckpointManager(directory, key="s3cret").load_checkpoint(SESSION)
    assert info.value.path.endswith(f"{SESSION}_intent.pkl")


def test_a_checkpoint_signed_with_another_key_is_refused(directory: Path) -> None:
    save_run(CheckpointManager(directory, key="one key"), SESSION, ("intent",))
    with pytest.raises(CheckpointIntegrityError, match="HMAC"):
        CheckpointManager(directory, key="another key").load_checkpoint(SESSION)


def test_a_forger_without_the_key_cannot_re_sign_an_altered_checkpoint(directory: Path) -> None:
    save_run(CheckpointManager(directory, key="s3cret"), SESSION, ("intent",))
    path = directory / f"{SESSION}_intent.pkl"
    rewrite(path, header={"prompt": "something else"}, key=b"guessed")
    with pytest.raises(CheckpointIntegrityError, match="HMAC"):
        CheckpointManager(directory, key="s3cret").load_checkpoint(SESSION)


def test_a_signed_checkpoint_still_loads_without_a_key(directory: Path) -> None:
    save_run(CheckpointManager(directory, key="s3cret"), SESSION, ("intent",))
    assert CheckpointManager(directory).load_checkpoint(SESSION).metadata.signed


def test_from_config_honours_the_checkpoint_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROWZI_CHECKPOINT_DIR", str(tmp_path / "from-env"))
    monkeypatch.setenv("PROWZI_CHECKPOINT_KEY", "env key")
    monkeypatch.setenv("PROWZI_CHECKPOINT_COMPRESSION", "zlib")
    monkeypatch.setenv("PROWZI_CHECKPOINT_FSYNC", "false")
    manager = CheckpointManager.from_config(ProwziConfig())
    assert manager.checkpoint_dir == tmp_path / "from-env"
    assert (manager.compression, manager.fsync) == ("zlib", False)
    (meta,) = save_run(manager, SESSION, ("intent",))
    assert meta.signed and meta.compression == "zlib"
    with pytest.raises(CheckpointIntegrityError, match="HMAC"):
        CheckpointManager(tmp_path / "from-env", key="other").load_checkpoint(SESSION)


def test_an_empty_key_is_refused(directory: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        CheckpointManager(directory, key="")


# --- format versions --------------------------------------------------------------------


def test_a_newer_format_is_refused_with_a_clear_message(manager: CheckpointManager) -> None:
    save_run(manager, SESSION, ("intent",))
    newer = FORMAT_VERSION + 1
    rewrite(manager.checkpoint_dir / f"{SESSION}_intent.pkl", header={"format_version": newer})
    with pytest.raises(CheckpointIntegrityError, match=rf"format {newer} by a newer Prowzi.*upgr"):
        manager.load_checkpoint(SESSION)


def test_an_older_format_is_migrated_on_load(
    manager: CheckpointManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A made-up format 0 that called the draft 'document': its migration renames it."""
    save_run(manager, SESSION, ("writing",))
    path = manager.checkpoint_dir / f"{SESSION}_writing.pkl"
    body = body_of(path)
    body["state"]["document"] = body["state"].pop("draft")
    rewrite(path, header={"format_version": 0}, body=orjson.dumps(body))

    def rename_document(body: dict[str, Any]) -> dict[str, Any]:
        body["state"]["draft"] = body["state"].pop("document")
        return body

    with pytest.raises(CheckpointIntegrityError, match="older than any this Prowzi can migrate"):
        manager.load_checkpoint(SESSION)
    monkeypatch.setitem(cp._MIGRATIONS, 0, cp.Migration(body=rename_document))
    upgraded = CheckpointManager(manager.checkpoint_dir)
    assert [r["format_version"] for r in upgraded.list_checkpoints()] == [FORMAT_VERSION]
    loaded = upgraded.load_checkpoint(SESSION)
    assert loaded.metadata.format_version == FORMAT_VERSION
    assert loaded.draft == state_after("writing").draft


# --- listing ----------------------------------------------------------------------------


def test_list_checkpoints_is_newest_first_with_metadata(manager: CheckpointManager) -> None:
    save_run(manager, "older", STAGES[:2])
    save_run(manager, SESSION, STAGES[:3])
    rows = manager.list_checkpoints()
    assert [r["checkpoint_id"] for r in rows] == [
        f"{SESSION}_search",
        f"{SESSION}_planning",
        f"{SESSION}_intent",
        "older_planning",
        "older_intent",
    ]
    first = rows[0]
    assert {"checkpoint_id", "session_id", "stage", "created_at"} <= set(first)
    assert set(first) == set(CheckpointMetadata.model_fields)
    assert isinstance(first["created_at"], datetime) and first["created_at"].tzinfo is not None


def test_list_checkpoints_filters_by_session_stage_and_time(manager: CheckpointManager) -> None:
    save_run(manager, "older", STAGES[:2])
    time.sleep(0.01)
    middle = datetime.now(UTC)
    save_run(manager, SESSION, STAGES[:3])
    assert {r["session_id"] for r in manager.list_checkpoints(session_id="older")} == {"older"}
    assert [r["session_id"] for r in manager.list_checkpoints(stage="planning")] == [
        SESSION,
        "older",
    ]
    assert {r["session_id"] for r in manager.list_checkpoints(since=middle)} == {SESSION}
    naive_local = middle.astimezone().replace(tzinfo=None)
    assert len(manager.list_checkpoints(since=naive_local)) == 3
    assert (
        manager.list_checkpoints(session_id=SESSION, stage="search", since=middle)[0]["stage"]
        == "search"
    )


def test_listing_returns_copies(manager: CheckpointManager) -> None:
    save_run(manager, SESSION, ("intent",))
    manager.list_checkpoints()[0]["stage"] = "changed"
    assert manager.list_checkpoints()[0]["stage"] == "intent"


def test_listing_sees_checkpoints_written_by_another_manager(directory: Path) -> None:
    reader = CheckpointManager(directory)
    assert reader.list_checkpoints() == []
    save_run(CheckpointManager(directory), SESSION, ("intent",))
    assert [r["stage"] for r in reader.list_checkpoints()] == ["intent"]


def test_listing_rebuilds_a_lost_index_from_the_files(manager: CheckpointManager) -> None:
    save_run(manager, SESSION, STAGES[:3])
    for path in (manager.checkpoint_dir / ".index").iterdir():
        path.unlink()
    rows = CheckpointManager(manager.checkpoint_dir).list_checkpoints()
    assert [r["stage"] for r in rows] == ["search", "planning", "intent"]


def test_listing_skips_unreadable_files_and_foreign_names(manager: CheckpointManager) -> None:
    save_run(manager, SESSION, ("intent",))
    (manager.checkpoint_dir / "other_intent.pkl").write_bytes(b"garbage")
    (manager.checkpoint_dir / "notes.txt").write_text("hello")
    (manager.checkpoint_dir / "orphan_intent.json").write_text("{}")
    (manager.checkpoint_dir / ".tmp.x_intent.pkl.abcd").write_bytes(b"torn")
    fresh = CheckpointManager(manager.checkpoint_dir)
    assert [r["checkpoint_id"] for r in fresh.list_checkpoints()] == [f"{SESSION}_intent"]
    with pytest.raises(CheckpointIntegrityError, match=r"other_intent\.pkl"):
        fresh.load_checkpoint("other")


def test_a_checkpoint_dir_that_does_not_exist_lists_nothing(tmp_path: Path) -> None:
    assert CheckpointManager(tmp_path / "nowhere").list_checkpoints() == []
    assert not (tmp_path / "nowhere").exists()


# --- ids --------------------------------------------------------------------------------

BAD_IDS = ["../escape", "a/b", "..", "nul\x00", "x" * 200, "", "/etc/passwd", "a b"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_hostile_ids_are_refused_before_any_path_is_built(
    manager: CheckpointManager, tmp_path: Path, bad: str
) -> None:
    calls: list[Callable[[], object]] = [
        lambda: manager.load_checkpoint(bad),
        lambda: manager.load_checkpoint(SESSION, stage=bad),
        lambda: manager.latest(bad),
        lambda: manager.list_checkpoints(session_id=bad),
        lambda: manager.list_checkpoints(stage=bad),
        lambda: manager.verify_chain(bad),
        lambda: manager.session_lock(bad),
        lambda: manager.is_locked(bad),
        lambda: manager.save(
            session_id=bad,
            stage="intent",
            state=state_after("intent"),
            completed_stages=["intent"],
            parameters=params(),
        ),
        lambda: manager.save(
            session_id=SESSION,
            stage=bad,
            state=state_after("intent"),
            completed_stages=["intent"],
            parameters=params(),
        ),
        lambda: manager.save(
            session_id=SESSION,
            stage="intent",
            state=state_after("intent"),
            completed_stages=[bad],
            parameters=params(),
        ),
        lambda: manager.save(
            session_id=SESSION,
            stage="intent",
            state=state_after("intent"),
            completed_stages=["intent"],
            parameters=params(),
            parent_session_id=bad,
        ),
    ]
    for call in calls:
        with pytest.raises(InvalidIdentifierError):
            call()
    assert not manager.checkpoint_dir.exists()
    assert not (tmp_path / "escape").exists()


# --- locks ------------------------------------------------------------------------------


def test_session_lock_refuses_a_second_writer_and_names_the_holder(
    manager: CheckpointManager,
) -> None:
    assert not manager.is_locked(SESSION)
    with manager.session_lock(SESSION):
        assert manager.is_locked(SESSION)
        with pytest.raises(SessionLockedError, match=f"pid {os.getpid()}"):
            manager.session_lock(SESSION).__enter__()
        with manager.session_lock("another-session"):
            pass
    assert not manager.is_locked(SESSION)


# --- cleanup ----------------------------------------------------------------------------


def age(manager: CheckpointManager, session: str, days: float) -> None:
    """Make a session's checkpoints ``days`` old (rewriting created_at, as if saved then)."""
    when = datetime.now(UTC) - timedelta(days=days)
    for path in manager.checkpoint_dir.glob(f"{session}_*.pkl"):
        header = {"created_at": when.isoformat()}
        rewrite(path, header=header)
        os.utime(path, (when.timestamp(), when.timestamp()))


def test_cleanup_deletes_sessions_older_than_the_cutoff(manager: CheckpointManager) -> None:
    save_run(manager, "old", STAGES[:2])
    save_run(manager, "new", STAGES[:2])
    age(manager, "old", 10)
    assert manager.cleanup(older_than=timedelta(days=7), dry_run=True) == [
        "old_intent",
        "old_planning",
    ]
    assert len(manager.list_checkpoints()) == 4
    assert manager.cleanup(older_than=timedelta(days=7)) == ["old_intent", "old_planning"]
    assert {r["session_id"] for r in manager.list_checkpoints()} == {"new"}
    assert not list(manager.checkpoint_dir.glob("old_*"))


def test_cleanup_keeps_the_newest_sessions_when_asked(manager: CheckpointManager) -> None:
    for i, session in enumerate(["s1", "s2", "s3"]):
        save_run(manager, session, ("intent",))
        age(manager, session, 30 - i)
    assert manager.cleanup(older_than=timedelta(days=7), keep_last=2) == ["s1_intent"]


def test_cleanup_never_touches_a_running_session(manager: CheckpointManager) -> None:
    save_run(manager, "running", ("intent",))
    save_run(manager, "done", ("intent",))
    age(manager, "running", 10)
    age(manager, "done", 10)
    heard: list[str] = []
    with manager.session_lock("running"):
        for dry_run in (True, False):
            assert manager.cleanup(
                older_than=timedelta(days=1), dry_run=dry_run, on_running=heard.append
            ) == ["done_intent"]
    assert heard == ["running", "running"]
    assert [r["checkpoint_id"] for r in manager.list_checkpoints()] == ["running_intent"]


def test_cleanup_removes_orphans_and_temporaries(manager: CheckpointManager) -> None:
    save_run(manager, SESSION, ("intent",))
    orphan = manager.checkpoint_dir / "gone_intent.json"
    orphan.write_text("{}")
    temporary = manager.checkpoint_dir / ".tmp.x_intent.pkl.dead"
    temporary.write_bytes(b"torn")
    old = time.time() - 30 * 86400
    os.utime(orphan, (old, old))
    os.utime(temporary, (old, old))
    assert manager.cleanup(older_than=timedelta(days=7)) == []
    assert not orphan.exists() and not temporary.exists()
    assert manager.load_checkpoint(SESSION).intent is not None


def test_cleanup_refuses_negative_arguments(manager: CheckpointManager) -> None:
    with pytest.raises(InvalidInputError):
        manager.cleanup(older_than=timedelta(days=-1))
    with pytest.raises(InvalidInputError):
        manager.cleanup(older_than=timedelta(days=1), keep_last=-1)


# --- the design document's samples --------------------------------------------------------


def test_design_sample_checkpoint_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    save_run(CheckpointManager(Path("./checkpoints")), "abc123-def456", STAGES[:2])

    asyncio.run(run_sample(sample("Checkpoint Not Found"), reader_namespace()))

    assert capsys.readouterr().out.strip() == ("['abc123-def456_planning', 'abc123-def456_intent']")


def test_design_sample_cleanup_old_checkpoints_leaves_the_store_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    manager = CheckpointManager(Path("./checkpoints"))
    save_run(manager, "old-run", STAGES[:3])
    save_run(manager, "half-old", STAGES[:3])
    save_run(manager, "new-run", STAGES[:2])
    stale = time.time() - 10 * 86400
    for path in [
        *Path("checkpoints").glob("old-run_*.pkl"),
        Path("checkpoints/half-old_intent.pkl"),
    ]:
        os.utime(path, (stale, stale))
    manager.list_checkpoints()  # warm the index, so the sample deletes files behind its back

    ns = reader_namespace()
    asyncio.run(run_sample(sample("4. Cleanup Old Checkpoints"), ns))
    ns["cleanup_old_checkpoints"](Path("./checkpoints"))

    rows = manager.list_checkpoints()
    assert {r["checkpoint_id"] for r in rows} == {
        "half-old_planning",
        "half-old_search",
        "new-run_planning",
        "new-run_intent",
    }
    for row in rows:
        manager.load_checkpoint(row["checkpoint_id"])
    assert manager.load_checkpoint("half-old").metadata.stage == "search"
    manager.verify_chain("half-old")
    with pytest.raises(CheckpointNotFoundError):
        manager.load_checkpoint("old-run")
    # a .json left without its .pkl (a crash inside the sample) is skipped, then cleaned up
    Path("checkpoints/new-run_intent.pkl").unlink()
    assert "new-run_intent" not in {r["checkpoint_id"] for r in manager.list_checkpoints()}
    assert manager.load_checkpoint("new-run").metadata.stage == "planning"
    manager.cleanup(older_than=timedelta(0))
    assert not Path("checkpoints/new-run_intent.json").exists()


def test_a_second_process_gets_session_locked_naming_the_holder(
    manager: CheckpointManager,
) -> None:
    import socket

    save_run(manager, SESSION, ("intent",))
    age(manager, SESSION, 30)
    with held_in_child(
        f"""
        from prowzi.workflows.checkpoint import CheckpointManager
        CheckpointManager({str(manager.checkpoint_dir)!r}).session_lock({SESSION!r})
        """
    ) as pid:
        other = CheckpointManager(manager.checkpoint_dir)
        assert other.is_locked(SESSION)
        with pytest.raises(SessionLockedError) as info:
            other.session_lock(SESSION, timeout=0.1).__enter__()
        assert f"pid {pid} on host {socket.gethostname()}" in str(info.value)
        assert other.cleanup(older_than=timedelta(days=1)) == []
    assert not manager.is_locked(SESSION)
    assert manager.cleanup(older_than=timedelta(days=1)) == [f"{SESSION}_intent"]


def test_one_manager_can_be_shared_by_threads(manager: CheckpointManager) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def run(n: int) -> int:
        save_run(manager, f"thread-{n}", STAGES[:3])
        return len(manager.list_checkpoints(session_id=f"thread-{n}"))

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(run, range(8))) == [3] * 8
    assert len(manager.list_checkpoints()) == 24
    for n in range(8):
        manager.verify_chain(f"thread-{n}")


def test_a_loaded_checkpoint_saved_as_a_state_loads_again(manager: CheckpointManager) -> None:
    """A WorkflowCheckpoint is a WorkflowState with metadata: only the state is written."""
    save_complete(manager, verified_state())
    loaded = manager.load_checkpoint(SESSION)
    manager.save(
        session_id="another-session",
        stage="turnitin",
        state=loaded,
        completed_stages=list(STAGES),
        parameters=params(),
    )
    again = manager.load_checkpoint("another-session")
    assert again.to_state() == verified_state()
    assert again.metadata.session_id == "another-session"

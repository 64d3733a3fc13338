"""CheckpointManager: format, incremental checkpoints, chain, listing, sidecars, signing,
versions, ids, leases, cleanup."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from design_samples import reader_namespace, run_sample, sample
from shared import lease_held_by_a_child
from test_checkpoint_support import (
    STAGES,
    body_of,
    encode_body,
    full_state,
    held_in_child,
    params,
    rewrite,
    save_run,
    save_stage,
    split,
    state_after,
)

from prowzi import __version__
from prowzi.agents import models as m
from prowzi.agents.base import RunParameters
from prowzi.config import ProwziConfig
from prowzi.errors import (
    CheckpointIntegrityError,
    CheckpointNotFoundError,
    InvalidIdentifierError,
    InvalidInputError,
    SessionLockedError,
)
from prowzi.storage import format as fmt
from prowzi.storage.blob import Blob, InMemoryBlobStore
from prowzi.storage.lease import HeldLease, LeaseLostError, SessionLeases
from prowzi.workflows import checkpoint as cp
from prowzi.workflows.checkpoint import (
    FORMAT_VERSION,
    CheckpointManager,
    CheckpointMetadata,
    WorkflowCheckpoint,
)

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
    meta = save_stage(manager, SESSION, "intent")
    assert meta.checkpoint_id == f"{SESSION}_intent"
    assert (directory / f"{SESSION}_intent.pkl").is_file()  # durable when save returns
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) == [
        f"{SESSION}_intent.json",
        f"{SESSION}_intent.pkl",
    ]
    sidecar = orjson.loads((directory / f"{SESSION}_intent.json").read_bytes())
    assert sidecar == meta.model_dump(mode="json")


def test_metadata_records_what_the_issue_lists(manager: CheckpointManager) -> None:
    before = datetime.now(UTC)
    meta = save_stage(
        manager,
        SESSION,
        "planning",
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
    assert meta.format_version == FORMAT_VERSION == 3
    assert meta.compression == "zstd"  # the default
    assert meta.previous_hash is None
    assert meta.signed is False
    assert (meta.trace_id, meta.span_id) == ("ab" * 16, "cd" * 8)
    # the first checkpoint of a run holds every field, with its digest
    assert meta.fields is not None and set(meta.fields) == set(m.WorkflowState.model_fields)
    assert (meta.refs, meta.depth, meta.lease_token) == ({}, 0, None)  # saved without a lease
    assert len(body) == meta.payload_size
    assert hashlib.sha256(body).hexdigest() == meta.payload_sha256


def test_the_pkl_is_not_a_pickle(manager: CheckpointManager) -> None:
    save_run(manager, SESSION, ("intent",))
    raw = (manager.checkpoint_dir / f"{SESSION}_intent.pkl").read_bytes()
    assert raw.startswith(fmt.MAGIC)
    assert b"\x80" not in raw[:2]


def test_a_loaded_checkpoint_equals_the_saved_state(manager: CheckpointManager) -> None:
    state = full_state()
    meta = save_stage(manager, SESSION, "turnitin", state=state)
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
    save_stage(manager, SESSION, "intent", state=state)
    assert manager.load_checkpoint(SESSION).stage_metrics == {"big": 2**70}


def save_complete(manager: CheckpointManager, state: m.WorkflowState) -> None:
    """Save ``state`` as the checkpoint after the last stage of a complete run."""
    save_stage(manager, SESSION, "turnitin", state=state)


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
        warnings=[],  # every field set, as verify() sets them (issue 16 added this one)
    )
    search = state.search.model_copy(update={"sources": sources})
    return state.model_copy(update={"search": search, "verification": verification})


def _unshared(doc: dict[str, Any]) -> dict[str, Any]:
    """A state document (format 2 and later) with every source index replaced by the source
    it names."""
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


def _decoded(encoded: dict[str, bytes]) -> dict[str, Any]:
    return {name: orjson.loads(value) for name, value in encoded.items()}


def test_the_fast_state_encoding_is_model_dump_with_shared_sources_written_once(
    manager: CheckpointManager,
) -> None:
    # _encode_fields hands orjson the models' __dict__: apart from the sources it shares,
    # each field must be model_dump's JSON exactly (the slow path writes that, and format 1
    # did).
    state = verified_state().model_copy(update={"stage_metrics": {"intent": {"when": 1.5}}})
    encoded = cp._encode_fields(state)
    assert list(encoded) == list(m.WorkflowState.model_fields)
    assert _unshared(_decoded(encoded)) == state.model_dump()
    assert sum(map(len, encoded.values())) < 0.9 * len(orjson.dumps(state.model_dump()))
    for stage in STAGES[:3]:  # nothing to share before verification: byte for byte
        partial = state_after(stage)
        dumped = partial.model_dump()
        assert cp._encode_fields(partial) == {n: orjson.dumps(v) for n, v in dumped.items()}
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
    body = body_of(manager.checkpoint_dir / f"{SESSION}_turnitin.pkl")["fields"]["verification"]
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


_FORMAT_3_KEYS = ("fields", "refs", "depth", "lease_token")


def rewrite_in_old_format(
    path: Path, version: int, compression: str, state_doc: dict[str, Any]
) -> None:
    """Write ``path`` again as a Prowzi of format ``version`` (1 or 2) did: the state whole
    in the body, a header without format 3's keys, keeping the checkpoint's identity and its
    link."""
    header, _ = split(path)
    old = {k: v for k, v in header.items() if k not in _FORMAT_3_KEYS}
    doc = {
        "checkpoint_id": header["checkpoint_id"],
        "previous_hash": header["previous_hash"],
        "state": state_doc,
    }
    body = encode_body(doc, compression)
    old.update(
        format_version=version,
        compression=compression,
        payload_size=len(body),
        payload_sha256=hashlib.sha256(body).hexdigest(),
        signed=False,
    )
    path.write_bytes(b"".join(fmt.seal(old, body, None)))


@pytest.mark.parametrize(("version", "compression"), [(1, "none"), (2, "zlib"), (2, "none")])
def test_an_older_format_checkpoint_loads_lists_and_chains(
    manager: CheckpointManager, version: int, compression: str
) -> None:
    """Format 1 wrote every source in full, format 2 the shared ones once; both held the
    state whole, without named fields or refs. Such a file still loads, lists and verifies,
    and a resumed run goes on after it."""
    save_run(manager, SESSION, STAGES[:4])
    manager.list_checkpoints()  # the catalog holds the format 3 row of the file
    path = manager.checkpoint_dir / f"{SESSION}_verification.pkl"
    state = state_after("verification")
    if version == 1:
        doc = state.model_dump(mode="json")
    else:
        doc = _decoded(cp._encode_fields(state))
        assert doc["verification"]["verified"] == [0]  # shared with the search
    rewrite_in_old_format(path, version, compression, doc)
    assert split(path)[0]["format_version"] == version
    older = CheckpointManager(manager.checkpoint_dir)
    rows = older.list_checkpoints()
    assert [r["format_version"] for r in rows] == [FORMAT_VERSION] * 4  # listed as migrated
    assert rows[0]["compression"] == compression and rows[0]["fields"] is None
    loaded = older.load_checkpoint(SESSION)
    assert loaded.to_state() == state
    assert (loaded.metadata.format_version, loaded.metadata.refs) == (FORMAT_VERSION, {})
    older.verify_chain(SESSION)
    resumed = save_stage(older, SESSION, "writing")
    assert resumed.refs == {} and resumed.previous_hash == loaded.metadata.payload_sha256
    assert older.load_checkpoint(SESSION).to_state() == state_after("writing")
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
    encoded = cp._encode_fields(odd)
    assert _decoded(encoded) == orjson.loads(odd.model_dump_json())
    assert not any(b"kept out" in value for value in encoded.values())
    save_complete(manager, odd)
    loaded = manager.load_checkpoint(SESSION)
    assert loaded.search is not None and loaded.search.sources == state.search.sources
    assert loaded.stage_metrics == {
        "model": {"path": "/c", "documents": 1, "fingerprint": "f", "sample": False},
        "set": [1],
    }


def test_zstd_is_the_default_compression_and_is_recorded(directory: Path) -> None:
    manager = CheckpointManager(directory)
    assert manager.compression == "zstd"
    state = full_state()
    meta = save_stage(manager, SESSION, "turnitin", state=state)
    path = directory / f"{SESSION}_turnitin.pkl"
    assert meta.compression == split(path)[0]["compression"] == "zstd"
    assert split(path)[1].startswith(b"\x28\xb5\x2f\xfd")  # a zstd frame
    assert meta.payload_size < len(state.model_dump_json()) / 2
    assert CheckpointManager(directory).load_checkpoint(SESSION).to_state() == state


@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
def test_every_compression_is_recorded_and_round_trips(directory: Path, compression: str) -> None:
    manager = CheckpointManager(directory, compression=compression)  # type: ignore[arg-type]
    saved = save_run(manager, SESSION)  # full and incremental checkpoints alike
    state = full_state()
    assert {meta.compression for meta in saved} == {compression}
    body = split(directory / f"{SESSION}_turnitin.pkl")[1]
    if compression == "none":
        assert orjson.loads(body)["checkpoint_id"] == f"{SESSION}_turnitin"
    else:
        assert saved[-1].payload_size < len(
            orjson.dumps(body_of(directory / f"{SESSION}_turnitin.pkl"))
        )
    reader = CheckpointManager(directory)  # the reader's own setting does not matter
    assert reader.load_checkpoint(SESSION).to_state() == state
    for stage in STAGES:
        assert reader.load_checkpoint(f"{SESSION}_{stage}").to_state() == state_after(stage)
    reader.verify_chain(SESSION)


def test_an_unknown_compression_is_refused(directory: Path) -> None:
    with pytest.raises(ValueError, match="compression"):
        CheckpointManager(directory, compression="lz4")  # type: ignore[arg-type]


def test_an_in_memory_store_serves_the_manager_too(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "unused", store=InMemoryBlobStore())
    save_run(manager, SESSION)
    assert manager.load_checkpoint(SESSION).metadata.stage == "turnitin"
    assert len(manager.list_checkpoints()) == 7
    manager.verify_chain(SESSION)
    assert not (tmp_path / "unused").exists()


def test_in_memory_stores_at_the_same_url_never_share_catalog_rows(tmp_path: Path) -> None:
    """An in-memory store's etags restart with each instance: a catalog on disk (keyed by
    url and etag) would list one store's checkpoint as another's."""
    first = CheckpointManager(tmp_path / "unused", store=InMemoryBlobStore())
    save_stage(first, SESSION, "intent")
    assert [r["prompt"] for r in first.list_checkpoints()] == [params().prompt]
    second = CheckpointManager(tmp_path / "unused", store=InMemoryBlobStore())
    save_stage(second, SESSION, "intent", parameters=RunParameters(prompt="another prompt"))
    assert [r["prompt"] for r in second.list_checkpoints()] == ["another prompt"]
    assert not (tmp_path / ".cache" / "prowzi").exists()


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
    first = save_stage(manager, SESSION, "planning")
    second = save_stage(manager, SESSION, "verification")
    assert second.previous_hash == first.payload_sha256
    manager.verify_chain(SESSION)


def test_a_fork_chains_onto_its_parent(manager: CheckpointManager) -> None:
    parent = save_run(manager, SESSION, STAGES[:3])
    fork = "fork-1"
    first = save_stage(
        manager,
        fork,
        "verification",
        parameters=params(relevance_threshold=0.3),
        parent_session_id=SESSION,
        previous_hash=parent[-1].payload_sha256,
    )
    second = save_stage(
        manager,
        fork,
        "writing",
        parameters=params(relevance_threshold=0.3),
        parent_session_id=SESSION,
    )
    assert first.parent_session_id == SESSION
    assert second.previous_hash == first.payload_sha256
    # the fork's first checkpoint is full, and none refers into the parent (which may go)
    assert first.refs == {} and first.depth == 0
    assert {ref.checkpoint for ref in second.refs.values()} == {f"{fork}_verification"}
    manager.verify_chain(fork)
    assert manager.load_checkpoint(f"{fork}_verification").metadata.previous_hash == (
        parent[-1].payload_sha256
    )
    # the parent's checkpoint it links to is replaced: the fork's chain is broken
    save_stage(
        manager,
        SESSION,
        "search",
        state=state_after("search").model_copy(update={"stage_metrics": {"x": 1}}),
    )
    with pytest.raises(CheckpointIntegrityError, match=f"parent session {SESSION}"):
        manager.verify_chain(fork)
    # ...but a parent that was cleaned up altogether leaves the fork verifiable and loadable
    for path in manager.checkpoint_dir.glob(f"{SESSION}_*"):
        path.unlink()
    manager.verify_chain(fork)
    assert manager.load_checkpoint(fork).to_state() == state_after("writing")


def test_a_malformed_previous_hash_is_refused(manager: CheckpointManager) -> None:
    with pytest.raises(InvalidInputError, match="previous_hash"):
        save_stage(manager, SESSION, "intent", previous_hash="../../etc")


def test_verify_chain_detects_a_missing_link(manager: CheckpointManager) -> None:
    save_run(manager, SESSION, STAGES[:3])
    (manager.checkpoint_dir / f"{SESSION}_planning.pkl").unlink()
    with pytest.raises(CheckpointIntegrityError, match="chain broken"):
        manager.verify_chain(SESSION)
    with pytest.raises(CheckpointIntegrityError, match="chain broken"):
        manager.load_checkpoint(f"{SESSION}_search")


@pytest.mark.parametrize("full_every", [1, 2])
def test_a_chain_whose_oldest_checkpoints_were_pruned_still_verifies(
    directory: Path, full_every: int
) -> None:
    """Pruned up to a full checkpoint (every one, with full_every=1), the rest needs nothing
    that is gone: the chain starts late and every checkpoint left loads."""
    manager = CheckpointManager(directory, full_every=full_every)
    saved = save_run(manager, SESSION, STAGES[:4])
    assert [meta.depth for meta in saved] == ([0, 0, 0, 0] if full_every == 1 else [0, 1, 0, 1])
    pruned = STAGES[:2]  # up to the full checkpoint of search
    for stage in pruned:
        (directory / f"{SESSION}_{stage}.pkl").unlink()
    manager.verify_chain(SESSION)
    for stage in STAGES[len(pruned) : 4]:
        assert manager.load_checkpoint(f"{SESSION}_{stage}").to_state() == state_after(stage)


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


# --- incremental checkpoints -------------------------------------------------------------


def big_search_states() -> dict[str, m.WorkflowState]:
    """A run's state after each stage, with a search of 30 sources of random text (which
    compression cannot shrink): the bulk of every state after the search."""
    import base64
    import random

    rng = random.Random(20261126)
    base = full_state()
    assert base.search is not None
    first = base.search.sources[0]
    sources = [
        first.model_copy(
            update={
                "source_id": f"corpus/{i}.md",
                "text": base64.b64encode(rng.randbytes(600)).decode(),
            }
        )
        for i in range(30)
    ]
    search = base.search.model_copy(update={"sources": sources})
    states = {}
    for stage in STAGES:
        state = state_after(stage)
        if state.search is not None:
            state = state.model_copy(update={"search": search})
        states[stage] = state
    return states


def save_states(
    manager: CheckpointManager, session: str, states: dict[str, m.WorkflowState]
) -> list[CheckpointMetadata]:
    saved = []
    with manager.session_lock(session):
        for i, (stage, state) in enumerate(states.items()):
            saved.append(
                save_stage(
                    manager, session, stage, state=state, completed_stages=list(STAGES[: i + 1])
                )
            )
    return saved


def test_a_run_s_later_checkpoints_store_only_what_changed(directory: Path) -> None:
    states = big_search_states()
    saved = save_states(CheckpointManager(directory), SESSION, states)
    whole = save_states(
        CheckpointManager(directory.parent / "whole", full_every=1), SESSION, states
    )
    assert [meta.depth for meta in saved] == [0, 1, 2, 3, 0, 1, 2]
    assert [meta.depth for meta in whole] == [0] * 7 and all(not w.refs for w in whole)
    every_field = set(m.WorkflowState.model_fields)
    for i, (meta, full) in enumerate(zip(saved, whole, strict=True)):
        path = directory / f"{meta.checkpoint_id}.pkl"
        header, _ = split(path)
        assert header["refs"] == {name: ref.model_dump() for name, ref in meta.refs.items()}
        assert meta.fields is not None
        assert set(body_of(path)["fields"]) == set(meta.fields)  # the body holds the rest
        assert set(meta.fields) | set(meta.refs) == every_field
        assert not set(meta.fields) & set(meta.refs)
        state = states[STAGES[i]]
        if meta.depth == 0:
            assert meta.refs == {}
            continue
        before = states[STAGES[i - 1]]
        changed = {n for n in every_field if getattr(state, n) != getattr(before, n)}
        assert changed and changed <= set(meta.fields)  # what changed is in the body
        for name, ref in meta.refs.items():  # what it refers to is unchanged, held earlier
            assert getattr(state, name) == getattr(before, name) is not None
            holder = next(s for s in saved[:i] if s.checkpoint_id == ref.checkpoint)
            assert holder.fields is not None and holder.fields[name] == ref.sha256
        if "search" in meta.refs:  # the bulk is a reference: a fraction of the full save
            assert meta.payload_size < full.payload_size / 8
    assert sum(s.payload_size for s in saved) < sum(w.payload_size for w in whole) / 2
    reader = CheckpointManager(directory)
    for stage, state in states.items():
        loaded = reader.load_checkpoint(f"{SESSION}_{stage}")
        assert loaded.to_state() == state
        assert loaded.search is None or loaded.search == states["search"].search
    reader.verify_chain(SESSION)


class CountingStore(InMemoryBlobStore):
    """An in-memory store that remembers every blob read whole."""

    def __init__(self) -> None:
        super().__init__()
        self.gets: list[str] = []

    def get(self, name: str) -> Blob:
        self.gets.append(name)
        return super().get(name)


@pytest.mark.parametrize("full_every", [1, 2, 3, 4])
def test_full_every_n_makes_every_nth_checkpoint_full_and_a_load_reads_at_most_n_blobs(
    tmp_path: Path, full_every: int
) -> None:
    store = CountingStore()
    manager = CheckpointManager(tmp_path / "unused", store=store, full_every=full_every)
    saved = save_run(manager, SESSION)
    assert [meta.depth for meta in saved] == [i % full_every for i in range(len(STAGES))]
    for meta in saved:
        assert (meta.refs == {}) == (meta.depth == 0)
        held_by = {ref.checkpoint for ref in meta.refs.values()}
        assert len(held_by) <= meta.depth  # the checkpoints since the last full one
    reader = CheckpointManager(tmp_path / "unused", store=store, full_every=full_every)
    for i, (stage, meta) in enumerate(zip(STAGES, saved, strict=True)):
        store.gets.clear()
        assert reader.load_checkpoint(f"{SESSION}_{stage}").to_state() == state_after(stage)
        read = [name[:-4] for name in store.gets if name.endswith(".pkl")]
        assert len(read) == len(set(read))  # each blob read once
        parts = {ref.checkpoint for ref in meta.refs.values()}
        previous = {f"{SESSION}_{STAGES[i - 1]}"} if i else set()
        if meta.depth:  # its previous checkpoint, which its link names, is one of its parts
            assert previous <= parts
        # itself and its parts; a full one reads its previous checkpoint's header for the link
        assert set(read) == {meta.checkpoint_id} | parts | previous
        assert len(read) <= max(full_every, 2)


def test_a_resumed_session_s_first_checkpoint_in_a_new_manager_is_full(directory: Path) -> None:
    first = save_run(CheckpointManager(directory), SESSION, STAGES[:3])
    assert first[-1].depth == 2
    for manager in (CheckpointManager(directory), CheckpointManager(directory, full_every=1)):
        with manager.session_lock(SESSION):
            resumed = save_stage(manager, SESSION, "verification")
            after = save_stage(manager, SESSION, "writing")
        assert (resumed.depth, resumed.refs) == (0, {})
        assert resumed.previous_hash == first[-1].payload_sha256  # the chain goes on
        if manager.full_every > 1:  # later ones refer only into the resumed run
            assert {r.checkpoint for r in after.refs.values()} == {f"{SESSION}_verification"}
        assert manager.load_checkpoint(SESSION).to_state() == state_after("writing")
        manager.verify_chain(SESSION)
    # the same manager, once it gave the session up, starts a full one again too
    manager = CheckpointManager(directory)
    save_run(manager, SESSION, ("intent",))
    (again,) = save_run(manager, SESSION, ("intent",))
    assert (again.depth, again.refs) == (0, {})


def test_a_ref_whose_part_was_overwritten_by_a_re_run_is_refused_naming_the_part(
    manager: CheckpointManager,
) -> None:
    saved = save_run(manager, SESSION, STAGES[:4])
    assert saved[3].refs["plan"].checkpoint == f"{SESSION}_planning"
    # a re-run of planning that keeps the plan leaves the parts of later checkpoints valid
    same_plan = state_after("planning").model_copy(update={"stage_metrics": {"planning": 2}})
    save_stage(manager, SESSION, "planning", state=same_plan)
    verification = f"{SESSION}_verification"
    assert manager.load_checkpoint(verification).to_state() == state_after("verification")
    # one that changes it does not: the plan the verification checkpoint holds is gone
    plan = m.ResearchPlan(title="Another plan", sections=[])
    other_plan = state_after("planning").model_copy(update={"plan": plan})
    save_stage(manager, SESSION, "planning", state=other_plan)
    path = manager.checkpoint_dir / f"{SESSION}_verification.pkl"
    with pytest.raises(CheckpointIntegrityError, match="superseded by a re-run") as info:
        manager.load_checkpoint(verification)
    assert info.value.path == str(path)
    assert f"its part {SESSION}_planning no longer holds field 'plan'" in info.value.reason
    # the session's chain (from the re-run, its latest) is whole: the checkpoint left behind
    # off it is verified as a blob, as after any re-run of an earlier stage
    manager.verify_chain(SESSION)
    assert manager.load_checkpoint(f"{SESSION}_planning").plan == plan  # the re-run's own


def test_a_ref_whose_part_was_deleted_is_refused_naming_the_part(
    manager: CheckpointManager,
) -> None:
    save_run(manager, SESSION, STAGES[:4])
    (manager.checkpoint_dir / f"{SESSION}_intent.pkl").unlink()
    for stage in STAGES[1:4]:
        with pytest.raises(CheckpointIntegrityError) as info:
            manager.load_checkpoint(f"{SESSION}_{stage}")
        assert info.value.path == str(manager.checkpoint_dir / f"{SESSION}_{stage}.pkl")
        assert f"its part {SESSION}_intent is missing (field 'intent')" in info.value.reason
    with pytest.raises(CheckpointIntegrityError, match=f"{SESSION}_intent is missing"):
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
    """A made-up format 1 that called the draft 'document': without a migration from it,
    such a file is refused; with one that renames it, it loads, and lists."""
    save_run(manager, SESSION, ("writing",))
    path = manager.checkpoint_dir / f"{SESSION}_writing.pkl"
    doc = state_after("writing").model_dump(mode="json")
    doc["document"] = doc.pop("draft")
    rewrite_in_old_format(path, 1, "none", doc)

    def rename_document(body: dict[str, Any]) -> dict[str, Any]:
        body["state"]["draft"] = body["state"].pop("document")
        return body

    monkeypatch.delitem(fmt._MIGRATIONS, 1)
    with pytest.raises(CheckpointIntegrityError, match="older than any this Prowzi can migrate"):
        manager.load_checkpoint(SESSION)
    assert manager.list_checkpoints() == []  # unreadable: not listed
    monkeypatch.setitem(fmt._MIGRATIONS, 1, (lambda header: header, rename_document))
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


def catalog_file(manager: CheckpointManager) -> Path:
    """Where the manager's catalog lives (a per-machine cache, outside the store)."""
    path = manager.catalog.path
    assert path is not None
    assert manager.checkpoint_dir not in path.parents
    return path


def catalog_rows(path: Path) -> dict[str, dict[str, Any] | None]:
    import sqlite3

    db = sqlite3.connect(path)
    try:
        return {
            name: orjson.loads(row) if row is not None else None
            for name, _etag, row in db.execute("SELECT * FROM blobs")
        }
    finally:
        db.close()


def test_listing_rebuilds_a_lost_catalog_from_the_blobs(manager: CheckpointManager) -> None:
    save_run(manager, SESSION, STAGES[:3])
    assert len(manager.list_checkpoints()) == 3
    path = catalog_file(manager)
    assert set(catalog_rows(path)) == {f"{SESSION}_{stage}.pkl" for stage in STAGES[:3]}
    manager.close()
    for file in path.parent.glob(f"{path.name}*"):
        file.unlink()
    rows = CheckpointManager(manager.checkpoint_dir).list_checkpoints()
    assert [r["stage"] for r in rows] == ["search", "planning", "intent"]
    assert set(catalog_rows(path)) == {f"{SESSION}_{stage}.pkl" for stage in STAGES[:3]}


@pytest.mark.parametrize(
    "content", [b"", b"garbage" * 100, b"SQLite format 3\x00" + b"\xff" * 4000]
)
def test_a_damaged_catalog_is_rebuilt(manager: CheckpointManager, content: bytes) -> None:
    save_run(manager, SESSION, STAGES[:3])
    manager.list_checkpoints()
    manager.close()
    path = catalog_file(manager)
    path.write_bytes(content)
    fresh = CheckpointManager(manager.checkpoint_dir)
    assert [r["stage"] for r in fresh.list_checkpoints()] == ["search", "planning", "intent"]
    assert fresh.load_checkpoint(SESSION).to_state() == state_after("search")
    assert set(catalog_rows(path)) == {f"{SESSION}_{stage}.pkl" for stage in STAGES[:3]}


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_a_catalog_that_is_a_symlink_is_never_written_through(
    manager: CheckpointManager, tmp_path: Path, suffix: str
) -> None:
    save_run(manager, SESSION, STAGES[:2])
    path = catalog_file(manager)
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read or overwrite me")
    link = Path(f"{path}{suffix}")
    link.symlink_to(secret)
    rows = CheckpointManager(manager.checkpoint_dir).list_checkpoints()
    assert [r["stage"] for r in rows] == ["planning", "intent"]
    assert secret.read_text() == "do not read or overwrite me"
    assert not path.is_symlink()


def test_a_catalog_symlinked_to_another_store_s_cannot_change_what_is_listed(
    tmp_path: Path,
) -> None:
    """A planted link to a genuine catalog of other checkpoints (same names, other
    contents) is not followed: its rows are not taken, and it is not written."""
    other = CheckpointManager(tmp_path / "other")
    save_stage(
        other, SESSION, "intent", parameters=RunParameters(prompt="the other store's prompt")
    )
    other.list_checkpoints()
    other.close()
    foreign = catalog_file(other)
    before = foreign.read_bytes()
    manager = CheckpointManager(tmp_path / "checkpoints")
    save_run(manager, SESSION, ("intent",))
    path = catalog_file(manager)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(foreign)
    assert [r["prompt"] for r in manager.list_checkpoints()] == [params().prompt]
    assert foreign.read_bytes() == before


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
        lambda: save_stage(manager, bad, "intent"),
        lambda: save_stage(
            manager, SESSION, bad, state=state_after("intent"), completed_stages=["intent"]
        ),
        lambda: save_stage(manager, SESSION, "intent", completed_stages=[bad]),
        lambda: save_stage(manager, SESSION, "intent", parent_session_id=bad),
    ]
    for call in calls:
        with pytest.raises(InvalidIdentifierError):
            call()
    assert not manager.checkpoint_dir.exists()
    assert not (tmp_path / "escape").exists()


# --- leases -----------------------------------------------------------------------------

HOLDER = f"pid {os.getpid()} on {socket.gethostname()}"


def test_session_lock_refuses_a_second_writer_and_names_the_holder(
    manager: CheckpointManager,
) -> None:
    assert not manager.is_locked(SESSION)
    with manager.session_lock(SESSION):
        assert manager.is_locked(SESSION)
        assert manager.lock_holder(SESSION) == HOLDER
        with pytest.raises(SessionLockedError, match=f"pid {os.getpid()}"):
            manager.session_lock(SESSION).__enter__()
        other = CheckpointManager(manager.checkpoint_dir)  # another writer, same process
        with pytest.raises(SessionLockedError, match=f"written by {HOLDER}"):
            other.session_lock(SESSION, timeout=0.1).__enter__()
        with manager.session_lock("another-session"):
            pass
    assert not manager.is_locked(SESSION) and manager.lock_holder(SESSION) is None


def lease_token(manager: CheckpointManager, session: str) -> int:
    """The fencing token in the session's lease record."""
    record = orjson.loads(manager.store.get(SessionLeases.blob_name(session)).data)
    token: int = record["token"]
    return token


def test_a_holder_killed_with_sigkill_leaves_no_live_holder(manager: CheckpointManager) -> None:
    """The lease of a process that died on this machine is taken at once (not after its
    ttl), with a larger fencing token, which the new writer's checkpoints carry."""
    with lease_held_by_a_child(manager.checkpoint_dir, SESSION) as pid:
        assert manager.lock_holder(SESSION) == f"pid {pid} on {socket.gethostname()}"
        killed_token = lease_token(manager, SESSION)
    assert not manager.is_locked(SESSION) and manager.lock_holder(SESSION) is None
    started = time.monotonic()
    with manager.session_lock(SESSION, timeout=0):
        assert time.monotonic() - started < manager.leases.ttl / 10  # not after the ttl
        assert lease_token(manager, SESSION) > killed_token
        meta = save_stage(manager, SESSION, "intent")
    assert meta.lease_token == lease_token(manager, SESSION) > killed_token


def test_a_writer_whose_lease_was_taken_over_has_its_next_save_refused(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer stalled past its lease's ttl (its renewals did not run: a long pause, a
    suspended machine) wakes to find another writer holding the session: its next save is
    refused, and the successor's checkpoint stays as the successor wrote it."""
    monkeypatch.setattr(HeldLease, "_keep", lambda self: None)  # the stalled renewals
    stalled = CheckpointManager(directory, lease_ttl=0.2)
    revised = state_after("planning").model_copy(update={"stage_metrics": {"by": 2}})
    with (
        pytest.raises(LeaseLostError, match=f"taken over by {HOLDER}") as info,
        stalled.session_lock(SESSION),
    ):
        first = save_stage(stalled, SESSION, "intent")
        time.sleep(0.3)  # past the ttl: the lease may be taken over
        successor = CheckpointManager(directory)
        with successor.session_lock(SESSION, timeout=0):
            theirs = save_stage(successor, SESSION, "planning", state=revised)
            assert (theirs.lease_token or 0) > (first.lease_token or 0) > 0
            save_stage(stalled, SESSION, "planning")
    assert isinstance(info.value, SessionLockedError)  # what callers of session_lock catch
    reader = CheckpointManager(directory)
    loaded = reader.load_checkpoint(SESSION)
    assert loaded.metadata == theirs and loaded.to_state() == revised
    reader.verify_chain(SESSION)
    assert reader.load_checkpoint(f"{SESSION}_intent").metadata == first


# --- cleanup ----------------------------------------------------------------------------


def age_checkpoint(manager: CheckpointManager, checkpoint_id: str, days: float) -> None:
    """Make a checkpoint ``days`` old (rewriting created_at, as if saved then)."""
    when = datetime.now(UTC) - timedelta(days=days)
    path = manager.checkpoint_dir / f"{checkpoint_id}.pkl"
    rewrite(path, header={"created_at": when.isoformat()})
    os.utime(path, (when.timestamp(), when.timestamp()))


def age(manager: CheckpointManager, session: str, days: float) -> None:
    """Make a session's checkpoints ``days`` old."""
    for path in manager.checkpoint_dir.glob(f"{session}_*.pkl"):
        age_checkpoint(manager, path.stem, days)


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


def test_cleanup_never_deletes_a_part_a_kept_checkpoint_needs(
    manager: CheckpointManager,
) -> None:
    """Sessions go whole: the old first checkpoints of a session whose newest is recent are
    kept, since the later ones refer to them."""
    saved = save_run(manager, SESSION, STAGES[:4])
    assert saved[-1].refs["intent"].checkpoint == f"{SESSION}_intent"
    save_run(manager, "old", STAGES[:2])
    for stage in STAGES[:3]:
        age_checkpoint(manager, f"{SESSION}_{stage}", days=30)
    age(manager, "old", 30)
    assert manager.cleanup(older_than=timedelta(days=7)) == ["old_intent", "old_planning"]
    for stage in STAGES[:4]:
        assert manager.load_checkpoint(f"{SESSION}_{stage}").to_state() == state_after(stage)
    manager.verify_chain(SESSION)


def test_cleanup_reports_an_entry_it_cannot_delete_and_goes_on(
    manager: CheckpointManager,
) -> None:
    save_run(manager, "a-old", ("intent",))
    save_run(manager, "b-old", ("intent",))
    blocked = manager.checkpoint_dir / "a-old_intent.json"
    blocked.unlink()
    blocked.mkdir()  # a directory where a .json should be
    (blocked / "inside.txt").write_text("not Prowzi's")
    for session in ("a-old", "b-old"):
        age(manager, session, 30)
    errors: list[tuple[str, OSError]] = []
    deleted = manager.cleanup(
        older_than=timedelta(days=7), on_error=lambda where, exc: errors.append((where, exc))
    )
    assert deleted == ["a-old_intent", "b-old_intent"]
    assert [where for where, _ in errors] == [str(blocked)]
    assert isinstance(errors[0][1], OSError)
    assert blocked.is_dir() and (blocked / "inside.txt").exists()  # never removed recursively
    assert manager.list_checkpoints() == []
    assert not list(manager.checkpoint_dir.glob("b-old_*"))


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


@pytest.mark.parametrize("full_every", [1, cp.DEFAULT_FULL_EVERY])
def test_design_sample_cleanup_old_checkpoints_leaves_the_store_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, full_every: int
) -> None:
    """The design document's script deletes ``.pkl`` files one at a time, by age. With every
    checkpoint full (``full_every=1``) what it leaves is consistent: every listed checkpoint
    loads and the chains verify. With incremental checkpoints (the default) it can delete a
    part that a kept, newer checkpoint refers to: that checkpoint is then refused, naming
    the missing part, never loaded wrong. ``CheckpointManager.cleanup`` deletes whole
    sessions and never does that."""
    monkeypatch.chdir(tmp_path)
    manager = CheckpointManager(Path("./checkpoints"), full_every=full_every)
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
    incremental = full_every > 1

    def refused_for_its_part(checkpoint_id: str, part: str, refused: str) -> None:
        with pytest.raises(CheckpointIntegrityError) as info:
            manager.load_checkpoint(checkpoint_id)
        assert f"its part {part} is missing" in info.value.reason
        assert info.value.path == str(Path("checkpoints") / f"{refused}.pkl")

    for row in rows:
        if incremental and row["session_id"] == "half-old":
            refused_for_its_part(row["checkpoint_id"], "half-old_intent", row["checkpoint_id"])
        else:
            manager.load_checkpoint(row["checkpoint_id"])
    if incremental:
        refused_for_its_part("half-old", "half-old_intent", "half-old_search")
        with pytest.raises(CheckpointIntegrityError, match="half-old_intent is missing"):
            manager.verify_chain("half-old")
    else:
        assert manager.load_checkpoint("half-old").metadata.stage == "search"
        manager.verify_chain("half-old")
    with pytest.raises(CheckpointNotFoundError):
        manager.load_checkpoint("old-run")
    # a .json left without its .pkl (a crash inside the sample) is skipped, then cleaned up
    Path("checkpoints/new-run_intent.pkl").unlink()
    assert "new-run_intent" not in {r["checkpoint_id"] for r in manager.list_checkpoints()}
    if incremental:
        refused_for_its_part("new-run", "new-run_intent", "new-run_planning")
    else:
        assert manager.load_checkpoint("new-run").metadata.stage == "planning"
    manager.cleanup(older_than=timedelta(0))
    assert not Path("checkpoints/new-run_intent.json").exists()


def test_a_second_process_gets_session_locked_naming_the_holder(
    manager: CheckpointManager,
) -> None:
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
        assert f"pid {pid} on {socket.gethostname()}" in str(info.value)
        assert other.lock_holder(SESSION) == f"pid {pid} on {socket.gethostname()}"
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
    save_stage(manager, "another-session", "turnitin", state=loaded)
    again = manager.load_checkpoint("another-session")
    assert again.to_state() == verified_state()
    assert again.metadata.session_id == "another-session"

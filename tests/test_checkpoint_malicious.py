"""The malicious-checkpoint corpus: every case is refused with CheckpointIntegrityError naming
the file, and nothing in it ever runs.

The evil pickles are generated here (not committed as binaries) so the corpus documents how
each one is built. Each payload, if it ran, would create a marker file; every test asserts the
marker does not exist. ``pickle`` itself is booby-trapped during the loads, so a regression
that unpickled anything would fail loudly even if the payload were harmless. A control test
unpickles each payload with plain ``pickle`` in a child process and sees its marker appear, so
the corpus holds working exploits.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import pickle
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_checkpoint_support import (
    STAGES,
    body_of,
    full_state,
    params,
    rewrite,
    save_run,
    split,
    state_after,
)

from prowzi.errors import CheckpointIntegrityError
from prowzi.workflows import checkpoint as cp
from prowzi.workflows.checkpoint import CheckpointManager

VICTIM = "victim-session"
OTHER = "other-session"


class _Reduce:
    """Pickles as ``fn(*args)``: what a hostile checkpoint uses to run code on unpickling."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.fn, self.args


def evil_pickles(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    return {
        "os.system": pickle.dumps(_Reduce(os.system, touch)),
        "subprocess": pickle.dumps(_Reduce(subprocess.check_call, ["touch", str(marker)])),
        "builtins.eval": pickle.dumps(
            _Reduce(builtins.eval, f"open({str(marker)!r}, 'w').close()")
        ),
        "builtins.exec-protocol-0": pickle.dumps(
            _Reduce(builtins.exec, f"open({str(marker)!r}, 'w').close()"), protocol=0
        ),
        "class-outside-allow-list": pickle.dumps(_Reduce(Path(marker).touch)),
        # Prowzi's own class, as a genuine pickle: still refused, nothing is ever unpickled
        "prowzi-state-as-pickle": pickle.dumps(full_state()),
    }


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a malicious checkpoint ran code"


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint load reached pickle")

    for name in ("load", "loads", "Unpickler", "_load", "_loads", "_Unpickler"):
        monkeypatch.setattr(pickle, name, refuse, raising=False)


@pytest.fixture
def manager(tmp_path: Path) -> CheckpointManager:
    manager = CheckpointManager(tmp_path / "checkpoints")
    save_run(manager, VICTIM, STAGES[:3])
    save_run(manager, OTHER, STAGES[:3])
    return manager


def pkl(manager: CheckpointManager, session: str, stage: str) -> Path:
    return manager.checkpoint_dir / f"{session}_{stage}.pkl"


def assert_refused(
    manager: CheckpointManager, checkpoint_id: str, path: Path, match: str | None = None
) -> CheckpointIntegrityError:
    with pytest.raises(CheckpointIntegrityError, match=match) as info:
        manager.load_checkpoint(checkpoint_id)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    return info.value


KINDS = sorted(evil_pickles(Path("x")))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("no_unpickling")
def test_an_evil_pickle_in_place_of_a_checkpoint_is_refused(
    manager: CheckpointManager, marker: Path, kind: str
) -> None:
    target = pkl(manager, VICTIM, "search")
    target.write_bytes(evil_pickles(marker)[kind])
    error = assert_refused(manager, VICTIM, target, "not a Prowzi checkpoint")
    assert "pickle" in error.reason
    # every other path through the store leaves it inert too
    fresh = CheckpointManager(manager.checkpoint_dir)
    assert f"{VICTIM}_search" not in {r["checkpoint_id"] for r in fresh.list_checkpoints()}
    with pytest.raises(CheckpointIntegrityError):
        fresh.verify_chain(VICTIM)
    with pytest.raises(CheckpointIntegrityError):
        fresh.load_checkpoint(f"{VICTIM}_search")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("no_unpickling")
def test_an_evil_pickle_as_the_body_of_a_well_formed_container_is_refused(
    manager: CheckpointManager, marker: Path, kind: str
) -> None:
    target = pkl(manager, VICTIM, "search")
    rewrite(target, body=evil_pickles(marker)[kind])
    assert_refused(manager, VICTIM, target, "not a Prowzi workflow state")


@pytest.mark.parametrize(
    "change",
    [
        {"__reduce__": ["os.system", ["touch PWNED"]]},
        {"state": {"intent": {"__class__": "os.system", "args": ["touch PWNED"]}}},
        {"state": {"stage_metrics": {}, "evil": {"py/object": "subprocess.Popen"}}},
        {"state": {"intent": {"prompt": 1, "document_type": [], "field": {}, "topic": None}}},
    ],
    ids=["extra-top-level-key", "class-tag-in-a-model", "unknown-state-field", "wrong-types"],
)
def test_a_json_body_outside_the_schema_is_refused(
    manager: CheckpointManager, change: dict[str, Any]
) -> None:
    target = pkl(manager, VICTIM, "search")
    body = {**body_of(target), **change}
    rewrite(target, body=orjson.dumps(body))
    assert_refused(manager, VICTIM, target, "not a Prowzi workflow state")


@pytest.mark.parametrize(
    ("reference", "match"),
    [
        (10**6, "names search source 1000000, and the search has"),
        (-1, "not a Prowzi workflow state"),
        (True, "not a Prowzi workflow state"),
        (1.0, "not a Prowzi workflow state"),
        ("0", "not a Prowzi workflow state"),
    ],
    ids=["out-of-range", "negative", "bool", "float", "string"],
)
def test_a_forged_source_index_is_refused(tmp_path: Path, reference: object, match: str) -> None:
    manager = CheckpointManager(tmp_path / "checkpoints")
    save_run(manager, VICTIM, STAGES[:4])
    target = pkl(manager, VICTIM, "verification")
    body = body_of(target)
    body["state"]["verification"]["verified"][0] = reference
    rewrite(target, body=orjson.dumps(body))
    assert_refused(manager, VICTIM, target, match)


def test_a_source_index_without_a_search_is_refused(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "checkpoints")
    save_run(manager, VICTIM, STAGES[:4])
    target = pkl(manager, VICTIM, "verification")
    body = body_of(target)
    body["state"]["search"] = None
    body["state"]["verification"]["verified"][0] = 0
    rewrite(target, body=orjson.dumps(body))
    assert_refused(manager, VICTIM, target, "names search source 0, and the search has 0")


@pytest.mark.usefixtures("no_unpickling")
def test_every_truncation_is_refused(manager: CheckpointManager) -> None:
    target = pkl(manager, VICTIM, "search")
    whole = target.read_bytes()
    for cut in sorted({0, 1, 8, 11, 12, 40, len(whole) // 2, len(whole) - 33, len(whole) - 1}):
        target.write_bytes(whole[:cut])
        assert_refused(manager, VICTIM, target)


@pytest.mark.parametrize("signed", [False, True])
def test_every_flipped_byte_is_refused(tmp_path: Path, signed: bool) -> None:
    key = b"k" if signed else None
    manager = CheckpointManager(tmp_path / "checkpoints", key=key)
    save_run(manager, VICTIM, ("intent",))
    target = pkl(manager, VICTIM, "intent")
    whole = target.read_bytes()
    for offset in range(len(whole)):  # every single byte of a small checkpoint
        flipped = bytearray(whole)
        flipped[offset] ^= 0x20
        target.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointIntegrityError) as info:
            manager.load_checkpoint(VICTIM)
        assert info.value.path == str(target), offset
    target.write_bytes(whole)
    manager.load_checkpoint(VICTIM)


@pytest.mark.parametrize("tail", [b"\x01", b"\x00" * 4096 + b"\x80", b"junk" + b"\x00" * 100])
def test_trailing_bytes_are_refused(manager: CheckpointManager, tail: bytes) -> None:
    target = pkl(manager, VICTIM, "search")
    target.write_bytes(target.read_bytes() + tail)
    assert_refused(manager, VICTIM, target, "trailing bytes")


@pytest.mark.parametrize("key", [None, "a key"])
def test_zero_padding_after_a_checkpoint_is_read_past(tmp_path: Path, key: str | None) -> None:
    """A save writes into a spare file full of zeros, and its write-behind cuts the rest;
    a process killed in between leaves them. They carry nothing, and the signature (before
    them) still counts."""
    manager = CheckpointManager(tmp_path / "checkpoints", key=key)
    save_run(manager, VICTIM, STAGES[:3])
    target = pkl(manager, VICTIM, "search")
    whole = target.read_bytes()
    target.write_bytes(whole + b"\x00" * 20_000)
    fresh = CheckpointManager(tmp_path / "checkpoints", key=key)
    assert fresh.load_checkpoint(VICTIM).metadata.stage == "search"
    fresh.verify_chain(VICTIM)
    assert [r["stage"] for r in fresh.list_checkpoints()] == ["search", "planning", "intent"]
    if key is not None:  # the signature is where the header says, not at the file's end
        target.write_bytes(whole[:-1] + bytes([whole[-1] ^ 1]) + b"\x00" * 20_000)
        assert_refused(fresh, VICTIM, target, "HMAC")
        # zeros where it goes: a write cut short in a spare, refused with or without a key
        target.write_bytes(whole[:-32] + b"\x00" * 20_032)
        assert_refused(fresh, VICTIM, target, "signature was never written")
        assert_refused(CheckpointManager(tmp_path / "checkpoints"), VICTIM, target, "never")


def test_an_implausible_header_length_is_refused(manager: CheckpointManager) -> None:
    target = pkl(manager, VICTIM, "search")
    raw = bytearray(target.read_bytes())
    raw[len(cp.MAGIC) : cp._PREFIX] = (2**32 - 1).to_bytes(4, "big")
    target.write_bytes(bytes(raw))
    assert_refused(manager, VICTIM, target, "implausible")


def test_a_checkpoint_copied_from_another_session_is_refused(manager: CheckpointManager) -> None:
    target = pkl(manager, VICTIM, "search")
    target.write_bytes(pkl(manager, OTHER, "search").read_bytes())
    assert_refused(manager, VICTIM, target, "copied from another session")


def test_a_body_swapped_in_from_another_session_is_refused(manager: CheckpointManager) -> None:
    """Even with the size, hash and header digest recomputed to match the foreign body."""
    target = pkl(manager, VICTIM, "search")
    _, foreign_body = split(pkl(manager, OTHER, "search"))
    rewrite(target, body=foreign_body)
    assert_refused(manager, VICTIM, target, "belongs to checkpoint")


def test_with_a_key_a_fully_forged_transplant_is_refused(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "checkpoints", key="s3cret")
    save_run(manager, VICTIM, STAGES[:2])
    save_run(manager, OTHER, STAGES[:2])
    target = pkl(manager, VICTIM, "planning")
    header, _ = split(target)
    body = body_of(pkl(manager, OTHER, "planning"))
    body["checkpoint_id"], body["previous_hash"] = header["checkpoint_id"], header["previous_hash"]
    rewrite(target, body=orjson.dumps(body))  # consistent in every way but the HMAC
    assert_refused(manager, VICTIM, target, "unsigned")
    rewrite(target, body=orjson.dumps(body), key=b"a guess")
    assert_refused(manager, VICTIM, target, "HMAC")


def test_a_payload_from_an_earlier_save_breaks_the_chain(manager: CheckpointManager) -> None:
    """A rollback: an old but genuine checkpoint put back in place of a newer one."""
    target = pkl(manager, VICTIM, "planning")
    old = target.read_bytes()
    revised = state_after("planning").model_copy(update={"stage_metrics": {"planning": 2}})
    for stage, state in (("planning", revised), ("search", state_after("search"))):
        manager.save(
            session_id=VICTIM,
            stage=stage,
            state=state,
            completed_stages=list(STAGES[: STAGES.index(stage) + 1]),
            parameters=params(),
        )
    target.write_bytes(old)
    with pytest.raises(CheckpointIntegrityError, match="chain"):
        manager.verify_chain(VICTIM)
    assert_refused(manager, f"{VICTIM}_search", pkl(manager, VICTIM, "search"), "chain broken")


@pytest.mark.parametrize(
    "edit",
    [
        {"checkpoint_id": f"{OTHER}_search"},
        {"session_id": OTHER, "checkpoint_id": f"{OTHER}_search"},
        {"stage": "turnitin"},
        {"pkl_path": "../../evil.pkl"},
    ],
    ids=["checkpoint-id", "session", "stage", "foreign-path-key"],
)
@pytest.mark.usefixtures("no_unpickling")
def test_a_json_edited_to_point_elsewhere_is_refused(
    manager: CheckpointManager, marker: Path, edit: dict[str, str]
) -> None:
    evil = manager.checkpoint_dir.parent / "evil.pkl"
    evil.write_bytes(evil_pickles(marker)["os.system"])
    sidecar = manager.checkpoint_dir / f"{VICTIM}_search.json"
    sidecar.write_bytes(orjson.dumps({**orjson.loads(sidecar.read_bytes()), **edit}))
    with pytest.raises(CheckpointIntegrityError, match="edited") as info:
        manager.load_checkpoint(VICTIM)
    assert info.value.path == str(sidecar)
    # the listing comes from the payloads, so the edit changes nothing there
    row = manager.list_checkpoints(session_id=VICTIM)[0]
    assert (row["checkpoint_id"], row["stage"]) == (f"{VICTIM}_search", "search")


def test_a_symlink_in_place_of_a_checkpoint_is_not_followed(manager: CheckpointManager) -> None:
    target = pkl(manager, VICTIM, "search")
    target.unlink()
    target.symlink_to(pkl(manager, OTHER, "search"))
    with pytest.raises(CheckpointIntegrityError, match="symbolic link"):
        manager.load_checkpoint(f"{VICTIM}_search")
    assert f"{VICTIM}_search" not in {r["checkpoint_id"] for r in manager.list_checkpoints()}


def test_a_symlink_in_place_of_the_json_is_refused_and_never_followed(
    manager: CheckpointManager, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read or overwrite me")
    sidecar = manager.checkpoint_dir / f"{VICTIM}_search.json"
    sidecar.unlink()
    sidecar.symlink_to(secret)
    with pytest.raises(CheckpointIntegrityError, match="symbolic link") as info:
        manager.load_checkpoint(VICTIM)
    assert info.value.path == str(sidecar)
    assert secret.read_text() == "do not read or overwrite me"


def test_a_symlink_in_place_of_a_previous_checkpoint_breaks_the_chain(
    manager: CheckpointManager,
) -> None:
    planning = pkl(manager, VICTIM, "planning")
    planning.unlink()
    planning.symlink_to(pkl(manager, OTHER, "planning"))
    assert_refused(manager, f"{VICTIM}_search", pkl(manager, VICTIM, "search"), "chain broken")


def test_a_header_with_a_naive_timestamp_is_refused_and_not_listed(
    manager: CheckpointManager,
) -> None:
    target = pkl(manager, VICTIM, "search")
    rewrite(target, header={"created_at": "2026-01-01T00:00:00"})
    fresh = CheckpointManager(manager.checkpoint_dir)
    assert f"{VICTIM}_search" not in {r["checkpoint_id"] for r in fresh.list_checkpoints()}
    assert_refused(fresh, f"{VICTIM}_search", target, "timezone")


def test_a_forged_index_cannot_change_what_is_listed(manager: CheckpointManager) -> None:
    """The index is a cache: entries not of Prowzi's making are ignored, the headers re-read."""
    manager.list_checkpoints()
    manifest = manager.checkpoint_dir / ".index" / "manifest.jsonl"
    lines = [orjson.loads(line) for line in manifest.read_bytes().splitlines()]
    forged, hits = [], 0
    for line in lines:
        for entry in line.get("entries", []):
            if entry[0] == f"{VICTIM}_search.pkl":
                entry[4] = {**entry[4], "session_id": OTHER, "stage": "turnitin", "created_at": 5}
                hits += 1
        forged.append(orjson.dumps(line))
    assert hits == 1
    manifest.write_bytes(b"\n".join(forged) + b"\n")
    rows = {
        r["checkpoint_id"]: r for r in CheckpointManager(manager.checkpoint_dir).list_checkpoints()
    }
    assert (rows[f"{VICTIM}_search"]["session_id"], rows[f"{VICTIM}_search"]["stage"]) == (
        VICTIM,
        "search",
    )


def test_an_oversized_file_is_refused_without_reading_it_whole(
    manager: CheckpointManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cp, "_MAX_FILE", 1024)
    target = pkl(manager, VICTIM, "search")
    assert_refused(manager, f"{VICTIM}_search", target, "implausible")


def test_a_zlib_bomb_is_refused(
    tmp_path: Path, manager: CheckpointManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    compressed = CheckpointManager(tmp_path / "zipped", compression="zlib")
    save_run(compressed, VICTIM, ("intent",))
    target = pkl(compressed, VICTIM, "intent")
    bomb = zlib.compress(b"{" + b" " * (4 << 20) + b"}", 9)
    monkeypatch.setattr(cp, "_MAX_BODY", 1 << 20)
    rewrite(target, body=bomb)
    with pytest.raises(CheckpointIntegrityError, match="size limit"):
        compressed.load_checkpoint(VICTIM)


def test_a_header_that_lies_about_the_payload_hash_is_refused(manager: CheckpointManager) -> None:
    target = pkl(manager, VICTIM, "search")
    header, body = split(target)
    header["payload_sha256"] = hashlib.sha256(b"something else").hexdigest()
    target.write_bytes(cp._seal(header, body, None))
    assert_refused(manager, VICTIM, target, "payload sha256 mismatch")


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "prowzi-state-as-pickle"])
def test_the_corpus_is_live_outside_prowzi(tmp_path: Path, kind: str) -> None:
    """The control: unpickled by plain ``pickle`` (in a child process), each hostile payload
    does run and create its marker. So the refusals above are refusals of working exploits."""
    marker = tmp_path / "PWNED"
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(evil_pickles(marker)[kind])
    unpickle = "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))"
    subprocess.run(
        [sys.executable, "-c", unpickle, str(payload)],
        check=True,
        capture_output=True,
    )
    assert marker.exists()

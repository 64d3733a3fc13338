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
import sqlite3
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
    encode_body,
    full_state,
    rewrite,
    save_run,
    save_stage,
    split,
    state_after,
)

from prowzi.errors import CheckpointIntegrityError
from prowzi.storage import format as fmt
from prowzi.storage import local
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


@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("no_unpickling")
def test_an_evil_pickle_as_the_body_of_a_well_formed_container_is_refused(
    manager: CheckpointManager, marker: Path, kind: str, compression: str
) -> None:
    """Stored as its compression says, so it inflates to the pickle: which is no JSON."""
    target = pkl(manager, VICTIM, "search")
    body = fmt.compress(evil_pickles(marker)[kind], compression)  # type: ignore[arg-type]
    rewrite(target, header={"compression": compression}, body=body)
    assert_refused(manager, VICTIM, target, "unreadable payload")


@pytest.mark.usefixtures("no_unpickling")
def test_an_evil_pickle_stored_raw_under_a_compressed_header_is_refused(
    manager: CheckpointManager, marker: Path
) -> None:
    target = pkl(manager, VICTIM, "search")
    rewrite(target, body=evil_pickles(marker)["os.system"])  # the header says zstd
    assert_refused(manager, VICTIM, target, "undecodable zstd payload")
    rewrite(target, header={"compression": "zlib"})
    assert_refused(manager, VICTIM, target, "undecodable zlib payload")


def forge(
    path: Path,
    fields: dict[str, Any] | None = None,
    top: dict[str, Any] | None = None,
    header: dict[str, Any] | None = None,
) -> None:
    """Edit a checkpoint's body (its ``fields``, or its top level) and keep its header in
    agreement (the names of the fields it holds): what a forger without the key can do."""
    old_header, _ = split(path)
    body = body_of(path)
    body["fields"].update(fields or {})
    body.update(top or {})
    named = {**old_header["fields"], **{name: "0" * 64 for name in fields or {}}}
    rewrite(path, header={"fields": named, **(header or {})}, body=encode_body(body))


@pytest.mark.parametrize(
    ("fields", "top"),
    [
        ({}, {"__reduce__": ["os.system", ["touch PWNED"]]}),
        ({}, {"state": {"intent": {"prompt": "a format 2 state beside the fields"}}}),
        ({"search": {"__class__": "os.system", "args": ["touch PWNED"]}}, {}),
        ({"evil": {"py/object": "subprocess.Popen"}}, {}),
        ({"search": {"queries": 1, "sources": {}, "corpus": []}}, {}),
        ({"verification": ["not", "an", "object"]}, {}),
    ],
    ids=[
        "extra-top-level-key",
        "state-beside-fields",
        "class-tag-in-a-model",
        "unknown-state-field",
        "wrong-types",
        "wrong-type-of-a-field",
    ],
)
def test_a_json_body_outside_the_schema_is_refused(
    manager: CheckpointManager, fields: dict[str, Any], top: dict[str, Any]
) -> None:
    target = pkl(manager, VICTIM, "search")
    forge(target, fields=fields, top=top)
    assert_refused(manager, VICTIM, target, "not a Prowzi workflow state")


def test_a_body_whose_fields_differ_from_its_header_s_is_refused(
    manager: CheckpointManager,
) -> None:
    target = pkl(manager, VICTIM, "search")
    body = body_of(target)
    body["fields"]["evil"] = {"py/object": "subprocess.Popen"}
    rewrite(target, body=encode_body(body))
    assert_refused(manager, VICTIM, target, "fields differ from its header's")
    del body["fields"]["evil"], body["fields"]["search"]
    rewrite(target, body=encode_body(body))
    assert_refused(manager, VICTIM, target, "fields differ from its header's")


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
    body["fields"]["verification"]["verified"][0] = reference
    rewrite(target, body=encode_body(body))
    assert_refused(manager, VICTIM, target, match)


def test_a_source_index_without_a_search_is_refused(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "checkpoints")
    save_run(manager, VICTIM, STAGES[:4])
    target = pkl(manager, VICTIM, "verification")
    header, _ = split(target)
    assert "search" in header["refs"]  # held by the search checkpoint: the forger drops it
    body = body_of(target)
    body["fields"]["verification"]["verified"][0] = 0
    refs = {name: ref for name, ref in header["refs"].items() if name != "search"}
    forge(target, fields={"search": None, **body["fields"]}, header={"refs": refs})
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


@pytest.mark.parametrize(
    "tail",
    [b"\x01", b"\x00" * 4096 + b"\x80", b"junk" + b"\x00" * 100, b"\x00" * 20_000],
    ids=["one-byte", "zeros-then-a-byte", "junk", "zeros"],
)
@pytest.mark.parametrize("key", [None, "a key"])
def test_trailing_bytes_are_refused(tmp_path: Path, tail: bytes, key: str | None) -> None:
    """Zeros too: no write leaves padding after a checkpoint any more, so none is read past."""
    manager = CheckpointManager(tmp_path / "checkpoints", key=key)
    save_run(manager, VICTIM, STAGES[:3])
    target = pkl(manager, VICTIM, "search")
    target.write_bytes(target.read_bytes() + tail)
    assert_refused(manager, VICTIM, target, "trailing bytes")
    fresh = CheckpointManager(tmp_path / "checkpoints", key=key)
    assert [r["stage"] for r in fresh.list_checkpoints()] == ["search", "planning", "intent"]
    with pytest.raises(CheckpointIntegrityError, match="trailing bytes"):
        fresh.verify_chain(VICTIM)


def test_zeros_in_place_of_the_signature_are_refused(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "checkpoints", key="a key")
    save_run(manager, VICTIM, ("intent",))
    target = pkl(manager, VICTIM, "intent")
    whole = target.read_bytes()
    target.write_bytes(whole[:-32] + b"\x00" * 32)
    assert_refused(manager, VICTIM, target, "HMAC")
    target.write_bytes(whole[:-32])  # no signature where the header says one is
    assert_refused(manager, VICTIM, target, "truncated")
    assert_refused(CheckpointManager(tmp_path / "checkpoints"), VICTIM, target, "truncated")


def test_an_implausible_header_length_is_refused(manager: CheckpointManager) -> None:
    target = pkl(manager, VICTIM, "search")
    raw = bytearray(target.read_bytes())
    raw[len(fmt.MAGIC) : fmt._PREFIX] = (2**32 - 1).to_bytes(4, "big")
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
    rewrite(target, body=encode_body(body))  # consistent in every way but the HMAC
    assert_refused(manager, VICTIM, target, "unsigned")
    rewrite(target, body=encode_body(body), key=b"a guess")
    assert_refused(manager, VICTIM, target, "HMAC")


def test_a_payload_from_an_earlier_save_breaks_the_chain(manager: CheckpointManager) -> None:
    """A rollback: an old but genuine checkpoint put back in place of a newer one."""
    target = pkl(manager, VICTIM, "planning")
    old = target.read_bytes()
    revised = state_after("planning").model_copy(update={"stage_metrics": {"planning": 2}})
    for stage, state in (("planning", revised), ("search", state_after("search"))):
        save_stage(manager, VICTIM, stage, state=state)
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
    with pytest.raises(CheckpointIntegrityError, match="symlink"):
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
    with pytest.raises(CheckpointIntegrityError, match="symlink") as info:
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


def _catalog_rows(manager: CheckpointManager) -> dict[str, tuple[str, dict[str, Any] | None]]:
    path = manager.catalog.path
    assert path is not None
    db = sqlite3.connect(path)
    try:
        return {
            name: (etag, orjson.loads(row) if row is not None else None)
            for name, etag, row in db.execute("SELECT * FROM blobs")
        }
    finally:
        db.close()


def _forge_catalog(manager: CheckpointManager, rows: dict[str, dict[str, Any] | None]) -> None:
    """Replace catalog rows, each kept under its blob's current etag (so it looks fresh)."""
    path = manager.catalog.path
    assert path is not None
    etags = {name: etag for name, (etag, _) in _catalog_rows(manager).items()}
    db = sqlite3.connect(path)
    with db:
        for name, row in rows.items():
            data = orjson.dumps(row) if row is not None else None
            db.execute(
                "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?)",
                (name, etags.get(name, "an etag"), data),
            )
    db.close()


@pytest.mark.parametrize(
    "edit",
    [
        {"session_id": OTHER, "checkpoint_id": f"{OTHER}_turnitin", "stage": "turnitin"},
        {"stage": "turnitin"},
        {"created_at": 5},
        {"created_at": "2026-01-01T00:00:00"},  # naive
        {"pkl_path": "../../evil.pkl"},
        None,  # the checkpoint called unreadable: hidden, and a resume would fall back
    ],
    ids=["identity", "stage", "time-not-a-string", "naive-time", "foreign-key", "hidden"],
)
def test_a_forged_catalog_cannot_change_what_is_listed_or_loaded_and_is_rebuilt(
    manager: CheckpointManager, edit: dict[str, Any] | None
) -> None:
    """The catalog is a cache any writer of its file can edit: a row that is not what Prowzi
    makes of that very blob is not believed, the blob's header is read again, and the
    catalog is rebuilt from the blobs."""
    genuine = manager.list_checkpoints()
    manager.close()
    name = f"{VICTIM}_search.pkl"
    _, row = _catalog_rows(manager)[name]
    assert row is not None
    _forge_catalog(manager, {name: None if edit is None else {**row, **edit}})
    fresh = CheckpointManager(manager.checkpoint_dir)
    assert fresh.list_checkpoints() == genuine
    assert fresh.latest(VICTIM) == fresh.load_checkpoint(VICTIM).metadata
    assert fresh.load_checkpoint(VICTIM).metadata.stage == "search"
    fresh.close()
    rows = _catalog_rows(fresh)
    if edit is not None:  # rebuilt: the forged row is gone
        assert rows[name][1] == row
    assert {n for n, (_, r) in rows.items() if r is not None} >= {
        f"{s}_{stage}.pkl" for s in (VICTIM, OTHER) for stage in STAGES[:3]
    } - ({name} if edit is None else set())


def test_a_catalog_row_for_a_blob_that_is_not_there_is_not_listed(
    manager: CheckpointManager,
) -> None:
    genuine = manager.list_checkpoints()
    manager.close()
    _, row = _catalog_rows(manager)[f"{VICTIM}_search.pkl"]
    assert row is not None
    phantom = {**row, "checkpoint_id": f"{VICTIM}_turnitin", "stage": "turnitin"}
    _forge_catalog(manager, {f"{VICTIM}_turnitin.pkl": phantom})
    fresh = CheckpointManager(manager.checkpoint_dir)
    assert fresh.list_checkpoints() == genuine
    assert f"{VICTIM}_turnitin.pkl" not in _catalog_rows(fresh)


def test_an_oversized_file_is_refused_without_reading_it(
    manager: CheckpointManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "MAX_BLOB_BYTES", 1024)
    target = pkl(manager, VICTIM, "search")
    inode = target.stat().st_ino
    read = os.read
    reads: list[int] = []

    def spy(fd: int, size: int) -> bytes:
        if os.fstat(fd).st_ino == inode:
            reads.append(size)
        return read(fd, size)

    with monkeypatch.context() as patch:
        patch.setattr(os, "read", spy)
        assert_refused(manager, f"{VICTIM}_search", target, "larger than")
    assert reads == []
    assert f"{VICTIM}_search" not in {r["checkpoint_id"] for r in manager.list_checkpoints()}


@pytest.fixture
def small_max_body(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(fmt, "MAX_BODY", 1 << 20)
    return 1 << 20


def test_a_zlib_bomb_is_refused(tmp_path: Path, small_max_body: int) -> None:
    compressed = CheckpointManager(tmp_path / "zipped", compression="zlib")
    save_run(compressed, VICTIM, ("intent",))
    target = pkl(compressed, VICTIM, "intent")
    bomb = zlib.compress(b"{" + b" " * (4 * small_max_body) + b"}", 9)
    assert len(bomb) < small_max_body // 100
    rewrite(target, body=bomb)
    assert_refused(compressed, VICTIM, target, "size limit")


def test_a_zstd_bomb_is_refused(manager: CheckpointManager, small_max_body: int) -> None:
    target = pkl(manager, VICTIM, "search")
    assert split(target)[0]["compression"] == "zstd"
    bomb = fmt.compress(b"{" + b" " * (64 * small_max_body) + b"}", "zstd", 19)
    assert len(bomb) < small_max_body // 100
    rewrite(target, body=bomb)
    assert_refused(manager, VICTIM, target, "size limit")


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_a_truncated_compressed_stream_is_refused(tmp_path: Path, compression: str) -> None:
    """Cut short and sealed again with a matching size and hash: the stream is incomplete."""
    manager = CheckpointManager(tmp_path / "checkpoints", compression=compression)  # type: ignore[arg-type]
    save_run(manager, VICTIM, STAGES[:3])
    target = pkl(manager, VICTIM, "search")
    _, body = split(target)
    for cut in (len(body) - 1, len(body) // 2, 4):
        rewrite(target, body=body[:cut])
        assert_refused(manager, VICTIM, target, f"(truncated|undecodable) {compression}")


def test_a_header_that_lies_about_the_payload_hash_is_refused(manager: CheckpointManager) -> None:
    target = pkl(manager, VICTIM, "search")
    header, body = split(target)
    header["payload_sha256"] = hashlib.sha256(b"something else").hexdigest()
    target.write_bytes(b"".join(fmt.seal(header, body, None)))
    assert_refused(manager, VICTIM, target, "payload sha256 mismatch")


# --- references to parts ----------------------------------------------------------------


@pytest.mark.parametrize(
    "checkpoint",
    [f"{OTHER}_intent", "../escape_intent", "leases/victim-session", f"{VICTIM}", "a/b_intent"],
    ids=["another-session", "dot-dot", "lease-record", "no-stage", "a-path"],
)
def test_a_ref_to_outside_the_session_is_refused(
    manager: CheckpointManager, checkpoint: str
) -> None:
    """Even with the very digest the other checkpoint records for the field."""
    target = pkl(manager, VICTIM, "search")
    header, _ = split(target)
    assert header["refs"]["intent"]["checkpoint"] == f"{VICTIM}_intent"
    other = split(pkl(manager, OTHER, "intent"))[0]["fields"]["intent"]
    refs = {**header["refs"], "intent": {"checkpoint": checkpoint, "sha256": other}}
    rewrite(target, header={"refs": refs})
    error = assert_refused(manager, VICTIM, target, "not of this session")
    assert checkpoint in error.reason


def test_a_field_both_held_and_referred_to_is_refused(manager: CheckpointManager) -> None:
    target = pkl(manager, VICTIM, "search")
    intent = body_of(pkl(manager, VICTIM, "intent"))["fields"]["intent"]
    forge(target, fields={"intent": intent})
    assert "intent" in split(target)[0]["refs"]
    assert_refused(manager, VICTIM, target, "field 'intent' refers to")


def test_a_ref_with_a_digest_its_part_does_not_record_is_refused(
    manager: CheckpointManager,
) -> None:
    target = pkl(manager, VICTIM, "search")
    header, _ = split(target)
    refs = {**header["refs"], "plan": {**header["refs"]["plan"], "sha256": "0" * 64}}
    rewrite(target, header={"refs": refs})
    error = assert_refused(manager, VICTIM, target, "no longer holds field 'plan'")
    assert f"{VICTIM}_planning" in error.reason


def test_a_damaged_part_is_refused_naming_the_part(manager: CheckpointManager) -> None:
    part = pkl(manager, VICTIM, "planning")
    raw = bytearray(part.read_bytes())
    raw[-3] ^= 0x01
    part.write_bytes(bytes(raw))
    assert_refused(manager, f"{VICTIM}_search", part, "payload sha256 mismatch")


def test_with_a_key_a_forged_part_is_refused(tmp_path: Path) -> None:
    """A part is verified as a checkpoint is: with a key, its signature counts too."""
    manager = CheckpointManager(tmp_path / "checkpoints", key="s3cret")
    save_run(manager, VICTIM, STAGES[:3])
    part = pkl(manager, VICTIM, "intent")  # a part of search, not the one it links to
    body = body_of(part)
    body["fields"]["intent"]["topic"] = "a forged topic"
    rewrite(part, body=encode_body(body), key=b"a guess")
    assert_refused(manager, f"{VICTIM}_search", part, "HMAC")
    rewrite(part, body=encode_body(body))  # unsigned
    assert_refused(manager, f"{VICTIM}_search", part, "unsigned")


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

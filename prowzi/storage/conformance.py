"""The checks every blob store backend passes, and session leases over it.

An importable suite, as LangGraph's checkpoint-conformance package is for its savers: a new
backend is right when it passes every check its :class:`Capabilities` allow. The checks are
plain functions (no pytest), each raising ``AssertionError`` with a message that says what the
store did wrong. A check takes a *store opener*: a callable returning a handle on one location
(a new client each call where the backend has clients, the same object for the in-memory
store). Checks that race use one handle per thread, as separate processes would. Every check
works under names of its own (a random prefix, a random session), so all of them can run
against one location, in any order, beside other data.

With pytest::

    @pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.name)
    def test_my_store(check, tmp_path):
        caps = Capabilities(...)
        if not check.supported_by(caps):
            pytest.skip(f"my store cannot {check.requires}")
        check(lambda: MyStore(tmp_path))

Without: ``run_checks(opener, capabilities)`` runs them all and returns their outcomes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Literal, TypeVar

from prowzi.errors import InvalidIdentifierError, SessionLockedError
from prowzi.storage.blob import (
    Blob,
    BlobInfo,
    BlobNotFoundError,
    BlobStore,
    PreconditionFailedError,
    UnsafeBlobError,
)
from prowzi.storage.lease import Lease, LeaseLostError, SessionLeases

__all__ = [
    "ALL_CHECKS",
    "BLOB_CHECKS",
    "INVALID_NAMES",
    "LEASE_CHECKS",
    "Capabilities",
    "Check",
    "CheckResult",
    "StoreOpener",
    "run_checks",
]

StoreOpener = Callable[[], BlobStore]
"""Returns a handle on the store under test: every call the same location."""

T = TypeVar("T")

INVALID_NAMES: tuple[str, ...] = (
    "../x",
    "a//b",
    ".hidden",
    "",
    "a/../b",
    "a\x00b",
    "/absolute",
    "trailing/",
    "a/./b",
    "x/..",
    "with space",
    "back\\slash",
)
"""Names every store refuses with :class:`InvalidIdentifierError`, before any I/O."""

_RACERS = 8
_RACE_ROUNDS = 3
_LARGE_BLOB = (6 << 20) + 1  # above obstore's 5 MiB multipart threshold
_CLOCK_SLACK = 600.0  # seconds a store's clock may be off from ours


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do beyond the contract's core; a check needing a flag that is
    False is skipped for it."""

    durable_across_instances: bool = True
    """Each call of the opener is a new handle, and a new handle sees what another wrote (a
    process restarting). False for the in-memory store, whose opener returns one object."""
    etag_changes_on_identical_put: bool = True
    """Putting the same bytes again gives a new etag. False for S3, where a plain upload's
    etag is the MD5 of its bytes (compare-and-swap stays right: the blob holds what the
    caller read)."""
    symlink_safety: bool = False
    """Blobs are files under ``store.root``, and a symlink planted under a blob's name is
    refused, never followed (the local store)."""


@dataclass(frozen=True, slots=True)
class Check:
    """One conformance check: ``run(opener)`` raises ``AssertionError`` when the store fails."""

    name: str
    run: Callable[[StoreOpener], None]
    doc: str
    requires: tuple[str, ...] = ()
    """:class:`Capabilities` flags the check needs."""

    def supported_by(self, capabilities: Capabilities) -> bool:
        return all(getattr(capabilities, flag) for flag in self.requires)

    def __call__(self, store: BlobStore | StoreOpener) -> None:
        """Run the check on ``store`` (a store, or an opener of handles on one)."""
        if isinstance(store, BlobStore):
            the_store = store
            self.run(lambda: the_store)
        else:
            self.run(store)


BLOB_CHECKS: list[Check] = []
"""Checks of the five blob operations (each takes a store opener)."""
LEASE_CHECKS: list[Check] = []
"""Checks of :class:`~prowzi.storage.lease.SessionLeases` over the store."""

_FLAGS = frozenset(f.name for f in fields(Capabilities))


def _register(
    checks: list[Check], *requires: str
) -> Callable[[Callable[[StoreOpener], None]], Callable[[StoreOpener], None]]:
    unknown = set(requires) - _FLAGS
    if unknown:
        raise ValueError(f"unknown capabilities {sorted(unknown)}")

    def register(fn: Callable[[StoreOpener], None]) -> Callable[[StoreOpener], None]:
        doc = (fn.__doc__ or "").strip().split("\n\n")[0]
        name = fn.__name__.removeprefix("check_")
        checks.append(Check(name, fn, " ".join(doc.split()), requires))
        return fn

    return register


# -- helpers -----------------------------------------------------------------------------------


def _fail(message: str) -> AssertionError:
    return AssertionError(message)


def _expect(condition: object, message: str) -> None:
    # Not ``assert``: the suite must check under ``python -O`` too.
    if not condition:
        raise _fail(message)


def _raises(kind: type[BaseException], call: Callable[[], object], what: str) -> BaseException:
    """The ``kind`` error ``call`` raises; AssertionError when it raises nothing or another."""
    try:
        result = call()
    except kind as exc:
        return exc
    except Exception as exc:
        raise _fail(f"{what}: expected {kind.__name__}, got {type(exc).__name__}: {exc}") from exc
    raise _fail(f"{what}: expected {kind.__name__}, but it returned {result!r}")


def _namespace() -> str:
    """A fresh top-level name for one check's blobs."""
    return f"conformance-{secrets.token_hex(6)}"


def _session() -> str:
    return f"conformance-{secrets.token_hex(6)}"


def _show(data: bytes) -> str:
    return repr(data) if len(data) <= 40 else f"{len(data)} bytes starting {data[:16]!r}"


def _expect_blob(store: BlobStore, name: str, data: bytes, etag: str | None, what: str) -> Blob:
    blob = store.get(name)
    _expect(type(blob.data) is bytes, f"{what}: get returned {type(blob.data).__name__}, not bytes")
    _expect(
        blob.data == data, f"{what}: get({name!r}) returned {_show(blob.data)}, not {_show(data)}"
    )
    _expect(blob.info.name == name, f"{what}: get({name!r}) named it {blob.info.name!r}")
    _expect(
        blob.info.size == len(data),
        f"{what}: get({name!r}) gave size {blob.info.size} for {len(data)} bytes",
    )
    if etag is not None:
        _expect(
            blob.info.etag == etag,
            f"{what}: get({name!r}) gave etag {blob.info.etag!r}, put returned {etag!r}",
        )
    return blob


def _race(
    openers: Sequence[Callable[[], T]], what: str
) -> list[tuple[Literal["ok", "error"], T | BaseException]]:
    """Run each callable in its own thread, released together; their results or errors."""
    barrier = threading.Barrier(len(openers), timeout=30)
    outcomes: list[tuple[Literal["ok", "error"], T | BaseException] | None] = [None] * len(openers)

    def run(i: int) -> None:
        try:
            barrier.wait()
            outcomes[i] = ("ok", openers[i]())
        except BaseException as exc:
            outcomes[i] = ("error", exc)

    threads = [
        threading.Thread(target=run, args=(i,), name=f"conformance-{i}", daemon=True)
        for i in range(len(openers))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        _expect(not thread.is_alive(), f"{what}: a racing call did not return within 60 s")
    done: list[tuple[Literal["ok", "error"], T | BaseException]] = []
    for outcome in outcomes:
        _expect(outcome is not None, f"{what}: a racing thread recorded nothing")
        assert outcome is not None  # for the type checker; _expect said so
        done.append(outcome)
    return done


def _one_winner(
    outcomes: Sequence[tuple[Literal["ok", "error"], object]],
    loser: type[BaseException],
    what: str,
) -> int:
    """The index of the one call that succeeded; every other must have raised ``loser``."""
    winners = [i for i, (kind, _) in enumerate(outcomes) if kind == "ok"]
    for kind, value in outcomes:
        if kind == "error" and not isinstance(value, loser):
            assert isinstance(value, BaseException)
            raise _fail(
                f"{what}: a loser raised {type(value).__name__}: {value}, not {loser.__name__}"
            ) from value
    _expect(
        len(winners) == 1,
        f"{what}: {len(winners)} of {len(outcomes)} racing calls succeeded, not exactly one",
    )
    return winners[0]


# -- blob checks -------------------------------------------------------------------------------


@_register(BLOB_CHECKS)
def check_round_trip(open_store: StoreOpener) -> None:
    """put then get returns the same bytes (empty, binary), and put, get and head agree on
    name, size, etag and a plausible modification time."""
    store = open_store()
    ns = _namespace()
    for label, data in (
        ("empty", b""),
        ("binary", bytes(range(256)) * 3),
        ("text", "ünïcödé\n".encode()),
    ):
        name = f"{ns}/{label}"
        before = time.time()
        etag = store.put(name, data)
        _expect(isinstance(etag, str) and etag, f"put({name!r}) returned the etag {etag!r}")
        blob = _expect_blob(store, name, data, etag, "round trip")
        info = store.head(name)
        _expect(info is not None, f"head({name!r}) found nothing after a put")
        assert info is not None
        _expect(
            (info.name, info.size, info.etag) == (name, len(data), etag),
            f"head({name!r}) gave {info}, put wrote {len(data)} bytes with etag {etag!r}",
        )
        _expect(
            abs(blob.info.modified - before) < _CLOCK_SLACK
            and abs(info.modified - before) < _CLOCK_SLACK,
            f"{name!r} was modified at {blob.info.modified} (get) / {info.modified} (head), "
            f"written at {before}",
        )


@_register(BLOB_CHECKS)
def check_large_blob(open_store: StoreOpener) -> None:
    """A 6 MiB blob (above multipart-upload thresholds) round-trips and still honours
    create_only."""
    store = open_store()
    name = f"{_namespace()}/large"
    data = secrets.token_bytes(_LARGE_BLOB)
    etag = store.put(name, data, create_only=True)
    _expect_blob(store, name, data, etag, "large blob")
    _raises(
        PreconditionFailedError,
        lambda: store.put(name, data[:10], create_only=True),
        f"a create_only put of the existing large blob {name!r}",
    )
    _expect(store.get(name).data == data, f"a refused put changed the large blob {name!r}")


@_register(BLOB_CHECKS)
def check_missing_blob(open_store: StoreOpener) -> None:
    """get of a missing blob raises BlobNotFoundError, head returns None, delete returns
    False, and a listing of its prefix is empty."""
    store = open_store()
    ns = _namespace()
    name = f"{ns}/missing"
    err = _raises(BlobNotFoundError, lambda: store.get(name), f"get({name!r}) of a missing blob")
    _expect(isinstance(err, LookupError), "BlobNotFoundError must be a LookupError")
    _expect(store.head(name) is None, f"head({name!r}) of a missing blob is not None")
    _expect(store.delete(name) is False, f"delete({name!r}) of a missing blob did not say False")
    _expect(store.list(ns) == [], f"list({ns!r}) of nothing returned {store.list(ns)}")
    _expect(store.head(name) is None, f"delete({name!r}) of a missing blob created one")


@_register(BLOB_CHECKS)
def check_put_replaces_whole(open_store: StoreOpener) -> None:
    """A put replaces the whole blob: a short put over a long blob leaves only the short
    bytes."""
    store = open_store()
    name = f"{_namespace()}/blob"
    store.put(name, b"L" * 4096)
    etag = store.put(name, b"short")
    _expect_blob(store, name, b"short", etag, "a short put over a long blob")
    head = store.head(name)
    _expect(head is not None and head.size == 5, f"head({name!r}) after the short put: {head}")
    etag = store.put(name, b"")
    _expect_blob(store, name, b"", etag, "an empty put over a blob")


@_register(BLOB_CHECKS)
def check_etag_changes_on_every_put(open_store: StoreOpener) -> None:
    """Every put of new bytes gives a new etag, and get and head report the latest."""
    store = open_store()
    name = f"{_namespace()}/blob"
    seen: list[str] = []
    for i in range(4):
        data = f"version {i}".encode()
        etag = store.put(name, data)
        _expect(etag not in seen, f"put #{i + 1} of {name!r} reused the etag {etag!r}: {seen}")
        seen.append(etag)
        _expect_blob(store, name, data, etag, f"after put #{i + 1}")
        head = store.head(name)
        _expect(
            head is not None and head.etag == etag,
            f"head({name!r}) after put #{i + 1}: {head}, not etag {etag!r}",
        )


@_register(BLOB_CHECKS, "etag_changes_on_identical_put")
def check_etag_changes_on_identical_put(open_store: StoreOpener) -> None:
    """Putting the same bytes again still gives a new etag."""
    store = open_store()
    name = f"{_namespace()}/blob"
    first = store.put(name, b"same")
    second = store.put(name, b"same")
    _expect(first != second, f"two puts of the same bytes to {name!r} gave one etag {first!r}")


@_register(BLOB_CHECKS)
def check_create_only(open_store: StoreOpener) -> None:
    """create_only succeeds when no blob has the name and raises PreconditionFailedError,
    changing nothing, when one does (also after a delete and a new create)."""
    store = open_store()
    name = f"{_namespace()}/blob"
    etag = store.put(name, b"first", create_only=True)
    _expect_blob(store, name, b"first", etag, "a create_only put of a new name")
    _raises(
        PreconditionFailedError,
        lambda: store.put(name, b"second", create_only=True),
        f"a create_only put over the existing {name!r}",
    )
    _expect_blob(store, name, b"first", etag, "after a refused create_only put")
    _expect(store.delete(name), f"delete({name!r}) did not find the blob")
    again = store.put(name, b"third", create_only=True)
    _expect_blob(store, name, b"third", again, "a create_only put after a delete")


@_register(BLOB_CHECKS)
def check_if_match(open_store: StoreOpener) -> None:
    """if_match succeeds with the current etag (from put, get, head or list alike) and raises
    PreconditionFailedError, changing nothing, for a stale etag or a missing blob."""
    store = open_store()
    ns = _namespace()
    name = f"{ns}/blob"
    e1 = store.put(name, b"v1")
    e2 = store.put(name, b"v2", if_match=e1)
    _expect_blob(store, name, b"v2", e2, "an if_match put with the current etag")
    _raises(
        PreconditionFailedError,
        lambda: store.put(name, b"stale", if_match=e1),
        f"an if_match put to {name!r} with a stale etag",
    )
    _expect_blob(store, name, b"v2", e2, "after a refused if_match put")
    _raises(
        PreconditionFailedError,
        lambda: store.put(name, b"bogus", if_match="no-such-etag"),
        f"an if_match put to {name!r} with a made-up etag",
    )
    missing = f"{ns}/missing"
    _raises(
        PreconditionFailedError,
        lambda: store.put(missing, b"x", if_match=e2),
        f"an if_match put to the missing {missing!r}",
    )
    _expect(store.head(missing) is None, f"a refused if_match put created {missing!r}")
    # The etag every operation reports is the one if_match takes.
    etag = e2
    for source in ("get", "head", "list"):
        if source == "get":
            current = store.get(name).info.etag
        elif source == "head":
            info = store.head(name)
            _expect(info is not None, f"head({name!r}) found nothing")
            assert info is not None
            current = info.etag
        else:
            listed = store.list(name)
            _expect(len(listed) == 1, f"list({name!r}) returned {listed}")
            current = listed[0].etag
        _expect(current == etag, f"{source}({name!r}) gave etag {current!r}, put gave {etag!r}")
        data = f"via {source}".encode()
        etag = store.put(name, data, if_match=current)
        _expect_blob(store, name, data, etag, f"an if_match put with the etag from {source}")


@_register(BLOB_CHECKS)
def check_list(open_store: StoreOpener) -> None:
    """list(prefix) is recursive, sorted by name, and returns exactly the names starting with
    the prefix (a string prefix, not only whole segments), with their sizes and etags."""
    store = open_store()
    ns = _namespace()
    names = [
        f"{ns}/other",
        f"{ns}/dir/sub/two",
        f"{ns}/dir2",
        f"{ns}/dir/one",
        f"{ns}/dirt/four",
        f"{ns}/dir/sub/deeper/three",
    ]
    etags = {name: store.put(name, name.encode() * (i + 1)) for i, name in enumerate(names)}

    def expect(prefix: str, expected: list[str]) -> list[BlobInfo]:
        listed = store.list(prefix)
        got = [info.name for info in listed]
        _expect(got == sorted(expected), f"list({prefix!r}) returned {got}, not {sorted(expected)}")
        return listed

    everything = expect(f"{ns}/", names)
    expect(ns, names)
    expect(f"{ns}/dir/", [f"{ns}/dir/one", f"{ns}/dir/sub/two", f"{ns}/dir/sub/deeper/three"])
    expect(
        f"{ns}/dir",
        [
            f"{ns}/dir/one",
            f"{ns}/dir/sub/two",
            f"{ns}/dir/sub/deeper/three",
            f"{ns}/dir2",
            f"{ns}/dirt/four",
        ],
    )
    expect(f"{ns}/dir/sub/t", [f"{ns}/dir/sub/two"])
    expect(f"{ns}/dir/one", [f"{ns}/dir/one"])
    expect(f"{ns}/di", [n for n in names if n.startswith(f"{ns}/di")])
    expect(f"{ns}/nothing", [])
    expect(f"{ns}/dir/one/", [])
    for info in everything:
        i = names.index(info.name)
        _expect(
            info.size == len(info.name.encode()) * (i + 1),
            f"list gave {info.name!r} the size {info.size}",
        )
        _expect(
            info.etag == etags[info.name],
            f"list gave {info.name!r} the etag {info.etag!r}, put returned {etags[info.name]!r}",
        )
    whole = [info.name for info in store.list()]
    _expect(whole == sorted(whole), f"list() is not sorted: {whole[:20]}")
    _expect(set(names) <= set(whole), f"list() misses some of {names}")


@_register(BLOB_CHECKS)
def check_delete(open_store: StoreOpener) -> None:
    """delete reports whether the blob existed, removes only it, and the name can be
    created again."""
    store = open_store()
    ns = _namespace()
    name, sibling = f"{ns}/blob", f"{ns}/sibling"
    store.put(name, b"doomed")
    sibling_etag = store.put(sibling, b"kept")
    _expect(store.delete(name) is True, f"delete({name!r}) of an existing blob did not say True")
    _raises(BlobNotFoundError, lambda: store.get(name), f"get({name!r}) after its delete")
    _expect(store.head(name) is None, f"head({name!r}) after its delete is not None")
    _expect(store.delete(name) is False, f"a second delete({name!r}) did not say False")
    _expect([i.name for i in store.list(ns)] == [sibling], f"list after delete: {store.list(ns)}")
    _expect_blob(store, sibling, b"kept", sibling_etag, "a sibling of a deleted blob")


@_register(BLOB_CHECKS)
def check_invalid_names(open_store: StoreOpener) -> None:
    """Invalid names (``../x``, ``a//b``, ``.hidden``, empty, ``a/../b``, NUL, ...) are refused
    with InvalidIdentifierError by every operation, and nothing is written."""
    store = open_store()
    before = [info.name for info in store.list()]
    for bad in INVALID_NAMES:
        calls: list[tuple[str, Callable[[], object]]] = [
            ("get", partial(store.get, bad)),
            ("head", partial(store.head, bad)),
            ("put", partial(store.put, bad, b"x")),
            ("put create_only", partial(store.put, bad, b"x", create_only=True)),
            ("put if_match", partial(store.put, bad, b"x", if_match="e")),
            ("delete", partial(store.delete, bad)),
        ]
        for operation, call in calls:
            _raises(InvalidIdentifierError, call, f"{operation}({bad!r})")
    after = [info.name for info in store.list()]
    _expect(after == before, f"refused names changed the store: {sorted(set(after) - set(before))}")


def _race_puts(open_store: StoreOpener, name: str, racers: int, base: str | None) -> None:
    """``racers`` handles racing a conditional put of ``name``: create-only when ``base`` is
    None, else if-match ``base``. Exactly one wins, the others get PreconditionFailedError,
    and the blob holds the winner's bytes."""
    stores = [open_store() for _ in range(racers)]
    what = f"{'create_only' if base is None else 'if_match'} race on {name!r}"
    outcomes = _race(
        [
            partial(s.put, name, f"writer {i}".encode(), create_only=base is None, if_match=base)
            for i, s in enumerate(stores)
        ],
        what,
    )
    winner = _one_winner(outcomes, PreconditionFailedError, what)
    etag = outcomes[winner][1]
    assert isinstance(etag, str)
    _expect_blob(stores[0], name, f"writer {winner}".encode(), etag, "the race's winner")


@_register(BLOB_CHECKS)
def check_racing_create_only(open_store: StoreOpener) -> None:
    """Two handles racing a create_only put of one name: exactly one wins."""
    ns = _namespace()
    for round_ in range(_RACE_ROUNDS * 2):
        _race_puts(open_store, f"{ns}/race-{round_}", 2, None)


@_register(BLOB_CHECKS)
def check_racing_if_match(open_store: StoreOpener) -> None:
    """Eight handles racing if_match puts on one etag: exactly one wins."""
    ns = _namespace()
    for round_ in range(_RACE_ROUNDS):
        name = f"{ns}/race-{round_}"
        _race_puts(open_store, name, _RACERS, open_store().put(name, b"base"))


@_register(BLOB_CHECKS, "durable_across_instances")
def check_durable_across_instances(open_store: StoreOpener) -> None:
    """A new handle on the same location sees what another wrote, and their conditional
    puts see each other's etags."""
    ns = _namespace()
    first = open_store()
    name = f"{ns}/blob"
    etag = first.put(name, b"written by the first")
    second = open_store()
    _expect(second is not first, "the opener returned the same object twice")
    _expect_blob(second, name, b"written by the first", etag, "a second handle")
    etag = second.put(name, b"written by the second", if_match=etag)
    _expect_blob(first, name, b"written by the second", etag, "the first handle, after")
    _raises(
        PreconditionFailedError,
        lambda: first.put(name, b"x", create_only=True),
        "a create_only put through the first handle of a name the second wrote",
    )
    _expect_blob(open_store(), name, b"written by the second", etag, "a third handle")


@_register(BLOB_CHECKS, "symlink_safety")
def check_symlink_refused(open_store: StoreOpener) -> None:
    """A symlink planted under a blob's name is refused by get and head (UnsafeBlobError),
    left out of listings, and replaced, never followed, by a put."""
    store = open_store()
    root = getattr(store, "root", None)
    _expect(isinstance(root, Path), "symlink_safety needs a store with a `root` directory")
    assert isinstance(root, Path)
    ns = _namespace()
    outside = Path(tempfile.mkdtemp(prefix="prowzi-conformance-"))
    try:
        target = outside / "secret"
        target.write_bytes(b"not a blob")
        store.put(f"{ns}/real", b"a blob")  # creates the directory
        name = f"{ns}/link"
        os.symlink(target, root / name)
        _raises(UnsafeBlobError, lambda: store.get(name), f"get({name!r}) of a symlink")
        _raises(UnsafeBlobError, lambda: store.head(name), f"head({name!r}) of a symlink")
        listed = [info.name for info in store.list(ns)]
        _expect(listed == [f"{ns}/real"], f"list({ns!r}) with a planted symlink gave {listed}")
        _raises(
            PreconditionFailedError,
            lambda: store.put(name, b"x", create_only=True),
            f"a create_only put over the symlink {name!r}",
        )
        etag = store.put(name, b"replaced")
        _expect(target.read_bytes() == b"not a blob", "a put wrote through a planted symlink")
        _expect(not (root / name).is_symlink(), "a put left the planted symlink in place")
        _expect_blob(store, name, b"replaced", etag, "a put over a planted symlink")
    finally:
        shutil.rmtree(outside, ignore_errors=True)


# -- lease checks ------------------------------------------------------------------------------

_LONG_TTL = 60.0
_SHORT_TTL = 1.0


@_register(LEASE_CHECKS)
def check_lease_exclusive(open_store: StoreOpener) -> None:
    """While a lease is held, a second acquirer gets SessionLockedError naming the holder,
    and holder() names it."""
    session = _session()
    first = SessionLeases(open_store(), ttl=_LONG_TTL)
    second = SessionLeases(open_store(), ttl=_LONG_TTL)
    lease = first.acquire(session, owner="holder-alpha")
    _expect(lease.token >= 1, f"the first lease on {session} has token {lease.token}")
    err = _raises(
        SessionLockedError,
        lambda: second.acquire(session, owner="holder-beta"),
        f"a second acquire of the held session {session}",
    )
    _expect("holder-alpha" in str(err), f"the refusal does not name the holder: {err}")
    _expect(
        second.holder(session) == "holder-alpha",
        f"holder({session}) is {second.holder(session)!r}",
    )
    _expect(first.check(lease).token == lease.token, "check() of a held lease changed its token")
    first.release(lease)


@_register(LEASE_CHECKS)
def check_lease_release_then_acquire(open_store: StoreOpener) -> None:
    """After a release the session is free, the next acquire gets a larger token, and the old
    holder's check, renew and release no longer affect it."""
    session = _session()
    first = SessionLeases(open_store(), ttl=_LONG_TTL)
    second = SessionLeases(open_store(), ttl=_LONG_TTL)
    old = first.acquire(session, owner="holder-alpha")
    first.release(old)
    _expect(first.holder(session) is None, f"holder({session}) after release is not None")
    new = second.acquire(session, owner="holder-beta")
    _expect(new.token > old.token, f"token {new.token} after release is not above {old.token}")
    _raises(LeaseLostError, lambda: first.check(old), "check() of a released lease")
    _raises(LeaseLostError, lambda: first.renew(old), "renew() of a released lease")
    first.release(old)  # a no-op: the lease is someone else's now
    _expect(
        second.holder(session) == "holder-beta",
        f"an old holder's release freed the new lease: holder is {second.holder(session)!r}",
    )
    _expect(second.check(new).token == new.token, "the new holder's check failed")
    second.release(new)


@_register(LEASE_CHECKS)
def check_lease_expiry_takeover(open_store: StoreOpener) -> None:
    """A lease not renewed within its ttl is taken over with a larger token; the old
    holder's check and renew then raise LeaseLostError."""
    session = _session()
    stalled = SessionLeases(open_store(), ttl=_SHORT_TTL)
    other = SessionLeases(open_store(), ttl=_LONG_TTL)
    old = stalled.acquire(session, owner="holder-stalled")
    _raises(
        SessionLockedError,
        lambda: other.acquire(session, owner="holder-next"),
        "an acquire before the ttl ran out",
    )
    time.sleep(max(0.0, old.expires_at - time.time()) + 0.1)
    _expect(other.holder(session) is None, f"holder({session}) of an expired lease is not None")
    new = other.acquire(session, owner="holder-next")
    _expect(new.token > old.token, f"the takeover's token {new.token} is not above {old.token}")
    err = _raises(LeaseLostError, lambda: stalled.check(old), "check() of a taken-over lease")
    _expect("holder-next" in str(err), f"LeaseLostError does not name the new holder: {err}")
    _raises(LeaseLostError, lambda: stalled.renew(old), "renew() of a taken-over lease")
    _expect(other.holder(session) == "holder-next", "the takeover is not the holder")
    other.release(new)


@_register(LEASE_CHECKS)
def check_lease_holder_when_free(open_store: StoreOpener) -> None:
    """holder() is None for a session never leased and after a release, and renew extends
    a held lease."""
    session = _session()
    leases = SessionLeases(open_store(), ttl=_LONG_TTL)
    _expect(leases.holder(session) is None, f"holder({session}) of a fresh session is not None")
    lease = leases.acquire(session, owner="holder-alpha")
    _expect(leases.holder(session) == "holder-alpha", f"holder({session}) after acquire")
    renewed = leases.renew(lease)
    _expect(
        renewed.token == lease.token and renewed.expires_at >= lease.expires_at,
        f"renew changed the token or shortened the lease: {lease} -> {renewed}",
    )
    _expect(renewed.etag != lease.etag, "renew did not write a new lease record")
    leases.release(renewed)
    _expect(leases.holder(session) is None, f"holder({session}) after release is not None")


@_register(LEASE_CHECKS)
def check_lease_race(open_store: StoreOpener) -> None:
    """Eight acquirers racing for a free session, each through its own handle: exactly one
    gets the lease (token 1), the others SessionLockedError."""
    for _ in range(_RACE_ROUNDS):
        session = _session()
        leases = [SessionLeases(open_store(), ttl=_LONG_TTL) for _ in range(_RACERS)]
        outcomes = _race(
            [partial(lease.acquire, session, owner=f"racer-{i}") for i, lease in enumerate(leases)],
            f"acquire race on {session}",
        )
        winner = _one_winner(outcomes, SessionLockedError, f"acquire race on {session}")
        lease = outcomes[winner][1]
        assert isinstance(lease, Lease)
        _expect(lease.token == 1, f"the first lease on {session} has token {lease.token}")
        holder = leases[0].holder(session)
        _expect(holder == f"racer-{winner}", f"holder is {holder!r}, the winner racer-{winner}")
        leases[winner].release(lease)


ALL_CHECKS: list[Check] = BLOB_CHECKS + LEASE_CHECKS


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    outcome: Literal["passed", "failed", "skipped"]
    error: BaseException | None = None


def run_checks(
    open_store: StoreOpener,
    capabilities: Capabilities | None = None,
    checks: Sequence[Check] | None = None,
) -> list[CheckResult]:
    """Run ``checks`` (all of them by default) against the store; one result per check."""
    capabilities = capabilities or Capabilities()
    results = []
    for check in ALL_CHECKS if checks is None else checks:
        if not check.supported_by(capabilities):
            results.append(CheckResult(check.name, "skipped"))
            continue
        try:
            check.run(open_store)
        except Exception as exc:
            results.append(CheckResult(check.name, "failed", exc))
        else:
            results.append(CheckResult(check.name, "passed"))
    return results


if len({check.name for check in ALL_CHECKS}) != len(ALL_CHECKS):
    raise RuntimeError("two conformance checks share a name")  # test ids rely on them

"""Every blob store backend passes the conformance suite (prowzi.storage.conformance): the
in-memory reference, local files, S3 (moto's server) and Azure Blob (Azurite), the last two
real HTTP servers on loopback. Also: the suite fails stores that break the contract."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from prowzi.storage.blob import Blob, BlobInfo, InMemoryBlobStore, PreconditionFailedError
from prowzi.storage.conformance import (
    ALL_CHECKS,
    BLOB_CHECKS,
    LEASE_CHECKS,
    Capabilities,
    Check,
    StoreOpener,
    run_checks,
)
from prowzi.storage.local import LocalBlobStore
from prowzi.storage.remote import open_store

BACKENDS: dict[str, Capabilities] = {
    "memory": Capabilities(durable_across_instances=False),
    "local": Capabilities(symlink_safety=True),
    # A plain S3 upload's etag is the MD5 of its bytes: the same bytes keep it.
    "s3": Capabilities(etag_changes_on_identical_put=False),
    "azure": Capabilities(),
}


def _cases(checks: list[Check]) -> list[object]:
    return [
        pytest.param(check, backend, id=f"{check.name}-{backend}")
        for check in checks
        for backend, capabilities in BACKENDS.items()
        if check.supported_by(capabilities)
    ]


@pytest.fixture
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> StoreOpener:
    """Opens handles on one fresh store of the backend named by the test's parameter."""
    backend = request.param
    if backend == "memory":
        store = InMemoryBlobStore()
        return lambda: store
    if backend == "local":
        root = tmp_path / "store"
        return lambda: LocalBlobStore(root)
    # A fresh bucket / container; each call a new client, as another process would have.
    url = request.getfixturevalue({"s3": "s3_store", "azure": "azure_store"}[backend]).url
    return lambda: open_store(url)


@pytest.mark.parametrize(("check", "opener"), _cases(BLOB_CHECKS), indirect=["opener"])
def test_blob_store(check: Check, opener: StoreOpener) -> None:
    check.run(opener)


@pytest.mark.parametrize(("check", "opener"), _cases(LEASE_CHECKS), indirect=["opener"])
def test_session_leases(check: Check, opener: StoreOpener) -> None:
    check.run(opener)


def test_every_check_runs_on_some_backend() -> None:
    for check in ALL_CHECKS:
        assert any(check.supported_by(caps) for caps in BACKENDS.values()), check.name
        assert check.doc and not check.doc.endswith(":"), check.name
    names = [check.name for check in ALL_CHECKS]
    assert len(set(names)) == len(names)


def test_run_checks_without_pytest() -> None:
    store = InMemoryBlobStore()
    results = run_checks(lambda: store, BACKENDS["memory"])
    assert [r.name for r in results] == [check.name for check in ALL_CHECKS]
    outcomes = {r.name: r.outcome for r in results}
    assert outcomes.pop("durable_across_instances") == "skipped"
    assert outcomes.pop("symlink_refused") == "skipped"
    assert set(outcomes.values()) == {"passed"}, [r for r in results if r.error]


def test_a_check_takes_a_store_or_an_opener() -> None:
    check = next(c for c in BLOB_CHECKS if c.name == "round_trip")
    check(InMemoryBlobStore())
    store = InMemoryBlobStore()
    check(lambda: store)


# -- the suite fails broken stores -------------------------------------------------------------


class _BrokenPut(InMemoryBlobStore):
    """A store whose put does what ``broken_put`` does (each subclass breaks it its own way;
    ``InMemoryBlobStore.put`` is the reference's), the rest as the reference store."""

    def put(
        self,
        name: str,
        data: bytes,
        *,
        create_only: bool = False,
        if_match: str | None = None,
        durable: bool = True,
    ) -> str:
        return self.broken_put(name, data, create_only, if_match)

    def broken_put(self, name: str, data: bytes, create_only: bool, if_match: str | None) -> str:
        raise NotImplementedError


class _IgnoresCreateOnly(_BrokenPut):
    def broken_put(self, name: str, data: bytes, create_only: bool, if_match: str | None) -> str:
        return InMemoryBlobStore.put(self, name, data, if_match=if_match)


class _IgnoresIfMatch(_BrokenPut):
    def broken_put(self, name: str, data: bytes, create_only: bool, if_match: str | None) -> str:
        return InMemoryBlobStore.put(self, name, data, create_only=create_only)


class _UnsortedList(InMemoryBlobStore):
    def list(self, prefix: str = "") -> list[BlobInfo]:
        return super().list(prefix)[::-1]


class _SegmentPrefixList(InMemoryBlobStore):
    """Lists by whole path segments, as object stores do when asked naively."""

    def list(self, prefix: str = "") -> list[BlobInfo]:
        found = super().list(prefix)
        if prefix and not prefix.endswith("/"):
            found = [b for b in found if b.name == prefix or b.name.startswith(prefix + "/")]
        return found


class _DeleteAlwaysTrue(InMemoryBlobStore):
    def delete(self, name: str) -> bool:
        super().delete(name)
        return True


class _NoNameChecks(_BrokenPut):
    def broken_put(self, name: str, data: bytes, create_only: bool, if_match: str | None) -> str:
        with self._lock:
            self._version += 1
            etag = f"m{self._version}"
            self._blobs[name] = Blob(bytes(data), BlobInfo(name, len(data), time.time(), etag))
            return etag


class _ContentEtags(_BrokenPut):
    """Etags from the bytes alone (as S3's MD5 etags are)."""

    def broken_put(self, name: str, data: bytes, create_only: bool, if_match: str | None) -> str:
        InMemoryBlobStore.put(self, name, data, create_only=create_only, if_match=if_match)
        with self._lock:
            blob = self._blobs[name]
            etag = f"c{hash(bytes(data)) & 0xFFFFFFFF:x}"
            self._blobs[name] = Blob(blob.data, BlobInfo(name, len(data), time.time(), etag))
        return etag


class _CheckThenAct(_BrokenPut):
    """Conditional puts that test, then write, without holding the lock between."""

    def broken_put(self, name: str, data: bytes, create_only: bool, if_match: str | None) -> str:
        current = self.head(name)
        if create_only and current is not None:
            raise PreconditionFailedError(name)
        if if_match is not None and (current is None or current.etag != if_match):
            raise PreconditionFailedError(name)
        time.sleep(0.02)  # another thread tests meanwhile
        return InMemoryBlobStore.put(self, name, data)


@pytest.mark.parametrize(
    ("store_class", "failing"),
    [
        (_IgnoresCreateOnly, ["create_only", "racing_create_only", "lease_race"]),
        (_IgnoresIfMatch, ["if_match", "racing_if_match"]),
        (_UnsortedList, ["list"]),
        (_SegmentPrefixList, ["list"]),
        (_DeleteAlwaysTrue, ["missing_blob", "delete"]),
        (_NoNameChecks, ["invalid_names"]),
        (_ContentEtags, ["etag_changes_on_identical_put"]),
        (_CheckThenAct, ["racing_create_only", "racing_if_match", "lease_race"]),
    ],
    ids=lambda value: value.__name__.strip("_") if isinstance(value, type) else None,
)
def test_the_suite_fails_a_broken_store(store_class: type, failing: list[str]) -> None:
    by_name = {check.name: check for check in ALL_CHECKS}
    for name in failing:
        store = store_class()
        with pytest.raises(AssertionError):
            by_name[name](store)


def test_a_racing_check_really_races() -> None:
    """The racing puts overlap: a store that counts concurrent puts sees several at once."""
    peak = 0
    inside = 0
    lock = threading.Lock()

    class Counting(_BrokenPut):
        def broken_put(
            self, name: str, data: bytes, create_only: bool, if_match: str | None
        ) -> str:
            nonlocal inside, peak
            with lock:
                inside += 1
                peak = max(peak, inside)
            try:
                time.sleep(0.01)
                return InMemoryBlobStore.put(
                    self, name, data, create_only=create_only, if_match=if_match
                )
            finally:
                with lock:
                    inside -= 1

    next(c for c in BLOB_CHECKS if c.name == "racing_if_match")(Counting())
    assert peak > 1

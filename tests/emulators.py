"""S3 and Azure Blob emulators for the tests: moto's S3 server and Azurite, started once per
session as real subprocesses on loopback (127.0.0.1 only, free ports), stopped at the end.

Fixtures (registered in conftest.py):

- ``moto_s3`` / ``azurite`` (session): the running emulator's connection details;
- ``s3_store`` / ``azure_store`` (function): an :class:`~prowzi.storage.remote.ObjectBlobStore`
  on a fresh bucket / container, opened through ``open_store`` with the standard environment
  variables set for the test (so ``open_store(store.url)`` opens another handle on it).

A missing emulator (moto without its server extra, no ``azurite-blob`` on PATH) fails the
tests that need it; ``scripts/test`` installs both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from emulator_servers import (
    AzureEmulator,
    S3Emulator,
    new_bucket,
    new_container,
    start_azurite,
    start_moto,
)

from prowzi.storage.remote import ObjectBlobStore, open_store


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Emulator]:
    """moto's S3 server (``python -m moto.server``) on a free loopback port."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"moto's server is not installed ({exc}): scripts/test installs it")
    with start_moto(tmp_path_factory.mktemp("moto")) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureEmulator]:
    """Azurite's Blob service (``azurite-blob``) on a free loopback port, in memory."""
    try:
        with start_azurite(tmp_path_factory.mktemp("azurite")) as emulator:
            yield emulator
    except FileNotFoundError as exc:
        pytest.fail(f"{exc} (scripts/test does)")


def _set_env(monkeypatch: pytest.MonkeyPatch, prefix: str, values: dict[str, str]) -> None:
    """Only these ``prefix*`` variables: none of the machine's own reach the test."""
    for name in list(os.environ):
        if name.startswith(prefix):
            monkeypatch.delenv(name)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def s3_store(moto_s3: S3Emulator, monkeypatch: pytest.MonkeyPatch) -> ObjectBlobStore:
    """A store on a fresh moto bucket, under a key prefix, with the AWS_* variables set."""
    bucket = new_bucket(moto_s3)
    _set_env(monkeypatch, "AWS_", moto_s3.env())
    store = open_store(f"s3://{bucket}/tests/blobs")
    assert isinstance(store, ObjectBlobStore)
    return store


@pytest.fixture
def azure_store(azurite: AzureEmulator, monkeypatch: pytest.MonkeyPatch) -> ObjectBlobStore:
    """A store on a fresh Azurite container, under a key prefix, with the connection string
    set in AZURE_STORAGE_CONNECTION_STRING."""
    container = new_container(azurite)
    _set_env(monkeypatch, "AZURE", azurite.env())
    store = open_store(f"az://{container}/tests/blobs")
    assert isinstance(store, ObjectBlobStore)
    return store

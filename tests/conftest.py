"""Shared fixtures: every test runs in its own working directory with a clean PROWZI_ env."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(("PROWZI_", "OTEL_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PROWZI_INDEX_DIR", str(tmp_path / ".index"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))  # checkpoint catalogs
    monkeypatch.chdir(tmp_path)
    yield


# The S3 and Azure Blob emulators (tests/emulators.py), for the tests that ask for them.
from emulators import azure_store, azurite, moto_s3, s3_store  # noqa: E402, F401

# A real OTLP/HTTP trace receiver on loopback (tests/otlp_receiver.py).
from otlp_receiver import receiver  # noqa: E402, F401

"""Telemetry session files in a store too (``telemetry_url``): written beside the local file,
found by readers on machines that only reach the store; against LocalBlobStore, and S3."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from shared import run_cli
from telemetry_events import DOC_SESSION, RunScript, doc_example_run
from typer.testing import CliRunner

from prowzi.cli.main import app
from prowzi.errors import ConfigError, SessionNotFoundError
from prowzi.events import Event
from prowzi.storage.blob import Blob, BlobInfo, StoreUnavailableError
from prowzi.storage.local import LocalBlobStore
from prowzi.workflows import telemetry
from prowzi.workflows.telemetry import CorruptSessionError, TelemetryCollector


class Recorded:
    """A store that remembers what was asked of it (and can be made unreachable)."""

    def __init__(self, store: Any) -> None:
        self.inner = store
        self.url = store.url
        self.puts: list[tuple[str, bytes, int]] = []
        self.gets: list[str] = []
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailableError(f"{self.url} is unreachable")

    def put(self, name: str, data: bytes, **kwargs: Any) -> str:
        self._check()
        self.puts.append((name, bytes(data), threading.get_ident()))
        etag: str = self.inner.put(name, data, **kwargs)
        return etag

    def get(self, name: str) -> Blob:
        self._check()
        self.gets.append(name)
        blob: Blob = self.inner.get(name)
        return blob

    def list(self, prefix: str = "") -> list[BlobInfo]:
        self._check()
        listed: list[BlobInfo] = self.inner.list(prefix)
        return listed

    def head(self, name: str) -> BlobInfo | None:
        self._check()
        info: BlobInfo | None = self.inner.head(name)
        return info

    def delete(self, name: str) -> bool:
        self._check()
        deleted: bool = self.inner.delete(name)
        return deleted

    def describe(self, name: str) -> str:
        described: str = self.inner.describe(name)
        return described


def record(collector: TelemetryCollector, events: list[Event]) -> None:
    for event in events:
        collector.handle(event)


def three_runs(collector: TelemetryCollector) -> None:
    """Three sessions: completed, failed, and one still running."""
    record(collector, doc_example_run().events)
    failed = RunScript("elsewhere-failed", t0=1_600_000_000.0).start(prompt="an old topic")
    failed.stage("intent", 1.0).fail_stage("planning", 2.0, "planner down")
    record(collector, failed.failed("planning", "planner down").events)
    record(collector, RunScript("elsewhere-running", t0=1_800_000_000.0).start().events)
    collector.close()


@pytest.fixture
def store(tmp_path: Path) -> Recorded:
    return Recorded(LocalBlobStore(tmp_path / "store"))


# --- the writer ------------------------------------------------------------------------------


def test_each_session_file_is_also_put_in_the_store_at_the_same_moments(
    tmp_path: Path, store: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[tuple[str, bytes, int]] = []
    real = telemetry.atomic_write

    def spy(path: Path, data: bytes, **kwargs: Any) -> os.stat_result:
        written.append((path.name, data, threading.get_ident()))
        return real(path, data, **kwargs)

    monkeypatch.setattr(telemetry, "atomic_write", spy)
    collector = TelemetryCollector(tmp_path / "here", store=store)  # background snapshots
    events = doc_example_run().events
    record(collector, events[:3])
    assert collector.flush(timeout=30)  # a boundary's snapshot, written by the writer thread
    record(collector, events[3:])
    collector.close()
    # every snapshot of the file, in the same order, with the same bytes, from the same thread
    assert len(written) >= 2
    assert [(f"sessions/{name}", data, thread) for name, data, thread in written] == store.puts
    # boundaries' snapshots were off the caller's thread, as the local file's are; the final
    # one in the caller's, as the local file's is
    caller = threading.get_ident()
    assert store.puts[0][2] != caller and store.puts[-1][2] == caller
    final = (tmp_path / "here" / f"{DOC_SESSION}.json").read_bytes()
    assert store.inner.get(f"sessions/{DOC_SESSION}.json").data == final
    # only session files go to the store: event logs stay local
    assert [b.name for b in store.inner.list()] == [f"sessions/{DOC_SESSION}.json"]
    assert collector.event_log_path(DOC_SESSION).exists()


def test_a_store_that_cannot_be_written_is_counted_and_the_run_goes_on(
    tmp_path: Path, store: Recorded
) -> None:
    store.down = True
    collector = TelemetryCollector(tmp_path / "here", background=False, store=store)
    record(collector, doc_example_run().events)
    assert collector.error_counts == {"store": collector.errors} and collector.errors >= 3
    assert "unreachable" in (collector.last_error or "")
    assert collector.load_session(DOC_SESSION).success is True  # the local file is whole
    # an unusable location is counted the same way
    bad = TelemetryCollector(tmp_path / "bad", background=False, store="gs://bucket/x")
    record(bad, doc_example_run().events)
    assert bad.error_counts["store"] >= 1 and "unknown store location scheme" in (
        bad.last_error or ""
    )
    assert bad.load_session(DOC_SESSION).success is True


def test_a_rebuilt_session_file_is_put_in_the_store_too(tmp_path: Path, store: Recorded) -> None:
    collector = TelemetryCollector(tmp_path / "here", background=False, store=store)
    record(collector, doc_example_run().events)
    store.inner.delete(f"sessions/{DOC_SESSION}.json")
    rebuilt = collector.rebuild_session(DOC_SESSION)
    data = store.inner.get(f"sessions/{DOC_SESSION}.json").data
    assert orjson.loads(data) == rebuilt.to_dict()


# --- the readers ------------------------------------------------------------------------------


def test_sessions_that_exist_only_in_the_store_are_listed_and_loaded(
    tmp_path: Path, store: Recorded
) -> None:
    """Another machine: its own (empty, then one session) telemetry directory, the same store."""
    writer = TelemetryCollector(tmp_path / "machine-a", background=False, store=store)
    three_runs(writer)
    reader = TelemetryCollector(tmp_path / "machine-b", store=store)
    listed = reader.list_sessions()
    assert [(s.session_id, s.status) for s in listed] == [
        ("elsewhere-running", "running"),  # its writer is on another machine: assumed alive
        (DOC_SESSION, "completed"),
        ("elsewhere-failed", "failed"),
    ]
    assert listed == TelemetryCollector(tmp_path / "machine-a").list_sessions()
    for session_id in (DOC_SESSION, "elsewhere-failed", "elsewhere-running"):
        loaded = reader.load_session(session_id)
        assert loaded == writer.load_session(session_id)
        assert reader.status_of(loaded) == loaded.status
    # this machine's own sessions are listed with them, newest first
    local = RunScript("local-newest", t0=1_900_000_000.0).start().stage("intent", 1.0).complete()
    record(TelemetryCollector(tmp_path / "machine-b", background=False), local.events)
    assert [s.session_id for s in reader.list_sessions(limit=2)] == [
        "local-newest",
        "elsewhere-running",
    ]
    assert [s.session_id for s in reader.list_sessions(status="failed")] == ["elsewhere-failed"]
    with pytest.raises(SessionNotFoundError, match=r"in .*machine-b or .*store"):
        reader.load_session("nowhere")


def test_a_session_with_a_file_here_is_read_from_that_file(tmp_path: Path, store: Recorded) -> None:
    collector = TelemetryCollector(tmp_path / "here", background=False, store=store)
    record(collector, doc_example_run().events)
    other = dict(orjson.loads(store.inner.get(f"sessions/{DOC_SESSION}.json").data))
    other["prompt"] = "the store's copy"
    store.inner.put(f"sessions/{DOC_SESSION}.json", orjson.dumps(other))
    (row,) = collector.list_sessions()
    assert row.prompt != "the store's copy"
    assert collector.load_session(DOC_SESSION).prompt != "the store's copy"
    assert store.gets == []
    # where there is no file, the store's copy is the record
    elsewhere = TelemetryCollector(tmp_path / "elsewhere", store=store)
    assert elsewhere.load_session(DOC_SESSION).prompt == "the store's copy"


def test_the_index_remembers_store_sessions_by_etag(tmp_path: Path, store: Recorded) -> None:
    three_runs(TelemetryCollector(tmp_path / "a", background=False, store=store))
    store.gets.clear()
    first = TelemetryCollector(tmp_path / "b", store=store).list_sessions()
    assert sorted(store.gets) == sorted(b.name for b in store.inner.list("sessions/"))
    store.gets.clear()
    assert TelemetryCollector(tmp_path / "b", store=store).list_sessions() == first
    assert store.gets == []  # a second process: from the index, nothing read
    # the running session ends (another machine writes it): read again, and only it
    record(
        TelemetryCollector(tmp_path / "a", background=False, store=store),
        RunScript("elsewhere-running", t0=1_800_000_000.0).start().complete().events,
    )
    rows = {
        s.session_id: s.status
        for s in TelemetryCollector(tmp_path / "b", store=store).list_sessions()
    }
    assert store.gets == ["sessions/elsewhere-running.json"]
    assert rows["elsewhere-running"] == "completed"
    # one index per telemetry directory and store
    assert (
        TelemetryCollector(tmp_path / "b", store=store).index_path
        != TelemetryCollector(tmp_path / "b").index_path
    )


def test_a_store_that_cannot_be_listed_leaves_the_local_sessions_listed(
    tmp_path: Path, store: Recorded, caplog: pytest.LogCaptureFixture
) -> None:
    three_runs(TelemetryCollector(tmp_path / "a", background=False, store=store))
    record(
        TelemetryCollector(tmp_path / "b", background=False),
        RunScript("local", t0=1_700_000_000.0).start().complete().events,
    )
    assert len(TelemetryCollector(tmp_path / "b", store=store).list_sessions()) == 4
    store.down = True
    with caplog.at_level(logging.WARNING, logger="prowzi.telemetry"):
        rows = TelemetryCollector(tmp_path / "b", store=store).list_sessions()
    assert [s.session_id for s in rows] == ["local"]
    assert "cannot list the sessions in the telemetry store" in caplog.text
    # the store's rows were kept: back up, nothing needs reading again
    store.down = False
    store.gets.clear()
    assert len(TelemetryCollector(tmp_path / "b", store=store).list_sessions()) == 4
    assert store.gets == []


def test_a_corrupt_session_in_the_store_is_listed_corrupt(tmp_path: Path, store: Recorded) -> None:
    store.inner.put("sessions/broken.json", b'{"session_id": "broken", "pro')
    store.inner.put("sessions/not_a_session_id.json", b"{}")  # not of Prowzi's making
    store.inner.put("sessions/deeper/x.json", b"{}")
    reader = TelemetryCollector(tmp_path / "here", store=store)
    (row,) = reader.list_sessions()
    assert (row.session_id, row.status, row.error) == ("broken", "corrupt", "truncated JSON")
    with pytest.raises(CorruptSessionError, match=r"store/sessions/broken.json is corrupt"):
        reader.load_session("broken")


def test_a_bad_telemetry_url_names_the_variable_in_both_readers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prowzi.config import get_config
    from prowzi.config.paths import telemetry_url

    for value, problem in [
        ("gs://bucket", "unknown scheme 'gs'"),
        ("s3://", "no bucket"),
        (" ", "must not be empty"),
    ]:
        monkeypatch.setenv("PROWZI_TELEMETRY_URL", value)
        with pytest.raises(ConfigError) as full:
            get_config()
        with pytest.raises(ConfigError) as light:
            telemetry_url()
        assert str(light.value) == str(full.value)
        assert f"PROWZI_TELEMETRY_URL={value!r}" in str(full.value) and problem in str(full.value)
    for value in ("s3://bucket/prefix", "az://container", "file:///x", "./here"):
        monkeypatch.setenv("PROWZI_TELEMETRY_URL", value)
        assert get_config().telemetry_url == telemetry_url() == value
    monkeypatch.delenv("PROWZI_TELEMETRY_URL")
    assert get_config().telemetry_url is None and telemetry_url() is None


# --- the commands -----------------------------------------------------------------------------


def test_sessions_and_show_find_the_store_sessions_and_stay_light(
    tmp_path: Path, store: Recorded
) -> None:
    three_runs(TelemetryCollector(tmp_path / "a", background=False, store=store))
    env = {
        "PROWZI_TELEMETRY_DIR": str(tmp_path / "empty"),
        "PROWZI_TELEMETRY_URL": (tmp_path / "store").as_uri(),
    }
    cli = CliRunner()
    listed = cli.invoke(app, ["sessions", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    assert [r["session_id"] for r in json.loads(listed.stdout)] == [
        "elsewhere-running",
        DOC_SESSION,
        "elsewhere-failed",
    ]
    shown = cli.invoke(app, ["show", "elsewhere-failed", "--json"], env=env)
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["status"] == "failed" and data["event_log"] is None
    assert data["session"]["failed_stages"] == ["planning"]
    text = cli.invoke(app, ["show", DOC_SESSION], env={**env, "COLUMNS": "120"})
    assert text.exit_code == 0 and "completed" in text.stdout
    bad = cli.invoke(app, ["sessions"], env={**env, "PROWZI_TELEMETRY_URL": "gs://x"})
    assert bad.exit_code == 2 and "PROWZI_TELEMETRY_URL='gs://x'" in bad.stderr
    # a file:// store costs no obstore at start-up (pydantic-settings is the one reader of
    # the settings, and the budget of `prowzi sessions` holds with it: bench_telemetry)
    code = (
        "import sys; from prowzi.cli.main import app\n"
        "try:\n    app(['sessions'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('obstore',) if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "elsewhere-running" in proc.stdout


def test_a_run_records_its_session_in_the_configured_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prowzi.config import get_config
    from prowzi.workflows.composition import build_sinks

    monkeypatch.setenv("PROWZI_TELEMETRY_URL", str(tmp_path / "store"))
    sink, webhooks = build_sinks(get_config())  # and the webhook sink, idle until subscribed
    assert isinstance(sink, TelemetryCollector)
    assert webhooks.name == "webhook"
    record(sink, doc_example_run().events)
    sink.close()
    assert LocalBlobStore(tmp_path / "store").head(f"sessions/{DOC_SESSION}.json") is not None


def test_another_process_lists_and_shows_a_session_from_s3(tmp_path: Path, s3_store: Any) -> None:
    """One process records a session into S3 (moto); `prowzi sessions` and `prowzi show` in
    other processes, with another, empty telemetry directory, list and show it."""
    script = (
        "import sys\n"
        "from telemetry_events import RunScript\n"
        "from prowzi.workflows.telemetry import TelemetryCollector\n"
        "collector = TelemetryCollector(sys.argv[1], store=sys.argv[2])\n"
        "run = RunScript('on-s3', t0=1_900_000_000.0).start(prompt='written to S3')\n"
        "run.stage('intent', 1.0).fail_stage('planning', 2.0, 'planner down')\n"
        "for event in run.failed('planning', 'planner down').events:\n"
        "    collector.handle(event)\n"
        "collector.close()\n"
        "assert collector.errors == 0, collector.last_error\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # AWS_* from the fixture
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "writer"), s3_store.url],
        check=True,
        env=env,
        timeout=120,
    )
    assert [b.name for b in s3_store.list()] == ["sessions/on-s3.json"]
    reader_env = {
        **env,
        "PROWZI_TELEMETRY_DIR": str(tmp_path / "reader"),
        "PROWZI_TELEMETRY_URL": s3_store.url,
    }
    listed = run_cli("sessions", "--json", env=reader_env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert (row["session_id"], row["status"], row["prompt"]) == ("on-s3", "failed", "written to S3")
    assert row["failed_stages"] == ["planning"] and row["stages_completed"] == 1
    shown = run_cli("show", "on-s3", "--json", env=reader_env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["status"] == "failed" and data["session"]["metadata"]["error"] == "planner down"
    assert not (tmp_path / "reader").exists() or not any((tmp_path / "reader").iterdir())

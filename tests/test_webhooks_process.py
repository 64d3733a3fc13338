"""Webhooks across real ``prowzi`` processes: a receiver down for a whole run, a run killed
with ``kill -9`` while deliveries are pending, the ``prowzi webhooks`` commands, and the
service's subscriptions API. Receivers are real HTTP servers on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from emulator_servers import free_port
from standardwebhooks.webhooks import Webhook
from test_service import Service
from webhook_support import SECRET, Receiver, noop_agents_setting, webhook_env

from prowzi.testing import STAGES

RUN_EVENTS = ["run.started", *["stage.completed"] * len(STAGES), "run.completed"]
PROWZI = [sys.executable, "-m", "prowzi.cli.main"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver().start()
    yield found
    found.stop()


def _prowzi(
    env: dict[str, str], *args: str, cwd: Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*PROWZI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def _log(env: dict[str, str], cwd: Path) -> list[dict[str, Any]]:
    out = _prowzi(env, "webhooks", "list", "--json", "--limit", "1000", cwd=cwd).stdout
    return [orjson.loads(line) for line in out.splitlines()]


def _by_session(receiver: Receiver) -> dict[str, list[tuple[str, str]]]:
    """Session -> its (webhook-id, type) in arrival order, duplicates (by id) dropped, as
    a receiver that deduplicates sees them; every signature verified."""
    verifier = Webhook(SECRET)
    seen: set[str] = set()
    found: dict[str, list[tuple[str, str]]] = {}
    for request in receiver.delivered():
        payload = verifier.verify(request.body, request.headers)
        if request.id in seen:
            continue
        seen.add(request.id)
        found.setdefault(payload["data"]["session_id"], []).append((request.id, payload["type"]))
    return found


def test_a_receiver_down_for_the_whole_run_gets_every_event_from_a_later_process(
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens there during the run
    env = webhook_env(
        f"http://127.0.0.1:{port}/hook",
        str(tmp_path / "outbox"),
        PROWZI_WEBHOOK_RETRY_SCHEDULE="0.2s,0.2s,0.2s,0.2s,0.2s,0.2s,0.2s,0.2s,0.2s,0.2s",
        PROWZI_WEBHOOK_DRAIN_SECONDS="0.5",
    )
    ran = _prowzi(env, "run", "Write a report on webhooks", cwd=tmp_path)
    assert f"warning: {len(RUN_EVENTS)} webhook deliveries still pending" in ran.stderr
    assert [r["outcome"] for r in _log(env, tmp_path)] == ["pending"] * len(RUN_EVENTS)

    receiver = Receiver().start(port)
    try:
        delivered = _prowzi(env, "webhooks", "deliver", "--wait", "30", cwd=tmp_path)
        assert f"{len(RUN_EVENTS)} delivered or given up, 0 pending" in delivered.stdout
        (events,) = _by_session(receiver).values()
        assert [t for _, t in events] == RUN_EVENTS
        assert len(receiver.delivered()) == len(RUN_EVENTS)  # each once
        assert [r["outcome"] for r in _log(env, tmp_path)] == ["delivered"] * len(RUN_EVENTS)
    finally:
        receiver.stop()


def test_a_cli_run_writes_deliveries_for_api_subscriptions_that_a_delivering_process_sends(
    tmp_path: Path, receiver: Receiver
) -> None:
    """No endpoint in the settings: the run finds the stored subscription at its start and
    writes every event to the outbox; sending is a delivering process's business (here
    `prowzi webhooks deliver`), and each arrives once, signed with the secret the API
    showed once."""
    from prowzi.storage.remote import open_store
    from prowzi.webhooks.outbox import Outbox
    from prowzi.webhooks.subscriptions import create

    outbox = tmp_path / "outbox"
    _, secret = create(Outbox(open_store(outbox)), receiver.url, None, allow_private=True)
    env = webhook_env("", str(outbox))
    del env["PROWZI_WEBHOOK_URL"], env["PROWZI_WEBHOOK_SECRET"]
    _prowzi(env, "run", "Write a report on webhooks", "--session-id", "stored-sub", cwd=tmp_path)
    pending = _log(env, tmp_path)
    assert {r["outcome"] for r in pending} == {"pending"}
    assert [r["type"] for r in pending if r["type"] != "checkpoint.saved"] == RUN_EVENTS
    assert receiver.delivered() == []  # the run only wrote them

    sent = _prowzi(env, "webhooks", "deliver", "--wait", "30", cwd=tmp_path)
    assert f"{len(pending)} delivered or given up, 0 pending" in sent.stdout
    verifier = Webhook(secret)
    received = [verifier.verify(r.body, r.headers) for r in receiver.delivered()]
    assert [p["type"] for p in received] == [r["type"] for r in pending]
    assert {p["data"]["session_id"] for p in received} == {"stored-sub"}
    assert len({r.id for r in receiver.delivered()}) == len(received)  # each once


def test_cleanup_sweeps_old_delivery_logs_and_never_a_pending_delivery(tmp_path: Path) -> None:
    """``prowzi cleanup --older-than`` deletes a session's delivery log by its newest record;
    a session with a delivery still pending, a running one and a new one keep theirs."""
    from prowzi.workflows.checkpoint import CheckpointManager

    outbox = tmp_path / "outbox"
    env = webhook_env("", str(outbox), PROWZI_WEBHOOK_RETRY_SCHEDULE="1h")
    # The first two deliveries of each run are answered, then the receiver fails: each
    # "waiting" run leaves two logged deliveries and the rest pending.
    for sid, answered in (("old", 99), ("held", 99), ("new", 99), ("waiting", 2)):
        receiver = Receiver(
            answer=lambda n, r, answered=answered: (200 if n < answered else 500, {}, 0.0)
        ).start()
        env |= {"PROWZI_WEBHOOK_URL": receiver.url, "PROWZI_WEBHOOK_DRAIN_SECONDS": "3"}
        _prowzi(env, "run", f"Write a report on {sid}", "--session-id", sid, cwd=tmp_path)
        receiver.stop()
    before = _log(env, tmp_path)
    assert {r["session_id"] for r in before if r["outcome"] == "pending"} == {"waiting"}
    two_days_ago = time.time() - 2 * 86400
    for sid in ("old", "held", "waiting"):
        for path in outbox.glob(f"*/*/{sid}/*.json"):
            os.utime(path, (two_days_ago, two_days_ago))

    dry = _prowzi(env, "cleanup", "--older-than", "1d", "--dry-run", cwd=tmp_path)
    assert "would delete webhook delivery log of old" in dry.stdout
    assert "waiting" not in dry.stdout and "of new" not in dry.stdout
    assert _log(env, tmp_path) == before  # a dry run deletes nothing

    with CheckpointManager(tmp_path / "prowzi_checkpoints").session_lock("held"):
        done = _prowzi(env, "cleanup", "--older-than", "1d", cwd=tmp_path)
    assert done.stdout.count("deleted webhook delivery log of") == 1
    assert "deleted webhook delivery log of old" in done.stdout
    assert "deleted the webhook delivery log of 1 session(s)" in done.stderr
    assert "kept session held: it is running" in done.stderr
    after = _log(env, tmp_path)
    assert after == [r for r in before if r["session_id"] != "old"]
    assert {r["session_id"] for r in after} == {"held", "new", "waiting"}


def test_kill_9_with_deliveries_pending_then_a_later_process_delivers_each_exactly_once(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.answer = lambda n, r: (200, {}, 0.3)  # slow: most deliveries are still pending
    env = webhook_env(receiver.url, str(tmp_path / "outbox"), PROWZI_WEBHOOK_DRAIN_SECONDS="120")
    first = subprocess.Popen(
        [*PROWZI, "run", "Write a report on webhooks"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert receiver.wait_for(lambda r: len(r.requests) >= 3, timeout=60)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    pending_before = [r for r in _log(env, tmp_path) if r["outcome"] == "pending"]
    assert len(pending_before) >= len(RUN_EVENTS) - 4

    receiver.answer = lambda n, r: (200, {}, 0.0)
    second_env = {**env, "PROWZI_WEBHOOK_DRAIN_SECONDS": "30"}
    _prowzi(second_env, "run", "Write a report on webhook retries", cwd=tmp_path)
    # The run waited for its own deliveries; whatever of the killed run's is left (none,
    # usually: both sessions went in parallel) goes now.
    _prowzi(second_env, "webhooks", "deliver", "--wait", "30", cwd=tmp_path)

    sessions = _by_session(receiver)
    assert len(sessions) == 2
    for events in sessions.values():
        assert [t for _, t in events] == RUN_EVENTS  # every event, in order
    # At most the one request in flight at the kill was answered twice (same webhook-id).
    assert len(receiver.delivered()) - 2 * len(RUN_EVENTS) <= 1
    log = _log(env, tmp_path)
    assert [r["outcome"] for r in log] == ["delivered"] * 2 * len(RUN_EVENTS)
    assert len({r["id"] for r in log}) == len(log)  # each delivery logged exactly once


def test_webhooks_commands_show_redeliver_and_test(tmp_path: Path, receiver: Receiver) -> None:
    env = webhook_env(receiver.url, str(tmp_path / "outbox"), PROWZI_WEBHOOK_DRAIN_SECONDS="30")
    _prowzi(env, "run", "Write a report on webhooks", cwd=tmp_path)
    log = _log(env, tmp_path)
    assert len(log) == len(RUN_EVENTS)
    target = log[0]["id"]

    shown = _prowzi(env, "webhooks", "show", target, cwd=tmp_path).stdout
    assert "delivered after 1 attempt(s)" in shown
    assert '"type": "run.started"' in shown

    again = _prowzi(env, "webhooks", "redeliver", target, cwd=tmp_path)
    assert f"{target}: delivered" in again.stdout
    assert [r.id for r in receiver.delivered()].count(target) == 2  # same webhook-id

    tested = _prowzi(env, "webhooks", "test", cwd=tmp_path)
    assert "ok (HTTP 200" in tested.stdout
    ping = receiver.delivered()[-1]
    assert Webhook(SECRET).verify(ping.body, ping.headers)["type"] == "webhook.test"

    receiver.answer = lambda n, r: (500, {}, 0.0)
    failed = _prowzi(env, "webhooks", "test", cwd=tmp_path, check=False)
    assert failed.returncode == 1
    assert "failed (HTTP 500" in failed.stdout

    missing = _prowzi(env, "webhooks", "show", "msg_nothing", cwd=tmp_path, check=False)
    assert (missing.returncode, missing.stderr) == (1, "error: no webhook delivery msg_nothing\n")


def test_a_private_endpoint_is_refused_by_prowzi_run(tmp_path: Path) -> None:
    env = webhook_env("http://10.1.2.3/hook", str(tmp_path / "outbox"))
    del env["PROWZI_WEBHOOK_ALLOW_PRIVATE"]
    done = _prowzi(env, "run", "Write a report", cwd=tmp_path, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("error: invalid setting webhook endpoint http://10.1.2.3/hook")
    assert "10.1.2.3 is a private address" in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert SECRET not in done.stderr


def test_service_subscriptions_api_shows_a_secret_once_and_signs_with_it(
    tmp_path: Path, receiver: Receiver
) -> None:
    svc = Service(
        tmp_path,
        PROWZI_WEBHOOK_ALLOW_PRIVATE="true",
        PROWZI_AGENTS=noop_agents_setting(),
    )
    try:
        client = svc.client
        created = client.post(
            "/webhooks/subscriptions", json={"url": receiver.url, "events": ["run.completed"]}
        )
        assert created.status_code == 201, created.text
        body = created.json()
        secret, sub_id = body["secret"], body["id"]
        assert secret.startswith("whsec_")
        listed = client.get("/webhooks/subscriptions").json()
        assert [s["id"] for s in listed] == [sub_id]
        assert secret not in client.get("/webhooks/subscriptions").text

        bad = client.post("/webhooks/subscriptions", json={"url": "ftp://example.com/"})
        assert bad.status_code == 400
        unknown = client.post(
            "/webhooks/subscriptions", json={"url": receiver.url, "events": ["nope"]}
        )
        assert unknown.status_code == 400 and "unknown event type" in unknown.text

        run = client.post("/runs", json={"prompt": "Write a report on webhooks"}).json()
        assert receiver.wait_for(lambda r: len(r.delivered()) == 1, timeout=60)
        request = receiver.delivered()[0]
        payload = Webhook(secret).verify(request.body, request.headers)
        assert (payload["type"], payload["data"]["session_id"]) == (
            "run.completed",
            run["session_id"],
        )

        rotated = client.post(f"/webhooks/subscriptions/{sub_id}/rotate").json()
        assert rotated["secret"] != secret
        client.post("/runs", json={"prompt": "Write a report on rotation"})
        assert receiver.wait_for(lambda r: len(r.delivered()) == 2, timeout=60)
        second = receiver.delivered()[1]
        Webhook(rotated["secret"]).verify(second.body, second.headers)
        # for a day after a rotation, the old secret verifies too: receivers switch at leisure
        Webhook(secret).verify(second.body, second.headers)
        assert len(second.headers["webhook-signature"].split(" ")) == 2

        assert client.delete(f"/webhooks/subscriptions/{sub_id}").status_code == 204
        assert client.get("/webhooks/subscriptions").json() == []
        assert client.delete(f"/webhooks/subscriptions/{sub_id}").status_code == 404
        counted = (
            'prowzi_webhook_deliveries_total{event_type="run.completed",outcome="delivered"} 2.0'
        )
        deadline = time.monotonic() + 20  # counted once logged, just after the answer
        while counted not in client.get("/metrics").text:
            assert time.monotonic() < deadline, client.get("/metrics").text
            time.sleep(0.05)
    finally:
        svc.stop()


def test_a_subscription_made_on_one_service_gets_the_runs_of_another_sharing_its_outbox(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Two services, one outbox, the same settings. The second started before the
    subscription existed: its runs find it at their start and write their deliveries, and
    it starts sending on its own (it looks every few seconds): once the first is gone, the
    second's runs still arrive. Each delivery once, counted by the service that sent it."""
    outbox = str(tmp_path / "shared-outbox")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    settings = {
        "PROWZI_AGENTS": noop_agents_setting(),
        "PROWZI_WEBHOOK_OUTBOX": outbox,
        "PROWZI_WEBHOOK_ALLOW_PRIVATE": "true",
    }
    second = Service(tmp_path / "b", **settings)
    first = Service(tmp_path / "a", **settings)
    try:
        created = first.client.post(
            "/webhooks/subscriptions", json={"url": receiver.url, "events": ["run.completed"]}
        )
        assert created.status_code == 201, created.text
        runs = [second.client.post("/runs", json={"prompt": "Write a report"}).json()]
        assert receiver.wait_for(lambda r: len(r.delivered()) == 1, timeout=30)
        deadline = time.monotonic() + 20  # counted once logged, just after the answer
        while _delivered_count(first) + _delivered_count(second) != 1:
            assert time.monotonic() < deadline, first.client.get("/metrics").text
            time.sleep(0.05)
        sent_by_first = _delivered_count(first)
        first.stop()
        runs.append(second.client.post("/runs", json={"prompt": "Write another"}).json())
        assert receiver.wait_for(lambda r: len(r.delivered()) == 2, timeout=30)
        time.sleep(0.5)  # a duplicate would arrive now
        verifier = Webhook(created.json()["secret"])
        payloads = [verifier.verify(r.body, r.headers) for r in receiver.delivered()]
        assert [(p["type"], p["data"]["session_id"]) for p in payloads] == [
            ("run.completed", run["session_id"]) for run in runs
        ]
        deadline = time.monotonic() + 20
        while sent_by_first + _delivered_count(second) != 2:
            assert time.monotonic() < deadline, second.client.get("/metrics").text
            time.sleep(0.05)
    finally:
        first.stop()
        second.stop()


def _delivered_count(service: Service) -> float:
    """The service's count of run.completed deliveries made."""
    wanted = 'prowzi_webhook_deliveries_total{event_type="run.completed",outcome="delivered"} '
    for line in service.client.get("/metrics").text.splitlines():
        if line.startswith(wanted):
            return float(line.removeprefix(wanted))
    return 0.0


def test_the_service_refuses_a_private_subscription_without_the_allow_setting(
    tmp_path: Path,
) -> None:
    svc = Service(tmp_path, PROWZI_AGENTS=noop_agents_setting())
    try:
        answer = svc.client.post(
            "/webhooks/subscriptions", json={"url": "http://169.254.169.254/latest/meta-data"}
        )
        assert answer.status_code == 400
        assert "169.254.169.254 is a link-local address" in answer.json()["detail"]
        assert svc.client.get("/webhooks/subscriptions").json() == []
    finally:
        svc.stop()

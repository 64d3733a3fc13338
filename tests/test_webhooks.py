"""Webhooks in one process: real runs of the engine (no-op agents) deliver to real HTTP
receivers on loopback (tests/webhook_support.py), which verify every signature with the
``standardwebhooks`` package, as a receiver would."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from standardwebhooks.webhooks import Webhook
from webhook_support import SECRET, Receiver, webhook_env

from prowzi.config import ProwziConfig, get_config
from prowzi.errors import ConfigError, InvalidInputError
from prowzi.observability.metrics import ProwziMetrics
from prowzi.storage.remote import open_store
from prowzi.testing import STAGES, noop_agents
from prowzi.webhooks import Webhooks, close_all, drain, webhooks_for
from prowzi.webhooks.outbox import Outbox
from prowzi.webhooks.sink import WebhookSink
from prowzi.webhooks.subscriptions import create
from prowzi.workflows import ProwziOrchestrator

RUN_EVENTS = ["run.started", *["stage.completed"] * len(STAGES), "run.completed"]


@pytest.fixture(autouse=True)
def _workers() -> Iterator[None]:
    yield
    close_all()  # each test's worker stops and gives its outbox's lease up


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver().start()
    yield found
    found.stop()


def _config(url: str, **settings: Any) -> ProwziConfig:
    return get_config(
        webhook_url=url,
        webhook_secret=SECRET,
        webhook_allow_private=True,
        webhook_retry_schedule=settings.pop("schedule", "0.05s,0.05s,0.05s"),
        **settings,
    )


def _run(config: ProwziConfig, prompt: str = "Write a report on webhooks") -> dict[str, Any]:
    orchestrator = ProwziOrchestrator(config=config, agents=noop_agents())
    result = asyncio.run(orchestrator.run_research(prompt))
    return result.metadata


def _log(config: ProwziConfig) -> list[dict[str, Any]]:
    return webhooks_for(config).outbox.records()


def test_every_event_of_a_run_arrives_once_in_order_with_a_verifiable_signature(
    receiver: Receiver,
) -> None:
    config = _config(receiver.url, enable_checkpointing=True)
    sessions = [_run(config)["session_id"], _run(config)["session_id"]]
    assert drain(config, 20) == 0

    verifier = Webhook(SECRET)
    per_session: dict[str, list[str]] = {sid: [] for sid in sessions}
    ids = []
    for request in receiver.delivered():
        payload = verifier.verify(request.body, request.headers)  # raises if forged
        assert payload["version"] == 1
        per_session[payload["data"]["session_id"]].append(payload["type"])
        ids.append(request.id)
        assert len(request.body) < 1024  # a summary, never the document itself
        assert b"produced by a no-op agent" not in request.body
    assert len(ids) == len(set(ids)) == len(receiver.requests)  # once each, no retries
    expected = ["run.started"]
    for _stage in STAGES:
        expected += ["stage.completed", "checkpoint.saved"]
    expected.append("run.completed")
    for sid in sessions:
        assert per_session[sid] == expected
    first = receiver.delivered()[1].json()
    assert first["data"]["stage"] == STAGES[0]
    assert first["data"]["attempt"] == 1
    assert first["data"]["links"]["run"] == f"/runs/{sessions[0]}"
    assert {r["outcome"] for r in _log(config)} == {"delivered"}


def test_a_receiver_answering_500_twice_then_200_gets_the_third_try_after_backoff(
    receiver: Receiver,
) -> None:
    receiver.answer = lambda n, r: (500 if n < 2 else 200, {}, 0.0)
    config = _config(receiver.url, schedule="0.4s,0.8s", webhook_events="run.started")
    _run(config)
    assert drain(config, 20) == 0

    assert [r.status for r in receiver.requests] == [500, 500, 200]
    assert len({r.id for r in receiver.requests}) == 1
    times = [r.at for r in receiver.requests]
    first, second = times[1] - times[0], times[2] - times[1]
    assert first >= 0.4 * 0.75  # the schedule's delays, jittered by at most 25%
    assert second >= 0.8 * 0.75
    (record,) = _log(config)
    assert (record["outcome"], record["attempts"], record["last_status"]) == ("delivered", 3, 200)


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(receiver: Receiver, status: int) -> None:
    receiver.answer = lambda n, r: (status, {"Retry-After": "1"}, 0.0) if n == 0 else (200, {}, 0)
    config = _config(receiver.url, schedule="0.01s", webhook_events="run.started")
    _run(config)
    assert drain(config, 20) == 0

    assert [r.status for r in receiver.requests] == [status, 200]
    assert receiver.requests[1].at - receiver.requests[0].at >= 0.95


def test_410_disables_the_endpoint(receiver: Receiver) -> None:
    receiver.answer = lambda n, r: (410, {}, 0.0)
    config = _config(receiver.url)
    _run(config)
    assert drain(config, 20) == 0

    assert len(receiver.requests) == 1  # nothing more was sent after the 410
    outcomes = [r["outcome"] for r in _log(config)]
    assert outcomes == ["disabled"] * len(RUN_EVENTS)
    webhooks = webhooks_for(config)
    (endpoint,) = webhooks.subscriptions()
    assert webhooks.outbox.endpoint_state(endpoint)["disabled"] is True
    _run(config)  # a later run's deliveries are logged, not sent
    assert drain(config, 20) == 0
    assert len(receiver.requests) == 1
    assert [r["outcome"] for r in _log(config)] == ["disabled"] * 2 * len(RUN_EVENTS)


def test_an_endpoint_enabled_again_gets_what_it_missed_redelivered(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.answer = lambda n, r: (410 if n == 0 else 200, {}, 0.0)
    config = _config(receiver.url, webhook_events="run.started,run.completed")
    _run(config)
    assert drain(config, 20) == 0
    log = _log(config)
    missed, endpoint = [r["id"] for r in log], log[0]["endpoint"]
    assert len(missed) == 2
    close_all()  # the commands below deliver, in processes of their own

    env = webhook_env(receiver.url, str(config.webhook_outbox_location))
    command = [sys.executable, "-m", "prowzi.cli.main", "webhooks"]
    for args in (["enable", endpoint], *(["redeliver", m] for m in missed)):
        done = subprocess.run([*command, *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert [r.id for r in receiver.delivered()] == missed
    again = subprocess.run([*command, "enable", endpoint], env=env, capture_output=True, text=True)
    assert (again.returncode, again.stderr) == (1, f"error: endpoint {endpoint} is not disabled\n")


def test_another_4xx_fails_that_delivery_and_the_next_goes_on(receiver: Receiver) -> None:
    receiver.answer = lambda n, r: (400 if n == 0 else 200, {}, 0.0)
    config = _config(receiver.url)
    _run(config)
    assert drain(config, 20) == 0

    log = _log(config)
    assert [(r["type"], r["outcome"], r["attempts"]) for r in log[:2]] == [
        ("run.started", "failed", 1),
        ("stage.completed", "delivered", 1),
    ]
    assert [r["outcome"] for r in log[2:]] == ["delivered"] * (len(RUN_EVENTS) - 2)


def test_a_slow_receiver_never_slows_the_run(receiver: Receiver) -> None:
    receiver.answer = lambda n, r: (200, {}, 3.0)  # three seconds per answer
    config = _config(receiver.url)
    started = time.perf_counter()
    metadata = _run(config)
    took = time.perf_counter() - started
    # The run ended before the receiver's first answer (delivering its events one after
    # another takes 27 s): it waited for the outbox, never for the receiver.
    assert took < 3.0, took
    assert metadata.get("sink_errors") is None
    pending = [r for r in _log(config) if r["outcome"] == "pending"]
    assert len(pending) == len(RUN_EVENTS)


def test_a_private_address_is_refused_without_the_allow_setting() -> None:
    with pytest.raises(ConfigError) as literal:
        get_config(webhook_url="http://169.254.169.254/latest", webhook_secret=SECRET)
    assert "169.254.169.254 is a link-local address" in str(literal.value)
    assert "PROWZI_WEBHOOK_ALLOW_PRIVATE" in str(literal.value)
    assert SECRET not in str(literal.value)

    # A host name is checked after DNS resolution: this machine's name resolves to loopback.
    host = socket.gethostname()
    addresses = {info[4][0] for info in socket.getaddrinfo(host, 80)}
    assert all(a.startswith("127.") or a == "::1" for a in addresses), addresses
    outbox = Outbox(webhooks_for(get_config()).outbox.store)
    with pytest.raises(InvalidInputError) as resolved:
        create(outbox, f"http://{host}:9/hook", None, allow_private=False)
    assert f"{host} resolves to 127." in str(resolved.value)


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("[2002:7f00:1::]", "127.0.0.1 is a loopback address"),  # 6to4 around loopback
        ("[2002:a00:1::]", "10.0.0.1 is a private address"),  # 6to4 around a private one
        ("[::ffff:a00:1]", "10.0.0.1 is a private address"),  # IPv4-mapped
        ("[fec0::1]", "fec0::1 is a site-local address"),
        ("[fd00::1]", "fd00::1 is a private address"),
    ],
)
def test_ipv6_forms_of_private_addresses_are_refused(host: str, why: str) -> None:
    """IPv6 addresses that carry a private IPv4 one, and site-local ones (review finding)."""
    with pytest.raises(ConfigError) as refused:
        get_config(webhook_url=f"http://{host}/hook", webhook_secret=SECRET)
    assert why in str(refused.value)


def test_a_name_resolving_to_loopback_gets_no_delivery(receiver: Receiver) -> None:
    host = socket.gethostname()
    config = _config(receiver.url.replace("127.0.0.1", host), webhook_events="run.started")
    config.webhook_allow_private = False  # as set in production; the name is no literal
    _run(config)
    assert drain(config, 20) == 0

    assert receiver.requests == []
    (record,) = _log(config)
    assert record["outcome"] == "failed"
    assert record["last_error"].startswith(f"refused: {host} resolves to 127.")


def test_a_redirect_is_not_followed(receiver: Receiver) -> None:
    target = Receiver().start()
    try:
        receiver.answer = lambda n, r: (302, {"Location": target.url}, 0.0)
        config = _config(receiver.url, webhook_events="run.started")
        _run(config)
        assert drain(config, 20) == 0
        assert len(receiver.requests) == 1
        assert target.requests == []
        (record,) = _log(config)
        assert record["outcome"] == "failed"
        assert "redirect not followed" in record["last_error"]
    finally:
        target.stop()


def test_metrics_count_deliveries_and_watch_the_outbox(receiver: Receiver) -> None:
    receiver.answer = lambda n, r: (500 if n == 0 else 200, {}, 0.0)
    config = _config(receiver.url)
    registry = CollectorRegistry()
    metrics = ProwziMetrics(registry)
    metrics.watch_webhooks(webhooks_for(config).deliverer)
    _run(config)
    assert drain(config, 20) == 0

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    total = "prowzi_webhook_deliveries_total"
    assert value(total, event_type="run.started", outcome="retrying") == 1
    assert value(total, event_type="run.started", outcome="delivered") == 1
    assert value(total, event_type="stage.completed", outcome="delivered") == len(STAGES)
    assert value("prowzi_webhook_delivery_duration_seconds_count") == len(RUN_EVENTS) + 1
    assert value("prowzi_webhook_outbox_depth") == 0
    assert value("prowzi_webhook_outbox_oldest_pending_age_seconds") == 0

    receiver.answer = lambda n, r: (503, {"Retry-After": "60"}, 0.0)
    _run(config)
    assert receiver.wait_for(lambda r: any(q.status == 503 for q in r.requests))
    assert value("prowzi_webhook_outbox_depth") == len(RUN_EVENTS)
    assert value("prowzi_webhook_outbox_oldest_pending_age_seconds") > 0


def test_the_outbox_lives_beside_the_checkpoints(tmp_path: Path) -> None:
    config = get_config(checkpoint_dir=tmp_path / "state" / "checkpoints")
    assert config.webhook_outbox_location == tmp_path / "state" / "prowzi_webhooks"
    config = get_config(checkpoint_url="s3://bucket/prefix")
    assert config.webhook_outbox_location == "s3://bucket/prefix/webhooks"


def test_the_readme_verification_example_verifies_a_real_delivery(receiver: Receiver) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Webhooks\n", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    secret = section.split("export PROWZI_WEBHOOK_SECRET=", 1)[1].split()[0]
    assert secret in example
    namespace: dict[str, Any] = {}
    exec(example, namespace)

    config = get_config(
        webhook_url=receiver.url,
        webhook_secret=secret,
        webhook_allow_private=True,
        webhook_events="run.completed",
    )
    sid = _run(config)["session_id"]
    assert drain(config, 20) == 0
    (request,) = receiver.delivered()
    payload = namespace["receive"](request.body, request.headers)
    assert (payload["type"], payload["data"]["session_id"]) == ("run.completed", sid)
    with pytest.raises(Exception, match="No matching signature"):
        namespace["receive"](request.body.replace(b"run.completed", b"run.failed"), request.headers)


def test_several_endpoints_from_prowzi_webhooks_each_get_their_events(
    receiver: Receiver,
) -> None:
    other = Receiver().start()
    try:
        endpoints = [
            {"url": receiver.url, "secret": SECRET, "events": ["run.started", "run.completed"]},
            {"url": other.url, "secret": SECRET},
        ]
        config = get_config(webhooks=orjson.dumps(endpoints).decode(), webhook_allow_private=True)
        _run(config)
        assert drain(config, 20) == 0
        verifier = Webhook(SECRET)
        assert [verifier.verify(r.body, r.headers)["type"] for r in receiver.delivered()] == [
            "run.started",
            "run.completed",
        ]
        assert [r.json()["type"] for r in other.delivered()] == RUN_EVENTS
    finally:
        other.stop()
    with pytest.raises(ConfigError) as bad:
        get_config(webhooks='[{"url": "http://example.com/", "secret": "whsec_short"}]')
    assert "webhooks (PROWZI_WEBHOOKS): item 0:" in str(bad.value)
    assert "whsec_short" not in str(bad.value)


class _FlakyThenBroken:
    """Verification fails transiently on its first attempt, then for good."""

    async def __call__(self, ctx: Any) -> Any:
        from prowzi.errors import PermanentError, TransientError

        if ctx.attempt == 1:
            raise TransientError("the index is busy")
        raise PermanentError("the sources are unreadable")


class _Stuck:
    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def __call__(self, ctx: Any) -> Any:
        self.entered.set()
        await asyncio.Event().wait()


def test_failures_retries_and_cancellations_are_sent(receiver: Receiver) -> None:
    config = _config(receiver.url, retry_backoff_base=0.0, retry_backoff_max=0.0)
    agents = {**noop_agents(), "verification": _FlakyThenBroken()}
    orchestrator = ProwziOrchestrator(config=config, agents=agents)
    with pytest.raises(Exception, match="verification"):
        asyncio.run(orchestrator.run_research("Write a report on failures"))

    stuck = _Stuck()
    cancelled = ProwziOrchestrator(config=config, agents={**noop_agents(), "search": stuck})

    async def cancel_midway() -> None:
        task = asyncio.create_task(cancelled.run_research("Write a report on patience"))
        await stuck.entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    assert drain(config, 20) == 0

    sessions: dict[str, list[dict[str, Any]]] = {}
    for request in receiver.delivered():  # in order per session (sessions go in parallel)
        payload = request.json()
        sessions.setdefault(payload["data"]["session_id"], []).append(payload)
    failed_run, cancelled_run = sessions.values()
    assert [p["type"] for p in failed_run] == [
        "run.started",
        "stage.completed",
        "stage.completed",
        "stage.completed",
        "stage.retrying",
        "stage.failed",
        "run.failed",
    ]
    retrying, failed, run_failed = failed_run[-3:]
    assert (retrying["data"]["stage"], retrying["data"]["attempt"]) == ("verification", 1)
    assert retrying["data"]["error"] == "TransientError: the index is busy"
    assert (failed["data"]["attempt"], failed["data"]["error_type"]) == (2, "permanent")
    assert run_failed["data"]["stage"] == "verification"
    assert [p["type"] for p in cancelled_run] == [
        "run.started",
        "stage.completed",
        "stage.completed",
        "run.cancelled",
    ]


def test_a_receiver_that_never_answers_times_out_and_gets_a_retry(receiver: Receiver) -> None:
    receiver.answer = lambda n, r: (200, {}, 5.0) if n == 0 else (200, {}, 0.0)
    config = _config(receiver.url, webhook_events="run.started", webhook_timeout_seconds=0.5)
    _run(config)
    assert drain(config, 20) == 0
    (record,) = _log(config)
    assert (record["outcome"], record["attempts"]) == ("delivered", 2)
    assert len(receiver.requests) == 2


def test_an_endless_answer_is_not_read() -> None:
    """A receiver that answers 200 and then streams for ever: the delivery is done with the
    status (reading the body would never end)."""
    import socketserver

    class Endless(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)
            self.request.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (1024, b"x" * 1024)
            try:
                while True:
                    self.request.sendall(chunk)
            except OSError:
                pass  # the client hung up: what we want

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Endless)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        config = _config(url, webhook_events="run.started")
        _run(config)
        assert drain(config, 20) == 0
        (record,) = _log(config)
        assert (record["outcome"], record["last_status"]) == ("delivered", 200)
    finally:
        server.shutdown()
        server.server_close()


def test_an_answer_that_drips_then_resets_after_its_200_is_delivered_at_once() -> None:
    """A receiver that sends its 200, then a byte every half second, then resets: one attempt,
    delivered, in about the time of the status (review finding: the body was read with a
    timeout per chunk, so the attempt took 6 s under a 1 s timeout and then retried)."""
    import socket
    import socketserver
    import struct

    class Drip(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)
            self.request.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
            try:
                for _ in range(12):
                    time.sleep(0.5)
                    self.request.sendall(b"x")
            except OSError:
                return  # the client hung up
            linger = struct.pack("ii", 1, 0)  # close with a reset
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        config = _config(url, webhook_events="run.started", webhook_timeout_seconds=1.0)
        _run(config)
        started = time.monotonic()
        assert drain(config, 20) == 0
        assert time.monotonic() - started < 3.0
        (record,) = _log(config)
        assert (record["outcome"], record["attempts"], record["last_status"]) == (
            "delivered",
            1,
            200,
        )
    finally:
        server.shutdown()
        server.server_close()


def test_secrets_never_reach_the_logs(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    receiver.answer = lambda n, r: (500, {}, 0.0) if n == 0 else (410, {}, 0.0)
    config = _config(receiver.url)
    _run(config)
    assert drain(config, 20) == 0
    stored = b"".join(p.read_bytes() for p in Path(config.webhook_outbox_location).rglob("*.json"))
    assert SECRET.encode() not in stored  # settings' secrets stay in the settings
    assert caplog.records
    assert SECRET not in caplog.text
    assert SECRET.removeprefix("whsec_") not in caplog.text


def test_a_process_without_the_delivery_lease_waits_for_the_holder_to_deliver(
    receiver: Receiver,
) -> None:
    """Two deliverers on one outbox (a service and a `prowzi run`, say): only the lease
    holder sends; the other's run waits for its own entries to leave the outbox."""
    config = _config(receiver.url)
    holder = webhooks_for(config)
    assert receiver.wait_for(lambda r: holder.deliverer.holds_lease, timeout=10)
    other = Webhooks(config).start()
    try:
        orchestrator = ProwziOrchestrator(
            config=get_config(), agents=noop_agents(), sinks=[WebhookSink(other)]
        )
        asyncio.run(orchestrator.run_research("Write a report on sharing"))
        assert not other.deliverer.holds_lease
        assert other.deliverer.drain(other.deliverer.unfinished(), 20) == []
        (events,) = _by_session(receiver).values()
        assert events == RUN_EVENTS
        assert len(receiver.requests) == len(RUN_EVENTS)  # each sent once, by the holder
    finally:
        other.deliverer.stop()


def test_a_run_that_started_before_the_first_subscription_writes_nothing_of_itself(
    tmp_path: Path,
) -> None:
    """One orchestrator for every run (a worker's), no endpoint in the settings. The
    subscription is stored while the first run is in its first stage: that run writes
    nothing (not the rest of a run without its run.started); the next one writes every
    event, in order. Neither starts a delivery worker: that is a delivering process's."""
    from prowzi.agents.base import StageContext
    from prowzi.testing import noop_result
    from prowzi.webhooks import running

    config = get_config(checkpoint_dir=tmp_path / "checkpoints", webhook_allow_private=True)
    outbox = Outbox(open_store(config.webhook_outbox_location))

    async def subscribe_during_intent(ctx: StageContext) -> Any:
        if not outbox.stored_subscriptions():
            create(outbox, "http://127.0.0.1:9/hook", None, allow_private=True)
        return noop_result("intent", ctx)

    agents = {**noop_agents(), "intent": subscribe_during_intent}
    orchestrator = ProwziOrchestrator(config=config, agents=agents)
    for session in ("first", "second"):  # a failed run would raise
        asyncio.run(orchestrator.run_research("Write a report", session_id=session))
    written = outbox.records()
    assert {r["session_id"] for r in written} == {"second"}
    assert [r["type"] for r in written if r["type"] != "checkpoint.saved"] == RUN_EVENTS
    assert {r["outcome"] for r in written} == {"pending"}
    assert running(config) is None


def test_a_subscription_made_mid_run_gets_nothing_of_that_run(tmp_path: Path) -> None:
    """With the webhooks running here (as in the service, whose worker reloads the
    subscriptions every second), a second subscription made while a run is in its first
    stage gets nothing of that run; the first gets all of it."""
    from prowzi.agents.base import StageContext
    from prowzi.testing import noop_result

    config = get_config(
        checkpoint_dir=tmp_path / "checkpoints",
        webhook_allow_private=True,
        webhook_retry_schedule="1h",
    )
    hub = webhooks_for(config)
    hub.deliverer.stop()  # only the reload matters here; nothing is sent
    first, _ = create(hub.outbox, "http://127.0.0.1:9/first", None, allow_private=True)
    hub.reload()

    async def subscribe_during_intent(ctx: StageContext) -> Any:
        create(hub.outbox, "http://127.0.0.1:9/second", None, allow_private=True)
        hub.reload()  # what the worker's scan does within a second
        return noop_result("intent", ctx)

    agents = {**noop_agents(), "intent": subscribe_during_intent}
    asyncio.run(
        ProwziOrchestrator(config=config, agents=agents).run_research(
            "Write a report", session_id="mid"
        )
    )
    by_endpoint: dict[str, list[str]] = {}
    for record in hub.outbox.records(session_id="mid"):
        by_endpoint.setdefault(record["endpoint"], []).append(record["type"])
    assert list(by_endpoint) == [first.id]
    assert [t for t in by_endpoint[first.id] if t != "checkpoint.saved"] == RUN_EVENTS


def test_a_run_whose_start_timed_out_writes_no_half_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox answers too slowly at a run's start (longer than the sink timeout): the
    run goes on, and none of its later events is written without its start; the next run,
    with the outbox quick again, writes all of itself."""
    from prowzi.agents.base import StageContext
    from prowzi.testing import noop_result

    config = get_config(checkpoint_dir=tmp_path / "checkpoints", webhook_allow_private=True)
    outbox = Outbox(open_store(config.webhook_outbox_location))
    create(outbox, "http://127.0.0.1:9/hook", None, allow_private=True)
    quick = Webhooks.reload

    def slow(self: Webhooks) -> None:
        time.sleep(0.6)
        quick(self)

    async def a_while(ctx: StageContext) -> Any:
        await asyncio.sleep(0.15)  # the run is still going when the abandoned start ends
        return noop_result(ctx.stage, ctx)

    monkeypatch.setattr(Webhooks, "reload", slow)
    agents = {stage: a_while for stage in STAGES}
    orchestrator = ProwziOrchestrator(config=config, agents=agents, sink_timeout=0.2)
    asyncio.run(orchestrator.run_research("Write a report", session_id="slow"))
    monkeypatch.setattr(Webhooks, "reload", quick)
    asyncio.run(orchestrator.run_research("Write a report", session_id="quick"))
    slow_types = [r["type"] for r in outbox.records(session_id="slow")]
    assert slow_types in ([], ["run.started"])
    quick_types = [r["type"] for r in outbox.records(session_id="quick")]
    assert [t for t in quick_types if t != "checkpoint.saved"] == RUN_EVENTS


_WITHOUT_THE_EXTRA = """
import sys

sys.modules.update(httpx=None, standardwebhooks=None)
"""
"""Python that runs as if the ``webhooks`` extra were not installed (a module set to None
in sys.modules is one that import and find_spec do not find)."""


def _without_the_extra(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PROWZI_", "OTEL_"))}
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_THE_EXTRA + script],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_process_without_the_webhooks_extra_still_writes_for_stored_subscriptions(
    tmp_path: Path,
) -> None:
    """Writing the outbox needs neither httpx nor standardwebhooks (sending does): a run in
    a process that cannot import them writes its deliveries and no sink fails."""
    outbox = tmp_path / "outbox"
    create(Outbox(open_store(outbox)), "http://127.0.0.1:9/hook", None, allow_private=True)
    script = f"""
import asyncio
from prowzi.config import get_config
from prowzi.testing import noop_agents
from prowzi.workflows import ProwziOrchestrator

errors = []
config = get_config(webhook_outbox={str(outbox)!r}, checkpoint_dir={str(tmp_path / "cp")!r})
orchestrator = ProwziOrchestrator(
    config=config, agents=noop_agents(), on_sink_error=lambda name, exc: errors.append(exc)
)
asyncio.run(orchestrator.run_research("Write a report", session_id="no-extra"))
assert not errors, errors
assert sys.modules["httpx"] is None and sys.modules["standardwebhooks"] is None
"""
    done = _without_the_extra(script)
    assert done.returncode == 0, done.stderr
    written = Outbox(open_store(outbox)).records(session_id="no-extra")
    assert [r["type"] for r in written if r["type"] != "checkpoint.saved"] == RUN_EVENTS


def test_prowzi_webhooks_test_without_the_extra_says_what_to_install(tmp_path: Path) -> None:
    script = """
import runpy
sys.argv = ["prowzi", "webhooks", "test"]
runpy.run_module("prowzi.cli.main", run_name="__main__")
"""
    done = _without_the_extra(
        script,
        PROWZI_WEBHOOK_URL="http://127.0.0.1:9/hook",
        PROWZI_WEBHOOK_SECRET=SECRET,
        PROWZI_WEBHOOK_ALLOW_PRIVATE="true",
        PROWZI_WEBHOOK_OUTBOX=str(tmp_path / "outbox"),
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "pip install 'prowzi[webhooks]'" in line


def _by_session(receiver: Receiver) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for request in receiver.delivered():
        payload = Webhook(SECRET).verify(request.body, request.headers)
        found.setdefault(payload["data"]["session_id"], []).append(payload["type"])
    return found

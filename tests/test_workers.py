"""Celery workers on a real redis-server: exactly one runner per session, whatever the queue
delivers, and nothing completed lost when a worker or the broker goes away (issue 19).

Every test starts real ``prowzi worker`` processes (tests/workers.py) on its own Redis
database of one ``redis-server`` on loopback; agents are no-ops that sleep a little per stage
(tests/test_service_support.py), so a run lasts long enough to be interrupted in the middle."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from emulator_servers import RedisServer, start_redis
from test_service_support import agent
from workers import Fleet, wait_for

from prowzi.config import ProwziConfig, get_config
from prowzi.workers.app import submit
from prowzi.workflows.checkpoint import CheckpointManager
from prowzi.workflows.orchestrator import ProwziOrchestrator
from prowzi.workflows.stages import STAGE_NAMES

pytestmark = pytest.mark.timeout(120)

_DATABASES = iter(range(1, 16))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with start_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def fleet(redis_server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    """Workers sharing a fresh Redis database, store and telemetry directory."""
    url = redis_server.url.rsplit("/", 1)[0] + f"/{next(_DATABASES)}"
    fleet = Fleet(root=tmp_path / "fleet", broker_url=url)
    fleet.root.mkdir()
    try:
        yield fleet
    finally:
        fleet.stop()


def _single_process_document(prompt: str, root: Path) -> str:
    """The document an ordinary one-process run writes for ``prompt`` with the same agents."""
    orchestrator = ProwziOrchestrator(
        config=_local_config(root), agents={s: agent(_local_config(root)) for s in STAGE_NAMES}
    )
    path = root / "single.md"
    asyncio.run(orchestrator.run_research(prompt, document_path=path))
    return path.read_text()


def _local_config(root: Path) -> ProwziConfig:
    return get_config(
        checkpoint_dir=root / "single-checkpoints",
        telemetry_dir=root / "single-telemetry",
        enable_checkpointing=True,
    )


def _stage_starts(fleet: Fleet, session_id: str) -> dict[str, int]:
    starts: dict[str, int] = {}
    for event in fleet.events(session_id):
        if event.get("event") == "stage_started":
            starts[event["stage"]] = starts.get(event["stage"], 0) + 1
    return starts


def _runs(fleet: Fleet, session_id: str) -> list[dict[str, object]]:
    return [e for e in fleet.events(session_id) if e.get("event") == "workflow_started"]


def test_twenty_runs_on_three_workers_each_complete_once_with_the_single_process_document(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.stage_delay = 0.02
    workers = fleet.start(3, concurrency=2)
    config = fleet.config()
    prompts = [f"Write a report on topic number {i}" for i in range(20)]
    sessions = [submit(config, prompt) for prompt in prompts]
    wait_for("20 runs to complete", lambda: fleet.done(sessions), timeout=60)

    for prompt, sid in zip(prompts, sessions, strict=True):
        assert fleet.completions(sid) == 1, fleet.events(sid)
        assert len(_runs(fleet, sid)) == 1
        document = (fleet.documents / f"{sid}.md").read_text()
        assert document == _single_process_document(prompt, tmp_path / sid)

    # Each worker says what it ran: together, every run once, and nothing left in flight. (A
    # delivery is counted once its run has returned, a moment after its last event.)
    def completed() -> float:
        key = 'prowzi_worker_deliveries_total{outcome="completed"}'
        return sum(w.metrics()[key] for w in workers)

    wait_for("the 20 deliveries to be counted", lambda: completed() == 20, timeout=10)
    per_worker = [w.metrics() for w in workers]
    assert all(m["prowzi_worker_runs_in_flight"] == 0 for m in per_worker)
    assert all(m["prowzi_worker_queue_depth"] == 0 for m in per_worker)
    ran_on = {str(r["metadata"]["worker"]) for s in sessions for r in _runs(fleet, s)}  # type: ignore[index]
    assert len(ran_on) > 1, "the runs were spread over the workers"


def test_kill_9_mid_run_the_runs_are_finished_by_another_worker_from_their_checkpoints(
    fleet: Fleet,
) -> None:
    fleet.stage_delay = 0.15
    fleet.run_time_limit = 3.0  # Redis gives a dead worker's runs back after 3 s + 2 ttl
    (doomed,) = fleet.start(1, concurrency=2)
    config = fleet.config()
    sessions = [submit(config, f"Write a report on killed run {i}") for i in range(2)]
    wait_for(
        "both runs to checkpoint their planning stage",
        lambda: all("planning" in fleet.checkpointed(s) for s in sessions),
    )
    (survivor,) = fleet.start(1, concurrency=2, wait=False)
    doomed.signal(signal.SIGKILL)
    doomed.proc.wait(10)
    saved_at_kill = {s: fleet.checkpointed(s) for s in sessions}
    wait_for(f"{survivor.name} to start", survivor.ready, timeout=60)
    # Redis gives the dead worker's runs back after the visibility timeout.
    wait_for("both runs to complete", lambda: fleet.done(sessions), timeout=60)

    for sid in sessions:
        assert fleet.completions(sid) == 1
        first, second = _runs(fleet, sid)
        assert second["resumed_from"] is not None
        assert second["metadata"]["worker"] != first["metadata"]["worker"]  # type: ignore[index]
        assert second["metadata"]["lease_found"] in ("expired", "dead")  # type: ignore[index]
        # No completed stage ran again: what was saved at the kill was restored, not re-run.
        starts = _stage_starts(fleet, sid)
        for stage in saved_at_kill[sid]:
            assert starts[stage] == 1, (stage, starts)
        skipped = {e["stage"] for e in fleet.events(sid) if e.get("event") == "stage_skipped"}
        assert set(saved_at_kill[sid]) <= skipped
        # The attempt the kill cut short shows in telemetry beside the new worker's.
        assert any(n == 2 for n in starts.values()) or len(saved_at_kill[sid]) == 7
        CheckpointManager(fleet.checkpoints).load_checkpoint(sid)  # the chain verifies

    def taken() -> float:  # counted once each run has returned, a moment after its last event
        metrics = survivor.metrics()
        return sum(
            metrics[f'prowzi_worker_lease_takeovers_total{{reason="{r}"}}']
            for r in ("expired", "holder_gone")
        )

    wait_for("both takeovers to be counted", lambda: taken() == 2, timeout=10)
    assert taken() == 2


def test_the_same_run_delivered_twice_at_once_runs_once_and_the_other_is_a_duplicate(
    fleet: Fleet,
) -> None:
    fleet.stage_delay = 0.15
    workers = fleet.start(2, concurrency=1)
    config = fleet.config()
    sid = submit(config, "Write a report on double delivery")
    submit(config, "Write a report on double delivery", session_id=sid)  # the redelivery
    wait_for("the run to complete", lambda: fleet.done([sid]), timeout=30)
    wait_for(
        "both deliveries to end",
        lambda: (
            fleet.total('prowzi_worker_deliveries_total{outcome="completed"}')
            + fleet.total('prowzi_worker_deliveries_total{outcome="duplicate"}')
            == 2
        ),
        timeout=10,
    )
    assert fleet.total('prowzi_worker_deliveries_total{outcome="duplicate"}') == 1
    assert fleet.completions(sid) == 1
    assert len(_runs(fleet, sid)) == 1
    assert all(n == 1 for n in _stage_starts(fleet, sid).values())
    manager = CheckpointManager(fleet.checkpoints)
    checkpoint = manager.load_checkpoint(sid)  # sha256, chain and fencing token verified
    assert checkpoint.metadata.completed_stages == list(STAGE_NAMES)
    assert len(workers) == 2


def test_a_run_delivered_again_after_it_completed_runs_nothing_and_a_cancelled_one_never_runs(
    fleet: Fleet,
) -> None:
    fleet.start(1, concurrency=1)
    config = fleet.config()
    sid = submit(config, "Write a report on idempotence")
    wait_for("the run to complete", lambda: fleet.done([sid]), timeout=30)
    submit(config, "Write a report on idempotence", session_id=sid)
    wait_for(
        "the second delivery to end",
        lambda: fleet.total('prowzi_worker_deliveries_total{outcome="already_complete"}') == 1,
        timeout=20,
    )
    assert fleet.completions(sid) == 1
    assert len(_runs(fleet, sid)) == 1

    # A run cancelled while it waits in the queue never runs, and its followers hear so.
    from prowzi.events import WorkflowFailed
    from prowzi.ids import new_session_id
    from prowzi.workers.streams import connect, follow_run, request_cancel

    client = connect(fleet.broker_url)
    doomed = new_session_id()
    request_cancel(client, doomed, 60)
    submit(config, "Write a report that never starts", session_id=doomed)
    (end,) = list(follow_run(client, doomed, block=0.2))
    assert isinstance(end, WorkflowFailed) and end.cancelled
    assert fleet.checkpointed(doomed) == [] and fleet.events(doomed) == []


def test_redis_restarted_during_runs_they_finish_and_new_submissions_succeed(
    fleet: Fleet, redis_server: RedisServer
) -> None:
    fleet.stage_delay = 0.2
    fleet.start(2, concurrency=2)
    config = fleet.config()
    before = [submit(config, f"Write a report on a broker restart {i}") for i in range(3)]
    wait_for(
        "the runs to be under way",
        lambda: all(fleet.checkpointed(s) for s in before),
    )
    assert any(fleet.completions(s) == 0 for s in before), "no run was in flight"
    redis_server.restart(down_for=0.5)
    after = [submit(config, f"Write a report after the restart {i}") for i in range(2)]
    wait_for("every run to complete", lambda: fleet.done(before + after), timeout=60)
    for sid in before + after:
        assert fleet.completions(sid) == 1
        assert all(n == 1 for n in _stage_starts(fleet, sid).values())


def test_sigterm_checkpoints_the_workers_runs_and_another_worker_finishes_them(
    fleet: Fleet,
) -> None:
    fleet.stage_delay = 0.25
    (leaving,) = fleet.start(1, concurrency=2)
    config = fleet.config()
    sessions = [submit(config, f"Write a report on a graceful stop {i}") for i in range(2)]
    wait_for(
        "both runs to checkpoint their intent stage",
        lambda: all(fleet.checkpointed(s) for s in sessions),
    )
    (staying,) = fleet.start(1, concurrency=2, wait=False)  # it takes what is handed back
    leaving.signal(signal.SIGTERM)
    assert leaving.proc.wait(20) == 0
    # What the leaving worker had completed, it checkpointed before it went.
    for sid in sessions:
        started = {e["stage"] for e in fleet.events(sid) if e.get("event") == "stage_completed"}
        assert started <= set(fleet.checkpointed(sid))
    wait_for(f"{staying.name} to start", staying.ready, timeout=60)
    wait_for("both runs to complete", lambda: fleet.done(sessions), timeout=30)
    for sid in sessions:
        assert fleet.completions(sid) == 1
        first, second = _runs(fleet, sid)
        assert second["metadata"]["worker"] != first["metadata"]["worker"]  # type: ignore[index]
        assert all(n <= 2 for n in _stage_starts(fleet, sid).values())
        completed = [e["stage"] for e in fleet.events(sid) if e.get("event") == "stage_completed"]
        assert sorted(completed) == sorted(STAGE_NAMES)  # each stage completed exactly once
    # The worker counts a delivery once its run has returned, a moment after the run's last
    # event reached telemetry.
    wait_for(
        "both deliveries to be counted",
        lambda: staying.metrics()['prowzi_worker_deliveries_total{outcome="completed"}'] == 2,
        timeout=10,
    )


def test_a_duplicate_delivery_to_the_worker_running_the_run_leaves_it_reachable_by_sigterm(
    fleet: Fleet,
) -> None:
    """The same run delivered twice to one worker with two slots: the second delivery is a
    duplicate, and the first stays the worker's run, so a SIGTERM still checkpoints it and
    hands it back (review finding: the duplicate dropped the run from the worker's table)."""
    fleet.stage_delay = 0.3
    (leaving,) = fleet.start(1, concurrency=2)
    config = fleet.config()
    sid = submit(config, "Write a report on a duplicate and a stop")
    wait_for("the run to checkpoint its intent stage", lambda: bool(fleet.checkpointed(sid)))
    submit(config, "Write a report on a duplicate and a stop", session_id=sid)
    wait_for(
        "the duplicate",
        lambda: leaving.metrics()['prowzi_worker_deliveries_total{outcome="duplicate"}'] == 1,
    )
    (staying,) = fleet.start(1, concurrency=1, wait=False)
    leaving.signal(signal.SIGTERM)
    assert leaving.proc.wait(20) == 0
    wait_for(f"{staying.name} to start", staying.ready, timeout=60)
    wait_for("the run to complete", lambda: fleet.done([sid]), timeout=30)
    assert fleet.completions(sid) == 1
    completed = [e["stage"] for e in fleet.events(sid) if e.get("event") == "stage_completed"]
    assert sorted(completed) == sorted(STAGE_NAMES)
    # It was handed back and finished by the other worker, not left to run out the stop.
    first, second = _runs(fleet, sid)
    assert second["metadata"]["worker"] != first["metadata"]["worker"]  # type: ignore[index]


def test_one_trace_runs_from_the_submission_through_the_queue_to_the_last_stage(
    fleet: Fleet,
) -> None:
    import subprocess
    import sys

    from otlp_receiver import OtlpReceiver

    receiver = OtlpReceiver()
    otel = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    fleet.extra_env.update(otel)
    try:
        fleet.start(1, concurrency=1)
        # Submitted by another process (the CLI), as a client on another machine would.
        submitted = subprocess.run(
            [sys.executable, "-m", "prowzi.cli.main", "run", "--submit", "Write a traced report"],
            env=fleet.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        sid = submitted.stdout.strip()
        wait_for("the run to complete", lambda: fleet.done([sid]), timeout=30)

        # The run's span ends after its last stage's, and may reach the receiver in a later
        # batch: wait for both.
        last = {"invoke_agent prowzi.turnitin", "invoke_workflow prowzi.research"}
        wait_for(
            "the last stage's and the run's spans",
            lambda: last <= {s.name for s in receiver.spans()},
            timeout=20,
        )
        by_name = {s.name: s for s in receiver.spans()}
        send = by_name["send prowzi.research"]
        queued = by_name["process prowzi.research"]
        run = by_name["invoke_workflow prowzi.research"]
        stages = [by_name[f"invoke_agent prowzi.{stage}"] for stage in STAGE_NAMES]
        assert {s.trace_id for s in (send, queued, run, *stages)} == {send.trace_id}
        assert queued.parent_span_id == send.span_id
        assert run.parent_span_id == send.span_id
        assert all(s.parent_span_id == run.span_id for s in stages)
        # The queue wait: from the submission to the worker taking the run.
        assert queued.start_time_unix_nano >= send.start_time_unix_nano
        assert queued.end_time_unix_nano <= run.start_time_unix_nano
    finally:
        receiver.close()


def test_a_service_with_a_broker_enqueues_runs_follows_them_from_another_machine_and_cancels(
    fleet: Fleet, tmp_path: Path
) -> None:
    """The service, ``prowzi monitor`` and ``prowzi show`` each run with telemetry
    directories of their own (another machine's); they see the workers' runs through the
    broker's event streams and the shared telemetry store."""
    import subprocess
    import sys

    from test_service import Service
    from test_service_support import subprocess_env

    shared = tmp_path / "shared-telemetry"
    shared.mkdir()
    fleet.stage_delay = 0.2
    fleet.extra_env["PROWZI_TELEMETRY_URL"] = shared.as_uri()
    service_machine = tmp_path / "service-machine"
    service_machine.mkdir()
    service = Service(
        service_machine,
        PROWZI_BROKER_URL=fleet.broker_url,
        PROWZI_TELEMETRY_URL=shared.as_uri(),
        PROWZI_CHECKPOINT_DIR=str(fleet.checkpoints),
        PROWZI_OUTPUT_DIR=str(fleet.documents),
    )
    try:
        sid = service.start_run("Write a report on the service and its workers")
        # No worker yet: the run waits in the broker's queue, and says so.
        queued = service.wait_state(sid, "queued", timeout=10)
        assert queued["started_at"] is None
        time.sleep(0.5)
        assert service.client.get(f"/runs/{sid}").json()["state"] == "queued"
        (worker,) = fleet.start(1, concurrency=2)
        messages = service.events(sid)
        kinds = [m["event"] for m in messages]
        assert kinds.count("stage_completed") == len(STAGE_NAMES)
        assert kinds[-2:] == ["workflow_completed", "end"]
        info = service.wait_state(sid, "completed")
        assert info["telemetry"]["success"] is True
        document = service.client.get(f"/runs/{sid}/document")
        assert document.status_code == 200
        assert document.text == (fleet.documents / f"{sid}.md").read_text()
        # It ran on the worker: the service's own telemetry directory has no log of it.
        assert not (service_machine / "prowzi_telemetry" / "events" / f"{sid}.jsonl").exists()
        assert fleet.completions(sid) == 1

        # A third machine follows and inspects it.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        env = subprocess_env(PROWZI_BROKER_URL=fleet.broker_url)
        monitor = subprocess.run(
            [sys.executable, "-m", "prowzi.cli.main", "monitor", sid],
            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert monitor.returncode == 0, monitor.stderr
        assert "7/7" in monitor.stdout
        shown = subprocess.run(
            [sys.executable, "-m", "prowzi.cli.main", "show", sid],
            cwd=elsewhere, env={**env, "PROWZI_TELEMETRY_URL": shared.as_uri()},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert "completed" in shown.stdout

        # Cancelling through the API reaches the worker running the run.
        doomed = service.start_run("Write a report that is cancelled")
        wait_for("a checkpoint of the run", lambda: fleet.checkpointed(doomed))
        assert service.client.post(f"/runs/{doomed}/cancel").status_code == 202
        service.wait_state(doomed, "cancelled", timeout=30)
        last = fleet.events(doomed)[-1]
        assert last["event"] == "workflow_failed" and last["cancelled"] is True
        assert 0 < len(fleet.checkpointed(doomed)) < len(STAGE_NAMES)
        wait_for(
            "the cancelled delivery to be counted",
            lambda: worker.metrics()['prowzi_worker_deliveries_total{outcome="cancelled"}'] == 1,
            timeout=10,
        )
    finally:
        service.stop()


def test_a_subscription_made_through_the_service_gets_the_events_of_runs_on_workers(
    fleet: Fleet, tmp_path: Path
) -> None:
    """The subscription lives in the outbox the service and the workers share (beside the
    checkpoints); a worker started before it existed finds it at its next run's start and
    writes the run's deliveries, which the service sends with its own settings (only it
    allows private addresses here): every event arrives once, in order, signed with the
    secret shown at creation."""
    from standardwebhooks.webhooks import Webhook
    from test_service import Service
    from webhook_support import Receiver

    receiver = Receiver().start()
    fleet.start(1)
    service_machine = tmp_path / "service-machine"
    service_machine.mkdir()
    service = Service(
        service_machine,
        PROWZI_BROKER_URL=fleet.broker_url,
        PROWZI_CHECKPOINT_DIR=str(fleet.checkpoints),
        PROWZI_OUTPUT_DIR=str(fleet.documents),
        PROWZI_WEBHOOK_ALLOW_PRIVATE="true",
    )
    wanted = ["run.started", "stage.completed", "run.completed"]
    expected = ["run.started", *["stage.completed"] * len(STAGE_NAMES), "run.completed"]
    try:
        created = service.client.post(
            "/webhooks/subscriptions", json={"url": receiver.url, "events": wanted}
        )
        assert created.status_code == 201, created.text
        sid = service.start_run("Write a report on webhooks from the workers")
        service.wait_state(sid, "completed")
        assert fleet.completions(sid) == 1
        assert receiver.wait_for(lambda r: len(r.delivered()) >= len(expected), timeout=30)
        time.sleep(0.5)  # a duplicate would arrive now
        verifier = Webhook(created.json()["secret"])
        received = [verifier.verify(r.body, r.headers) for r in receiver.delivered()]
        assert [p["type"] for p in received] == expected
        assert {p["data"]["session_id"] for p in received} == {sid}
        assert len({r.id for r in receiver.delivered()}) == len(expected)
    finally:
        service.stop()
        receiver.stop()


# --- bad input: one line, a non-zero exit, nothing queued ----------------------------------


@pytest.mark.parametrize(
    ("args", "env", "code", "needle"),
    [
        (["worker"], {}, 2, "PROWZI_BROKER_URL"),
        (["run", "x", "--submit"], {}, 2, "PROWZI_BROKER_URL"),
        (["worker"], {"PROWZI_BROKER_URL": "http://localhost:6379"}, 2, "PROWZI_BROKER_URL"),
        (["worker", "--loglevel", "LOUD"], {"PROWZI_BROKER_URL": "redis://h/0"}, 2, "--loglevel"),
        (["worker", "--queues", " , "], {"PROWZI_BROKER_URL": "redis://h/0"}, 2, "--queues"),
        (
            ["run", "x", "--submit", "--output", "doc.md"],
            {"PROWZI_BROKER_URL": "redis://h/0"},
            2,
            "--output",
        ),
        (
            ["run", "x", "--submit", "--session-id", "../etc"],
            {"PROWZI_BROKER_URL": "redis://h/0"},
            2,
            "session",
        ),
    ],
)
def test_worker_and_submit_refuse_bad_input_in_one_line(
    args: list[str], env: dict[str, str], code: int, needle: str
) -> None:
    from test_cli_run import assert_one_line_error, invoke

    result = invoke(*args, env=env)
    assert result.exit_code == code
    assert_one_line_error(result, needle)


def test_submitting_to_a_broker_that_is_down_is_one_line_and_exit_1() -> None:
    from emulator_servers import free_port
    from test_cli_run import assert_one_line_error, invoke

    url = f"redis://127.0.0.1:{free_port()}/0"
    result = invoke("run", "Write a report", "--submit", env={"PROWZI_BROKER_URL": url})
    assert result.exit_code == 1
    assert_one_line_error(result, "cannot submit the run", url)
    # A password in the broker URL is never shown (review finding).
    secret = url.replace("redis://", "redis://:hunter2@")
    result = invoke("run", "Write a report", "--submit", env={"PROWZI_BROKER_URL": secret})
    assert result.exit_code == 1
    assert_one_line_error(result, "cannot submit the run", url.replace("redis://", "redis://***@"))
    assert "hunter2" not in result.output

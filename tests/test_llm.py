"""The LLM back end against a real HTTP server on loopback speaking Chat Completions
(tests/chat_server.py: scripted answers and faults). No hosted model is reachable here."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from chat_server import ChatServer, Fault
from llm_checks import assert_cites_only_verified
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from shared import PROMPT, PROWZI_CLI, run_cli

from prowzi.config import ProwziConfig, get_config
from prowzi.errors import WorkflowFailedError
from prowzi.observability.metrics import ProwziMetrics, serve_metrics
from prowzi.observability.otel import build_tracer
from prowzi.workflows.checkpoint import CheckpointManager
from prowzi.workflows.orchestrator import ProwziOrchestrator, ResearchResult

KEY = "sk-test-Zq8v3KEYMUSTNOTLEAK"
MODEL = "fake-model"


@pytest.fixture
def server() -> Any:
    with ChatServer() as srv:
        yield srv


def llm_config(tmp_path: Path, srv: ChatServer, **overrides: Any) -> ProwziConfig:
    values: dict[str, Any] = {
        "llm_model": MODEL,
        "llm_base_url": srv.base_url,
        "llm_api_key": KEY,
        "llm_prices": f"{MODEL}=2.5/10",
        "enable_checkpointing": True,
        "checkpoint_dir": tmp_path / "checkpoints",
        "telemetry_dir": tmp_path / "telemetry",
        "retry_backoff_base": 0.01,
        "retry_backoff_max": 0.05,
        **overrides,
    }
    return get_config(**values)


def run(config: ProwziConfig, **kwargs: Any) -> ResearchResult:
    orchestrator = ProwziOrchestrator(config=config, **kwargs)
    return asyncio.run(orchestrator.run_research(PROMPT))


def stage_details(config: ProwziConfig, session_id: str) -> dict[str, dict[str, Any]]:
    record = json.loads((config.telemetry_dir / f"{session_id}.json").read_text())
    return {s["stage"]: s["details"] for s in record["stages"] if s["status"] == "completed"}


def cli_env(srv: ChatServer, **extra: str) -> dict[str, str]:
    return {
        "PROWZI_LLM_BASE_URL": srv.base_url,
        "PROWZI_LLM_API_KEY": KEY,
        "PROWZI_LLM_PRICES": f"{MODEL}=2.5/10",
        "PROWZI_RETRY_BACKOFF_BASE": "0.01",
        **extra,
    }


def all_bytes_under(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


# --- a full run ----------------------------------------------------------------------------


def test_prowzi_run_llm_writes_a_cited_document_and_counts_every_token(
    server: ChatServer, tmp_path: Path
) -> None:
    proc = run_cli("run", PROMPT, "--llm", MODEL, "--enable-checkpoints", "--output", "doc.md",
                   env=cli_env(server), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    session = proc.stdout.split("Session: ")[1].split()[0]
    config = get_config(checkpoint_dir=tmp_path / "prowzi_checkpoints")
    state = CheckpointManager.from_config(config).load_checkpoint(session).to_state()
    assert state.draft is not None and state.verification is not None
    assert state.draft.references, "the document cites nothing"
    assert (tmp_path / "doc.md").read_text() == state.draft.markdown
    assert_cites_only_verified(state.draft, state.verification.verified)
    kinds = {r.kind for r in server.chat_requests()}
    assert {"IntentAnswer", "PlanAnswer", "text", "EvaluationAnswer"} <= kinds
    # json_schema requests carry the schema of the stage's answer model
    intent_request = server.chat_requests("IntentAnswer")[0].body
    schema = intent_request["response_format"]["json_schema"]["schema"]
    assert schema["required"] == ["document_type", "field", "topic", "keywords"]
    assert intent_request["response_format"]["type"] == "json_schema"
    assert server.chat_requests()[0].headers["Authorization"] == f"Bearer {KEY}"
    # token totals in telemetry are the sums of the server's usage fields
    details = stage_details(get_config(telemetry_dir=tmp_path / "prowzi_telemetry"), session)
    sent_in, sent_out = server.usage_totals()
    assert sum(d.get("input_tokens", 0) for d in details.values()) == sent_in
    assert sum(d.get("output_tokens", 0) for d in details.values()) == sent_out
    cost = sum(d.get("cost_usd", 0) for d in details.values())
    assert cost == pytest.approx((sent_in * 2.5 + sent_out * 10) / 1e6, rel=1e-3)
    assert details["writing"]["llm_calls"] == len(server.chat_requests("text"))
    assert {"citations_dropped", "quotes_dropped"} <= set(details["writing"])
    # `prowzi show` reports tokens and cost
    shown = run_cli("show", session, env={}, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "tokens" in shown.stdout.lower() and "$" in shown.stdout
    monitored = run_cli("monitor", session, env={}, cwd=tmp_path)
    assert monitored.returncode == 0, monitored.stderr
    assert "Model usage:" in monitored.stdout and "tokens $" in monitored.stdout
    # the key is nowhere: outputs, checkpoints, cache, telemetry, the document
    assert KEY not in proc.stdout + proc.stderr + shown.stdout + shown.stderr
    assert KEY.encode() not in all_bytes_under(tmp_path)


# --- faults --------------------------------------------------------------------------------


def test_429_with_retry_after_is_honoured_then_succeeds(server: ChatServer, tmp_path: Path) -> None:
    server.script("IntentAnswer", Fault("429", retry_after="2"))
    result = run(llm_config(tmp_path, server))
    first, second = server.chat_requests("IntentAnswer")[:2]
    assert first.status == 429 and second.status == 200
    waited = second.at - first.answered_at
    assert 2.0 <= waited < 5.0, waited  # Retry-After: 2, and no backoff of our own on top
    details = stage_details(llm_config(tmp_path, server), result.metadata["session_id"])
    assert details["intent"]["llm_failed_requests"] == 1
    assert details["intent"]["llm_calls"] == 1


def test_a_timeout_is_transient_and_retried(server: ChatServer, tmp_path: Path) -> None:
    server.script("IntentAnswer", Fault("slow"))
    config = llm_config(tmp_path, server, llm_timeout_seconds=0.5)
    result = run(config)
    deadline = time.monotonic() + 5  # the slow answer is recorded when the server sends it
    while len(server.chat_requests("IntentAnswer")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    slow, retried = sorted(server.chat_requests("IntentAnswer"), key=lambda r: r.at)
    assert retried.at - slow.at >= 0.5  # the client gave up on the first after its timeout
    details = stage_details(config, result.metadata["session_id"])["intent"]
    assert details["llm_failed_requests"] == 1 and details["llm_calls"] == 1


def test_a_budget_without_a_model_or_a_price_is_refused(server: ChatServer, tmp_path: Path) -> None:
    proc = run_cli("run", PROMPT, "--max-cost", "1", env={}, cwd=tmp_path)
    assert proc.returncode == 2 and "needs a model" in proc.stderr
    assert proc.stderr.count("\n") == 1
    unpriced = {**cli_env(server), "PROWZI_LLM_PRICES": "other=1/1"}
    proc = run_cli("run", PROMPT, "--llm", MODEL, "--max-cost", "1", env=unpriced, cwd=tmp_path)
    assert proc.returncode == 2 and f"needs the price of '{MODEL}'" in proc.stderr
    assert not server.chat_requests()


def test_retry_after_as_an_http_date() -> None:
    from email.utils import formatdate

    from prowzi.http import retry_after

    now = time.time()
    assert retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert retry_after("7") == 7.0
    assert retry_after("soon") is None


def test_500s_are_retried_then_exhausted_naming_the_stage_and_cause(
    server: ChatServer, tmp_path: Path
) -> None:
    server.script("PlanAnswer", *[Fault("500")] * 50)
    config = llm_config(tmp_path, server, max_retries=1, llm_max_call_retries=2)
    with pytest.raises(WorkflowFailedError) as failure:
        run(config)
    message = str(failure.value)
    assert "stage 'planning' failed after 2 attempt(s)" in message
    assert "server error (HTTP 500" in message and "gave up after 3 request(s)" in message
    assert len(server.chat_requests("PlanAnswer")) == 6  # 2 stage attempts x 3 requests
    # intent completed and is checkpointed
    state = CheckpointManager.from_config(config).load_checkpoint(failure.value.session_id)
    assert state.metadata.completed_stages == ["intent"]


def test_401_is_not_retried_and_the_key_appears_nowhere(server: ChatServer, tmp_path: Path) -> None:
    server.script("IntentAnswer", Fault("401"))
    proc = run_cli(
        "run", PROMPT, "--llm", MODEL, "--enable-checkpoints", env=cli_env(server), cwd=tmp_path
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    error = next(line for line in lines if line.startswith("error:"))
    assert "stage 'intent' failed after 1 attempt(s)" in error
    assert "refused the API key (PROWZI_LLM_API_KEY)" in error and "HTTP 401" in error
    assert "Traceback" not in proc.stderr
    assert len(server.chat_requests()) == 1
    assert KEY not in proc.stdout + proc.stderr
    assert KEY.encode() not in all_bytes_under(tmp_path)


def test_bad_settings_fail_before_the_run_in_one_line(server: ChatServer, tmp_path: Path) -> None:
    from emulator_servers import free_port

    unreachable = {"PROWZI_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}/v1"}
    proc = run_cli("run", PROMPT, "--llm", MODEL, env=unreachable, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "cannot be reached" in proc.stderr
    assert "session:" not in proc.stderr  # nothing started
    bad_url = run_cli(
        "run", PROMPT, "--llm", MODEL, env={"PROWZI_LLM_BASE_URL": "localhost:1"}, cwd=tmp_path
    )
    assert bad_url.returncode == 2 and "PROWZI_LLM_BASE_URL" in bad_url.stderr
    bad_prices = run_cli(
        "run", PROMPT, "--llm", MODEL, env={"PROWZI_LLM_PRICES": "x=1"}, cwd=tmp_path
    )
    assert bad_prices.returncode == 2 and "PROWZI_LLM_PRICES" in bad_prices.stderr
    server.models_status = 401
    refused = run_cli("run", PROMPT, "--llm", MODEL, env=cli_env(server), cwd=tmp_path)
    assert refused.returncode == 2 and "refused the API key" in refused.stderr
    assert KEY not in refused.stderr
    assert not server.chat_requests()


def test_malformed_json_is_asked_again_once(server: ChatServer, tmp_path: Path) -> None:
    server.script("IntentAnswer", Fault("malformed"))
    config = llm_config(tmp_path, server)
    result = run(config)
    first, second = server.chat_requests("IntentAnswer")
    assert len(second.body["messages"]) == len(first.body["messages"]) + 2
    assert "the answer is not JSON" in second.body["messages"][-1]["content"]
    assert result.intent is not None and result.intent.topic == "quantum computing"
    assert stage_details(config, result.metadata["session_id"])["intent"]["reasks"] == 1


def test_still_malformed_after_the_reask_is_a_transient_failure(
    server: ChatServer, tmp_path: Path
) -> None:
    server.script("IntentAnswer", Fault("garbage"), Fault("malformed"), Fault("malformed"))
    config = llm_config(tmp_path, server, llm_max_call_retries=1)
    result = run(config)  # attempt 1: garbage body retried, then two bad answers; attempt 2 ok
    record = json.loads(
        (config.telemetry_dir / f"{result.metadata['session_id']}.json").read_text()
    )
    intent = [s for s in record["stages"] if s["stage"] == "intent"]
    assert [s["status"] for s in intent] == ["retrying", "completed"]
    assert "stayed unusable after one re-ask" in intent[0]["error"]
    assert len(server.chat_requests("IntentAnswer")) == 4


def test_truncated_answers_are_handled(server: ChatServer, tmp_path: Path) -> None:
    server.script("PlanAnswer", Fault("length"))
    server.script("text", Fault("length"))
    config = llm_config(tmp_path, server)
    result = run(config)
    plans = server.chat_requests("PlanAnswer")
    assert (
        len(plans) == 2 and "cut off at the token limit" in plans[1].body["messages"][-1]["content"]
    )
    details = stage_details(config, result.metadata["session_id"])
    assert details["planning"]["reasks"] == 1
    assert details["writing"]["truncated_answers"] == 1
    assert result.draft is not None and result.verification is not None
    assert_cites_only_verified(result.draft, result.verification.verified)


def test_invented_citations_and_misquotes_are_dropped_and_counted(
    server: ChatServer, tmp_path: Path
) -> None:
    server.script("text", *[Fault("invent")] * 3)
    config = llm_config(tmp_path, server)
    result = run(config)
    assert result.draft is not None and result.verification is not None
    details = stage_details(config, result.metadata["session_id"])["writing"]
    # each invented answer: one citation [42], one reference entry; one misquote
    assert details["citations_dropped"] >= 3 * 2
    assert details["quotes_dropped"] == 3
    assert "[42]" not in result.draft.markdown and "invented survey" not in result.draft.markdown
    assert "never make mistakes" not in result.draft.markdown
    assert_cites_only_verified(result.draft, result.verification.verified)


# --- cache, kill -9, forks, budgets --------------------------------------------------------


def test_cache_replays_answers_and_no_cache_sends_again(server: ChatServer, tmp_path: Path) -> None:
    config = llm_config(tmp_path, server)
    run(config)
    sent = len(server.chat_requests())
    second = run(config)
    assert len(server.chat_requests()) == sent  # every call answered from the cache
    details = stage_details(config, second.metadata["session_id"])
    assert details["writing"]["llm_cached_calls"] > 0 and details["writing"]["llm_calls"] == 0
    config.llm_cache = False
    run(config)
    assert len(server.chat_requests()) == 2 * sent


def test_cache_entries_are_verified_signed_and_evicted(tmp_path: Path) -> None:
    from prowzi.llm.cache import ResponseCache
    from prowzi.storage.local import LocalBlobStore

    store = LocalBlobStore(tmp_path / "c")
    signed = ResponseCache(store, key=b"k1", max_bytes=10**6)
    signed.put("a" * 64, {"content": "x"})
    assert signed.get("a" * 64) == {"content": "x"}
    assert ResponseCache(store, key=b"k2", max_bytes=10**6).get("a" * 64) is None  # wrong key
    unsigned = ResponseCache(store, key=None, max_bytes=10**6)
    unsigned.put("b" * 64, {"content": "y"})
    assert signed.get("b" * 64) is None  # unsigned refused when a key is set
    path = tmp_path / "c" / "llm-cache" / f"{'b' * 64}.bin"
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    assert unsigned.get("b" * 64) is None  # altered: a miss, never an answer
    small = ResponseCache(store, key=None, max_bytes=600)
    for i, digest in enumerate("cdef"):
        small.put(digest * 64, {"content": "z" * 100})
        os.utime(tmp_path / "c" / "llm-cache" / f"{digest * 64}.bin", (1000 + i, 1000 + i))
    small.put("0" * 64, {"content": "z" * 100})
    names = {b.name for b in store.list("llm-cache/")}
    assert f"llm-cache/{'0' * 64}.bin" in names
    assert f"llm-cache/{'c' * 64}.bin" not in names  # the least recently used went first
    assert sum(b.size for b in store.list("llm-cache/")) <= 600


def test_kill_9_during_writing_then_resume_repeats_no_completed_call(
    server: ChatServer, tmp_path: Path
) -> None:
    server.delay["text"] = 0.4
    env = cli_env(server, PROWZI_LLM_CONCURRENCY="1")
    proc = subprocess.Popen(
        [*PROWZI_CLI, "run", PROMPT, "--llm", MODEL, "--enable-checkpoints"],
        env={**os.environ, **env},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while len(server.chat_requests("text")) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.25)  # the second answer stored; the third request in flight
    killed_at = time.time()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert proc.stderr is not None
    session = proc.stderr.read().split("session: ")[1].split()[0]
    before = server.chat_requests()
    completed = {r.sha256 for r in before if r.status == 200 and r.answered_at < killed_at - 0.2}
    assert len([r for r in before if r.kind == "text"]) >= 2
    manager = CheckpointManager(tmp_path / "prowzi_checkpoints")
    assert manager.load_checkpoint(session).metadata.completed_stages[-1] == "verification"
    resumed = run_cli("resume", session, "--llm", MODEL, env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    after = server.chat_requests()[len(before) :]
    assert after, "the resume sent nothing"
    assert not completed & {r.sha256 for r in after}, "a completed call was sent again"
    assert {r.kind for r in after} <= {"text", "EvaluationAnswer"}
    # a fork that changes only evaluation_threshold sends only evaluation's calls
    server.score = 8  # 0.8: passes 0.75, not 0.95 (a revision pass runs)
    sent = len(server.chat_requests())
    fork = run_cli("resume", session, "--llm", MODEL, "--set", "evaluation_threshold=0.95",
                   env=env, cwd=tmp_path)  # fmt: skip
    assert fork.returncode == 0, fork.stderr
    forked = server.chat_requests()[sent:]
    assert forked
    for request in forked:
        prompt = request.body["messages"][-1]["content"]
        assert request.kind == "EvaluationAnswer" or "Revise the current text" in prompt


def test_budget_stops_the_run_cleanly_and_a_larger_one_finishes_it(
    server: ChatServer, tmp_path: Path
) -> None:
    env = cli_env(server)
    stopped = run_cli("run", PROMPT, "--llm", MODEL, "--enable-checkpoints", "--max-tokens", "2500",
                      env=env, cwd=tmp_path)  # fmt: skip
    assert stopped.returncode == 1
    assert "budget exceeded" in stopped.stderr and "Traceback" not in stopped.stderr
    session = stopped.stderr.split("session: ")[1].split()[0]
    manager = CheckpointManager(tmp_path / "prowzi_checkpoints")
    completed = manager.load_checkpoint(session).metadata.completed_stages
    assert completed[:2] == ["intent", "planning"] and "evaluation" not in completed
    used = sum(r.usage.get("total_tokens", 0) for r in server.chat_requests())
    assert used <= 2500
    finished = run_cli("resume", session, "--llm", MODEL, "--max-tokens", "1000000",
                       env=env, cwd=tmp_path)  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    total = sum(r.usage.get("total_tokens", 0) for r in server.chat_requests())
    assert total > 2500  # the budget was a fraction of the run
    assert manager.load_checkpoint(session).metadata.completed_stages[-1] == "turnitin"


def test_a_budget_stop_is_its_own_webhook_event(server: ChatServer, tmp_path: Path) -> None:
    """Webhook subscribers hear ``run.budget_exceeded`` (not ``run.failed``) when a run stops
    at its budget (issue 18)."""
    from webhook_support import SECRET, Receiver

    receiver = Receiver().start()
    try:
        env = cli_env(
            server,
            PROWZI_WEBHOOK_URL=receiver.url,
            PROWZI_WEBHOOK_SECRET=SECRET,
            PROWZI_WEBHOOK_ALLOW_PRIVATE="true",
        )
        stopped = run_cli(
            "run", PROMPT, "--llm", MODEL, "--max-tokens", "2500", env=env, cwd=tmp_path
        )
        assert stopped.returncode == 1 and "budget exceeded" in stopped.stderr

        def types() -> list[str]:
            return [r.json()["type"] for r in receiver.delivered()]

        assert receiver.wait_for(lambda r: "run.budget_exceeded" in types()), types()
        assert types()[0] == "run.started" and "run.failed" not in types()
        (last,) = [r.json() for r in receiver.delivered() if r.json()["type"].startswith("run.b")]
        assert last["data"]["error_type"] == "budget" and "budget exceeded" in last["data"]["error"]
    finally:
        receiver.stop()


# --- observability -------------------------------------------------------------------------


def test_spans_follow_genai_conventions_and_metrics_are_scraped(
    server: ChatServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.script("IntentAnswer", Fault("429", retry_after="0"))
    exporter = InMemorySpanExporter()
    tracer = build_tracer(exporters=[exporter], install_global=False)
    registry = CollectorRegistry()
    config = llm_config(tmp_path, server)
    metrics = ProwziMetrics(registry, models=[MODEL])
    result = run(config, tracer=tracer, sinks=[metrics])
    spans = exporter.get_finished_spans()
    stages = {s.context.span_id: s for s in spans if s.name.startswith("invoke_agent")}
    chats = [s for s in spans if s.name == f"chat {MODEL}"]
    assert len(chats) == len(server.chat_requests())
    for span in chats:
        assert span.parent is not None and span.parent.span_id in stages
        attrs = dict(span.attributes or {})
        assert attrs["gen_ai.operation.name"] == "chat"
        assert attrs["gen_ai.provider.name"] == "openai"
        assert attrs["gen_ai.request.model"] == MODEL
        assert "gen_ai.input.messages" not in attrs  # content not captured by default
        if "error.type" not in attrs:
            assert attrs["gen_ai.response.model"] == f"{MODEL}-served"
            assert attrs["gen_ai.usage.input_tokens"] > 0
            assert attrs["gen_ai.usage.output_tokens"] > 0
            assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert (
        sum(s.attributes["error.type"] == "429" for s in chats if "error.type" in s.attributes) == 1
    )
    assert not any(KEY in str(dict(s.attributes or {})) for s in spans)
    # a real scrape of /metrics
    with serve_metrics(registry, 0) as http:
        text = urllib.request.urlopen(http.url, timeout=5).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    sent_in, _ = server.usage_totals()
    tokens_in = sum(
        value("prowzi_llm_tokens_total", stage=s, model=MODEL, type="input")
        for s in ("intent", "planning", "writing", "evaluation")
    )
    assert tokens_in == sent_in
    assert value("prowzi_llm_calls_total", stage="intent", model=MODEL, outcome="rate_limited") == 1
    assert value("prowzi_llm_calls_total", stage="intent", model=MODEL, outcome="ok") == 1
    assert value("prowzi_llm_cost_usd_total", stage="writing", model=MODEL) > 0
    assert value("prowzi_llm_call_duration_seconds_count", stage="writing", model=MODEL) > 0
    assert (
        "prowzi_llm_calls_total",
        (("model", "other"), ("outcome", "ok"), ("stage", "intent")),
    ) in samples
    del result
    # with capture switched on, prompts and answers are recorded
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    exporter.clear()
    run(llm_config(tmp_path, server, llm_cache=False), tracer=tracer)
    captured = [s for s in exporter.get_finished_spans() if s.name == f"chat {MODEL}"]
    assert all("gen_ai.input.messages" in (s.attributes or {}) for s in captured)
    assert all("gen_ai.output.messages" in (s.attributes or {}) for s in captured)


def test_calls_in_flight_count_against_the_budget() -> None:
    """Sections are written at once: each call reserves what it may cost before it is sent,
    so six concurrent calls that may cost $12 each get two through a $25 budget, not six."""
    import asyncio
    import types

    from prowzi.llm.client import BudgetExceededError, ChatAnswer, LlmClient, LlmSettings

    settings = LlmSettings(
        base_url="http://127.0.0.1:9/v1", api_key=None, model="m", stage_models={},
        prices={"m": (1e6, 1e6)}, temperature=0, max_output_tokens=10, context_tokens=1000,
        timeout=5, concurrency=8, max_call_retries=0, max_cost_usd=25.0, max_tokens=None,
    )  # fmt: skip
    client = LlmClient(settings)
    sent: list[str] = []

    async def send(ctx: Any, model: str, request: dict[str, Any]) -> ChatAnswer:
        sent.append(model)
        await asyncio.sleep(0.05)  # all six are in flight together
        answer = ChatAnswer(
            content="ok", finish_reason="stop", response_model=model,
            input_tokens=1, output_tokens=10,
        )  # fmt: skip
        client._account(ctx.session_id, model, answer)
        return answer

    client._send = send  # type: ignore[method-assign]  # the server's side, in process
    ctx = types.SimpleNamespace(session_id="s", stage="writing", model_calls=[], observer=None)

    async def main() -> list[object]:
        calls = [client.request(ctx, [{"role": "user", "content": "hi"}]) for _ in range(6)]
        return await asyncio.gather(
            *(client.chat(ctx, r, lambda a: a.content) for r in calls),  # type: ignore[arg-type]
            return_exceptions=True,
        )

    results = asyncio.run(main())
    assert results.count("ok") == 2 and len(sent) == 2
    assert sum(isinstance(r, BudgetExceededError) for r in results) == 4
    assert client.spend("s").cost_usd <= 25.0
    assert (client.spend("s").reserved_tokens, client.spend("s").reserved_cost) == (0, 0.0)

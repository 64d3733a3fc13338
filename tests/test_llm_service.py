"""``POST /runs`` with LLM options (model, budget) on a real ``prowzi serve`` process, against
the scripted Chat Completions server on loopback. The API key is the server's own setting: a
request cannot carry one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chat_server import ChatServer
from test_metrics_prometheus import Prometheus
from test_service import Service
from webhook_support import Receiver

MODEL = "fake-model"
KEY = "sk-service-KEYNEVERINREQUESTS"


@pytest.fixture
def llm_service(tmp_path: Path) -> Iterator[tuple[Service, ChatServer]]:
    with ChatServer() as chat:
        svc = Service(
            tmp_path,
            PROWZI_AGENTS="",  # the real agents: the LLM ones where a model is asked for
            PROWZI_LLM_BASE_URL=chat.base_url,
            PROWZI_LLM_API_KEY=KEY,
            PROWZI_LLM_MODEL=MODEL,
            PROWZI_LLM_PRICES=f"{MODEL}=1/1",
            PROWZI_WEBHOOK_ALLOW_PRIVATE="true",  # the test's receiver is on loopback
        )
        try:
            yield svc, chat
        finally:
            svc.stop()


def test_post_runs_accepts_a_model_and_a_budget_never_a_key(
    llm_service: tuple[Service, ChatServer],
) -> None:
    svc, chat = llm_service
    # An endpoint subscribed through the API hears of runs with LLM options too.
    receiver = Receiver().start()
    subscribed = svc.client.post(
        "/webhooks/subscriptions",
        json={"url": receiver.url, "events": ["run.completed", "run.budget_exceeded"]},
    )
    assert subscribed.status_code in (200, 201), subscribed.text
    refused = svc.client.post("/runs", json={"prompt": "quantum computing", "api_key": "x"})
    assert refused.status_code == 422
    unknown = svc.client.post("/runs", json={"prompt": "quantum computing", "model": "gpt-9"})
    assert unknown.status_code == 400 and "not configured" in unknown.text
    assert not chat.chat_requests()

    ok = svc.client.post(
        "/runs", json={"prompt": "quantum computing", "model": MODEL, "max_tokens": 10**6}
    )
    assert ok.status_code == 202, ok.text
    sid = ok.json()["session_id"]
    info = svc.wait_state(sid, "completed", "failed")
    assert info["state"] == "completed", info
    assert {r.kind for r in chat.chat_requests()} >= {"IntentAnswer", "PlanAnswer", "text"}
    assert all(r.headers["Authorization"] == f"Bearer {KEY}" for r in chat.chat_requests())
    stages = svc.client.get(f"/runs/{sid}").json()["telemetry"]["stages"]
    writing = next(s for s in stages if s["stage"] == "writing" and s["status"] == "completed")
    assert writing["details"]["llm_calls"] > 0

    # a new prompt (the first run's calls are cached, and a cached answer costs nothing)
    small = svc.client.post(
        "/runs", json={"prompt": "AI safety", "model": MODEL, "max_tokens": 100}
    )
    failed = svc.wait_state(small.json()["session_id"], "completed", "failed")
    assert failed["state"] == "failed" and "budget exceeded" in failed["error"]
    assert KEY not in svc.log()

    def heard() -> set[tuple[str, str]]:
        return {(r.json()["type"], r.json()["data"]["session_id"]) for r in receiver.delivered()}

    expected = {("run.completed", sid), ("run.budget_exceeded", small.json()["session_id"])}
    try:
        assert receiver.wait_for(lambda r: expected <= heard()), heard()
    finally:
        receiver.stop()


def test_a_real_prometheus_scrapes_tokens_cost_and_calls_of_a_service_run(
    llm_service: tuple[Service, ChatServer], tmp_path: Path
) -> None:
    svc, chat = llm_service
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{svc.port}")
    try:
        sid = svc.client.post("/runs", json={"prompt": "quantum computing", "model": MODEL})
        assert svc.wait_state(sid.json()["session_id"], "completed")["state"] == "completed"
        sent_in, sent_out = chat.usage_totals()
        answered = sum(r.status == 200 for r in chat.chat_requests())
        expected = {
            f'sum(prowzi_llm_tokens_total{{model="{MODEL}", type="input"}})': sent_in,
            f'sum(prowzi_llm_tokens_total{{model="{MODEL}", type="output"}})': sent_out,
            f'sum(prowzi_llm_calls_total{{model="{MODEL}", outcome="ok"}})': answered,
            f'sum(prowzi_llm_call_duration_seconds_count{{model="{MODEL}"}})': answered,
            f'sum(prowzi_llm_cost_usd_total{{model="{MODEL}"}}) * 1e6': sent_in + sent_out,
        }
        deadline = time.monotonic() + 20
        while True:
            seen = {q: prometheus.value(q) for q in expected}
            if all(v is not None and abs(v - expected[q]) < 1e-6 for q, v in seen.items()):
                break
            assert time.monotonic() < deadline, (seen, expected)
            time.sleep(0.5)
    finally:
        prometheus.close()

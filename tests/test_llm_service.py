"""``POST /runs`` with LLM options (model, budget) on a real ``prowzi serve`` process, against
the scripted Chat Completions server on loopback. The API key is the server's own setting: a
request cannot carry one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from chat_server import ChatServer
from test_service import Service

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
        )
        try:
            yield svc, chat
        finally:
            svc.stop()


def test_post_runs_accepts_a_model_and_a_budget_never_a_key(
    llm_service: tuple[Service, ChatServer],
) -> None:
    svc, chat = llm_service
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

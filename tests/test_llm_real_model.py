"""The LLM agents against a real model: SmolLM2-135M-Instruct served by llama-cpp-python's
OpenAI-compatible server on loopback. A 135M model writes poorly and cites loosely; the point
is that the client and the integrity gates meet real, imperfect output: the run completes with
schema-constrained answers, and whatever the model wrote, the document cites only verified
sources and quotes them verbatim.

llama-cpp-python's server constrains an answer to a JSON schema through ``response_format``
``{"type": "json_object", "schema": ...}`` (it refuses ``"json_schema"``), hence
``PROWZI_LLM_RESPONSE_FORMAT=json_object``. Small limits keep the run short on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

from emulator_servers import start_llama_server
from llm_checks import assert_cites_only_verified
from shared import PROMPT, run_cli

from prowzi.workflows.checkpoint import CheckpointManager


def test_a_real_model_run_cites_only_verified_sources_and_quotes_verbatim(
    tmp_path: Path,
) -> None:
    with start_llama_server(tmp_path) as base_url:
        env = {
            "PROWZI_LLM_BASE_URL": base_url,
            "PROWZI_LLM_RESPONSE_FORMAT": "json_object",
            "PROWZI_LLM_MAX_OUTPUT_TOKENS": "160",  # prose; a typed answer gets its schema's bound
            "PROWZI_LLM_CONTEXT_TOKENS": "512",
            "PROWZI_EVALUATION_THRESHOLD": "0",  # no revision pass: one evaluation call
            "PROWZI_LLM_TIMEOUT_SECONDS": "300",
            "PROWZI_STAGE_TIMEOUT_SECONDS": "900",
        }
        proc = run_cli(
            "run",
            PROMPT,
            "--llm",
            "smollm2",
            "--enable-checkpoints",
            "--max-results",
            "5",
            env=env,
            cwd=tmp_path,
            timeout=1200,
        )
    assert proc.returncode == 0, proc.stderr
    session = proc.stdout.split("Session: ")[1].split()[0]
    state = CheckpointManager(tmp_path / "prowzi_checkpoints").load_checkpoint(session).to_state()
    assert state.intent is not None and state.plan is not None and state.plan.sections
    assert state.draft is not None and state.verification is not None
    assert_cites_only_verified(state.draft, state.verification.verified)
    record = json.loads((tmp_path / "prowzi_telemetry" / f"{session}.json").read_text())
    details = {s["stage"]: s["details"] for s in record["stages"] if s["status"] == "completed"}
    for stage in ("intent", "planning", "writing", "evaluation"):
        assert details[stage]["llm_calls"] >= 1
        assert details[stage]["input_tokens"] > 0 and details[stage]["output_tokens"] > 0
    assert "citations_dropped" in details["writing"] and "quotes_dropped" in details["writing"]

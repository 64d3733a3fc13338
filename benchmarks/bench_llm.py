"""The LLM client's own cost per call, against the scripted Chat Completions server on loopback.

- **client overhead per call**: the wall time of ``LlmClient.chat`` (building the request,
  hashing it for the cache key, the HTTP round trip, parsing, accounting, validating the typed
  answer) minus the server's own time for that request (from reading the request to writing
  the answer, as the server measures it). Target: at most 2 ms.
- **cache hit**: ``LlmClient.chat`` answered from the response cache in a local checkpoint
  directory (read, verify the sealed entry's hashes, decode, validate). Target: at most 0.5 ms.

Run: ``python benchmarks/bench_llm.py [--calls 300]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _stats import report  # noqa: E402
from chat_server import ChatServer  # noqa: E402

from prowzi.agents.base import RunParameters, StageContext  # noqa: E402
from prowzi.agents.models import WorkflowState  # noqa: E402
from prowzi.config import get_config  # noqa: E402
from prowzi.llm.agents import IntentAnswer, strict_schema  # noqa: E402
from prowzi.llm.cache import ResponseCache  # noqa: E402
from prowzi.llm.client import ChatAnswer, LlmClient, LlmSettings  # noqa: E402
from prowzi.storage.local import LocalBlobStore  # noqa: E402

PROMPT = "Write a research paper on quantum computing"


def context(config: object) -> StageContext:
    return StageContext(
        session_id="bench",
        stage="intent",
        attempt=1,
        params=RunParameters(prompt=PROMPT),
        state=WorkflowState(),
        config=config,  # type: ignore[arg-type]
    )


def accept(answer: ChatAnswer) -> IntentAnswer:
    return IntentAnswer.model_validate_json(answer.content)


async def overhead(server: ChatServer, client: LlmClient, calls: int) -> list[float]:
    ctx = context(client)
    schema = strict_schema(IntentAnswer)
    samples: list[float] = []
    for i in range(calls + 20):
        messages = [{"role": "user", "content": f"{PROMPT} ({i})"}]  # never cached
        request = client.request(ctx, messages, schema=schema, schema_name="IntentAnswer")
        t0 = time.perf_counter()
        await client.chat(ctx, request, accept)
        total = time.perf_counter() - t0
        served = server.requests[-1]
        if i >= 20:  # warm-up: connection, imports
            samples.append(total - (served.answered_at - served.at))
        ctx.model_calls.clear()
    return samples


async def cache_hits(client: LlmClient, calls: int) -> list[float]:
    ctx = context(client)
    schema = strict_schema(IntentAnswer)
    request = client.request(
        ctx, [{"role": "user", "content": PROMPT}], schema=schema, schema_name="IntentAnswer"
    )
    await client.chat(ctx, request, accept)  # stored
    ctx.model_calls.clear()
    samples: list[float] = []
    for i in range(calls + 20):
        t0 = time.perf_counter()
        await client.chat(ctx, request, accept)
        if i >= 20:
            samples.append(time.perf_counter() - t0)
        assert [c.outcome for c in ctx.model_calls] == ["cached"]
        ctx.model_calls.clear()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    with ChatServer() as server, tempfile.TemporaryDirectory() as tmp:
        config = get_config(llm_model="bench", llm_base_url=server.base_url, llm_cache=False)
        settings = LlmSettings.from_config(config)
        plain = LlmClient(settings)
        cached = LlmClient(
            settings,
            ResponseCache(LocalBlobStore(Path(tmp), durable=False), key=None, max_bytes=10**8),
        )
        print(f"LLM client, {args.calls} calls each, scripted server on {server.base_url}")
        over = asyncio.run(overhead(server, plain, args.calls))
        hits = asyncio.run(cache_hits(cached, args.calls))
    report("client overhead per call (excluding server time)", over, "ms", "<= 2 ms")
    report("cache hit (verified entry from the checkpoint dir)", hits, "ms", "<= 0.5 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

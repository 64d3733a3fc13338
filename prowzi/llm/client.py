"""One client for every server that speaks the OpenAI Chat Completions API.

OpenAI, Azure OpenAI (its OpenAI-compatible ``/openai/v1`` endpoint), Ollama, vLLM,
llama.cpp's server, LM Studio and LiteLLM's proxy all answer ``POST {base}/chat/completions``.

Why httpx and not the ``openai`` SDK: Prowzi uses one endpoint and needs, for every request,
the status code, the ``Retry-After`` header (seconds or an HTTP date) and the raw body, and a
retry policy of its own (counted per outcome, traced, bounded by the run's budget). The SDK
retries by itself, wraps answers in its own models and hides the headers behind
``with_raw_response``; switched off, what is left of it is an httpx call. httpx is what the SDK
uses underneath, so the protocol and connection handling are the same maintained code, with
less between Prowzi and the wire (see ``benchmarks/bench_llm.py`` for the overhead per call).

Every call:

- is answered from the response cache when the same request was answered before
  (:mod:`prowzi.llm.cache`): nothing is sent, nothing is spent;
- is checked against the run's budget before it is sent (:class:`BudgetExceededError`);
- is retried on HTTP 429 and 5xx (after ``Retry-After`` when the server sends one, else
  exponential backoff with full jitter), on timeouts and on dropped connections; after
  ``llm_max_call_retries`` retries it fails as a :class:`~prowzi.errors.TransientError`, so
  the stage's own retries apply. 400, 401, 403, 404 and 422 are permanent and say why (a
  refused key is named, never shown);
- gets a ``chat <model>`` span under its stage's span, with the OpenTelemetry GenAI
  attributes; prompts and completions are recorded only when
  ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``;
- is recorded on the stage context (:class:`~prowzi.agents.base.ModelCall`): tokens from the
  server's ``usage``, cost at ``PROWZI_LLM_PRICES``, the outcome; telemetry details and
  Prometheus metrics are made from these.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import orjson

from prowzi import errors
from prowzi.agents.base import ModelCall, StageContext
from prowzi.config.settings import parse_prices, parse_stage_models
from prowzi.errors import ConfigError, PermanentError, TransientError
from prowzi.http import retry_after
from prowzi.llm.cache import ResponseCache, request_key

if TYPE_CHECKING:
    from prowzi.config import ProwziConfig

log = logging.getLogger("prowzi.llm")

T = TypeVar("T")

CAPTURE_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
MAX_RETRY_AFTER = 300.0
"""A ``Retry-After`` longer than this is not waited for: the call fails as transient."""
BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0


class LlmError(Exception):
    """Base of the client's own failures (mixed into Prowzi's transient/permanent classes)."""


class LlmTransientError(TransientError, LlmError):
    """Rate limited, server error, timeout or dropped connection, after the call's retries;
    or an answer that stayed invalid after one re-ask."""


class LlmPermanentError(PermanentError, LlmError):
    """The server refused the request for a reason retrying cannot fix."""


class BudgetExceededError(errors.BudgetExceededError, LlmError):
    """The next call would take the run past ``--max-cost`` or ``--max-tokens``."""


class InvalidAnswer(ValueError):
    """An answer that does not validate; ``reason`` goes back to the model once."""

    def __init__(self, reason: str, content: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.content = content


@dataclass(frozen=True, slots=True)
class ChatAnswer:
    content: str
    finish_reason: str
    response_model: str
    input_tokens: int
    output_tokens: int
    response_id: str = ""
    cached: bool = False


@dataclass(slots=True)
class Spend:
    """What one session's calls cost so far (in this process)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    reserved_tokens: int = 0
    """What calls in flight may still use (their estimates, until they end)."""
    reserved_cost: float = 0.0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class LlmSettings:
    """What the client reads from :class:`~prowzi.config.ProwziConfig`, checked once."""

    base_url: str
    api_key: str | None = field(repr=False)
    model: str
    stage_models: dict[str, str]
    prices: dict[str, tuple[float, float]]
    temperature: float
    max_output_tokens: int
    context_tokens: int
    timeout: float
    concurrency: int
    max_call_retries: int
    max_cost_usd: float | None
    max_tokens: int | None
    response_format: str = "json_schema"

    @classmethod
    def from_config(cls, config: ProwziConfig) -> LlmSettings:
        if not config.llm_model:
            raise ConfigError(
                "invalid setting llm_model (PROWZI_LLM_MODEL): no model is configured "
                "(set PROWZI_LLM_MODEL or pass --llm MODEL)"
            )
        key = config.llm_api_key.get_secret_value() if config.llm_api_key else None
        prices = parse_prices(config.llm_prices)
        stage_models = parse_stage_models(config.llm_stage_models)
        unpriced = sorted({config.llm_model, *stage_models.values()} - set(prices))
        if config.llm_max_cost_usd is not None and unpriced:
            raise ConfigError(
                "invalid setting llm_prices (PROWZI_LLM_PRICES): a cost budget (--max-cost) "
                f"needs the price of {', '.join(repr(m) for m in unpriced)}"
            )
        return cls(
            base_url=config.llm_base_url,
            api_key=key or None,
            model=config.llm_model,
            stage_models=stage_models,
            prices=prices,
            temperature=config.llm_temperature,
            max_output_tokens=config.llm_max_output_tokens,
            context_tokens=config.llm_context_tokens,
            timeout=config.llm_timeout_seconds,
            concurrency=config.llm_concurrency,
            max_call_retries=config.llm_max_call_retries,
            max_cost_usd=config.llm_max_cost_usd,
            max_tokens=config.llm_max_tokens,
            response_format=config.llm_response_format,
        )

    def model_for(self, stage: str) -> str:
        return self.stage_models.get(stage, self.model)

    def models(self) -> list[str]:
        """Every configured model (the bounded set of metric labels)."""
        return sorted({self.model, *self.stage_models.values(), *self.prices})

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> float:
        price_in, price_out = self.prices.get(model, (0.0, 0.0))
        return (input_tokens * price_in + output_tokens * price_out) / 1_000_000


def provider_name(base_url: str) -> str:
    """``gen_ai.provider.name`` for a base URL (the API spoken when the host says no more)."""
    host = urlsplit(base_url).hostname or ""
    if host.endswith(".openai.azure.com"):
        return "azure.ai.openai"
    return "openai"


def estimate_tokens(text: str) -> int:
    """A rough token count (4 characters a token), for budgets and context fitting."""
    return len(text) // 4 + 1


def _describe_refusal(status: int, body: bytes, settings: LlmSettings, model: str) -> str:
    """Why the server refused, in one line, without the key."""
    detail = ""
    try:
        doc = orjson.loads(body)
        error = doc.get("error") if isinstance(doc, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str):
            detail = " ".join(message.split())[:200]
    except orjson.JSONDecodeError:
        detail = " ".join(body[:200].decode("utf-8", "replace").split())
    if settings.api_key:
        detail = detail.replace(settings.api_key, "***")
    where = f"{settings.base_url}/chat/completions"
    if status == 401:
        cause = (
            "the server refused the API key (PROWZI_LLM_API_KEY)"
            if settings.api_key
            else "the server requires an API key (set PROWZI_LLM_API_KEY)"
        )
    elif status == 403:
        cause = "the API key may not use this model or endpoint"
    elif status == 404:
        cause = f"model {model!r} or the endpoint {where} does not exist"
    else:
        cause = "the server rejected the request"
    return f"{cause} (HTTP {status} from {where})" + (f": {detail}" if detail else "")


class _Loop:
    """The HTTP client and concurrency limit of one event loop."""

    def __init__(self, settings: LlmSettings, loop: asyncio.AbstractEventLoop) -> None:
        import httpx

        self.loop = loop
        headers = {"Content-Type": "application/json"}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
            headers["api-key"] = settings.api_key  # Azure OpenAI's header
        self.http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(settings.timeout),
            limits=httpx.Limits(max_connections=settings.concurrency),
        )
        self.slots = asyncio.Semaphore(settings.concurrency)


class LlmClient:
    """Chat calls with retries, the cache, budgets, spans and accounting (module doc)."""

    def __init__(
        self,
        settings: LlmSettings,
        cache: ResponseCache | None = None,
        *,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self._sleep = sleep
        self._url = f"{settings.base_url}/chat/completions"
        self._provider = provider_name(settings.base_url)
        parts = urlsplit(settings.base_url)
        self._server = (
            parts.hostname or "",
            parts.port or (443 if parts.scheme == "https" else 80),
        )
        self._loops: dict[int, _Loop] = {}
        self._spend: dict[str, Spend] = {}
        self._lock = threading.Lock()

    # --- accounting ---------------------------------------------------------------------

    def spend(self, session_id: str) -> Spend:
        with self._lock:
            return self._spend.setdefault(session_id, Spend())

    def _reserve(self, session_id: str, model: str, request: dict[str, Any]) -> tuple[int, float]:
        """Check the next call against the budget and reserve what it may use (calls of one
        stage run at once: each must count what the others in flight may spend). Returns the
        reservation, for :meth:`_release`."""
        s = self.settings
        if s.max_cost_usd is None and s.max_tokens is None:
            return 0, 0.0
        next_in = sum(estimate_tokens(str(m.get("content", ""))) for m in request["messages"])
        next_out = int(request.get("max_tokens") or s.max_output_tokens)
        tokens, cost = next_in + next_out, s.cost(model, next_in, next_out)
        with self._lock:
            spent = self._spend.setdefault(session_id, Spend())
            used_tokens = spent.tokens + spent.reserved_tokens
            if s.max_tokens is not None and used_tokens + tokens > s.max_tokens:
                raise BudgetExceededError(
                    f"budget exceeded: {used_tokens} tokens used or in flight, the next call may "
                    f"use up to {tokens}, the budget is {s.max_tokens} (--max-tokens)"
                )
            used_cost = spent.cost_usd + spent.reserved_cost
            if s.max_cost_usd is not None and used_cost + cost > s.max_cost_usd:
                raise BudgetExceededError(
                    f"budget exceeded: ${used_cost:.6f} spent or in flight, the next call may "
                    f"cost up to ${cost:.6f}, the budget is ${s.max_cost_usd:.6f} (--max-cost)"
                )
            spent.reserved_tokens += tokens
            spent.reserved_cost += cost
        return tokens, cost

    def _release(self, session_id: str, reservation: tuple[int, float]) -> None:
        """The call ended: what it spent is accounted (:meth:`_account`), not reserved."""
        with self._lock:
            spent = self._spend.setdefault(session_id, Spend())
            spent.reserved_tokens -= reservation[0]
            spent.reserved_cost -= reservation[1]

    def _account(self, session_id: str, model: str, answer: ChatAnswer) -> float:
        cost = self.settings.cost(model, answer.input_tokens, answer.output_tokens)
        with self._lock:
            spent = self._spend.setdefault(session_id, Spend())
            spent.input_tokens += answer.input_tokens
            spent.output_tokens += answer.output_tokens
            spent.cost_usd += cost
        return cost

    # --- calls --------------------------------------------------------------------------

    def _loop(self) -> _Loop:
        loop = asyncio.get_running_loop()
        current = self._loops.get(id(loop))
        if current is None or current.loop is not loop:
            current = self._loops[id(loop)] = _Loop(self.settings, loop)
        return current

    def request(
        self,
        ctx: StageContext,
        messages: list[dict[str, str]],
        *,
        schema: dict[str, Any] | None = None,
        schema_name: str = "answer",
        max_tokens: int | None = None,
    ) -> dict[str, Any]:
        """The request body for ``messages`` (and a JSON schema the answer must follow)."""
        body: dict[str, Any] = {
            "model": self.settings.model_for(ctx.stage),
            "messages": messages,
            "temperature": self.settings.temperature,
            "max_tokens": max_tokens or self.settings.max_output_tokens,
        }
        if schema is not None and self.settings.response_format == "json_object":
            body["response_format"] = {"type": "json_object", "schema": schema}
        elif schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": schema_name, "schema": schema, "strict": True},
            }
        return body

    async def chat(
        self,
        ctx: StageContext,
        request: dict[str, Any],
        accept: Callable[[ChatAnswer], T],
    ) -> T:
        """Send ``request`` (or replay its cached answer) and return ``accept(answer)``.

        ``accept`` validates the answer (raising :class:`InvalidAnswer`); only an accepted
        answer is cached, so a retry never replays an answer that failed."""
        model = request["model"]
        digest = request_key(request)
        if self.cache is not None:
            t0 = time.perf_counter()
            cached = await asyncio.to_thread(self.cache.get, digest)
            if cached is not None:
                try:
                    answer = ChatAnswer(
                        content=str(cached["content"]),
                        finish_reason=str(cached["finish_reason"]),
                        response_model=str(cached["response_model"]),
                        input_tokens=int(cached["input_tokens"]),
                        output_tokens=int(cached["output_tokens"]),
                        response_id=str(cached.get("response_id", "")),
                        cached=True,
                    )
                    value = accept(answer)
                except (KeyError, TypeError, ValueError):
                    pass  # not usable any more: ask the server
                else:
                    with self._span(ctx, model, request) as span:
                        self._record_span(span, answer, request)
                    ctx.model_calls.append(
                        ModelCall(model, "cached", duration_seconds=time.perf_counter() - t0)
                    )
                    return value
        reservation = self._reserve(ctx.session_id, model, request)
        try:
            answer = await self._send(ctx, model, request)
        finally:
            self._release(ctx.session_id, reservation)
        value = accept(answer)
        if self.cache is not None:
            entry = {
                "content": answer.content,
                "finish_reason": answer.finish_reason,
                "response_model": answer.response_model,
                "input_tokens": answer.input_tokens,
                "output_tokens": answer.output_tokens,
                "response_id": answer.response_id,
            }
            await asyncio.to_thread(self.cache.put, digest, entry)
        return value

    async def _send(self, ctx: StageContext, model: str, request: dict[str, Any]) -> ChatAnswer:
        import httpx

        loop = self._loop()
        payload = orjson.dumps(request)
        retries = self.settings.max_call_retries
        attempt = 0
        while True:
            t0 = time.perf_counter()
            delay: float | None = None
            outcome = "error"
            failure: str
            with self._span(ctx, model, request) as span:
                try:
                    async with loop.slots:
                        response = await loop.http.post(self._url, content=payload)
                    status = response.status_code
                    if status == 200:
                        answer = self._parse(response.content, model)
                        cost = self._account(ctx.session_id, model, answer)
                        self._record_span(span, answer, request)
                        ctx.model_calls.append(
                            ModelCall(
                                model,
                                "ok",
                                time.perf_counter() - t0,
                                answer.input_tokens,
                                answer.output_tokens,
                                cost,
                            )
                        )
                        return answer
                    if status == 429 or status >= 500:
                        outcome = "rate_limited" if status == 429 else "error"
                        failure = (
                            f"rate limited (HTTP 429 from {self._url})"
                            if status == 429
                            else f"server error (HTTP {status} from {self._url})"
                        )
                        delay = retry_after(response.headers.get("retry-after"))
                        _fail_span(span, str(status))
                    else:
                        message = _describe_refusal(status, response.content, self.settings, model)
                        _fail_span(span, str(status))
                        ctx.model_calls.append(ModelCall(model, "error", time.perf_counter() - t0))
                        raise LlmPermanentError(message)
                except _MalformedResponse as exc:
                    failure = str(exc)
                    _fail_span(span, "malformed_response")
                except httpx.TimeoutException:
                    failure = (
                        f"no answer from {self._url} within {self.settings.timeout:g}s (timeout)"
                    )
                    _fail_span(span, "timeout")
                except httpx.TransportError as exc:
                    failure = f"connection to {self._url} failed: {type(exc).__name__}"
                    _fail_span(span, type(exc).__name__)
            ctx.model_calls.append(ModelCall(model, outcome, time.perf_counter() - t0))
            if attempt >= retries:
                raise LlmTransientError(f"{failure}; gave up after {attempt + 1} request(s)")
            if delay is None:
                delay = random.uniform(0, min(BACKOFF_MAX, BACKOFF_BASE * 2**attempt))
            elif delay > MAX_RETRY_AFTER:
                raise LlmTransientError(f"{failure}; the server asks to wait {delay:.0f}s")
            attempt += 1
            ctx.event("llm.retry", model=model, reason=failure, delay_seconds=delay)
            await self._sleep(delay)

    @staticmethod
    def _parse(raw: bytes, model: str) -> ChatAnswer:
        try:
            doc = orjson.loads(raw)
            choice = doc["choices"][0]
            content = choice["message"].get("content") or ""
            usage = doc.get("usage") or {}
            return ChatAnswer(
                content=str(content),
                finish_reason=str(choice.get("finish_reason") or "stop"),
                response_model=str(doc.get("model") or model),
                input_tokens=int(usage.get("prompt_tokens") or 0),
                output_tokens=int(usage.get("completion_tokens") or 0),
                response_id=str(doc.get("id") or ""),
            )
        except (
            orjson.JSONDecodeError,
            KeyError,
            IndexError,
            TypeError,
            ValueError,
            AttributeError,
        ):
            raise _MalformedResponse(
                "the server's answer is not a Chat Completions response"
            ) from None

    # --- spans --------------------------------------------------------------------------

    def _span(
        self, ctx: StageContext, model: str, request: dict[str, Any]
    ) -> AbstractContextManager[Any]:
        child = getattr(ctx.observer, "child_span", None)
        if child is None:
            return nullcontext(None)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self._provider,
            "gen_ai.system": self._provider,
            "gen_ai.request.model": model,
            "gen_ai.request.temperature": float(request["temperature"]),
            "gen_ai.request.max_tokens": int(request["max_tokens"]),
            "gen_ai.output.type": "json" if "response_format" in request else "text",
            "gen_ai.request.response_format": request.get("response_format", {}).get(
                "type", "text"
            ),
            "server.address": self._server[0],
            "server.port": self._server[1],
            "prowzi.stage": ctx.stage,
        }
        if _capture_content():
            attributes["gen_ai.input.messages"] = orjson.dumps(request["messages"]).decode()
        span: AbstractContextManager[Any] = child(f"chat {model}", attributes)
        return span

    @staticmethod
    def _record_span(span: Any, answer: ChatAnswer, request: dict[str, Any]) -> None:
        if span is None:
            return
        span.set_attribute("gen_ai.response.model", answer.response_model)
        span.set_attribute("gen_ai.response.finish_reasons", [answer.finish_reason])
        span.set_attribute("gen_ai.usage.input_tokens", answer.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", answer.output_tokens)
        span.set_attribute("prowzi.llm.cached", answer.cached)
        if answer.response_id:
            span.set_attribute("gen_ai.response.id", answer.response_id)
        if _capture_content():
            message = [{"role": "assistant", "content": answer.content}]
            span.set_attribute("gen_ai.output.messages", orjson.dumps(message).decode())

    async def aclose(self) -> None:
        """Close this event loop's connections (idempotent; a client is usable again)."""
        current = self._loops.pop(id(asyncio.get_running_loop()), None)
        if current is not None:
            await current.http.aclose()

    # --- set-up -------------------------------------------------------------------------

    def check_server(self) -> None:
        """Fail before a run starts when the server cannot be reached or refuses the key
        (``GET {base}/models``; a server without that endpoint is fine)."""
        import httpx

        headers = (
            {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        )
        url = f"{self.settings.base_url}/models"
        try:
            response = httpx.get(url, headers=headers, timeout=min(self.settings.timeout, 10.0))
        except httpx.HTTPError as exc:
            raise ConfigError(
                f"invalid setting llm_base_url (PROWZI_LLM_BASE_URL={self.settings.base_url!r}): "
                f"the server cannot be reached ({type(exc).__name__})"
            ) from None
        if response.status_code in (401, 403):
            raise ConfigError(
                "invalid setting llm_api_key (PROWZI_LLM_API_KEY): "
                + _describe_refusal(response.status_code, b"", self.settings, self.settings.model)
            )


class _MalformedResponse(Exception):
    pass


def _fail_span(span: Any, error_type: str) -> None:
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, error_type))


def _capture_content() -> bool:
    return os.environ.get(CAPTURE_CONTENT, "").strip().lower() == "true"


def build_client(config: ProwziConfig, *, check: bool = False) -> LlmClient:
    """The client the settings describe, with the response cache beside the checkpoints
    (unless ``llm_cache`` is off). ``check`` asks the server before any run starts."""
    settings = LlmSettings.from_config(config)
    cache = None
    if config.llm_cache:
        key = config.checkpoint_key.get_secret_value().encode() if config.checkpoint_key else None
        from prowzi.storage.remote import open_store

        store = open_store(config.checkpoint_location, durable=config.checkpoint_fsync)
        cache = ResponseCache(store, key=key, max_bytes=config.llm_cache_max_bytes)
    client = LlmClient(settings, cache)
    if check:
        client.check_server()
    return client

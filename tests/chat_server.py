"""A scripted OpenAI Chat Completions server on loopback, for the LLM tests and benchmark.

A real HTTP server (``http.server`` in a thread, 127.0.0.1, a free port) that speaks the parts
of the protocol Prowzi uses: ``GET /v1/models`` and ``POST /v1/chat/completions`` with
``response_format`` ``json_schema``, ``usage`` and ``finish_reason``. No pytest here, so the
benchmark can use it too.

Answers are built from the request: a ``json_schema`` request gets an instance of the schema it
sent (every required property, enums, array bounds, string lengths), its strings taken from the
topic of the request's last user message; a prose request (a section to write) gets sentences
that quote and cite the numbered sources in its prompt, verbatim.

Faults are scripted per kind of request (the schema's name, or ``"text"`` for prose): a list of
faults each request of that kind takes in turn before answering normally: ``429`` (with
``Retry-After``), ``500``, ``401``, ``malformed`` (a schema answer that is not JSON),
``length`` (cut off, ``finish_reason: length``), ``garbage`` (an HTTP body that is not JSON),
``invent`` (prose citing a source it was not given, a misquote, and a reference list),
``slow`` (an answer 1.5 s late).
Every request is recorded: its time, its body's sha256, its kind, its status, the ``usage``
it was answered with.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from shared import LoopbackServer

LOOPBACK = "127.0.0.1"


@dataclass
class Recorded:
    at: float
    answered_at: float
    sha256: str
    kind: str
    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    usage: dict[str, int] = field(default_factory=dict)


@dataclass
class Fault:
    kind: str  # "429", "500", "401", "malformed", "length", "garbage", "invent"
    retry_after: str | None = None


class ChatServer(LoopbackServer):
    """``with ChatServer() as server:`` serves on ``server.base_url`` (``.../v1``)."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.faults: dict[str, list[Fault]] = defaultdict(list)
        self.delay: dict[str, float] = {}
        self.score = 9
        self.models_status = 200
        self._lock = threading.Lock()
        super().__init__(_handler(self), _Server)
        self.base_url = f"http://{LOOPBACK}:{self.port}/v1"

    def script(self, kind: str, *faults: Fault) -> None:
        with self._lock:
            self.faults[kind].extend(faults)

    def chat_requests(self, kind: str | None = None) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if kind is None or r.kind == kind]

    def usage_totals(self) -> tuple[int, int]:
        """Input and output tokens of every answered request, as the server reported them."""
        with self._lock:
            return (
                sum(r.usage.get("prompt_tokens", 0) for r in self.requests),
                sum(r.usage.get("completion_tokens", 0) for r in self.requests),
            )

    # --- answering ----------------------------------------------------------------------

    def answer(
        self, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        kind = _kind(body)
        at = time.time()
        with self._lock:
            faults = self.faults.get(kind) or []
            fault = faults.pop(0) if faults else None
        delay = self.delay.get(kind, 0.0) + (
            1.5 if fault is not None and fault.kind == "slow" else 0
        )
        if delay:
            time.sleep(delay)
        status, extra, payload, usage = self._respond(body, kind, fault)
        raw = json.dumps(body, sort_keys=True).encode()
        with self._lock:
            self.requests.append(
                Recorded(
                    at=at,
                    answered_at=time.time(),
                    sha256=hashlib.sha256(raw).hexdigest(),
                    kind=kind,
                    status=status,
                    body=body,
                    headers=headers,
                    usage=usage,
                )
            )
        return status, extra, payload

    def _respond(
        self, body: dict[str, Any], kind: str, fault: Fault | None
    ) -> tuple[int, dict[str, str], bytes, dict[str, int]]:
        if fault is not None and fault.kind in ("429", "500", "401"):
            status = int(fault.kind)
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            error = {"error": {"message": f"scripted {status}", "type": "scripted"}}
            return status, extra, json.dumps(error).encode(), {}
        if fault is not None and fault.kind == "garbage":
            return 200, {}, b"<html>proxy error</html>", {}
        finish = "stop"
        if kind == "text":
            content = _prose(body, invent=fault is not None and fault.kind == "invent")
        else:
            schema = body["response_format"]["json_schema"]["schema"]
            content = json.dumps(_instance(schema, _topic(body), self.score))
            if fault is not None and fault.kind == "malformed":
                content = content[: len(content) // 2] + " (and some prose)"
        if fault is not None and fault.kind == "length":
            content = content[: max(1, len(content) * 2 // 3)]
            finish = "length"
        prompt_tokens = len(json.dumps(body["messages"])) // 4
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(content) // 4 + 1,
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        doc = {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": f"{body['model']}-served",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
        }
        return 200, {}, json.dumps(doc).encode(), usage


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (a timeout) closed its connection: that is expected."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _kind(body: dict[str, Any]) -> str:
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return str(fmt["json_schema"].get("name", "json"))
    return "text"


_STOP = set(
    [
        "a",
        "an",
        "the",
        "on",
        "of",
        "in",
        "for",
        "and",
        "to",
        "about",
        "write",
        "research",
        "paper",
        "report",
        "essay",
        "review",
    ]
)


def _topic(body: dict[str, Any]) -> str:
    users = [m["content"] for m in body["messages"] if m.get("role") == "user"]
    words = re.findall(r"[A-Za-z]+", users[0] if users else "topic")
    kept = [w.lower() for w in words if w.lower() not in _STOP]
    return " ".join(kept[-2:]) or "topic"


def _instance(schema: dict[str, Any], topic: str, score: int, name: str = "") -> Any:
    """An instance of ``schema`` (the subset Prowzi's schemas use)."""
    if "enum" in schema:
        values = schema["enum"]
        return score if score in values else values[0]
    if "anyOf" in schema:
        return _instance(schema["anyOf"][0], topic, score, name)
    kind = schema.get("type")
    if kind == "object":
        return {
            key: _instance(sub, topic, score, key)
            for key, sub in schema.get("properties", {}).items()
        }
    if kind == "array":
        count = max(schema.get("minItems", 1), min(4, schema.get("maxItems", 4)))
        item = schema.get("items", {})
        facets = ("", " history", " methods", " applications", " challenges")
        return [_instance(item, topic + facets[i % 5], score, name) for i in range(count)]
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0))
    if kind == "boolean":
        return True
    text = {"field": "computer_science", "purpose": f"Explains {topic}."}.get(name, topic)
    text = text[: schema.get("maxLength", 1000)]
    return text if len(text) >= schema.get("minLength", 0) else text.ljust(schema["minLength"], "x")


_SOURCE_HEAD = re.compile(r"^\[(\d+)\] (.+)$", re.M)


def _prose(body: dict[str, Any], *, invent: bool) -> str:
    """Sentences citing the prompt's numbered sources, each quoting a sentence verbatim."""
    prompt = body["messages"][-1]["content"]
    _, _, sources = prompt.partition("Sources:\n")
    heads = list(_SOURCE_HEAD.finditer(sources))
    out: list[str] = []
    for i, head in enumerate(heads[:3]):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(sources)
        text = sources[head.end() : end].strip()
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 6]
        n = head.group(1)
        if sentences:
            quote = sentences[0].rstrip(".").replace('"', "'")
            out.append(f'As one study puts it, "{quote}" [{n}].')
        out.append(
            f"This work on {head.group(2).split(' (')[0].lower()} informs the section [{n}]."
        )
    if not out:
        out.append("No source speaks to this section directly.")
    if invent:
        out.append("Later surveys confirm every one of these findings [42].")
        if heads:
            first = heads[0].group(1)
            out.append(
                f'The authors insist that "quantum computers never make mistakes" [{first}].'
            )
        out.append("\nReferences\n[42] An invented survey of everything, 2031.")
    return " ".join(out)


def _handler(server: ChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return None

        def setup(self) -> None:
            super().setup()
            # headers and body go out in separate writes: without this, the client's delayed
            # ACK holds the body back ~40 ms (Nagle), which is no cost of the client
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _send(self, status: int, payload: bytes, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                self._send(
                    server.models_status,
                    json.dumps(
                        {"object": "list", "data": [{"id": "fake", "object": "model"}]}
                    ).encode(),
                )
            else:
                self._send(404, b'{"error": {"message": "not found"}}')

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            if not self.path.endswith("/chat/completions"):
                self._send(404, b'{"error": {"message": "not found"}}')
                return
            body = json.loads(raw)
            status, extra, payload = server.answer(body, dict(self.headers.items()))
            self._send(status, payload, extra)

    return Handler

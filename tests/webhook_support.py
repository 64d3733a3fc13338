"""A webhook receiver for the tests: a real HTTP server on loopback (``http.server``, one
thread per request) that records every request and answers as the test scripts it, with the
real faults (5xx, 429 + Retry-After, 410, redirects, slow answers). Also the agent factory
``noop`` for ``PROWZI_AGENTS`` in real ``prowzi`` processes. This module holds no tests."""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from prowzi.agents.base import Agent, StageContext
from prowzi.config import ProwziConfig
from prowzi.testing import noop_result

SECRET = "whsec_" + base64.b64encode(b"prowzi-tests-webhook-secret-32by").decode()


def noop(config: ProwziConfig) -> Agent:
    """``PROWZI_AGENTS=intent=webhook_support:noop,...``: an instant agent for any stage."""

    async def agent(ctx: StageContext) -> BaseModel:
        return noop_result(ctx.stage, ctx)

    return agent


def noop_agents_setting() -> str:
    from prowzi.testing import STAGES

    return ",".join(f"{stage}=webhook_support:noop" for stage in STAGES)


@dataclass
class Received:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    def json(self) -> Any:
        return orjson.loads(self.body)


Answer = tuple[int, dict[str, str], float]
"""status, extra headers, seconds to wait before answering."""


@dataclass
class Receiver:
    """``answer(n, request) -> (status, headers, delay)`` for the n-th request (0-based);
    200 at once by default."""

    answer: Callable[[int, Received], Answer] = lambda n, r: (200, {}, 0.0)
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    port: int = 0

    def start(self, port: int = 0) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                request = Received(
                    time.monotonic(),
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    0,
                )
                with receiver.lock:
                    n = len(receiver.requests)
                    receiver.requests.append(request)
                status, headers, delay = receiver.answer(n, request)
                request.status = status
                if delay:
                    time.sleep(delay)
                payload = b"ok" if status < 400 else b"no"
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def delivered(self) -> list[Received]:
        """Requests answered 2xx, in arrival order."""
        with self.lock:
            return [r for r in self.requests if 200 <= r.status < 300]

    def wait_for(self, predicate: Callable[[Receiver], bool], timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.02)
        return predicate(self)


def webhook_env(url: str, outbox: str, **extra: str) -> dict[str, str]:
    """The environment of a ``prowzi`` process delivering to ``url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROWZI_", "OTEL_"))}
    tests = str(Path(__file__).resolve().parent)
    env |= {
        "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])),
        "PROWZI_WEBHOOK_URL": url,
        "PROWZI_WEBHOOK_SECRET": SECRET,
        "PROWZI_WEBHOOK_ALLOW_PRIVATE": "true",
        "PROWZI_WEBHOOK_OUTBOX": outbox,
        "PROWZI_AGENTS": noop_agents_setting(),
    }
    env.update(extra)
    return env

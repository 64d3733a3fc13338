"""Spans exported over OTLP/HTTP reach a real receiver on loopback, with the configured
service name, resource attributes and headers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from prowzi.observability.otel import OtelTracer, build_tracer


class Receiver:
    """A minimal OTLP/HTTP trace receiver: decodes each POST to /v1/traces."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.received = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.requests.append(request)
                receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                payload = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                receiver.received.set()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


def test_spans_arrive_with_service_name_and_resource_attributes(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=lab%20one",
        "OTEL_SERVICE_NAME": "prowzi-test",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci,team=research,service.name=x",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    tracer = build_tracer(install_global=False)
    assert isinstance(tracer, OtelTracer)
    with tracer.run("s-1", prompt="p", attributes={}) as run:
        with run.stage("intent", 1):
            pass
        trace_id = run.trace_id
    tracer.shutdown()  # flushes the batch processor
    assert receiver.received.wait(10)

    spans = []
    for request in receiver.requests:
        for resource_spans in request.resource_spans:
            resource = attrs(resource_spans.resource.attributes)
            assert resource["service.name"] == "prowzi-test"
            assert resource["deployment.environment"] == "ci"
            assert resource["team"] == "research"
            assert resource["telemetry.sdk.name"] == "opentelemetry"
            for scope_spans in resource_spans.scope_spans:
                assert scope_spans.scope.name == "prowzi"
                spans.extend(scope_spans.spans)
    assert sorted(s.name for s in spans) == [
        "invoke_agent prowzi.intent",
        "invoke_workflow prowzi.research",
    ]
    assert {s.trace_id.hex() for s in spans} == {trace_id}
    root = next(s for s in spans if s.name.startswith("invoke_workflow"))
    assert attrs(root.attributes)["prowzi.session_id"] == "s-1"
    assert receiver.headers[0]["x-tenant"] == "lab one"
    assert receiver.headers[0]["content-type"] == "application/x-protobuf"


def test_traces_endpoint_is_used_verbatim(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url + "/v1/traces"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    tracer = build_tracer(install_global=False)
    assert isinstance(tracer, OtelTracer)
    with tracer.run("s-2", prompt="p", attributes={}):
        pass
    tracer.shutdown()
    assert receiver.received.wait(10)
    resource = attrs(receiver.requests[0].resource_spans[0].resource.attributes)
    assert resource["service.name"] == "prowzi"

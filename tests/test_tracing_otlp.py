"""Spans exported over OTLP/HTTP reach a real receiver on loopback, with the configured
service name, resource attributes and headers."""

from __future__ import annotations

from typing import Any

import pytest
from otlp_receiver import OtlpReceiver

from prowzi.observability.otel import OtelTracer, build_tracer


def attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


def test_spans_arrive_with_service_name_and_resource_attributes(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
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
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
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

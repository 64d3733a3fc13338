"""OpenTelemetry tracing (:mod:`.tracing`) and Prometheus metrics (:mod:`.metrics`).

Submodules are imported on demand, so that a process with observability off never loads the
OpenTelemetry SDK or prometheus_client.
"""

# The upstream collector image is FROM scratch: it has no shell and no HTTP client, so a
# container health check cannot run in it. This image copies the same, statically linked
# binary onto busybox, whose wget probes the collector's health_check extension.
FROM otel/opentelemetry-collector-contrib:0.114.0 AS upstream

FROM busybox:1.36.1
COPY --from=upstream /otelcol-contrib /otelcol-contrib
USER 10001:10001
EXPOSE 4317 4318 8888 13133
ENTRYPOINT ["/otelcol-contrib"]
CMD ["--config", "/etc/otelcol-contrib/config.yaml"]

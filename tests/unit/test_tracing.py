"""Tracing: the span tree, trace continuation, header injection, and zero cost when off."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tokyo_ia.errors import ConfigError, UpstreamError
from tokyo_ia.observability.tracing import (
    ATTR_ATTEMPT,
    ATTR_CACHE_RESULT,
    ATTR_MODEL,
    ATTR_PROVIDER,
    NOOP_SPAN,
    AttrValue,
    OtelTracer,
    Tracer,
    TracingSettings,
    build_tracer,
    traces_endpoint,
)

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")  # W3C trace-context
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> Iterator[Tracer]:
    t = build_tracer(TracingSettings(enabled=True), exporter=exporter)
    yield t
    t.shutdown()


def serve(tracer: Tracer, traceparent: str | None = None, attempts: int = 2) -> list[dict[str, str]]:
    """What the pipeline does for one request; returns the headers each attempt sent upstream."""
    sent: list[dict[str, str]] = []
    with tracer.request_span("POST /v1/chat/completions", traceparent, {ATTR_MODEL: "gpt-4o-mini"}) as root:
        with tracer.child("route", {"tokyo_ia.candidates": attempts}):
            pass
        with tracer.child("cache") as span:
            span.set_attribute(ATTR_CACHE_RESULT, "miss")
        for n in range(1, attempts + 1):
            attrs: dict[str, AttrValue] = {ATTR_ATTEMPT: n, ATTR_PROVIDER: f"p{n}"}
            with tracer.child(f"upstream p{n}/m", attrs, client=True) as span:
                headers = {"content-type": "application/json"}
                tracer.inject(headers)
                sent.append(headers)
                if n < attempts:
                    span.record_error(UpstreamError("503 from upstream", provider=f"p{n}", retryable=True))
        root.set_http_status(200)
    return sent


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in exporter.get_finished_spans()}


def test_span_tree_and_attributes(tracer: Tracer, exporter: InMemorySpanExporter) -> None:
    serve(tracer, attempts=3)
    spans = by_name(exporter)
    assert set(spans) == {
        "POST /v1/chat/completions",
        "route",
        "cache",
        "upstream p1/m",
        "upstream p2/m",
        "upstream p3/m",
    }
    root = spans["POST /v1/chat/completions"]
    assert root.parent is None and root.kind is SpanKind.SERVER
    assert root.attributes is not None and root.attributes[ATTR_MODEL] == "gpt-4o-mini"
    assert root.attributes["http.response.status_code"] == 200
    assert root.resource.attributes["service.name"] == "tokyo-ia"
    for name, span in spans.items():
        assert span.context is not None and root.context is not None
        assert span.context.trace_id == root.context.trace_id
        if span is not root:
            assert span.parent is not None and span.parent.span_id == root.context.span_id, name
    assert spans["cache"].attributes == {ATTR_CACHE_RESULT: "miss"}
    first, last = spans["upstream p1/m"], spans["upstream p3/m"]
    assert first.kind is SpanKind.CLIENT and first.attributes == {ATTR_ATTEMPT: 1, ATTR_PROVIDER: "p1"}
    assert first.status.status_code is StatusCode.ERROR
    assert [e.name for e in first.events] == ["exception"]
    assert last.status.status_code is StatusCode.UNSET


def test_client_traceparent_continues_the_trace(tracer: Tracer, exporter: InMemorySpanExporter) -> None:
    serve(tracer, traceparent=f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01")
    root = by_name(exporter)["POST /v1/chat/completions"]
    assert root.context is not None and root.parent is not None
    assert format(root.context.trace_id, "032x") == CLIENT_TRACE
    assert format(root.parent.span_id, "016x") == CLIENT_PARENT and root.parent.is_remote


def test_unsampled_client_trace_is_respected(tracer: Tracer, exporter: InMemorySpanExporter) -> None:
    sent = serve(tracer, traceparent=f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-00")
    assert exporter.get_finished_spans() == ()
    match = TRACEPARENT.fullmatch(sent[0]["traceparent"])
    assert match is not None and match.group(1) == CLIENT_TRACE  # still propagated...
    assert not int(match.group(3), 16) & 1  # ...as not sampled


def test_malformed_traceparent_starts_a_new_trace(tracer: Tracer, exporter: InMemorySpanExporter) -> None:
    serve(tracer, traceparent="00-zzzz-not-valid", attempts=1)
    root = by_name(exporter)["POST /v1/chat/completions"]
    assert root.parent is None


def test_inject_produces_a_valid_traceparent_naming_the_attempt(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    sent = serve(tracer, attempts=2)
    spans = by_name(exporter)
    for n, headers in enumerate(sent, start=1):
        match = TRACEPARENT.fullmatch(headers["traceparent"])
        assert match is not None, headers
        ctx = spans[f"upstream p{n}/m"].context
        assert ctx is not None
        assert match.group(1, 2) == (format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"))
        assert int(match.group(3), 16) & 1  # sampled
        assert headers["content-type"] == "application/json"


def test_trace_id_for_log_correlation(tracer: Tracer) -> None:
    with tracer.request_span("r", f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01") as span:
        assert span.trace_id == CLIENT_TRACE


def test_sample_ratio_zero_keeps_no_new_trace(exporter: InMemorySpanExporter) -> None:
    tracer = build_tracer(TracingSettings(enabled=True, sample_ratio=0.0), exporter=exporter)
    serve(tracer)
    tracer.shutdown()
    assert exporter.get_finished_spans() == ()


def test_off_is_a_shared_no_op() -> None:
    tracer = build_tracer(TracingSettings())
    assert type(tracer) is Tracer and not tracer.enabled
    assert build_tracer(None).enabled is False
    with tracer.request_span("r", "00-x") as span, tracer.child("c") as child:
        assert span is NOOP_SPAN and child is NOOP_SPAN
        span.set_attributes({"a": 1})
        span.record_error(RuntimeError())
        span.set_http_status(500)
        assert span.trace_id == ""
    headers: dict[str, str] = {}
    tracer.inject(headers)
    assert headers == {}
    assert tracer.request_span("a") is tracer.child("b")  # no allocation per call


def test_off_never_imports_opentelemetry() -> None:
    code = textwrap.dedent(
        """
        import sys
        from tokyo_ia.observability import build_tracer, TracingSettings, Metrics, configure_logging
        t = build_tracer(TracingSettings())
        with t.request_span("r") as s, t.child("c"):
            t.inject({})
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        assert not loaded, loaded
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_endpoint_resolution() -> None:
    on = TracingSettings(enabled=True)
    assert traces_endpoint(on, environ={}) is None  # the exporter's own default (localhost:4318)
    assert (
        traces_endpoint(on, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"})
        == "http://c:4318/v1/traces"
    )
    explicit = TracingSettings(enabled=True, endpoint="http://otel:4318")
    assert (
        traces_endpoint(explicit, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"})
        == "http://otel:4318/v1/traces"
    )
    full = TracingSettings(enabled=True, endpoint="https://x/v1/traces")
    assert traces_endpoint(full, environ={}) == "https://x/v1/traces"


def test_default_exporter_is_otlp_http_and_shuts_down_cleanly() -> None:
    tracer = build_tracer(TracingSettings(enabled=True, endpoint="http://127.0.0.1:9/"))
    assert isinstance(tracer, OtelTracer)
    tracer.shutdown()  # no spans: nothing is sent


def test_missing_extra_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(ConfigError, match=r"tokyo-ia\[otel\]"):
        build_tracer(TracingSettings(enabled=True))


def test_settings_reject_unknown_keys_and_bad_ratio() -> None:
    with pytest.raises(ValueError, match="extra"):
        TracingSettings.model_validate({"enabled": True, "endpiont": "x"})
    with pytest.raises(ValueError, match="less than or equal"):
        TracingSettings(sample_ratio=2)

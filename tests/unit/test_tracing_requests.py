"""Tracing wired through the gateway: the span tree and attributes of real requests.

The app runs in process (httpx's ASGI transport) with an in-memory exporter, in front of the
OpenAI emulator, so every span is real: the server's request span, ``route``, ``cache`` and
one CLIENT span per upstream attempt, whose ``traceparent`` the emulator received.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.fakes.base import Recorded
from tests.fakes.openai import OpenAIEmulator
from tests.inprocess import in_process
from tests.support import openai_provider
from tokyo_ia.config import parse_config
from tokyo_ia.errors import ConfigError
from tokyo_ia.observability.tracing import (
    ATTR_ATTEMPT,
    ATTR_ATTEMPTS,
    ATTR_CACHE_RESULT,
    ATTR_CANDIDATES,
    ATTR_COST_USD,
    ATTR_ERROR_TYPE,
    ATTR_HTTP_STATUS,
    ATTR_INPUT_TOKENS,
    ATTR_MODEL,
    ATTR_OUTPUT_TOKENS,
    ATTR_PROVIDER,
    ATTR_REQUEST_ID,
    ATTR_RESPONSE_MODEL,
    ATTR_TTFT,
    TracingSettings,
    build_tracer,
)

CHAT = "POST /v1/chat/completions"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01")


@dataclass
class Traced:
    client: httpx.AsyncClient
    exporter: InMemorySpanExporter
    emu: OpenAIEmulator

    async def chat(self, model: str, content: str = "hi", **extra: object) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"}
        return await self.client.post("/v1/chat/completions", json=body, headers=headers)

    def spans(self) -> dict[str, ReadableSpan]:
        return {s.name: s for s in self.exporter.get_finished_spans()}


@pytest.fixture
async def traced(fresh_openai_emu: OpenAIEmulator, tmp_path: Path) -> AsyncIterator[Traced]:
    emu = fresh_openai_emu
    config = {
        "cache": {"backend": "memory"},
        "providers": {
            "up": openai_provider(emu.url, max_retries=0),
            "backup": openai_provider(emu.url),
        },
        "models": {
            "gpt": [{"provider": "up", "model": "gpt-4o-mini"}],
            "failover": [
                {"provider": "up", "model": "error-503"},
                {"provider": "backup", "model": "gpt-4o-mini"},
            ],
        },
    }
    exporter = InMemorySpanExporter()
    tracer = build_tracer(TracingSettings(enabled=True), exporter=exporter)
    async with in_process(config, tmp_path, tracer=tracer) as (_, client):
        yield Traced(client, exporter, emu)


def _attrs(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


def _sent_traceparent(request: Recorded) -> tuple[str, str]:
    """(trace id, parent span id) of the traceparent the emulator received."""
    value = {k.lower(): v for k, v in request.headers.items()}["traceparent"]
    match = TRACEPARENT.fullmatch(value)
    assert match is not None, value
    return match.group(1), match.group(2)


def _span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.span_id, "016x")


def _check_tree(spans: dict[str, ReadableSpan]) -> ReadableSpan:
    """The root continues the client's trace; every other span is its direct child."""
    root = spans[CHAT]
    assert root.kind is SpanKind.SERVER
    assert root.parent is not None and root.parent.is_remote
    assert format(root.parent.span_id, "016x") == CLIENT_PARENT
    for name, span in spans.items():
        assert span.context is not None and format(span.context.trace_id, "032x") == CLIENT_TRACE, name
        if span is not root:
            assert span.parent is not None and format(span.parent.span_id, "016x") == _span_id(root), name
    return root


async def test_a_plain_request(traced: Traced) -> None:
    r = await traced.chat("gpt")
    assert r.status_code == 200
    usage = r.json()["usage"]
    spans = traced.spans()
    assert set(spans) == {CHAT, "route", "cache", "upstream up/gpt-4o-mini"}
    root = _check_tree(spans)
    attrs = _attrs(root)
    assert attrs[ATTR_REQUEST_ID] == r.headers["x-request-id"]
    assert attrs["http.route"] == "/v1/chat/completions" and attrs["http.request.method"] == "POST"
    assert attrs[ATTR_MODEL] == "gpt" and attrs[ATTR_PROVIDER] == "up"
    assert attrs[ATTR_RESPONSE_MODEL] == "gpt-4o-mini"
    assert attrs[ATTR_HTTP_STATUS] == 200 and attrs[ATTR_ATTEMPTS] == 1
    assert attrs[ATTR_INPUT_TOKENS] == usage["prompt_tokens"]
    assert attrs[ATTR_OUTPUT_TOKENS] == usage["completion_tokens"]
    assert attrs[ATTR_COST_USD] == pytest.approx(float(r.headers["x-tokyo-ia-cost-usd"]))
    assert attrs[ATTR_CACHE_RESULT] == "miss"
    assert ATTR_TTFT not in attrs  # streams only
    assert _attrs(spans["route"]) == {ATTR_MODEL: "gpt", ATTR_CANDIDATES: "up/gpt-4o-mini"}
    assert _attrs(spans["cache"]) == {ATTR_CACHE_RESULT: "miss"}
    upstream = spans["upstream up/gpt-4o-mini"]
    assert upstream.kind is SpanKind.CLIENT
    assert _attrs(upstream) == {ATTR_ATTEMPT: 1, ATTR_PROVIDER: "up", ATTR_MODEL: "gpt-4o-mini"}
    assert upstream.status.status_code is StatusCode.UNSET
    # the upstream was told about the attempt span, in the client's trace
    [sent] = traced.emu.requests
    assert _sent_traceparent(sent) == (CLIENT_TRACE, _span_id(upstream))


async def test_a_streamed_request_span_ends_with_the_stream(traced: Traced) -> None:
    r = await traced.chat("gpt", "stream me", stream=True)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    spans = traced.spans()
    assert set(spans) == {CHAT, "route", "cache", "upstream up/gpt-4o-mini"}
    root = _check_tree(spans)
    attrs = _attrs(root)
    # usage and cost are known only once the stream ended: the span was still open then
    assert isinstance(attrs[ATTR_INPUT_TOKENS], int) and attrs[ATTR_INPUT_TOKENS] > 0
    assert isinstance(attrs[ATTR_OUTPUT_TOKENS], int) and attrs[ATTR_OUTPUT_TOKENS] > 0
    assert ATTR_COST_USD in attrs and attrs[ATTR_HTTP_STATUS] == 200
    assert isinstance(attrs[ATTR_TTFT], float) and attrs[ATTR_TTFT] > 0
    upstream = spans["upstream up/gpt-4o-mini"]
    assert root.end_time is not None and upstream.end_time is not None
    assert root.end_time > upstream.end_time  # the attempt ends at the first chunk
    [sent] = traced.emu.requests
    assert _sent_traceparent(sent) == (CLIENT_TRACE, _span_id(upstream))


async def test_failover_has_one_span_per_attempt(traced: Traced) -> None:
    r = await traced.chat("failover")
    assert r.status_code == 200 and r.headers["x-tokyo-ia-attempts"] == "2"
    spans = traced.spans()
    assert set(spans) == {CHAT, "route", "cache", "upstream up/error-503", "upstream backup/gpt-4o-mini"}
    root = _check_tree(spans)
    assert _attrs(root)[ATTR_ATTEMPTS] == 2 and _attrs(root)[ATTR_PROVIDER] == "backup"
    assert _attrs(spans["route"])[ATTR_CANDIDATES] == "up/error-503,backup/gpt-4o-mini"
    failed, ok = spans["upstream up/error-503"], spans["upstream backup/gpt-4o-mini"]
    assert _attrs(failed) == {
        ATTR_ATTEMPT: 1,
        ATTR_PROVIDER: "up",
        ATTR_MODEL: "error-503",
        ATTR_ERROR_TYPE: "upstream_error",
        ATTR_HTTP_STATUS: 503,
    }
    assert failed.status.status_code is StatusCode.ERROR
    assert [e.name for e in failed.events] == ["exception"]
    assert _attrs(ok)[ATTR_ATTEMPT] == 2 and ok.status.status_code is StatusCode.UNSET
    assert failed.start_time is not None and ok.start_time is not None and failed.start_time < ok.start_time
    # each attempt sent its own span as the parent
    first, second = traced.emu.requests
    assert _sent_traceparent(first) == (CLIENT_TRACE, _span_id(failed))
    assert _sent_traceparent(second) == (CLIENT_TRACE, _span_id(ok))


async def test_a_cache_hit_makes_no_upstream_span(traced: Traced) -> None:
    assert (await traced.chat("gpt", "same question")).status_code == 200
    traced.exporter.clear()
    r = await traced.chat("gpt", "same question")
    assert r.headers["x-tokyo-ia-cache"] == "hit"
    spans = traced.spans()
    assert set(spans) == {CHAT, "route", "cache"}
    root = _check_tree(spans)
    assert _attrs(root)[ATTR_CACHE_RESULT] == "hit" and _attrs(root)[ATTR_COST_USD] == 0.0
    assert _attrs(spans["cache"]) == {ATTR_CACHE_RESULT: "hit"}
    assert len(traced.emu.requests) == 1  # only the first request went upstream


async def test_errors_and_other_routes(traced: Traced) -> None:
    r = await traced.chat("no-such-model")
    assert r.status_code == 404
    spans = traced.spans()
    assert set(spans) == {CHAT, "route"}
    assert _attrs(spans[CHAT])[ATTR_HTTP_STATUS] == 404
    assert spans[CHAT].status.status_code is StatusCode.UNSET  # a 4xx is the client's, not ours
    assert spans["route"].status.status_code is StatusCode.ERROR  # the stage that refused it
    traced.exporter.clear()
    assert (await traced.client.get("/health/live")).status_code == 200
    assert (await traced.client.get("/metrics")).status_code == 200
    assert traced.exporter.get_finished_spans() == ()  # probes and scrapes are not traced


def test_the_config_section() -> None:
    config = parse_config({"tracing": {"enabled": True, "endpoint": "http://collector:4318"}})
    assert config.tracing.enabled and config.tracing.endpoint == "http://collector:4318"
    assert parse_config({}).tracing.enabled is False
    with pytest.raises(ConfigError, match="tracing"):
        parse_config({"tracing": {"enabeld": True}})

"""Tracing through a real ``tokyo-ia serve``: the client's ``traceparent`` reaches the upstream.

On, the upstream gets the client's trace id with the gateway's attempt span as parent, and
the spans reach an OTLP/HTTP collector (a local fake that decodes them). Off, the headers
pass through untouched.
"""

from __future__ import annotations

import re

import httpx

from tests.fakes.openai import OpenAIEmulator
from tests.fakes.otlp import OTLPCollector
from tests.support import GatewayProcess, openai_provider

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
TRACESTATE = "vendor=opaque-value"
W3C = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01")
CHAT = {"model": "gpt", "messages": [{"role": "user", "content": "trace me"}]}


def _config(emu: OpenAIEmulator, **extra: object) -> dict[str, object]:
    return {
        "providers": {"up": openai_provider(emu.url)},
        "models": {"gpt": [{"provider": "up", "model": "gpt-4o-mini"}]},
        **extra,
    }


def _upstream_headers(emu: OpenAIEmulator) -> dict[str, str]:
    [call] = [r for r in emu.requests if r.path == "/v1/chat/completions"]
    return {k.lower(): v for k, v in call.headers.items()}


def test_traceparent_reaches_the_upstream_as_a_child_of_the_attempt(
    fresh_openai_emu: OpenAIEmulator,
) -> None:
    emu = fresh_openai_emu
    with OTLPCollector() as collector:
        gateway = GatewayProcess(
            _config(emu, tracing={"enabled": True, "service_name": "tokyo-ia-e2e"}),
            # the endpoint comes from the standard variable; batches wait a minute, so only the
            # flush at shutdown can deliver these spans
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "60000"},
        )
        with gateway as gw:
            r = httpx.post(
                gw.url + "/v1/chat/completions",
                json=CHAT,
                headers={"traceparent": TRACEPARENT, "tracestate": TRACESTATE},
            )
            assert r.status_code == 200
            assert collector.exports == 0
        # stopped (SIGTERM): the worker flushed what the batch processor held
        spans = {s.name: s for s in collector.spans}
        exports = collector.exports
    sent = _upstream_headers(emu)
    match = W3C.fullmatch(sent["traceparent"])
    assert match is not None, sent
    trace_id, parent = match.groups()
    assert trace_id == CLIENT_TRACE and parent != CLIENT_PARENT
    assert sent["tracestate"] == TRACESTATE
    assert exports >= 1
    assert set(spans) == {"POST /v1/chat/completions", "route", "upstream up/gpt-4o-mini"}
    root, attempt = spans["POST /v1/chat/completions"], spans["upstream up/gpt-4o-mini"]
    assert root.service == "tokyo-ia-e2e"
    assert root.trace_id == CLIENT_TRACE and root.parent_span_id == CLIENT_PARENT and root.kind == 2
    assert root.attributes["tokyo_ia.request_id"] == r.headers["x-request-id"]
    assert root.attributes["http.response.status_code"] == 200
    assert attempt.kind == 3 and attempt.parent_span_id == root.span_id
    assert attempt.span_id == parent  # the upstream names the attempt span as its parent


def test_traceparent_passes_through_verbatim_when_tracing_is_off(fresh_openai_emu: OpenAIEmulator) -> None:
    with GatewayProcess(_config(fresh_openai_emu)) as gw:
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            json=CHAT,
            headers={"traceparent": TRACEPARENT, "tracestate": TRACESTATE},
        )
        assert r.status_code == 200
        plain = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "user": "no-trace"})
        assert plain.status_code == 200
    first, second = (
        {k.lower(): v for k, v in call.headers.items()}
        for call in fresh_openai_emu.requests
        if call.path == "/v1/chat/completions"
    )
    assert first["traceparent"] == TRACEPARENT and first["tracestate"] == TRACESTATE
    assert "traceparent" not in second and "tracestate" not in second

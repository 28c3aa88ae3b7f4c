"""The official openai SDK against a real ``tokyo-ia serve`` process."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import openai
import pytest

from tests.e2e.test_cache import upstream_calls
from tests.fakes.openai import OpenAIEmulator
from tests.support import GatewayProcess, sdk_client

USER = [{"role": "user", "content": "hello gateway"}]


def client(gw: GatewayProcess, key: str = "unused") -> openai.OpenAI:
    client: openai.OpenAI = sdk_client(gw.url, key)
    return client


def test_chat(emu_gateway: GatewayProcess) -> None:
    raw = client(emu_gateway).chat.completions.with_raw_response.create(model="gpt-emu", messages=USER)
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: hello gateway"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert raw.headers["x-tokyo-ia-provider"] == "up"
    assert raw.headers["x-tokyo-ia-model"] == "gpt-4o-mini"
    assert raw.headers["x-request-id"]


def test_request_id_is_propagated_from_the_client(emu_gateway: GatewayProcess) -> None:
    raw = client(emu_gateway).chat.completions.with_raw_response.create(
        model="demo", messages=USER, extra_headers={"x-request-id": "my-trace-42"}
    )
    assert raw.headers["x-request-id"] == "my-trace-42"


def test_stream_with_and_without_usage(emu_gateway: GatewayProcess) -> None:
    c = client(emu_gateway)
    chunks = list(c.chat.completions.create(model="gpt-emu", messages=USER, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).strip() == (
        "echo: hello gateway"
    )
    assert all(ch.usage is None for ch in chunks)  # not asked for: stripped
    chunks = list(
        c.chat.completions.create(
            model="gpt-emu", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_models(emu_gateway: GatewayProcess) -> None:
    ids = [m.id for m in client(emu_gateway).models.list()]
    assert "gpt-emu" in ids and "demo" in ids


def test_failover_to_next_deployment(emu_gateway: GatewayProcess) -> None:
    raw = client(emu_gateway).chat.completions.with_raw_response.create(model="failover", messages=USER)
    assert raw.parse().choices[0].message.content == "echo: hello gateway"
    assert raw.headers["x-tokyo-ia-provider"] == "backup"
    assert raw.headers["x-tokyo-ia-attempts"] == "3"  # up, up again (one retry), then backup


def test_retry_with_backoff_on_the_same_deployment(emu_gateway: GatewayProcess) -> None:
    raw = client(emu_gateway).chat.completions.with_raw_response.create(model="flaky", messages=USER)
    assert raw.parse().choices[0].message.content == "echo: hello gateway"
    assert raw.headers["x-tokyo-ia-provider"] == "up"
    assert raw.headers["x-tokyo-ia-attempts"] == "2"


def test_streaming_failover_before_first_byte(emu_gateway: GatewayProcess) -> None:
    stream = client(emu_gateway).chat.completions.with_raw_response.create(
        model="failover", messages=USER, stream=True
    )
    assert stream.headers["x-tokyo-ia-provider"] == "backup"
    text = "".join(ch.choices[0].delta.content or "" for ch in stream.parse() if ch.choices)
    assert text.strip() == "echo: hello gateway"


def test_non_retryable_error_is_not_failed_over(
    emu_gateway: GatewayProcess, openai_emu: OpenAIEmulator
) -> None:
    before = upstream_calls(openai_emu)  # chat calls only: a health probe may land meanwhile
    with pytest.raises(openai.BadRequestError, match="emulated error 400"):
        client(emu_gateway).chat.completions.create(model="no-failover-400", messages=USER)
    assert upstream_calls(openai_emu) == before + 1


@pytest.mark.parametrize(
    ("model", "exception", "status"),
    [
        ("err-400", openai.BadRequestError, 400),
        ("err-401", openai.InternalServerError, 502),  # the gateway's credentials, not the caller's
        ("err-429", openai.RateLimitError, 429),
        ("err-500", openai.InternalServerError, 502),
        ("all-down", openai.InternalServerError, 503),
        ("no-such-model", openai.NotFoundError, 404),
    ],
)
def test_errors_surface_as_sdk_exceptions(
    emu_gateway: GatewayProcess, model: str, exception: type[openai.APIStatusError], status: int
) -> None:
    with pytest.raises(exception) as info:
        client(emu_gateway).chat.completions.create(model=model, messages=USER)
    assert info.value.status_code == status
    body: Any = info.value.body
    assert body["message"] and body["type"]
    assert info.value.response.headers["x-request-id"]
    if status == 429:
        assert info.value.response.headers["retry-after"] == "1"
    if model == "all-down":
        assert "up/error-503" in body["message"] and "backup/error-500" in body["message"]


def test_upstream_timeout_is_504(emu_gateway: GatewayProcess) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client(emu_gateway).chat.completions.create(model="slow", messages=USER)
    assert info.value.status_code == 504
    assert "timeout_s" in str(info.value.body)


def test_validation_errors_name_the_field(emu_gateway: GatewayProcess) -> None:
    c = client(emu_gateway)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="demo", messages=[])
    assert info.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="demo", messages=[{"role": "robot", "content": "x"}])  # type: ignore[list-item]
    assert info.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="demo", messages=USER, temperature=7)
    assert info.value.param == "temperature"


def _post(gw: GatewayProcess, body: bytes, path: str = "/v1/chat/completions") -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(gw.url + path, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_invalid_json_and_missing_messages(emu_gateway: GatewayProcess) -> None:
    status, body = _post(emu_gateway, b'{"model": "demo", "messages": [')
    assert status == 400
    assert body["error"]["code"] == "invalid_json"
    status, body = _post(emu_gateway, b'{"model": "demo"}')
    assert status == 400
    assert body["error"]["param"] == "messages"
    assert "required" in body["error"]["message"]
    status, body = _post(emu_gateway, b"[1, 2]")
    assert status == 400
    assert body["error"]["param"] == "body"
    status, body = _post(emu_gateway, b'{"model": "demo", "messages": "hi"}')
    assert status == 400
    assert body["error"]["param"] == "messages"


def test_unknown_route_and_method(emu_gateway: GatewayProcess) -> None:
    status, body = _post(emu_gateway, b"{}", path="/v2/nothing")
    assert status == 404
    assert "/v1" in body["error"]["message"]
    status, body = _post(emu_gateway, b"{}", path="/v1/models")
    assert status == 405


def test_embeddings(emu_gateway: GatewayProcess) -> None:
    out = client(emu_gateway).embeddings.create(model="demo", input=["a", "b"])
    # the demo chat model's provider has embeddings too
    assert len(out.data) == 2


def test_health(emu_gateway: GatewayProcess) -> None:
    for path in ("/health/live", "/health/ready"):
        with urllib.request.urlopen(emu_gateway.url + path, timeout=5) as resp:
            assert resp.status == 200

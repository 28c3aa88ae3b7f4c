"""The anthropic provider against the Anthropic emulator (a real HTTP server on loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.fakes.anthropic import AnthropicEmulator
from tests.fakes.base import free_port
from tokyo_ia.config import parse_config
from tokyo_ia.errors import (
    ConfigError,
    UpstreamBadRequestError,
    UpstreamError,
    UpstreamRateLimitError,
    UpstreamTimeoutError,
)
from tokyo_ia.providers import registry
from tokyo_ia.providers.anthropic import AnthropicConfig, AnthropicProvider
from tokyo_ia.providers.base import ChatCall

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}


@pytest.fixture(scope="module")
def emu() -> Iterator[AnthropicEmulator]:
    with AnthropicEmulator() as emulator:
        yield emulator


def make_provider(url: str, **extra: Any) -> AnthropicProvider:
    config = parse_config({"providers": {"claude": {"kind": "anthropic", "base_url": url, **extra}}})
    provider = registry.create("claude", config.providers["claude"])
    assert isinstance(provider, AnthropicProvider)
    return provider


@pytest.fixture
async def provider(emu: AnthropicEmulator) -> AsyncIterator[AnthropicProvider]:
    emu.reset()
    p = make_provider(emu.url, api_key="test-key")
    await p.start()
    yield p
    await p.close()


def call(model: str, messages: list[dict[str, Any]] | None = None, **body: Any) -> ChatCall:
    body = {"model": "public", "messages": messages or [{"role": "user", "content": "Hello, Claude"}], **body}
    return ChatCall(body=body, model=model, request_id="req-test")


async def collect(provider: AnthropicProvider, c: ChatCall) -> list[dict[str, Any]]:
    return [chunk async for chunk in provider.stream(c)]


# -- config ------------------------------------------------------------------------------


def test_config_is_typed_and_strict() -> None:
    config = parse_config(
        {"providers": {"c": {"kind": "anthropic", "api_key": "k", "default_max_tokens": 99}}}
    )
    section = config.providers["c"]
    assert isinstance(section, AnthropicConfig)
    assert (section.default_max_tokens, section.anthropic_version) == (99, "2023-06-01")
    with pytest.raises(ConfigError, match=r"providers\.c"):
        parse_config({"providers": {"c": {"kind": "anthropic", "max_tokenz": 1}}})


def test_embedded_default_needs_the_key() -> None:
    assert AnthropicProvider.embedded_default({}) is None
    found = AnthropicProvider.embedded_default({"ANTHROPIC_API_KEY": "sk-ant-x"})
    assert found is not None
    section, models = found
    assert section == {"api_key": "${env:ANTHROPIC_API_KEY}"}
    assert "claude-haiku-4-5" in models
    assert all(public == upstream for public, upstream in models.items())


def test_the_provider_does_not_need_the_anthropic_sdk() -> None:
    code = (
        "import sys; sys.modules['anthropic'] = None\n"
        "import tokyo_ia.providers.anthropic\n"
        "assert sys.modules['anthropic'] is None"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- chat --------------------------------------------------------------------------------


async def test_chat_echo_and_wire_request(provider: AnthropicProvider, emu: AnthropicEmulator) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, Claude"}]
    result = await provider.chat(call("chat", messages, seed=1, stream_options=None))
    assert result["object"] == "chat.completion"
    assert result["id"].startswith("msg_")
    assert result["model"] == "chat"
    choice = result["choices"][0]
    assert "Hello, Claude" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = result["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

    [request] = emu.requests
    assert (request.method, request.path) == ("POST", "/v1/messages")
    assert request.headers["x-api-key"] == "test-key"
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.headers["Content-Type"] == "application/json"
    assert "authorization" not in {k.lower() for k in request.headers}
    assert request.body == {
        "model": "chat",
        "max_tokens": 4096,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hello, Claude"}],
    }


async def test_base_url_with_v1_suffix_is_tolerated(emu: AnthropicEmulator) -> None:
    p = make_provider(emu.url + "/v1/", api_key="test-key")
    await p.start()
    try:
        assert "Hello" in (await p.chat(call("chat")))["choices"][0]["message"]["content"]
    finally:
        await p.close()


async def test_forced_tool_call(provider: AnthropicProvider) -> None:
    result = await provider.chat(call("chat", tools=[WEATHER], tool_choice="required"))
    choice = result["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [tool_call] = choice["message"]["tool_calls"]
    assert tool_call["function"]["name"] == "get_weather"
    assert json.loads(tool_call["function"]["arguments"]) == {"location": "Paris"}


async def test_named_tool_choice_and_tool_result_round_trip(provider: AnthropicProvider) -> None:
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    named = {"type": "function", "function": {"name": "get_time"}}
    first = await provider.chat(call("chat", tools=[WEATHER, other], tool_choice=named))
    message = first["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == "get_time"
    # The emulator, like the real API, refuses a tool_result that answers no tool_use.
    messages = [
        {"role": "user", "content": "What time is it?"},
        message,
        {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "12:00"},
    ]
    second = await provider.chat(call("chat", messages, tools=[WEATHER, other]))
    assert "12:00" in second["choices"][0]["message"]["content"]


async def test_stop_sequence_and_max_tokens_finish_reasons(provider: AnthropicProvider) -> None:
    cut = await provider.chat(call("chat", [{"role": "user", "content": "one two three"}], stop="two"))
    assert cut["choices"][0]["message"]["content"] == "echo: one "
    assert cut["choices"][0]["finish_reason"] == "stop"
    long = await provider.chat(call("chat", [{"role": "user", "content": "x" * 100}], max_tokens=2))
    assert long["choices"][0]["finish_reason"] == "length"


async def test_cache_usage_is_reported(provider: AnthropicProvider) -> None:
    usage = (await provider.chat(call("cache")))["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 100}
    assert usage["cache_creation_input_tokens"] == 20
    assert usage["prompt_tokens"] >= 120


async def test_image_parts_reach_the_upstream(provider: AnthropicProvider, emu: AnthropicEmulator) -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    await provider.chat(call("chat", [{"role": "user", "content": content}]))
    sent = emu.requests[-1].body["messages"][0]["content"]
    assert sent[1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
    }


# -- streams -----------------------------------------------------------------------------


async def test_stream_text(provider: AnthropicProvider) -> None:
    chunks = await collect(provider, call("chat", stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "Hello, Claude" in text
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert len({c["id"] for c in chunks}) == 1


async def test_stream_text_then_tool_call(provider: AnthropicProvider, emu: AnthropicEmulator) -> None:
    chunks = await collect(provider, call("tools", tools=[WEATHER], stream=True))
    assert emu.requests[-1].body["stream"] is True
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "I'll check the weather for you."
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["id"] == "toolu_emu01"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert {tc["index"] for tc in calls} == {0}
    assert json.loads("".join(tc["function"]["arguments"] for tc in calls)) == {"location": "Paris"}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"


async def test_stream_cut_by_the_upstream_is_an_error(provider: AnthropicProvider) -> None:
    with pytest.raises(UpstreamError) as info:
        await collect(provider, call("drop", stream=True))
    assert info.value.retryable


async def test_error_event_in_stream(provider: AnthropicProvider) -> None:
    chunks: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError) as info:
        async for chunk in provider.stream(call("stream-error", stream=True)):
            chunks.append(chunk)
    assert chunks  # the error came after content had started
    assert info.value.retryable
    assert info.value.code == "upstream_overloaded"
    assert "Overloaded" in info.value.message


async def test_stream_error_status_before_any_event(provider: AnthropicProvider) -> None:
    with pytest.raises(UpstreamRateLimitError) as info:
        await collect(provider, call("error-429", stream=True))
    assert info.value.retry_after == 1.0


# -- errors ------------------------------------------------------------------------------


async def test_wrong_key_is_an_auth_failure(emu: AnthropicEmulator) -> None:
    p = make_provider(emu.url, api_key="wrong")
    await p.start()
    try:
        with pytest.raises(UpstreamError) as info:
            await p.chat(call("chat"))
    finally:
        await p.close()
    assert info.value.code == "upstream_auth_failed"
    assert info.value.status == 502
    assert "invalid x-api-key" in info.value.message
    assert "providers.claude.api_key" in info.value.message


@pytest.mark.parametrize(
    ("status", "error", "retryable"),
    [
        (400, UpstreamBadRequestError, False),
        (404, UpstreamError, False),
        (429, UpstreamRateLimitError, True),
        (500, UpstreamError, True),
        (504, UpstreamTimeoutError, True),
        (529, UpstreamError, True),
    ],
)
async def test_error_statuses(
    provider: AnthropicProvider, status: int, error: type[UpstreamError], retryable: bool
) -> None:
    with pytest.raises(error) as info:
        await provider.chat(call(f"error-{status}"))
    exc = info.value
    assert type(exc) is error
    assert exc.upstream_status == status
    assert exc.retryable is retryable
    assert f"emulated error {status}" in exc.message
    assert "request-id req_emu" in exc.message


async def test_overloaded_529_is_retryable_with_retry_after(provider: AnthropicProvider) -> None:
    with pytest.raises(UpstreamError) as info:
        await provider.chat(call("error-529"))
    assert info.value.code == "upstream_overloaded"
    assert info.value.retry_after == 1.0
    assert "overloaded_error" in info.value.message


async def test_upstream_validation_message_reaches_the_caller(provider: AnthropicProvider) -> None:
    with pytest.raises(UpstreamBadRequestError) as info:
        await provider.chat(call("chat", temperature=1.5))
    assert info.value.status == 400
    assert "temperature" in info.value.message


async def test_deadline_is_honoured(provider: AnthropicProvider) -> None:
    c = call("slow-2000")
    c.deadline = time.monotonic() + 0.1
    with pytest.raises(UpstreamTimeoutError):
        await provider.chat(c)


# -- check -------------------------------------------------------------------------------


async def test_check_lists_models(provider: AnthropicProvider, emu: AnthropicEmulator) -> None:
    result = await provider.check()
    assert (result.ok, result.stage) == (True, "ok")
    assert emu.requests[-1].path == "/v1/models"
    assert emu.requests[-1].body is None


async def test_check_reports_auth_and_connect_failures(emu: AnthropicEmulator) -> None:
    for url, key, stage in ((emu.url, "wrong", "auth"), (f"http://127.0.0.1:{free_port()}", "k", "connect")):
        p = make_provider(url, api_key=key, connect_timeout_s=1)
        await p.start()
        try:
            result = await p.check()
        finally:
            await p.close()
        assert (result.ok, result.stage) == (False, stage)


# -- the emulator speaks the real wire format (checked with the official SDK) -----------


async def test_official_sdk_reads_the_emulator(emu: AnthropicEmulator) -> None:
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.AsyncAnthropic(base_url=emu.url, api_key="test-key", max_retries=0)
    try:
        message = await client.messages.create(
            model="chat", max_tokens=100, messages=[{"role": "user", "content": "Hello from the SDK"}]
        )
        assert "Hello from the SDK" in message.content[0].text
        assert message.stop_reason == "end_turn"
        tool = {"name": "get_weather", "input_schema": {"type": "object"}}
        async with client.messages.stream(
            model="chat",
            max_tokens=100,
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[tool],
            tool_choice={"type": "any"},
        ) as stream:
            final = await stream.get_final_message()
        assert final.content[0].type == "tool_use"
        assert final.content[0].input == {"location": "Paris"}
        with pytest.raises(anthropic.InternalServerError) as info:
            await client.messages.create(
                model="error-529", max_tokens=10, messages=[{"role": "user", "content": "x"}]
            )
        assert info.value.status_code == 529
        assert info.value.body["error"]["type"] == "overloaded_error"
    finally:
        await client.close()

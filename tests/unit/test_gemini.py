"""The gemini provider against the Gemini emulator: a real aiohttp server on loopback."""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest

from tests.fakes.base import free_port
from tests.fakes.gemini import GeminiEmulator
from tokyo_ia.config import parse_config
from tokyo_ia.errors import (
    ConfigError,
    InvalidRequestError,
    UnsupportedError,
    UpstreamBadRequestError,
    UpstreamError,
    UpstreamRateLimitError,
    UpstreamTimeoutError,
)
from tokyo_ia.providers import registry
from tokyo_ia.providers.base import JSON, ChatCall, EmbedCall
from tokyo_ia.providers.gemini import GeminiConfig, GeminiProvider

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def emulator() -> Iterator[GeminiEmulator]:
    with GeminiEmulator() as emu:
        yield emu


@pytest.fixture
def emu(emulator: GeminiEmulator) -> GeminiEmulator:
    emulator.reset()
    return emulator


async def make_provider(url: str, **extra: Any) -> GeminiProvider:
    config = GeminiConfig.model_validate({"kind": "gemini", "base_url": url, "api_key": "test-key", **extra})
    provider = GeminiProvider("gemini", config)
    await provider.start()
    return provider


@pytest.fixture
async def provider(emu: GeminiEmulator) -> AsyncIterator[GeminiProvider]:
    p = await make_provider(emu.url)
    yield p
    await p.close()


def chat_call(model: str = "chat", text: str = "Hello Gemini", **body: Any) -> ChatCall:
    return ChatCall(
        body={"messages": [{"role": "user", "content": text}], **body}, model=model, request_id="req-1"
    )


async def collect(provider: GeminiProvider, call: ChatCall) -> list[JSON]:
    return [chunk async for chunk in provider.stream(call)]


def content_of(chunks: list[JSON]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# -- chat -----------------------------------------------------------------------------------


async def test_chat_echoes_and_sends_the_gemini_wire_format(
    provider: GeminiProvider, emu: GeminiEmulator
) -> None:
    call = chat_call(temperature=0.1, max_tokens=200)
    call.body["messages"].insert(0, {"role": "system", "content": "Be brief."})
    completion = await provider.chat(call)
    assert completion["object"] == "chat.completion"
    assert completion["model"] == "chat"
    assert completion["id"].startswith("chatcmpl-")
    choice = completion["choices"][0]
    assert "Hello Gemini" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = completion["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

    (recorded,) = emu.requests
    assert recorded.path == "/v1beta/models/chat:generateContent"
    assert recorded.headers["x-goog-api-key"] == "test-key"
    assert "authorization" not in {k.lower() for k in recorded.headers}
    assert recorded.body == {
        "contents": [{"role": "user", "parts": [{"text": "Hello Gemini"}]}],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {"temperature": 0.1, "maxOutputTokens": 200},
    }


async def test_chat_max_tokens_gives_length(provider: GeminiProvider) -> None:
    completion = await provider.chat(chat_call(text="a rather long sentence to cut short", max_tokens=2))
    assert completion["choices"][0]["finish_reason"] == "length"


async def test_chat_several_candidates(provider: GeminiProvider) -> None:
    completion = await provider.chat(chat_call(n=2))
    assert [c["index"] for c in completion["choices"]] == [0, 1]


async def test_thinking_tokens_count_as_reasoning(provider: GeminiProvider) -> None:
    completion = await provider.chat(chat_call(model="thinker"))
    assert "think" not in completion["choices"][0]["message"]["content"].lower()
    assert completion["usage"]["completion_tokens_details"]["reasoning_tokens"] == 12


async def test_safety_stopped_answer_is_content_filtered(provider: GeminiProvider) -> None:
    completion = await provider.chat(chat_call(model="unsafe"))
    assert completion["choices"][0]["finish_reason"] == "content_filter"
    assert completion["choices"][0]["message"]["content"] == ""


async def test_blocked_prompt(provider: GeminiProvider) -> None:
    completion = await provider.chat(chat_call(model="blocked"))
    (choice,) = completion["choices"]
    assert choice["finish_reason"] == "content_filter"
    assert choice["message"]["content"] == ""
    assert "SAFETY" in choice["message"]["refusal"]
    chunks = await collect(provider, chat_call(model="blocked", stream=True))
    assert chunks[-2]["choices"][0]["finish_reason"] == "content_filter"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] > 0


# -- tools ----------------------------------------------------------------------------------


async def test_forced_tool_call_and_round_trip(provider: GeminiProvider, emu: GeminiEmulator) -> None:
    call = chat_call(text="Weather in Paris?", tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
    completion = await provider.chat(call)
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (tool_call,) = choice["message"]["tool_calls"]
    assert tool_call["function"]["name"] == "get_weather"
    assert orjson.loads(tool_call["function"]["arguments"]) == {"location": "Paris"}
    assert emu.requests[0].body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}

    follow_up = {
        "messages": [
            *call.body["messages"],
            choice["message"],
            {"role": "tool", "tool_call_id": tool_call["id"], "content": '{"temperature_c": 21}'},
        ],
        "tools": [WEATHER_TOOL, TIME_TOOL],
    }
    answer = await provider.chat(ChatCall(body=follow_up, model="chat", request_id="req-2"))
    assert answer["choices"][0]["message"]["content"] == 'The tool returned: {"temperature_c": 21}'
    contents = emu.requests[1].body["contents"]
    assert contents[1]["parts"][0]["thoughtSignature"]  # the signature went back with the call
    assert contents[2] == {
        "role": "user",
        "parts": [{"functionResponse": {"name": "get_weather", "response": {"temperature_c": 21}}}],
    }


async def test_named_tool_choice(provider: GeminiProvider, emu: GeminiEmulator) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    completion = await provider.chat(chat_call(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice))
    assert completion["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    config = emu.requests[0].body["toolConfig"]["functionCallingConfig"]
    assert config == {"mode": "ANY", "allowedFunctionNames": ["get_time"]}


async def test_streamed_tool_call(provider: GeminiProvider) -> None:
    chunks = await collect(provider, chat_call(tools=[WEATHER_TOOL], tool_choice="required", stream=True))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    (call,) = chunks[1]["choices"][0]["delta"]["tool_calls"]
    assert call["index"] == 0
    assert call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"location":"Paris"}'}
    assert chunks[2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[3]["choices"] == []
    assert len(chunks) == 4


# -- streaming ------------------------------------------------------------------------------


async def test_stream_text(provider: GeminiProvider, emu: GeminiEmulator) -> None:
    chunks = await collect(provider, chat_call(text="stream me please", stream=True))
    assert emu.requests[0].path == "/v1beta/models/chat:streamGenerateContent"
    assert emu.requests[0].query == {"alt": "sse"}
    assert "stream" not in emu.requests[0].body
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert content_of(chunks) == "echo: stream me please"
    assert len(chunks) > 4  # word by word
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_stream_dropped_connection_is_an_upstream_error(provider: GeminiProvider) -> None:
    chunks: list[JSON] = []

    async def consume() -> None:
        async for chunk in provider.stream(chat_call(model="drop", stream=True)):
            chunks.append(chunk)

    with pytest.raises(UpstreamError) as info:
        await consume()
    assert info.value.status == 502
    assert chunks  # something arrived before the cut
    assert all(c["choices"] and c["choices"][0]["finish_reason"] is None for c in chunks)


async def test_stream_error_before_the_first_event(provider: GeminiProvider) -> None:
    with pytest.raises(UpstreamRateLimitError) as info:
        await collect(provider, chat_call(model="error-429", stream=True))
    assert info.value.retry_after == 1.0


# -- errors ---------------------------------------------------------------------------------


async def test_400_is_the_callers_mistake(provider: GeminiProvider) -> None:
    with pytest.raises(UpstreamBadRequestError) as info:
        await provider.chat(chat_call(model="error-400"))
    assert info.value.status == 400
    assert info.value.code == "INVALID_ARGUMENT"
    assert "emulated error 400" in info.value.message


async def test_403_is_an_auth_failure(provider: GeminiProvider) -> None:
    with pytest.raises(UpstreamError) as info:
        await provider.chat(chat_call(model="error-403"))
    assert info.value.code == "upstream_auth_failed"
    assert info.value.status == 502
    assert "providers.gemini.api_key" in info.value.message


async def test_429_is_retryable_with_the_retry_info_delay(provider: GeminiProvider) -> None:
    with pytest.raises(UpstreamRateLimitError) as info:
        await provider.chat(chat_call(model="error-429"))
    assert info.value.retryable
    assert info.value.retry_after == 1.0
    assert info.value.headers["retry-after"] == "1"


@pytest.mark.parametrize(("status", "retryable"), [(500, True), (503, True), (404, False)])
async def test_server_errors(provider: GeminiProvider, status: int, retryable: bool) -> None:
    with pytest.raises(UpstreamError) as info:
        await provider.chat(chat_call(model=f"error-{status}"))
    assert info.value.upstream_status == status
    assert info.value.retryable is retryable


async def test_invalid_and_missing_keys_are_auth_failures(emu: GeminiEmulator) -> None:
    for key in ("wrong-key", None):
        config = GeminiConfig(kind="gemini", base_url=emu.url, api_key=key)
        provider = GeminiProvider("gemini", config)
        await provider.start()
        try:
            with pytest.raises(UpstreamError) as info:
                await provider.chat(chat_call())
        finally:
            await provider.close()
        assert info.value.code == "upstream_auth_failed"
        assert info.value.upstream_status == (400 if key else 403)
        assert not isinstance(info.value, UpstreamBadRequestError)


async def test_deadline_gives_a_timeout(provider: GeminiProvider) -> None:
    call = chat_call(model="slow-2000")
    call.deadline = time.monotonic() + 0.05
    with pytest.raises(UpstreamTimeoutError):
        await provider.chat(call)


def test_error_body_variants() -> None:
    provider = GeminiProvider("g", GeminiConfig(kind="gemini"))
    listed = orjson.dumps([{"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}])
    error = provider._error(503, {"retry-after": "7"}, listed)
    assert error.retryable
    assert error.retry_after == 7.0
    assert error.code == "UNAVAILABLE"
    raw = provider._error(502, {}, b"<html>Bad Gateway</html>")
    assert "Bad Gateway" in raw.message
    assert raw.retryable


# -- embeddings -----------------------------------------------------------------------------


async def test_embed_one_string(provider: GeminiProvider, emu: GeminiEmulator) -> None:
    result = await provider.embed(
        EmbedCall(
            body={"input": "hello world", "dimensions": 4}, model="gemini-embedding-001", request_id="e"
        )
    )
    assert result["object"] == "list"
    assert result["model"] == "gemini-embedding-001"
    (item,) = result["data"]
    assert item["object"] == "embedding"
    assert item["index"] == 0
    assert len(item["embedding"]) == 4
    assert result["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    (recorded,) = emu.requests
    assert recorded.path == "/v1beta/models/gemini-embedding-001:embedContent"
    assert recorded.body == {
        "model": "models/gemini-embedding-001",
        "content": {"parts": [{"text": "hello world"}]},
        "outputDimensionality": 4,
    }


async def test_embed_a_batch(provider: GeminiProvider, emu: GeminiEmulator) -> None:
    result = await provider.embed(
        EmbedCall(body={"input": ["a", "bb", "ccc"]}, model="gemini-embedding-001", request_id="e")
    )
    assert [d["index"] for d in result["data"]] == [0, 1, 2]
    assert result["data"][0]["embedding"] != result["data"][1]["embedding"]
    assert emu.requests[0].path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert [r["model"] for r in emu.requests[0].body["requests"]] == ["models/gemini-embedding-001"] * 3


async def test_embed_base64(provider: GeminiProvider) -> None:
    body = {"input": "x", "encoding_format": "base64"}
    floats = await provider.embed(
        EmbedCall(body={"input": "x"}, model="gemini-embedding-001", request_id="e")
    )
    encoded = await provider.embed(EmbedCall(body=body, model="gemini-embedding-001", request_id="e"))
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(floats["data"][0]["embedding"], abs=1e-6)


async def test_embed_rejects_what_gemini_cannot_embed(provider: GeminiProvider) -> None:
    with pytest.raises(UnsupportedError):
        await provider.embed(
            EmbedCall(body={"input": [1, 2, 3]}, model="gemini-embedding-001", request_id="e")
        )
    with pytest.raises(InvalidRequestError):
        await provider.embed(EmbedCall(body={"input": []}, model="gemini-embedding-001", request_id="e"))


# -- doctor, config, defaults ---------------------------------------------------------------


async def test_check(provider: GeminiProvider, emu: GeminiEmulator) -> None:
    result = await provider.check()
    assert result.ok
    assert result.stage == "ok"
    assert emu.requests[0].method == "GET"
    assert emu.requests[0].path == "/v1beta/models"


async def test_check_reports_auth_and_connect_failures(emu: GeminiEmulator) -> None:
    bad = await make_provider(emu.url, api_key="nope")
    nowhere = await make_provider(f"http://127.0.0.1:{free_port()}")
    try:
        auth = await bad.check()
        connect = await nowhere.check()
    finally:
        await bad.close()
        await nowhere.close()
    assert (auth.ok, auth.stage) == (False, "auth")
    assert "API key not valid" in auth.detail
    assert (connect.ok, connect.stage) == (False, "connect")


def test_registered_with_its_own_settings() -> None:
    assert registry.provider_class("gemini") is GeminiProvider
    config = parse_config(
        {
            "providers": {"g": {"kind": "gemini", "api_key": "k", "api_version": "v1"}},
            "models": {"flash": [{"provider": "g", "model": "gemini-2.5-flash"}]},
        }
    )
    section = config.providers["g"]
    assert isinstance(section, GeminiConfig)
    assert section.api_version == "v1"
    with pytest.raises(ConfigError, match=r"providers\.g\.project: unknown key"):
        parse_config({"providers": {"g": {"kind": "gemini", "project": "x"}}})


async def test_api_version_is_the_path_prefix(emu: GeminiEmulator) -> None:
    provider = await make_provider(emu.url, api_version="v1alpha")
    try:
        with pytest.raises(UpstreamError) as info:  # the emulator serves v1beta only
            await provider.chat(chat_call())
    finally:
        await provider.close()
    assert info.value.code == "upstream_not_found"
    assert emu.requests[0].path == "/v1alpha/models/chat:generateContent"


@pytest.mark.parametrize(
    ("env", "reference"),
    [
        ({"GEMINI_API_KEY": "k"}, "${env:GEMINI_API_KEY}"),
        ({"GOOGLE_API_KEY": "k"}, "${env:GOOGLE_API_KEY}"),
        ({"GEMINI_API_KEY": "k", "GOOGLE_API_KEY": "k2"}, "${env:GEMINI_API_KEY}"),
    ],
)
def test_embedded_default(env: dict[str, str], reference: str) -> None:
    found = GeminiProvider.embedded_default(env)
    assert found is not None
    section, models = found
    assert section == {"api_key": reference}
    assert models["gemini-2.5-flash"] == "gemini-2.5-flash"
    assert "gemini-embedding-001" in models


def test_no_embedded_default_without_a_key() -> None:
    assert GeminiProvider.embedded_default({}) is None
    assert GeminiProvider.embedded_default({"GEMINI_API_KEY": ""}) is None

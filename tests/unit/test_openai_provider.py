"""The openai provider against the OpenAI emulator (a real local HTTP server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.fakes.openai import OpenAIEmulator
from tokyo_ia.config import parse_config
from tokyo_ia.errors import (
    UpstreamBadRequestError,
    UpstreamError,
    UpstreamRateLimitError,
    UpstreamTimeoutError,
)
from tokyo_ia.providers import registry
from tokyo_ia.providers.base import ChatCall, EmbedCall, Provider

HELLO = {"model": "public", "messages": [{"role": "user", "content": "hi there"}]}


@pytest.fixture
async def provider(fresh_openai_emu: OpenAIEmulator) -> AsyncIterator[Provider]:
    p = await _provider(fresh_openai_emu.url + "/v1")
    yield p
    await p.close()


async def _provider(base_url: str, **extra: Any) -> Provider:
    config = parse_config(
        {"providers": {"up": {"kind": "openai", "base_url": base_url, "api_key": "test-key", **extra}}}
    )
    p = registry.create("up", config.providers["up"])
    await p.start()
    return p


def call(model: str, **body: Any) -> ChatCall:
    return ChatCall({**HELLO, **body}, model, "req-1")


async def test_chat_forwards_unknown_fields_and_keeps_response_fields(
    provider: Provider, fresh_openai_emu: OpenAIEmulator
) -> None:
    try:
        response = await provider.chat(call("gpt-x", some_future_param={"a": 1}, seed=7))
    finally:
        await provider.close()
    sent = fresh_openai_emu.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["model"] == "gpt-x"  # deployment model replaces the public name
    assert sent.body["some_future_param"] == {"a": 1}
    assert sent.body["seed"] == 7
    assert sent.headers["Authorization"] == "Bearer test-key"
    assert response["choices"][0]["message"]["content"] == "echo: hi there"
    assert response["x_emulator_extra"] == {"kept": True}
    assert response["service_tier"] == "default"


async def test_stream_asks_for_usage_and_yields_chunks(
    provider: Provider, fresh_openai_emu: OpenAIEmulator
) -> None:
    try:
        chunks = [c async for c in provider.stream(call("gpt-x", stream=True))]
    finally:
        await provider.close()
    assert fresh_openai_emu.requests[-1].body["stream_options"] == {"include_usage": True}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip() == "echo: hi there"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] > 0


@pytest.mark.parametrize(
    ("status", "error", "retryable"),
    [
        (400, UpstreamBadRequestError, False),
        (401, UpstreamError, False),
        (404, UpstreamError, False),
        (429, UpstreamRateLimitError, True),
        (500, UpstreamError, True),
        (503, UpstreamError, True),
    ],
)
async def test_error_statuses_map_to_the_tree(
    provider: Provider, status: int, error: type[UpstreamError], retryable: bool
) -> None:
    try:
        with pytest.raises(error) as info:
            await provider.chat(call(f"error-{status}"))
    finally:
        await provider.close()
    assert info.value.upstream_status == status
    assert info.value.retryable is retryable
    assert f"emulated error {status}" in info.value.message
    if status == 429:
        assert info.value.retry_after == 1.0


async def test_bad_credentials_say_which_config_key(fresh_openai_emu: OpenAIEmulator) -> None:
    p = await _provider(fresh_openai_emu.url + "/v1", api_key="wrong")
    try:
        with pytest.raises(UpstreamError, match=r"check providers\.up\.api_key") as info:
            await p.chat(call("gpt-x"))
    finally:
        await p.close()
    assert info.value.status == 502
    assert "wrong" not in info.value.message


async def test_timeout(fresh_openai_emu: OpenAIEmulator) -> None:
    p = await _provider(fresh_openai_emu.url + "/v1", timeout_s=0.2)
    try:
        with pytest.raises(UpstreamTimeoutError) as info:
            await p.chat(call("slow-2000"))
    finally:
        await p.close()
    assert info.value.status == 504


async def test_connection_refused_is_retryable() -> None:
    from tests.fakes.base import free_port

    p = await _provider(f"http://127.0.0.1:{free_port()}/v1")
    try:
        with pytest.raises(UpstreamError, match="cannot connect") as info:
            await p.chat(call("gpt-x"))
    finally:
        await p.close()
    assert info.value.retryable


async def test_drop_mid_stream_raises(provider: Provider) -> None:
    seen: list[Any] = []
    try:
        with pytest.raises(UpstreamError):
            async for chunk in provider.stream(call("drop", stream=True)):
                seen.append(chunk)
    finally:
        await provider.close()
    assert seen  # the first chunks arrived before the cut


async def test_embeddings_and_check(provider: Provider) -> None:
    try:
        out = await provider.embed(EmbedCall({"model": "e", "input": ["a", "b"]}, "text-emb", "r"))
        checked = await provider.check()
    finally:
        await provider.close()
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert checked.ok, checked.detail

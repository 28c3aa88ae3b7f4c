"""One suite every provider passes, through the gateway, with the official openai SDK.

For each case in tests/cases.py: start the provider's emulator, a ``tokyo-ia serve`` whose
public models route to it, and drive it exactly as an application would. A provider that lacks
a feature opts out explicitly (the reason is in tests/cases.py and docs/providers.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.cases import CASES, ProviderCase
from tests.support import GatewayProcess

WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}
ERRORS = [
    (400, openai.BadRequestError, 400),
    (429, openai.RateLimitError, 429),
    (500, openai.InternalServerError, 502),
    (503, openai.InternalServerError, 502),
]


class Env:
    def __init__(self, case: ProviderCase, gateway: GatewayProcess) -> None:
        self.case = case
        self.gateway = gateway
        self.client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="k", max_retries=0, timeout=20)

    def skip_if_opted_out(self, feature: str) -> None:
        reason = self.case.opt_outs.get(feature)
        if reason:
            pytest.skip(f"{self.case.kind} opts out of {feature}: {reason}")


@pytest.fixture(scope="module", params=CASES, ids=str)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    case: ProviderCase = request.param
    emulator = case.emulator() if case.emulator is not None else None
    if emulator is not None:
        emulator.start()
    try:
        provider = case.provider_config(emulator.url if emulator else None)
        models: dict[str, Any] = {
            "chat": [{"provider": "p", "model": case.chat_model}],
            "drop": [{"provider": "p", "model": "drop"}],
            "embed": [{"provider": "p", "model": case.embed_model}],
        }
        for status, _, _ in ERRORS:
            models[f"err-{status}"] = [{"provider": "p", "model": f"error-{status}"}]
        with GatewayProcess({"providers": {"p": provider}, "models": models}) as gateway:
            env = Env(case, gateway)
            with env.client:
                yield env
    finally:
        if emulator is not None:
            emulator.stop()


def _user(text: str) -> list[Any]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


def test_chat(env: Env) -> None:
    raw = env.client.chat.completions.with_raw_response.create(model="chat", messages=_user("ping 4711"))
    reply = raw.parse()
    assert raw.headers["x-tokyo-ia-provider"] == "p"
    assert reply.object == "chat.completion"
    assert reply.choices[0].finish_reason == "stop"
    assert "ping 4711" in (reply.choices[0].message.content or "")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0


def test_stream_with_usage(env: Env) -> None:
    chunks = list(
        env.client.chat.completions.create(
            model="chat", messages=_user("stream 4712"), stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert "stream 4712" in text
    assert finishes == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert chunks[0].choices[0].delta.role == "assistant"


def _check_tool_call(call: Any) -> None:
    assert call.type == "function"
    assert call.id
    assert call.function.name == "get_weather"
    assert "location" in json.loads(call.function.arguments)


def test_tool_call(env: Env) -> None:
    reply = env.client.chat.completions.create(
        model="chat", messages=_user("weather in Paris?"), tools=[WEATHER_TOOL], tool_choice="required"
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    calls = reply.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    _check_tool_call(calls[0])


def test_streamed_tool_call(env: Env) -> None:
    stream = env.client.chat.completions.create(
        model="chat",
        messages=_user("weather in Paris?"),
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
    )
    ids, names, args, finish = set(), "", "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        for tc in chunk.choices[0].delta.tool_calls or []:
            assert tc.index == 0
            ids.add(tc.id) if tc.id else None
            names += tc.function.name or "" if tc.function else ""
            args += tc.function.arguments or "" if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert len(ids) == 1 and names == "get_weather"
    assert "location" in json.loads(args)
    assert finish == "tool_calls"


def test_multi_turn_with_tool_result(env: Env) -> None:
    first = env.client.chat.completions.create(
        model="chat", messages=_user("weather in Paris?"), tools=[WEATHER_TOOL], tool_choice="required"
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    messages: list[Any] = [
        *_user("weather in Paris?"),
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})},
        {"role": "user", "content": "and tomorrow 4713?"},
    ]
    reply = env.client.chat.completions.create(model="chat", messages=messages, tools=[WEATHER_TOOL])
    assert "tomorrow 4713" in (reply.choices[0].message.content or "")


@pytest.mark.parametrize(("upstream", "exception", "status"), ERRORS, ids=[str(e[0]) for e in ERRORS])
def test_errors(env: Env, upstream: int, exception: type[openai.APIStatusError], status: int) -> None:
    env.skip_if_opted_out("errors")
    with pytest.raises(exception) as info:
        env.client.chat.completions.create(model=f"err-{upstream}", messages=_user("x"))
    assert info.value.status_code == status
    assert info.value.response.headers["x-request-id"]
    if status == 429:
        assert int(info.value.response.headers["retry-after"]) >= 1


def test_upstream_drop_mid_stream(env: Env) -> None:
    env.skip_if_opted_out("drop")
    with pytest.raises(openai.APIError):
        for _ in env.client.chat.completions.create(model="drop", messages=_user("x"), stream=True):
            pass


def test_embeddings(env: Env) -> None:
    if "embeddings" in env.case.opt_outs:
        with pytest.raises(openai.BadRequestError) as info:
            env.client.embeddings.create(model="embed", input="x")
        assert info.value.code == "embeddings_unsupported"
        return
    out = env.client.embeddings.create(model="embed", input=["one", "two"])
    assert [d.index for d in out.data] == [0, 1]
    assert all(len(d.embedding) > 0 for d in out.data)
    assert out.usage.prompt_tokens > 0

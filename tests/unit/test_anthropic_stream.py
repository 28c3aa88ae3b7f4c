"""Anthropic's SSE event stream → OpenAI chat.completion.chunk objects.

The event sequences are the examples of Anthropic's streaming guide (ids and numbers as
printed there); each test feeds them to the translator and checks the chunks an OpenAI client
would receive.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tokyo_ia.errors import UpstreamError
from tokyo_ia.providers.anthropic_translate import StreamTranslator

# -- streams -----------------------------------------------------------------------------

# The "streaming request with tool use" example of Anthropic's streaming guide.
TOOL_STREAM: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_014p7gG3wDgGV9EUtLvnow3U",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "stop_sequence": None,
            "usage": {"input_tokens": 472, "output_tokens": 2},
            "content": [],
            "stop_reason": None,
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Okay"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ","}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " let"}},
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "'s check the weather:"},
    },
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {
            "type": "tool_use",
            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "name": "get_weather",
            "input": {},
        },
    },
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '{"location":'},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": ' "San'},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": " Francisc"},
    },
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "o,"}},
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": ' CA"'},
    },
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ", "}},
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '"unit": "fah'},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": 'renheit"}'},
    },
    {"type": "content_block_stop", "index": 1},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 89},
    },
    {"type": "message_stop"},
]


def run(events: list[dict[str, Any]]) -> tuple[StreamTranslator, list[dict[str, Any]]]:
    translator = StreamTranslator("claude", "requested-model", created=1700000000)
    chunks = [chunk for event in events for chunk in translator.feed(event)]
    return translator, chunks


def test_tool_use_stream_of_reference_example() -> None:
    translator, chunks = run(TOOL_STREAM)
    assert translator.done
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["id"] == "msg_014p7gG3wDgGV9EUtLvnow3U" for c in chunks)
    assert all(c["model"] == "claude-sonnet-4-5-20250929" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    text = "".join(d.get("content") or "" for d in deltas)
    assert text == "Okay, let's check the weather:"
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0] == {
        "index": 0,
        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert all(tc["index"] == 0 for tc in calls)  # block 1 is the first tool call
    arguments = "".join(tc["function"]["arguments"] for tc in calls)
    assert json.loads(arguments) == {"location": "San Francisco, CA", "unit": "fahrenheit"}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "tool_calls"
    assert finishes[:-1] == [None] * (len(finishes) - 1)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == 472
    assert chunks[-1]["usage"]["completion_tokens"] == 89
    assert chunks[-1]["usage"]["total_tokens"] == 561


def test_two_parallel_tool_calls_get_their_own_indexes() -> None:
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "m", "model": "c", "usage": {}}}
    ]
    for block, name in ((0, "a"), (1, "b")):
        start = {"type": "tool_use", "id": f"toolu_{name}", "name": name, "input": {}}
        events.append({"type": "content_block_start", "index": block, "content_block": start})
        delta = {"type": "input_json_delta", "partial_json": "{}"}
        events.append({"type": "content_block_delta", "index": block, "delta": delta})
    _, chunks = run(events)
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [(tc["index"], tc.get("id")) for tc in calls] == [
        (0, "toolu_a"),
        (0, None),
        (1, "toolu_b"),
        (1, None),
    ]


def test_thinking_deltas_and_unknown_events_are_ignored() -> None:
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "m", "model": "c", "usage": {"input_tokens": 3}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "some_new_event", "payload": 1},
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 5}},
    ]
    translator, chunks = run(events)
    assert not translator.done  # no message_stop yet
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": ""}, {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_message_delta_cumulative_usage_replaces_start_numbers() -> None:
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {"id": "m", "model": "c", "usage": {"input_tokens": 5, "output_tokens": 1}},
        },
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"input_tokens": 5, "cache_read_input_tokens": 100, "output_tokens": 30},
        },
        {"type": "message_stop"},
    ]
    _, chunks = run(events)
    usage = chunks[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (105, 30)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 100}


@pytest.mark.parametrize(
    ("error", "status", "retryable"),
    [
        ({"type": "overloaded_error", "message": "Overloaded"}, 529, True),
        ({"type": "api_error", "message": "Internal server error"}, 500, True),
        ({"type": "invalid_request_error", "message": "bad"}, 400, False),
    ],
)
def test_error_event_raises(error: dict[str, Any], status: int, retryable: bool) -> None:
    translator = StreamTranslator("claude", "m")
    with pytest.raises(UpstreamError) as info:
        translator.feed({"type": "error", "error": error})
    assert info.value.upstream_status == status
    assert info.value.retryable is retryable
    assert error["message"] in info.value.message

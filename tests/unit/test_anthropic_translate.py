"""Translation OpenAI ⇄ Anthropic Messages, checked on the examples of both API references.

The Anthropic payloads below are the request, response and stream examples of Anthropic's
Messages API reference and its tool-use and streaming guides (ids and numbers as printed
there); the OpenAI side is what an OpenAI client sends for the same conversation.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tokyo_ia.errors import InvalidRequestError, UnsupportedError
from tokyo_ia.providers.anthropic_translate import (
    convert_usage,
    error_message,
    finish_reason,
    from_messages_response,
    to_messages_request,
)

WEATHER_TOOL_OPENAI = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}
WEATHER_TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "input_schema": WEATHER_TOOL_OPENAI["function"]["parameters"],  # type: ignore[index]
}


def translate(body: dict[str, Any], default_max_tokens: int = 4096) -> dict[str, Any]:
    return to_messages_request(body, "claude-sonnet-4-5", default_max_tokens=default_max_tokens)


# -- requests ----------------------------------------------------------------------------


def test_basic_request_matches_reference_example() -> None:
    body = {"model": "public", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hello, world"}]}
    assert translate(body) == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Hello, world"}],
    }


def test_max_tokens_default_and_max_completion_tokens_wins() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert translate({"messages": messages}, default_max_tokens=321)["max_tokens"] == 321
    both = {"messages": messages, "max_tokens": 10, "max_completion_tokens": 20}
    assert translate(both)["max_tokens"] == 20


def test_system_and_developer_messages_are_hoisted_and_turns_merged() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "Hello there."},
            {"role": "user", "content": "Can you describe LLMs to me?"},
            {"role": "assistant", "content": "Hi, I'm Claude."},
            {"role": "user", "content": "Thanks"},
        ]
    }
    payload = translate(body)
    assert payload["system"] == "You are a helpful assistant.\n\nAnswer in French."
    assert payload["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Hello there."},
                {"type": "text", "text": "Can you describe LLMs to me?"},
            ],
        },
        {"role": "assistant", "content": "Hi, I'm Claude."},
        {"role": "user", "content": "Thanks"},
    ]


def test_cache_control_is_kept_and_forces_block_system() -> None:
    marker = {"type": "ephemeral"}
    body = {
        "messages": [
            {
                "role": "system",
                "content": [{"type": "text", "text": "Long book...", "cache_control": marker}],
            },
            {"role": "user", "content": [{"type": "text", "text": "Summarise", "cache_control": marker}]},
        ]
    }
    payload = translate(body)
    assert payload["system"] == [{"type": "text", "text": "Long book...", "cache_control": marker}]
    assert payload["messages"][0]["content"] == [
        {"type": "text", "text": "Summarise", "cache_control": marker}
    ]


def test_images_data_url_and_http_url() -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQSkZJRg=="}},
                    {"type": "image_url", "image_url": {"url": "https://upload.wikimedia.org/ant.jpg"}},
                    {"type": "text", "text": "Compare these images."},
                ],
            }
        ]
    }
    assert translate(body)["messages"][0]["content"] == [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQSkZJRg=="},
        },
        {"type": "image", "source": {"type": "url", "url": "https://upload.wikimedia.org/ant.jpg"}},
        {"type": "text", "text": "Compare these images."},
    ]


def test_pdf_file_part_becomes_document() -> None:
    part = {
        "type": "file",
        "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="},
    }
    content = translate({"messages": [{"role": "user", "content": [part]}]})["messages"][0]["content"]
    assert content == [
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
        }
    ]


@pytest.mark.parametrize(
    ("part", "error"),
    [
        ({"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}, InvalidRequestError),
        ({"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}}, InvalidRequestError),
        ({"type": "input_audio", "input_audio": {"data": "..", "format": "wav"}}, UnsupportedError),
        ({"type": "file", "file": {"file_id": "file-123"}}, UnsupportedError),
    ],
)
def test_unsupported_or_invalid_parts_are_refused(part: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        translate({"messages": [{"role": "user", "content": [part]}]})


def test_tool_round_trip_matches_reference_example() -> None:
    """OpenAI's tool-call turn and tool message become tool_use and tool_result blocks."""
    body = {
        "messages": [
            {"role": "user", "content": "What's the weather like in San Francisco?"},
            {
                "role": "assistant",
                "content": "I'll check the current weather in San Francisco for you.",
                "tool_calls": [
                    {
                        "id": "toolu_01A09q90qw90lq917835lq9",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"location": "San Francisco, CA", "unit": "celsius"}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_01A09q90qw90lq917835lq9", "content": "15 degrees"},
        ],
        "tools": [WEATHER_TOOL_OPENAI],
    }
    payload = translate(body)
    assert payload["tools"] == [WEATHER_TOOL_ANTHROPIC]
    assert "tool_choice" not in payload
    assert payload["messages"] == [
        {"role": "user", "content": "What's the weather like in San Francisco?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "I'll check the current weather in San Francisco for you."},
                {
                    "type": "tool_use",
                    "id": "toolu_01A09q90qw90lq917835lq9",
                    "name": "get_weather",
                    "input": {"location": "San Francisco, CA", "unit": "celsius"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                    "content": "15 degrees",
                }
            ],
        },
    ]


def test_parallel_tool_results_share_one_user_turn_before_the_next_question() -> None:
    calls = [
        {"id": f"toolu_{i}", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
        for i in (1, 2)
    ]
    body = {
        "messages": [
            {"role": "user", "content": "Weather in Paris and Tokyo?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "rain"}]},
            {"role": "user", "content": "And tomorrow?"},
        ]
    }
    last = translate(body)["messages"][-1]
    assert last == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "rain"}]},
            {"type": "text", "text": "And tomorrow?"},
        ],
    }


def test_bad_tool_arguments_are_a_400() -> None:
    call = {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
    body = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}]}
    with pytest.raises(InvalidRequestError) as info:
        translate(body)
    assert info.value.param == "messages[1].tool_calls[0].function.arguments"


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            None,
            {"type": "tool", "name": "get_weather"},
        ),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        (None, True, None),
    ],
)
def test_tool_choice_mapping(choice: Any, parallel: bool | None, expected: dict[str, Any] | None) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL_OPENAI]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert translate(body).get("tool_choice") == expected


def test_sampling_stop_user_and_dropped_fields() -> None:
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "stop": "\n\nHuman:",
        "user": "user-42",
        "seed": 7,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.1,
        "logit_bias": {"1": 2},
        "logprobs": True,
        "metadata": {"tag": "a"},
        "store": True,
        "stream_options": {"include_usage": True},
        "response_format": {"type": "json_object"},
        "some_future_field": 1,
        "n": 1,
    }
    payload = translate(body)
    assert payload == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": "x"}],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "stop_sequences": ["\n\nHuman:"],
        "metadata": {"user_id": "user-42"},
    }
    assert translate({**body, "stop": ["a", "b"]})["stop_sequences"] == ["a", "b"]


def test_json_schema_response_format_becomes_output_config() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    }
    assert translate(body)["output_config"] == {"format": {"type": "json_schema", "schema": schema}}


def test_n_above_one_is_refused() -> None:
    with pytest.raises(UnsupportedError):
        translate({"messages": [{"role": "user", "content": "x"}], "n": 2})


def test_the_callers_body_is_not_mutated() -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL_OPENAI], "stop": "s"}
    before = json.dumps(body, sort_keys=True)
    translate(body)
    assert json.dumps(body, sort_keys=True) == before


# -- responses ---------------------------------------------------------------------------


def test_text_response_matches_reference_example() -> None:
    message = {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "Hi! My name is Claude."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 2095, "output_tokens": 503},
    }
    completion = from_messages_response(message, created=1700000000)
    assert completion == {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "claude-sonnet-4-5-20250929",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi! My name is Claude.", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 2095,
            "completion_tokens": 503,
            "total_tokens": 2598,
            "prompt_tokens_details": {"cached_tokens": 0},
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
        },
    }


def test_tool_use_response_matches_reference_example() -> None:
    message = {
        "id": "msg_01Aq9w938a90dw8q",
        "model": "claude-sonnet-4-5",
        "stop_reason": "tool_use",
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "The user wants weather...", "signature": "abc"},
            {"type": "text", "text": "I'll check the current weather in San Francisco for you."},
            {
                "type": "tool_use",
                "id": "toolu_01A09q90qw90lq917835lq9",
                "name": "get_weather",
                "input": {"location": "San Francisco, CA", "unit": "celsius"},
            },
        ],
        "usage": {"input_tokens": 10, "output_tokens": 20},
    }
    choice = from_messages_response(message)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "I'll check the current weather in San Francisco for you."
    [call] = choice["message"]["tool_calls"]
    assert call["id"] == "toolu_01A09q90qw90lq917835lq9"
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"location": "San Francisco, CA", "unit": "celsius"}


def test_tool_only_response_has_null_content() -> None:
    block = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
    message = {"id": "m", "content": [block], "stop_reason": "tool_use", "usage": {}}
    msg = from_messages_response(message)["choices"][0]["message"]
    assert msg["content"] is None
    assert msg["tool_calls"][0]["function"]["arguments"] == "{}"


def test_usage_with_prompt_caching_reference_numbers() -> None:
    usage = {
        "input_tokens": 50,
        "cache_read_input_tokens": 100000,
        "cache_creation_input_tokens": 248,
        "output_tokens": 503,
    }
    assert convert_usage(usage) == {
        "prompt_tokens": 100298,
        "completion_tokens": 503,
        "total_tokens": 100801,
        "prompt_tokens_details": {"cached_tokens": 100000},
        "cache_read_input_tokens": 100000,
        "cache_creation_input_tokens": 248,
    }


@pytest.mark.parametrize(
    ("stop_reason", "expected"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        (None, None),
    ],
)
def test_stop_reason_mapping(stop_reason: str | None, expected: str | None) -> None:
    assert finish_reason(stop_reason) == expected


def test_error_message_of_reference_error_body() -> None:
    body = b'{"type":"error","error":{"type":"not_found_error","message":"The requested resource could not be found."}}'
    assert error_message(body) == "not_found_error: The requested resource could not be found."
    assert error_message(b"<html>502 Bad Gateway</html>") == "<html>502 Bad Gateway</html>"

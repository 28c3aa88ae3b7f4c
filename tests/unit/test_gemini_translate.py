"""Translation between OpenAI chat and the Gemini API, checked against payloads shaped like the
examples of Google's API reference (generateContent, function calling, streaming, usage)."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from tokyo_ia.errors import InvalidRequestError, UnsupportedError
from tokyo_ia.providers.gemini_translate import (
    StreamTranslator,
    from_gemini_response,
    generation_config,
    media_part,
    to_gemini_request,
    usage_from,
)

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
            "additionalProperties": False,
        },
    },
}

# Shaped like the reference's text-generation response example.
TEXT_RESPONSE: dict[str, Any] = {
    "candidates": [
        {
            "content": {"parts": [{"text": "AI learns patterns "}, {"text": "from data."}], "role": "model"},
            "finishReason": "STOP",
            "index": 0,
            "safetyRatings": [{"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"}],
        }
    ],
    "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 420, "totalTokenCount": 428},
    "modelVersion": "gemini-2.5-flash",
    "responseId": "mAitaKzGNLeQ1dkPt7u8sQQ",
}

# Shaped like the reference's function-calling example (find_theaters).
FUNCTION_CALL_RESPONSE: dict[str, Any] = {
    "candidates": [
        {
            "content": {
                "parts": [
                    {
                        "functionCall": {
                            "name": "find_theaters",
                            "args": {"movie": "Barbie", "location": "Mountain View, CA"},
                        }
                    }
                ],
                "role": "model",
            },
            "finishReason": "STOP",
            "index": 0,
        }
    ],
    "promptFeedback": {"safetyRatings": []},
    "responseId": "resp-fc-1",
}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


# -- request --------------------------------------------------------------------------------


def test_roles_system_instruction_and_merged_turns() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "You are a cat."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]},
            user("Hello"),
            user("Are you there?"),
            {"role": "assistant", "content": "Meow."},
            user("Again"),
        ]
    }
    request = to_gemini_request(body)
    assert request["systemInstruction"] == {
        "parts": [{"text": "You are a cat."}, {"text": "Answer briefly."}]
    }
    assert request["contents"] == [
        {"role": "user", "parts": [{"text": "Hello"}, {"text": "Are you there?"}]},
        {"role": "model", "parts": [{"text": "Meow."}]},
        {"role": "user", "parts": [{"text": "Again"}]},
    ]
    assert "generationConfig" not in request
    assert "tools" not in request


def test_request_never_mutates_the_callers_body() -> None:
    body = {
        "messages": [user("a"), {"role": "assistant", "content": "b"}, user("c")],
        "tools": [WEATHER_TOOL],
        "tool_choice": "auto",
        "stop": "END",
    }
    before = copy.deepcopy(body)
    request = to_gemini_request(body)
    request["contents"][0]["parts"].append({"text": "x"})
    assert body == before


def test_empty_assistant_turns_are_dropped_and_system_alone_is_refused() -> None:
    body = {"messages": [user("a"), {"role": "assistant", "content": ""}, user("b")]}
    assert to_gemini_request(body)["contents"] == [{"role": "user", "parts": [{"text": "a"}, {"text": "b"}]}]
    with pytest.raises(InvalidRequestError, match="at least one user"):
        to_gemini_request({"messages": [{"role": "system", "content": "only"}]})
    with pytest.raises(InvalidRequestError, match="role 'robot'"):
        to_gemini_request({"messages": [{"role": "robot", "content": "x"}]})


def test_image_audio_and_file_parts() -> None:
    content = [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp?size=2", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "gs://bucket/photo"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "mp3"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}},
    ]
    parts = to_gemini_request({"messages": [{"role": "user", "content": content}]})["contents"][0]["parts"]
    assert parts == [
        {"text": "What is in these?"},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
        {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/cat.webp?size=2"}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "gs://bucket/photo"}},
        {"inlineData": {"mimeType": "audio/mp3", "data": "UklGRg=="}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
    ]


def test_data_url_without_base64_is_encoded() -> None:
    assert media_part("data:text/plain,hi%20there", default_mime="x/y") == {
        "inlineData": {"mimeType": "text/plain", "data": "aGkgdGhlcmU="}
    }


def test_unsupported_content_parts_name_the_message() -> None:
    with pytest.raises(UnsupportedError, match=r"messages\[0\].*'video'"):
        to_gemini_request({"messages": [{"role": "user", "content": [{"type": "video"}]}]})
    with pytest.raises(UnsupportedError, match="inline only"):
        to_gemini_request(
            {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]}
        )


def test_generation_config_maps_every_sampling_field() -> None:
    body = {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "n": 2,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "seed": 7,
        "max_tokens": 10,
        "max_completion_tokens": 99,
        "stop": "END",
        "response_format": {"type": "json_object"},
    }
    assert generation_config(body) == {
        "temperature": 0.2,
        "topP": 0.9,
        "topK": 40,
        "candidateCount": 2,
        "presencePenalty": 0.5,
        "frequencyPenalty": -0.5,
        "seed": 7,
        "maxOutputTokens": 99,
        "stopSequences": ["END"],
        "responseMimeType": "application/json",
    }
    assert generation_config({"max_tokens": 5, "stop": ["a", "b"]}) == {
        "maxOutputTokens": 5,
        "stopSequences": ["a", "b"],
    }


def test_json_schema_response_format_is_sent_as_json_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    assert generation_config({"response_format": fmt}) == {
        "responseMimeType": "application/json",
        "responseJsonSchema": schema,
    }
    assert generation_config({"response_format": {"type": "text"}}) == {}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"mode": "AUTO"}),
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_weather"]},
        ),
    ],
)
def test_tools_and_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    request = to_gemini_request(
        {"messages": [user("weather?")], "tools": [WEATHER_TOOL], "tool_choice": choice}
    )
    assert request["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Current weather in a city",
                    "parametersJsonSchema": WEATHER_TOOL["function"]["parameters"],
                }
            ]
        }
    ]
    assert request["toolConfig"] == {"functionCallingConfig": expected}


def test_tool_errors_are_explicit() -> None:
    with pytest.raises(UnsupportedError, match="tool type 'web_search'"):
        to_gemini_request({"messages": [user("x")], "tools": [{"type": "web_search"}]})
    with pytest.raises(UnsupportedError, match="tool_choice"):
        to_gemini_request({"messages": [user("x")], "tools": [WEATHER_TOOL], "tool_choice": "sometimes"})


def test_function_calling_round_trip_request() -> None:
    """Assistant tool calls become model functionCall parts; tool results one user turn."""
    body = {
        "messages": [
            user("Weather in Paris and Rome? And which theaters show Barbie?"),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
                        "extra_content": {"google": {"thought_signature": "c2ln"}},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "find_theaters", "arguments": '{"movie": "Barbie"}'},
                    },
                    {"id": "call_3", "type": "function", "function": {"name": "noop", "arguments": ""}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
            {"role": "tool", "tool_call_id": "call_2", "content": '["Cinemark", "AMC"]'},
            {"role": "tool", "tool_call_id": "call_3", "content": [{"type": "text", "text": "done"}]},
            user("Thanks"),
        ]
    }
    contents = to_gemini_request(body)["contents"]
    assert contents[1] == {
        "role": "model",
        "parts": [
            {
                "functionCall": {"name": "get_weather", "args": {"location": "Paris"}},
                "thoughtSignature": "c2ln",
            },
            {"functionCall": {"name": "find_theaters", "args": {"movie": "Barbie"}}},
            {"functionCall": {"name": "noop", "args": {}}},
        ],
    }
    assert contents[2] == {
        "role": "user",
        "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"temperature": 21}}},
            {"functionResponse": {"name": "find_theaters", "response": {"content": ["Cinemark", "AMC"]}}},
            {"functionResponse": {"name": "noop", "response": {"content": "done"}}},
            {"text": "Thanks"},
        ],
    }
    assert len(contents) == 3


def test_tool_result_without_a_matching_call_is_refused() -> None:
    body = {"messages": [user("x"), {"role": "tool", "tool_call_id": "call_zzz", "content": "1"}]}
    with pytest.raises(InvalidRequestError, match="call_zzz"):
        to_gemini_request(body)


def test_malformed_arguments_are_kept_rather_than_dropped() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}
    body = {"messages": [user("x"), {"role": "assistant", "tool_calls": [call]}]}
    part = to_gemini_request(body)["contents"][1]["parts"][0]
    assert part == {"functionCall": {"name": "f", "args": {"arguments": "not json"}}}


def test_safety_settings_are_sent() -> None:
    settings = [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"}]
    assert to_gemini_request({"messages": [user("x")]}, settings)["safetySettings"] == settings


# -- response -------------------------------------------------------------------------------


def test_text_response() -> None:
    completion = from_gemini_response(TEXT_RESPONSE, request_id="req1", model="gemini-2.5-flash")
    assert completion["object"] == "chat.completion"
    assert completion["id"] == "chatcmpl-mAitaKzGNLeQ1dkPt7u8sQQ"
    assert completion["model"] == "gemini-2.5-flash"
    assert completion["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "AI learns patterns from data.", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert completion["usage"] == {
        "prompt_tokens": 8,
        "completion_tokens": 420,
        "total_tokens": 428,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def test_function_call_response() -> None:
    completion = from_gemini_response(FUNCTION_CALL_RESPONSE, request_id="req1", model="gemini-2.5-pro")
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    assert call["function"]["name"] == "find_theaters"
    assert orjson.loads(call["function"]["arguments"]) == {"movie": "Barbie", "location": "Mountain View, CA"}
    assert completion["model"] == "gemini-2.5-pro"  # no modelVersion sent: the deployment's model


def test_tool_call_ids_are_stable_and_distinct() -> None:
    data = copy.deepcopy(FUNCTION_CALL_RESPONSE)
    part = data["candidates"][0]["content"]["parts"][0]
    data["candidates"][0]["content"]["parts"] = [part, copy.deepcopy(part)]
    first = from_gemini_response(data, request_id="a", model="m")["choices"][0]["message"]["tool_calls"]
    again = from_gemini_response(data, request_id="b", model="m")["choices"][0]["message"]["tool_calls"]
    assert [c["id"] for c in first] == [c["id"] for c in again]
    assert first[0]["id"] != first[1]["id"]
    data["candidates"][0]["content"]["parts"][0]["functionCall"]["id"] = "upstream-id"
    kept = from_gemini_response(data, request_id="a", model="m")["choices"][0]["message"]["tool_calls"]
    assert kept[0]["id"] == "upstream-id"


def test_thoughts_are_left_out_and_signatures_kept() -> None:
    data = {
        "candidates": [
            {
                "content": {
                    "parts": [
                        {"text": "Thinking about the weather...", "thought": True},
                        {"text": "Let me check."},
                        {
                            "functionCall": {"name": "get_weather", "args": {"location": "Paris"}},
                            "thoughtSignature": "c2ln",
                        },
                    ],
                    "role": "model",
                },
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 10,
            "candidatesTokenCount": 5,
            "thoughtsTokenCount": 30,
            "cachedContentTokenCount": 4,
            "totalTokenCount": 45,
        },
    }
    completion = from_gemini_response(data, request_id="r", model="m")
    message = completion["choices"][0]["message"]
    assert message["content"] == "Let me check."
    assert message["tool_calls"][0]["extra_content"] == {"google": {"thought_signature": "c2ln"}}
    assert completion["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 35,
        "total_tokens": 45,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 30},
    }


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("OTHER", "stop"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
        (None, "stop"),
    ],
)
def test_finish_reasons(reason: str | None, expected: str) -> None:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": "x"}], "role": "model"}}
    if reason:
        candidate["finishReason"] = reason
    completion = from_gemini_response({"candidates": [candidate]}, request_id="r", model="m")
    assert completion["choices"][0]["finish_reason"] == expected


def test_safety_stopped_candidate_has_empty_content() -> None:
    data = {"candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": []}]}
    choice = from_gemini_response(data, request_id="r", model="m")["choices"][0]
    assert choice["message"]["content"] == ""
    assert choice["finish_reason"] == "content_filter"


def test_blocked_prompt_is_a_content_filtered_completion() -> None:
    data = {
        "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
        "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7},
    }
    completion = from_gemini_response(data, request_id="r", model="m")
    assert completion["id"] == "chatcmpl-r"
    (choice,) = completion["choices"]
    assert choice["finish_reason"] == "content_filter"
    assert choice["message"]["content"] == ""
    assert "SAFETY" in choice["message"]["refusal"]
    assert completion["usage"]["prompt_tokens"] == 7


def test_several_candidates_come_back_in_index_order() -> None:
    def candidate(i: int) -> dict[str, Any]:
        return {
            "content": {"parts": [{"text": f"answer {i}"}], "role": "model"},
            "finishReason": "STOP",
            "index": i,
        }

    completion = from_gemini_response({"candidates": [candidate(1), candidate(0)]}, request_id="r", model="m")
    assert [c["message"]["content"] for c in completion["choices"]] == ["answer 0", "answer 1"]


def test_usage_without_metadata_is_zero() -> None:
    assert usage_from(None)["total_tokens"] == 0
    assert usage_from({"promptTokenCount": 3, "candidatesTokenCount": 2, "toolUsePromptTokenCount": 1}) == {
        "prompt_tokens": 4,
        "completion_tokens": 2,
        "total_tokens": 6,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


# -- streams --------------------------------------------------------------------------------

STREAM_EVENTS: list[dict[str, Any]] = [
    {
        "candidates": [{"content": {"parts": [{"text": "The"}], "role": "model"}, "index": 0}],
        "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
        "modelVersion": "gemini-2.5-flash",
        "responseId": "stream-1",
    },
    {
        "candidates": [{"content": {"parts": [{"text": " sky is blue."}], "role": "model"}, "index": 0}],
        "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
        "modelVersion": "gemini-2.5-flash",
        "responseId": "stream-1",
    },
    {
        "candidates": [
            {"content": {"parts": [{"text": ""}], "role": "model"}, "finishReason": "STOP", "index": 0}
        ],
        "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 5, "totalTokenCount": 14},
        "modelVersion": "gemini-2.5-flash",
        "responseId": "stream-1",
    },
]


def test_stream_of_text() -> None:
    translator = StreamTranslator(request_id="req", model="gemini-2.5-flash")
    chunks = [c for event in STREAM_EVENTS for c in translator.feed(event)]
    assert translator.complete
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-stream-1" for c in chunks)
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks]
    assert deltas == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "The"}, None),
        ({"content": " sky is blue."}, None),
        ({}, "stop"),
    ]
    usage = translator.usage_chunk()
    assert usage["choices"] == []
    assert usage["id"] == "chatcmpl-stream-1"
    assert usage["usage"]["prompt_tokens"] == 9
    assert usage["usage"]["completion_tokens"] == 5


def test_stream_tool_call_matches_the_non_streamed_id() -> None:
    translator = StreamTranslator(request_id="req", model="m")
    chunks = translator.feed(FUNCTION_CALL_RESPONSE)
    whole = from_gemini_response(FUNCTION_CALL_RESPONSE, request_id="req", model="m")
    expected = whole["choices"][0]["message"]["tool_calls"][0]
    assert chunks[1]["choices"][0]["delta"] == {"tool_calls": [{"index": 0, **expected}]}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert translator.complete


def test_stream_tool_calls_across_events_get_increasing_indexes() -> None:
    translator = StreamTranslator(request_id="req", model="m")

    def event(name: str, finish: str | None = None) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": [{"functionCall": {"name": name, "args": {}}}]}}
        if finish:
            candidate["finishReason"] = finish
        return {"candidates": [candidate], "responseId": "r"}

    chunks = translator.feed(event("a")) + translator.feed(event("b", "STOP"))
    calls = [
        c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if "tool_calls" in c["choices"][0]["delta"]
    ]
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(0, "a"), (1, "b")]
    assert calls[0]["id"] != calls[1]["id"]


def test_stream_cut_before_finish_is_incomplete() -> None:
    translator = StreamTranslator(request_id="req", model="m")
    translator.feed(STREAM_EVENTS[0])
    assert not translator.complete
    assert not StreamTranslator(request_id="req", model="m").complete


def test_stream_of_a_blocked_prompt() -> None:
    translator = StreamTranslator(request_id="req", model="m")
    chunks = translator.feed({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}})
    assert translator.complete
    assert chunks[0]["choices"][0]["delta"]["content"] == ""
    assert "PROHIBITED_CONTENT" in chunks[0]["choices"][0]["delta"]["refusal"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"

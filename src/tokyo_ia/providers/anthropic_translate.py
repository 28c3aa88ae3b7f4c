"""Translation between OpenAI chat completions and Anthropic's Messages API.

Pure functions and one small state machine, no I/O, so every mapping can be tested on the
example payloads of both API references. :mod:`tokyo_ia.providers.anthropic` does the calls.

Request (OpenAI → Anthropic):

- ``system``/``developer`` messages, wherever they appear, become the top-level ``system``
  (Anthropic has no system turns); the other turns keep their order, and consecutive turns
  of the same role are merged into one, since Anthropic wants user and assistant to alternate.
- ``tool`` messages become ``tool_result`` blocks in a user turn; assistant ``tool_calls``
  become ``tool_use`` blocks whose ``input`` is the parsed ``arguments`` string.
- ``image_url`` parts become ``image`` blocks (``data:`` URLs as base64 sources, http(s) URLs
  as url sources); ``file`` parts with ``file_data`` become ``document`` blocks. A
  ``cache_control`` marker on a content part is kept, so prompt caching can be asked for.
- ``max_completion_tokens``/``max_tokens`` → ``max_tokens`` (required by Anthropic; the
  provider's ``default_max_tokens`` when absent); ``stop`` → ``stop_sequences``;
  ``temperature``, ``top_p`` passed as they are (Anthropic accepts temperature 0–1 only and
  says so in its 400); ``user`` → ``metadata.user_id``; ``tools``/``tool_choice``/
  ``parallel_tool_calls`` → ``tools``/``tool_choice``/``disable_parallel_tool_use``;
  ``response_format`` of type ``json_schema`` → ``output_config.format``.
- Anthropic-only fields a caller may send through the OpenAI API are passed on: ``top_k``,
  ``thinking``.
- Dropped, having no Anthropic equivalent: ``frequency_penalty``, ``presence_penalty``,
  ``logit_bias``, ``logprobs``, ``top_logprobs``, ``seed``, ``service_tier``, ``store``,
  ``metadata`` (OpenAI's stored-completion tags), ``modalities``, ``audio``, ``prediction``,
  ``reasoning_effort``, ``verbosity``, ``web_search_options``, ``stream_options``,
  ``response_format`` of type ``text``/``json_object``, and every unknown field (Anthropic
  rejects unknown fields, so forwarding them would fail the call). ``n`` > 1 is refused.

Response (Anthropic → OpenAI): text blocks are joined into ``message.content``; ``tool_use``
blocks become ``tool_calls``; thinking and server-tool blocks are left out. Usage counts
cache reads and writes as prompt tokens (Anthropic's ``input_tokens`` excludes them) and
keeps the raw cache numbers for cost accounting.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from ..errors import InvalidRequestError, UnsupportedError, UpstreamError
from ..schema.content import parse_data_url
from .base import JSON
from .http import error_for_status

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic error ``type`` → the HTTP status it comes with (for errors inside a stream).
ERROR_STATUSES = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

_PASSTHROUGH = ("temperature", "top_p", "top_k", "thinking")


# -- request ---------------------------------------------------------------------------


def to_messages_request(body: Mapping[str, Any], model: str, *, default_max_tokens: int) -> JSON:
    """The Anthropic Messages request for a canonical chat request (``stream`` not set)."""
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        raise UnsupportedError(
            "Anthropic models return one choice per request; send n=1 (or omit n)", param="n"
        )
    system, messages = convert_messages(body.get("messages") or [])
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    payload: JSON = {"model": model, "max_tokens": max_tokens, "messages": messages}
    if system:
        payload["system"] = system
    for key in _PASSTHROUGH:
        if body.get(key) is not None:
            payload[key] = body[key]
    stop = body.get("stop")
    if stop:
        payload["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("user"):
        payload["metadata"] = {"user_id": str(body["user"])}
    payload.update(convert_tools(body))
    output_format = _output_format(body.get("response_format"))
    if output_format is not None:
        payload["output_config"] = {"format": output_format}
    return payload


def _output_format(response_format: Any) -> JSON | None:
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise InvalidRequestError(
            "response_format.json_schema.schema must be a JSON schema object",
            param="response_format.json_schema.schema",
        )
    return {"type": "json_schema", "schema": schema}


def convert_messages(messages: list[Any]) -> tuple[str | list[JSON], list[JSON]]:
    """(system, turns): system prompts hoisted, turns merged so that roles alternate."""
    system: list[JSON] = []
    turns: list[tuple[str, list[JSON]]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_content_blocks(message.get("content"), where, allow_media=False))
            continue
        if role == "user":
            blocks = _content_blocks(message.get("content"), where, allow_media=True)
        elif role == "assistant":
            blocks = _assistant_blocks(message, where)
        elif role == "tool":
            blocks = [_tool_result(message, where)]
            role = "user"
        else:
            raise UnsupportedError(
                f"{where}.role '{role}' cannot be sent to Anthropic; use system, developer, "
                "user, assistant or tool",
                param=f"{where}.role",
            )
        if not blocks:
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))
    return _system_value(system), [{"role": role, "content": _compact(blocks)} for role, blocks in turns]


def _system_value(blocks: list[JSON]) -> str | list[JSON]:
    """A plain string unless a block carries ``cache_control`` (which needs block form)."""
    if any("cache_control" in b for b in blocks):
        return blocks
    return "\n\n".join(b["text"] for b in blocks)


def _compact(blocks: list[JSON]) -> str | list[JSON]:
    if len(blocks) == 1 and blocks[0].keys() == {"type", "text"}:
        return str(blocks[0]["text"])
    return blocks


def _content_blocks(content: Any, where: str, *, allow_media: bool) -> list[JSON]:
    """OpenAI message content (string or parts) as Anthropic content blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where}.content must be a string or a list of parts", param=where)
    blocks: list[JSON] = []
    for j, part in enumerate(content):
        block = _part_block(part, f"{where}.content[{j}]", allow_media)
        if block is not None:
            if isinstance(part, dict) and part.get("cache_control"):
                block["cache_control"] = part["cache_control"]
            blocks.append(block)
    return blocks


def _part_block(part: Any, where: str, allow_media: bool) -> JSON | None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("text", "refusal"):
        text = part.get(kind) or ""
        return {"type": "text", "text": str(text)} if text else None
    if allow_media and kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        return {"type": "image", "source": _source(str(url or ""), f"{where}.image_url.url")}
    if allow_media and kind == "file":
        data = (part.get("file") or {}).get("file_data")
        if not isinstance(data, str) or not data.startswith("data:"):
            raise UnsupportedError(
                f"{where}: Anthropic needs the file inline; send file.file_data as a data: URL "
                "(file_id references are not supported)",
                param=where,
            )
        return {"type": "document", "source": _source(data, f"{where}.file.file_data")}
    raise UnsupportedError(
        f"{where}: content part type '{kind}' is not supported by Anthropic models here", param=where
    )


def _source(url: str, where: str) -> JSON:
    """A base64 source from a ``data:`` URL, or a url source from an http(s) URL."""
    if url.startswith(("http://", "https://")):
        return {"type": "url", "url": url}
    data = parse_data_url(url)
    if data is not None and "," in url and data.base64 and data.media_type:
        return {"type": "base64", "media_type": data.media_type, "data": data.payload}
    raise InvalidRequestError(
        f"{where} must be an http(s) URL or a base64 data URL (data:image/png;base64,...)", param=where
    )


def _assistant_blocks(message: JSON, where: str) -> list[JSON]:
    blocks = _content_blocks(message.get("content"), where, allow_media=False)
    for k, call in enumerate(message.get("tool_calls") or []):
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise InvalidRequestError(
                f"{where}.tool_calls[{k}] must be an object with a function", param=f"{where}.tool_calls"
            )
        fn = call["function"]
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id", ""),
                "name": fn.get("name", ""),
                "input": _arguments(fn.get("arguments"), f"{where}.tool_calls[{k}].function.arguments"),
            }
        )
    return blocks


def _arguments(arguments: Any, where: str) -> Any:
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise InvalidRequestError(f"{where} is not valid JSON", param=where) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{where} must encode a JSON object", param=where)
    return value


def _tool_result(message: JSON, where: str) -> JSON:
    tool_call_id = message.get("tool_call_id")
    if not tool_call_id:
        raise InvalidRequestError(f"{where}.tool_call_id is required", param=f"{where}.tool_call_id")
    content = message.get("content")
    result: JSON = {"type": "tool_result", "tool_use_id": tool_call_id}
    if isinstance(content, str):
        result["content"] = content
    elif content:
        result["content"] = _content_blocks(content, where, allow_media=True)
    return result


def convert_tools(body: Mapping[str, Any]) -> JSON:
    """``tools`` and ``tool_choice`` fields of the Anthropic request (empty without tools)."""
    tools = body.get("tools") or []
    if not tools:
        return {}
    converted = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise UnsupportedError(
                f"tools[{i}]: only function tools can be sent to Anthropic", param=f"tools[{i}]"
            )
        fn = tool.get("function") or {}
        spec: JSON = {
            "name": fn.get("name", ""),
            "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
        }
        if fn.get("description"):
            spec["description"] = fn["description"]
        if fn.get("strict") is not None:
            spec["strict"] = bool(fn["strict"])
        converted.append(spec)
    out: JSON = {"tools": converted}
    choice = _tool_choice(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False and (choice or {}).get("type") != "none":
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None:
        out["tool_choice"] = choice
    return out


def _tool_choice(choice: Any) -> JSON | None:
    if choice is None:
        return None
    if choice in ("auto", "none"):
        return {"type": choice}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name:
            return {"type": "tool", "name": name}
    raise InvalidRequestError(
        "tool_choice must be 'auto', 'none', 'required' or "
        '{"type": "function", "function": {"name": ...}}',
        param="tool_choice",
    )


# -- response --------------------------------------------------------------------------


def finish_reason(stop_reason: Any) -> str | None:
    if stop_reason is None:
        return None
    return FINISH_REASONS.get(str(stop_reason), "stop")


def convert_usage(usage: Mapping[str, Any]) -> JSON:
    """OpenAI usage from Anthropic's, whose ``input_tokens`` leaves out cached tokens."""
    cache_read = int(usage.get("cache_read_input_tokens") or 0)
    cache_write = int(usage.get("cache_creation_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + cache_read + cache_write
    completion = int(usage.get("output_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_read},
        "cache_read_input_tokens": cache_read,
        "cache_creation_input_tokens": cache_write,
    }


def tool_call(block: Mapping[str, Any]) -> JSON:
    return {
        "id": block.get("id", ""),
        "type": "function",
        "function": {
            "name": block.get("name", ""),
            "arguments": orjson.dumps(block.get("input") or {}).decode(),
        },
    }


def from_messages_response(message: Mapping[str, Any], *, created: int | None = None) -> JSON:
    """The ``chat.completion`` for an Anthropic Message object."""
    blocks = message.get("content") or []
    texts = [str(b.get("text", "")) for b in blocks if b.get("type") == "text"]
    calls = [tool_call(b) for b in blocks if b.get("type") == "tool_use"]
    result: JSON = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if calls:
        result["tool_calls"] = calls
    return {
        "id": message.get("id", ""),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": message.get("model", ""),
        "choices": [
            {
                "index": 0,
                "message": result,
                "logprobs": None,
                "finish_reason": finish_reason(message.get("stop_reason")) or "stop",
            }
        ],
        "usage": convert_usage(message.get("usage") or {}),
    }


def stream_error(provider: str, error: Any) -> UpstreamError:
    """The gateway error for an ``error`` event inside a stream (e.g. overloaded_error)."""
    err = error if isinstance(error, dict) else {}
    kind = str(err.get("type") or "api_error")
    message = f"{kind}: {err.get('message') or 'error event in the stream'} (mid-stream)"
    status = ERROR_STATUSES.get(kind, 500)
    return error_for_status(provider, status, message, code="upstream_overloaded" if status == 529 else None)


class StreamTranslator:
    """Turns Anthropic stream events into ``chat.completion.chunk`` objects, one event at a time.

    Content blocks are numbered across text and tool use; OpenAI numbers tool calls on their
    own, so the block index of each ``tool_use`` is mapped to its tool-call index.
    ``done`` turns true at ``message_stop``; a stream that ends before is truncated.
    """

    def __init__(self, provider: str, model: str, *, created: int | None = None) -> None:
        self.provider = provider
        self.id = ""
        self.model = model
        self.created = int(time.time()) if created is None else created
        self.usage: JSON = {}
        self.done = False
        self._tools: dict[int, int] = {}

    def _chunk(self, delta: JSON, finish: str | None = None) -> JSON:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def feed(self, event: Mapping[str, Any]) -> list[JSON]:
        """The chunks for one decoded event (often none). Raises UpstreamError on ``error``."""
        kind = event.get("type")
        if kind == "message_start":
            return self._message_start(event.get("message") or {})
        if kind == "content_block_start":
            return self._block_start(int(event.get("index", 0)), event.get("content_block") or {})
        if kind == "content_block_delta":
            return self._block_delta(int(event.get("index", 0)), event.get("delta") or {})
        if kind == "message_delta":
            self._add_usage(event.get("usage"))
            reason = finish_reason((event.get("delta") or {}).get("stop_reason"))
            return [self._chunk({}, reason)] if reason else []
        if kind == "message_stop":
            self.done = True
            usage = convert_usage(self.usage)
            base = self._chunk({})
            return [{**base, "choices": [], "usage": usage}]
        if kind == "error":
            raise stream_error(self.provider, event.get("error"))
        return []  # ping, content_block_stop, and event types added after this was written

    def _add_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.usage.update({k: v for k, v in usage.items() if v is not None})

    def _message_start(self, message: Mapping[str, Any]) -> list[JSON]:
        self.id = str(message.get("id") or self.id)
        self.model = str(message.get("model") or self.model)
        self._add_usage(message.get("usage"))
        return [self._chunk({"role": "assistant", "content": ""})]

    def _block_start(self, index: int, block: Mapping[str, Any]) -> list[JSON]:
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if block.get("type") != "tool_use":
            return []
        position = len(self._tools)
        self._tools[index] = position
        call = tool_call(block)
        if not block.get("input"):
            call["function"]["arguments"] = ""
        return [self._chunk({"tool_calls": [{"index": position, **call}]})]

    def _block_delta(self, index: int, delta: Mapping[str, Any]) -> list[JSON]:
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        if kind == "input_json_delta" and delta.get("partial_json") and index in self._tools:
            fragment = {"index": self._tools[index], "function": {"arguments": delta["partial_json"]}}
            return [self._chunk({"tool_calls": [fragment]})]
        return []  # thinking_delta, signature_delta, citations_delta


def error_message(body: bytes) -> str:
    """``type: message`` of an Anthropic error body, or the raw text of another body."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:500].decode("utf-8", "replace") or "(empty body)"
    err = value.get("error") if isinstance(value, dict) else None
    if isinstance(err, dict):
        kind = err.get("type")
        message = str(err.get("message") or err)
        return f"{kind}: {message}" if kind else message
    return str(value)[:500]

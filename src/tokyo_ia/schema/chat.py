"""Checks of the request fields the gateway itself reads.

The body stays a plain dict: fields the gateway does not know are neither checked nor
dropped, so OpenAI-compatible upstreams receive them untouched. Every rejection names the
field (as ``param``) and says what to send instead.
"""

from __future__ import annotations

from typing import Any, cast

from ..errors import InvalidRequestError

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

# field -> (allowed python types, minimum, maximum); None means unbounded.
_NUMBERS: dict[str, tuple[tuple[type, ...], float | None, float | None]] = {
    "temperature": ((int, float), 0, 2),
    "top_p": ((int, float), 0, 1),
    "presence_penalty": ((int, float), -2, 2),
    "frequency_penalty": ((int, float), -2, 2),
    "n": ((int,), 1, 128),
    "max_tokens": ((int,), 1, None),
    "max_completion_tokens": ((int,), 1, None),
    "top_logprobs": ((int,), 0, 20),
}


def _fail(message: str, param: str, code: str = "invalid_value") -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code=code)


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _fail(
            f"the request body must be a JSON object, got {type(body).__name__}; "
            'send {"model": ..., "messages": [...]}',
            param="body",
            code="invalid_body",
        )
    return body


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _fail(
            "'model' is required and must be a non-empty string; list the models with GET /v1/models",
            param="model",
            code="missing_model" if model is None else "invalid_model",
        )
    return model


def _check_message(i: int, message: Any) -> None:
    if not isinstance(message, dict):
        raise _fail(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]")
    role = message.get("role")
    content = message.get("content")
    if role in ROLES and type(content) is str and role != "tool":
        return  # the common case, checked without building any message
    where = f"messages[{i}]"
    if role not in ROLES:
        raise _fail(
            f"{where}.role must be one of {', '.join(sorted(ROLES))}; got {role!r}",
            param=f"{where}.role",
        )
    if content is None:
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            return
        raise _fail(
            f"{where}.content is required for role '{role}' (a string or a list of content parts)",
            param=f"{where}.content",
        )
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _fail(
                    f"{where}.content[{j}] must be an object with a 'type' "
                    '(for example {"type": "text", "text": "..."})',
                    param=f"{where}.content[{j}]",
                )
    elif not isinstance(content, str):
        raise _fail(
            f"{where}.content must be a string or a list of content parts, got {type(content).__name__}",
            param=f"{where}.content",
        )
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise _fail(
            f"{where}.tool_call_id is required for role 'tool'; copy the id of the tool call it answers",
            param=f"{where}.tool_call_id",
        )


def validate_chat(raw: Any) -> dict[str, Any]:
    """Validate a chat-completions request; return it unchanged."""
    body = require_object(raw)
    require_model(body)
    messages = body.get("messages")
    if messages is None:
        raise _fail(
            '\'messages\' is required: a non-empty list such as [{"role": "user", "content": "Hello"}]',
            param="messages",
            code="missing_messages",
        )
    if not isinstance(messages, list) or not messages:
        raise _fail(
            "'messages' must be a non-empty list of message objects",
            param="messages",
        )
    for i, message in enumerate(messages):
        _check_message(i, message)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _fail("'stream' must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _fail(
            "'stream_options' must be an object like {\"include_usage\": true}", param="stream_options"
        )
    for name, value in body.items():  # a body has a few fields; _NUMBERS knows more
        spec = _NUMBERS.get(name)
        if spec is None or value is None:
            continue
        types, low, high = spec
        if isinstance(value, bool) or not isinstance(value, types):
            kind = "an integer" if types == (int,) else "a number"
            raise _fail(f"'{name}' must be {kind}, got {value!r}", param=name)
        number = float(cast(float, value))
        if (low is not None and number < low) or (high is not None and number > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise _fail(f"'{name}' must be {bounds}, got {value}", param=name)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _fail("'tools' must be a list of tool definitions", param="tools")
    return body


def validate_embeddings(raw: Any) -> dict[str, Any]:
    body = require_object(raw)
    require_model(body)
    value = body.get("input")
    if isinstance(value, str) and value:
        return body
    if isinstance(value, list) and value:
        return body
    raise _fail(
        "'input' is required: a non-empty string or a non-empty list of strings (or token arrays)",
        param="input",
        code="missing_input" if value is None else "invalid_value",
    )


def wants_usage(body: dict[str, Any]) -> bool:
    """Whether a streaming caller asked for the final usage chunk."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True

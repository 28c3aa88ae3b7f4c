"""Translation between the canonical (OpenAI chat) format and Google's Gemini API (v1beta).

Pure functions plus one small stateful class for streams, no I/O, so every mapping can be
tested against the example payloads of Google's API reference (``GenerateContentRequest``,
``GenerateContentResponse``, ``FunctionDeclaration``, ``ToolConfig``, ``UsageMetadata``).

What a caller should know about the mapping:

- system and developer messages become one ``systemInstruction``; consecutive turns of the
  same role are merged, because Gemini wants alternating ``user``/``model`` turns and all the
  function responses answering one model turn inside a single user turn.
- tool parameter schemas and ``json_schema`` response formats are sent as plain JSON Schema
  (``parametersJsonSchema``, ``responseJsonSchema``), which Gemini accepts as written; the
  older ``parameters``/``responseSchema`` fields take an OpenAPI subset that rejects common
  JSON Schema keys such as ``additionalProperties``.
- Gemini function calls usually carry no id. Ids are derived from the response id, the
  candidate, the call's position, its name and arguments, so one response always yields the
  same ids whether it was streamed or not. A ``tool`` message finds its function name again
  through the ``tool_call_id`` of the earlier assistant tool call.
- thinking models attach a ``thoughtSignature`` to function calls and reject a follow-up turn
  that omits it. It rides on the tool call as ``extra_content.google.thought_signature`` (where
  Google's own OpenAI-compatible endpoint puts it) and is restored on the way back.
- OpenAI fields Gemini has no equivalent for (``logprobs``, ``user``, ``metadata``,
  ``parallel_tool_calls``, ``reasoning_effort``...) are dropped: unlike an OpenAI-compatible
  upstream, Gemini rejects unknown fields, so they cannot be forwarded.
- a prompt blocked by Gemini's safety filters (``promptFeedback.blockReason`` and no
  candidates) is not an error: it becomes a completion with empty content and
  ``finish_reason: "content_filter"``, the way OpenAI reports its own filtering, with the
  reason in ``message.refusal``.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import time
import urllib.parse
from typing import Any

import orjson

from ..errors import InvalidRequestError, UnsupportedError
from ..schema.content import parse_data_url
from .base import JSON

FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}

_SAMPLING = {
    "temperature": "temperature",
    "top_p": "topP",
    "top_k": "topK",
    "n": "candidateCount",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
    "seed": "seed",
}

_TOOL_CHOICE_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}


# ---------------------------------------------------------------------------------------
# Request: OpenAI chat body -> GenerateContentRequest


def to_gemini_request(body: JSON, safety_settings: list[JSON] | None = None) -> JSON:
    """Build the ``generateContent`` body for a canonical chat request (never mutates it)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty list", param="messages")
    system, contents = _contents(messages)
    if not contents:
        raise InvalidRequestError(
            "Gemini needs at least one user or assistant message besides the system prompt",
            param="messages",
        )
    request: JSON = {"contents": contents}
    if system:
        request["systemInstruction"] = {"parts": system}
    config = generation_config(body)
    if config:
        request["generationConfig"] = config
    tools = _tools(body.get("tools"))
    if tools:
        request["tools"] = tools
        choice = body.get("tool_choice")
        if choice is not None:
            request["toolConfig"] = {"functionCallingConfig": _tool_choice(choice)}
    if safety_settings:
        request["safetySettings"] = list(safety_settings)
    return request


def _contents(messages: list[Any]) -> tuple[list[JSON], list[JSON]]:
    """(systemInstruction parts, contents) for a message list, merging same-role turns."""
    system: list[JSON] = []
    contents: list[JSON] = []
    tool_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend({"text": t} for t in _texts(message.get("content"), i) if t)
            continue
        if role == "user":
            gemini_role, parts = "user", _user_parts(message.get("content"), i)
        elif role == "assistant":
            gemini_role, parts = "model", _assistant_parts(message, i, tool_names)
        elif role in ("tool", "function"):
            gemini_role, parts = "user", [_function_response(message, i, tool_names)]
        else:
            raise InvalidRequestError(
                f"messages[{i}].role '{role}' is not one of system, developer, user, assistant, tool",
                param=f"messages[{i}].role",
            )
        if not parts:
            continue  # Gemini rejects empty turns; an empty assistant message adds nothing.
        if contents and contents[-1]["role"] == gemini_role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": gemini_role, "parts": parts})
    return system, contents


def _texts(content: Any, i: int) -> list[str]:
    """The text pieces of a content field that may only hold text (system, assistant)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "refusal"):
                out.append(str(part.get("text") or part.get("refusal") or ""))
            else:
                raise UnsupportedError(
                    f"messages[{i}].content: only text parts are allowed in this message",
                    param=f"messages[{i}].content",
                )
        return out
    raise InvalidRequestError(
        f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}].content"
    )


def _user_parts(content: Any, i: int) -> list[JSON]:
    if content is None or isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}].content"
        )
    return [_user_part(part, i) for part in content]


def _user_part(part: Any, i: int) -> JSON:
    kind = part.get("type") if isinstance(part, dict) else None
    where = f"messages[{i}].content"
    if kind == "text":
        return {"text": str(part.get("text", ""))}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise InvalidRequestError(f"{where}: image_url.url is missing", param=where)
        return media_part(url, default_mime="image/jpeg")
    if kind == "input_audio":
        audio = part.get("input_audio") or {}
        fmt = str(audio.get("format") or "wav")
        return {"inlineData": {"mimeType": f"audio/{fmt}", "data": str(audio.get("data", ""))}}
    if kind == "file":
        data = (part.get("file") or {}).get("file_data")
        if isinstance(data, str) and data.startswith("data:"):
            return media_part(data, default_mime="application/octet-stream")
        raise UnsupportedError(
            f"{where}: Gemini takes files inline only; send file.file_data as a data: URL", param=where
        )
    raise UnsupportedError(f"{where}: content part type '{kind}' is not supported by Gemini", param=where)


def media_part(url: str, *, default_mime: str) -> JSON:
    """``inlineData`` for a ``data:`` URL, ``fileData`` (with a guessed MIME type) otherwise."""
    inline = parse_data_url(url)
    if inline is not None:
        data = inline.payload
        if not inline.base64:
            data = base64.b64encode(urllib.parse.unquote_to_bytes(data)).decode()
        return {"inlineData": {"mimeType": inline.media_type or "text/plain", "data": data}}
    guessed = mimetypes.guess_type(urllib.parse.urlsplit(url).path)[0]
    return {"fileData": {"mimeType": guessed or default_mime, "fileUri": url}}


def _assistant_parts(message: JSON, i: int, tool_names: dict[str, str]) -> list[JSON]:
    parts: list[JSON] = [{"text": t} for t in _texts(message.get("content"), i) if t]
    for j, call in enumerate(message.get("tool_calls") or []):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not fn.get("name"):
            raise InvalidRequestError(
                f"messages[{i}].tool_calls[{j}].function.name is missing",
                param=f"messages[{i}].tool_calls[{j}]",
            )
        name = str(fn["name"])
        if call.get("id"):
            tool_names[str(call["id"])] = name
        part: JSON = {"functionCall": {"name": name, "args": _arguments(fn.get("arguments"))}}
        signature = ((call.get("extra_content") or {}).get("google") or {}).get("thought_signature")
        if signature:
            part["thoughtSignature"] = signature
        parts.append(part)
    return parts


def _arguments(raw: Any) -> JSON:
    """Function-call args must be a JSON object; anything else is kept under ``arguments``."""
    if isinstance(raw, dict):
        return raw
    if not raw:
        return {}
    try:
        value = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        return {"arguments": raw}
    return value if isinstance(value, dict) else {"arguments": value}


def _function_response(message: JSON, i: int, tool_names: dict[str, str]) -> JSON:
    call_id = message.get("tool_call_id")
    name = tool_names.get(str(call_id)) if call_id is not None else None
    name = name or message.get("name")
    if not name:
        raise InvalidRequestError(
            f"messages[{i}]: tool_call_id '{call_id}' matches no tool call of an earlier assistant "
            "message; Gemini needs the function's name to pair a result with its call",
            param=f"messages[{i}].tool_call_id",
        )
    content = message.get("content")
    text = content if isinstance(content, str) else "".join(_texts(content, i))
    try:
        value: Any = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = text
    response = value if isinstance(value, dict) else {"content": value}
    return {"functionResponse": {"name": str(name), "response": response}}


def generation_config(body: JSON) -> JSON:
    """``generationConfig`` from the OpenAI sampling fields that Gemini has an equivalent for."""
    config: JSON = {out: body[key] for key, out in _SAMPLING.items() if body.get(key) is not None}
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if limit is not None:
        config["maxOutputTokens"] = limit
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt, dict) else None
        if schema:
            config["responseJsonSchema"] = schema
    return config


def _tools(tools: Any) -> list[JSON]:
    if not tools:
        return []
    declarations = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise UnsupportedError(
                f"tools[{i}]: tool type '{kind}' is not supported by Gemini; use function tools",
                param=f"tools[{i}]",
            )
        fn = tool.get("function") or {}
        if not fn.get("name"):
            raise InvalidRequestError(f"tools[{i}].function.name is missing", param=f"tools[{i}]")
        declaration: JSON = {"name": fn["name"]}
        if fn.get("description"):
            declaration["description"] = fn["description"]
        if fn.get("parameters"):
            declaration["parametersJsonSchema"] = fn["parameters"]
        declarations.append(declaration)
    return [{"functionDeclarations": declarations}]


def _tool_choice(choice: Any) -> JSON:
    if isinstance(choice, str) and choice in _TOOL_CHOICE_MODES:
        return {"mode": _TOOL_CHOICE_MODES[choice]}
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name:
            return {"mode": "ANY", "allowedFunctionNames": [name]}
    raise UnsupportedError(
        f"tool_choice {orjson.dumps(choice).decode()} is not supported by Gemini; use auto, none, "
        'required or {"type": "function", "function": {"name": ...}}',
        param="tool_choice",
    )


# ---------------------------------------------------------------------------------------
# Response: GenerateContentResponse -> chat.completion


def from_gemini_response(data: JSON, *, request_id: str, model: str) -> JSON:
    """A ``chat.completion`` for a whole ``generateContent`` answer."""
    response_id = str(data.get("responseId") or request_id)
    candidates = sorted(data.get("candidates") or [], key=lambda c: int(c.get("index", 0)))
    if candidates:
        choices = [_choice(c, response_id) for c in candidates]
    else:
        choices = [_blocked_choice(data.get("promptFeedback") or {})]
    return {
        "id": f"chatcmpl-{response_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(data.get("modelVersion") or model),
        "choices": choices,
        "usage": usage_from(data.get("usageMetadata")),
    }


def _choice(candidate: JSON, response_id: str) -> JSON:
    index = int(candidate.get("index", 0))
    text, calls = parts_to_message(candidate, response_id, start=0)
    message: JSON = {"role": "assistant", "content": text if text or not calls else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {
        "index": index,
        "message": message,
        "logprobs": None,
        "finish_reason": finish_reason(candidate.get("finishReason"), bool(calls)) or "stop",
    }


def _blocked_choice(feedback: JSON) -> JSON:
    return {
        "index": 0,
        "message": {"role": "assistant", "content": "", "refusal": block_message(feedback)},
        "logprobs": None,
        "finish_reason": "content_filter",
    }


def block_message(feedback: JSON) -> str:
    reason = feedback.get("blockReason") or "BLOCK_REASON_UNSPECIFIED"
    detail = feedback.get("blockReasonMessage")
    return f"the prompt was blocked by Gemini ({reason})" + (f": {detail}" if detail else "")


def parts_to_message(candidate: JSON, response_id: str, *, start: int) -> tuple[str, list[JSON]]:
    """(text, tool_calls) of one candidate's parts; thought parts are left out.

    ``start`` is the number of calls this candidate already made (earlier stream events), so
    positions, and hence ids, match what a non-streamed answer would give.
    """
    index = int(candidate.get("index", 0))
    texts: list[str] = []
    calls: list[JSON] = []
    for part in (candidate.get("content") or {}).get("parts") or []:
        if part.get("thought"):
            continue
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part.get("functionCall"), dict):
            position = start + len(calls)
            calls.append(_tool_call(part, response_id, index, position))
    return "".join(texts), calls


def _tool_call(part: JSON, response_id: str, candidate: int, position: int) -> JSON:
    fn = part["functionCall"]
    name = str(fn.get("name", ""))
    arguments = orjson.dumps(fn.get("args") or {}, option=orjson.OPT_SORT_KEYS).decode()
    call_id = fn.get("id") or tool_call_id(response_id, candidate, position, name, arguments)
    call: JSON = {"id": str(call_id), "type": "function", "function": {"name": name, "arguments": arguments}}
    if part.get("thoughtSignature"):
        call["extra_content"] = {"google": {"thought_signature": part["thoughtSignature"]}}
    return call


def tool_call_id(response_id: str, candidate: int, position: int, name: str, arguments: str) -> str:
    digest = hashlib.sha256(f"{response_id}\0{candidate}\0{position}\0{name}\0{arguments}".encode())
    return f"call_{digest.hexdigest()[:24]}"


def finish_reason(reason: Any, has_calls: bool) -> str | None:
    """The OpenAI finish reason for a Gemini one (None while the candidate is unfinished)."""
    if not reason or reason == "FINISH_REASON_UNSPECIFIED":
        return None
    mapped = FINISH_REASONS.get(str(reason), "stop")
    return "tool_calls" if mapped == "stop" and has_calls else mapped


def usage_from(metadata: Any) -> JSON:
    """OpenAI ``usage`` from ``usageMetadata``; thinking tokens count as completion tokens."""
    meta = metadata if isinstance(metadata, dict) else {}
    prompt = int(meta.get("promptTokenCount") or 0) + int(meta.get("toolUsePromptTokenCount") or 0)
    thoughts = int(meta.get("thoughtsTokenCount") or 0)
    completion = int(meta.get("candidatesTokenCount") or 0) + thoughts
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": int(meta.get("totalTokenCount") or prompt + completion),
        "prompt_tokens_details": {"cached_tokens": int(meta.get("cachedContentTokenCount") or 0)},
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    }


# ---------------------------------------------------------------------------------------
# Streams: each SSE event is a GenerateContentResponse


class StreamTranslator:
    """Turns the events of ``streamGenerateContent?alt=sse`` into ``chat.completion.chunk`` dicts.

    Feed every decoded event to :meth:`feed`; when the upstream stream ends, check
    :attr:`complete` (False means the stream was cut before every candidate finished) and send
    :meth:`usage_chunk` last.
    """

    def __init__(self, *, request_id: str, model: str) -> None:
        self.id = f"chatcmpl-{request_id}"
        self.response_id = request_id
        self.model = model
        self.created = int(time.time())
        self._seen_event = False
        self._started: set[int] = set()
        self._finished: set[int] = set()
        self._calls: dict[int, int] = {}
        self._usage: Any = None

    @property
    def complete(self) -> bool:
        return bool(self._finished) and self._started <= self._finished

    def _chunk(self, index: int, delta: JSON, finish: str | None = None) -> JSON:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def _first_event(self, data: JSON) -> None:
        self._seen_event = True
        if data.get("responseId"):
            self.response_id = str(data["responseId"])
            self.id = f"chatcmpl-{self.response_id}"
        if data.get("modelVersion"):
            self.model = str(data["modelVersion"])

    def feed(self, data: JSON) -> list[JSON]:
        if not self._seen_event:
            self._first_event(data)
        if data.get("usageMetadata"):
            self._usage = data["usageMetadata"]
        candidates = data.get("candidates") or []
        feedback = data.get("promptFeedback") or {}
        if not candidates and feedback.get("blockReason"):
            self._started.add(0)
            self._finished.add(0)
            role = {"role": "assistant", "content": "", "refusal": block_message(feedback)}
            return [self._chunk(0, role), self._chunk(0, {}, "content_filter")]
        chunks: list[JSON] = []
        for candidate in candidates:
            chunks.extend(self._candidate(candidate))
        return chunks

    def _candidate(self, candidate: JSON) -> list[JSON]:
        index = int(candidate.get("index", 0))
        chunks: list[JSON] = []
        if index not in self._started:
            self._started.add(index)
            chunks.append(self._chunk(index, {"role": "assistant", "content": ""}))
        made = self._calls.get(index, 0)
        text, calls = parts_to_message(candidate, self.response_id, start=made)
        if text:
            chunks.append(self._chunk(index, {"content": text}))
        for offset, call in enumerate(calls):
            chunks.append(self._chunk(index, {"tool_calls": [{"index": made + offset, **call}]}))
        self._calls[index] = made + len(calls)
        finish = finish_reason(candidate.get("finishReason"), self._calls[index] > 0)
        if finish is not None:
            self._finished.add(index)
            chunks.append(self._chunk(index, {}, finish))
        return chunks

    def usage_chunk(self) -> JSON:
        return {**self._chunk(0, {}), "choices": [], "usage": usage_from(self._usage)}

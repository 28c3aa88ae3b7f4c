"""An emulator of Anthropic's Messages API.

Written from Anthropic's API reference: ``POST /v1/messages`` (JSON, and SSE whose events are
named ``message_start``, ``content_block_start``, ``ping``, ``content_block_delta``
(``text_delta``, ``input_json_delta``), ``content_block_stop``, ``message_delta``,
``message_stop``, and ``error``), ``GET /v1/models``; auth by ``x-api-key`` (or
``authorization: Bearer``, which the official SDKs 2.x send) and a required
``anthropic-version`` header; error bodies ``{"type": "error", "error": {"type", "message"},
"request_id"}``; ``request-id`` and ``anthropic-ratelimit-*`` headers on every response,
``retry-after`` on 429 and 529. Like the real API it rejects unknown top-level fields, system
turns inside ``messages``, a missing ``max_tokens``, temperatures over 1, and ``tool_result``
blocks that answer no ``tool_use`` of the previous assistant turn, so translation mistakes
show up as the 400 they would cause.

The upstream model name picks the behaviour (the conventions of tests/cases.py):

- ``error-<status>``  that status with Anthropic's error body (429 and 529 add retry-after)
- ``flaky-<n>``       fail with 529 overloaded_error the first n times (per model), then answer
- ``slow-<ms>``       wait before answering (or before the first event)
- ``drop``            stream a few events, then cut the connection
- ``trickle``         stream a text delta every 50 ms for a minute (to test cancellation)
- ``stream-error``    stream, then send an ``error`` event (overloaded_error)
- ``cache``           report prompt-cache reads and writes in usage
- ``tools``           say a sentence, then call the first offered tool (tool_choice auto)
- tools offered with tool_choice ``any``/``tool`` → a call of the first/named tool
- anything else       echo the last user message ("echo: <text>")

Tool calls always have input ``{"location": "Paris"}``. ``stop_sequences`` and ``max_tokens``
cut the echo as the real API would (``stop_reason`` ``stop_sequence`` / ``max_tokens``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from .base import Emulator

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

KNOWN_FIELDS = {
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
    "temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "service_tier",
    "container", "mcp_servers", "output_config", "context_management", "inference_geo", "speed",
}  # fmt: skip

TOOL_INPUT = {"location": "Paris"}


class BadRequest(Exception):
    """A request the real API would answer with 400 invalid_request_error."""


def error_body(status: int, message: str, request_id: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}


def tokens(value: Any) -> int:
    return len(json.dumps(value)) // 4 + 1


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if block.get("type") == "text":
            parts.append(block["text"])
        elif block.get("type") == "tool_result":
            parts.append(_text_of(block.get("content")))
    return " ".join(parts)


def validate(body: Any) -> None:
    """The checks of the real API that a translation mistake would trip."""
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object")
    for key in body:
        if key not in KNOWN_FIELDS:
            raise BadRequest(f"{key}: Extra inputs are not permitted")
    for key in ("model", "max_tokens", "messages"):
        if key not in body:
            raise BadRequest(f"{key}: Field required")
    temperature = body.get("temperature")
    if temperature is not None and not 0 <= temperature <= 1:
        raise BadRequest("temperature: Input should be less than or equal to 1")
    messages = body["messages"]
    if not messages:
        raise BadRequest("messages: at least one message is required")
    for i, message in enumerate(messages):
        if message.get("role") not in ("user", "assistant"):
            raise BadRequest(
                f"messages.{i}.role: Input should be 'user' or 'assistant'; "
                'use the top-level "system" parameter for system prompts'
            )
        _check_tool_results(messages, i)


def _check_tool_results(messages: list[dict[str, Any]], i: int) -> None:
    content: Any = messages[i].get("content") or []
    if isinstance(content, str):
        return
    results = [b["tool_use_id"] for b in content if b.get("type") == "tool_result"]
    if not results:
        return
    previous: Any = (messages[i - 1].get("content") if i > 0 else None) or []
    uses = {b["id"] for b in previous if isinstance(b, dict) and b.get("type") == "tool_use"}
    for tool_use_id in results:
        if tool_use_id not in uses:
            raise BadRequest(
                f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: "
                f"{tool_use_id}. Each `tool_result` block must have a corresponding `tool_use` "
                "block in the previous message."
            )


class AnthropicEmulator(Emulator):
    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_get("/v1/models", self.models)
        app.on_response_prepare.append(self._add_headers)
        return app

    def _request_id(self) -> str:
        return f"req_emu{len(self.requests):06d}"

    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """Headers the real API puts on every response, SSE included."""
        response.headers.setdefault("request-id", self._request_id())
        response.headers.setdefault("anthropic-organization-id", "emu-org")
        for kind, limit in (("requests", "4000"), ("input-tokens", "400000"), ("output-tokens", "80000")):
            response.headers.setdefault(f"anthropic-ratelimit-{kind}-limit", limit)
            response.headers.setdefault(f"anthropic-ratelimit-{kind}-remaining", str(int(limit) - 1))
            response.headers.setdefault(f"anthropic-ratelimit-{kind}-reset", "2025-01-01T00:00:01Z")

    def _error(self, status: int, message: str) -> web.Response:
        headers = {"x-should-retry": "true" if status in (429, 500, 529) else "false"}
        if status in (429, 529):
            headers["retry-after"] = "1"
        body = error_body(status, message, self._request_id())
        return web.json_response(body, status=status, headers=headers)

    def _auth(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("x-api-key")
        bearer = request.headers.get("authorization", "")
        if key is None and bearer.startswith("Bearer "):
            key = bearer.removeprefix("Bearer ")  # what the official SDKs (2.x) send
        if key is None:
            return self._error(401, "x-api-key header is required")
        if key != self.api_key:
            return self._error(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return self._error(400, "anthropic-version: header is required")
        return None

    async def models(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied is not None:
            return denied
        data = [
            {
                "type": "model",
                "id": "claude-sonnet-4-5-20250929",
                "display_name": "Claude Sonnet 4.5",
                "created_at": "2025-09-29T00:00:00Z",
            }
        ]
        return web.json_response(
            {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[0]["id"]}
        )

    async def messages(self, request: web.Request) -> web.StreamResponse:
        denied = self._auth(request)
        if denied is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "There was an issue with the format of your request: invalid JSON")
        try:
            validate(body)
        except BadRequest as exc:
            return self._error(400, str(exc))
        model = str(body["model"])
        if model.startswith("error-"):
            status = int(model.split("-", 1)[1])
            return self._error(status, f"emulated error {status} for model {model}")
        if model.startswith("flaky-") and self.state.bump(model) <= int(model.split("-", 1)[1]):
            return self._error(529, "Overloaded")
        if model.startswith("slow-"):
            await asyncio.sleep(int(model.split("-", 1)[1]) / 1000)
        message = self.answer(body, model)
        if body.get("stream"):
            return await self.sse(request, self._events(request, message, model))
        return web.json_response(message)

    # -- answers ---------------------------------------------------------------------------

    def _forced_tool(self, body: dict[str, Any], model: str) -> str | None:
        tools = body.get("tools") or []
        choice = body.get("tool_choice") or {"type": "auto"}
        if not tools or choice["type"] == "none":
            return None
        if choice["type"] == "tool":
            return str(choice["name"])
        if choice["type"] == "any" or model == "tools":
            return str(tools[0]["name"])
        return None

    def answer(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        """The complete Message object for a request."""
        content: list[dict[str, Any]] = []
        stop_reason, stop_sequence = "end_turn", None
        tool = self._forced_tool(body, model)
        if model == "tools" and tool:
            content.append({"type": "text", "text": "I'll check the weather for you."})
        if tool:
            content.append({"type": "tool_use", "id": "toolu_emu01", "name": tool, "input": TOOL_INPUT})
            stop_reason = "tool_use"
        else:
            last_user = next(m for m in reversed(body["messages"]) if m["role"] == "user")
            text = f"echo: {_text_of(last_user['content'])}"
            for seq in body.get("stop_sequences") or []:
                if seq in text:
                    text, stop_reason, stop_sequence = text[: text.index(seq)], "stop_sequence", seq
            if len(text) // 4 + 1 > body["max_tokens"]:
                text, stop_reason = text[: body["max_tokens"] * 4], "max_tokens"
            content.append({"type": "text", "text": text})
        return {
            "id": f"msg_emu{len(self.requests):06d}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": self._usage(body, content, model),
        }

    @staticmethod
    def _usage(body: dict[str, Any], content: Any, model: str) -> dict[str, Any]:
        cached = model == "cache"
        return {
            "input_tokens": tokens([body.get("system"), body["messages"], body.get("tools")]),
            "cache_creation_input_tokens": 20 if cached else 0,
            "cache_read_input_tokens": 100 if cached else 0,
            "output_tokens": tokens(content),
            "service_tier": "standard",
        }

    # -- streams ---------------------------------------------------------------------------

    async def _events(
        self, request: web.Request, message: dict[str, Any], model: str
    ) -> AsyncIterator[tuple[str, str]]:
        usage = message["usage"]
        start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
        start["usage"] = {**usage, "output_tokens": 1}
        yield sse_event("message_start", message=start)
        yield sse_event("ping")
        for index, block in enumerate(message["content"]):
            async for item in self._block_events(request, index, block, model):
                yield item
        if model == "stream-error":
            yield sse_event("error", error={"type": "overloaded_error", "message": "Overloaded"})
            return
        delta = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
        yield sse_event("message_delta", delta=delta, usage={"output_tokens": usage["output_tokens"]})
        yield sse_event("message_stop")

    async def _block_events(
        self, request: web.Request, index: int, block: dict[str, Any], model: str
    ) -> AsyncIterator[tuple[str, str]]:
        if block["type"] == "tool_use":
            yield sse_event("content_block_start", index=index, content_block={**block, "input": {}})
            args = json.dumps(block["input"])
            yield delta_event(index, "input_json_delta", partial_json="")
            for i in range(0, len(args), 6):
                yield delta_event(index, "input_json_delta", partial_json=args[i : i + 6])
        else:
            yield sse_event("content_block_start", index=index, content_block={"type": "text", "text": ""})
            if model == "drop":
                yield delta_event(index, "text_delta", text="partial ")
                assert request.transport is not None
                request.transport.close()
                raise ConnectionResetError("emulated drop")
            if model == "trickle":
                for i in range(1200):
                    await asyncio.sleep(0.05)
                    yield delta_event(index, "text_delta", text=f"{i} ")
            words = block["text"].split(" ")
            for k, word in enumerate(words):
                yield delta_event(index, "text_delta", text=word if k == len(words) - 1 else word + " ")
        yield sse_event("content_block_stop", index=index)


def sse_event(name: str, **data: Any) -> tuple[str, str]:
    """An (event name, data) pair; the data repeats the name in ``type``, as Anthropic's does."""
    return name, json.dumps({"type": name, **data})


def delta_event(index: int, kind: str, **delta: Any) -> tuple[str, str]:
    return sse_event("content_block_delta", index=index, delta={"type": kind, **delta})

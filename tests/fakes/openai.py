"""An emulator of OpenAI's chat-completions API (and OpenAI-compatible servers).

Written from OpenAI's API reference: ``POST /v1/chat/completions`` (JSON, and SSE with
``data: {chunk}`` events ending in ``data: [DONE]``; usage in a last chunk with empty
``choices`` when ``stream_options.include_usage``), ``POST /v1/embeddings``, ``GET /v1/models``,
error bodies ``{"error": {"message", "type", "param", "code"}}``, ``x-request-id`` and
``x-ratelimit-*`` headers, ``retry-after`` on 429.

The upstream model name picks the behaviour, so gateway subprocesses can drive it too:

- ``error-<status>``      answer that status with an OpenAI error body (429 adds retry-after)
- ``flaky-<n>``           fail with 500 the first n times (per model), then answer
- ``slow-<ms>``           wait before answering (or before the first chunk)
- ``drop``                stream two chunks, then cut the connection
- ``trickle``             stream a chunk every 50 ms for a minute (to test cancellation)
- ``tools``               answer with a tool call for the first offered tool
- tools offered and a forcing tool_choice → a tool call too
- anything else           echo the last user message
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from .base import Emulator

ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("insufficient_quota", None),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", None),
    503: ("server_error", None),
}


def error_body(status: int, message: str) -> dict[str, Any]:
    kind, code = ERROR_TYPES.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class OpenAIEmulator(Emulator):
    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        return app

    def _headers(self) -> dict[str, str]:
        return {
            "x-request-id": f"req_{len(self.requests)}",
            "openai-processing-ms": "1",
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": "9999",
            "x-ratelimit-reset-requests": "6ms",
        }

    def _error(self, status: int, message: str) -> web.Response:
        headers = self._headers()
        if status == 429:
            headers["retry-after"] = "1"
            headers["retry-after-ms"] = "1000"
        return web.json_response(error_body(status, message), status=status, headers=headers)

    def _auth(self, request: web.Request) -> web.Response | None:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return self._error(
                401,
                "Incorrect API key provided: sk-***. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
            )
        return None

    async def models(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied is not None:
            return denied
        data = [{"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"}]
        return web.json_response({"object": "list", "data": data}, headers=self._headers())

    async def chat(self, request: web.Request) -> web.StreamResponse:
        denied = self._auth(request)
        if denied is not None:
            return denied
        body = await request.json()
        model = str(body.get("model", ""))
        if self.state.fault is not None:
            return self._error(self.state.fault, f"emulated outage ({self.state.fault})")
        if model.startswith("error-"):
            status = int(model.split("-", 1)[1])
            return self._error(status, f"emulated error {status} for model {model}")
        if model.startswith("flaky-") and self.state.bump(model) <= int(model.split("-", 1)[1]):
            return self._error(500, "The server had an error while processing your request.")
        if model.startswith("slow-"):
            await asyncio.sleep(int(model.split("-", 1)[1]) / 1000)
        if body.get("stream"):
            return await self._stream(request, body, model)
        message = self._message(body, model)
        prompt, completion = self._usage(body, message)
        return web.json_response(
            {
                "id": "chatcmpl-emu123",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": 0},
                },
                "service_tier": "default",
                "system_fingerprint": "fp_emu",
                "x_emulator_extra": {"kept": True},
            },
            headers=self._headers(),
        )

    def _message(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        tools = body.get("tools") or []
        choice = body.get("tool_choice")
        forced = choice == "required" or isinstance(choice, dict)
        if tools and (model == "tools" or forced):
            name = tools[0]["function"]["name"]
            if isinstance(choice, dict):
                name = choice["function"]["name"]
            return {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_emu1",
                        "type": "function",
                        "function": {"name": name, "arguments": json.dumps({"location": "Paris"})},
                    }
                ],
            }
        last = body["messages"][-1].get("content")
        text = last if isinstance(last, str) else json.dumps(last)
        return {"role": "assistant", "content": f"echo: {text}", "refusal": None}

    @staticmethod
    def _usage(body: dict[str, Any], message: dict[str, Any]) -> tuple[int, int]:
        prompt = sum(len(json.dumps(m)) // 4 for m in body["messages"])
        return prompt, len(json.dumps(message)) // 4

    async def _stream(self, request: web.Request, body: dict[str, Any], model: str) -> web.StreamResponse:
        message = self._message(body, model)
        base = {
            "id": "chatcmpl-emu123",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_emu",
        }
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            data = {
                **base,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                data["usage"] = None
            return json.dumps(data)

        async def events() -> Any:
            yield chunk({"role": "assistant", "content": "", "refusal": None})
            if model == "trickle":
                for i in range(1200):
                    await asyncio.sleep(0.05)
                    yield chunk({"content": f"{i} "})
            if model == "drop":
                yield chunk({"content": "partial "})
                assert request.transport is not None
                request.transport.close()
                raise ConnectionResetError("emulated drop")
            if message.get("tool_calls"):
                call = message["tool_calls"][0]
                yield chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": call["function"]["name"], "arguments": ""},
                            }
                        ]
                    }
                )
                args = call["function"]["arguments"]
                for i in range(0, len(args), 5):
                    yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[i : i + 5]}}]})
                yield chunk({}, "tool_calls")
            else:
                for word in message["content"].split(" "):
                    yield chunk({"content": word + " "})
                yield chunk({}, "stop")
            if include_usage:
                prompt, completion = self._usage(body, message)
                usage = {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                }
                yield json.dumps({**base, "choices": [], "usage": usage})
            yield "[DONE]"

        return await self.sse(request, events())

    async def embeddings(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied is not None:
            return denied
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [0.1 * (i + 1), 0.2, 0.3]}
            for i in range(len(inputs))
        ]
        tokens = sum(len(str(x)) // 4 + 1 for x in inputs)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            headers=self._headers(),
        )

"""OpenAI, and every server that speaks its chat-completions API (vLLM, Ollama, llama.cpp...).

The request is forwarded as the caller sent it, unknown fields included, with only ``model``
replaced by the deployment's upstream name; the response keeps every field the upstream sent.
For streams the gateway always asks for usage (``stream_options.include_usage``) so it can
meter tokens; the pipeline removes that chunk again if the caller did not ask for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from ..config import ProviderConfig
from ..errors import UpstreamError
from .base import JSON, ChatCall, EmbedCall
from .http import HTTPProvider, error_for_status, parse_retry_after


class OpenAIConfig(ProviderConfig):
    stream_usage: bool = True
    """Send ``stream_options.include_usage``; turn off for servers that reject it."""
    organization: str | None = None


class OpenAIProvider(HTTPProvider):
    kind = "openai"
    settings_model = OpenAIConfig
    default_base_url = "https://api.openai.com/v1"

    def __init__(self, name: str, config: ProviderConfig) -> None:
        assert isinstance(config, OpenAIConfig)
        self.cfg = config
        super().__init__(name, config)

    def _auth_headers(self, config: ProviderConfig) -> dict[str, str]:
        headers = {}
        if config.api_key is not None:
            headers["authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        if self.cfg.organization:
            headers["openai-organization"] = self.cfg.organization
        return headers

    def _error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
        message, code = _error_message(body)
        return error_for_status(self.name, status, message, code=code, retry_after=parse_retry_after(headers))

    async def chat(self, call: ChatCall) -> JSON:
        payload = {**call.body, "model": call.model}
        payload.pop("stream", None)
        payload.pop("stream_options", None)
        return await self._post("/chat/completions", payload, call)

    async def stream(self, call: ChatCall) -> AsyncIterator[JSON]:
        payload: dict[str, Any] = {**call.body, "model": call.model, "stream": True}
        if self.cfg.stream_usage:
            payload["stream_options"] = {**(call.body.get("stream_options") or {}), "include_usage": True}
        async with self._sse("/chat/completions", payload, call) as events:
            async for event in events:
                if event.data == "[DONE]":
                    return
                chunk = self._decode(event.data.encode())
                if "error" in chunk and "choices" not in chunk:
                    message, code = _error_message(event.data.encode())
                    raise UpstreamError(
                        f"provider '{self.name}' failed mid-stream: {message}",
                        provider=self.name,
                        code=code or "upstream_stream_error",
                    )
                yield chunk
        raise UpstreamError(
            f"provider '{self.name}' ended the stream before [DONE]; the answer is incomplete",
            provider=self.name,
            code="upstream_stream_truncated",
        )

    async def embed(self, call: EmbedCall) -> JSON:
        return await self._post("/embeddings", {**call.body, "model": call.model}, call)

    @classmethod
    def embedded_default(cls, env: Mapping[str, str]) -> tuple[JSON, dict[str, str]] | None:
        if not env.get("OPENAI_API_KEY"):
            return None
        models = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "text-embedding-3-small")
        return {"api_key": "${env:OPENAI_API_KEY}"}, {m: m for m in models}


def _error_message(body: bytes) -> tuple[str, str | None]:
    """The message and code of an OpenAI-style error body, or the raw text."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:500].decode("utf-8", "replace") or "(empty body)", None
    err = value.get("error") if isinstance(value, dict) else None
    if isinstance(err, dict):
        code = err.get("code")
        return str(err.get("message") or err), str(code) if code is not None else None
    if isinstance(err, str):
        return err, None
    return str(value)[:500], None

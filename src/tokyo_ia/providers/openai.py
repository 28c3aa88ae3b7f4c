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
from .base import JSON, ChatCall, CheckResult, EmbedCall, Provider
from .http import HTTPTransport, error_for_status, parse_retry_after


class OpenAIConfig(ProviderConfig):
    stream_usage: bool = True
    """Send ``stream_options.include_usage``; turn off for servers that reject it."""
    organization: str | None = None


class OpenAIProvider(Provider):
    kind = "openai"
    settings_model = OpenAIConfig
    default_base_url = "https://api.openai.com/v1"

    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        assert isinstance(config, OpenAIConfig)
        self.cfg = config
        self.http = HTTPTransport(name, config, config.base_url or self.default_base_url)
        headers = {"content-type": "application/json", "accept": "application/json"}
        if config.api_key is not None:
            headers["authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        if config.organization:
            headers["openai-organization"] = config.organization
        headers.update({k.lower(): v for k, v in config.headers.items()})
        self._headers = headers

    async def start(self) -> None:
        await self.http.start()

    async def close(self) -> None:
        await self.http.close()

    def _headers_for(self, extra: Mapping[str, str]) -> dict[str, str]:
        return {**self._headers, **extra} if extra else self._headers

    def _error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
        message, code = _error_message(body)
        return error_for_status(self.name, status, message, code=code, retry_after=parse_retry_after(headers))

    async def chat(self, call: ChatCall) -> JSON:
        payload = {**call.body, "model": call.model}
        payload.pop("stream", None)
        payload.pop("stream_options", None)
        status, headers, body = await self.http.request_json(
            "POST",
            "/chat/completions",
            payload=payload,
            headers=self._headers_for(call.headers),
            remaining=call.remaining(),
        )
        if status >= 400:
            raise self._error(status, headers, body)
        return _decode(self.name, body)

    async def stream(self, call: ChatCall) -> AsyncIterator[JSON]:
        payload: dict[str, Any] = {**call.body, "model": call.model, "stream": True}
        if self.cfg.stream_usage:
            payload["stream_options"] = {**(call.body.get("stream_options") or {}), "include_usage": True}
        headers = self._headers_for(call.headers)
        headers = {**headers, "accept": "text/event-stream"}
        async with self.http.open_stream(
            "/chat/completions", payload=payload, headers=headers, remaining=call.remaining()
        ) as resp:
            if resp.status >= 400:
                raise self._error(resp.status, resp.headers, await resp.read())
            async for event in self.http.sse_events(resp):
                if event.data == "[DONE]":
                    return
                chunk = _decode(self.name, event.data.encode())
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
        payload = {**call.body, "model": call.model}
        status, headers, body = await self.http.request_json(
            "POST",
            "/embeddings",
            payload=payload,
            headers=self._headers_for(call.headers),
            remaining=call.remaining(),
        )
        if status >= 400:
            raise self._error(status, headers, body)
        return _decode(self.name, body)

    async def check(self) -> CheckResult:
        """List models: authenticates and spends no tokens."""
        return await self.http.check("/models", self._headers, self._error)

    @classmethod
    def embedded_default(cls, env: Mapping[str, str]) -> tuple[JSON, dict[str, str]] | None:
        if not env.get("OPENAI_API_KEY"):
            return None
        models = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "text-embedding-3-small")
        return {"api_key": "${env:OPENAI_API_KEY}"}, {m: m for m in models}


def _decode(provider: str, body: bytes) -> JSON:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamError(
            f"provider '{provider}' sent a body that is not JSON: {body[:200]!r}",
            provider=provider,
            code="upstream_bad_response",
        ) from None
    if not isinstance(value, dict):
        raise UpstreamError(
            f"provider '{provider}' sent JSON that is not an object",
            provider=provider,
            code="upstream_bad_response",
        )
    return value


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

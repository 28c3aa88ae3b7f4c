"""Anthropic's Messages API (``POST {base_url}/v1/messages``), spoken without the SDK.

The wire format is translated to and from the canonical OpenAI format in
:mod:`~tokyo_ia.providers.anthropic_translate` (which also lists the request fields that have
no Anthropic equivalent and are dropped); this module holds the endpoint, the auth headers
(``x-api-key``, ``anthropic-version``), error mapping and the streaming loop.

``base_url`` is the API root without ``/v1`` (as in Anthropic's SDKs, e.g.
``https://api.anthropic.com``); a trailing ``/v1`` is tolerated and removed. Extra headers
such as ``anthropic-beta`` go in the provider's ``headers`` setting.

Errors: Anthropic's body ``{"type": "error", "error": {"type", "message"}}`` is mapped by
status like every provider (:func:`~tokyo_ia.providers.http.error_for_status`); 529
``overloaded_error`` is retryable, ``retry-after`` is honoured, and the upstream
``request-id`` is quoted so an operator can hand it to Anthropic's support. An ``error``
event inside a stream, or a stream that ends without ``message_stop``, raises too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from pydantic import Field

from ..config import ProviderConfig
from ..errors import UpstreamError
from .anthropic_translate import StreamTranslator, error_message, from_messages_response, to_messages_request
from .base import JSON, ChatCall, CheckResult, Provider
from .http import HTTPTransport, error_for_status, parse_retry_after

MESSAGES_PATH = "/v1/messages"
MODELS_PATH = "/v1/models"

# Current models in the Messages API reference (SDK 2.12.0); claude-3-5-haiku-latest is retired.
EMBEDDED_MODELS = ("claude-sonnet-4-6", "claude-opus-4-7", "claude-haiku-4-5")


class AnthropicConfig(ProviderConfig):
    default_max_tokens: int = Field(4096, ge=1)
    """``max_tokens`` sent when the caller gives none: Anthropic requires one, OpenAI does not."""
    anthropic_version: str = "2023-06-01"
    """The ``anthropic-version`` header: the wire format this module was written against."""


class AnthropicProvider(Provider):
    kind = "anthropic"
    settings_model = AnthropicConfig
    default_base_url = "https://api.anthropic.com"

    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        assert isinstance(config, AnthropicConfig)
        self.cfg = config
        base_url = (config.base_url or self.default_base_url).rstrip("/")
        base_url = base_url.removesuffix("/v1")
        self.http = HTTPTransport(name, config, base_url)
        headers = {
            "content-type": "application/json",
            "accept": "application/json",
            "anthropic-version": config.anthropic_version,
        }
        if config.api_key is not None:
            headers["x-api-key"] = config.api_key.get_secret_value()
        headers.update({k.lower(): v for k, v in config.headers.items()})
        self._headers = headers

    async def start(self) -> None:
        await self.http.start()

    async def close(self) -> None:
        await self.http.close()

    def _headers_for(self, extra: Mapping[str, str]) -> dict[str, str]:
        return {**self._headers, **extra} if extra else self._headers

    def _payload(self, call: ChatCall) -> JSON:
        return to_messages_request(call.body, call.model, default_max_tokens=self.cfg.default_max_tokens)

    def _error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
        message = error_message(body)
        request_id = headers.get("request-id")
        if request_id:
            message = f"{message} (request-id {request_id})"
        return error_for_status(
            self.name,
            status,
            message,
            code="upstream_overloaded" if status == 529 else None,
            retry_after=parse_retry_after(headers),
        )

    async def chat(self, call: ChatCall) -> JSON:
        status, headers, body = await self.http.request_json(
            "POST",
            MESSAGES_PATH,
            payload=self._payload(call),
            headers=self._headers_for(call.headers),
            remaining=call.remaining(),
        )
        if status >= 400:
            raise self._error(status, headers, body)
        return from_messages_response(self._decode(body))

    async def stream(self, call: ChatCall) -> AsyncIterator[JSON]:
        payload = {**self._payload(call), "stream": True}
        headers = {**self._headers_for(call.headers), "accept": "text/event-stream"}
        translator = StreamTranslator(self.name, call.model)
        async with self.http.open_stream(
            MESSAGES_PATH, payload=payload, headers=headers, remaining=call.remaining()
        ) as resp:
            if resp.status >= 400:
                raise self._error(resp.status, resp.headers, await resp.read())
            async for event in self.http.sse_events(resp):
                for chunk in translator.feed(self._decode(event.data.encode())):
                    yield chunk
                if translator.done:
                    return
        raise UpstreamError(
            f"provider '{self.name}' ended the stream before message_stop; the answer is incomplete",
            provider=self.name,
            retryable=True,
            code="upstream_stream_truncated",
        )

    def _decode(self, body: bytes) -> JSON:
        try:
            value: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise UpstreamError(
                f"provider '{self.name}' sent a body that is not a JSON object: {body[:200]!r}",
                provider=self.name,
                code="upstream_bad_response",
            )
        return value

    async def check(self) -> CheckResult:
        """List one model: authenticates and spends no tokens."""
        return await self.http.check(MODELS_PATH + "?limit=1", self._headers, self._error)

    @classmethod
    def embedded_default(cls, env: Mapping[str, str]) -> tuple[JSON, dict[str, str]] | None:
        if not env.get("ANTHROPIC_API_KEY"):
            return None
        return {"api_key": "${env:ANTHROPIC_API_KEY}"}, {m: m for m in EMBEDDED_MODELS}

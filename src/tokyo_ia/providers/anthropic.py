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

from pydantic import Field

from ..config import ProviderConfig
from ..errors import UpstreamError
from .anthropic_translate import StreamTranslator, error_message, from_messages_response, to_messages_request
from .base import JSON, ChatCall
from .http import HTTPProvider, error_for_status, parse_retry_after

MESSAGES_PATH = "/v1/messages"
MODELS_PATH = "/v1/models"

# Current models in the Messages API reference (SDK 2.12.0); claude-3-5-haiku-latest is retired.
EMBEDDED_MODELS = ("claude-sonnet-4-6", "claude-opus-4-7", "claude-haiku-4-5")


class AnthropicConfig(ProviderConfig):
    default_max_tokens: int = Field(4096, ge=1)
    """``max_tokens`` sent when the caller gives none: Anthropic requires one, OpenAI does not."""
    anthropic_version: str = "2023-06-01"
    """The ``anthropic-version`` header: the wire format this module was written against."""


class AnthropicProvider(HTTPProvider):
    kind = "anthropic"
    settings_model = AnthropicConfig
    default_base_url = "https://api.anthropic.com"
    check_path = MODELS_PATH + "?limit=1"

    def __init__(self, name: str, config: ProviderConfig) -> None:
        assert isinstance(config, AnthropicConfig)
        self.cfg = config
        super().__init__(name, config)

    def _base_url(self, config: ProviderConfig) -> str:
        return super()._base_url(config).rstrip("/").removesuffix("/v1")

    def _auth_headers(self, config: ProviderConfig) -> dict[str, str]:
        headers = {"anthropic-version": self.cfg.anthropic_version}
        if config.api_key is not None:
            headers["x-api-key"] = config.api_key.get_secret_value()
        return headers

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
        return from_messages_response(await self._post(MESSAGES_PATH, self._payload(call), call))

    async def stream(self, call: ChatCall) -> AsyncIterator[JSON]:
        translator = StreamTranslator(self.name, call.model)
        async with self._sse(MESSAGES_PATH, {**self._payload(call), "stream": True}, call) as events:
            async for event in events:
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

    @classmethod
    def embedded_default(cls, env: Mapping[str, str]) -> tuple[JSON, dict[str, str]] | None:
        if not env.get("ANTHROPIC_API_KEY"):
            return None
        return {"api_key": "${env:ANTHROPIC_API_KEY}"}, {m: m for m in EMBEDDED_MODELS}

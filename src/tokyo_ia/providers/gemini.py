"""Google's Gemini API (generativelanguage.googleapis.com), translated to and from OpenAI's format.

Endpoints, from Google's public REST reference (``v1beta`` by default, see
:attr:`GeminiConfig.api_version`):

- ``POST /{version}/models/{model}:generateContent`` and ``:streamGenerateContent?alt=sse``
  (each SSE event is a whole ``GenerateContentResponse``; the stream just ends, with no
  terminator, so a stream is complete only once every candidate sent a ``finishReason``);
- ``POST /{version}/models/{model}:embedContent`` (one input) and ``:batchEmbedContents``;
- ``GET /{version}/models`` for the doctor, which spends no tokens.

The key goes in the ``x-goog-api-key`` header. Errors come as
``{"error": {"code", "message", "status", "details"}}``; ``status`` (``INVALID_ARGUMENT``,
``RESOURCE_EXHAUSTED``...) becomes the error code, a ``google.rpc.RetryInfo`` detail the
retry delay. An invalid key is answered with 400 ``API_KEY_INVALID``, which is the
operator's problem, not the caller's, so it is reported as an authentication failure.

Request and response mapping lives in :mod:`.gemini_translate`.
"""

from __future__ import annotations

import base64
import math
import re
import struct
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from pydantic import Field

from ..config import ProviderConfig
from ..errors import InvalidRequestError, UnsupportedError, UpstreamError
from .base import JSON, ChatCall, EmbedCall
from .gemini_translate import StreamTranslator, from_gemini_response, to_gemini_request
from .http import HTTPProvider, auth_error, error_for_status, parse_retry_after

_AUTH_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED", "API_KEY_SERVICE_BLOCKED"})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


class GeminiConfig(ProviderConfig):
    api_version: str = "v1beta"
    """Path prefix of every call; ``v1`` is the stable surface, ``v1beta`` has every feature."""
    safety_settings: list[dict[str, str]] = Field(default_factory=list)
    """Sent as ``safetySettings`` with every chat request, e.g.
    ``[{category: HARM_CATEGORY_HARASSMENT, threshold: BLOCK_ONLY_HIGH}]``."""


class GeminiProvider(HTTPProvider):
    kind = "gemini"
    settings_model = GeminiConfig
    default_base_url = "https://generativelanguage.googleapis.com"

    def __init__(self, name: str, config: ProviderConfig) -> None:
        assert isinstance(config, GeminiConfig)
        self.cfg = config
        super().__init__(name, config)

    def _auth_headers(self, config: ProviderConfig) -> dict[str, str]:
        if config.api_key is None:
            return {}
        return {"x-goog-api-key": config.api_key.get_secret_value()}

    def _check_path(self) -> str:
        return f"/{self.cfg.api_version}/models?pageSize=1"

    def _path(self, model: str, method: str) -> str:
        resource = model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"
        return f"/{self.cfg.api_version}/{resource}:{method}"

    # -- chat -------------------------------------------------------------------------------

    async def chat(self, call: ChatCall) -> JSON:
        payload = to_gemini_request(call.body, self.cfg.safety_settings)
        data = await self._post(self._path(call.model, "generateContent"), payload, call)
        if not data.get("candidates") and not (data.get("promptFeedback") or {}).get("blockReason"):
            raise UpstreamError(
                f"provider '{self.name}' answered with neither candidates nor a block reason",
                provider=self.name,
                code="upstream_bad_response",
            )
        return from_gemini_response(data, request_id=call.request_id, model=call.model)

    async def stream(self, call: ChatCall) -> AsyncIterator[JSON]:
        """Yield chunks as events arrive, then one usage chunk (always; the pipeline drops it
        when the caller did not ask for usage)."""
        payload = to_gemini_request(call.body, self.cfg.safety_settings)
        path = self._path(call.model, "streamGenerateContent") + "?alt=sse"
        translator = StreamTranslator(request_id=call.request_id, model=call.model)
        async with self._sse(path, payload, call) as events:
            async for event in events:
                data = self._decode(event.data.encode())
                if "error" in data and "candidates" not in data:
                    message, code, _ = _google_error(event.data.encode())
                    raise UpstreamError(
                        f"provider '{self.name}' failed mid-stream: {message}",
                        provider=self.name,
                        code=code or "upstream_stream_error",
                    )
                for chunk in translator.feed(data):
                    yield chunk
        if not translator.complete:
            raise UpstreamError(
                f"provider '{self.name}' ended the stream before a finishReason; the answer is incomplete",
                provider=self.name,
                code="upstream_stream_truncated",
            )
        yield translator.usage_chunk()

    # -- embeddings -----------------------------------------------------------------------

    async def embed(self, call: EmbedCall) -> JSON:
        texts, single = _embed_inputs(call.body.get("input"))
        dimensions = call.body.get("dimensions")
        resource = call.model if call.model.startswith("models/") else f"models/{call.model}"

        def request(text: str) -> JSON:
            item: JSON = {"model": resource, "content": {"parts": [{"text": text}]}}
            if dimensions is not None:
                item["outputDimensionality"] = dimensions
            return item

        if single:
            data = await self._post(self._path(call.model, "embedContent"), request(texts[0]), call)
            vectors = [(data.get("embedding") or {}).get("values") or []]
        else:
            payload = {"requests": [request(t) for t in texts]}
            data = await self._post(self._path(call.model, "batchEmbedContents"), payload, call)
            vectors = [e.get("values") or [] for e in data.get("embeddings") or []]
        if len(vectors) != len(texts):
            raise UpstreamError(
                f"provider '{self.name}' returned {len(vectors)} embeddings for {len(texts)} inputs",
                provider=self.name,
                code="upstream_bad_response",
            )
        return _embedding_list(vectors, texts, call, data)

    # -- defaults -------------------------------------------------------------------------

    @classmethod
    def embedded_default(cls, env: Mapping[str, str]) -> tuple[JSON, dict[str, str]] | None:
        variable = next((v for v in ("GEMINI_API_KEY", "GOOGLE_API_KEY") if env.get(v)), None)
        if variable is None:
            return None
        models = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.5-flash-lite", "gemini-embedding-001")
        return {"api_key": f"${{env:{variable}}}"}, {m: m for m in models}

    # -- errors ---------------------------------------------------------------------------

    def _error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
        message, code, details = _google_error(body)
        if any(d.get("reason") in _AUTH_REASONS for d in details):
            return auth_error(self.name, status, message)
        retry_after = parse_retry_after(headers)
        if retry_after is None:
            retry_after = _retry_delay(details)
        return error_for_status(self.name, status, message, code=code, retry_after=retry_after)


def _google_error(body: bytes) -> tuple[str, str | None, list[JSON]]:
    """(message, status string, details) of a Google error body, or the raw text."""
    try:
        value: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:500].decode("utf-8", "replace") or "(empty body)", None, []
    if isinstance(value, list) and value:  # non-SSE stream endpoints wrap errors in an array
        value = value[0]
    err = value.get("error") if isinstance(value, dict) else None
    if not isinstance(err, dict):
        return str(value)[:500], None, []
    details = [d for d in err.get("details") or [] if isinstance(d, dict)]
    status = err.get("status")
    return str(err.get("message") or err), str(status) if status else None, details


def _retry_delay(details: list[JSON]) -> float | None:
    """Seconds from a ``google.rpc.RetryInfo`` detail (``retryDelay: "22s"``)."""
    for detail in details:
        match = _DURATION.match(str(detail.get("retryDelay", "")))
        if match:
            return float(match.group(1))
    return None


def _embed_inputs(raw: Any) -> tuple[list[str], bool]:
    """(texts, was a single string). Gemini embeds text only, not token arrays."""
    if isinstance(raw, str):
        return [raw], True
    if isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        return list(raw), False
    if isinstance(raw, list) and raw:
        raise UnsupportedError(
            "Gemini embeds text only; send 'input' as a string or a list of strings, not token ids",
            param="input",
        )
    raise InvalidRequestError("'input' must be a non-empty string or list of strings", param="input")


def _embedding_list(vectors: list[list[float]], texts: list[str], call: EmbedCall, data: JSON) -> JSON:
    """The OpenAI ``list`` of embeddings; tokens are estimated when Gemini reports none."""
    as_base64 = call.body.get("encoding_format") == "base64"
    items = []
    for i, vector in enumerate(vectors):
        value: Any = vector
        if as_base64:
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        items.append({"object": "embedding", "index": i, "embedding": value})
    reported = (data.get("usageMetadata") or {}).get("promptTokenCount")
    tokens = int(reported) if reported else sum(math.ceil(len(t) / 4) for t in texts)
    return {
        "object": "list",
        "data": items,
        "model": call.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }

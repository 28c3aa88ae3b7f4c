"""The provider interface.

A provider turns one canonical (OpenAI-format) request into a call to one upstream API and
translates the answer back. It knows its wire format, its auth and its quirks; nothing outside
``providers/`` knows which provider it talks to. Routing, retries, failover, caching and
tracing wrap this interface instead of reaching inside it.

Only :meth:`Provider.chat` is required. :meth:`Provider.stream` defaults to replaying the
full answer as chunks, :meth:`Provider.embed` to "unsupported", :meth:`Provider.check` to
"nothing to check".

Canonical shapes are plain dicts (decoded JSON): the hot path builds no model objects.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import SecretStr

from ..config import ProviderConfig
from ..errors import UnsupportedError

JSON = dict[str, Any]


@dataclass(slots=True)
class Call:
    """One call to one deployment.

    ``body`` is the caller's request exactly as received (unknown fields included); a
    provider must not mutate it, since a failed attempt is retried on the next deployment.
    ``model`` is the upstream model name of the deployment being called.
    """

    body: JSON
    model: str
    request_id: str
    deadline: float | None = None  # time.monotonic() value after which to give up
    headers: dict[str, str] = field(default_factory=dict)  # to propagate (e.g. traceparent)

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None when there is none)."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())


@dataclass(slots=True)
class ChatCall(Call):
    """A chat-completions call."""

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass(slots=True)
class EmbedCall(Call):
    """An embeddings call."""


@dataclass(frozen=True, slots=True)
class PoolStats:
    """An upstream connection pool: connections in use, kept open idle, and the pool's size."""

    active: int
    idle: int
    limit: int


@dataclass(slots=True)
class CheckResult:
    """Outcome of a connectivity check that spends no tokens."""

    ok: bool
    stage: str  # "dns", "connect", "auth", "ok", "skipped"
    detail: str = ""
    latency_s: float = 0.0


class Provider(ABC):
    """Base class of every provider kind. Subclasses register themselves in ``registry``."""

    kind: ClassVar[str]
    settings_model: ClassVar[type[ProviderConfig]] = ProviderConfig

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self.config = config

    def rotate_api_key(self, api_key: SecretStr) -> None:
        """Use ``api_key`` for every call from now on (calls in flight keep the old one)."""
        self.config = self.config.model_copy(update={"api_key": api_key})

    @property
    def endpoint(self) -> str | None:
        """The upstream base URL, for diagnostics; None for a local provider."""
        return None

    async def start(self) -> None:
        """Open connection pools. Called once per process, inside the event loop."""

    async def close(self) -> None:
        """Close connection pools. Called on shutdown."""

    def pool(self) -> PoolStats | None:
        """The upstream connection pool now, for metrics; None when there is none."""
        return None

    @abstractmethod
    async def chat(self, call: ChatCall) -> JSON:
        """Return a complete ``chat.completion`` object."""

    async def stream(self, call: ChatCall) -> AsyncIterator[JSON]:
        """Yield ``chat.completion.chunk`` objects; the last one carries ``usage``.

        The default replays :meth:`chat` as one content chunk and one finish chunk.
        """
        response = await self.chat(call)
        for chunk in completion_to_chunks(response):
            yield chunk

    async def embed(self, call: EmbedCall) -> JSON:
        raise UnsupportedError(
            f"provider '{self.name}' ({self.kind}) has no embeddings; "
            "use a model served by a provider that has them",
            param="model",
            code="embeddings_unsupported",
        )

    async def check(self) -> CheckResult:
        return CheckResult(ok=True, stage="skipped", detail="nothing to check")

    @classmethod
    def embedded_default(cls, env: Mapping[str, str]) -> tuple[JSON, dict[str, str]] | None:
        """The section and public models this kind adds to the embedded default config.

        Return ``None`` when the kind should not appear (for example, no API key set).
        """
        return None


def completion_to_chunks(response: JSON) -> list[JSON]:
    """Turn a complete chat.completion into the chunks a stream of it would have had."""
    base = {
        "id": response.get("id", ""),
        "object": "chat.completion.chunk",
        "created": response.get("created", int(time.time())),
        "model": response.get("model", ""),
    }
    chunks: list[JSON] = []
    for choice in response.get("choices", []):
        message = choice.get("message") or {}
        delta: JSON = {"role": message.get("role", "assistant")}
        if message.get("content") is not None:
            delta["content"] = message["content"]
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        idx = choice.get("index", 0)
        chunks.append({**base, "choices": [{"index": idx, "delta": delta, "finish_reason": None}]})
        chunks.append(
            {
                **base,
                "choices": [{"index": idx, "delta": {}, "finish_reason": choice.get("finish_reason")}],
            }
        )
    if response.get("usage") is not None:
        chunks.append({**base, "choices": [], "usage": response["usage"]})
    return chunks


async def aclose(iterator: AsyncIterator[Any]) -> None:
    """Close an async iterator early if it can be closed (async generators can)."""
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()

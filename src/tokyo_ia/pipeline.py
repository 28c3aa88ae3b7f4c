"""The request pipeline, readable top to bottom.

::

    authenticate → validate → authorize model → route (ordered candidates)
    → call provider (failover across deployments before the first byte) → response

Each stage is a small object owned by :class:`~tokyo_ia.gateway.Gateway`; this module only
strings them together. The HTTP layer parses bytes and writes responses; it holds no logic.
Later stages (rate limits, budgets, guardrails, cache, accounting) slot in here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import (
    GatewayError,
    NoHealthyDeploymentError,
    RateLimitError,
    UpstreamError,
)
from .providers.base import JSON, ChatCall, EmbedCall
from .routing.catalog import Catalog, Deployment
from .schema.chat import validate_chat, validate_embeddings, wants_usage
from .security.auth import Authenticator, Principal

T = TypeVar("T")


@dataclass(slots=True)
class RequestContext:
    """Per-request state shared by the stages and reported in response headers."""

    request_id: str
    api_key: str | None
    started: float = field(default_factory=time.monotonic)
    principal: Principal | None = None
    deployment: Deployment | None = None
    attempts: int = 0
    usage: JSON | None = None
    propagate: dict[str, str] = field(default_factory=dict)

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"x-request-id", self.request_id.encode())]
        if self.deployment is not None:
            headers.append((b"x-tokyo-ia-provider", self.deployment.provider.name.encode()))
            headers.append((b"x-tokyo-ia-model", self.deployment.model.encode()))
        if self.attempts:
            headers.append((b"x-tokyo-ia-attempts", str(self.attempts).encode()))
        return headers


@dataclass(slots=True)
class ChatStream:
    """A stream whose first chunk has already arrived (so failover is over)."""

    first: JSON
    rest: AsyncIterator[JSON]
    include_usage: bool
    ctx: RequestContext

    async def chunks(self) -> AsyncIterator[JSON]:
        """The chunks for the client: usage kept for accounting, shown only if asked for."""
        try:
            chunk: JSON | None = self.first
            while chunk is not None:
                if "usage" in chunk:
                    if chunk["usage"] is not None:
                        self.ctx.usage = chunk["usage"]
                    if not self.include_usage:
                        if not chunk.get("choices"):
                            chunk = await anext(self.rest, None)
                            continue
                        chunk = {k: v for k, v in chunk.items() if k != "usage"}
                yield chunk
                chunk = await anext(self.rest, None)
        finally:
            await _aclose(self.rest)


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


class Pipeline:
    def __init__(self, authenticator: Authenticator, catalog: Catalog, deadline_s: float = 600.0) -> None:
        self.auth = authenticator
        self.catalog = catalog
        self.deadline_s = deadline_s

    async def authenticate(self, ctx: RequestContext) -> Principal:
        ctx.principal = await self.auth.authenticate(ctx.api_key)
        return ctx.principal

    async def list_models(self, ctx: RequestContext) -> JSON:
        principal = await self.authenticate(ctx)
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "tokyo-ia"}
            for name in self.catalog.names()
            if principal.may_use(name)
        ]
        return {"object": "list", "data": data}

    def _route(self, ctx: RequestContext, model: str) -> list[Deployment]:
        assert ctx.principal is not None
        self.auth.authorize_model(ctx.principal, model)
        return self.catalog.candidates(model)

    async def prepare_chat(self, ctx: RequestContext, body: Any) -> JSON:
        """Authenticate and validate; the HTTP layer then picks chat or chat_stream."""
        await self.authenticate(ctx)
        return validate_chat(body)

    async def chat(self, ctx: RequestContext, body: JSON) -> JSON:
        """A complete answer for a request that went through :meth:`prepare_chat`."""
        candidates = self._route(ctx, body["model"])

        async def attempt(d: Deployment) -> JSON:
            return await d.provider.chat(self._chat_call(ctx, body, d))

        response = await self._failover(ctx, candidates, attempt)
        ctx.usage = response.get("usage")
        return response

    async def chat_stream(self, ctx: RequestContext, body: JSON) -> ChatStream:
        """Start a stream: failover is possible until the first chunk has arrived."""

        async def attempt(d: Deployment) -> tuple[JSON, AsyncIterator[JSON]]:
            stream = d.provider.stream(self._chat_call(ctx, body, d))
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                raise UpstreamError(
                    f"provider '{d.provider.name}' ended the stream without any chunk",
                    provider=d.provider.name,
                    retryable=True,
                    code="upstream_empty_stream",
                ) from None
            except BaseException:
                await _aclose(stream)
                raise
            return first, stream

        first, rest = await self._failover(ctx, self._route(ctx, body["model"]), attempt)
        return ChatStream(first, rest, wants_usage(body), ctx)

    async def embeddings(self, ctx: RequestContext, body: Any) -> JSON:
        await self.authenticate(ctx)
        body = validate_embeddings(body)

        async def attempt(d: Deployment) -> JSON:
            call = EmbedCall(body, d.model, ctx.request_id, self._deadline(ctx), ctx.propagate)
            return await d.provider.embed(call)

        response = await self._failover(ctx, self._route(ctx, body["model"]), attempt)
        ctx.usage = response.get("usage")
        return response

    def _deadline(self, ctx: RequestContext) -> float:
        return ctx.started + self.deadline_s

    def _chat_call(self, ctx: RequestContext, body: JSON, d: Deployment) -> ChatCall:
        return ChatCall(body, d.model, ctx.request_id, self._deadline(ctx), ctx.propagate)

    async def _failover(
        self,
        ctx: RequestContext,
        candidates: list[Deployment],
        attempt: Callable[[Deployment], Awaitable[T]],
    ) -> T:
        """Try deployments in order; move on only after a retryable upstream failure."""
        failures: list[tuple[Deployment, UpstreamError]] = []
        for deployment in candidates:
            ctx.deployment = deployment
            ctx.attempts += 1
            try:
                return await attempt(deployment)
            except UpstreamError as exc:
                if not exc.retryable:
                    raise
                failures.append((deployment, exc))
                if time.monotonic() >= self._deadline(ctx):
                    break
        raise _exhausted(failures)


def _exhausted(failures: list[tuple[Deployment, UpstreamError]]) -> GatewayError:
    """The error to return once every candidate failed."""
    if len(failures) == 1:
        return failures[0][1]
    tried = "; ".join(f"{d.label}: {e.message}" for d, e in failures)
    if all(e.status == 429 for _, e in failures):
        waits = [e.retry_after for _, e in failures if e.retry_after is not None]
        return RateLimitError(
            f"every deployment is rate limited; retry later. Tried: {tried}",
            retry_after=min(waits) if waits else None,
            code="upstream_rate_limited",
        )
    return NoHealthyDeploymentError(
        f"no deployment could serve the request; tried {len(failures)}: {tried}"
    )

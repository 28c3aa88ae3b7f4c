"""The request pipeline, readable top to bottom.

::

    authenticate → validate → authorize model → admit (rate limits, concurrency)
    → route (ordered candidates) → call provider (retry with backoff, then fail over to the
    next deployment, only before the first byte) → response → settle (real token usage)

Each stage is a small object owned by :class:`~tokyo_ia.gateway.Gateway`; this module only
strings them together. The HTTP layer parses bytes and writes responses; it holds no logic.
Later stages (rate limits, budgets, guardrails, cache, accounting) slot in here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .accounting.pricing import PriceTable
from .cache.keys import CacheControl, HeaderMap
from .cache.layer import ResponseCache
from .errors import (
    GatewayError,
    NoHealthyDeploymentError,
    RateLimitError,
    TokyoIAError,
    UpstreamError,
)
from .observability.logging import access_log
from .observability.metrics import Metrics
from .providers.base import JSON, ChatCall, EmbedCall
from .providers.base import aclose as _aclose
from .resilience.admission import Admission, Admitted
from .resilience.health import HealthMonitor
from .resilience.ratelimit import ProviderThrottle
from .resilience.ratelimit import headers as ratelimit_headers
from .resilience.retry import RetryPolicy
from .routing.catalog import Catalog, Deployment
from .schema.chat import validate_chat, validate_embeddings, wants_usage
from .security.audit import AuditEvent, AuditWriter
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
    admitted: Admitted | None = None
    route: str = ""
    model: str | None = None
    client_ip: str | None = None
    cost_usd: float | None = None
    cache: str | None = None
    cache_control: CacheControl | None = None
    """``hit``, ``miss`` or ``coalesced`` when the response cache was consulted, else None."""

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"x-request-id", self.request_id.encode())]
        if self.deployment is not None:
            headers.append((b"x-tokyo-ia-provider", self.deployment.provider.name.encode()))
            headers.append((b"x-tokyo-ia-model", self.deployment.model.encode()))
        if self.attempts:
            headers.append((b"x-tokyo-ia-attempts", str(self.attempts).encode()))
        if self.cost_usd is not None:
            headers.append((b"x-tokyo-ia-cost-usd", b"%.8f" % self.cost_usd))
        if self.cache is not None:
            headers.append((b"x-tokyo-ia-cache", self.cache.encode()))
        if self.admitted is not None and self.admitted.decision is not None:
            headers.extend(ratelimit_headers(self.admitted.decision))
        return headers


@dataclass(slots=True)
class ChatStream:
    """A stream whose first chunk has already arrived (so failover is over)."""

    first: JSON
    rest: AsyncIterator[JSON]
    include_usage: bool
    ctx: RequestContext
    finish: Callable[[RequestContext], Awaitable[None]]
    charge: bool = True
    """False when somebody else pays for these chunks (a cache hit, a coalesced reader)."""

    async def chunks(self) -> AsyncGenerator[JSON, None]:
        """The chunks for the client: usage kept for accounting, shown only if asked for."""
        try:
            chunk: JSON | None = self.first
            while chunk is not None:
                if "usage" in chunk:
                    if chunk["usage"] is not None and self.charge:
                        self.ctx.usage = chunk["usage"]
                    if not self.include_usage:
                        if not chunk.get("choices"):
                            chunk = await anext(self.rest, None)
                            continue
                        chunk = {k: v for k, v in chunk.items() if k != "usage"}
                yield chunk
                chunk = await anext(self.rest, None)
        finally:
            try:
                await _aclose(self.rest)
            finally:
                await self.finish(self.ctx)


class Pipeline:
    def __init__(
        self,
        authenticator: Authenticator,
        catalog: Catalog,
        admission: Admission,
        *,
        retries: dict[str, RetryPolicy] | None = None,
        throttles: dict[str, ProviderThrottle] | None = None,
        throttle_wait_s: dict[str, float] | None = None,
        health: HealthMonitor | None = None,
        audit: AuditWriter | None = None,
        prices: PriceTable | None = None,
        metrics: Metrics | None = None,
        cache: ResponseCache | None = None,
        deadline_s: float = 600.0,
    ) -> None:
        self.cache = cache
        self.prices = prices or PriceTable.load()
        self.metrics = metrics
        self.health = health
        self.audit = audit
        self.auth = authenticator
        self.catalog = catalog
        self.admission = admission
        self.retries = retries or {}
        self.throttles = throttles or {}
        self.throttle_wait_s = throttle_wait_s or {}
        self.deadline_s = deadline_s
        self._no_retry = RetryPolicy(max_retries=0)

    def _cost(self, ctx: RequestContext) -> None:
        """Price the usage of the deployment that served (0 for unknown models)."""
        if ctx.usage and ctx.deployment is not None:
            ctx.cost_usd = float(self.prices.cost(ctx.deployment.model, ctx.usage))

    def record(self, ctx: RequestContext, status: int) -> None:
        """Metrics, one access-log line and an audit record for a finished request."""
        usage = ctx.usage or {}
        principal = ctx.principal
        provider = ctx.deployment.provider.name if ctx.deployment is not None else ""
        elapsed = time.monotonic() - ctx.started
        tokens_in = int(usage.get("prompt_tokens") or 0)
        tokens_out = int(usage.get("completion_tokens") or 0)
        if self.metrics is not None:
            self.metrics.observe_request(
                ctx.route,
                ctx.model or "",
                provider,
                status,
                elapsed,
                tokens_in,
                tokens_out,
                ctx.cost_usd or 0.0,
            )
        access_log(
            request_id=ctx.request_id,
            status=status,
            latency_ms=round(elapsed * 1000, 3),
            key_id=principal.key_id if principal is not None else None,
            model=ctx.model,
            provider=provider or None,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost_usd=ctx.cost_usd or 0.0,
            attempts=ctx.attempts,
            route=ctx.route,
        )
        if self.audit is None:
            return
        detail: JSON = {
            "request_id": ctx.request_id,
            "attempts": ctx.attempts,
            "latency_ms": round((time.monotonic() - ctx.started) * 1000, 3),
        }
        if ctx.deployment is not None:
            detail["provider"] = ctx.deployment.provider.name
            detail["upstream_model"] = ctx.deployment.model
        action = "request" if ctx.route.startswith("/v1/") else f"admin {ctx.route}"
        self.audit.record(
            AuditEvent(
                action=action,
                actor_key_id=principal.key_id if principal is not None else None,
                route=ctx.route,
                model=ctx.model,
                status=status,
                tokens_in=usage.get("prompt_tokens"),
                tokens_out=usage.get("completion_tokens"),
                client_ip=ctx.client_ip,
                detail=detail,
            )
        )

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

    async def prepare_chat(self, ctx: RequestContext, body: Any, headers: HeaderMap | None = None) -> JSON:
        """Authenticate and validate; the HTTP layer then picks chat or chat_stream.

        The ``cache`` control field is read here (a bad value is a 400 before anything is
        spent) and removed: it is ours, upstreams would reject it.
        """
        await self.authenticate(ctx)
        chat = validate_chat(body)
        if self.cache is not None:
            ctx.cache_control = self.cache.control(chat, headers)
        if "cache" in chat:
            chat = {name: value for name, value in chat.items() if name != "cache"}
        return chat

    async def _admit(self, ctx: RequestContext, body: JSON) -> list[Deployment]:
        """Authorize the model, count the request against its limits, list the candidates."""
        assert ctx.principal is not None
        ctx.model = body["model"]
        self.auth.authorize_model(ctx.principal, body["model"])
        candidates = self.catalog.candidates(body["model"])
        ctx.admitted = await self.admission.admit(ctx.principal, body)
        return candidates

    async def _finish(self, ctx: RequestContext) -> None:
        """Release concurrency slots, price the usage and charge the real token count."""
        self._cost(ctx)
        admitted = ctx.admitted
        if admitted is None:
            return
        try:
            await admitted.release()
        finally:
            usage = ctx.usage
            if usage and ctx.deployment is not None:
                throttle = self.throttles.get(ctx.deployment.provider.name)
                if throttle is not None:
                    throttle.add_tokens(int(usage.get("total_tokens") or 0) - admitted.tokens)
            await self.admission.settle(admitted, usage)

    async def chat(self, ctx: RequestContext, body: JSON) -> JSON:
        """A complete answer for a request that went through :meth:`prepare_chat`."""
        return await self._answer(
            ctx, body, lambda d: d.provider.chat(self._chat_call(ctx, body, d)), cached=self.cache
        )

    async def _answer(
        self,
        ctx: RequestContext,
        body: JSON,
        attempt: Callable[[Deployment], Awaitable[JSON]],
        cached: ResponseCache | None = None,
    ) -> JSON:
        """Admit, answer (from ``cached`` or with failover), release the admission, price."""
        candidates = await self._admit(ctx, body)
        try:
            if cached is not None:
                response = await cached.complete(
                    ctx, body, candidates, lambda: self._failover(ctx, candidates, attempt)
                )
            else:
                response = await self._failover(ctx, candidates, attempt)
                ctx.usage = response.get("usage")
        finally:
            await self._finish(ctx)
        return response

    async def chat_stream(self, ctx: RequestContext, body: JSON) -> ChatStream:
        """Start a stream: retries and failover are possible until the first chunk arrived."""

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

        candidates = await self._admit(ctx, body)
        charge = True
        try:
            if self.cache is not None:
                first, rest, charge = await self.cache.stream(
                    ctx, body, candidates, lambda: self._failover(ctx, candidates, attempt)
                )
            else:
                first, rest = await self._failover(ctx, candidates, attempt)
        except BaseException:
            await self._finish(ctx)
            raise
        return ChatStream(first, rest, wants_usage(body), ctx, self._finish, charge)

    async def embeddings(self, ctx: RequestContext, raw: Any) -> JSON:
        await self.authenticate(ctx)
        body = validate_embeddings(raw)
        return await self._answer(
            ctx,
            body,
            lambda d: d.provider.embed(
                EmbedCall(body, d.model, ctx.request_id, self._deadline(ctx), ctx.propagate)
            ),
        )

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
        """Try each deployment in order, retrying retryable failures per its policy.

        A non-retryable error (the caller's mistake, bad credentials) is returned at once.
        """
        failures: list[tuple[Deployment, UpstreamError]] = []
        skipped: list[Deployment] = []
        deadline = self._deadline(ctx)
        tokens = ctx.admitted.tokens if ctx.admitted is not None else 0
        health = self.health
        for deployment in candidates:
            if health is not None and not await health.allow(deployment.label):
                skipped.append(deployment)  # circuit open: do not even try
                continue
            ctx.deployment = deployment
            name = deployment.provider.name
            policy = self.retries.get(name, self._no_retry)
            throttle = self.throttles.get(name)
            retry = 0
            while True:
                ctx.attempts += 1
                started = time.monotonic()
                try:
                    if throttle is not None:
                        wait = min(self.throttle_wait_s.get(name, 1.0), max(0.0, deadline - time.monotonic()))
                        await throttle.wait_or_fail(tokens, wait)
                    result = await attempt(deployment)
                except UpstreamError as exc:
                    if health is not None:
                        await health.record(deployment.label, exc, time.monotonic() - started)
                    if not exc.retryable:
                        raise
                    delay = policy.delay(retry, exc, deadline - time.monotonic())
                    if delay is None:
                        failures.append((deployment, exc))
                        break
                    retry += 1
                    await asyncio.sleep(delay)
                    continue
                except BaseException as exc:  # cancelled, or a bug: neutral for the breaker
                    if health is not None and not isinstance(exc, TokyoIAError):
                        await asyncio.shield(health.record(deployment.label, exc, time.monotonic() - started))
                    raise
                if health is not None:
                    await health.record(deployment.label, None, time.monotonic() - started)
                return result
            if time.monotonic() >= deadline:
                break
        if not failures and skipped:
            raise NoHealthyDeploymentError(
                "every deployment's circuit is open (recent failures): "
                f"{', '.join(d.label for d in skipped)}; retry shortly"
            )
        raise _exhausted(failures, skipped)


def _exhausted(failures: list[tuple[Deployment, UpstreamError]], skipped: list[Deployment]) -> GatewayError:
    """The error to return once every candidate failed."""
    if len(failures) == 1 and not skipped:
        return failures[0][1]
    tried = "; ".join(f"{d.label}: {e.message}" for d, e in failures)
    tried += "".join(f"; {d.label}: circuit open, skipped" for d in skipped)
    if all(e.status == 429 for _, e in failures):
        waits = [e.retry_after for _, e in failures if e.retry_after is not None]
        return RateLimitError(
            f"every deployment is rate limited; retry later. Tried: {tried}",
            retry_after=min(waits) if waits else None,
            code="upstream_rate_limited",
        )
    return NoHealthyDeploymentError(f"no deployment could serve the request; tried {len(failures)}: {tried}")

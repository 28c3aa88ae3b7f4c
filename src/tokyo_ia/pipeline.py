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

from .accounting.ledger import SpendLedger, spend_entry
from .accounting.pricing import PriceTable
from .cache.keys import CacheControl, HeaderMap, cache_control, strip_cache_field
from .cache.layer import ResponseCache
from .errors import (
    GatewayError,
    NoHealthyDeploymentError,
    RateLimitError,
    TokyoIAError,
    UpstreamError,
    UpstreamRateLimitError,
)
from .observability.logging import access_log
from .observability.metrics import Metrics
from .observability.tracing import (
    ATTR_ATTEMPT,
    ATTR_ATTEMPTS,
    ATTR_CACHE_RESULT,
    ATTR_CANDIDATES,
    ATTR_COST_USD,
    ATTR_ERROR_TYPE,
    ATTR_INPUT_TOKENS,
    ATTR_MODEL,
    ATTR_OUTPUT_TOKENS,
    ATTR_PROVIDER,
    ATTR_RESPONSE_MODEL,
    ATTR_TTFT,
    AttrValue,
    Tracer,
)
from .providers.base import JSON, ChatCall, EmbedCall
from .providers.base import aclose as _aclose
from .resilience.admission import Admission, Admitted
from .resilience.health import HealthMonitor
from .resilience.retry import RetryPolicy
from .resilience.throttle import ProviderThrottle
from .routing.catalog import Catalog, Deployment
from .schema.chat import validate_chat, validate_embeddings, wants_usage
from .security.audit import AuditEvent, AuditWriter
from .security.auth import Authenticator, Principal
from .security.payloads import DEFAULT_MAX_PAYLOAD_BYTES, payload_detail

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
    ttft_s: float | None = None
    """Streams: seconds from the request's arrival to its first chunk going out."""
    cost_usd: float | None = None
    cache: str | None = None
    """``hit``, ``miss`` or ``coalesced`` when the response cache was consulted, else None."""
    cache_control: CacheControl | None = None
    include_cost: bool = False
    """The client asked for ``usage.cost_usd`` in the answer (header ``x-tokyo-ia-include-cost``)."""
    request_body: Any = None
    """The request body, kept only for keys with ``log_payloads`` (goes to the audit trail)."""
    response_body: JSON | None = None
    """The answer, kept only for keys with ``log_payloads`` (streams: see ``Transcript``)."""

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
        if self.admitted is not None:
            headers.extend(self.admitted.headers())
        return headers

    def span_attributes(self) -> dict[str, AttrValue]:
        """What the request span reports once the response is complete (tracing on only)."""
        attrs: dict[str, AttrValue] = {ATTR_ATTEMPTS: self.attempts}
        if self.model is not None:
            attrs[ATTR_MODEL] = self.model
        if self.deployment is not None:
            attrs[ATTR_PROVIDER] = self.deployment.provider.name
            attrs[ATTR_RESPONSE_MODEL] = self.deployment.model
        if self.usage:
            attrs[ATTR_INPUT_TOKENS] = int(self.usage.get("prompt_tokens") or 0)
            attrs[ATTR_OUTPUT_TOKENS] = int(self.usage.get("completion_tokens") or 0)
        if self.cost_usd is not None:
            attrs[ATTR_COST_USD] = self.cost_usd
        if self.cache is not None:
            attrs[ATTR_CACHE_RESULT] = self.cache
        if self.ttft_s is not None:
            attrs[ATTR_TTFT] = self.ttft_s
        return attrs


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
    price: Callable[[RequestContext], None] | None = None
    """Prices ``ctx.usage`` into ``ctx.cost_usd``; for ``usage.cost_usd`` when asked for."""

    async def chunks(self) -> AsyncGenerator[JSON, None]:
        """The chunks for the client: usage kept for accounting, shown only if asked for."""
        try:
            chunk: JSON | None = self.first
            self.ctx.ttft_s = time.monotonic() - self.ctx.started
            while chunk is not None:
                if "usage" in chunk:
                    if chunk["usage"] is not None and self.charge:
                        self.ctx.usage = chunk["usage"]
                    if self.include_usage and self.ctx.include_cost and isinstance(chunk["usage"], dict):
                        chunk = {**chunk, "usage": self._priced(chunk["usage"])}
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

    def _priced(self, usage: JSON) -> JSON:
        if self.charge and self.price is not None:
            self.price(self.ctx)
        return with_cost(usage, self.ctx.cost_usd if self.charge else 0.0)


def with_cost(usage: JSON, cost_usd: float | None) -> JSON:
    """A copy of ``usage`` with the gateway's ``cost_usd`` (the answer may be shared: never edit it)."""
    return {**usage, "cost_usd": round(cost_usd or 0.0, 10)}


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
        ledger: SpendLedger | None = None,
        prices: PriceTable | None = None,
        metrics: Metrics | None = None,
        cache: ResponseCache | None = None,
        tracer: Tracer | None = None,
        deadline_s: float = 600.0,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        """``max_payload_bytes``: cut of each side of a ``log_payloads`` key's audited payload."""
        self.max_payload_bytes = max_payload_bytes
        self.cache = cache
        self.tracer = tracer or Tracer()
        self.prices = prices or PriceTable.load()
        self.metrics = metrics
        self.health = health
        self.audit = audit
        self.ledger = ledger
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
        """Metrics, one access-log line, a spend-ledger row (a model request) and an audit record.

        The ledger gets a row once the request named a model, whatever the outcome (errors
        included); requests refused before that (bad key, malformed body) only reach the
        metrics, the access log and the audit trail.
        """
        usage = ctx.usage or {}
        principal = ctx.principal
        provider = ctx.deployment.provider.name if ctx.deployment is not None else ""
        elapsed = time.monotonic() - ctx.started
        latency_ms = round(elapsed * 1000, 3)
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
                ctx.ttft_s,
            )
        access_log(
            request_id=ctx.request_id,
            status=status,
            latency_ms=latency_ms,
            key_id=principal.key_id if principal is not None else None,
            model=ctx.model,
            provider=provider or None,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost_usd=ctx.cost_usd or 0.0,
            cache=ctx.cache,
            attempts=ctx.attempts,
            route=ctx.route,
        )
        if self.ledger is not None and ctx.model is not None and ctx.route.startswith("/v1/"):
            self.ledger.record(spend_entry(ctx, status, elapsed))
        if self.audit is None:
            return
        detail: JSON = {
            "request_id": ctx.request_id,
            "attempts": ctx.attempts,
            "latency_ms": latency_ms,
        }
        if ctx.deployment is not None:
            detail["provider"] = ctx.deployment.provider.name
            detail["upstream_model"] = ctx.deployment.model
        if ctx.request_body is not None:  # set only for keys with log_payloads
            detail["payload"] = payload_detail(ctx.request_body, ctx.response_body, self.max_payload_bytes)
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
            ctx.cache_control = cache_control(chat, headers)
        return strip_cache_field(chat) if "cache" in chat else chat

    async def _admit(self, ctx: RequestContext, body: JSON) -> list[Deployment]:
        """Authorize the model, count the request against its limits, list the candidates.

        With tracing on, this is the ``route`` span.
        """
        ctx.model = body["model"]
        if self.tracer.enabled:
            with self.tracer.child("route", {ATTR_MODEL: body["model"]}) as span:
                candidates = await self._select(ctx, body)
                span.set_attribute(ATTR_CANDIDATES, ",".join(d.label for d in candidates))
                return candidates
        return await self._select(ctx, body)

    async def _select(self, ctx: RequestContext, body: JSON) -> list[Deployment]:
        assert ctx.principal is not None
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
        answer = await self._answer(
            ctx, body, lambda d: d.provider.chat(self._chat_call(ctx, body, d)), cached=self.cache
        )
        usage = answer.get("usage")
        if ctx.include_cost and isinstance(usage, dict):
            answer = {**answer, "usage": with_cost(usage, ctx.cost_usd)}
        return answer

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
        return ChatStream(first, rest, wants_usage(body), ctx, self._finish, charge, self._cost)

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

        A failure of the request itself (the upstream refused it as malformed: 400, 413, 422)
        is returned at once; any other failure moves on to the next deployment, after the
        retries its policy allows when it is retryable (a deployment's bad credentials or
        unknown model are not worth asking again, but another deployment may answer).
        Counted in metrics: each retry, and each move to a later deployment because an earlier
        one failed or had its circuit open (a failover).
        """
        failures: list[tuple[Deployment, UpstreamError]] = []
        skipped: list[Deployment] = []
        deadline = self._deadline(ctx)
        health = self.health
        metrics = self.metrics
        for deployment in candidates:
            if health is not None and not await health.allow(deployment.label):
                skipped.append(deployment)  # circuit open: do not even try
                continue
            if metrics is not None and (failures or skipped):
                metrics.observe_failover(ctx.model or "")
            ctx.deployment = deployment
            policy = self.retries.get(deployment.provider.name, self._no_retry)
            retry = 0
            while True:
                ctx.attempts += 1
                started = time.monotonic()
                try:
                    result = await self._attempt(ctx, deployment, attempt, deadline)
                except UpstreamError as exc:
                    if health is not None:
                        await health.record(deployment.label, exc, time.monotonic() - started)
                    if not exc.failover:  # the request itself was refused: no one will take it
                        raise
                    delay = policy.delay(retry, exc, deadline - time.monotonic())  # None: not retryable
                    if delay is None:
                        failures.append((deployment, exc))
                        break
                    retry += 1
                    if metrics is not None:
                        metrics.observe_retry(deployment.provider.name)
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

    async def _attempt(
        self,
        ctx: RequestContext,
        d: Deployment,
        attempt: Callable[[Deployment], Awaitable[T]],
        deadline: float,
    ) -> T:
        """One call to one deployment: the provider's own rate limit first (it may wait, or
        refuse with a retryable 429), then the call, timed until its answer or first chunk."""
        name = d.provider.name
        throttle = self.throttles.get(name)
        if throttle is not None:
            tokens = ctx.admitted.tokens if ctx.admitted is not None else 0
            wait = min(self.throttle_wait_s.get(name, 1.0), max(0.0, deadline - time.monotonic()))
            try:
                await throttle.wait_or_fail(tokens, wait)
            except UpstreamRateLimitError:
                if self.metrics is not None:
                    self.metrics.observe_rate_limited("provider")
                raise
        started = time.monotonic()
        try:
            if self.tracer.enabled:
                return await self._traced_attempt(ctx, d, attempt)
            return await attempt(d)
        finally:
            if self.metrics is not None:
                self.metrics.observe_upstream(name, d.model, time.monotonic() - started)

    async def _traced_attempt(
        self, ctx: RequestContext, d: Deployment, attempt: Callable[[Deployment], Awaitable[T]]
    ) -> T:
        """The attempt as a CLIENT span. The upstream gets a ``traceparent`` naming this span
        instead of the client's (which the request span already continues)."""
        attrs: dict[str, AttrValue] = {
            ATTR_ATTEMPT: ctx.attempts,
            ATTR_PROVIDER: d.provider.name,
            ATTR_MODEL: d.model,
        }
        with self.tracer.child(f"upstream {d.label}", attrs, client=True) as span:
            ctx.propagate = {}
            self.tracer.inject(ctx.propagate)
            try:
                return await attempt(d)
            except UpstreamError as exc:
                span.set_attribute(ATTR_ERROR_TYPE, exc.code or type(exc).__name__)
                if exc.upstream_status is not None:
                    span.set_http_status(exc.upstream_status)
                raise


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

"""The response cache as a pipeline stage: lookup, coalescing, storing, replay.

:class:`ResponseCache` sits between admission and the upstream call (see
:mod:`tokyo_ia.pipeline`). For one chat request it either

- answers from the cache (``x-tokyo-ia-cache: hit``): no upstream call, no tokens charged;
- joins an identical request already in flight (``coalesced``): one upstream call, one
  charge, every waiter gets the answer, streaming included;
- or calls upstream itself (``miss``) and stores the answer for the others.

A streamed miss is recorded as its chunks pass and stored, assembled into one completion,
only when it completed normally; a hit on a streaming request replays that completion as
chunks. Only answers that ended normally are stored (``finish_reason`` stop, length or
tool calls): a content-filtered or truncated answer is returned once, never replayed.

``cache.per_key`` in the config, or the key metadata ``cache_scope: key``, gives a key its
own cache namespace; otherwise every caller allowed to use a model shares its entries.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from ..observability.tracing import ATTR_CACHE_RESULT, Tracer
from ..providers.base import aclose as _aclose
from ..providers.base import completion_to_chunks
from .base import JSON, Cache, CachedEntry, assemble_stream
from .coalesce import Coalescer
from .keys import DEFAULT_CONTROL, CacheControl, cache_key

if TYPE_CHECKING:
    from ..accounting.pricing import PriceTable
    from ..observability.metrics import Metrics
    from ..pipeline import RequestContext
    from ..routing.catalog import Deployment
    from .redis import RedisCoalescer

_MAX_PRICED = 10_000
"""Entries whose cost :meth:`ResponseCache._saved_cost` remembers at most."""

STORABLE_FINISH = frozenset({"stop", "length", "tool_calls", "function_call"})
"""Answers are stored only when every choice ended with one of these reasons."""


def storable(response: JSON) -> bool:
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    return all(isinstance(c, dict) and c.get("finish_reason") in STORABLE_FINISH for c in choices)


class ResponseCache:
    """One per gateway process; ``backend`` may be shared by every replica (Redis)."""

    def __init__(
        self,
        backend: Cache,
        coalescer: Coalescer | RedisCoalescer | None,
        *,
        ttl_s: float,
        per_key: bool = False,
        prices: PriceTable | None = None,
        metrics: Metrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.backend = backend
        self.tracer = tracer or Tracer()
        self.coalescer = coalescer
        self.ttl_s = ttl_s
        self.per_key = per_key
        self.prices = prices
        self.metrics = metrics
        self.hits = 0
        self.misses = 0
        self.coalesced = 0
        self.usd_saved = 0.0
        self._leaders: dict[str, RequestContext] = {}
        self._costs: dict[str, tuple[float, float]] = {}  # cache key -> (entry.created_at, cost)

    def key(self, ctx: RequestContext, body: JSON) -> str:
        principal = ctx.principal
        isolate = principal is not None and (self.per_key or principal.metadata.get("cache_scope") == "key")
        return cache_key(body, key_id=principal.key_id if isolate and principal else None)

    async def _lookup(self, ctx: RequestContext, body: JSON) -> tuple[CacheControl, str, CachedEntry | None]:
        """The request's control, its key, and the stored entry unless it asked for no-cache."""
        control = ctx.cache_control or DEFAULT_CONTROL
        key = self.key(ctx, body)
        if control.no_cache:
            return control, key, None
        entry = await (self._traced_get(key) if self.tracer.enabled else self.backend.get(key))
        return control, key, entry

    # -- complete answers ----------------------------------------------------------------------

    async def complete(
        self,
        ctx: RequestContext,
        body: JSON,
        candidates: list[Deployment],
        call: Callable[[], Awaitable[JSON]],
    ) -> JSON:
        """The answer to ``body``: from the cache, from an identical call in flight, or ``call()``."""
        control, key, entry = await self._lookup(ctx, body)
        if entry is not None:
            return self._served(ctx, entry, candidates, "hit", key)
        led = False

        async def fetch() -> CachedEntry:
            nonlocal led
            led = True
            response = await call()
            entry = self._entry(ctx, response)
            if not control.no_store and storable(response):
                await self.backend.set(key, entry, control.lifetime(self.ttl_s))
            return entry

        if self.coalescer is None or control.no_cache:
            entry = await fetch()
        else:
            entry = await self.coalescer.run(key, fetch)
        if not led:
            return self._served(ctx, entry, candidates, "coalesced", key)
        self._count(ctx, "miss")
        ctx.usage = entry.usage
        return entry.response

    # -- streams -------------------------------------------------------------------------------

    async def stream(
        self,
        ctx: RequestContext,
        body: JSON,
        candidates: list[Deployment],
        start: Callable[[], Awaitable[tuple[JSON, AsyncIterator[JSON]]]],
    ) -> tuple[JSON, AsyncIterator[JSON], bool]:
        """``(first chunk, the rest, charge)`` for a streaming request.

        ``start`` opens the upstream stream (retries and failover happen inside it, before
        its first chunk). ``charge`` is False when somebody else pays: a hit or a reader
        joining another request's stream.
        """
        control, key, entry = await self._lookup(ctx, body)
        if entry is not None:
            self._served(ctx, entry, candidates, "hit", key)
            chunks = completion_to_chunks(entry.response)
            return chunks[0], _replay(chunks[1:]), False
        led = False

        def factory() -> AsyncIterator[JSON]:
            nonlocal led
            led = True
            self._leaders[key] = ctx
            return self._recorded(ctx, key, control, start)

        if self.coalescer is None or control.no_cache:
            chunks_in = factory()
        else:
            chunks_in = self.coalescer.stream(key, factory)
        try:
            first = await anext(chunks_in)
        except BaseException:
            await _aclose(chunks_in)
            raise
        if led:
            self._count(ctx, "miss")
        else:
            leader = self._leaders.get(key)
            if leader is not None and leader.deployment is not None:
                ctx.deployment = leader.deployment
            ctx.cost_usd = 0.0
            self._count(ctx, "coalesced")
        return first, chunks_in, led

    async def _recorded(
        self,
        ctx: RequestContext,
        key: str,
        control: CacheControl,
        start: Callable[[], Awaitable[tuple[JSON, AsyncIterator[JSON]]]],
    ) -> AsyncGenerator[JSON, None]:
        """The upstream stream, passed through and stored once it completed normally."""
        try:
            first, rest = await start()
            seen = [first]
            yield first
            try:
                async for chunk in rest:
                    seen.append(chunk)
                    yield chunk
            finally:
                await _aclose(rest)
            response = assemble_stream(seen)
            if not control.no_store and storable(response):
                await self.backend.set(key, self._entry(ctx, response), control.lifetime(self.ttl_s))
        finally:
            if self._leaders.get(key) is ctx:
                del self._leaders[key]

    # -- bookkeeping ---------------------------------------------------------------------------

    async def _traced_get(self, key: str) -> CachedEntry | None:
        """The lookup as the ``cache`` span (tracing on)."""
        with self.tracer.child("cache") as span:
            entry = await self.backend.get(key)
            span.set_attribute(ATTR_CACHE_RESULT, "miss" if entry is None else "hit")
            return entry

    def _entry(self, ctx: RequestContext, response: JSON) -> CachedEntry:
        d = ctx.deployment
        return CachedEntry.of(response, provider=d.provider.name if d else "", model=d.model if d else "")

    def _served(
        self, ctx: RequestContext, entry: CachedEntry, candidates: list[Deployment], how: str, key: str
    ) -> JSON:
        """A hit or a coalesced answer: nothing charged; headers name who made the answer."""
        ctx.deployment = _origin(entry, candidates)
        ctx.usage = None
        ctx.cost_usd = 0.0
        if self.prices is not None and entry.usage and entry.model:
            self.usd_saved += self._saved_cost(key, entry)
        self._count(ctx, how)
        return entry.response

    def _saved_cost(self, key: str, entry: CachedEntry) -> float:
        """What the answer cost when it was made: priced once per stored entry, not per hit."""
        known = self._costs.get(key)
        if known is not None and known[0] == entry.created_at:
            return known[1]
        assert self.prices is not None and entry.usage is not None
        cost = float(self.prices.cost(entry.model, entry.usage))
        if len(self._costs) >= _MAX_PRICED:
            self._costs.clear()  # a bound, not an LRU: re-pricing is only a little work
        self._costs[key] = (entry.created_at, cost)
        return cost

    def _count(self, ctx: RequestContext, how: str) -> None:
        ctx.cache = how
        if how == "hit":
            self.hits += 1
        elif how == "miss":
            self.misses += 1
        else:
            self.coalesced += 1
        if self.metrics is not None:
            self.metrics.observe_cache(how)

    async def stats(self) -> JSON:
        """For ``GET /admin/cache``: this process's counters, the backend's, coalescing."""
        served = self.hits + self.misses + self.coalesced
        backend = (await self.backend.stats()).to_dict()
        return {
            "requests": served,
            "hits": self.hits,
            "misses": self.misses,
            "coalesced": self.coalesced,
            "hit_ratio": round(self.hits / served, 6) if served else 0.0,
            "usd_saved": round(self.usd_saved, 8),
            "tokens_saved": backend.get("tokens_saved", 0),
            "ttl_s": self.ttl_s,
            "backend": backend,
            "coalescing": self.coalescer.stats() if self.coalescer is not None else None,
        }

    async def close(self) -> None:
        await self.backend.close()


def _origin(entry: CachedEntry, candidates: list[Deployment]) -> Deployment | None:
    for d in candidates:
        if d.provider.name == entry.provider and d.model == entry.model:
            return d
    return None


async def _replay(chunks: list[JSON]) -> AsyncGenerator[JSON, None]:
    for chunk in chunks:
        yield chunk

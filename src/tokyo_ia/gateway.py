"""The composition root: builds every stage from a :class:`~tokyo_ia.config.Config`.

One ``Gateway`` per worker process. :meth:`start` runs inside the event loop (it opens the
upstream connection pools and checks the database schema); :meth:`close` closes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from .accounting.ledger import SpendLedger
from .accounting.pricing import PriceTable
from .cache.layer import ResponseCache
from .config import Config
from .observability.logging import flush_access_log
from .observability.metrics import Metrics
from .observability.tracing import Tracer, build_tracer
from .pipeline import Pipeline
from .providers import registry
from .providers.base import Provider
from .resilience.admission import Admission
from .resilience.breaker import BreakerBoard, Breakers
from .resilience.health import ActiveHealthChecker, HealthMonitor, ProbeLease
from .resilience.ratelimit import Limits, MemoryRateLimiter, RateLimiter
from .resilience.retry import RetryPolicy
from .resilience.throttle import ProviderThrottle
from .routing.catalog import Catalog
from .security.audit import AuditWriter
from .security.auth import Authenticator
from .security.keycache import KeyCache
from .security.keys import KeyService
from .security.rotation import CredentialRotator
from .store.db import check_schema, create_engine, session_factory
from .store.inline import InlineSessions, sync_sqlite_url

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from .security.keysync import KeySubscriber

log = logging.getLogger("tokyo_ia")

POOL_SAMPLE_S = 5.0


def _connect(url: str) -> Redis:
    from .redis_client import connect  # redis-py is loaded only when redis.url is set

    return connect(url)


class Gateway:
    def __init__(self, config: Config, *, tracer: Tracer | None = None) -> None:
        """``tracer`` replaces the one ``config.tracing`` describes (tests: an in-memory exporter)."""
        self.config = config
        self.providers: dict[str, Provider] = {
            name: registry.create(name, section) for name, section in config.providers.items()
        }
        self.catalog = Catalog(config.models, self.providers)
        self.db = create_engine(config.store.url)
        self.sessions = session_factory(self.db)
        self.keys = KeyService(self.sessions)
        self.key_cache = KeyCache(
            self.keys, ttl_s=config.auth.key_cache_ttl_s, negative_ttl_s=config.auth.key_negative_ttl_s
        )
        self.authenticator = Authenticator(config.auth, virtual=self.key_cache)
        # On SQLite the book-keeping writers run their statements on this loop's thread
        # (store/inline.py explains why); elsewhere they use the async engine like the rest.
        inline_url = sync_sqlite_url(config.store.url)
        books_on = config.audit.enabled or config.ledger.enabled
        self.inline_sessions = InlineSessions(inline_url) if inline_url and books_on else None
        self._checkpoints: asyncio.Task[None] | None = None
        books: Any = self.inline_sessions or self.sessions
        self.audit = AuditWriter(books, **config.audit.writer_options()) if config.audit.enabled else None
        self.ledger = SpendLedger(books, **config.ledger.writer_options()) if config.ledger.enabled else None
        limits = config.limits
        self.metrics = Metrics.from_config(config)
        self.tracer = tracer or build_tracer(config.tracing)
        self.redis = None if not config.redis.url else _connect(config.redis.url)
        self.key_subscriber = self._key_sync(config)
        self.limiter, self.breakers, self.probe_lease = self._shared_state(config)
        self.health = HealthMonitor(
            [d for name in self.catalog.names() for d in self.catalog.deployments(name)],
            self.breakers,
            config.resilience.health,
        )
        self._report_circuits()
        self._pool_sampler: asyncio.Task[None] | None = None
        self.checker: ActiveHealthChecker | None = None
        credentials, refresh_s = config.credentials, config.secrets.refresh_s
        self.rotator = (
            CredentialRotator(credentials, self.providers, refresh_s)
            if credentials is not None and refresh_s > 0
            else None
        )
        prices = PriceTable.load(config.prices)
        self.cache = self._response_cache(config, prices)
        self.pipeline = Pipeline(
            self.authenticator,
            self.catalog,
            Admission(
                self.limiter,
                Limits(limits.rpm, limits.tpm, limits.max_parallel),
                estimate=any(p.tpm for p in config.providers.values()),
                metrics=self.metrics,
            ),
            retries={
                name: RetryPolicy(p.max_retries, p.retry_backoff_s, p.retry_backoff_max_s)
                for name, p in config.providers.items()
            },
            throttles={
                name: ProviderThrottle(name, p.rpm, p.tpm)
                for name, p in config.providers.items()
                if p.rpm or p.tpm
            },
            throttle_wait_s={name: p.throttle_wait_s for name, p in config.providers.items()},
            deadline_s=config.server.request_timeout_s,
            health=self.health,
            audit=self.audit,
            ledger=self.ledger,
            prices=prices,
            metrics=self.metrics,
            cache=self.cache,
            tracer=self.tracer,
            max_payload_bytes=config.audit.max_payload_bytes,
        )
        self.ready = False

    async def start(self) -> None:
        await check_schema(self.db)
        if self.inline_sessions is not None:
            self._checkpoints = asyncio.create_task(InlineSessions.checkpoints(self.db))
        if self.audit is not None:
            self.audit.start()
        if self.ledger is not None:
            self.ledger.start()
        if self.authenticator.open and await self.keys.count_active() > 0:
            # Virtual keys exist (made with the CLI): never serve them an open gateway.
            self.authenticator.open = False
            log.warning("auth: ON - the database holds virtual keys, so every request needs one")
        await asyncio.gather(*(p.start() for p in self.providers.values()))
        if self.config.resilience.health.active:
            self.checker = ActiveHealthChecker(self.health, lease=self.probe_lease)
            self.checker.start()
        if self.key_subscriber is not None:
            self.key_subscriber.start()
        if self.rotator is not None:
            self.rotator.start()
        self._pool_sampler = asyncio.create_task(self._sample_pools_every(POOL_SAMPLE_S))
        self.ready = True

    def _report_circuits(self) -> None:
        """``tokyo_ia_circuit_state``: every deployment from the start, then each transition."""
        metrics = self.metrics
        for name in self.catalog.names():
            for d in self.catalog.deployments(name):
                metrics.set_circuit_state(d.label, self.breakers.state(d.label).value)
        self.breakers.add_listener(lambda t: metrics.set_circuit_state(t.label, t.new.value))

    def sample_pools(self) -> None:
        """``tokyo_ia_upstream_pool_connections``: each provider's connection pool, now."""
        for name, provider in self.providers.items():
            pool = provider.pool()
            if pool is not None:
                self.metrics.set_pool_connections(name, pool.active, pool.idle, pool.limit)

    async def _sample_pools_every(self, seconds: float) -> None:
        """Every worker samples its own pools (a scrape reaches only one of them)."""
        while True:
            self.sample_pools()
            await asyncio.sleep(seconds)

    def _key_sync(self, config: Config) -> KeySubscriber | None:
        """With Redis: announce this process's key changes and apply everyone else's."""
        if self.redis is None or config.redis.url is None:
            return None
        from .security.keysync import KeySubscriber, announcer

        self.keys.on_change(announcer(self.redis))
        return KeySubscriber(config.redis.url, self.key_cache)

    def _shared_state(self, config: Config) -> tuple[RateLimiter, Breakers, ProbeLease | None]:
        """Limits, circuits and probe leases: in Redis when configured (so they hold across
        replicas, all on the one client), else in this process."""
        settings = config.resilience.breaker
        if self.redis is None:
            return MemoryRateLimiter(), BreakerBoard(settings), None
        from .resilience.breaker_redis import RedisBreakerBoard
        from .resilience.health import RedisProbeLease
        from .resilience.ratelimit_redis import RedisRateLimiter

        return (
            RedisRateLimiter(self.redis),
            RedisBreakerBoard(self.redis, settings),
            RedisProbeLease(self.redis),
        )

    def _response_cache(self, config: Config, prices: PriceTable) -> ResponseCache | None:
        """The response cache: in this process, or in Redis on the shared client."""
        c = config.cache
        if c is None:
            return None
        from .cache import build_cache, build_coalescer

        backend = build_cache(c, self.redis)
        assert backend is not None
        coalescer = build_coalescer(c, backend)
        return ResponseCache(
            backend,
            coalescer,
            ttl_s=c.ttl_s,
            per_key=c.per_key,
            prices=prices,
            metrics=self.metrics,
            tracer=self.tracer,
        )

    async def close(self) -> None:
        self.ready = False
        if self._pool_sampler is not None:
            self._pool_sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pool_sampler
        if self.checker is not None:
            await self.checker.stop()
        if self.rotator is not None:
            await self.rotator.stop()
        if self.key_subscriber is not None:
            await self.key_subscriber.close()
        results = await asyncio.gather(*(p.close() for p in self.providers.values()), return_exceptions=True)
        for provider, result in zip(self.providers.values(), results, strict=True):
            if isinstance(result, BaseException):
                log.warning("closing provider %s failed: %s", provider.name, result)
        if self.audit is not None:
            await self.audit.close()  # drains every queued record before the pool closes
        if self.ledger is not None:
            await self.ledger.close()  # likewise: every finished request gets its row
        if self.inline_sessions is not None:
            if self._checkpoints is not None:
                self._checkpoints.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._checkpoints
            self.inline_sessions.dispose()
        if self.cache is not None:
            await self.cache.close()  # flushes the shared counters (the client is closed below)
        self.metrics.close()
        if self.tracer.enabled:  # flushes the last spans; the exporter's HTTP client blocks
            await asyncio.to_thread(self.tracer.shutdown)
        await self.breakers.close()  # flushes successes not yet counted in Redis
        await self.limiter.close()
        if self.redis is not None:
            await self.redis.aclose()
        await self.db.dispose()
        flush_access_log()

"""The response cache shared by every replica, in Redis.

Keys (``<prefix>`` defaults to ``tokyo-ia:cache:``):

- ``<prefix>e:<key>``   one entry: :func:`~.base.encode_entry` bytes, ``SET ... PX`` so Redis
  expires it (PX rather than EX so sub-second TTLs work too);
- ``<prefix>stats``     hash of counters all replicas add to (``HINCRBY``): hits, misses,
  stores, tokens_saved, so ``GET /admin/cache`` can show the cluster-wide picture;
- ``<prefix>lock:<key>`` the cross-replica coalescing lock (:class:`RedisCoalescer`; the
  protocol is described in :mod:`.coalesce`).

Shared counters are not written on every request: each process adds up its deltas and
flushes them at most every ``flush_interval_s`` in a background task, and on ``stats()`` and
``close()``. A request never waits for that write.

A Redis failure is a *miss* (or a skipped store), never a failed request: the warning is
logged at most every 30 s, and after a failure the cache leaves Redis alone for
``cooldown_s`` so requests do not each pay a connect timeout. :meth:`RedisCache.from_url` sets
short socket timeouts and a single retry without backoff for the same reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..redis_client import Outage, connect
from .base import COMPRESS_OVER, JSON, CachedEntry, CacheStats, decode_entry, encode_entry
from .coalesce import Coalescer

log = logging.getLogger("tokyo_ia.cache")


class RedisCache:
    """:class:`~.base.Cache` over Redis; entries are visible to every replica at once."""

    def __init__(
        self,
        client: Redis,
        *,
        key_prefix: str = "tokyo-ia:cache:",
        compress_over: int = COMPRESS_OVER,
        flush_interval_s: float = 1.0,
        cooldown_s: float = 5.0,
        owns_client: bool = False,
    ) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.compress_over = compress_over
        self.flush_interval_s = flush_interval_s
        self._owns_client = owns_client
        self._stats = CacheStats(backend="redis")
        self._pending: Counter[str] = Counter()
        self._last_flush = time.monotonic()
        self._flushing: asyncio.Task[None] | None = None
        self._outage = Outage(log, cooldown_s)

    @classmethod
    def from_url(
        cls, url: str, *, client_options: dict[str, Any] | None = None, **options: Any
    ) -> RedisCache:
        """A cache with its own connection pool (fast-failing timeouts), closed by :meth:`close`."""
        return cls(connect(url, **(client_options or {})), owns_client=True, **options)

    @property
    def available(self) -> bool:
        """False while cooling down after a Redis failure (every lookup is then a miss)."""
        return self._outage.available

    def entry_key(self, key: str) -> str:
        return f"{self.key_prefix}e:{key}"

    def lock_key(self, key: str) -> str:
        return f"{self.key_prefix}lock:{key}"

    @property
    def stats_key(self) -> str:
        return f"{self.key_prefix}stats"

    async def get(self, key: str) -> CachedEntry | None:
        entry = await self.peek(key)
        if entry is None:
            self._count("misses")
        else:
            self._count("hits")
            self._count("tokens_saved", entry.total_tokens)
        self._maybe_flush()
        return entry

    async def peek(self, key: str) -> CachedEntry | None:
        """Read an entry without counting a hit or miss (the coalescer polls with this)."""
        if not self.available:
            return None
        try:
            data = await self.client.get(self.entry_key(key))
        except RedisError as exc:
            self.failed(exc)
            return None
        return None if data is None else self.decode(data)

    def decode(self, data: bytes | str) -> CachedEntry | None:
        """Bytes read from Redis → entry; unreadable bytes (another version?) are a miss."""
        try:
            return decode_entry(data if isinstance(data, bytes) else data.encode())
        except ValueError as exc:
            self._stats.errors += 1
            self._outage.warn(f"redis cache: unreadable cache entry ignored: {exc}")
            return None

    async def set(self, key: str, entry: CachedEntry, ttl_s: float) -> None:
        if ttl_s <= 0 or not self.available:
            return
        data = encode_entry(entry, self.compress_over)
        try:
            await self.client.set(self.entry_key(key), data, px=max(1, round(ttl_s * 1000)))
        except RedisError as exc:
            self.failed(exc)
            return
        self._count("stores")
        self._maybe_flush()

    async def delete(self, key: str) -> None:
        if not self.available:
            return
        try:
            await self.client.delete(self.entry_key(key))
        except RedisError as exc:
            self.failed(exc)

    async def stats(self) -> CacheStats:
        """This process's counters, plus the cluster-wide ones when Redis answers."""
        await self.flush()
        local = dataclasses.replace(self._stats, cluster=None)
        if not self.available:
            return local
        try:
            raw = await self.client.hgetall(self.stats_key)
        except RedisError as exc:
            self.failed(exc)
            return local
        shared = {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in raw.items()}
        local.cluster = CacheStats(
            backend="redis",
            hits=shared.get("hits", 0),
            misses=shared.get("misses", 0),
            stores=shared.get("stores", 0),
            tokens_saved=shared.get("tokens_saved", 0),
        )
        return local

    async def flush(self) -> None:
        """Add this process's pending counter deltas to the shared hash (waits for a running flush)."""
        if self._flushing is not None:
            await asyncio.shield(self._flushing)
        await self._write_pending()

    async def _write_pending(self) -> None:
        self._last_flush = time.monotonic()
        pending, self._pending = self._pending, Counter()
        if not pending or not self.available:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for name, amount in pending.items():
                    pipe.hincrby(self.stats_key, name, amount)
                await pipe.execute()
        except RedisError as exc:
            self.failed(exc)

    async def close(self) -> None:
        """Flush the counters, then close the pool if this cache opened it."""
        await self.flush()
        if self._owns_client:
            await self.client.aclose()

    def failed(self, exc: BaseException) -> None:
        """Record a Redis failure: cool down, count it, warn (rate limited)."""
        self._stats.errors += 1
        self._outage.failed("redis cache: Redis unavailable, serving without the shared cache", exc)

    def _count(self, name: str, amount: int = 1) -> None:
        if amount:
            setattr(self._stats, name, getattr(self._stats, name) + amount)
            self._pending[name] += amount

    def _maybe_flush(self) -> None:
        if self._flushing is not None or time.monotonic() - self._last_flush < self.flush_interval_s:
            return
        self._last_flush = time.monotonic()
        self._flushing = asyncio.create_task(self._write_pending())
        self._flushing.add_done_callback(self._flush_done)

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        self._flushing = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("redis cache: flushing shared counters failed: %r", task.exception())


# Compare-and-delete / compare-and-extend: only the holder's token may touch its lock.
_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"


class RedisCoalescer:
    """Coalescing across replicas through :class:`RedisCache` (see :mod:`.coalesce` for the protocol).

    ``run``'s factory must store its entry in the cache before returning (that is what the
    other replicas wait for); ``stream`` coalesces within this process only.
    """

    def __init__(
        self,
        cache: RedisCache,
        *,
        lock_ttl_s: float = 10.0,
        wait_s: float = 60.0,
        poll_min_s: float = 0.01,
        poll_max_s: float = 0.25,
        local: Coalescer | None = None,
    ) -> None:
        self.cache = cache
        self.lock_ttl_s = lock_ttl_s
        self.wait_s = wait_s
        self.poll_min_s = poll_min_s
        self.poll_max_s = poll_max_s
        self.local = local or Coalescer()
        self.led = 0
        self.remote = 0
        self.fallbacks = 0
        self._release = cache.client.register_script(_RELEASE_LUA)
        self._renew = cache.client.register_script(_RENEW_LUA)

    def stats(self) -> dict[str, int]:
        return {
            "led": self.led,
            "coalesced": self.local.coalesced + self.remote,
            "coalesced_remote": self.remote,
            "fallbacks": self.fallbacks,
            "in_flight": self.local.stats()["in_flight"],
        }

    async def run(self, key: str, factory: Callable[[], Awaitable[CachedEntry]]) -> CachedEntry:
        return await self.local.run(key, lambda: self._across(key, factory))

    def stream(self, key: str, factory: Callable[[], AsyncIterator[JSON]]) -> AsyncGenerator[JSON, None]:
        return self.local.stream(key, factory)

    async def _across(self, key: str, factory: Callable[[], Awaitable[CachedEntry]]) -> CachedEntry:
        """Lead (hold the lock and call upstream), or wait for the replica that leads."""
        if not self.cache.available:
            return await self._fallback(factory)
        lock_key, token = self.cache.lock_key(key), uuid.uuid4().hex
        deadline, delay = time.monotonic() + self.wait_s, self.poll_min_s
        try:
            acquired, entry = await self._try_lock(key, lock_key, token)
            while not acquired and entry is None and time.monotonic() < deadline:
                entry, locked = await self._poll(key, lock_key, delay)
                delay = min(delay * 2, self.poll_max_s)
                if entry is None and not locked:  # the holder left without an entry: take over
                    acquired, entry = await self._try_lock(key, lock_key, token)
        except RedisError as exc:
            self.cache.failed(exc)
            return await self._fallback(factory)
        if entry is not None:
            self.remote += 1
            return entry
        if not acquired:
            log.warning(
                "coalescing: waited %.1f s for another replica's answer; calling upstream", self.wait_s
            )
            return await self._fallback(factory)
        return await self._lead(lock_key, token, factory)

    async def _try_lock(self, key: str, lock_key: str, token: str) -> tuple[bool, CachedEntry | None]:
        """Take the lock and, in the same round trip, look for an entry stored meanwhile."""
        async with self.cache.client.pipeline(transaction=False) as pipe:
            pipe.set(lock_key, token, nx=True, px=round(self.lock_ttl_s * 1000))
            pipe.get(self.cache.entry_key(key))
            acquired, data = await pipe.execute()
        entry = None if data is None else self.cache.decode(data)
        if entry is not None and acquired:
            await self._release(keys=[lock_key], args=[token])
            acquired = False
        return bool(acquired), entry

    async def _poll(self, key: str, lock_key: str, delay: float) -> tuple[CachedEntry | None, bool]:
        await asyncio.sleep(delay)
        async with self.cache.client.pipeline(transaction=False) as pipe:
            pipe.get(self.cache.entry_key(key))
            pipe.exists(lock_key)
            data, locked = await pipe.execute()
        return (None if data is None else self.cache.decode(data)), bool(locked)

    async def _lead(
        self, lock_key: str, token: str, factory: Callable[[], Awaitable[CachedEntry]]
    ) -> CachedEntry:
        self.led += 1
        renewer = asyncio.create_task(self._keep_lock(lock_key, token))
        try:
            return await factory()
        finally:
            renewer.cancel()
            await asyncio.shield(self._unlock(lock_key, token))

    async def _fallback(self, factory: Callable[[], Awaitable[CachedEntry]]) -> CachedEntry:
        self.fallbacks += 1
        self.led += 1
        return await factory()

    async def _keep_lock(self, lock_key: str, token: str) -> None:
        ttl_ms = round(self.lock_ttl_s * 1000)
        while True:
            await asyncio.sleep(self.lock_ttl_s / 3)
            try:
                if not await self._renew(keys=[lock_key], args=[token, ttl_ms]):
                    return  # lost it (expired while Redis was unreachable); someone else may lead
            except RedisError as exc:
                self.cache.failed(exc)

    async def _unlock(self, lock_key: str, token: str) -> None:
        try:
            await self._release(keys=[lock_key], args=[token])
        except RedisError as exc:
            self.cache.failed(exc)  # the lock expires by itself within lock_ttl_s

"""The in-process response cache: LRU, per-entry TTL, bounded in bytes.

Every operation is O(1) (an ``OrderedDict`` moved to its end on each hit) and runs without an
``await`` inside, so concurrent requests on one event loop need no lock. Expired entries are
dropped when they are read or when they reach the cold end of the LRU; their bytes count
against the bound until then, so the bound holds however TTLs are mixed. Call
:meth:`MemoryCache.purge_expired` (O(n)) from a background task to reclaim them sooner.

The byte bound counts the serialized entry (compressed above :data:`~.base.COMPRESS_OVER`)
plus the key, not Python object overhead (~200 bytes per entry): size ``max_bytes`` a little
under the memory you mean to give it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .base import COMPRESS_OVER, CachedEntry, CacheStats, decode_entry, encode_entry

log = logging.getLogger("tokyo_ia.cache")


@dataclass(slots=True)
class _Slot:
    data: bytes
    expires_at: float
    size: int


class MemoryCache:
    """:class:`~.base.Cache` for one process. ``clock`` (seconds, monotonic) lets tests step time."""

    def __init__(
        self,
        max_bytes: int = 256 * 1024 * 1024,
        *,
        compress_over: int = COMPRESS_OVER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self.compress_over = compress_over
        self._clock = clock
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._bytes = 0
        self._stats = CacheStats(backend="memory")

    async def get(self, key: str) -> CachedEntry | None:
        slot = self._slots.get(key)
        if slot is not None and slot.expires_at <= self._clock():
            self._drop(key)
            self._stats.expirations += 1
            slot = None
        if slot is None:
            self._stats.misses += 1
            return None
        self._slots.move_to_end(key)
        try:
            entry = decode_entry(slot.data)
        except ValueError as exc:  # cannot happen with bytes we wrote; never fail a request over it
            log.warning("memory cache: dropping unreadable entry: %s", exc)
            self._drop(key)
            self._stats.errors += 1
            self._stats.misses += 1
            return None
        self._stats.hits += 1
        self._stats.tokens_saved += entry.total_tokens
        return entry

    async def set(self, key: str, entry: CachedEntry, ttl_s: float) -> None:
        """Store ``entry`` for ``ttl_s`` seconds; an entry larger than the whole bound is skipped."""
        if ttl_s <= 0:
            return
        data = encode_entry(entry, self.compress_over)
        size = len(data) + len(key)
        if key in self._slots:
            self._drop(key)
        if size > self.max_bytes:
            return
        while self._bytes + size > self.max_bytes:
            self._evict_coldest()
        self._slots[key] = _Slot(data, self._clock() + ttl_s, size)
        self._bytes += size
        self._stats.stores += 1

    async def delete(self, key: str) -> None:
        if key in self._slots:
            self._drop(key)

    async def stats(self) -> CacheStats:
        return self.snapshot()

    def snapshot(self) -> CacheStats:
        """The counters, synchronously (for metrics collectors that cannot await)."""
        s = self._stats
        return CacheStats(
            backend="memory",
            hits=s.hits,
            misses=s.misses,
            stores=s.stores,
            entries=len(self._slots),
            bytes=self._bytes,
            evictions=s.evictions,
            expirations=s.expirations,
            tokens_saved=s.tokens_saved,
            errors=s.errors,
        )

    def purge_expired(self) -> int:
        """Drop every expired entry now; returns how many. O(n): for a periodic background task."""
        now = self._clock()
        expired = [key for key, slot in self._slots.items() if slot.expires_at <= now]
        for key in expired:
            self._drop(key)
        self._stats.expirations += len(expired)
        return len(expired)

    async def clear(self) -> None:
        self._slots.clear()
        self._bytes = 0

    async def close(self) -> None:
        await self.clear()

    def __len__(self) -> int:
        return len(self._slots)

    def _evict_coldest(self) -> None:
        _, slot = self._slots.popitem(last=False)
        self._bytes -= slot.size
        if slot.expires_at <= self._clock():
            self._stats.expirations += 1
        else:
            self._stats.evictions += 1

    def _drop(self, key: str) -> None:
        slot = self._slots.pop(key)
        self._bytes -= slot.size

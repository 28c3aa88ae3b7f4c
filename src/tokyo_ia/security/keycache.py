"""The in-process key cache that keeps the database off the hot path.

How fast a change takes effect, on every replica:

- The replica that makes a change (admin API or a :class:`~tokyo_ia.security.keys.KeyService`
  in the same process) invalidates its own entry at once, through ``KeyService.on_change``.
- With ``redis.url`` set, every other replica is told through Redis pub/sub and forgets the
  key within milliseconds (``keysync.py``).
- Without Redis, or while it is unreachable, every other replica keeps serving what it read
  for at most ``ttl_s`` (default 5 s), then reads the database again. So a revocation, a
  disabled key or a new model list is in force everywhere within ``ttl_s`` seconds in every
  case; lower it if that window is too long for you. An expiry needs no round trip: it is
  checked against the clock on every hit.
- A key that does not exist is remembered for ``negative_ttl_s`` (default 1 s), so a client
  hammering with a garbage key costs one query per second, and a freshly created key works
  on other replicas after at most that long. Tokens that do not even look like a virtual key
  (no ``sk-tia-`` prefix) never reach the database.

Positive and negative entries live in separate bounded maps (oldest evicted first), so a flood
of distinct garbage keys can never push real keys out. Concurrent misses for one key share a
single database query.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .auth import Principal, digest
from .keys import KeyRecord, KeyService, looks_like_key, principal_for, refusal, verdict

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class _Entry:
    deadline: float
    record: KeyRecord
    principal: Principal


class KeyCache:
    """Authenticate virtual keys with at most one database query per key per ``ttl_s``."""

    def __init__(
        self,
        service: KeyService,
        *,
        ttl_s: float = 5.0,
        negative_ttl_s: float = 1.0,
        max_entries: int = 10_000,
        max_negative: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._service = service
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.max_entries = max_entries
        self.max_negative = max_negative
        self._clock = clock
        self._positive: OrderedDict[str, _Entry] = OrderedDict()
        self._negative: OrderedDict[str, float] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._generation = 0
        self.hits = 0
        self.misses = 0
        service.on_change(lambda _key_id, key_hash: self.invalidate(key_hash))

    def __len__(self) -> int:
        return len(self._positive) + len(self._negative)

    async def authenticate(self, plaintext: str, key_hash: str | None = None) -> Principal | None:
        """Like :meth:`KeyService.authenticate` (``None`` if unknown, raises if refused), cached.

        ``key_hash``: ``digest(plaintext)`` when the caller has it already.
        """
        if not looks_like_key(plaintext):
            return None
        if key_hash is None:
            key_hash = digest(plaintext)
        now = self._clock()
        entry = self._positive.get(key_hash)
        if entry is not None and entry.deadline > now:
            self.hits += 1
            return _check(entry)
        negative = self._negative.get(key_hash)
        if negative is not None and negative > now:
            self.hits += 1
            return None
        self.misses += 1
        return verdict(await self._fetch(key_hash))

    def invalidate(self, key_hash: str) -> None:
        """Forget one key (by digest); the next use reads the database."""
        self._generation += 1
        self._positive.pop(key_hash, None)
        self._negative.pop(key_hash, None)

    def clear(self) -> None:
        self._generation += 1
        self._positive.clear()
        self._negative.clear()

    async def _fetch(self, key_hash: str) -> KeyRecord | None:
        """One query per key however many requests miss at once; cancellation-safe."""
        future = self._inflight.get(key_hash)
        if future is None:
            future = asyncio.ensure_future(self._load(key_hash, self._generation))
            self._inflight[key_hash] = future
            future.add_done_callback(lambda f: self._done(key_hash, f))
        return await asyncio.shield(future)

    def _done(self, key_hash: str, future: asyncio.Future[KeyRecord | None]) -> None:
        self._inflight.pop(key_hash, None)
        if not future.cancelled():
            future.exception()  # retrieved here, so an error nobody awaited is not logged twice

    async def _load(self, key_hash: str, generation: int) -> KeyRecord | None:
        record = await self._service.lookup(key_hash)
        if generation != self._generation:
            return record  # invalidated while we read: the answer may be stale, do not keep it
        now = self._clock()
        if record is None:
            _put(self._negative, key_hash, now + self.negative_ttl_s, self.max_negative)
        else:
            entry = _Entry(now + self.ttl_s, record, principal_for(record))
            _put(self._positive, key_hash, entry, self.max_entries)
        return record


def _put(store: OrderedDict[str, V], key: str, value: V, limit: int) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > limit:
        store.popitem(last=False)


def _check(entry: _Entry) -> Principal:
    error = refusal(entry.record)
    if error is not None:
        raise error
    return entry.principal

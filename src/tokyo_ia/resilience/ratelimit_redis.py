"""Rate limits shared by every gateway replica, in Redis.

Same GCRA semantics as :mod:`.ratelimit` (the Lua below mirrors ``ratelimit.evaluate`` and
``ratelimit.charge``), but each check is one atomic EVALSHA round trip, so replicas never race.
Scripts are registered once (``register_script``); redis-py loads them again by itself after a
Redis restart (NOSCRIPT). Time comes from the Redis server (``TIME``), so replicas whose clocks
disagree still share one timeline.

Keys (``{scope}`` is a hash tag, so a scope's keys share one Redis Cluster slot):

- ``<prefix>{<scope>}``      hash ``r``/``t`` = request/token TATs in ms; PEXPIRE'd when full again;
- ``<prefix>{<scope>}:par``  sorted set of in-flight request ids scored by lease expiry (ms).
  A holder renews its lease every ``lease_s / 3``; a replica that dies stops renewing and its
  slots expire after ``lease_s``, so no crash can leak concurrency.

When Redis cannot be reached the limiter fails *open* (admits, logs a warning at most every
30 s): limits protect capacity, and an outage of the limiter must not become an outage of the
gateway. Budgets, which are about money, are enforced elsewhere. After a failure it leaves Redis
alone for ``cooldown_s`` so requests do not each pay a connect timeout; :meth:`from_url` also sets
short socket timeouts and a single retry without backoff (redis-py's default retries with
backoff would add seconds to every request while Redis is down).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from types import TracebackType
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..redis_client import NOW_LUA, Outage, connect, now_ms
from .ratelimit import (
    MAX_DEBT_PERIODS,
    PERIOD_S,
    Clock,
    Decision,
    Limits,
    Outcome,
    RefusedBy,
    decision_from,
    parallel_error,
    unmetered,
)

log = logging.getLogger("tokyo_ia.ratelimit")

# The arguments and the state the acquire and refund scripts start from.
# ARGV: now, period_ms, rpm (0 = none), tpm (0 = none), tokens.
_SCOPE_LUA = (
    NOW_LUA
    + """
local period = tonumber(ARGV[2])
local rpm, tpm, tokens = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local st = redis.call('HMGET', KEYS[1], 'r', 't')
"""
)

# Returns {allowed, refused (0 none, 1 requests, 2 tokens), reset_r_ms, reset_t_ms, retry_ms or -1}.
_ACQUIRE_LUA = (
    _SCOPE_LUA
    + """local tat_r = math.max(tonumber(st[1]) or now, now)
local tat_t = math.max(tonumber(st[2]) or now, now)
local new_r, new_t, wait_r, wait_t = tat_r, tat_t, 0, 0
if rpm > 0 then
  new_r = tat_r + period / rpm
  wait_r = new_r - now - period
end
if tpm > 0 then
  if tokens > tpm then
    return {0, 2, tostring(tat_r - now), tostring(tat_t - now), '-1'}
  end
  new_t = tat_t + tokens * period / tpm
  wait_t = new_t - now - period
end
if wait_r > 1e-6 or wait_t > 1e-6 then
  local by = 1
  if wait_t > wait_r then by = 2 end
  return {0, by, tostring(tat_r - now), tostring(tat_t - now), tostring(math.max(wait_r, wait_t))}
end
redis.call('HSET', KEYS[1], 'r', tostring(new_r), 't', tostring(new_t))
redis.call('PEXPIRE', KEYS[1], math.ceil(math.max(new_r, new_t) - now) + 1)
return {1, 0, tostring(new_r - now), tostring(new_t - now), '-1'}
"""
)

# ARGV: now, period_ms, tpm, tokens, max_debt_ms. Mirrors ratelimit.charge.
_CHARGE_LUA = (
    NOW_LUA
    + """
local period, tpm, tokens = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tat = math.max(tonumber(redis.call('HGET', KEYS[1], 't')) or now, now)
local new = math.min(math.max(tat + tokens * period / tpm, now), now + tonumber(ARGV[5]))
redis.call('HSET', KEYS[1], 't', tostring(new))
local need = math.ceil(new - now) + 1
if redis.call('PTTL', KEYS[1]) < need then redis.call('PEXPIRE', KEYS[1], need) end
return 1
"""
)

# Mirrors ratelimit.refund; a scope with no state (a full bucket) stays as it is.
_REFUND_LUA = (
    _SCOPE_LUA
    + """if not st[1] and not st[2] then return 0 end
local tat_r = tonumber(st[1]) or now
local tat_t = tonumber(st[2]) or now
if rpm > 0 then tat_r = math.max(tat_r - period / rpm, now) end
if tpm > 0 and tokens > 0 then tat_t = math.max(tat_t - tokens * period / tpm, now) end
redis.call('HSET', KEYS[1], 'r', tostring(tat_r), 't', tostring(tat_t))
return 1
"""
)

# ARGV: now, lease_ms, max_parallel, member. Returns {admitted, in_flight, ms until a lease ends}.
_SLOT_LUA = (
    NOW_LUA
    + """
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[3]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, n, tostring(tonumber(first[2]) - now)}
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease))
return {1, n + 1, '0'}
"""
)

# ARGV: now, lease_ms, member. Extends a held lease; returns 0 if it had already expired.
_RENEW_LUA = (
    NOW_LUA
    + """
if not redis.call('ZSCORE', KEYS[1], ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])))
return 1
"""
)

_REFUSED: dict[int, RefusedBy | None] = {0: None, 1: "requests", 2: "tokens"}
_PERIOD_MS = PERIOD_S * 1000


class RedisRateLimiter:
    """:class:`~.ratelimit.RateLimiter` over Redis, correct across any number of replicas.

    ``clock`` (seconds) replaces the Redis server clock; tests use it to step time. ``lease_s``
    bounds how long a crashed replica's in-flight slots survive it.
    """

    def __init__(
        self,
        client: Redis,
        *,
        key_prefix: str = "tokyo-ia:rl:",
        clock: Clock | None = None,
        lease_s: float = 30.0,
        cooldown_s: float = 5.0,
        owns_client: bool = False,
    ) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.lease_s = lease_s
        self._clock = clock
        self._owns_client = owns_client
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._charge = client.register_script(_CHARGE_LUA)
        self._refund = client.register_script(_REFUND_LUA)
        self._slot = client.register_script(_SLOT_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._background: set[asyncio.Task[None]] = set()
        self._outage = Outage(log, cooldown_s)

    @classmethod
    def from_url(
        cls, url: str, *, client_options: dict[str, Any] | None = None, **options: Any
    ) -> RedisRateLimiter:
        """A limiter with its own connection pool (fast-failing timeouts), closed by :meth:`close`."""
        return cls(connect(url, **(client_options or {})), owns_client=True, **options)

    @property
    def available(self) -> bool:
        """False while cooling down after a Redis failure (requests are then admitted)."""
        return self._outage.available

    def key(self, scope: str) -> str:
        return f"{self.key_prefix}{{{scope}}}"

    async def acquire(self, scope: str, limits: Limits, tokens: int = 0) -> Decision:
        if not limits.metered or not self.available:
            return unmetered(scope)
        args = [now_ms(self._clock), _PERIOD_MS, limits.rpm or 0, limits.tpm or 0, max(tokens, 0)]
        try:
            raw = await self._acquire(keys=[self.key(scope)], args=args)
        except RedisError as exc:
            self._failed(exc)
            return unmetered(scope)
        allowed, refused, reset_r, reset_t, retry = raw
        outcome = Outcome(
            allowed=bool(allowed),
            refused_by=_REFUSED[int(refused)],
            reset_requests=float(reset_r) / 1000,
            reset_tokens=float(reset_t) / 1000,
            retry_after=None if float(retry) < 0 else float(retry) / 1000,
        )
        return decision_from(scope, limits, tokens, outcome)

    async def add_tokens(self, scope: str, limits: Limits, tokens: int) -> None:
        if limits.tpm is None or tokens == 0 or not self.available:
            return
        args = [now_ms(self._clock), _PERIOD_MS, limits.tpm, tokens, MAX_DEBT_PERIODS * _PERIOD_MS]
        try:
            await self._charge(keys=[self.key(scope)], args=args)
        except RedisError as exc:
            self._failed(exc)

    async def refund(self, scope: str, limits: Limits, tokens: int = 0) -> None:
        if not limits.metered or not self.available:
            return
        args = [now_ms(self._clock), _PERIOD_MS, limits.rpm or 0, limits.tpm or 0, tokens]
        try:
            await self._refund(keys=[self.key(scope)], args=args)
        except RedisError as exc:
            self._failed(exc)

    def parallel(self, scope: str, max_parallel: int | None) -> _RedisSlot:
        return _RedisSlot(self, scope, max_parallel)

    async def in_flight(self, scope: str) -> int:
        """Slots currently held for ``scope`` (expired leases not counted)."""
        now = time.time() * 1000 if self._clock is None else self._clock() * 1000
        return int(await self.client.zcount(self.key(scope) + ":par", f"({now}", "+inf"))

    async def close(self) -> None:
        """Wait for pending slot releases, then close the pool if this limiter opened it."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._owns_client:
            await self.client.aclose()

    def _failed(self, exc: BaseException) -> None:
        self._outage.failed("rate limiter: Redis unavailable, admitting requests unlimited", exc)


class _RedisSlot:
    """One in-flight slot: a sorted-set member whose lease a background task keeps renewing.

    Release runs shielded, so a request cancelled twice (client gone, then shutdown) still
    frees its slot; if even that fails, the lease expires on its own.
    """

    def __init__(self, limiter: RedisRateLimiter, scope: str, max_parallel: int | None) -> None:
        self._limiter = limiter
        self._scope = scope
        self._max = max_parallel
        self._key = limiter.key(scope) + ":par"
        self._member = uuid.uuid4().hex
        self._renewer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> None:
        lim = self._limiter
        if self._max is None or not lim.available:
            return
        lease_ms = lim.lease_s * 1000
        try:
            raw = await lim._slot(
                keys=[self._key], args=[now_ms(lim._clock), lease_ms, self._max, self._member]
            )
        except RedisError as exc:
            lim._failed(exc)
            return
        if not int(raw[0]):
            raise parallel_error(self._scope, self._max, retry_after=min(1.0, float(raw[2]) / 1000))
        self._renewer = asyncio.create_task(self._keep_alive())

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._renewer is None:
            return
        task = asyncio.ensure_future(self._release())
        self._limiter._background.add(task)
        task.add_done_callback(self._limiter._background.discard)
        await asyncio.shield(task)

    async def _keep_alive(self) -> None:
        lim = self._limiter
        while True:
            await asyncio.sleep(lim.lease_s / 3)
            try:
                await lim._renew(
                    keys=[self._key], args=[now_ms(lim._clock), lim.lease_s * 1000, self._member]
                )
            except RedisError as exc:
                lim._failed(exc)

    async def _release(self) -> None:
        assert self._renewer is not None
        self._renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._renewer
        try:
            await self._limiter.client.zrem(self._key, self._member)
        except RedisError as exc:
            self._limiter._failed(exc)

"""Circuit breakers shared by every gateway replica, in Redis.

Same state machine as :class:`~.breaker.CircuitBreaker` (the Lua below mirrors it), but state
and counters live in Redis and every transition is one atomic EVALSHA, so when one replica
opens a circuit the others stop sending traffic too, and half-open trials are limited
*globally* to ``half_open_max``.

Keys (``{<label>}`` is a hash tag, so a deployment's keys share one Redis Cluster slot):

- ``<prefix>{<label>}``         hash: ``state``, ``since``, ``opened``, ``reason``, ``consec``,
  ``t:<state>`` (ms spent per state), ``s:<slice>``/``f:<slice>`` (window counts);
- ``<prefix>{<label>}:trials``  sorted set of half-open trials scored by lease expiry (ms).

Both get a TTL refreshed on every write; an idle key expiring means "closed, nothing counted".

The hot path stays off Redis: each replica caches a label's state for ``cache_s``. While the
cached state is closed, :meth:`RedisBreakerBoard.allow` answers from memory and successes are
only counted locally, then flushed with the next round trip (the refresh after ``cache_s``,
or a failure); while open it refuses from memory until the cooldown ends. So a replica sees
another's opening within ``cache_s``, and a healthy deployment costs one round trip per
``cache_s`` per replica. Only half-open admissions and failures always go to Redis.

A replica refused a half-open trial also trusts that answer for ``cache_s``, so a half-open
circuit does not cost a round trip per request either.

When Redis is unreachable the board falls back to an in-memory :class:`~.breaker.BreakerBoard`
(per-replica protection is better than none), warns at most every 30 s, and leaves Redis
alone for ``retry_after_s`` so requests do not each pay a connect timeout. Once Redis answers
again the shared state applies and the fallback's is left behind.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..redis_client import NOW_LUA, Outage, connect, now_ms
from .breaker import (
    JSON,
    BreakerBoard,
    BreakerSettings,
    Clock,
    Listener,
    State,
    Transition,
    counts_as_failure,
    failure_kind,
    notify,
)

log = logging.getLogger("tokyo_ia.breaker")

# ARGV: now_ms (-1 = Redis TIME), op, pending successes, trial member, note, window_ms, buckets,
# min_requests, failure_ratio, consecutive_failures, cooldown_ms, half_open_max, trial_ms, ttl_ms.
# Returns {allowed, state, state before, ms left open, reason, consec, ok, failed,
#          ms closed, ms open, ms half_open, ms in current state}.
_BREAKER_LUA = (
    NOW_LUA
    + """local op, pending, member, note = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local window, nslices = tonumber(ARGV[6]), tonumber(ARGV[7])
local min_req, ratio, consec_max = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local cooldown, trial_max, trial_ms = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local ttl = tonumber(ARGV[14])
local key, trials = KEYS[1], KEYS[2]
local idx = math.floor(now / (window / nslices))

local f = {}
local raw = redis.call('HGETALL', key)
for i = 1, #raw, 2 do f[raw[i]] = raw[i + 1] end
if not f['state'] then
  f['state'], f['since'], f['reason'], f['consec'] = 'closed', tostring(now), '', '0'
  redis.call('HSET', key, 'state', 'closed', 'since', f['since'], 'reason', '', 'consec', 0)
end
local state, before = f['state'], f['state']

local function counts()
  local ok, bad, stale = 0, 0, {}
  for k, v in pairs(f) do
    local kind, n = string.match(k, '^([sf]):(%d+)$')
    if kind then
      if tonumber(n) <= idx - nslices then
        table.insert(stale, k)
      elseif kind == 's' then ok = ok + tonumber(v) else bad = bad + tonumber(v) end
    end
  end
  for _, k in ipairs(stale) do f[k] = nil end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  return ok, bad
end

local function count(kind, n)
  local k = kind .. ':' .. idx
  f[k] = tostring(redis.call('HINCRBY', key, k, n))
end

local function move(new, why)
  local spent = now - tonumber(f['since'])
  f['t:' .. state] = redis.call('HINCRBYFLOAT', key, 't:' .. state, tostring(spent))
  state, f['state'], f['since'], f['reason'] = new, new, tostring(now), why
  redis.call('HSET', key, 'state', new, 'since', f['since'], 'reason', why)
  redis.call('DEL', trials)
  if new == 'open' then
    f['opened'] = tostring(now)
    redis.call('HSET', key, 'opened', f['opened'])
  elseif new == 'closed' then
    local dead = {}
    for k, _ in pairs(f) do if string.match(k, '^[sf]:') then table.insert(dead, k) end end
    for _, k in ipairs(dead) do f[k] = nil end
    if #dead > 0 then redis.call('HDEL', key, unpack(dead)) end
    f['consec'] = '0'
    redis.call('HSET', key, 'consec', 0)
  end
end

if pending > 0 and state == 'closed' then
  count('s', pending)
  f['consec'] = '0'
  redis.call('HSET', key, 'consec', 0)
end

local allowed = 0
if op == 'allow' then
  if state == 'open' and now - tonumber(f['opened']) >= cooldown then move('half_open', 'cooldown over') end
  if state == 'closed' then allowed = 1 end
  if state == 'half_open' then
    redis.call('ZREMRANGEBYSCORE', trials, '-inf', now)
    if redis.call('ZCARD', trials) < trial_max then
      redis.call('ZADD', trials, now + trial_ms, member)
      redis.call('PEXPIRE', trials, ttl)
      allowed = 1
    end
  end
elseif op == 'success' then
  if state == 'half_open' then move('closed', 'trial succeeded')
  elseif state == 'closed' then
    count('s', 1)
    f['consec'] = '0'
    redis.call('HSET', key, 'consec', 0)
  end
elseif op == 'failure' then
  if state == 'half_open' then move('open', 'trial failed: ' .. note)
  elseif state == 'closed' then
    count('f', 1)
    local consec = redis.call('HINCRBY', key, 'consec', 1)
    f['consec'] = tostring(consec)
    local ok, bad = counts()
    if consec >= consec_max then
      move('open', consec .. ' consecutive failures, last: ' .. note)
    elseif ok + bad >= min_req and bad / (ok + bad) >= ratio then
      move('open', bad .. ' of ' .. (ok + bad) .. ' requests failed within ' .. (window / 1000)
        .. 's, last: ' .. note)
    end
  end
elseif op == 'release' then
  redis.call('ZREM', trials, member)
elseif op == 'trip' then
  if state == 'open' then
    f['opened'], f['reason'] = tostring(now), note
    redis.call('HSET', key, 'opened', f['opened'], 'reason', note)
  else
    move('open', note)
  end
elseif op == 'probe_ok' then
  if state == 'open' then move('half_open', note) end
end
redis.call('PEXPIRE', key, ttl)

local left = 0
if state == 'open' then left = math.max(0, tonumber(f['opened']) + cooldown - now) end
local ok, bad = counts()
return {allowed, state, before, tostring(left), f['reason'] or '', tonumber(f['consec'] or 0), ok, bad,
  f['t:closed'] or '0', f['t:open'] or '0', f['t:half_open'] or '0', tostring(now - tonumber(f['since']))}
"""
)

_TTL_FLOOR_S = 600.0


@dataclass(slots=True)
class _View:
    """What one script call told this replica about a label."""

    state: State
    fetched: float  # local clock
    open_until: float  # local clock; meaningful while open
    trials_full: bool = False  # half-open and this replica was refused a trial


@dataclass(slots=True)
class _Reply:
    allowed: bool
    state: State
    before: State
    left_s: float
    reason: str
    raw: list[Any]


class RedisBreakerBoard:
    """:class:`~.breaker.Breakers` over Redis: one circuit per deployment for all replicas.

    ``clock`` (seconds) replaces both the Redis server clock and the local monotonic clock;
    tests use it to step time. Without it, Redis ``TIME`` is the one timeline all replicas share.
    """

    shared = True

    def __init__(
        self,
        client: Redis,
        settings: BreakerSettings | None = None,
        *,
        key_prefix: str = "tokyo-ia:cb:",
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
        retry_after_s: float = 5.0,
        owns_client: bool = False,
    ) -> None:
        self.client = client
        self.settings = settings or BreakerSettings()
        self.key_prefix = key_prefix
        self._clock = clock
        self._local: Clock = clock or time.monotonic
        self._listeners: list[Listener] = list(listeners)
        self._script = client.register_script(_BREAKER_LUA)
        self._views: dict[str, _View] = {}
        self._pending: dict[str, int] = {}
        self._trials: dict[str, deque[str]] = {}
        self._refreshing: set[str] = set()
        self._fallback = BreakerBoard(self.settings, clock=self._local, listeners=listeners)
        self._outage = Outage(log, retry_after_s, clock=self._local)
        self._owns_client = owns_client
        s = self.settings
        ttl_s = max(_TTL_FLOOR_S, 2 * (s.window_s + s.cooldown_s + s.trial_timeout_s))
        self._params: list[int | float] = [
            s.window_s * 1000,
            s.buckets,
            s.min_requests,
            s.failure_ratio,
            s.consecutive_failures,
            s.cooldown_s * 1000,
            s.half_open_max,
            s.trial_timeout_s * 1000,
            int(ttl_s * 1000),
        ]

    @classmethod
    def from_url(
        cls, url: str, *, client_options: dict[str, Any] | None = None, **options: Any
    ) -> RedisBreakerBoard:
        """A board with its own connection pool (fast-failing timeouts), closed by :meth:`close`."""
        return cls(connect(url, **(client_options or {})), owns_client=True, **options)

    @property
    def available(self) -> bool:
        """False while leaving Redis alone after a failure (the in-memory fallback answers)."""
        return self._outage.available

    def key(self, label: str) -> str:
        return f"{self.key_prefix}{{{label}}}"

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)
        self._fallback.add_listener(listener)

    def state(self, label: str) -> State:
        if not self.available:
            return self._fallback.state(label)
        view = self._views.get(label)
        return State.CLOSED if view is None else view.state

    async def allow(self, label: str) -> bool:
        """Answer from the cached view when it is fresh enough; else one atomic round trip."""
        if not self.settings.enabled:
            return True
        now = self._local()
        view = self._views.get(label)
        if view is not None:
            fresh = now - view.fetched < self.settings.cache_s
            if view.state is State.CLOSED and (fresh or label in self._refreshing):
                return True
            if fresh and (view.trials_full or (view.state is State.OPEN and now < view.open_until)):
                return False
        if not self.available:
            return await self._fallback.allow(label)
        member = uuid.uuid4().hex
        self._refreshing.add(label)
        try:
            reply = await self._call(label, "allow", member=member)
        finally:
            self._refreshing.discard(label)
        if reply is None:
            return await self._fallback.allow(label)
        if reply.allowed and reply.state is State.HALF_OPEN:
            self._trials.setdefault(label, deque()).append(member)
        return reply.allowed

    async def record(self, label: str, error: BaseException | None, latency_s: float = 0.0) -> None:
        if not self.settings.enabled:
            return
        slow = self.settings.slow_call_s
        if error is None and not (slow is not None and latency_s > slow):
            await self._success(label)
        elif error is None or counts_as_failure(error):
            kind = "slow" if error is None else failure_kind(error)
            await self._op(label, "failure", kind, member=self._pop_trial(label))
        else:
            member = self._pop_trial(label)
            if member:
                await self._op(label, "release", "", member=member)

    async def _success(self, label: str) -> None:
        """Count a closed circuit's success locally (flushed later); otherwise report it now."""
        trial = self._pop_trial(label)
        if self.available and not trial and self.state(label) is State.CLOSED:
            self._pending[label] = self._pending.get(label, 0) + 1
            return
        await self._op(label, "success", "", member=trial)  # the fallback's while Redis is away

    async def trip(self, label: str, reason: str) -> None:
        if self.settings.enabled:
            await self._op(label, "trip", reason)

    async def probe_ok(self, label: str, reason: str = "active check passed") -> None:
        if self.settings.enabled:
            await self._op(label, "probe_ok", reason)

    async def snapshot(self, labels: Iterable[str] = ()) -> dict[str, JSON]:
        """The shared state of every label this replica used plus ``labels`` (one call each)."""
        out: dict[str, JSON] = {}
        for label in dict.fromkeys([*self._views, *self._fallback.labels(), *labels]):
            reply = await self._call(label, "peek") if self.available else None
            if reply is None:
                out[label] = {**self._fallback.get(label).snapshot(), "shared": False}
                continue
            consec, ok, bad, t_closed, t_open, t_half, in_state = reply.raw[5:12]
            spent = {"closed": float(t_closed), "open": float(t_open), "half_open": float(t_half)}
            spent[reply.state.value] += float(in_state)
            out[label] = {
                "state": reply.state.value,
                "in_state_s": round(float(in_state) / 1000, 3),
                "time_in_state_s": {k: round(v / 1000, 3) for k, v in spent.items()},
                "reason": reply.reason,
                "consecutive_failures": int(consec),
                "window": {"requests": int(ok) + int(bad), "failures": int(bad)},
                "shared": True,
            }
        return out

    async def close(self) -> None:
        """Flush locally counted successes, then close the pool if this board opened it."""
        for label in [label for label, n in self._pending.items() if n]:
            await self._call(label, "peek")
        if self._owns_client:
            await self.client.aclose()

    def _pop_trial(self, label: str) -> str:
        trials = self._trials.get(label)
        return trials.popleft() if trials else ""

    async def _op(self, label: str, op: str, note: str, member: str = "") -> None:
        """Run one state-changing op, in Redis or (while it is down) on the fallback."""
        reply = await self._call(label, op, note, member) if self.available else None
        if reply is not None:
            return
        if op == "failure":
            self._fallback.get(label).record_failure(note)
        elif op == "success":
            self._fallback.get(label).record_success()
        elif op == "release":
            self._fallback.get(label).release()
        elif op == "trip":
            self._fallback.get(label).trip(note)
        elif op == "probe_ok":
            self._fallback.get(label).probe_ok(note)

    async def _call(self, label: str, op: str, note: str = "", member: str = "") -> _Reply | None:
        """One script call; updates the cached view and tells listeners what changed."""
        pending = self._pending.pop(label, 0)
        args: list[str | int | float] = [now_ms(self._clock), op, pending, member, note, *self._params]
        try:
            raw = await self._script(keys=[self.key(label), self.key(label) + ":trials"], args=args)
        except RedisError as exc:
            self._failed(exc)
            return None
        reply = _decode(raw)
        now = self._local()
        previous = self.state(label)
        full = op == "allow" and not reply.allowed and reply.state is State.HALF_OPEN
        self._views[label] = _View(reply.state, now, now + reply.left_s, full)
        if previous is not reply.before:
            notify(self._listeners, Transition(label, previous, reply.before, reply.reason, now, "remote"))
        if reply.before is not reply.state:
            notify(self._listeners, Transition(label, reply.before, reply.state, reply.reason, now))
        return reply

    def _failed(self, exc: BaseException) -> None:
        self._outage.failed("circuit breakers: Redis unavailable, using per-replica breakers", exc)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(raw: list[Any]) -> _Reply:
    return _Reply(
        allowed=bool(int(raw[0])),
        state=State(_text(raw[1])),
        before=State(_text(raw[2])),
        left_s=float(_text(raw[3])) / 1000,
        reason=_text(raw[4]),
        raw=[_text(v) for v in raw],
    )

"""The Redis client every shared-state component uses (limits, breakers, probes, cache).

One client (one connection pool) per process: the gateway opens it once and hands it to each
component. Timeouts fail fast and there is a single immediate retry, because every caller
degrades when Redis is away (admit, fall back to in-memory state, treat as a cache miss) and
redis-py's default retries would add seconds to every request during an outage.
Imported only when ``redis.url`` is set, so a gateway without Redis never loads redis-py.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def connect(url: str, **overrides: Any) -> Redis:
    """A client with fast-failing timeouts; ``overrides`` are redis-py ``from_url`` options."""
    options: dict[str, Any] = {
        "socket_timeout": 0.5,
        "socket_connect_timeout": 0.5,
        "retry": Retry(NoBackoff(), 1),
        **overrides,
    }
    return Redis.from_url(url, **options)


NOW_LUA = """
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
"""
"""Lua preamble shared by the scripts: ``ARGV[1]`` is "now" in ms, or -1 for the Redis ``TIME``."""


def now_ms(clock: Callable[[], float] | None) -> float:
    """``ARGV[1]`` for a :data:`NOW_LUA` script: ``clock()`` in ms, or -1 (Redis server time)."""
    return -1.0 if clock is None else clock() * 1000.0


class Outage:
    """What a component does while Redis is away: skip it for a cool-down, warn sparingly.

    After a failure the component stops trying Redis for ``cooldown_s`` (each request would
    otherwise wait out a timeout) and serves its degraded mode; the warning is logged at most
    every ``warn_every_s`` so an outage does not flood the logs.
    """

    def __init__(
        self,
        logger: logging.Logger,
        cooldown_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        warn_every_s: float = 30.0,
    ) -> None:
        self.logger = logger
        self.cooldown_s = cooldown_s
        self.warn_every_s = warn_every_s
        self._clock = clock
        self._until = -math.inf
        self._last_warning = -math.inf

    @property
    def available(self) -> bool:
        return self._clock() >= self._until

    def failed(self, message: str, exc: BaseException) -> None:
        """Start (or extend) the cool-down and warn: ``message`` says what serving degrades to."""
        self._until = self._clock() + self.cooldown_s
        self.warn(f"{message}: {exc}")

    def warn(self, message: str) -> None:
        now = self._clock()
        if now - self._last_warning >= self.warn_every_s:
            self._last_warning = now
            self.logger.warning("%s", message)

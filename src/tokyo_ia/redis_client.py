"""The Redis client every shared-state component uses (limits, breakers, probes, cache).

One client (one connection pool) per process: the gateway opens it once and hands it to each
component. Timeouts fail fast and there is a single immediate retry, because every caller
degrades when Redis is away (admit, fall back to in-memory state, treat as a cache miss) and
redis-py's default retries would add seconds to every request during an outage.
Imported only when ``redis.url`` is set, so a gateway without Redis never loads redis-py.
"""

from __future__ import annotations

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

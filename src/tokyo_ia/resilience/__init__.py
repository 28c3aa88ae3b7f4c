"""Resilience: rate limits (memory and Redis backends) and client-side provider throttles.

The Redis backend is loaded lazily (``RedisRateLimiter`` below, or ``build_rate_limiter``), so a
gateway that runs without Redis never imports the Redis client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .ratelimit import (
    Decision,
    Limits,
    MemoryRateLimiter,
    RateLimiter,
    build_rate_limiter,
    estimate_tokens,
    format_duration,
    headers,
    parallel_error,
    rate_limit_error,
)
from .throttle import ProviderThrottle

if TYPE_CHECKING:
    from .ratelimit_redis import RedisRateLimiter

__all__ = [
    "Decision",
    "Limits",
    "MemoryRateLimiter",
    "ProviderThrottle",
    "RateLimiter",
    "RedisRateLimiter",
    "build_rate_limiter",
    "estimate_tokens",
    "format_duration",
    "headers",
    "parallel_error",
    "rate_limit_error",
]


def __getattr__(name: str) -> Any:
    if name == "RedisRateLimiter":
        from .ratelimit_redis import RedisRateLimiter

        return RedisRateLimiter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

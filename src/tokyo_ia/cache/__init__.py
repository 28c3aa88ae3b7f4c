"""Response cache and request coalescing.

- :mod:`.keys`      what makes two requests "the same" (the key rule) and per-request control;
- :mod:`.base`      the :class:`Cache` protocol, :class:`CachedEntry`, stream assembly;
- :mod:`.memory`    in-process LRU + TTL, bounded in bytes;
- :mod:`.redis`     shared by every replica, plus cross-replica coalescing;
- :mod:`.coalesce`  in-process coalescing of calls and streams.

The Redis backend is loaded lazily (``RedisCache``/``RedisCoalescer`` below, or
:func:`build_cache`): importing redis-py costs ~0.3 s of start-up, which a gateway without
Redis should not pay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import CacheConfig
from ..errors import ConfigError
from .base import COMPRESS_OVER, Cache, CachedEntry, CacheStats, assemble_stream, decode_entry, encode_entry
from .coalesce import Coalescer, StreamLaggedError
from .keys import IGNORED_FIELDS, CacheControl, cache_control, cache_key, strip_cache_field
from .memory import MemoryCache

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from .redis import RedisCache, RedisCoalescer

__all__ = [
    "COMPRESS_OVER",
    "IGNORED_FIELDS",
    "Cache",
    "CacheControl",
    "CacheStats",
    "CachedEntry",
    "Coalescer",
    "MemoryCache",
    "RedisCache",
    "RedisCoalescer",
    "StreamLaggedError",
    "assemble_stream",
    "build_cache",
    "build_coalescer",
    "cache_control",
    "cache_key",
    "decode_entry",
    "encode_entry",
    "strip_cache_field",
]


def build_cache(config: CacheConfig | None, redis: Redis | None) -> Cache | None:
    """The cache the config asks for (Redis on the gateway's shared client); None without a
    ``cache`` section."""
    if config is None:
        return None
    if config.backend == "memory":
        return MemoryCache(config.max_bytes)
    if redis is None:
        raise ConfigError(
            "cache.backend is 'redis' but redis.url is not set; set redis.url "
            "(e.g. redis://127.0.0.1:6379/0) or use cache.backend: memory"
        )
    from .redis import RedisCache

    return RedisCache(redis)


def build_coalescer(config: CacheConfig | None, cache: Cache | None) -> Coalescer | RedisCoalescer | None:
    """Coalescing across replicas when the cache is in Redis, within the process otherwise."""
    if config is None or not config.coalesce:
        return None
    if cache is not None and config.backend == "redis":
        from .redis import RedisCache, RedisCoalescer

        if isinstance(cache, RedisCache):
            return RedisCoalescer(cache)
    return Coalescer()


def __getattr__(name: str) -> Any:
    if name in ("RedisCache", "RedisCoalescer"):
        from . import redis

        return getattr(redis, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

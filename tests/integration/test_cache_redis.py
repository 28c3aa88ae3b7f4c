"""The Redis cache and cross-replica coalescing against a real Redis: round trips, expiry,
isolation by prefix, counters shared by replicas, degradation to a miss when Redis is down,
and two OS processes asking for the same answer at once making exactly one upstream call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from tests.fakes.base import free_port
from tests.integration.conftest_redis import (
    REDIS_URL,
    delete_prefix,
    run_replicas,
    unique_prefix,
)
from tokyo_ia.cache import CachedEntry, RedisCache, RedisCoalescer
from tokyo_ia.errors import UpstreamError


def _entry(text: str = "Hello!", total: int = 9) -> CachedEntry:
    response = {
        "id": "chatcmpl-redis",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": total - 1, "total_tokens": total},
    }
    return CachedEntry.of(response, provider="demo", model="m")


@pytest.fixture
async def prefix(redis_client: Redis) -> AsyncIterator[str]:
    value = unique_prefix("cache")
    yield value
    await delete_prefix(redis_client, value)


@pytest.fixture
async def cache(redis_client: Redis, prefix: str) -> AsyncIterator[RedisCache]:
    c = RedisCache(redis_client, key_prefix=prefix)
    yield c
    await c.close()


async def test_set_get_delete_roundtrip(cache: RedisCache, redis_client: Redis, prefix: str) -> None:
    assert await cache.get("k") is None
    small, large = _entry(), _entry("lorem ipsum " * 2000)
    await cache.set("k", small, ttl_s=60)
    await cache.set("big", large, ttl_s=60)
    assert await cache.get("k") == small
    assert await cache.get("big") == large
    stored = await redis_client.get(cache.entry_key("big"))
    assert stored is not None
    assert stored[:1] == b"z"
    assert len(stored) < 4096  # compressed
    assert 59_000 < await redis_client.pttl(cache.entry_key("k")) <= 60_000
    await cache.delete("k")
    assert await cache.get("k") is None
    keys = {key.decode() async for key in redis_client.scan_iter(match=f"{prefix}*")}
    assert cache.entry_key("big") in keys
    assert keys <= {cache.entry_key("big"), cache.stats_key}


async def test_entries_expire(cache: RedisCache) -> None:
    await cache.set("k", _entry(), ttl_s=0.15)
    assert await cache.get("k") is not None
    await asyncio.sleep(0.3)
    assert await cache.get("k") is None


async def test_no_leakage_between_keys_or_prefixes(
    redis_client: Redis, cache: RedisCache, prefix: str
) -> None:
    other = RedisCache(redis_client, key_prefix=prefix + "other:")
    await cache.set("k", _entry("mine"), ttl_s=60)
    assert await cache.get("k2") is None
    assert await other.get("k") is None
    await other.set("k", _entry("theirs"), ttl_s=60)
    hit = await cache.get("k")
    assert hit is not None
    assert hit.response["choices"][0]["message"]["content"] == "mine"
    await other.close()


@pytest.fixture
async def second_client() -> AsyncIterator[Redis]:
    """Another connection pool, as another replica would have."""
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


async def test_counters_are_shared_by_replicas(
    redis_client: Redis, second_client: Redis, prefix: str
) -> None:
    a = RedisCache(redis_client, key_prefix=prefix)
    b = RedisCache(second_client, key_prefix=prefix, flush_interval_s=0.0)
    await a.set("k", _entry(total=9), ttl_s=60)
    assert await b.get("k") is not None  # one replica stores, another hits
    assert await b.get("missing") is None
    await a.get("k")
    await b.flush()
    stats_a = await a.stats()  # flushes a's own deltas first
    assert (stats_a.hits, stats_a.misses, stats_a.stores) == (1, 0, 1)
    assert stats_a.cluster is not None
    assert (stats_a.cluster.hits, stats_a.cluster.misses, stats_a.cluster.stores) == (2, 1, 1)
    assert stats_a.cluster.tokens_saved == 18
    assert stats_a.to_dict()["cluster"]["hit_ratio"] == pytest.approx(2 / 3, abs=1e-6)
    stats_b = await b.stats()
    assert (stats_b.hits, stats_b.misses) == (1, 1)
    assert stats_b.cluster == stats_a.cluster


async def test_unreadable_entries_are_misses(cache: RedisCache, redis_client: Redis) -> None:
    await redis_client.set(cache.entry_key("k"), b"z-garbage")
    assert await cache.get("k") is None
    assert (await cache.stats()).errors == 1


async def test_redis_down_is_a_miss_not_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    dead = RedisCache.from_url(f"redis://127.0.0.1:{free_port()}/0")
    with caplog.at_level(logging.WARNING, logger="tokyo_ia.cache"):
        assert await dead.get("k") is None
        await dead.set("k", _entry(), ttl_s=60)
        assert await dead.get("k") is None  # cooling down: Redis not even tried
        await dead.delete("k")
        stats = await dead.stats()
    assert stats.cluster is None
    assert (stats.misses, stats.errors) == (2, 1)
    assert len([r for r in caplog.records if "Redis unavailable" in r.getMessage()]) == 1
    await dead.close()


# --- coalescing across replicas ---------------------------------------------------------------


class Upstream:
    def __init__(self, cache: RedisCache, key: str, *, store: bool = True, fail: bool = False) -> None:
        self.cache, self.key, self.store, self.fail = cache, key, store, fail
        self.calls = 0
        self.release = asyncio.Event()

    async def __call__(self) -> CachedEntry:
        self.calls += 1
        await self.release.wait()
        if self.fail:
            raise UpstreamError("upstream failed", provider="demo")
        entry = _entry(f"answer {self.calls}")
        if self.store:
            await self.cache.set(self.key, entry, ttl_s=60)
        return entry


@pytest.fixture
async def replicas(
    redis_client: Redis, second_client: Redis, prefix: str
) -> tuple[RedisCoalescer, RedisCoalescer]:
    a = RedisCoalescer(RedisCache(redis_client, key_prefix=prefix), poll_min_s=0.005, poll_max_s=0.02)
    b = RedisCoalescer(RedisCache(second_client, key_prefix=prefix), poll_min_s=0.005, poll_max_s=0.02)
    return a, b


async def test_a_second_replica_waits_for_the_first(replicas: tuple[RedisCoalescer, RedisCoalescer]) -> None:
    a, b = replicas
    up_a, up_b = Upstream(a.cache, "k"), Upstream(b.cache, "k")
    first = [asyncio.create_task(a.run("k", up_a)) for _ in range(3)]
    await asyncio.sleep(0.05)
    second = [asyncio.create_task(b.run("k", up_b)) for _ in range(3)]
    await asyncio.sleep(0.05)
    up_a.release.set()
    results = await asyncio.gather(*first, *second)
    assert (up_a.calls, up_b.calls) == (1, 0)
    assert {r.response["choices"][0]["message"]["content"] for r in results} == {"answer 1"}
    assert a.stats()["led"] == 1
    assert b.stats()["coalesced_remote"] == 1
    assert b.stats()["coalesced"] == 3
    assert await a.cache.client.exists(a.cache.lock_key("k")) == 0


@pytest.mark.parametrize("failure", ["raises", "not stored"])
async def test_a_waiter_takes_over_when_the_leader_leaves_no_entry(
    replicas: tuple[RedisCoalescer, RedisCoalescer], failure: str
) -> None:
    a, b = replicas
    up_a = Upstream(a.cache, "k", fail=failure == "raises", store=False)
    up_b = Upstream(b.cache, "k")
    up_b.release.set()
    leader = asyncio.create_task(a.run("k", up_a))
    await asyncio.sleep(0.05)
    waiter = asyncio.create_task(b.run("k", up_b))
    await asyncio.sleep(0.05)
    up_a.release.set()
    if failure == "raises":
        with pytest.raises(UpstreamError):
            await leader
    else:
        await leader
    assert (await waiter).response["choices"][0]["message"]["content"] == "answer 1"
    assert (up_a.calls, up_b.calls) == (1, 1)


async def test_a_waiter_gives_up_after_wait_s(redis_client: Redis, prefix: str) -> None:
    cache = RedisCache(redis_client, key_prefix=prefix)
    co = RedisCoalescer(cache, wait_s=0.1, poll_min_s=0.01)
    await redis_client.set(cache.lock_key("k"), "someone-else", px=10_000)
    upstream = Upstream(cache, "k")
    upstream.release.set()
    assert (await co.run("k", upstream)).response["choices"][0]["message"]["content"] == "answer 1"
    assert co.stats()["fallbacks"] == 1


async def test_redis_down_means_each_replica_calls_upstream() -> None:
    cache = RedisCache.from_url(f"redis://127.0.0.1:{free_port()}/0")
    co = RedisCoalescer(cache)
    upstream = Upstream(cache, "k")
    upstream.release.set()
    await co.run("k", upstream)
    await co.run("k", upstream)
    assert upstream.calls == 2
    assert co.stats()["fallbacks"] == 2
    await cache.close()


_REPLICA = """
import asyncio, sys
from redis.asyncio import Redis
from tokyo_ia.cache import CachedEntry, RedisCache, RedisCoalescer

async def main(url, prefix):
    client = Redis.from_url(url)
    cache = RedisCache(client, key_prefix=prefix)
    co = RedisCoalescer(cache, poll_min_s=0.005, poll_max_s=0.05, wait_s=10)

    async def upstream():
        await client.incr(prefix + "upstream-calls")
        await asyncio.sleep(0.3)
        entry = CachedEntry.of({"id": "chatcmpl-x", "object": "chat.completion", "choices": []})
        await cache.set("same-key", entry, ttl_s=60)
        return entry

    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    results = await asyncio.gather(*(co.run("same-key", upstream) for _ in range(5)))
    stats = co.stats()
    print(len(results), stats["led"], stats["coalesced"], flush=True)
    await cache.close()
    await client.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_two_processes_make_exactly_one_upstream_call(redis_client: Redis, prefix: str) -> None:
    outputs = await run_replicas(_REPLICA, REDIS_URL, prefix, step_timeout_s=15)
    lines = sorted(out.decode().split() for out in outputs)
    assert lines == [["5", "0", "5"], ["5", "1", "4"]]  # one process led once; every other request waited
    assert await redis_client.get(prefix + "upstream-calls") == b"1"

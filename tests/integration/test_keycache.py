"""The key cache over a real database: TTLs, invalidation, negative caching, bounds.

Time is a fake monotonic clock, so no test sleeps. "Another replica" is a second
KeyService on the same database whose changes this process's cache is not told about.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.support import FakeClock
from tokyo_ia.errors import AuthenticationError
from tokyo_ia.security.auth import digest
from tokyo_ia.security.keycache import KeyCache
from tokyo_ia.security.keys import KEY_PREFIX, KeyRecord, KeyService


class CountingService(KeyService):
    """A real KeyService that counts the database lookups made for authentication."""

    lookups = 0

    async def lookup(self, key_hash: str) -> KeyRecord | None:
        self.lookups += 1
        return await super().lookup(key_hash)


@pytest.fixture
def service(sessions: async_sessionmaker[AsyncSession]) -> CountingService:
    return CountingService(sessions)


@pytest.fixture
def other_replica(sessions: async_sessionmaker[AsyncSession]) -> KeyService:
    return KeyService(sessions)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(service: CountingService, clock: FakeClock) -> KeyCache:
    return KeyCache(service, ttl_s=5.0, negative_ttl_s=1.0, clock=clock)


async def test_a_known_key_is_read_once_per_ttl(
    cache: KeyCache, service: CountingService, clock: FakeClock
) -> None:
    plaintext, record = await service.create("a")
    for _ in range(5):
        principal = await cache.authenticate(plaintext)
        assert principal is not None
        assert principal.key_id == record.id
    assert service.lookups == 1
    assert cache.hits == 4
    clock.now += 5.01
    await cache.authenticate(plaintext)
    assert service.lookups == 2


async def test_a_change_in_this_process_takes_effect_at_once(
    cache: KeyCache, service: CountingService
) -> None:
    plaintext, record = await service.create("a")
    assert await cache.authenticate(plaintext) is not None
    await service.update(record.id, enabled=False)
    with pytest.raises(AuthenticationError) as info:
        await cache.authenticate(plaintext)
    assert info.value.code == "key_disabled"
    await service.update(record.id, enabled=True)
    assert await cache.authenticate(plaintext) is not None
    await service.revoke(record.id)
    with pytest.raises(AuthenticationError, match="revoked"):
        await cache.authenticate(plaintext)


async def test_a_revocation_on_another_replica_takes_effect_within_the_ttl(
    cache: KeyCache, service: CountingService, other_replica: KeyService, clock: FakeClock
) -> None:
    plaintext, record = await service.create("a")
    assert await cache.authenticate(plaintext) is not None
    await other_replica.revoke(record.id)
    clock.now += 4.9
    assert await cache.authenticate(plaintext) is not None  # the documented window
    clock.now += 0.2
    with pytest.raises(AuthenticationError) as info:
        await cache.authenticate(plaintext)
    assert info.value.code == "key_revoked"
    with pytest.raises(AuthenticationError):  # the refusal is cached too
        await cache.authenticate(plaintext)
    assert service.lookups == 2


async def test_explicit_invalidation_and_clear(
    cache: KeyCache, service: CountingService, other_replica: KeyService
) -> None:
    plaintext, record = await service.create("a")
    await cache.authenticate(plaintext)
    await other_replica.update(record.id, rpm=3)
    cache.invalidate(digest(plaintext))
    principal = await cache.authenticate(plaintext)
    assert principal is not None
    assert principal.rpm == 3
    cache.clear()
    assert len(cache) == 0
    await cache.authenticate(plaintext)
    assert service.lookups == 3


async def test_unknown_keys_are_remembered_for_one_second(
    cache: KeyCache, service: CountingService, other_replica: KeyService, clock: FakeClock
) -> None:
    garbage = KEY_PREFIX + "x" * 43
    for _ in range(100):
        assert await cache.authenticate(garbage) is None
    assert service.lookups == 1
    clock.now += 1.01
    assert await cache.authenticate(garbage) is None
    assert service.lookups == 2


async def test_tokens_that_are_not_virtual_keys_never_reach_the_database(
    cache: KeyCache, service: CountingService
) -> None:
    for token in ("", "sk-proj-abc", "Bearer sk-tia-", KEY_PREFIX + "x" * 500):
        assert await cache.authenticate(token) is None
    assert service.lookups == 0


async def test_a_key_created_on_another_replica_works_here_at_once(
    cache: KeyCache, other_replica: KeyService
) -> None:
    plaintext, _ = await other_replica.create("new")
    assert await cache.authenticate(plaintext) is not None


async def test_size_is_bounded_and_garbage_cannot_evict_real_keys(
    service: CountingService, clock: FakeClock
) -> None:
    cache = KeyCache(service, max_entries=2, max_negative=3, clock=clock)
    plains = [(await service.create(f"k{i}"))[0] for i in range(3)]
    for p in plains:
        await cache.authenticate(p)
    for i in range(10):
        await cache.authenticate(KEY_PREFIX + f"{i:043d}")
    assert len(cache) == 2 + 3
    lookups = service.lookups
    await cache.authenticate(plains[2])  # newest real key still cached despite the garbage flood
    assert service.lookups == lookups
    await cache.authenticate(plains[0])  # oldest was evicted by the size bound
    assert service.lookups == lookups + 1


async def test_concurrent_misses_share_one_query(cache: KeyCache, service: CountingService) -> None:
    plaintext, _ = await service.create("a")
    results = await asyncio.gather(*(cache.authenticate(plaintext) for _ in range(20)))
    assert all(r is not None for r in results)
    assert service.lookups == 1

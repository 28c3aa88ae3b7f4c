"""Rate limiting against a real Redis: same semantics as memory, atomic across OS processes,
no leaked keys or concurrency slots (cancellation, crashed replicas)."""

from __future__ import annotations

import asyncio
import sys
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
from tests.support import FakeClock
from tokyo_ia.errors import RateLimitError
from tokyo_ia.resilience import Decision, Limits, MemoryRateLimiter, RedisRateLimiter
from tokyo_ia.resilience.admission import Admission
from tokyo_ia.security.auth import Principal


@pytest.fixture
async def prefix(redis_client: Redis) -> AsyncIterator[str]:
    value = unique_prefix("ratelimit")
    yield value
    await delete_prefix(redis_client, value)


@pytest.fixture
async def limiter(redis_client: Redis, prefix: str) -> AsyncIterator[RedisRateLimiter]:
    rl = RedisRateLimiter(redis_client, key_prefix=prefix)
    yield rl
    await rl.close()


def _comparable(d: Decision) -> tuple[object, ...]:
    return (
        d.allowed,
        d.refused_by,
        d.remaining_requests,
        d.remaining_tokens,
        round(d.reset_requests, 3),
        round(d.reset_tokens, 3),
        None if d.retry_after is None else round(d.retry_after, 3),
    )


async def test_same_decisions_as_the_memory_backend(redis_client: Redis, prefix: str) -> None:
    """One scripted timeline, both backends, identical answers (GCRA mirrored in Lua)."""
    clock = FakeClock()
    memory = MemoryRateLimiter(clock=clock)
    redis_rl = RedisRateLimiter(redis_client, key_prefix=prefix, clock=clock)
    limits = Limits(rpm=5, tpm=1000)
    # (seconds to advance, action, tokens)
    steps = [(0, "acquire", 100)] * 6 + [
        (0, "acquire", 2000),
        (0, "charge", 700),
        (11.9, "acquire", 10),
        (0.2, "acquire", 10),
        (0, "charge", -300),
        (0, "acquire", 300),
        (30, "acquire", 900),
        (0, "charge", 10**7),
        (1, "acquire", 0),
        (0, "refund", 400),
        (0, "acquire", 500),
        (0, "refund", 10**7),  # never fuller than full
        (0, "acquire", 1000),
        (500, "acquire", 1000),
        (0, "refund", 1000),
    ]
    for advance, action, tokens in steps:
        clock.now += advance
        if action == "charge":
            await memory.add_tokens("key:a", limits, tokens)
            await redis_rl.add_tokens("key:a", limits, tokens)
            continue
        if action == "refund":
            await memory.refund("key:a", limits, tokens)
            await redis_rl.refund("key:a", limits, tokens)
            continue
        expected = await memory.acquire("key:a", limits, tokens)
        got = await redis_rl.acquire("key:a", limits, tokens)
        assert _comparable(got) == _comparable(expected), (advance, tokens)


async def test_admission_gives_the_same_answers_as_with_memory(redis_client: Redis, prefix: str) -> None:
    """Admission awaits Redis scope by scope; with memory it uses plain calls: same results."""
    clock = FakeClock()
    memory = Admission(MemoryRateLimiter(clock=clock), Limits(rpm=4))
    shared = Admission(RedisRateLimiter(redis_client, key_prefix=prefix, clock=clock), Limits(rpm=4))
    # "c" has room when the global limit refuses it: both give its request back to its scope.
    keys = [Principal("a", "a", rpm=3, tpm=1000), Principal("b", "b"), Principal("c", "c", rpm=2, tpm=5000)]
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}]}
    for i in range(10):
        clock.now += 4 * (i % 3)
        answers: list[object] = []
        for admission in (memory, shared):
            try:
                admitted = await admission.admit(keys[i % 3], body)
            except RateLimitError as exc:
                answers.append((exc.message, exc.headers))
            else:
                answers.append(admitted.headers())
                await admitted.release()
                await admission.settle(admitted, {"total_tokens": admitted.tokens + 150})
        assert answers[0] == answers[1], i


async def test_limits_and_retry_after(limiter: RedisRateLimiter) -> None:
    limits = Limits(rpm=3)
    assert [(await limiter.acquire("key:a", limits)).allowed for _ in range(4)] == [True, True, True, False]
    refused = await limiter.acquire("key:a", limits)
    assert refused.refused_by == "requests"
    assert refused.retry_after is not None
    assert 19.0 < refused.retry_after <= 20.0
    assert (await limiter.acquire("key:b", limits)).allowed
    oversized = await limiter.acquire("key:a", Limits(tpm=10), tokens=11)
    assert oversized.oversized


async def test_keys_expire_once_the_bucket_is_full(limiter: RedisRateLimiter, redis_client: Redis) -> None:
    await limiter.acquire("key:ttl", Limits(rpm=10))
    ttl = await redis_client.pttl(limiter.key("key:ttl"))
    assert 5_000 < ttl <= 6_002  # full again after one step of 60/10 s
    await limiter.add_tokens("key:ttl", Limits(tpm=1000), 1000)
    ttl = await redis_client.pttl(limiter.key("key:ttl"))
    assert 59_000 < ttl <= 60_002


async def test_parallel_slots(limiter: RedisRateLimiter) -> None:
    async with limiter.parallel("key:p", 2), limiter.parallel("key:p", 2):
        assert await limiter.in_flight("key:p") == 2
        with pytest.raises(RateLimitError, match="concurrency limit of 2") as info:
            async with limiter.parallel("key:p", 2):
                pass
        assert info.value.code == "concurrency_limit_exceeded"
    assert await limiter.in_flight("key:p") == 0


async def test_parallel_slot_released_on_cancellation(limiter: RedisRateLimiter) -> None:
    entered = asyncio.Event()

    async def hold() -> None:
        async with limiter.parallel("key:c", 1):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(hold())
    await entered.wait()
    assert await limiter.in_flight("key:c") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await limiter.in_flight("key:c") == 0
    async with limiter.parallel("key:c", 1):
        pass


async def test_parallel_lease_is_renewed_while_held(redis_client: Redis, prefix: str) -> None:
    limiter = RedisRateLimiter(redis_client, key_prefix=prefix, lease_s=0.3)
    async with limiter.parallel("key:r", 1):
        await asyncio.sleep(0.8)  # well past one lease
        with pytest.raises(RateLimitError):
            async with limiter.parallel("key:r", 1):
                pass
    assert await limiter.in_flight("key:r") == 0


_HOLD_AND_WAIT = """
import asyncio, sys
from tokyo_ia.resilience import RedisRateLimiter

async def main():
    limiter = RedisRateLimiter.from_url(sys.argv[1], key_prefix=sys.argv[2], lease_s=0.5)
    async with limiter.parallel("key:crash", 1):
        print("held", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_slots_of_a_crashed_replica_expire(limiter: RedisRateLimiter, prefix: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLD_AND_WAIT, REDIS_URL, prefix, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"held\n"
    finally:
        proc.kill()  # SIGKILL: no finally blocks, no release
        await proc.wait()
    with pytest.raises(RateLimitError):
        async with limiter.parallel("key:crash", 1):
            pass
    await asyncio.sleep(0.6)
    async with limiter.parallel("key:crash", 1):
        pass


_FIRE_TEN = """
import asyncio, sys, time
from tokyo_ia.resilience import Limits, RedisRateLimiter

async def main():
    limiter = RedisRateLimiter.from_url(sys.argv[1], key_prefix=sys.argv[2])
    await limiter.client.ping()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    start = time.perf_counter()
    decisions = await asyncio.gather(*(limiter.acquire("key:shared", Limits(rpm=10)) for _ in range(10)))
    print(sum(d.allowed for d in decisions), f"{time.perf_counter() - start:.4f}", flush=True)
    await limiter.close()

asyncio.run(main())
"""


async def test_two_processes_share_one_limit(limiter: RedisRateLimiter, prefix: str) -> None:
    """rpm=10, two OS processes fire 10 requests each at the same moment: exactly 10 pass."""
    outputs = await run_replicas(_FIRE_TEN, REDIS_URL, prefix, step_timeout_s=10)
    allowed = [int(out.split()[0]) for out in outputs]
    print(f"two processes, rpm=10, 10 requests each: allowed per process {allowed}, total {sum(allowed)}")
    assert sum(allowed) == 10
    assert not (await limiter.acquire("key:shared", Limits(rpm=10))).allowed


async def test_fails_open_and_backs_off_when_redis_is_down() -> None:
    limiter = RedisRateLimiter.from_url(f"redis://127.0.0.1:{free_port()}/15")
    try:
        assert limiter.available
        assert (await limiter.acquire("key:a", Limits(rpm=1))).allowed
        assert not limiter.available  # the next requests skip Redis instead of timing out again
        assert (await limiter.acquire("key:a", Limits(rpm=1))).allowed
        await limiter.add_tokens("key:a", Limits(tpm=1), 10)
        async with limiter.parallel("key:a", 1), limiter.parallel("key:a", 1):
            pass
    finally:
        await limiter.close()


async def test_parallel_fails_open_when_redis_is_down() -> None:
    limiter = RedisRateLimiter.from_url(f"redis://127.0.0.1:{free_port()}/15")
    try:
        async with limiter.parallel("key:a", 1), limiter.parallel("key:a", 1):
            pass
    finally:
        await limiter.close()

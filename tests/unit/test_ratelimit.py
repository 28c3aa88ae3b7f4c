"""Rate limiting, memory backend: GCRA arithmetic, window edges, tokens, concurrency, headers."""

from __future__ import annotations

import asyncio

import pytest

from tests.support import FakeClock
from tokyo_ia.errors import RateLimitError, UpstreamRateLimitError
from tokyo_ia.resilience import (
    Decision,
    Limits,
    MemoryRateLimiter,
    ProviderThrottle,
    RedisRateLimiter,
    build_rate_limiter,
    estimate_tokens,
    format_duration,
    headers,
    rate_limit_error,
)
from tokyo_ia.resilience.ratelimit import Meter


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> MemoryRateLimiter:
    return MemoryRateLimiter(clock=clock)


async def admitted(limiter: MemoryRateLimiter, scope: str, limits: Limits, n: int, tokens: int = 0) -> int:
    return sum([(await limiter.acquire(scope, limits, tokens)).allowed for _ in range(n)])


# -- requests per minute ------------------------------------------------------------------


async def test_burst_up_to_the_limit_then_refused_with_retry_after(limiter: MemoryRateLimiter) -> None:
    limits = Limits(rpm=3)
    assert await admitted(limiter, "key:a", limits, 3) == 3
    refused = await limiter.acquire("key:a", limits)
    assert not refused.allowed
    assert refused.refused_by == "requests"
    assert refused.retry_after == pytest.approx(20.0)  # one request every 60/3 s
    assert refused.remaining_requests == 0


async def test_scopes_are_independent(limiter: MemoryRateLimiter) -> None:
    limits = Limits(rpm=1)
    assert (await limiter.acquire("key:a", limits)).allowed
    assert (await limiter.acquire("key:b", limits)).allowed
    assert not (await limiter.acquire("key:a", limits)).allowed


async def test_no_double_burst_across_a_minute_boundary(limiter: MemoryRateLimiter, clock: FakeClock) -> None:
    """A fixed window would admit 60 at 0:59.9 and 60 more at 1:00.1; GCRA admits none."""
    limits = Limits(rpm=60)
    clock.now = 59.9
    assert await admitted(limiter, "k", limits, 60) == 60
    clock.now = 60.1
    assert await admitted(limiter, "k", limits, 60) == 0
    clock.now = 60.9  # one step (60/60 s) after the burst
    assert await admitted(limiter, "k", limits, 60) == 1


async def test_refills_continuously(limiter: MemoryRateLimiter, clock: FakeClock) -> None:
    limits = Limits(rpm=60)
    assert await admitted(limiter, "k", limits, 60) == 60
    clock.advance(0.999)
    assert await admitted(limiter, "k", limits, 5) == 0
    clock.advance(0.001)
    assert await admitted(limiter, "k", limits, 5) == 1
    clock.advance(29)
    assert await admitted(limiter, "k", limits, 60) == 29
    clock.advance(120)  # long idle: back to a full burst, never more
    assert await admitted(limiter, "k", limits, 100) == 60


async def test_remaining_and_reset(limiter: MemoryRateLimiter, clock: FakeClock) -> None:
    limits = Limits(rpm=10)
    first = await limiter.acquire("k", limits)
    assert (first.limit_requests, first.remaining_requests) == (10, 9)
    assert first.reset_requests == pytest.approx(6.0)
    for _ in range(9):
        last = await limiter.acquire("k", limits)
    assert last.remaining_requests == 0
    assert last.reset_requests == pytest.approx(60.0)
    clock.advance(6)
    assert (await limiter.acquire("k", limits)).remaining_requests == 0
    clock.advance(12)
    assert (await limiter.acquire("k", limits)).remaining_requests == 1


async def test_unlimited_scope_keeps_no_state(limiter: MemoryRateLimiter) -> None:
    decision = await limiter.acquire("k", Limits(), tokens=10**9)
    assert decision.allowed
    assert headers(decision) == []
    assert len(limiter) == 0


# -- tokens per minute ---------------------------------------------------------------------


async def test_tokens_refuse_without_counting_the_request(limiter: MemoryRateLimiter) -> None:
    limits = Limits(rpm=10, tpm=1000)
    ok = await limiter.acquire("k", limits, tokens=600)
    assert ok.allowed
    assert ok.remaining_tokens == 400
    refused = await limiter.acquire("k", limits, tokens=600)
    assert not refused.allowed
    assert refused.refused_by == "tokens"
    assert refused.retry_after == pytest.approx(12.0)  # 200 tokens at 1000/60 per second
    assert refused.remaining_requests == 9  # the refused request was not counted
    assert (await limiter.acquire("k", limits, tokens=400)).allowed


async def test_request_larger_than_the_whole_tpm_is_oversized(limiter: MemoryRateLimiter) -> None:
    decision = await limiter.acquire("key:app", Limits(tpm=1000), tokens=1001)
    assert decision.oversized
    assert decision.retry_after is None
    error = rate_limit_error(decision)
    assert error.status == 429
    assert error.code == "request_exceeds_tpm"
    assert "retry-after" not in error.headers
    assert "never be admitted" in error.message
    assert "API key 'app'" in error.message


async def test_add_tokens_charges_real_usage(limiter: MemoryRateLimiter, clock: FakeClock) -> None:
    limits = Limits(tpm=600)  # 10 tokens per second
    assert (await limiter.acquire("k", limits, tokens=100)).allowed
    await limiter.add_tokens("k", limits, 500)  # the completion
    refused = await limiter.acquire("k", limits, tokens=10)
    assert refused.refused_by == "tokens"
    assert refused.retry_after == pytest.approx(1.0)
    await limiter.add_tokens("k", limits, -200)  # the estimate was too high
    assert (await limiter.acquire("k", limits, tokens=10)).allowed


async def test_token_debt_is_capped(limiter: MemoryRateLimiter) -> None:
    limits = Limits(tpm=600)
    await limiter.add_tokens("k", limits, 10**9)
    refused = await limiter.acquire("k", limits, tokens=1)
    assert refused.reset_tokens == pytest.approx(120.0)
    assert refused.retry_after == pytest.approx(60.1)


async def test_idle_scopes_are_swept(clock: FakeClock) -> None:
    limiter = MemoryRateLimiter(clock=clock, min_sweep_every=8)
    for i in range(100):
        await limiter.acquire(f"key:{i}", Limits(rpm=10))
    assert len(limiter) <= 100
    clock.advance(6.01)  # every bucket is full again
    for _ in range(200):
        await limiter.acquire("key:busy", Limits(rpm=10))
    assert len(limiter) == 1


# -- concurrency -------------------------------------------------------------------------


async def test_parallel_admits_up_to_the_limit(limiter: MemoryRateLimiter) -> None:
    async with limiter.parallel("key:app", 2), limiter.parallel("key:app", 2):
        with pytest.raises(RateLimitError) as info:
            async with limiter.parallel("key:app", 2):
                pass
        async with limiter.parallel("key:other", 2):
            pass
    error = info.value
    assert error.code == "concurrency_limit_exceeded"
    assert "2 requests in flight" in error.message
    assert "API key 'app'" in error.message
    assert error.headers["retry-after"] == "1"
    async with limiter.parallel("key:app", 1):
        pass


async def test_parallel_slot_released_on_error_and_cancellation(limiter: MemoryRateLimiter) -> None:
    with pytest.raises(ValueError, match="boom"):
        async with limiter.parallel("k", 1):
            raise ValueError("boom")
    entered = asyncio.Event()

    async def hold() -> None:
        async with limiter.parallel("k", 1):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(hold())
    await entered.wait()
    with pytest.raises(RateLimitError):
        async with limiter.parallel("k", 1):
            pass
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with limiter.parallel("k", 1):
        pass


async def test_parallel_none_is_unlimited(limiter: MemoryRateLimiter) -> None:
    async with limiter.parallel("k", None), limiter.parallel("k", None):
        pass


# -- headers and errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (0.0001, "1ms"),
        (0.9996, "1000ms"),
        (1, "1s"),
        (8.64, "8.64s"),
        (59.9996, "1m0s"),
        (61.5, "1m1.5s"),
        (360, "6m0s"),
        (3723, "1h2m3s"),
    ],
)
def test_format_duration_matches_openai(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


async def test_headers_use_openai_names_and_formats(limiter: MemoryRateLimiter) -> None:
    decision = await limiter.acquire("k", Limits(rpm=10, tpm=1000), tokens=100)
    assert headers(decision) == [
        (b"x-ratelimit-limit-requests", b"10"),
        (b"x-ratelimit-remaining-requests", b"9"),
        (b"x-ratelimit-reset-requests", b"6s"),
        (b"x-ratelimit-limit-tokens", b"1000"),
        (b"x-ratelimit-remaining-tokens", b"900"),
        (b"x-ratelimit-reset-tokens", b"6s"),
    ]


async def test_error_says_which_limit_and_when(limiter: MemoryRateLimiter) -> None:
    await limiter.acquire("key:app", Limits(rpm=3))
    await limiter.acquire("key:app", Limits(rpm=3))
    await limiter.acquire("key:app", Limits(rpm=3))
    error = rate_limit_error(await limiter.acquire("key:app", Limits(rpm=3)))
    assert isinstance(error, RateLimitError)
    assert (error.status, error.type, error.code) == (429, "rate_limit_error", "rate_limit_exceeded")
    assert error.message == (
        "rate limit of 3 requests per minute reached for API key 'app' (per-key limit); retry in 20s"
    )
    assert error.retry_after == pytest.approx(20.0)
    assert error.headers["retry-after"] == "20"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"


async def test_plain_calls_match_the_coroutines(clock: FakeClock) -> None:
    """``take``/``charge_tokens`` (admission's hot path) share the state and the arithmetic."""
    a, b = MemoryRateLimiter(clock=clock), MemoryRateLimiter(clock=clock)
    limits = Limits(rpm=4, tpm=1000)
    meter = Meter("key:m", limits)
    for tokens, charged in [(100, 0), (300, 400), (50, -100), (10, 0), (900, 0), (1, 0)]:
        expected = await a.acquire("key:m", limits, tokens)
        outcome = b.take("key:m", limits, tokens)
        assert meter.decision(tokens, outcome) == expected
        assert meter.headers(outcome) == headers(expected)
        await a.add_tokens("key:m", limits, charged)
        b.charge_tokens("key:m", limits, charged)
        clock.advance(2)
    assert not expected.allowed  # the sequence did reach a refusal


def test_error_for_global_token_limit() -> None:
    decision = Decision(
        allowed=False,
        scope="global",
        limit_tokens=1000,
        remaining_tokens=50,
        reset_tokens=57.0,
        retry_after=3.0,
        refused_by="tokens",
        tokens=100,
    )
    error = rate_limit_error(decision)
    assert "1000 tokens per minute (this request needs ~100, 50 left)" in error.message
    assert "global limit" in error.message
    assert "retry in 3s" in error.message
    assert error.headers["retry-after"] == "3"


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError, match=r"Limits\.rpm must be >= 1"):
        Limits(rpm=0)


def test_estimate_tokens() -> None:
    chat = {
        "messages": [{"role": "user", "content": "x" * 400}, {"role": "user", "content": [{"text": "abcd"}]}]
    }
    assert estimate_tokens(chat) == 101 + 8
    assert estimate_tokens({"input": ["abcd", "efgh"]}) == 2
    assert estimate_tokens({"input": [[1, 2, 3]]}) == 3
    odd = {"messages": ["text", None, {"content": None}, {"content": "abcd"}]}
    assert estimate_tokens(odd) == 1 + 16  # only message contents count, every message costs 4


# -- provider throttle -----------------------------------------------------------------------


@pytest.fixture
def throttle(clock: FakeClock) -> ProviderThrottle:
    return ProviderThrottle("openai", rpm=60, tpm=6000, clock=clock, sleep=clock.sleep)


async def test_throttle_waits_briefly_when_a_slot_frees_soon(
    throttle: ProviderThrottle, clock: FakeClock
) -> None:
    start = clock.now
    for _ in range(60):
        await throttle.wait_or_fail(max_wait_s=0)
    assert clock.now == start
    await throttle.wait_or_fail(max_wait_s=2)
    assert clock.now - start == pytest.approx(1.0)


async def test_throttle_fails_fast_when_the_wait_is_long(
    throttle: ProviderThrottle, clock: FakeClock
) -> None:
    await throttle.wait_or_fail(tokens=6000)
    start = clock.now
    with pytest.raises(UpstreamRateLimitError) as info:
        await throttle.wait_or_fail(tokens=1000, max_wait_s=1)
    assert clock.now == start
    error = info.value
    assert (error.status, error.retryable, error.provider) == (429, True, "openai")
    assert error.retry_after == pytest.approx(10.0)
    assert "providers.openai.tpm" in error.message
    assert error.headers["retry-after"] == "10"


async def test_throttle_refunds_a_cancelled_wait(clock: FakeClock) -> None:
    throttle = ProviderThrottle("p", rpm=60, clock=clock)  # real sleep, so cancellation can land
    for _ in range(60):
        await throttle.wait_or_fail()
    task = asyncio.create_task(throttle.wait_or_fail(max_wait_s=5))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(UpstreamRateLimitError) as info:
        await throttle.wait_or_fail(max_wait_s=0)
    assert info.value.retry_after == pytest.approx(1.0)  # not 2: the cancelled reservation was returned


async def test_throttle_charges_completion_tokens(throttle: ProviderThrottle) -> None:
    throttle.add_tokens(6000)
    with pytest.raises(UpstreamRateLimitError, match="tokens per minute"):
        await throttle.wait_or_fail(tokens=100, max_wait_s=0.5)


async def test_factory_picks_the_backend() -> None:
    assert isinstance(build_rate_limiter(None), MemoryRateLimiter)
    redis_limiter = build_rate_limiter("redis://127.0.0.1:6379/15")
    assert isinstance(redis_limiter, RedisRateLimiter)
    await redis_limiter.close()

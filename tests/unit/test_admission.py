"""The admission stage: per-key then global limits, token estimates only when a TPM needs them."""

from __future__ import annotations

import pytest

from tests.support import FakeClock
from tokyo_ia.errors import RateLimitError
from tokyo_ia.resilience.admission import Admission
from tokyo_ia.resilience.ratelimit import Limits, MemoryRateLimiter, headers
from tokyo_ia.security.auth import Principal

BODY = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}]}


async def test_no_limits_costs_no_estimate_and_no_slots() -> None:
    admitted = await Admission(MemoryRateLimiter(), Limits()).admit(Principal("k1", "a"), BODY)
    assert admitted.tokens == 0
    assert admitted.slots is None
    assert admitted.decision is None
    await admitted.release()


async def test_key_tpm_estimates_and_refuses_over_the_limit() -> None:
    admission = Admission(MemoryRateLimiter(), Limits())
    key = Principal("k2", "b", tpm=150)
    admitted = await admission.admit(key, BODY)
    assert admitted.tokens > 100
    assert admitted.decision is not None and admitted.decision.limit_tokens == 150
    with pytest.raises(RateLimitError, match="tokens per minute"):
        await admission.admit(key, BODY)


async def test_provider_tpm_asks_for_an_estimate_and_parallel_slots_are_released() -> None:
    admission = Admission(MemoryRateLimiter(), Limits(max_parallel=1), estimate=True)
    first = await admission.admit(Principal("k3", "c"), BODY)
    assert first.tokens > 0 and first.slots is not None
    with pytest.raises(RateLimitError, match="concurrency"):
        await admission.admit(Principal("k4", "d"), BODY)
    await first.release()
    second = await admission.admit(Principal("k4", "d"), BODY)
    await second.release()


class _Refusals:
    def __init__(self) -> None:
        self.scopes: list[str] = []

    def observe_rate_limited(self, scope: str) -> None:
        self.scopes.append(scope)


async def test_headers_come_from_the_key_and_match_its_decision() -> None:
    """The plain-call path builds no Decision until asked; both routes give the same headers."""
    admission = Admission(MemoryRateLimiter(clock=FakeClock()), Limits(rpm=100))
    admitted = await admission.admit(Principal("k5", "e", rpm=10, tpm=1000), BODY)
    sent = admitted.headers()
    assert admitted.decision is not None and admitted.decision.scope == "key:k5"
    assert sent == headers(admitted.decision)
    assert dict(sent)[b"x-ratelimit-remaining-requests"] == b"9"
    assert dict(sent)[b"x-ratelimit-remaining-tokens"] == b"%d" % (1000 - admitted.tokens)
    unmetered_key = await admission.admit(Principal("k6", "f"), BODY)  # the global limit's headers
    assert unmetered_key.decision is not None and unmetered_key.decision.scope == "global"
    assert dict(unmetered_key.headers())[b"x-ratelimit-remaining-requests"] == b"98"
    nothing = await Admission(MemoryRateLimiter(), Limits()).admit(Principal("k7", "g"), BODY)
    assert nothing.headers() == []


async def test_refusals_counted_by_scope_and_a_refused_request_counts_nowhere() -> None:
    refusals = _Refusals()
    limiter = MemoryRateLimiter(clock=FakeClock())
    admission = Admission(limiter, Limits(rpm=2), metrics=refusals)  # type: ignore[arg-type]
    key = Principal("k8", "h", rpm=1)
    await admission.admit(key, BODY)
    with pytest.raises(RateLimitError, match="API key 'k8'"):
        await admission.admit(key, BODY)
    await admission.admit(Principal("k9", "i", rpm=5), BODY)
    other = Principal("k10", "j", rpm=5)
    with pytest.raises(RateLimitError, match="global limit") as info:
        await admission.admit(other, BODY)
    assert info.value.retry_after == pytest.approx(30.0)
    assert refusals.scopes == ["key", "global"]
    # The key had room and counted the request; the global refusal made it give it back.
    assert (await limiter.acquire("key:k10", Limits(rpm=5))).remaining_requests == 4


@pytest.mark.parametrize("slots", [False, True], ids=["plain-calls", "with-slots"])
async def test_a_request_the_global_limit_refuses_gives_back_the_keys_request_and_tokens(slots: bool) -> None:
    """Both admission paths: plain calls (memory, no slots) and the backend's coroutines."""
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    admission = Admission(limiter, Limits(rpm=1))
    key = Principal("k12", "l", rpm=10, tpm=10_000, max_parallel=5 if slots else None)
    first = await admission.admit(key, BODY)
    await first.release()
    for _ in range(3):
        with pytest.raises(RateLimitError, match="global limit"):
            await admission.admit(key, BODY)
    decision = await limiter.acquire("key:k12", Limits(rpm=10, tpm=10_000), first.tokens)
    assert decision.remaining_requests == 8  # the first request and this one: the refused gave back
    assert decision.remaining_tokens == 10_000 - 2 * first.tokens
    if slots:
        async with limiter.parallel("key:k12", 1):  # the refused requests hold no slot
            pass


async def test_an_edited_key_gets_its_new_limits() -> None:
    """Per-key limits are kept per Principal; the key cache hands out a new one after an edit."""
    clock = FakeClock()
    admission = Admission(MemoryRateLimiter(clock=clock), Limits())
    before = await admission.admit(Principal("k11", "k", rpm=1), BODY)
    assert before.decision is not None and before.decision.limit_requests == 1
    clock.advance(60)
    after = await admission.admit(Principal("k11", "k", rpm=50), BODY)
    assert after.decision is not None and after.decision.limit_requests == 50


async def test_settle_charges_the_real_usage_to_every_tpm_scope() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock())
    admission = Admission(limiter, Limits(tpm=10_000))
    admitted = await admission.admit(Principal("k12", "l", rpm=10, tpm=1000), BODY)
    await admitted.release()
    await admission.settle(admitted, {"total_tokens": admitted.tokens + 500})
    used = admitted.tokens + 500
    key = await limiter.acquire("key:k12", Limits(rpm=10, tpm=1000))
    assert key.remaining_tokens == 1000 - used
    assert (await limiter.acquire("global", Limits(tpm=10_000))).remaining_tokens == 10_000 - used
    await admission.settle(admitted, None)  # no usage reported: the estimate stands
    assert (await limiter.acquire("global", Limits(tpm=10_000))).remaining_tokens == 10_000 - used

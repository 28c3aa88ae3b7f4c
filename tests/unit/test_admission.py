"""The admission stage: per-key then global limits, token estimates only when a TPM needs them."""

from __future__ import annotations

import pytest

from tokyo_ia.errors import RateLimitError
from tokyo_ia.resilience.admission import Admission
from tokyo_ia.resilience.ratelimit import Limits, MemoryRateLimiter
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

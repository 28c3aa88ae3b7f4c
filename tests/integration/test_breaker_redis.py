"""Circuit state and probe leases shared through a real Redis, as several replicas see them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import ClassVar

import pytest
from redis.asyncio import Redis

from tests.integration.conftest_redis import REDIS_URL, delete_prefix, unique_prefix
from tests.support import FakeClock
from tokyo_ia.config import ProviderConfig
from tokyo_ia.errors import UpstreamBadRequestError, UpstreamTimeoutError
from tokyo_ia.providers.base import JSON, ChatCall, CheckResult, Provider
from tokyo_ia.resilience.breaker import BreakerSettings, State, Transition
from tokyo_ia.resilience.breaker_redis import RedisBreakerBoard
from tokyo_ia.resilience.health import ActiveHealthChecker, HealthMonitor, RedisProbeLease
from tokyo_ia.routing.catalog import Deployment

LABEL = "openai/gpt-4o-mini"
SETTINGS = BreakerSettings(
    window_s=30, min_requests=4, failure_ratio=0.5, consecutive_failures=3, cooldown_s=15, cache_s=1.0
)


class CountingProvider(Provider):
    kind: ClassVar[str] = "counting"

    def __init__(self, name: str, result: CheckResult) -> None:
        super().__init__(name, ProviderConfig(kind="counting"))
        self.result = result
        self.checks = 0

    async def chat(self, call: ChatCall) -> JSON:
        raise AssertionError("not called")

    async def check(self) -> CheckResult:
        self.checks += 1
        return self.result


@pytest.fixture
def redis(redis_client: Redis) -> Redis:
    return redis_client


@pytest.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    value = unique_prefix("cb")
    yield value
    await delete_prefix(redis, value)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_000_000.0)


def board(redis: Redis, prefix: str, clock: FakeClock | None, **update: object) -> RedisBreakerBoard:
    return RedisBreakerBoard(redis, SETTINGS.model_copy(update=update), key_prefix=prefix, clock=clock)


async def test_failures_on_one_replica_open_the_circuit_for_the_other(
    redis: Redis, prefix: str, clock: FakeClock
) -> None:
    a, b = board(redis, prefix, clock), board(redis, prefix, clock)
    seen_b: list[Transition] = []
    b.add_listener(seen_b.append)
    assert await a.allow(LABEL)
    assert await b.allow(LABEL)  # b now caches "closed" for cache_s
    for _ in range(3):
        await a.record(LABEL, UpstreamTimeoutError("no answer"), 30.0)
    assert a.state(LABEL) is State.OPEN
    assert not await a.allow(LABEL)
    assert await b.allow(LABEL)  # within b's cache time: not seen yet
    clock.advance(1.0)
    assert not await b.allow(LABEL)  # seen within cache_s
    assert b.state(LABEL) is State.OPEN
    assert [(t.old, t.new, t.source) for t in seen_b] == [(State.CLOSED, State.OPEN, "remote")]
    snap = (await b.snapshot())[LABEL]
    assert snap["state"] == "open"
    assert snap["reason"] == "3 consecutive failures, last: timeout"
    assert snap["shared"] is True
    assert snap["time_in_state_s"] == {"closed": 0.0, "open": 1.0, "half_open": 0.0}


async def test_failure_ratio_counts_successes_of_every_replica(
    redis: Redis, prefix: str, clock: FakeClock
) -> None:
    a = board(redis, prefix, clock, consecutive_failures=100)
    b = board(redis, prefix, clock, consecutive_failures=100)
    assert await a.allow(LABEL)
    for _ in range(6):
        await a.record(LABEL, None, 0.1)  # counted locally, flushed with a's next round trip
    for _ in range(3):
        await b.record(LABEL, UpstreamTimeoutError("t"), 1.0)
    clock.advance(1.0)
    assert await a.allow(LABEL)  # the refresh flushes a's six successes
    await b.record(LABEL, UpstreamTimeoutError("t"), 1.0)
    assert b.state(LABEL) is State.CLOSED  # 4 of 10, not 4 of 4
    assert (await b.snapshot())[LABEL]["window"] == {"requests": 10, "failures": 4}


async def test_ratio_verdict_is_shared(redis: Redis, prefix: str, clock: FakeClock) -> None:
    a = board(redis, prefix, clock, consecutive_failures=100)
    b = board(redis, prefix, clock, consecutive_failures=100)
    await a.record(LABEL, UpstreamTimeoutError("t"), 1.0)
    await b.record(LABEL, UpstreamTimeoutError("t"), 1.0)
    await a.record(LABEL, UpstreamBadRequestError("bad"), 0.1)  # neutral: not counted anywhere
    await b.record(LABEL, UpstreamTimeoutError("t"), 1.0)
    assert b.state(LABEL) is State.CLOSED  # 3 requests: below min_requests
    await a.record(LABEL, UpstreamTimeoutError("t"), 1.0)
    assert a.state(LABEL) is State.OPEN
    assert "4 of 4 requests failed within 30s" in (await a.snapshot())[LABEL]["reason"]


async def test_half_open_trials_are_limited_across_replicas(
    redis: Redis, prefix: str, clock: FakeClock
) -> None:
    a, b = board(redis, prefix, clock), board(redis, prefix, clock)
    await a.trip(LABEL, "check failed")
    clock.advance(15)
    assert await a.allow(LABEL)  # the one trial (half_open_max=1), claimed in Redis
    assert not await b.allow(LABEL)
    assert b.state(LABEL) is State.HALF_OPEN
    await a.record(LABEL, None, 0.2)  # trial success closes it for everyone
    assert a.state(LABEL) is State.CLOSED
    assert not await b.allow(LABEL)  # b trusts its refusal for cache_s: no round trip per request
    clock.advance(1.0)
    assert await b.allow(LABEL)
    assert b.state(LABEL) is State.CLOSED


async def test_trial_failure_reopens_and_neutral_outcome_frees_the_slot(
    redis: Redis, prefix: str, clock: FakeClock
) -> None:
    a, b = board(redis, prefix, clock), board(redis, prefix, clock)
    await a.trip(LABEL, "check failed")
    clock.advance(15)
    assert await a.allow(LABEL)
    await a.record(LABEL, UpstreamBadRequestError("context too long"), 0.1)
    assert await b.allow(LABEL)  # a's slot was released
    await b.record(LABEL, UpstreamTimeoutError("no answer"), 30.0)
    assert b.state(LABEL) is State.OPEN
    assert (await a.snapshot())[LABEL]["reason"] == "trial failed: timeout"
    clock.advance(14)
    assert not await a.allow(LABEL)


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from redis.asyncio import Redis
    from tokyo_ia.errors import UpstreamTimeoutError
    from tokyo_ia.resilience.breaker import BreakerSettings
    from tokyo_ia.resilience.breaker_redis import RedisBreakerBoard

    async def main(url, prefix, label, action):
        client = Redis.from_url(url)
        board = RedisBreakerBoard(client, BreakerSettings(consecutive_failures=3), key_prefix=prefix)
        if action == "fail":
            for _ in range(3):
                await board.record(label, UpstreamTimeoutError("no answer"), 30.0)
        print("allowed" if await board.allow(label) else "refused", board.state(label).value)
        await board.close()
        await client.aclose()

    asyncio.run(main(*sys.argv[1:]))
    """
)


async def _child(prefix: str, label: str, action: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, REDIS_URL, prefix, label, action,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


async def test_two_processes_share_circuit_state(redis: Redis, prefix: str) -> None:
    here = RedisBreakerBoard(redis, BreakerSettings(consecutive_failures=3), key_prefix=prefix)
    assert await _child(prefix, LABEL, "fail") == "refused open"
    assert not await here.allow(LABEL)  # this process never saw a failure
    assert here.state(LABEL) is State.OPEN
    other = "anthropic/haiku"
    assert await here.allow(other)
    for _ in range(3):
        await here.record(other, UpstreamTimeoutError("no answer"), 30.0)
    assert await _child(prefix, other, "look") == "refused open"


def deployments(provider: Provider) -> list[Deployment]:
    return [Deployment("chat", provider, m, 1.0, 0) for m in ("m1", "m2")]


async def test_probe_lease_lets_only_one_replica_probe(redis: Redis, prefix: str, clock: FakeClock) -> None:
    replicas = []
    for name in ("replica-a", "replica-b", "replica-c"):
        provider = CountingProvider("flaky", CheckResult(ok=False, stage="auth", detail="401"))
        breakers = board(redis, prefix, clock)
        lease = RedisProbeLease(redis, key_prefix=prefix + "probe:", replica=name)
        replicas.append(
            (provider, ActiveHealthChecker(HealthMonitor(deployments(provider), breakers), lease=lease))
        )
    for _, checker in replicas:
        await checker.run_once()
    assert [p.checks for p, _ in replicas] == [1, 0, 0]
    for _, checker in replicas:
        record = checker.monitor.checks["flaky"]
        assert (record.ok, record.stage, record.by) == (False, "auth", "replica-a")
    # The prober opened the shared circuits; the others see them open without probing.
    _, last = replicas[-1]
    assert not await last.monitor.allow("flaky/m1")
    snap = (await last.monitor.snapshot())["deployments"]["flaky/m2"]
    assert snap["circuit"] == "open"
    assert snap["last_check"]["by"] == "replica-a"
    # The lease is still held: a second round probes nowhere.
    for _, checker in replicas:
        await checker.run_once()
    assert sum(p.checks for p, _ in replicas) == 1


async def test_unreachable_redis_falls_back_to_local_breakers(clock: FakeClock) -> None:
    fallback = RedisBreakerBoard.from_url("redis://127.0.0.1:1/0", settings=SETTINGS, clock=clock)
    try:
        assert await fallback.allow(LABEL)
        assert not fallback.available
        for _ in range(3):
            await fallback.record(LABEL, UpstreamTimeoutError("t"), 1.0)
        assert not await fallback.allow(LABEL)
        snap = (await fallback.snapshot())[LABEL]
        assert (snap["state"], snap["shared"]) == ("open", False)
    finally:
        await fallback.close()

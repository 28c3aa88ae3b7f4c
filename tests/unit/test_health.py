"""Deployment health: passive statistics, the monitor's report, and the active checker."""

from __future__ import annotations

import asyncio
import random
from collections import deque
from typing import ClassVar

import pytest

from tests.support import FakeClock
from tokyo_ia.config import ProviderConfig
from tokyo_ia.errors import UpstreamBadRequestError, UpstreamError, UpstreamTimeoutError
from tokyo_ia.providers.base import JSON, ChatCall, CheckResult, Provider
from tokyo_ia.resilience.breaker import BreakerBoard, BreakerSettings, State
from tokyo_ia.resilience.health import (
    ActiveHealthChecker,
    CheckRecord,
    HealthMonitor,
    HealthSettings,
    HealthStats,
)
from tokyo_ia.routing.catalog import Deployment


class ScriptedProvider(Provider):
    """A provider whose check() answers from a script (an exception in it is raised)."""

    kind: ClassVar[str] = "scripted"

    def __init__(self, name: str, *results: CheckResult | BaseException) -> None:
        super().__init__(name, ProviderConfig(kind="scripted"))
        self.script: deque[CheckResult | BaseException] = deque(results)
        self.checks = 0
        self.checked = asyncio.Event()

    async def chat(self, call: ChatCall) -> JSON:
        raise AssertionError("health checks must not spend tokens")

    async def check(self) -> CheckResult:
        self.checks += 1
        self.checked.set()
        result = self.script.popleft() if len(self.script) > 1 else self.script[0]
        if isinstance(result, BaseException):
            raise result
        return result


class HangingProvider(ScriptedProvider):
    async def check(self) -> CheckResult:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


OK = CheckResult(ok=True, stage="ok", latency_s=0.01)
DOWN = CheckResult(ok=False, stage="connect", detail="connection refused")
SKIPPED = CheckResult(ok=True, stage="skipped", detail="nothing to check")
BREAKER = BreakerSettings(consecutive_failures=2, cooldown_s=15)


def deployment(provider: Provider, model: str, public: str = "chat") -> Deployment:
    return Deployment(public=public, provider=provider, model=model, weight=1.0, priority=0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- passive statistics --------------------------------------------------------------------


def test_percentiles_are_within_the_bin_accuracy(clock: FakeClock) -> None:
    stats = HealthStats(clock=clock)
    for ms in range(1, 1001):  # 1 ms .. 1000 ms, uniform
        stats.record_success(ms / 1000)
    p = stats.percentiles((0.5, 0.95, 0.99))
    for q, exact in ((0.5, 0.500), (0.95, 0.950), (0.99, 0.990)):
        value = p[q]
        assert value is not None
        assert value == pytest.approx(exact, rel=0.03)


def test_percentiles_of_nothing_are_none_and_one_sample_is_itself(clock: FakeClock) -> None:
    stats = HealthStats(clock=clock)
    assert stats.percentiles((0.5,)) == {0.5: None}
    assert stats.snapshot()["success_ratio"] is None
    stats.record_success(0.25)
    assert stats.percentiles((0.5,))[0.5] == pytest.approx(0.25, rel=0.03)
    stats.record_success(0.0)  # a zero latency lands in the smallest bin
    assert stats.percentiles((0.0,))[0.0] == pytest.approx(1e-6)


def test_rolling_window_forgets_old_traffic(clock: FakeClock) -> None:
    stats = HealthStats(window_s=60, buckets=6, clock=clock)
    for _ in range(10):
        stats.record_success(2.0)
    stats.record_failure("timeout", "no answer")
    clock.advance(30)
    for _ in range(10):
        stats.record_success(0.1)
    assert stats.counts() == (20, 1)
    clock.advance(31)  # the first 10 s slice is now out of the window
    assert stats.counts() == (10, 0)
    assert stats.percentiles((0.99,))[0.99] == pytest.approx(0.1, rel=0.03)
    assert stats.last_error is not None  # the last error is kept, with its time
    assert stats.last_error["kind"] == "timeout"


def test_memory_stays_bounded(clock: FakeClock) -> None:
    stats = HealthStats(window_s=10, buckets=5, clock=clock)
    rng = random.Random(1)
    for _ in range(20_000):
        clock.advance(0.01)
        stats.record_success(rng.uniform(0.001, 100.0))
    assert len(stats._slices) <= 5
    assert all(len(s.hist) < 400 for s in stats._slices)


def test_snapshot_classifies_outcomes(clock: FakeClock) -> None:
    stats = HealthStats(clock=clock, wall=lambda: 1_700_000_000.0)
    stats.record(None, 0.2)
    stats.record(None, 0.2)
    stats.record(None, 0.2)
    stats.record(UpstreamTimeoutError("openai: no answer within 30s"), 30.0)
    assert stats.snapshot()["last_error"] == {
        "kind": "timeout",
        "message": "openai: no answer within 30s",
        "at": "2023-11-14T22:13:20.000Z",
    }
    # Not retryable, but the deployment's failure (the breakers leave it alone): counted.
    stats.record(UpstreamError("openai returned 401: bad key", code="upstream_auth_failed"), 0.05)
    stats.record(UpstreamBadRequestError("context too long"), 0.1)  # the caller's fault: not counted
    stats.record(asyncio.CancelledError(), 0.1)  # the client left: not counted
    snap = stats.snapshot()
    assert snap["requests"] == 5
    assert snap["success_ratio"] == 0.6
    assert snap["latency_ms"]["p50"] == pytest.approx(200, rel=0.03)
    assert snap["last_error"]["kind"] == "upstream_auth_failed"


# -- monitor -------------------------------------------------------------------------------


async def test_monitor_feeds_stats_and_breakers_and_reports(clock: FakeClock) -> None:
    primary, backup = ScriptedProvider("openai", OK), ScriptedProvider("anthropic", OK)
    monitor = HealthMonitor(
        [
            deployment(primary, "gpt-4o-mini"),
            deployment(primary, "gpt-4o-mini", "alias"),
            deployment(backup, "haiku"),
        ],
        BreakerBoard(BREAKER, clock=clock),
        clock=clock,
    )
    label = "openai/gpt-4o-mini"
    assert await monitor.allow(label)
    await monitor.record(label, None, 0.05)
    clock.advance(1)
    await monitor.record(label, UpstreamError("502 from upstream", retryable=True), 0.5)
    await monitor.record(label, UpstreamError("502 from upstream", retryable=True), 0.5)
    assert not await monitor.allow(label)
    snap = (await monitor.snapshot())["deployments"]
    assert set(snap) == {"openai/gpt-4o-mini", "anthropic/haiku"}
    entry = snap[label]
    assert entry["provider"] == "openai"
    assert entry["model"] == "gpt-4o-mini"
    assert entry["public"] == ["alias", "chat"]
    assert entry["circuit"] == "open"
    assert entry["time_in_state_s"] == {"closed": 1.0, "open": 0.0, "half_open": 0.0}
    assert entry["requests"] == 3
    assert entry["success_ratio"] == pytest.approx(0.3333)
    assert entry["latency_ms"]["p50"] == pytest.approx(50, rel=0.03)
    assert entry["last_error"]["kind"] == "upstream_error"
    assert entry["last_check"] is None
    assert snap["anthropic/haiku"]["circuit"] == "closed"


# -- active checks -------------------------------------------------------------------------


def checker_for(
    *providers: Provider, clock: FakeClock, settings: HealthSettings | None = None
) -> ActiveHealthChecker:
    monitor = HealthMonitor(
        [deployment(p, f"m{i}") for p in providers for i in range(2)],
        BreakerBoard(BREAKER, clock=clock),
        settings,
        clock=clock,
    )
    return ActiveHealthChecker(monitor, rng=random.Random(7), wall=lambda: 1_700_000_000.0)


async def test_failed_check_opens_every_deployment_of_the_provider(clock: FakeClock) -> None:
    down, up = ScriptedProvider("down", DOWN), ScriptedProvider("up", OK)
    checker = checker_for(down, up, clock=clock)
    results = await checker.run_once()
    assert results["down"] is not None
    assert not results["down"].ok
    board = checker.monitor.breakers
    assert [board.state(f"down/m{i}") for i in range(2)] == [State.OPEN, State.OPEN]
    assert [board.state(f"up/m{i}") for i in range(2)] == [State.CLOSED, State.CLOSED]
    snap = (await checker.monitor.snapshot())["deployments"]["down/m0"]
    assert snap["last_check"]["stage"] == "connect"
    assert snap["last_check"]["at"] == "2023-11-14T22:13:20.000Z"
    assert snap["breaker"]["reason"] == "active check failed at connect: connection refused"
    assert down.checks == up.checks == 1


async def test_failing_checks_keep_it_open_and_a_pass_lets_trials_through(clock: FakeClock) -> None:
    provider = ScriptedProvider("p", DOWN, DOWN, OK)
    checker = checker_for(provider, clock=clock)
    board = checker.monitor.breakers
    await checker.run_once()
    clock.advance(10)
    await checker.run_once()  # still down: the cooldown restarts
    clock.advance(10)
    assert not await board.allow("p/m0")  # 20 s after opening, 10 s after the last failed check
    await checker.run_once()
    assert board.state("p/m0") is State.HALF_OPEN
    assert await board.allow("p/m0")  # the trial goes through without waiting for the cooldown
    await board.record("p/m0", None, 0.1)
    assert board.state("p/m0") is State.CLOSED


async def test_raising_and_hanging_checks_are_failures(clock: FakeClock) -> None:
    raising = ScriptedProvider("raising", RuntimeError("dns failure"))
    hanging = HangingProvider("hanging", OK)
    checker = checker_for(raising, hanging, clock=clock, settings=HealthSettings(timeout_s=0.01))
    results = await checker.run_once()
    raised, hung = results["raising"], results["hanging"]
    assert raised is not None
    assert hung is not None
    assert (raised.ok, raised.stage, raised.detail) == (False, "error", "RuntimeError: dns failure")
    assert (hung.ok, hung.stage) == (False, "timeout")
    assert checker.monitor.breakers.state("hanging/m0") is State.OPEN


async def test_skipped_checks_leave_breakers_alone(clock: FakeClock) -> None:
    provider = ScriptedProvider("demo", SKIPPED)
    checker = checker_for(provider, clock=clock)
    board = checker.monitor.breakers
    await board.trip("demo/m0", "traffic failed")
    await checker.run_once()
    assert board.state("demo/m0") is State.OPEN
    assert checker.monitor.checks["demo"].stage == "skipped"


class FakeLease:
    """A lease someone else holds: this replica only reads the published result."""

    def __init__(self, published: CheckRecord | None) -> None:
        self.published = published

    async def acquire(self, provider: str, ttl_s: float) -> bool:
        return False

    async def publish(self, provider: str, record: CheckRecord, ttl_s: float) -> None:
        raise AssertionError("a replica without the lease publishes nothing")

    async def latest(self, provider: str) -> CheckRecord | None:
        return self.published


async def test_without_the_lease_the_shared_result_is_read_not_probed(clock: FakeClock) -> None:
    provider = ScriptedProvider("p", OK)
    checker = checker_for(provider, clock=clock)
    record = CheckRecord(False, "auth", "401", 0.02, 1_700_000_000.0, "replica-b")
    checker.lease = FakeLease(record)
    assert await checker.run_once() == {"p": record}
    assert provider.checks == 0
    # A memory board is per replica, so the shared result still opens this replica's circuits.
    assert checker.monitor.breakers.state("p/m0") is State.OPEN
    checker.lease = FakeLease(None)
    assert await checker.run_once() == {"p": None}


def test_delays_are_jittered_within_bounds(clock: FakeClock) -> None:
    checker = checker_for(ScriptedProvider("p", OK), clock=clock)
    delays = [checker.next_delay() for _ in range(200)]
    assert all(27.0 <= d <= 33.0 for d in delays)
    assert len(set(delays)) > 100


async def test_start_and_stop_run_the_background_loop(clock: FakeClock) -> None:
    provider = ScriptedProvider("p", OK)
    settings = HealthSettings(interval_s=0.001, jitter=0.5)
    checker = checker_for(provider, clock=clock, settings=settings)
    checker.start()
    checker.start()  # idempotent
    await asyncio.wait_for(provider.checked.wait(), timeout=5)
    await checker.stop()
    await checker.stop()
    assert provider.checks >= 1


def test_settings_reject_unknown_keys() -> None:
    with pytest.raises(ValueError, match="extra"):
        HealthSettings.model_validate({"interval": 5})

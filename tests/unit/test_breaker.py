"""Circuit breakers in memory: every state transition, driven by an injected clock."""

from __future__ import annotations

import logging

import pytest

from tests.support import FakeClock
from tokyo_ia.errors import (
    InvalidRequestError,
    UpstreamBadRequestError,
    UpstreamError,
    UpstreamRateLimitError,
    UpstreamTimeoutError,
)
from tokyo_ia.resilience.breaker import (
    BreakerBoard,
    BreakerSettings,
    CircuitBreaker,
    State,
    Transition,
    counts_as_failure,
    failure_kind,
)

SETTINGS = BreakerSettings(
    window_s=30, min_requests=4, failure_ratio=0.5, consecutive_failures=3, cooldown_s=15, half_open_max=2
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def seen() -> list[Transition]:
    return []


@pytest.fixture
def breaker(clock: FakeClock, seen: list[Transition]) -> CircuitBreaker:
    return CircuitBreaker("openai/gpt-4o-mini", SETTINGS, clock=clock, listeners=[seen.append])


def open_it(breaker: CircuitBreaker) -> None:
    for _ in range(SETTINGS.consecutive_failures):
        breaker.record_failure("upstream_error")
    assert breaker.state is State.OPEN


# -- closed → open -------------------------------------------------------------------------


def test_opens_after_consecutive_failures(breaker: CircuitBreaker, seen: list[Transition]) -> None:
    breaker.record_failure("timeout")
    breaker.record_failure("timeout")
    assert breaker.state is State.CLOSED
    breaker.record_failure("timeout")
    assert breaker.state is State.OPEN
    assert [(t.old, t.new) for t in seen] == [(State.CLOSED, State.OPEN)]
    assert "3 consecutive failures, last: timeout" in seen[0].reason


def test_a_success_resets_the_consecutive_count(breaker: CircuitBreaker) -> None:
    for _ in range(2):
        breaker.record_failure()
        breaker.record_failure()
        for _ in range(6):
            breaker.record_success(0.1)
    # 4 failures of 16 requests, never 3 in a row: under both thresholds.
    assert breaker.state is State.CLOSED


def test_opens_by_failure_ratio_once_min_requests_are_seen(breaker: CircuitBreaker) -> None:
    breaker.record_failure()
    breaker.record_success(0.1)
    breaker.record_failure()
    assert breaker.state is State.CLOSED  # 2 of 3: too few requests for a verdict
    breaker.record_success(0.1)  # 2 of 4 = 0.5, but the last outcome was a success
    assert breaker.state is State.CLOSED
    breaker.record_failure()  # 3 of 5 ≥ 0.5
    assert breaker.state is State.OPEN
    assert breaker.reason.startswith("3 of 5 requests failed within 30s")


def test_failures_outside_the_window_are_forgotten(breaker: CircuitBreaker, clock: FakeClock) -> None:
    breaker.record_failure()
    breaker.record_success(0.1)
    breaker.record_failure()
    clock.advance(31)
    breaker.record_success(0.1)
    breaker.record_success(0.1)
    breaker.record_failure()
    assert breaker.state is State.CLOSED  # 1 of 3 in the window, not 3 of 6
    assert breaker.snapshot()["window"] == {"requests": 3, "failures": 1}


# -- open ----------------------------------------------------------------------------------


def test_open_refuses_until_the_cooldown_is_over(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_it(breaker)
    assert not breaker.allow()
    clock.advance(14.9)
    assert not breaker.allow()
    assert breaker.state is State.OPEN


def test_outcomes_of_requests_admitted_before_opening_are_ignored(breaker: CircuitBreaker) -> None:
    open_it(breaker)
    breaker.record_success(0.1)
    breaker.record_failure()
    assert breaker.state is State.OPEN


# -- half-open -----------------------------------------------------------------------------


def test_half_open_admits_exactly_half_open_max_trials(
    breaker: CircuitBreaker, clock: FakeClock, seen: list[Transition]
) -> None:
    open_it(breaker)
    clock.advance(15)
    assert [breaker.allow() for _ in range(4)] == [True, True, False, False]
    assert breaker.state is State.HALF_OPEN
    assert (seen[-1].old, seen[-1].new, seen[-1].reason) == (State.OPEN, State.HALF_OPEN, "cooldown over")


def test_trial_success_closes_with_a_clean_slate(
    breaker: CircuitBreaker, clock: FakeClock, seen: list[Transition]
) -> None:
    open_it(breaker)
    clock.advance(15)
    assert breaker.allow()
    breaker.record_success(0.2)
    assert breaker.state is State.CLOSED
    assert seen[-1].reason == "trial succeeded"
    assert breaker.snapshot()["window"] == {"requests": 0, "failures": 0}
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is State.CLOSED  # the old failures did not carry over


def test_trial_failure_reopens_for_a_full_cooldown(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_it(breaker)
    clock.advance(15)
    assert breaker.allow()
    breaker.record_failure("timeout")
    assert breaker.state is State.OPEN
    assert breaker.reason == "trial failed: timeout"
    clock.advance(10)
    assert not breaker.allow()
    clock.advance(5)
    assert breaker.allow()


def test_a_neutral_outcome_frees_a_trial_slot(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_it(breaker)
    clock.advance(15)
    assert breaker.allow()
    assert breaker.allow()
    assert not breaker.allow()
    breaker.release()
    assert breaker.allow()
    assert breaker.state is State.HALF_OPEN


def test_a_trial_that_never_reports_frees_its_slot(clock: FakeClock) -> None:
    breaker = CircuitBreaker("x/y", SETTINGS.model_copy(update={"trial_timeout_s": 20}), clock=clock)
    open_it(breaker)
    clock.advance(15)
    assert breaker.allow()
    assert breaker.allow()
    clock.advance(19)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()


# -- active checks, slow calls, time in state -----------------------------------------------


def test_trip_opens_and_restarts_the_cooldown(breaker: CircuitBreaker, clock: FakeClock) -> None:
    breaker.trip("active check failed")
    assert breaker.state is State.OPEN
    clock.advance(10)
    breaker.trip("active check failed again")
    clock.advance(10)
    assert not breaker.allow()  # 20 s after the first trip, 10 s after the second
    assert breaker.reason == "active check failed again"


def test_probe_ok_lets_trials_through_before_the_cooldown(breaker: CircuitBreaker) -> None:
    breaker.probe_ok()
    assert breaker.state is State.CLOSED  # nothing to do when closed
    open_it(breaker)
    breaker.probe_ok()
    assert breaker.state is State.HALF_OPEN
    assert breaker.allow()


def test_slow_successes_count_as_failures(clock: FakeClock) -> None:
    breaker = CircuitBreaker("x/y", SETTINGS.model_copy(update={"slow_call_s": 5.0}), clock=clock)
    breaker.record_success(4.0)
    for _ in range(3):
        breaker.record_success(6.0)
    assert breaker.state is State.OPEN
    assert breaker.reason.endswith("last: slow")


def test_time_in_each_state_is_tracked(breaker: CircuitBreaker, clock: FakeClock) -> None:
    clock.advance(100)
    open_it(breaker)
    clock.advance(15)
    breaker.allow()
    clock.advance(2)
    breaker.record_success(0.1)
    clock.advance(3)
    assert breaker.time_in_state() == {"closed": 103.0, "open": 15.0, "half_open": 2.0}
    assert breaker.snapshot()["in_state_s"] == 3.0


def test_a_failing_listener_is_logged_not_raised(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    def broken(_: Transition) -> None:
        raise RuntimeError("metrics down")

    breaker = CircuitBreaker("x/y", SETTINGS, clock=clock, listeners=[broken])
    with caplog.at_level(logging.WARNING, logger="tokyo_ia.breaker"):
        open_it(breaker)
    assert "listener" in caplog.text
    assert "circuit x/y: closed -> open" in caplog.text


# -- classification and the board ---------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "counts", "kind"),
    [
        (UpstreamError("boom", retryable=True), True, "upstream_error"),
        (UpstreamTimeoutError("slow"), True, "timeout"),
        (UpstreamRateLimitError("429"), True, "rate_limited"),
        (UpstreamError("401 from upstream", retryable=False), False, "upstream_error"),
        (UpstreamBadRequestError("bad"), False, "upstream_bad_request"),
        (InvalidRequestError("bad"), False, "InvalidRequestError"),
        (None, False, None),
    ],
)
def test_only_retryable_upstream_errors_count(
    error: Exception | None, counts: bool, kind: str | None
) -> None:
    assert counts_as_failure(error) is counts
    if error is not None:
        assert failure_kind(error) == kind


async def test_board_ignores_caller_errors_and_opens_on_upstream_failures(clock: FakeClock) -> None:
    seen: list[Transition] = []
    board = BreakerBoard(SETTINGS, clock=clock)
    board.add_listener(seen.append)
    label = "openai/gpt-4o-mini"
    for _ in range(10):
        assert await board.allow(label)
        await board.record(label, UpstreamBadRequestError("context too long"), 0.1)
    assert board.state(label) is State.CLOSED
    for _ in range(3):
        await board.record(label, UpstreamTimeoutError("no answer"), 30.0)
    assert board.state(label) is State.OPEN
    assert not await board.allow(label)
    assert await board.allow("anthropic/claude")  # other deployments are independent
    assert [(t.label, t.new) for t in seen] == [(label, State.OPEN)]


async def test_board_half_open_caller_error_frees_the_trial(clock: FakeClock) -> None:
    board = BreakerBoard(SETTINGS.model_copy(update={"half_open_max": 1}), clock=clock)
    await board.trip("a/b", "check failed")
    clock.advance(15)
    assert await board.allow("a/b")
    assert not await board.allow("a/b")
    await board.record("a/b", UpstreamBadRequestError("bad"), 0.1)
    assert board.state("a/b") is State.HALF_OPEN
    assert await board.allow("a/b")
    await board.record("a/b", None, 0.1)
    assert board.state("a/b") is State.CLOSED


async def test_board_snapshot_includes_unused_deployments(clock: FakeClock) -> None:
    board = BreakerBoard(SETTINGS, clock=clock)
    await board.trip("a/b", "check failed")
    snap = await board.snapshot(["c/d"])
    assert snap["a/b"]["state"] == "open"
    assert snap["a/b"]["reason"] == "check failed"
    assert snap["c/d"]["state"] == "closed"
    assert set(snap["c/d"]["time_in_state_s"]) == {"closed", "open", "half_open"}


async def test_disabled_board_always_allows(clock: FakeClock) -> None:
    board = BreakerBoard(BreakerSettings(enabled=False), clock=clock)
    for _ in range(20):
        await board.record("a/b", UpstreamTimeoutError("t"), 1.0)
    await board.trip("a/b", "x")
    assert await board.allow("a/b")


def test_settings_reject_unknown_keys() -> None:
    with pytest.raises(ValueError, match="extra"):
        BreakerSettings.model_validate({"window": 30})


def test_redis_board_is_loaded_lazily() -> None:
    from tokyo_ia.resilience import breaker

    assert breaker.RedisBreakerBoard.__name__ == "RedisBreakerBoard"

"""Circuit breakers, one per deployment (``provider/model`` label).

A breaker stops sending traffic to a deployment that is failing, so requests fail over at once
instead of each paying a timeout, and the upstream gets room to recover::

    closed ──(failure ratio ≥ failure_ratio over ≥ min_requests within window_s,
    │          or consecutive_failures in a row, or a failed active check)──▶ open
    ▲                                                                         │
    │                                             cooldown_s over, or an active check passed
    │                                                                         ▼
    └──────────── a trial succeeds ◀── half_open (≤ half_open_max trials in flight)
                                        └── a trial fails ──▶ open

Only failures that say something about the upstream count: an :class:`~tokyo_ia.errors.UpstreamError`
with ``retryable=True`` (5xx, connection errors, timeouts, upstream 429s). Caller errors (400s,
a non-retryable upstream answer) and cancelled requests are neutral: they free a half-open trial
slot and change nothing else (see :func:`counts_as_failure`).

Two boards implement :class:`Breakers`: :class:`BreakerBoard` here (one process) and
``RedisBreakerBoard`` (``breaker_redis.py``, loaded lazily so a gateway without Redis never
imports the Redis client), which shares state across replicas. The board API is async so the
pipeline has one code path for both; :meth:`CircuitBreaker.allow` itself is synchronous.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from ..errors import UpstreamError, UpstreamRateLimitError, UpstreamTimeoutError

if TYPE_CHECKING:
    from .breaker_redis import RedisBreakerBoard

log = logging.getLogger("tokyo_ia.breaker")
Clock = Callable[[], float]
JSON = dict[str, Any]


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerSettings(BaseModel):
    """Thresholds of every breaker (config section ``resilience.breaker``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    window_s: float = Field(30.0, gt=0, description="rolling window for the failure ratio")
    buckets: int = Field(10, ge=1, le=120, description="the window is counted in this many slices")
    min_requests: int = Field(5, ge=1, description="no ratio verdict on fewer requests than this")
    failure_ratio: float = Field(0.5, gt=0, le=1)
    consecutive_failures: int = Field(5, ge=1, description="open after this many failures in a row")
    cooldown_s: float = Field(15.0, gt=0, description="time open before trial requests")
    half_open_max: int = Field(1, ge=1, description="trial requests allowed in flight at once")
    trial_timeout_s: float = Field(
        60.0, gt=0, description="a trial that never reports back frees its slot after this"
    )
    slow_call_s: float | None = Field(None, gt=0, description="a success slower than this is a failure")
    cache_s: float = Field(1.0, ge=0, description="Redis board: how long a replica trusts its view")


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change, as given to listeners (for metrics, alerts, tests).

    ``source`` is ``"local"`` when this process made the change and ``"remote"`` when it saw
    another replica's change through Redis, so a counter can sum transitions across replicas
    without double counting.
    """

    label: str
    old: State
    new: State
    reason: str
    at: float
    source: Literal["local", "remote"] = "local"


Listener = Callable[[Transition], None]


def counts_as_failure(error: BaseException | None) -> bool:
    """Whether an outcome says the upstream is unhealthy (only retryable upstream errors do)."""
    return isinstance(error, UpstreamError) and error.retryable


def deployment_failed(error: BaseException | None) -> bool:
    """Whether an outcome is a failure of the deployment, worth asking again or not (its
    credentials refused, its model unknown there): :attr:`UpstreamError.failover`. The health
    statistics count these; the breakers only the :func:`counts_as_failure` among them."""
    return isinstance(error, UpstreamError) and error.failover


def failure_kind(error: BaseException) -> str:
    """A short, low-cardinality name for a failure (logs, metrics, ``last_error``)."""
    if isinstance(error, UpstreamTimeoutError):
        return "timeout"
    if isinstance(error, UpstreamRateLimitError):
        return "rate_limited"
    if isinstance(error, UpstreamError):
        return error.code or "upstream_error"
    return type(error).__name__


def notify(listeners: Iterable[Listener], transition: Transition) -> None:
    """Log a transition and tell every listener; a broken listener never breaks a request."""
    level = logging.WARNING if transition.new is State.OPEN and transition.source == "local" else logging.INFO
    if transition.source == "remote":
        level = logging.DEBUG
    log.log(
        level,
        "circuit %s: %s -> %s (%s)%s",
        transition.label,
        transition.old.value,
        transition.new.value,
        transition.reason,
        " [seen from another replica]" if transition.source == "remote" else "",
    )
    for listener in listeners:
        try:
            listener(transition)
        except Exception:  # metrics hooks must not fail requests
            log.exception("circuit breaker listener %r failed", listener)


class _Window:
    """Success and failure counts over the last ``window_s``, kept in ``buckets`` time slices.

    Memory is bounded by the number of slices whatever the traffic; old slices are dropped as
    time moves, so the ratio reflects only recent requests.
    """

    def __init__(self, window_s: float, buckets: int) -> None:
        self._slice = window_s / buckets
        self._n = buckets
        self._slices: deque[list[int]] = deque()  # [slice index, successes, failures]

    def add(self, now: float, ok: bool) -> None:
        idx = int(now // self._slice)
        if not self._slices or self._slices[-1][0] != idx:
            self._slices.append([idx, 0, 0])
            self._expire(idx)
        self._slices[-1][1 if ok else 2] += 1

    def totals(self, now: float) -> tuple[int, int]:
        """(successes, failures) within the window ending at ``now``."""
        self._expire(int(now // self._slice))
        return sum(s[1] for s in self._slices), sum(s[2] for s in self._slices)

    def clear(self) -> None:
        self._slices.clear()

    def _expire(self, idx: int) -> None:
        while self._slices and self._slices[0][0] <= idx - self._n:
            self._slices.popleft()


class CircuitBreaker:
    """The breaker of one deployment, in process memory.

    Outcomes are matched to trials by count, not by identity: any success seen while half-open
    proves the upstream answers again, whichever request it came from. Outcomes that arrive
    while open (requests admitted before the circuit opened) are ignored.
    """

    def __init__(
        self,
        label: str,
        settings: BreakerSettings | None = None,
        *,
        clock: Clock = time.monotonic,
        listeners: Iterable[Listener] = (),
    ) -> None:
        self.label = label
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self.listeners: list[Listener] = list(listeners)
        self._state = State.CLOSED
        self._since = clock()
        self._spent = dict.fromkeys(State, 0.0)
        self._window = _Window(self.settings.window_s, self.settings.buckets)
        self._consecutive = 0
        self._opened_at = 0.0
        self._trials: deque[float] = deque()  # start times of trials in flight
        self.reason = ""

    @property
    def state(self) -> State:
        """The stored state; an open circuit past its cooldown turns half-open on the next allow()."""
        return self._state

    def allow(self) -> bool:
        """Whether to send a request now; in half-open state a True claims a trial slot."""
        if self._state is State.CLOSED:
            return True
        now = self._clock()
        if self._state is State.OPEN:
            if now - self._opened_at < self.settings.cooldown_s:
                return False
            self._move(State.HALF_OPEN, now, "cooldown over")
        while self._trials and now - self._trials[0] >= self.settings.trial_timeout_s:
            self._trials.popleft()
        if len(self._trials) >= self.settings.half_open_max:
            return False
        self._trials.append(now)
        return True

    def record_success(self, latency_s: float = 0.0) -> None:
        """A request succeeded; one taking longer than ``slow_call_s`` counts as a failure."""
        slow = self.settings.slow_call_s
        if slow is not None and latency_s > slow:
            self.record_failure("slow")
            return
        if self._state is State.CLOSED:
            self._consecutive = 0
            self._window.add(self._clock(), ok=True)
        elif self._state is State.HALF_OPEN:
            self._move(State.CLOSED, self._clock(), "trial succeeded")

    def record_failure(self, kind: str = "upstream_error") -> None:
        """A retryable upstream failure (callers filter with :func:`counts_as_failure`)."""
        now = self._clock()
        if self._state is State.HALF_OPEN:
            self._move(State.OPEN, now, f"trial failed: {kind}")
        elif self._state is State.CLOSED:
            self._consecutive += 1
            self._window.add(now, ok=False)
            reason = self._verdict(now, kind)
            if reason:
                self._move(State.OPEN, now, reason)

    def release(self) -> None:
        """A neutral outcome (caller error, cancellation): free a trial slot, count nothing."""
        if self._state is State.HALF_OPEN and self._trials:
            self._trials.popleft()

    def trip(self, reason: str) -> None:
        """Open now, or restart the cooldown if already open (a failed active check)."""
        now = self._clock()
        if self._state is State.OPEN:
            self._opened_at = now
            self.reason = reason
        else:
            self._move(State.OPEN, now, reason)

    def probe_ok(self, reason: str = "active check passed") -> None:
        """An active check passed: an open circuit lets trials through without waiting."""
        if self._state is State.OPEN:
            self._move(State.HALF_OPEN, self._clock(), reason)

    def time_in_state(self) -> dict[str, float]:
        """Seconds spent in each state since this breaker was created, current stint included."""
        spent = {s.value: v for s, v in self._spent.items()}
        spent[self._state.value] += self._clock() - self._since
        return spent

    def snapshot(self) -> JSON:
        now = self._clock()
        ok, failed = self._window.totals(now)
        return {
            "state": self._state.value,
            "in_state_s": round(now - self._since, 3),
            "time_in_state_s": {k: round(v, 3) for k, v in self.time_in_state().items()},
            "reason": self.reason,
            "consecutive_failures": self._consecutive,
            "window": {"requests": ok + failed, "failures": failed},
        }

    def _verdict(self, now: float, kind: str) -> str:
        """Why the circuit must open now, or "" to stay closed."""
        s = self.settings
        if self._consecutive >= s.consecutive_failures:
            return f"{self._consecutive} consecutive failures, last: {kind}"
        ok, failed = self._window.totals(now)
        total = ok + failed
        if total >= s.min_requests and failed / total >= s.failure_ratio:
            return f"{failed} of {total} requests failed within {s.window_s:g}s, last: {kind}"
        return ""

    def _move(self, new: State, now: float, reason: str) -> None:
        old = self._state
        self._spent[old] += now - self._since
        self._state, self._since, self.reason = new, now, reason
        self._trials.clear()
        if new is State.OPEN:
            self._opened_at = now
        elif new is State.CLOSED:
            self._window.clear()
            self._consecutive = 0
        notify(self.listeners, Transition(self.label, old, new, reason, now))


class Breakers(Protocol):
    """What the pipeline, the health checker and ``/admin/health`` need from a breaker board."""

    @property
    def shared(self) -> bool:
        """True when the state is shared across replicas (so one replica's probe serves all)."""
        ...

    def add_listener(self, listener: Listener) -> None: ...

    async def allow(self, label: str) -> bool:
        """Whether to try this deployment now (claims a trial slot when half-open)."""
        ...

    async def record(self, label: str, error: BaseException | None, latency_s: float = 0.0) -> None:
        """Report the outcome of an allowed request: ``error`` None is a success."""
        ...

    async def trip(self, label: str, reason: str) -> None: ...

    async def probe_ok(self, label: str, reason: str = "active check passed") -> None: ...

    def state(self, label: str) -> State:
        """This process's current view (for Redis, the cached one): no I/O."""
        ...

    async def snapshot(self, labels: Iterable[str] = ()) -> dict[str, JSON]: ...

    async def close(self) -> None: ...


class BreakerBoard:
    """One :class:`CircuitBreaker` per deployment label, created on first use, in memory."""

    shared = False

    def __init__(
        self,
        settings: BreakerSettings | None = None,
        *,
        clock: Clock = time.monotonic,
        listeners: Iterable[Listener] = (),
    ) -> None:
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._listeners: list[Listener] = list(listeners)
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, label: str) -> CircuitBreaker:
        breaker = self._breakers.get(label)
        if breaker is None:
            # Every breaker shares the board's listener list, so later listeners reach them all.
            breaker = CircuitBreaker(label, self.settings, clock=self._clock)
            breaker.listeners = self._listeners
            self._breakers[label] = breaker
        return breaker

    def labels(self) -> list[str]:
        """Labels of every breaker used so far."""
        return list(self._breakers)

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def allow(self, label: str) -> bool:
        return not self.settings.enabled or self.get(label).allow()

    async def record(self, label: str, error: BaseException | None, latency_s: float = 0.0) -> None:
        if not self.settings.enabled:
            return
        breaker = self.get(label)
        if error is None:
            breaker.record_success(latency_s)
        elif counts_as_failure(error):
            breaker.record_failure(failure_kind(error))
        else:
            breaker.release()

    async def trip(self, label: str, reason: str) -> None:
        if self.settings.enabled:
            self.get(label).trip(reason)

    async def probe_ok(self, label: str, reason: str = "active check passed") -> None:
        if self.settings.enabled:
            self.get(label).probe_ok(reason)

    def state(self, label: str) -> State:
        breaker = self._breakers.get(label)
        return State.CLOSED if breaker is None else breaker.state

    async def snapshot(self, labels: Iterable[str] = ()) -> dict[str, JSON]:
        """Every known breaker plus ``labels`` (never-used deployments show as closed)."""
        wanted = list(dict.fromkeys([*self._breakers, *labels]))
        return {label: self.get(label).snapshot() for label in wanted}

    async def close(self) -> None:
        """Nothing to release; here so both boards share one lifecycle."""


def __getattr__(name: str) -> Any:
    if name == "RedisBreakerBoard":
        from .breaker_redis import RedisBreakerBoard

        return RedisBreakerBoard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BreakerBoard",
    "BreakerSettings",
    "Breakers",
    "CircuitBreaker",
    "Listener",
    "RedisBreakerBoard",
    "State",
    "Transition",
    "counts_as_failure",
    "deployment_failed",
    "failure_kind",
    "notify",
]

"""Rate limits: requests and tokens per minute, requests in flight (provider throttles: ``throttle.py``).

Algorithm: **GCRA** (generic cell rate algorithm), i.e. a token bucket kept as one timestamp per
limit, the "theoretical arrival time" (TAT). A limit of N per minute admits a burst of N and then
refills continuously at N/60 per second. It was chosen because:

- it is exact at window edges: unlike fixed windows it never admits 2N around a minute boundary;
  after a burst of N the next request is admitted 60/N seconds later, not "at the next minute";
- state is one float per limit and a check is O(1); a request's token cost is just a longer step,
  so requests-per-minute and tokens-per-minute share one algorithm and one atomic decision;
- a TAT in the past means "bucket full", exactly like no state at all, so idle keys can be
  dropped (memory) or expire with a TTL (Redis) without changing any decision.

Both backends implement the same arithmetic: :class:`MemoryRateLimiter` here (one process) and
:class:`~tokyo_ia.resilience.ratelimit_redis.RedisRateLimiter` (a Lua script; many replicas).
A request is admitted only if *every* limit has room, and is then counted against all of them.

Scopes are plain strings; the error messages understand ``"global"`` and ``"key:<name>"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NamedTuple, Protocol

from ..errors import RateLimitError

PERIOD_S = 60.0
"""All limits are per minute (OpenAI's RPM/TPM)."""

MAX_DEBT_PERIODS = 2.0
"""Charged tokens may push a bucket at most this many periods into the future, so one huge,
badly estimated response cannot lock a key out for longer than that."""

EPS = 1e-9
"""Waits and debts below this many seconds are rounding, not a limit reached."""
Clock = Callable[[], float]
RefusedBy = Literal["requests", "tokens"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-minute limits for one scope; ``None`` means unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "max_parallel"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Limits.{name} must be >= 1 or None (got {value})")

    @property
    def metered(self) -> bool:
        """Whether ``acquire`` has anything to check (else it answers without any state)."""
        return self.rpm is not None or self.tpm is not None


@dataclass(slots=True)
class Decision:
    """The answer of :meth:`RateLimiter.acquire`; also the source of the rate-limit headers.

    Treat it as read-only. (Not ``frozen``: a frozen dataclass costs ~2 µs more to build, on
    every request.)

    ``reset_*`` is the number of seconds until that bucket is full again (OpenAI's meaning).
    ``retry_after`` is set when refused and a retry can succeed; it is ``None`` for a request
    whose tokens exceed the whole TPM limit (:attr:`oversized`), which no wait can fix.
    """

    allowed: bool
    scope: str
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float = 0.0
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float = 0.0
    retry_after: float | None = None
    refused_by: RefusedBy | None = None
    tokens: int = 0

    @property
    def oversized(self) -> bool:
        return not self.allowed and self.refused_by == "tokens" and self.retry_after is None


class RateLimiter(Protocol):
    """What the pipeline needs from a rate limiter; both backends satisfy it."""

    async def acquire(self, scope: str, limits: Limits, tokens: int = 0) -> Decision:
        """Check RPM and TPM for ``scope``; if both have room, count this request."""
        ...

    async def add_tokens(self, scope: str, limits: Limits, tokens: int) -> None:
        """Charge tokens known after the response (negative refunds an over-estimate)."""
        ...

    async def refund(self, scope: str, limits: Limits, tokens: int = 0) -> None:
        """Give back a request ``acquire`` counted (and its ``tokens``): a later scope refused it."""
        ...

    def parallel(self, scope: str, max_parallel: int | None) -> AbstractAsyncContextManager[None]:
        """Hold one of ``max_parallel`` slots for the body; raise RateLimitError when none is free."""
        ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------------------------
# The shared arithmetic (mirrored line by line in ratelimit_redis._ACQUIRE_LUA)


class Outcome(NamedTuple):
    """Raw result of one GCRA evaluation, in seconds relative to ``now``."""

    allowed: bool
    refused_by: RefusedBy | None
    reset_requests: float
    reset_tokens: float
    retry_after: float | None


def evaluate(
    now: float, tat_r: float, tat_t: float, limits: Limits, tokens: int
) -> tuple[Outcome, float, float]:
    """One admission decision; returns it with the TATs to store (unchanged when refused)."""
    # max() spelled as comparisons: this runs once per scope per request.
    if tat_r < now:
        tat_r = now
    if tat_t < now:
        tat_t = now
    if tokens < 0:
        tokens = 0
    rpm, tpm = limits.rpm, limits.tpm
    new_r, new_t, wait_r, wait_t = tat_r, tat_t, 0.0, 0.0
    if rpm is not None:
        new_r = tat_r + PERIOD_S / rpm
        wait_r = new_r - now - PERIOD_S
    if tpm is not None:
        if tokens > tpm:
            return Outcome(False, "tokens", tat_r - now, tat_t - now, None), tat_r, tat_t
        new_t = tat_t + tokens * PERIOD_S / tpm
        wait_t = new_t - now - PERIOD_S
    if wait_r > EPS or wait_t > EPS:
        by: RefusedBy = "tokens" if wait_t > wait_r else "requests"
        return Outcome(False, by, tat_r - now, tat_t - now, max(wait_r, wait_t)), tat_r, tat_t
    return Outcome(True, None, new_r - now, new_t - now, None), new_r, new_t


def refund(now: float, tat_r: float, tat_t: float, limits: Limits, tokens: int) -> tuple[float, float]:
    """The TATs after giving back one admitted request and its ``tokens`` (never below ``now``:
    a bucket cannot be fuller than full)."""
    if limits.rpm is not None:
        tat_r -= PERIOD_S / limits.rpm
        if tat_r < now:
            tat_r = now
    if limits.tpm is not None and tokens > 0:
        tat_t = charge(now, tat_t, limits.tpm, -tokens)
    return tat_r, tat_t


def charge(now: float, tat_t: float, tpm: int, tokens: int) -> float:
    """The token TAT after charging ``tokens`` (refunds stop at "full", debt is capped)."""
    new = (tat_t if tat_t > now else now) + tokens * PERIOD_S / tpm
    if new < now:
        return now
    cap = now + MAX_DEBT_PERIODS * PERIOD_S
    return cap if new > cap else new


def _remaining(limit: int | None, reset: float) -> int | None:
    if limit is None:
        return None
    # floor() then clamp to [0, limit]: int() truncates instead, which differs only for
    # negative values, and the clamp turns those into 0 either way.
    n = int((PERIOD_S - reset) * limit / PERIOD_S + 1e-6)
    return 0 if n < 0 else limit if n > limit else n


def decision_from(scope: str, limits: Limits, tokens: int, outcome: Outcome) -> Decision:
    """Build the public :class:`Decision` (remaining counts derive from the reset times)."""
    rpm, tpm = limits.rpm, limits.tpm
    return Decision(  # positional: keywords cost ~0.5 µs more, on every request
        outcome.allowed,
        scope,
        rpm,  # limit_requests
        _remaining(rpm, outcome.reset_requests),
        outcome.reset_requests if rpm is not None else 0.0,
        tpm,  # limit_tokens
        _remaining(tpm, outcome.reset_tokens),
        outcome.reset_tokens if tpm is not None else 0.0,
        outcome.retry_after,
        outcome.refused_by,
        tokens,
    )


def unmetered(scope: str) -> Decision:
    """The decision for a scope without RPM/TPM limits (or when the backend is unavailable)."""
    return Decision(allowed=True, scope=scope)


# ---------------------------------------------------------------------------------------
# Memory backend


class MemoryRateLimiter:
    """Limits for one process. Every method runs without awaiting, so asyncio makes it atomic.

    Memory stays bounded: state whose TATs are all in the past carries no information and is
    dropped by a sweep that runs after as many checks as there are keys (amortised O(1)).
    With several worker processes each holds its own counters: use Redis to share limits.
    """

    def __init__(self, *, clock: Clock = time.monotonic, min_sweep_every: int = 1024) -> None:
        self._clock = clock
        self._state: dict[str, list[float]] = {}
        self._in_flight: dict[str, int] = {}
        self._ops = 0
        self._min_sweep_every = min_sweep_every
        self._sweep_every = min_sweep_every

    def __len__(self) -> int:
        """Number of scopes holding state (for tests and the admin API)."""
        return len(self._state)

    async def acquire(self, scope: str, limits: Limits, tokens: int = 0) -> Decision:
        if not limits.metered:
            return unmetered(scope)
        return decision_from(scope, limits, tokens, self.take(scope, limits, tokens))

    async def add_tokens(self, scope: str, limits: Limits, tokens: int) -> None:
        self.charge_tokens(scope, limits, tokens)

    def take(self, scope: str, limits: Limits, tokens: int = 0) -> Outcome:
        """:meth:`acquire` as a plain call returning the raw outcome, for metered ``limits``.

        Admission calls this directly: it saves a coroutine per scope and lets the caller build
        a :class:`Decision` only for the scope whose headers are sent.
        """
        now = self._clock()
        state = self._state.get(scope)
        if state is None:
            outcome, tat_r, tat_t = evaluate(now, now, now, limits, tokens)
            if outcome.allowed:
                self._state[scope] = [tat_r, tat_t]
        else:
            outcome, tat_r, tat_t = evaluate(now, state[0], state[1], limits, tokens)
            if outcome.allowed:
                state[0], state[1] = tat_r, tat_t
        self._ops += 1
        if self._ops >= self._sweep_every:
            self._sweep(now)
        return outcome

    async def refund(self, scope: str, limits: Limits, tokens: int = 0) -> None:
        self.give_back(scope, limits, tokens)

    def give_back(self, scope: str, limits: Limits, tokens: int = 0) -> None:
        """:meth:`refund` as a plain call."""
        state = self._state.get(scope)
        if state is not None:
            state[0], state[1] = refund(self._clock(), state[0], state[1], limits, tokens)

    def charge_tokens(self, scope: str, limits: Limits, tokens: int) -> None:
        """:meth:`add_tokens` as a plain call."""
        tpm = limits.tpm
        if tpm is None or tokens == 0:
            return
        now = self._clock()
        state = self._state.get(scope)
        if state is None:
            self._state[scope] = [now, charge(now, now, tpm, tokens)]
        else:
            state[1] = charge(now, state[1], tpm, tokens)
        self._ops += 1
        if self._ops >= self._sweep_every:
            self._sweep(now)

    def parallel(self, scope: str, max_parallel: int | None) -> AbstractAsyncContextManager[None]:
        return _MemorySlot(self._in_flight, scope, max_parallel)

    async def close(self) -> None:
        self._state.clear()

    def _sweep(self, now: float) -> None:
        """Drop full buckets; runs after as many operations as there are scopes (counted in
        ``_ops`` by the callers, inline: this is the hot path)."""
        self._state = {k: v for k, v in self._state.items() if v[0] > now or v[1] > now}
        self._ops = 0
        self._sweep_every = max(self._min_sweep_every, len(self._state))


class _MemorySlot:
    """A slot among ``max_parallel``; released in ``__aexit__`` without awaiting, so a
    cancelled request can never keep it."""

    __slots__ = ("_counts", "_max", "_scope")

    def __init__(self, counts: dict[str, int], scope: str, max_parallel: int | None) -> None:
        self._counts = counts
        self._scope = scope
        self._max = max_parallel

    async def __aenter__(self) -> None:
        if self._max is None:
            return
        held = self._counts.get(self._scope, 0)
        if held >= self._max:
            raise parallel_error(self._scope, self._max)
        self._counts[self._scope] = held + 1

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._max is None:
            return
        held = self._counts.get(self._scope, 0) - 1
        if held > 0:
            self._counts[self._scope] = held
        else:
            self._counts.pop(self._scope, None)


# ---------------------------------------------------------------------------------------
# Headers and errors


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``8.64s``, ``6m0s``, ``1h2m3s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        ms = round(seconds * 1000)
        return f"{ms if ms > 1 else 1}ms"
    rounded = round(seconds, 3)
    if rounded < 60:
        return f"{rounded:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, secs = divmod(rounded, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if minutes:
        hours, minutes = divmod(int(minutes), 60)
        text = f"{hours}h{minutes}m{text}" if hours else f"{minutes}m{text}"
    return text


def headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    """The ``x-ratelimit-*`` response headers, for each limit that applies to the request."""
    return _header_lines(
        None if decision.limit_requests is None else _limit_line(b"requests", decision.limit_requests),
        decision.remaining_requests,
        decision.reset_requests,
        None if decision.limit_tokens is None else _limit_line(b"tokens", decision.limit_tokens),
        decision.remaining_tokens,
        decision.reset_tokens,
    )


def _limit_line(kind: bytes, limit: int) -> tuple[bytes, bytes]:
    return b"x-ratelimit-limit-" + kind, b"%d" % limit


def _header_lines(
    limit_requests: tuple[bytes, bytes] | None,
    remaining_requests: int | None,
    reset_requests: float,
    limit_tokens: tuple[bytes, bytes] | None,
    remaining_tokens: int | None,
    reset_tokens: float,
) -> list[tuple[bytes, bytes]]:
    """The headers of the limits given (their ``limit`` line ready-made, or None: not limited)."""
    out: list[tuple[bytes, bytes]] = []
    if limit_requests is not None:
        out += (
            limit_requests,
            (b"x-ratelimit-remaining-requests", b"%d" % (remaining_requests or 0)),
            (b"x-ratelimit-reset-requests", format_duration(reset_requests).encode()),
        )
    if limit_tokens is not None:
        out += (
            limit_tokens,
            (b"x-ratelimit-remaining-tokens", b"%d" % (remaining_tokens or 0)),
            (b"x-ratelimit-reset-tokens", format_duration(reset_tokens).encode()),
        )
    return out


class Meter:
    """A scope with its limits, and what never changes between its checks (the header values
    of its limits), for callers that check the same scope on every request (admission keeps
    one per key). :meth:`headers` answers from a raw :class:`Outcome` of this scope."""

    __slots__ = ("_limit_requests", "_limit_tokens", "label", "limits", "scope")

    def __init__(self, scope: str, limits: Limits) -> None:
        self.scope = scope
        self.limits = limits
        self.label = scope.partition(":")[0]
        """The metrics label of the scope (``key:<id>`` counts as ``key``)."""
        rpm, tpm = limits.rpm, limits.tpm
        self._limit_requests = None if rpm is None else _limit_line(b"requests", rpm)
        self._limit_tokens = None if tpm is None else _limit_line(b"tokens", tpm)

    def decision(self, tokens: int, outcome: Outcome) -> Decision:
        return decision_from(self.scope, self.limits, tokens, outcome)

    def headers(self, outcome: Outcome) -> list[tuple[bytes, bytes]]:
        """``headers(self.decision(tokens, outcome))``, the same list, without the Decision."""
        limits = self.limits
        return _header_lines(
            self._limit_requests,
            _remaining(limits.rpm, outcome.reset_requests),
            outcome.reset_requests,
            self._limit_tokens,
            _remaining(limits.tpm, outcome.reset_tokens),
            outcome.reset_tokens,
        )


def describe_scope(scope: str) -> str:
    """Who a limit belongs to, in words a client understands."""
    if scope == "global":
        return "the gateway (global limit shared by all keys)"
    kind, _, name = scope.partition(":")
    if kind == "key" and name:
        return f"API key '{name}' (per-key limit)"
    if kind == "model" and name:
        return f"model '{name}' (per-model limit)"
    return f"'{scope}'"


def rate_limit_error(decision: Decision) -> RateLimitError:
    """The 429 for a refused decision: says which limit, how much, and when to retry."""
    who = describe_scope(decision.scope)
    extra = {k.decode(): v.decode() for k, v in headers(decision)}
    if decision.oversized:
        return RateLimitError(
            f"this request needs ~{decision.tokens} tokens, more than the whole limit of "
            f"{decision.limit_tokens} tokens per minute for {who}, so it can never be admitted; "
            "send a shorter prompt or ask the operator for a higher tpm",
            code="request_exceeds_tpm",
            headers=extra,
        )
    retry = decision.retry_after or 0.0
    if decision.refused_by == "tokens":
        what = (
            f"{decision.limit_tokens} tokens per minute (this request needs ~{decision.tokens}, "
            f"{decision.remaining_tokens} left)"
        )
    else:
        what = f"{decision.limit_requests} requests per minute"
    return RateLimitError(
        f"rate limit of {what} reached for {who}; retry in {format_duration(retry)}",
        retry_after=retry,
        headers=extra,
    )


def parallel_error(scope: str, max_parallel: int, retry_after: float = 1.0) -> RateLimitError:
    """The 429 for a full concurrency limit; the retry hint is a guess (requests end any time)."""
    return RateLimitError(
        f"concurrency limit of {max_parallel} requests in flight reached for {describe_scope(scope)}; "
        f"retry when one of them has finished (in about {format_duration(retry_after)})",
        retry_after=retry_after,
        code="concurrency_limit_exceeded",
    )


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """A cheap upper-ish estimate of prompt tokens (~4 characters each) for TPM admission.

    Exact tokenizers cost far more than the whole hot-path budget; the estimate is corrected
    with :meth:`RateLimiter.add_tokens` once the provider reports real usage.
    """
    chars = 0
    messages = body.get("messages") or ()
    for message in messages:
        # ``type(...) is dict`` first: JSON bodies hold plain dicts, and isinstance against
        # the Mapping ABC costs more than the rest of the loop.
        if type(message) is dict or isinstance(message, Mapping):
            content = message.get("content")
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                        chars += len(part["text"])
    given = body.get("input")
    if given is not None:
        chars += _input_chars(given)
    return (chars + 3) // 4 + 4 * len(messages)


def _input_chars(given: Any) -> int:
    """Characters of an embeddings ``input``: text, texts, token ids (4 "characters" each)."""
    if isinstance(given, str):
        return len(given)
    if not isinstance(given, list):
        return 0
    chars = 0
    for item in given:
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, list):
            chars += 4 * len(item)
        else:
            chars += 4
    return chars


# ---------------------------------------------------------------------------------------


def build_rate_limiter(redis_url: str | None, **options: Any) -> RateLimiter:
    """Memory when no Redis is configured, else Redis (limits shared by every replica).

    The Redis client library is imported only here, so a gateway without Redis never loads it.
    """
    if not redis_url:
        return MemoryRateLimiter(**options)
    from .ratelimit_redis import RedisRateLimiter

    return RedisRateLimiter.from_url(redis_url, **options)

"""The admission stage: per-key and global rate limits, before any provider is called.

``admit`` checks requests/tokens per minute (estimated prompt tokens) for the caller's key,
then for the whole gateway, and takes a concurrency slot in each; it returns the slot holder,
which the pipeline closes when the response (or the stream) ends. ``settle`` corrects the
token estimate with the real usage, so TPM tracks what the provider actually counted.

This runs on every request, so it keeps per key what never changes between its requests (its
limits, scope name, header values: a :class:`_Plan` per Principal), and with the memory backend
and no concurrency limit it checks both scopes with plain calls (:meth:`MemoryRateLimiter.take`)
and builds a :class:`Decision` only for the scope whose headers are sent, and only when asked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import RateLimitError
from ..security.auth import Principal
from .ratelimit import (
    Decision,
    Limits,
    MemoryRateLimiter,
    Meter,
    Outcome,
    RateLimiter,
    estimate_tokens,
    headers,
    rate_limit_error,
)

if TYPE_CHECKING:
    from ..observability.metrics import Metrics

_MAX_PLANS = 10_000
"""Keys whose plan is kept; past that the cache starts over (a plan costs a few µs to build)."""


class _Plan:
    """How one key is admitted, built once per Principal (a new Principal, e.g. after the key
    cache reloaded an edited key, gets a new plan)."""

    __slots__ = ("charged", "estimate", "metered", "principal", "scopes", "take")

    def __init__(
        self,
        principal: Principal,
        key: Meter,
        global_: Meter,
        estimate: bool,
        take: Callable[[str, Limits, int], Outcome] | None,
    ) -> None:
        self.principal = principal
        self.scopes = (key, global_)
        self.metered = tuple(m for m in self.scopes if m.limits.metered)
        self.charged = tuple(m for m in self.metered if m.limits.tpm is not None)
        # The estimate walks every message: only pay for it when some TPM limit will use it.
        self.estimate = estimate or key.limits.tpm is not None
        # Plain calls when nothing has to be awaited: the memory backend and no slot to hold.
        self.take = take if all(m.limits.max_parallel is None for m in self.scopes) else None


class Admitted:
    """What ``admit`` let in: the decision (for headers) and the slots to release."""

    __slots__ = ("_decision", "_meter", "_outcome", "charged", "slots", "tokens")

    def __init__(self, tokens: int, charged: tuple[Meter, ...] = ()) -> None:
        self.tokens = tokens
        self.charged = charged  # the admitted scopes with a TPM limit, which ``settle`` corrects
        self.slots: contextlib.AsyncExitStack | None = None  # only when a parallel limit applies
        # The first metered scope's answer, for x-ratelimit-*: a Decision from the backend, or
        # (plain-call path) the raw outcome, turned into a Decision only if someone asks.
        self._decision: Decision | None = None
        self._meter: Meter | None = None
        self._outcome: Outcome | None = None

    @property
    def decision(self) -> Decision | None:
        """The first metered scope's decision (key, else global); None when neither is metered."""
        if self._decision is None and self._meter is not None and self._outcome is not None:
            self._decision = self._meter.decision(self.tokens, self._outcome)
        return self._decision

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``ratelimit.headers(self.decision)`` (empty when unmetered), without building it."""
        if self._meter is not None and self._outcome is not None:
            return self._meter.headers(self._outcome)
        return [] if self._decision is None else headers(self._decision)

    async def release(self) -> None:
        if self.slots is not None:
            await self.slots.aclose()


class Admission:
    def __init__(
        self,
        limiter: RateLimiter,
        global_limits: Limits,
        *,
        estimate: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        """``estimate``: estimate prompt tokens even with no TPM limit here (a provider has one).

        ``metrics`` counts each refusal by scope (``key`` or ``global``).
        """
        self.limiter = limiter
        self.global_limits = global_limits
        self.estimate = estimate or global_limits.tpm is not None
        self.metrics = metrics
        self._global = Meter("global", global_limits)
        # The memory backend never awaits, so it can be called without coroutines.
        self._memory = limiter if isinstance(limiter, MemoryRateLimiter) else None
        self._plans: dict[str, _Plan] = {}

    async def admit(self, principal: Principal, body: dict[str, Any]) -> Admitted:
        """Count the request against its key and the gateway, or raise a 429 saying which."""
        plan = self._plans.get(principal.key_id)
        if plan is None or plan.principal is not principal:
            plan = self._plan(principal)
        tokens = estimate_tokens(body) if plan.estimate else 0
        admitted = Admitted(tokens, plan.charged)
        take = plan.take
        if take is None:
            await self._acquire(plan.scopes, admitted)
            return admitted
        # Plain calls, in the same order and with the same effects as ``_acquire``.
        for i, meter in enumerate(plan.metered):
            outcome = take(meter.scope, meter.limits, tokens)
            if not outcome.allowed:
                assert self._memory is not None  # ``take`` is its method
                for earlier in plan.metered[:i]:  # refused: the scopes that counted it give it back
                    self._memory.give_back(earlier.scope, earlier.limits, tokens)
                self._refused(meter.label)
                raise rate_limit_error(meter.decision(tokens, outcome))
            if admitted._meter is None:
                admitted._meter, admitted._outcome = meter, outcome
        return admitted

    def _plan(self, principal: Principal) -> _Plan:
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        key = Meter(f"key:{principal.key_id}", Limits(principal.rpm, principal.tpm, principal.max_parallel))
        take = self._memory.take if self._memory is not None else None
        plan = self._plans[principal.key_id] = _Plan(principal, key, self._global, self.estimate, take)
        return plan

    async def _acquire(self, scopes: tuple[Meter, ...], admitted: Admitted) -> None:
        """Each scope through the backend's coroutines, taking its concurrency slot if any.

        A scope that refuses undoes what the ones before it took: their slots are released and
        the request and its tokens given back, so a refused request counts nowhere."""
        counted: list[Meter] = []
        for meter in scopes:
            limits = meter.limits
            if limits.metered:
                decision = await self.limiter.acquire(meter.scope, limits, admitted.tokens)
                if not decision.allowed:
                    await self._undo(admitted, counted)
                    self._refused(meter.label)
                    raise rate_limit_error(decision)
                counted.append(meter)
                if admitted._decision is None:
                    admitted._decision = decision
            if limits.max_parallel is not None:
                if admitted.slots is None:
                    admitted.slots = contextlib.AsyncExitStack()
                try:
                    await admitted.slots.enter_async_context(
                        self.limiter.parallel(meter.scope, limits.max_parallel)
                    )
                except BaseException as exc:
                    await self._undo(admitted, counted)
                    if isinstance(exc, RateLimitError):
                        self._refused(meter.label)
                    raise

    async def _undo(self, admitted: Admitted, counted: list[Meter]) -> None:
        """Release the slots taken and give back the request to the scopes that counted it."""
        try:
            await admitted.release()
        finally:
            for meter in counted:
                await self.limiter.refund(meter.scope, meter.limits, admitted.tokens)

    def _refused(self, label: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_rate_limited(label)

    async def settle(self, admitted: Admitted, usage: dict[str, Any] | None) -> None:
        """Charge the difference between the real token count and the admission estimate."""
        if not admitted.charged or not usage:
            return
        delta = int(usage.get("total_tokens") or 0) - admitted.tokens
        if delta:
            memory = self._memory
            for meter in admitted.charged:
                if memory is not None:
                    memory.charge_tokens(meter.scope, meter.limits, delta)
                else:
                    await self.limiter.add_tokens(meter.scope, meter.limits, delta)

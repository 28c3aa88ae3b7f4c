"""Client-side throttle per provider (``providers.X.rpm`` / ``tpm``): the same GCRA arithmetic
as the admission limits (``ratelimit.py``), but it may wait for room instead of refusing."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

from ..errors import UpstreamRateLimitError
from .ratelimit import EPS, PERIOD_S, Clock, Limits, charge, format_duration


class ProviderThrottle:
    """Keeps the gateway under a provider's own RPM/TPM (``providers.X.rpm/tpm``).

    Unlike the admission limiter it may *wait*: when the limit frees up within ``max_wait_s``
    the call reserves its place (GCRA reservations are first come, first served) and sleeps;
    otherwise it fails at once with a retryable 429 so failover can try another deployment.
    A request larger than the whole TPM waits for a full bucket instead of failing forever.
    """

    def __init__(
        self,
        provider: str,
        rpm: int | None = None,
        tpm: int | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.provider = provider
        self.limits = Limits(rpm=rpm, tpm=tpm)
        self._clock = clock
        self._sleep = sleep
        self._tat_r = self._tat_t = -math.inf

    async def wait_or_fail(self, tokens: int = 0, max_wait_s: float = 1.0) -> None:
        """Return when the call may go ahead; raise UpstreamRateLimitError if that is too far."""
        rpm, tpm = self.limits.rpm, self.limits.tpm
        now = self._clock()
        step_r = PERIOD_S / rpm if rpm is not None else 0.0
        cost_t = min(max(tokens, 0), tpm) * PERIOD_S / tpm if tpm is not None else 0.0
        new_r = max(self._tat_r, now) + step_r
        new_t = max(self._tat_t, now) + cost_t
        wait_r = new_r - now - PERIOD_S if rpm is not None else 0.0
        wait_t = new_t - now - PERIOD_S if tpm is not None else 0.0
        wait = max(wait_r, wait_t, 0.0)
        if wait > max_wait_s:
            raise self._error(wait, "tokens" if wait_t > wait_r else "requests")
        self._tat_r, self._tat_t = new_r, new_t
        if wait <= EPS:
            return
        try:
            await self._sleep(wait)
        except BaseException:
            self._tat_r -= step_r  # give the unused reservation back
            self._tat_t -= cost_t
            raise

    def add_tokens(self, tokens: int) -> None:
        """Charge completion tokens (or correct the estimate) once usage is known."""
        if self.limits.tpm is not None and tokens:
            self._tat_t = charge(self._clock(), self._tat_t, self.limits.tpm, tokens)

    def _error(self, wait: float, kind: str) -> UpstreamRateLimitError:
        limit = self.limits.rpm if kind == "requests" else self.limits.tpm
        return UpstreamRateLimitError(
            f"provider '{self.provider}' is at its configured limit of {limit} {kind} per minute "
            f"(providers.{self.provider}.{'rpm' if kind == 'requests' else 'tpm'}); "
            f"retry in {format_duration(wait)}",
            provider=self.provider,
            retry_after=wait,
            code="provider_throttled",
        )

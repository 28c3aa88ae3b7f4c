"""The admission stage: per-key and global rate limits, before any provider is called.

``admit`` checks requests/tokens per minute (estimated prompt tokens) for the caller's key,
then for the whole gateway, and takes a concurrency slot in each; it returns the slot holder,
which the pipeline closes when the response (or the stream) ends. ``settle`` corrects the
token estimate with the real usage, so TPM tracks what the provider actually counted.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from ..errors import RateLimitError
from ..security.auth import Principal
from .ratelimit import Decision, Limits, RateLimiter, estimate_tokens, rate_limit_error

if TYPE_CHECKING:
    from ..observability.metrics import Metrics


class Admitted:
    """What ``admit`` let in: the decisions (for headers) and the slots to release."""

    __slots__ = ("decision", "scopes", "slots", "tokens")

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.decision: Decision | None = None  # the first metered scope's, for x-ratelimit-*
        self.scopes: list[tuple[str, Limits]] = []
        self.slots: contextlib.AsyncExitStack | None = None  # only when a parallel limit applies

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

    async def admit(self, principal: Principal, body: dict[str, Any]) -> Admitted:
        """Count the request against its key and the gateway, or raise a 429 saying which."""
        key_limits = Limits(principal.rpm, principal.tpm, principal.max_parallel)
        # The estimate walks every message: only pay for it when some TPM limit will use it.
        admitted = Admitted(estimate_tokens(body) if self.estimate or key_limits.tpm else 0)
        for scope, limits in ((f"key:{principal.key_id}", key_limits), ("global", self.global_limits)):
            if limits.metered:
                decision = await self.limiter.acquire(scope, limits, admitted.tokens)
                if not decision.allowed:
                    await admitted.release()
                    self._refused(scope)
                    raise rate_limit_error(decision)
                admitted.scopes.append((scope, limits))
                if admitted.decision is None:
                    admitted.decision = decision
            if limits.max_parallel is not None:
                if admitted.slots is None:
                    admitted.slots = contextlib.AsyncExitStack()
                try:
                    await admitted.slots.enter_async_context(
                        self.limiter.parallel(scope, limits.max_parallel)
                    )
                except BaseException as exc:
                    await admitted.release()
                    if isinstance(exc, RateLimitError):
                        self._refused(scope)
                    raise
        return admitted

    def _refused(self, scope: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_rate_limited(scope.partition(":")[0])  # key:<id> counts as "key"

    async def settle(self, admitted: Admitted, usage: dict[str, Any] | None) -> None:
        """Charge the difference between the real token count and the admission estimate."""
        if not admitted.scopes or not usage:
            return
        actual = int(usage.get("total_tokens") or 0)
        delta = actual - admitted.tokens
        if delta:
            for scope, limits in admitted.scopes:
                if limits.tpm is not None:
                    await self.limiter.add_tokens(scope, limits, delta)

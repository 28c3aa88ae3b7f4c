"""Retry policy for one deployment: exponential backoff with full jitter, bounded.

Only retryable upstream errors are retried, never after the first byte reached the client
(the pipeline only retries before a stream's first chunk). A provider's ``retry-after`` is
honoured; when it (or the backoff) would pass the request's deadline or the policy's longest
wait, the pipeline moves to the next deployment instead of waiting.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import UpstreamError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 1
    backoff_s: float = 0.25
    backoff_max_s: float = 4.0

    def delay(self, retry: int, error: UpstreamError, remaining: float | None) -> float | None:
        """Seconds to wait before retry number ``retry`` (0-based), or None to give up here."""
        if not error.retryable or retry >= self.max_retries:
            return None
        if error.retry_after is not None:
            wait = error.retry_after
        else:
            wait = random.uniform(0, min(self.backoff_max_s, self.backoff_s * (2**retry)))
        if wait > self.backoff_max_s or (remaining is not None and wait >= remaining):
            return None
        return wait

"""Key changes announced to every replica through Redis pub/sub.

Without Redis, a replica learns of another replica's revocation only when its cached entry
expires (``auth.key_cache_ttl_s``, see ``keycache.py``). With ``redis.url`` set:

- every committed change made through :class:`~tokyo_ia.security.keys.KeyService` (the admin
  API, ``tokyo-ia keys revoke|rotate``; ``PATCH`` such as ``enabled: false``) publishes the
  key's SHA-256 digest on :data:`CHANNEL` (:func:`announcer`);
- every gateway process listens on that channel (:class:`KeySubscriber`, one background task)
  and drops the key from its :class:`~tokyo_ia.security.keycache.KeyCache`, so the change is in
  force on every replica within one pub/sub delivery (milliseconds);
- a listener that loses Redis reconnects with exponential back-off, and once subscribed again
  clears its whole cache: announcements made meanwhile are lost (pub/sub does not queue).
  While Redis is away the TTL is the bound again, never worse.

The digest is what the database stores, never the key, so a reader of the channel learns
nothing that authenticates. An announcement that fails never fails the change: the database
change is committed first, and the TTL still bounds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from ..redis_client import Outage, connect
from .keycache import KeyCache

log = logging.getLogger("tokyo_ia.keys")

CHANNEL = "tokyo-ia:keys:invalidate"
_DIGEST = re.compile(r"[0-9a-f]{64}")


def announcer(redis: Redis, channel: str = CHANNEL) -> Callable[[str, str], Awaitable[None]]:
    """A :meth:`KeyService.on_change` listener that publishes each changed key's digest."""

    async def announce(key_id: str, key_hash: str) -> None:
        try:
            await redis.publish(channel, key_hash)
        except (RedisError, OSError) as exc:
            log.warning(
                "key %s changed, but other replicas could not be told (Redis: %s); "
                "they apply the change within auth.key_cache_ttl_s",
                key_id,
                exc,
            )

    return announce


class KeySubscriber:
    """Drop keys from ``cache`` as other processes announce changes; survive Redis outages.

    Uses its own connection, without redis-py's silent reconnect: a reconnect must be seen
    here, because it means announcements may have been missed and the cache must be cleared.
    A connection that stays silent for ``ping_every_s`` is pinged; no answer by the next
    interval counts as lost (a half-open TCP connection otherwise looks like a quiet channel).
    """

    def __init__(
        self,
        url: str,
        cache: KeyCache,
        *,
        channel: str = CHANNEL,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        ping_every_s: float = 5.0,
    ) -> None:
        self.url = url
        self.cache = cache
        self.channel = channel
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.ping_every_s = ping_every_s
        self.subscribed = asyncio.Event()
        """Set while listening; cleared as soon as the connection is lost."""
        self.connections = 0
        """How many times a subscription was (re-)established."""
        self._outage = Outage(log, cooldown_s=0.0)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tokyo-ia key invalidation")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.subscribed.clear()

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._listen()
            except Exception as exc:  # noqa: BLE001 - the listener must outlive any failure
                if self.subscribed.is_set():
                    failures = 0
                self.subscribed.clear()
                self._outage.warn(
                    f"key invalidation: lost Redis ({type(exc).__name__}: {exc}); reconnecting. "
                    "Meanwhile changes on other replicas apply within auth.key_cache_ttl_s"
                )
            await asyncio.sleep(min(self.max_backoff_s, self.backoff_s * 2**failures))
            failures += 1

    async def _listen(self) -> None:
        """Subscribe and apply announcements until the connection fails (always raises)."""
        client = connect(self.url, retry=Retry(NoBackoff(), 0))
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            pinged = False
            while True:
                message = await pubsub.get_message(timeout=self.ping_every_s)
                if message is None:
                    if pinged:
                        raise RedisConnectionError(f"no answer to PING within {self.ping_every_s} s")
                    await pubsub.ping()
                    pinged = True
                    continue
                pinged = False
                kind = message["type"]
                if kind == "subscribe":
                    # Only now is the subscription in force: whatever changed before is unknown.
                    self.cache.clear()
                    self.connections += 1
                    self.subscribed.set()
                    log.info("key invalidation: listening on Redis channel %s", self.channel)
                elif kind == "message":
                    self._apply(message["data"])
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            with contextlib.suppress(Exception):
                await client.aclose()

    def _apply(self, data: bytes | str) -> None:
        text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
        if _DIGEST.fullmatch(text):
            self.cache.invalidate(text)
        else:  # not ours, or a newer format: forgetting everything is always safe
            self.cache.clear()

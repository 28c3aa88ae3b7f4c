"""Request coalescing: identical requests in flight at the same time share one upstream call.

In one process (:class:`Coalescer`)
    The first caller for a key starts the upstream call as a *separate task*; it and every
    later caller with the same key wait on that task. Nobody owns it: when a waiter is
    cancelled (its client went away) only that waiter leaves, and the shared call keeps running
    as long as anyone still waits — the first caller included, so cancelling the "leader"
    never leaves the others hanging. When the last waiter leaves, the call is cancelled: nobody
    wants its answer. An exception of the shared call is raised in every waiter.

    The shared task copies the first caller's context (contextvars: request id, trace span).
    Results and chunks are shared objects: treat them as read-only (or pass ``clone``).

    Whether a request was served by its own call is known from whether its own ``factory``
    ran; that is how the pipeline tells ``x-tokyo-ia-cache: miss`` from ``coalesced``.

Streams (:meth:`Coalescer.stream`)
    One upstream stream is read by a pump task and fanned out to every reader as chunks
    arrive. A reader that joins late first gets the chunks produced so far. Memory is bounded
    per stream by ``max_stream_chunks``: once more chunks than that have been produced the
    stream stops taking new readers (they start their own call), and chunks every reader has
    seen are dropped. When the slowest reader is ``max_stream_chunks`` behind, the pump waits
    for it up to ``lag_grace_s``, then cuts it off with :class:`StreamLaggedError`: one stalled
    client can delay the others by at most that long and can never make the buffer grow.

Across replicas (:class:`~.redis.RedisCoalescer`)
    Coalesces locally first, then takes a short Redis lock per key (``SET NX PX``, renewed
    while the call runs, so a crashed replica's lock expires within ``lock_ttl_s``). The
    replica holding the lock calls upstream; its factory stores the entry in the cache before
    returning. Other replicas poll the cache with exponential backoff. If the lock disappears
    without an entry (the call failed, or the answer was not cacheable) a waiter tries to take
    the lock itself; after ``wait_s``, or when Redis fails, it calls upstream on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

from ..errors import UpstreamError
from ..providers.base import aclose as _aclose
from .base import JSON

T = TypeVar("T")
log = logging.getLogger("tokyo_ia.cache")


class StreamLaggedError(UpstreamError):
    """A coalesced stream reader fell too far behind the shared upstream stream."""

    code = "stream_reader_lagged"


class _Call(Generic[T]):
    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task[T]) -> None:
        self.task = task
        self.waiters = 0


class Coalescer:
    """In-process coalescing of calls (:meth:`run`) and streams (:meth:`stream`)."""

    def __init__(
        self,
        *,
        max_stream_chunks: int = 4096,
        lag_grace_s: float = 2.0,
        clone: Callable[[Any], Any] | None = None,
    ) -> None:
        if max_stream_chunks < 1:
            raise ValueError("max_stream_chunks must be at least 1")
        self.max_stream_chunks = max_stream_chunks
        self.lag_grace_s = lag_grace_s
        self.clone = clone
        self.led = 0
        self.coalesced = 0
        self._calls: dict[str, _Call[Any]] = {}
        self._feeds: dict[str, _Feed] = {}

    def stats(self) -> dict[str, int]:
        return {
            "led": self.led,
            "coalesced": self.coalesced,
            "in_flight": len(self._calls) + len(self._feeds),
        }

    async def run(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        """``await factory()``, shared with every concurrent caller using the same ``key``."""
        call: _Call[T] | None = self._calls.get(key)
        follower = call is not None
        if call is None:
            call = _Call(asyncio.create_task(_await(factory)))
            self._calls[key] = call
            call.task.add_done_callback(lambda _: self._forget_call(key, call))
            self.led += 1
        else:
            self.coalesced += 1
        call.waiters += 1
        try:
            result = await asyncio.shield(call.task)
        except asyncio.CancelledError:
            if call.task.cancelled() and not _cancelling():
                raise UpstreamError("the shared upstream call was cancelled", retryable=True) from None
            raise
        finally:
            call.waiters -= 1
            if call.waiters == 0 and not call.task.done():
                self._forget_call(key, call)
                call.task.cancel()
        return self.clone(result) if follower and self.clone is not None else result

    def _forget_call(self, key: str, call: _Call[Any]) -> None:
        if self._calls.get(key) is call:
            del self._calls[key]

    async def stream(
        self, key: str, factory: Callable[[], AsyncIterator[JSON]]
    ) -> AsyncGenerator[JSON, None]:
        """The chunks of ``factory()``'s stream, shared with concurrent readers of ``key``.

        Nothing starts until the first chunk is asked for. Close the iterator (``aclose``)
        when done with it early: that is how a reader leaves.
        """
        feed = self._feeds.get(key)
        if feed is None or not feed.joinable:
            feed = _Feed(self.max_stream_chunks, self.lag_grace_s, lambda f: self._forget_feed(key, f))
            self._feeds[key] = feed
            self.led += 1
            reader = feed.join()
            feed.start(factory)
        else:
            self.coalesced += 1
            reader = feed.join()
        try:
            async with contextlib.aclosing(feed.read(reader)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            feed.leave(reader)

    def _forget_feed(self, key: str, feed: _Feed) -> None:
        if self._feeds.get(key) is feed:
            del self._feeds[key]


async def _await(factory: Callable[[], Awaitable[T]]) -> T:
    return await factory()


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _Feed:
    """One upstream stream, its bounded buffer, and the positions of its readers."""

    def __init__(
        self, max_chunks: int, lag_grace_s: float, close_to_joiners: Callable[[_Feed], None]
    ) -> None:
        self.max_chunks = max_chunks
        self.lag_grace_s = lag_grace_s
        self.joinable = True
        self.buffer: list[JSON] = []
        self.base = 0  # absolute index of buffer[0]
        self.positions: dict[int, int] = {}  # reader id -> absolute index of its next chunk
        self.lagged: set[int] = set()
        self.done = False
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None
        self._close_to_joiners = close_to_joiners
        self._wakeup = asyncio.Event()
        self._room: asyncio.Event | None = None  # set by readers while the pump waits for room
        self._next_id = 0

    @property
    def head(self) -> int:
        return self.base + len(self.buffer)

    def join(self) -> int:
        reader, self._next_id = self._next_id, self._next_id + 1
        self.positions[reader] = self.base  # base stays 0 while the feed is joinable
        return reader

    def start(self, factory: Callable[[], AsyncIterator[JSON]]) -> None:
        self.task = asyncio.create_task(self._pump(factory))

    def leave(self, reader: int) -> None:
        self.positions.pop(reader, None)
        self.lagged.discard(reader)
        if self._room is not None:
            self._room.set()  # the slowest reader may be the one that left
        if not self.positions and not self.done and self.task is not None:
            self._stop_joining()
            self.task.cancel()  # nobody is reading any more

    async def read(self, reader: int) -> AsyncGenerator[JSON, None]:
        while True:
            if reader in self.lagged:
                raise StreamLaggedError(
                    f"the response was produced faster than it was read (over {self.max_chunks} chunks "
                    "behind); read the stream faster or retry",
                    retryable=False,
                )
            position = self.positions[reader]
            if position < self.head:
                self.positions[reader] = position + 1
                if self._room is not None:
                    self._room.set()
                yield self.buffer[position - self.base]
            elif self.done:
                if self.error is not None:
                    raise self.error
                return
            else:
                await self._wakeup.wait()

    async def _pump(self, factory: Callable[[], AsyncIterator[JSON]]) -> None:
        iterator: AsyncIterator[JSON] | None = None
        try:
            iterator = factory()
            async for chunk in iterator:
                if len(self.buffer) >= self.max_chunks:
                    await self._make_room()
                self.buffer.append(chunk)
                self._wake()
        except asyncio.CancelledError:
            self.error = UpstreamError("the shared upstream stream was cancelled", retryable=True)
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every reader, who re-raises it
            self.error = exc
        finally:
            self.done = True
            self._stop_joining()
            self._wake()
            if iterator is not None:
                await _aclose(iterator)

    async def _make_room(self) -> None:
        """Wait (up to ``lag_grace_s``) for the slowest readers, then cut them off.

        From now on the buffer is trimmed, so the stream no longer takes readers: a late
        joiner would need chunks that are gone.
        """
        self._stop_joining()
        deadline = asyncio.get_running_loop().time() + self.lag_grace_s
        while True:
            self._trim()
            if len(self.buffer) < self.max_chunks:
                return
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                self._cut_off(self.base)
                continue
            self._room = asyncio.Event()
            try:
                async with asyncio.timeout(remaining):
                    await self._room.wait()
            except TimeoutError:
                pass
            finally:
                self._room = None

    def _trim(self) -> None:
        """Drop the chunks every reader has read."""
        low = min(self.positions.values(), default=self.head)
        del self.buffer[: low - self.base]
        self.base = low

    def _cut_off(self, position: int) -> None:
        for reader, at in list(self.positions.items()):
            if at <= position:
                self.lagged.add(reader)
                del self.positions[reader]
        self._wake()

    def _stop_joining(self) -> None:
        if self.joinable:
            self.joinable = False
            self._close_to_joiners(self)

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()

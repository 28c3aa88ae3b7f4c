"""Writing rows in batches from a background task: the machinery behind the audit trail and the
spend ledger (DESIGN.md: "the hot path never waits on the database").

What every writer built on :class:`BatchWriter` guarantees:

- **Never on the hot path.** :meth:`BatchWriter.record` only appends to an in-memory deque; a
  background task writes batches, one :meth:`~BatchWriter.write` call each, every
  ``flush_interval_s`` or as soon as ``batch_size`` items wait. :meth:`BatchWriter.close`
  drains the queue, so a SIGTERM (uvicorn's lifespan shutdown) loses nothing that was recorded.
- **Bounded memory.** When the database cannot keep up (or is down) and ``max_queue`` items
  wait, the *oldest* item is dropped: the caller must never block or fail because of
  book-keeping, and the newest items describe what is happening now. Drops are counted
  (``dropped``) and logged at most every ``_WARN_EVERY_S`` seconds; a subclass may also turn
  them into an item of its own (:meth:`BatchWriter.drop_marker`), as the audit trail does.
- **Outages delay, they do not lose.** A batch the database refuses goes back to the front of
  the queue and is retried on the next tick (up to ``max_queue`` items).

On SQLite the writers skip SQLAlchemy's statement machinery for their INSERTs: turning dicts
into parameters row by row (``construct_params``, the types' bind processors) cost the loop
more than SQLite's own work on the row. They build tuples in column order, already in the form
SQLAlchemy's types would bind (:func:`sqlite_datetime`; the JSON and money columns in their
own modules), and hand them to the driver's ``executemany`` (``exec_driver_sql`` with
:func:`sqlite_insert`). Tests check that both paths store the same values. PostgreSQL keeps
the Core ``INSERT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import orjson
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

T = TypeVar("T")

_WARN_EVERY_S = 10.0
_CLOSE_ATTEMPTS = 3
SLICE = 20
"""Rows per INSERT statement inside a batch's transaction (see :func:`slices`): a quarter of a
millisecond of the loop's time at the 10-15 µs a row either writer costs on SQLite. Measured at
one connection (bench/): 50-row slices gave an added p99 of ~1.8 ms, 20-row ones ~1.3 ms, 10-row
ones no better than 20."""
MAX_SLICE = 80
"""The largest slice a writer that is behind uses: about a millisecond of the loop's time."""
_CATCH_UP = 10
"""A writer that is behind takes up to this many batches' worth of items in one write."""


def sqlite_insert(table: Table, columns: Sequence[str]) -> str:
    """An ``INSERT`` of ``columns`` into ``table`` with ``?`` placeholders, for ``executemany``
    with tuples in that order. Unknown columns fail here, at import, not at the first write."""
    names = ", ".join(table.c[name].name for name in columns)
    return f"INSERT INTO {table.name} ({names}) VALUES ({', '.join('?' * len(columns))})"


def cut_text(value: Any, width: int) -> str | None:
    """Text cut to its column's width (store/models.py), so one row never poisons a batch."""
    return None if value is None else str(value)[:width]


_SQLITE_DATETIME = "%04d-%02d-%02d %02d:%02d:%02d.%06d"


def sqlite_datetime(value: datetime) -> str:
    """``value`` as a ``UTCDateTime`` column stores it on SQLite: the UTC wall time as text,
    e.g. ``2025-03-15 12:05:57.105542`` (naive values are taken to be UTC already)."""
    if value.tzinfo is not None and value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    if type(value) is datetime and value.microsecond:
        # orjson spells it "2025-03-15T12:05:57.105542+00:00" in half the time of the format
        # below, but leaves out a zero fraction (tests hold the two equal).
        return orjson.dumps(value)[1:27].decode().replace("T", " ")
    return _SQLITE_DATETIME % (
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


async def slices(items: list[T], size: int | None = None) -> AsyncIterator[list[T]]:
    """``items`` in slices of ``size``, letting the event loop run between them.

    Turning rows into statement parameters is Python work done on the event loop; a large
    batch in one go would stall every request for milliseconds. Writers insert slice by
    slice inside one transaction, so requests interleave and the batch stays all or nothing.
    """
    # A writer that is behind hands over big batches (see _take_batch): then it needs its rows
    # written more than the loop needs the shortest stalls, and each slice costs a loop turn,
    # so a big batch goes in bigger slices, up to MAX_SLICE; an ordinary one in SLICE rows.
    size = size or min(max(SLICE, len(items) // 8), MAX_SLICE)
    for start in range(0, len(items), size):
        if start:
            await asyncio.sleep(0)
        yield items[start : start + size]


class BatchWriter(ABC, Generic[T]):
    """Queues items in memory and hands them to :meth:`write` in batches from a background task.

    Create it anywhere, call :meth:`start` inside the running event loop, :meth:`close` on
    shutdown. ``record`` works before ``start`` (items wait) and is a no-op counted as a drop
    after ``close``. Subclasses set ``label`` (names the writer in log lines) and ``logger``.
    """

    label = "batch"
    logger = logging.getLogger("tokyo_ia.store")

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        *,
        batch_size: int = 200,
        flush_interval_s: float = 1.0,
        max_queue: int = 100_000,
    ) -> None:
        if batch_size < 1 or max_queue < 1 or flush_interval_s <= 0:
            raise ValueError("batch_size and max_queue must be >= 1 and flush_interval_s > 0")
        self.sessions = session_factory
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_queue = max_queue
        self._queue: deque[T] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: Items dropped since start, and the part not yet handed to :meth:`drop_marker`.
        self.dropped = 0
        self._dropped_unreported = 0
        self._last_warning = float("-inf")
        #: Batches written (one :meth:`write` call each) and items in them; for tests and metrics.
        self.batches_written = 0
        self.items_written = 0

    @abstractmethod
    async def write(self, items: list[T]) -> None:
        """Store one batch, all or nothing (one transaction); raise if the database refuses it."""

    def drop_marker(self, count: int) -> T | None:
        """An item recording that ``count`` items were dropped, written first in the next batch.

        The default writes none: drops are only counted and logged.
        """
        return None

    @property
    def pending(self) -> int:
        return len(self._queue)

    def record(self, item: T) -> None:
        """Queue ``item``; O(1), never blocks, never touches the database, never raises."""
        if self._closed:
            self._drop(1, f"the {self.label} writer is closed")
            return
        if len(self._queue) >= self.max_queue:
            self._queue.popleft()
            self._drop(1, f"the {self.label} queue is full ({self.max_queue} items)")
        self._queue.append(item)
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        self._dropped_unreported += count
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            self.logger.warning("%s items dropped: %s (%d dropped so far)", self.label, why, self.dropped)

    def start(self) -> None:
        """Start the background writer; call from inside the running event loop."""
        if self._task is None and not self._closed:
            name = f"tokyo-ia-{self.label.replace(' ', '-')}-writer"
            self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    async def _run(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            self._wake.clear()
            if not await self.flush() and not self._closed:
                # Back off: during an outage every record() would wake us again at once.
                await asyncio.sleep(self.flush_interval_s)

    async def flush(self) -> bool:
        """Write everything queued now, batch by batch; False if the database refused a batch.

        A failed batch goes back to the front of the queue and is retried on the next tick.
        """
        while self._queue or self._dropped_unreported:
            items, marked = self._take_batch()
            if not items:
                return True
            try:
                await self.write(items)
            except Exception:  # any failure (outage, bad row): keep the items, retry later
                self.logger.exception("%s: writing %d items failed; will retry", self.label, len(items))
                self._dropped_unreported += marked
                self._requeue(items[1:] if marked else items)
                return False
            self.batches_written += 1
            self.items_written += len(items)
            if self._queue:
                # A loop turn between batches too: the next one's set-up and first slice would
                # otherwise run in the same stretch as this one's last slice and commit.
                await asyncio.sleep(0)
        return True

    def _take_batch(self) -> tuple[list[T], int]:
        """The next batch, and how many drops its first item reports (0: no marker)."""
        items: list[T] = []
        marked, self._dropped_unreported = self._dropped_unreported, 0
        marker = self.drop_marker(marked) if marked else None
        if marker is None:
            marked = 0
        else:
            items.append(marker)
        # Behind (a backlog of several batches)? Take more at once: each write costs a few
        # round trips through the event loop, which are slow while it is busy with requests,
        # so bigger batches are what lets the writer catch up under load.
        limit = self.batch_size * _CATCH_UP if len(self._queue) > self.batch_size else self.batch_size
        while self._queue and len(items) < limit:
            items.append(self._queue.popleft())
        return items, marked

    def _requeue(self, items: list[T]) -> None:
        room = self.max_queue - len(self._queue)
        if room < len(items):
            self._drop(len(items) - room, f"the {self.label} queue is full while the database is failing")
            items = items[len(items) - room :] if room > 0 else []
        self._queue.extendleft(reversed(items))

    async def close(self) -> None:
        """Stop the background task and write every queued item before returning."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        for attempt in range(_CLOSE_ATTEMPTS):
            if await self.flush():
                return
            await asyncio.sleep(min(self.flush_interval_s, 0.5) * (attempt + 1))
        lost = len(self._queue)
        self._queue.clear()
        self._drop(lost, f"the database refused the last {self.label} items at shutdown")
        self.logger.error("%s: %d items could not be written at shutdown and are lost", self.label, lost)

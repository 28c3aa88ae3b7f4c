"""SQLite writes on the event loop's own thread, for the audit trail and the spend ledger.

aiosqlite runs every SQLite call on a thread of its own. When the request loop keeps the CPU
busy, that thread has to win the GIL back for every statement and every row of an
``executemany``: measured at ~2,000 req/s on one core, a 2,000-row batch took 5-6 s of wall
time for ~30 ms of work, the writers fell behind by ~1,500 rows/s and their queues grew until
rows were dropped. Called from the loop's thread, the same statements never wait for the
GIL: the writers run them synchronously (the stdlib ``sqlite3`` driver), in slices of
:data:`~.batch.SLICE` rows with a loop turn between slices and between batches, so the loop
is held for about a millisecond at most.

:class:`InlineSessions` looks like the ``async_sessionmaker`` the writers are written
against (``async with sessions() as s, s.begin()``, ``await s.execute(...)``,
``await s.scalar(...)``, ``await s.connection()``), so their code does not change; a session
is one plain ``Connection`` (the writers run Core statements only). Only SQLite uses it;
PostgreSQL's async driver (asyncpg) has no thread and needs none of this.

Several worker processes share one SQLite file, and SQLite lets one writer in at a time. Its
busy handler *sleeps* until the lock is free, which here would put the whole event loop to
sleep (measured with two workers: batches waiting up to the busy timeout, 100 ms, on the loop).
So these connections have no busy timeout: each transaction starts with ``BEGIN IMMEDIATE``
(the write lock, up front), and while another process holds the lock that statement fails at
once and is retried after an ``asyncio.sleep`` (0.5 ms, doubling to 20 ms), for at most
:data:`BUSY_GIVE_UP_S`; only then does the batch fail (and is retried later, store/batch.py).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from types import TracebackType
from typing import Any

from sqlalchemy import Connection, Engine, Transaction, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from .db import _sqlite_pragmas

BUSY_GIVE_UP_S = 5.0
"""How long a batch waits (asynchronously) for another process's write lock before failing."""
_BUSY_FIRST_S = 0.0005
_BUSY_MAX_S = 0.02
CHECKPOINT_EVERY_S = 5.0
log = logging.getLogger("tokyo_ia.store")


def sync_sqlite_url(url: str) -> str | None:
    """The stdlib-driver URL of an on-disk ``sqlite+aiosqlite`` URL; None for anything else."""
    prefix = "sqlite+aiosqlite:"
    if not url.startswith(prefix) or ":memory:" in url or "mode=memory" in url:
        return None
    return "sqlite+pysqlite:" + url[len(prefix) :]


class InlineSessions:
    """An ``async_sessionmaker`` look-alike whose sessions run synchronously on the caller's thread."""

    def __init__(self, url: str) -> None:
        # No pre-ping: a local file's connection does not go stale, and a ping is a statement
        # per batch on the loop.
        self.engine: Engine = create_sync_engine(url)
        event.listen(self.engine, "connect", _sqlite_pragmas)
        event.listen(self.engine, "connect", _inline_pragmas)
        # One inline transaction at a time in this process: two writers on the same thread
        # must never wait for each other's SQLite lock (that wait would block the loop).
        self.lock = asyncio.Lock()

    def __call__(self) -> _InlineSession:
        return _InlineSession(self.engine, self.lock)

    def dispose(self) -> None:
        self.engine.dispose()

    @staticmethod
    async def checkpoints(engine: AsyncEngine, every_s: float = CHECKPOINT_EVERY_S) -> None:
        """Copy the WAL into the database every ``every_s`` seconds, through ``engine`` (the
        async one: the work happens on aiosqlite's thread, never on the loop). Run as a task."""
        while True:
            await asyncio.sleep(every_s)
            try:
                async with engine.connect() as conn:
                    await conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("sqlite: WAL checkpoint failed: %s", exc)


def _inline_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """No busy timeout: SQLite would sleep on the loop's thread (see the module doc)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=0")
    # WAL + NORMAL: a commit does not wait for fsync (the loop would wait with it). Still safe
    # against corruption and application crashes; a power cut can lose the last commits, as
    # it loses the rows still queued in memory anyway.
    cursor.execute("PRAGMA synchronous=NORMAL")
    # Nor does it copy the WAL back into the database (a checkpoint, with an fsync, of up to
    # ~4 MB): :meth:`InlineSessions.checkpoints` does that on aiosqlite's thread instead.
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


class _InlineSession:
    """A session over one plain :class:`~sqlalchemy.engine.Connection`, checked out at first
    use: the writers only run Core statements, and an ORM ``Session`` added about 0.1 ms of
    loop time to every batch."""

    __slots__ = ("_connection", "_engine", "_lock")

    def __init__(self, engine: Engine, lock: asyncio.Lock) -> None:
        self._engine = engine
        self._lock = lock
        self._connection: Connection | None = None

    async def __aenter__(self) -> _InlineSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self) -> Connection:
        if self._connection is None:
            self._connection = self._engine.connect()
        return self._connection

    def begin(self) -> _InlineTransaction:
        return _InlineTransaction(self, self._lock)

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        return self._connect().execute(*args, **kwargs)

    async def scalar(self, *args: Any, **kwargs: Any) -> Any:
        return self._connect().scalar(*args, **kwargs)

    async def connection(self) -> _InlineConnection:
        return _InlineConnection(self._connect())


class _InlineTransaction:
    __slots__ = ("_lock", "_session", "_transaction")

    def __init__(self, session: _InlineSession, lock: asyncio.Lock) -> None:
        self._session = session
        self._lock = lock
        self._transaction: Transaction | None = None

    async def __aenter__(self) -> _InlineTransaction:
        await self._lock.acquire()
        try:
            connection = self._session._connect()
            self._transaction = connection.begin()
            await _begin_immediate(connection)
        except BaseException:
            try:
                if self._transaction is not None:
                    self._transaction.rollback()
            finally:
                self._lock.release()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._transaction is not None:
                self._transaction.__exit__(exc_type, exc, tb)
        finally:
            self._lock.release()


async def _begin_immediate(connection: Connection) -> None:
    """Take SQLite's write lock, waiting for another process's with ``asyncio.sleep``."""
    delay = _BUSY_FIRST_S
    give_up = time.monotonic() + BUSY_GIVE_UP_S
    while True:
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            return
        except OperationalError as exc:
            if not _busy(exc) or time.monotonic() >= give_up:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, _BUSY_MAX_S)


def _busy(exc: OperationalError) -> bool:
    code = getattr(exc.orig, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc.orig)


class _InlineConnection:
    """The writers' view of the session's connection. Its transaction already holds SQLite's
    write lock (``write_locked``), so the audit trail does not ask for it again."""

    __slots__ = ("_connection",)

    write_locked = True

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    @property
    def dialect(self) -> Any:
        return self._connection.dialect

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        return self._connection.execute(*args, **kwargs)

    async def exec_driver_sql(self, statement: str, parameters: Any = None) -> Any:
        """Run ``statement``; a list of rows goes straight to the driver's ``executemany``.

        The writers hand over lists of ready tuples. SQLAlchemy's ``exec_driver_sql`` would
        check each one again and build an execution context per call: measured, that was a
        quarter of the writers' loop time per row. Errors are wrapped as SQLAlchemy wraps them.
        """
        if not isinstance(parameters, list):
            return self._connection.exec_driver_sql(statement, parameters)
        cursor = self._connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.executemany(statement, parameters)
        except sqlite3.Error as exc:
            raise DBAPIError.instance(statement, parameters[:1], exc, sqlite3.Error) from exc
        finally:
            cursor.close()
        return None

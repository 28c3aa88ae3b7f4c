"""The audit trail and the spend ledger writing SQLite on the event loop's thread (store/inline.py)."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError

from tests.integration.test_audit import GOLDEN_HASHES, event, golden_events
from tests.integration.test_ledger import entry
from tokyo_ia.accounting.ledger import SpendEntry, SpendLedger
from tokyo_ia.security.audit import AuditWriter, verify
from tokyo_ia.store import create_engine, session_factory
from tokyo_ia.store import inline as inline_module
from tokyo_ia.store.batch import sqlite_datetime
from tokyo_ia.store.db import upgrade
from tokyo_ia.store.inline import InlineSessions, sync_sqlite_url
from tokyo_ia.store.models import AuditEntry, SpendRecord, UTCDateTime


def test_only_on_disk_aiosqlite_urls_get_the_inline_writers() -> None:
    assert sync_sqlite_url("sqlite+aiosqlite:///./tokyo-ia.db") == "sqlite+pysqlite:///./tokyo-ia.db"
    assert sync_sqlite_url("sqlite+aiosqlite:////abs/path.db") == "sqlite+pysqlite:////abs/path.db"
    assert sync_sqlite_url("sqlite+aiosqlite:///:memory:") is None
    assert sync_sqlite_url("postgresql+asyncpg://u@h/db") is None


async def test_both_writers_share_the_database_without_waiting_on_each_other(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'books.db'}"
    await upgrade(url)
    inline = InlineSessions(sync_sqlite_url(url) or "")
    audit = AuditWriter(inline, batch_size=50, flush_interval_s=0.05)  # type: ignore[arg-type]
    ledger = SpendLedger(inline, batch_size=50, flush_interval_s=0.05)  # type: ignore[arg-type]
    audit.start()
    ledger.start()
    for i in range(1500):  # both writers busy at once, interleaved with the "requests"
        audit.record(event(i))
        ledger.record(entry(i))
        if i % 100 == 0:
            await asyncio.sleep(0.01)
    await audit.close()
    await ledger.close()
    inline.dispose()
    assert (audit.dropped, ledger.dropped) == (0, 0)
    engine = create_engine(url)
    sessions = session_factory(engine)
    try:
        async with sessions() as session:
            assert await session.scalar(select(func.count()).select_from(AuditEntry)) == 1500
            assert await session.scalar(select(func.count()).select_from(SpendRecord)) == 1500
        report = await verify(sessions)  # the chain written inline verifies through aiosqlite
        assert report.ok and report.count == 1500
    finally:
        await engine.dispose()


async def test_another_process_holding_the_lock_delays_the_writers_without_blocking_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker holding SQLite's write lock: the batches wait for it with asyncio sleeps
    (the loop keeps serving), and go in whole once it is released; held past BUSY_GIVE_UP_S,
    the batch fails, is kept, and goes in on a later try (store/batch.py's guarantees)."""
    path = tmp_path / "locked.db"
    url = f"sqlite+aiosqlite:///{path}"
    await upgrade(url)
    inline = InlineSessions(sync_sqlite_url(url) or "")
    audit = AuditWriter(inline, batch_size=20)  # type: ignore[arg-type]
    ledger = SpendLedger(inline, batch_size=20)  # type: ignore[arg-type]
    for i in range(30):
        audit.record(event(i))
        ledger.record(entry(i))
    assert await audit.flush() and await ledger.flush()
    loop = asyncio.get_running_loop()
    other = sqlite3.connect(path)
    try:
        # 1. Held for 0.3 s: the flushes wait, the loop does not.
        other.execute("BEGIN IMMEDIATE")  # the write lock, as another worker would hold it
        for i in range(30, 60):
            audit.record(event(i))
            ledger.record(entry(i))
        gaps: list[float] = []

        async def ticker() -> None:
            last = loop.time()
            while True:
                await asyncio.sleep(0.001)
                now = loop.time()
                gaps.append(now - last)
                last = now

        ticking = asyncio.ensure_future(ticker())
        loop.call_later(0.3, other.rollback)
        started = loop.time()
        assert await asyncio.gather(audit.flush(), ledger.flush()) == [True, True]
        ticking.cancel()
        assert loop.time() - started >= 0.25
        assert max(gaps) < 0.05, max(gaps)  # never a busy-handler sleep on the loop
        assert (audit.pending, ledger.pending) == (0, 0)
        # 2. Held past the bound: the batch fails and is kept.
        monkeypatch.setattr(inline_module, "BUSY_GIVE_UP_S", 0.1)
        other.execute("BEGIN IMMEDIATE")
        for i in range(60, 75):
            audit.record(event(i))
            ledger.record(entry(i))
        assert not await audit.flush()
        assert not await ledger.flush()
        assert (audit.pending, ledger.pending) == (15, 15)
    finally:
        other.rollback()
        other.close()
    await audit.close()
    await ledger.close()
    inline.dispose()
    assert (audit.dropped, ledger.dropped) == (0, 0)
    engine = create_engine(url)
    try:
        sessions = session_factory(engine)
        report = await verify(sessions)
        assert report.ok and report.count == 75
        async with sessions() as session:
            ids = await session.scalars(select(SpendRecord.request_id).order_by(SpendRecord.id))
            assert list(ids) == [f"req-{i}" for i in range(75)]
    finally:
        await engine.dispose()


async def test_a_refused_row_fails_its_whole_batch_as_a_sqlalchemy_error(tmp_path: Path) -> None:
    """Rows go to the driver's executemany directly; a row the database refuses still fails
    the way SQLAlchemy reports it (a DBAPIError with the statement), and nothing of its batch
    is stored."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'refused.db'}"
    await upgrade(url)
    inline = InlineSessions(sync_sqlite_url(url) or "")
    insert_sql = "INSERT INTO spend_ledger (created_at, request_id, route, tokens_in, tokens_out, " \
        "cost_usd, latency_ms, status, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"  # fmt: skip
    good = ("2026-01-01 00:00:00.000000", "req-good", "/v1/x", 1, 1, 0, 1.0, 200, 1)
    bad = ("2026-01-01 00:00:00.000000", None, "/v1/x", 1, 1, 0, 1.0, 200, 1)  # request_id NOT NULL
    with pytest.raises(DBAPIError, match=r"NOT NULL constraint failed: spend_ledger\.request_id") as info:
        async with inline() as session, session.begin():
            conn = await session.connection()
            await conn.exec_driver_sql(insert_sql, [good, good])
            await conn.exec_driver_sql(insert_sql, [good, bad])
    assert isinstance(info.value.orig, sqlite3.IntegrityError) and "INSERT INTO spend_ledger" in str(
        info.value
    )
    async with inline() as session, session.begin():
        conn = await session.connection()
        await conn.exec_driver_sql(insert_sql, [good])
    inline.dispose()
    rows = sqlite3.connect(tmp_path / "refused.db").execute("SELECT count(*) FROM spend_ledger").fetchone()
    assert rows == (1,)  # the refused batch rolled back whole; the next one went in


# -- the lean SQLite rows -----------------------------------------------------------------


def ledger_entries() -> list[SpendEntry]:
    """Entries that exercise every conversion: times, money rounding and limits, cuts, counts."""
    at = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    return [
        entry(0, created_at=at, cached_tokens=4, cache_status="miss", cost_usd=Decimal("0.000000075")),
        entry(1, created_at=at.replace(microsecond=0), cost_usd=0.0000135 * 3),  # a float, as carried
        entry(
            2, created_at=datetime(2030, 1, 2, 3, 4, 5, 7), cost_usd=Decimal("0.00000000005")
        ),  # naive; half-even: 0
        entry(3, created_at=at.astimezone(timezone(timedelta(hours=-5))), cost_usd=Decimal("0.00000000015")),
        entry(4, model="m" * 300, team="t" * 300, cost_usd=Decimal("99999999.12345678901")),
        entry(
            5, cost_usd=Decimal("1e12"), tokens_in=2**40, tokens_out=-3, attempts=True
        ),  # nonsense, clamped
        entry(6, cost_usd=float("nan"), cached_tokens=0, latency_ms=3),
        entry(7, cost_usd=-0.25, key_id=None, provider=None, upstream_model=None),
    ]


async def raw_rows(url: str, table: str) -> list[tuple[tuple[str, Any], ...]]:
    """Every stored value but the id, with its Python type (1 and 1.0 must not compare equal)."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            result = await conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY id")
            return [
                tuple((type(v).__name__, v) for k, v in zip(result.keys(), row, strict=True) if k != "id")
                for row in result
            ]
    finally:
        await engine.dispose()


async def test_the_lean_rows_are_what_sqlalchemy_stores(tmp_path: Path) -> None:
    """The writers hand SQLite tuples they encoded themselves (store/batch.py). Copy what they
    stored, read back through the models, into a second database with SQLAlchemy's Core INSERT:
    the two must hold the same values of the same types, the JSON aside (its spacing differs)."""
    lean, core = f"sqlite+aiosqlite:///{tmp_path / 'lean.db'}", f"sqlite+aiosqlite:///{tmp_path / 'core.db'}"
    await upgrade(lean)
    await upgrade(core)
    inline = InlineSessions(sync_sqlite_url(lean) or "")
    audit = AuditWriter(inline)  # type: ignore[arg-type]
    ledger = SpendLedger(inline)  # type: ignore[arg-type]
    for e in golden_events():
        audit.record(e)
    for s in ledger_entries():
        ledger.record(s)
    await audit.close()
    await ledger.close()
    inline.dispose()

    engines = create_engine(lean), create_engine(core)
    try:
        async with session_factory(engines[0])() as session:
            models: list[Any] = [*await session.scalars(select(AuditEntry).order_by(AuditEntry.id))]
            models += await session.scalars(select(SpendRecord).order_by(SpendRecord.id))
        async with engines[1].begin() as conn:
            for model in models:
                table = model.__table__
                values = {c.key: getattr(model, c.key) for c in table.columns if c.key != "id"}
                await conn.execute(insert(table), values)
        assert [r.hash for r in models[:7]] == GOLDEN_HASHES
        assert (await verify(session_factory(engines[0]))).ok
        assert models[8].cost_usd == Decimal("0.0000405") and models[9].cost_usd == 0  # exact, half-even
        assert models[10].cost_usd == Decimal("2E-10") and models[11].cost_usd == Decimal(
            "99999999.1234567890"
        )
    finally:
        for engine in engines:
            await engine.dispose()

    assert await raw_rows(lean, "spend_ledger") == await raw_rows(core, "spend_ledger")
    lean_audit, core_audit = await raw_rows(lean, "audit_log"), await raw_rows(core, "audit_log")
    assert len(lean_audit) == len(core_audit) == 7
    for lean_row, core_row in zip(lean_audit, core_audit, strict=True):
        detail = _COLUMN_NAMES.index("detail")
        assert lean_row[:detail] + lean_row[detail + 1 :] == core_row[:detail] + core_row[detail + 1 :]
        # The same JSON, keys in the same order; SQLAlchemy writes it with json.dumps' spaces.
        assert json.dumps(json.loads(lean_row[detail][1])) == core_row[detail][1]


_COLUMN_NAMES = [c.key for c in AuditEntry.__table__.columns if c.key != "id"]


def test_sqlite_datetime_is_what_the_column_type_binds() -> None:
    dialect = sqlite.dialect()
    bind = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert bind is not None
    rng = random.Random(1502)
    zones = [UTC, None, timezone(timedelta(hours=9)), timezone(timedelta(hours=-3, minutes=-30))]
    for _ in range(5000):
        seconds = rng.randrange(86_400 * 365 * 9_990) + 86_400 * 2
        ts = datetime(1, 1, 1) + timedelta(
            seconds=seconds, microseconds=rng.choice([0, rng.randrange(10**6)])
        )
        ts = ts.replace(tzinfo=rng.choice(zones))
        assert sqlite_datetime(ts) == bind(ts)

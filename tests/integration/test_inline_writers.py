"""The audit trail and the spend ledger writing SQLite on the event loop's thread (store/inline.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import func, select

from tests.integration.test_audit import event
from tests.integration.test_ledger import entry
from tokyo_ia.accounting.ledger import SpendLedger
from tokyo_ia.security.audit import AuditWriter, verify
from tokyo_ia.store import create_engine, session_factory
from tokyo_ia.store.db import upgrade
from tokyo_ia.store.inline import InlineSessions, sync_sqlite_url
from tokyo_ia.store.models import AuditEntry, SpendRecord


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
